"""Packing: documents -> eos-terminated token streams, split by document into train / val, cut into
samples of exactly seq_len tokens."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from prores_algo.training.data.layout import COLUMN, DTYPE


def _is_val(doc_index: int, seed: int, val_fraction: float) -> bool:
    """Stable (process- and platform-independent, unlike hash()) document -> split assignment."""
    h = hashlib.blake2b(f'{seed}:{doc_index}'.encode(), digest_size=8).digest()
    return int.from_bytes(h, 'big') / 2.0**64 < val_fraction


class _Packer:
    """Cuts one split's token stream into rows of exactly seq_len and writes them; keeps the remainder."""

    def __init__(self, writer: Any, seq_len: int):
        self.writer = writer
        self.seq_len = seq_len
        self.carry = np.zeros(0, dtype=DTYPE)
        self.samples = 0
        self.tokens_read = 0
        self.documents = 0

    def add(self, tokens: np.ndarray) -> None:
        self.documents += 1
        self.tokens_read += len(tokens)
        stream = np.concatenate([self.carry, tokens]) if len(self.carry) else tokens
        n = len(stream) // self.seq_len
        for row in stream[: n * self.seq_len].reshape(n, self.seq_len):
            self.writer.write({COLUMN: np.ascontiguousarray(row)})
        self.samples += n
        self.carry = stream[n * self.seq_len :].copy()

    def summary(self) -> dict[str, int]:
        return {
            'samples': self.samples,
            'tokens': self.samples * self.seq_len,
            'documents': self.documents,
            'tokens_read': self.tokens_read,
            'tokens_dropped': len(self.carry),
        }


def _pack_documents(
    docs: Iterator[str],
    tok: Any,
    packers: dict[str, _Packer],
    bar: Any,
    max_tokens: int | None,
    seed: int,
    val_fraction: float,
) -> None:
    """Encode each document, append eos and hand it to its split's packer; stop after `max_tokens` tokens
    (eos included; None: no cap). `bar` (a progress bar) is told every document's token count."""
    budget = max_tokens
    eos = np.array([tok.eos_token_id], dtype=DTYPE)
    encode_array = getattr(tok, 'encode_array', None)
    for index, doc in enumerate(docs):
        ids = encode_array(doc) if encode_array else np.asarray(tok.encode(doc), dtype=DTYPE)
        tokens = np.concatenate([ids.astype(DTYPE, copy=False), eos])
        if budget is not None:
            tokens = tokens[:budget]
            budget -= len(tokens)
        split = 'val' if val_fraction > 0 and _is_val(index, seed, val_fraction) else 'train'
        packers[split].add(tokens)
        bar.update(len(tokens))
        if budget == 0:
            break


def _check_samples(
    summary: dict[str, dict[str, int]],
    seq_len: int,
    max_tokens: int | None,
    max_bytes: int | None,
    val_fraction: float,
) -> None:
    """ValueError naming the settings to change if a split got no sample (its tokens are fewer than seq_len)."""
    total = sum(v['tokens_read'] for v in summary.values())
    for s, v in summary.items():
        if v['samples'] == 0:
            raise ValueError(
                f'split {s!r} got 0 samples: it has {v["tokens_read"]} tokens from {v["documents"]} document(s) '
                f'({total} tokens in total) but `seq_len` is {seq_len}. Lower `seq_len`, raise `max_tokens` '
                f'(now {max_tokens}) / `max_bytes` (now {max_bytes}), adjust `val_fraction` (now {val_fraction}), '
                'or use a larger `source`.'
            )
