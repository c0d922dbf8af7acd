"""Build settings: argument validation, the tokenizer (loaded from its name and checked; its name
recorded so that the same tokenizer compares equal), and the settings that identify a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from prores_algo.training.data.layout import DTYPE
from prores_algo.training.data.sources import _normalize_source
from prores_algo.training.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer

# Settings that determine the samples; `ensure_dataset` reuses a dataset only if all of them match.
# (`compression` is deliberately absent: it changes the bytes on disk, not the samples.)
SETTING_FIELDS = ('source', 'tokenizer', 'seq_len', 'val_fraction', 'max_tokens', 'max_bytes', 'seed')


def _validate_args(seq_len: Any, val_fraction: Any, max_tokens: Any, compression: Any, seed: Any) -> None:
    from streaming.base.compression import get_compressions, is_compression

    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f'`seq_len` must be an int >= 2 (next-token prediction needs 2), got {seq_len!r}')
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ValueError(f'`val_fraction` must be in [0, 1) (0 writes no val split), got {val_fraction!r}')
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0):
        raise ValueError(f'`max_tokens` must be a positive int or None, got {max_tokens!r}')
    if compression is not None and not is_compression(compression):
        raise ValueError(
            f'`compression` {compression!r} is not supported by streaming; use None or one of '
            f'{sorted(get_compressions())}'
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f'`seed` must be an int, got {seed!r}')


def _normalize_tokenizer_name(name: str) -> str:
    if name == 'byte':
        return name
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name


def _checked_tokenizer(tokenizer: Any) -> Any:
    """`tokenizer` itself, or loaded if it is a name; ValueError if it is not a tokenizer or its ids overflow DTYPE."""
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    if not isinstance(tok, (ByteTokenizer, HFTokenizer)) and not all(
        hasattr(tok, a) for a in ('encode', 'eos_token_id', 'vocab_size', 'name')
    ):
        raise ValueError(
            f'`tokenizer` must be a name or a prores_algo.training.tokenizers tokenizer, got {tokenizer!r}'
        )
    if tok.vocab_size > np.iinfo(DTYPE).max:
        raise ValueError(f'`tokenizer` vocab_size {tok.vocab_size} does not fit {DTYPE}')
    return tok


def _requested_settings(
    source: str,
    tokenizer: Any,
    seq_len: int,
    val_fraction: float,
    max_tokens: int | None,
    max_bytes: int | None,
    seed: int,
) -> dict[str, Any]:
    name = tokenizer if isinstance(tokenizer, str) else tokenizer.name
    return {
        'source': _normalize_source(source),
        'tokenizer': _normalize_tokenizer_name(name),
        'seq_len': seq_len,
        'val_fraction': float(val_fraction),
        'max_tokens': max_tokens,
        'max_bytes': max_bytes,
        'seed': seed,
    }
