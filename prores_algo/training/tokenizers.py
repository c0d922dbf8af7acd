"""Tokenizers for the data layer: a file-free byte tokenizer and a thin Hugging Face wrapper.

Both expose the same small interface used by `prores_algo.training.data`:

    name: str               what to record in dataset metadata (and pass back to `load_tokenizer`)
    vocab_size: int         number of ids the model's embedding must cover
    eos_token_id: int       appended after every document when packing
    encode(text) -> list[int]   no special tokens added
    decode(ids) -> str          special tokens skipped

Note: this module is named `tokenizers` inside the `prores_algo` package; it does not shadow the
Hugging Face `tokenizers` distribution because imports are absolute (`prores_algo.training.tokenizers`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ['Tokenizer', 'ByteTokenizer', 'HFTokenizer', 'load_tokenizer']


@runtime_checkable
class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_token_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus an end-of-sequence id 256. Needs no files or downloads."""

    name = 'byte'
    eos_token_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode('utf-8'))

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as an int32 array without a Python list in between (the packer's fast path)."""
        return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        # Skip eos (and anything out of byte range) so decode(encode(x) + [eos]) == x.
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode('utf-8', errors='replace')

    def __repr__(self) -> str:
        return 'ByteTokenizer()'


class HFTokenizer:
    """Wraps a `transformers` tokenizer so it has the `Tokenizer` interface above."""

    def __init__(self, tokenizer: Any, name: str):
        if tokenizer.eos_token_id is None:
            raise ValueError(
                f'tokenizer {name!r} (the `tokenizer` field) has no eos token; documents are '
                'separated by eos when packing, so choose a tokenizer that defines one.'
            )
        self.tokenizer = tokenizer
        self.name = name
        self.eos_token_id = int(tokenizer.eos_token_id)
        # len() counts added tokens too, unlike `tokenizer.vocab_size`; the model must cover all of them.
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        # verbose=False: documents are longer than model_max_length by design (they are packed
        # afterwards), so the "sequence length is longer than ..." warning is noise here.
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)['input_ids'])

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f'HFTokenizer({self.name!r}, vocab_size={self.vocab_size})'


def _is_hub_id(name: str) -> bool:
    # Hub ids are 'repo' or 'namespace/repo'; anything with more segments is a path.
    return name.count('/') <= 1 and not name.startswith(('/', '.', '~'))


def load_tokenizer(name: str) -> ByteTokenizer | HFTokenizer:
    """'byte' -> `ByteTokenizer`; anything else -> `AutoTokenizer.from_pretrained(name)` (path or hub id).

    Raises ValueError naming the `tokenizer` field if it cannot be loaded or has no eos token.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"`tokenizer` must be a non-empty string ('byte', a local tokenizer folder or a "
            f'Hugging Face hub id), got {name!r}'
        )
    if name == 'byte':
        return ByteTokenizer()
    path = os.path.expanduser(name)
    # Fail fast on a path that does not exist, instead of letting transformers treat it as a hub id
    # (which retries over the network for a minute when offline).
    if not _is_hub_id(name) and not os.path.exists(path):
        raise ValueError(
            f'could not load tokenizer {name!r} (the `tokenizer` field): no such local path. '
            "Use 'byte', an existing tokenizer folder, or a Hugging Face hub id."
        )
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path if os.path.exists(path) else name)
    except Exception as e:  # transformers raises OSError, ValueError, HFValidationError, ...
        raise ValueError(f'could not load tokenizer {name!r} (the `tokenizer` field): {type(e).__name__}: {e}') from e
    return HFTokenizer(tok, name)
