"""`DecoderConfig`: the reference decoder's settings, checked on construction (one message per field,
naming it), and the defaults the training entries resolve (`default_d_ffn`, `default_deepnet_init`).

The placements and initialisations themselves are described in `decoder.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ['NORM_PLACEMENTS', 'INIT_SCHEMES', 'DecoderConfig', 'default_d_ffn', 'default_deepnet_init']

NORM_PLACEMENTS = ('pre', 'post', 'sandwich', 'deepnorm', 'lns')
INIT_SCHEMES = ('official', 'torch')


def default_deepnet_init(prores_on: bool) -> bool:
    """The official code's rule for `DecoderConfig.deepnet_init` when a config does not set it: DeepNet
    initialisation for plain DeepNorm, plain normal(0, init_std) for DeepNorm + ProRes."""
    return not prores_on


def _is_pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _is_pos_float(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def default_d_ffn(d_model: int) -> int:
    """SwiGLU hidden size: 8/3 * d_model rounded up to a multiple of 64 (keeps ~the FLOPs of a 4x MLP)."""
    return -(-8 * d_model // (3 * 64)) * 64


@dataclass
class DecoderConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ffn: int | None = None  # None -> default_d_ffn(d_model); resolved in __post_init__
    max_seq_len: int = 1024
    norm: str = 'pre'  # one of NORM_PLACEMENTS
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5  # the official configs' rms_norm_eps
    init_std: float = 0.02
    tie_embeddings: bool = False
    final_norm: bool = True  # official: a final norm for every placement; False only drops it for post/deepnorm
    deepnet_init: bool = True  # DeepNorm only: DeepNet init (True) or plain normal(0, init_std) (False)
    init: str = 'official'  # one of INIT_SCHEMES: the official code's normal(0, init_std), or PyTorch's defaults
    embed_std: float | None = None  # token-embedding std; None: init_std * sqrt(d_model) (official), 1 (torch)

    def __post_init__(self):
        for name in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'max_seq_len'):
            value = getattr(self, name)
            if not _is_pos_int(value):
                raise ValueError(f'DecoderConfig.{name} must be a positive int, got {value!r}')
        if self.d_ffn is None:
            self.d_ffn = default_d_ffn(self.d_model)
        elif not _is_pos_int(self.d_ffn):
            raise ValueError(f'DecoderConfig.d_ffn must be a positive int or None, got {self.d_ffn!r}')
        if self.norm not in NORM_PLACEMENTS:
            raise ValueError(f'DecoderConfig.norm must be one of {NORM_PLACEMENTS}, got {self.norm!r}')
        for name in ('rope_theta', 'norm_eps', 'init_std'):
            value = getattr(self, name)
            if not _is_pos_float(value):
                raise ValueError(f'DecoderConfig.{name} must be a positive finite number, got {value!r}')
        if self.init not in INIT_SCHEMES:
            raise ValueError(f'DecoderConfig.init must be one of {INIT_SCHEMES}, got {self.init!r}')
        if self.embed_std is not None and not _is_pos_float(self.embed_std):
            raise ValueError(f'DecoderConfig.embed_std must be a positive finite number, got {self.embed_std!r}')
        for name in ('tie_embeddings', 'final_norm', 'deepnet_init'):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f'DecoderConfig.{name} must be a bool (true/false), got {getattr(self, name)!r}')
        if not self.final_norm and self.norm not in ('post', 'deepnorm'):
            raise ValueError(
                f'DecoderConfig.final_norm=False is only allowed for norm=post or deepnorm (their last '
                f'block ends in a norm); norm={self.norm!r} needs the final norm: remove final_norm'
            )
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f'DecoderConfig.d_model ({self.d_model}) must be divisible by DecoderConfig.n_heads ({self.n_heads})'
            )
        if self.head_dim % 2 != 0:
            raise ValueError(
                f'head dim d_model / n_heads = {self.head_dim} must be even for RoPE '
                f'(DecoderConfig.d_model={self.d_model}, DecoderConfig.n_heads={self.n_heads})'
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads
