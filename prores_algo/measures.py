"""Measurements of the residual stream that keep no training state: the spike rule (`SpikeCounter`),
how alike the positions of a sequence are (`position_cosine`, the collapse signal), and how large each
branch is against the stream it joins (`branch_to_stream_ratio`, what decides whether a short ProRes
warmup helps). `monitor` logs them during training; `benchmarks/quality.py` uses them directly.

Torch only.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch
from torch import nn

from prores_algo.layers import find_residual_layers, resolve_branch

__all__ = ['SpikeCounter', 'position_cosine', 'branch_to_stream_ratio']


# --- spike counting ---------------------------------------------------------------------------------


class SpikeCounter:
    """Counts values >= mean + k·std of the previous `window` values (OLMo's loss / grad-norm spikes)."""

    def __init__(self, window: int = 100, num_std: float = 7.0):
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f'spike_window must be an int >= 2, got {window!r}')
        if isinstance(num_std, bool) or not isinstance(num_std, (int, float)) or not num_std > 0:
            raise ValueError(f'spike_std must be a positive number, got {num_std!r}')
        self.window, self.num_std = window, float(num_std)
        self.values: deque[float] = deque(maxlen=window)
        self.count = 0

    def is_spike(self, value: float) -> bool:
        if len(self.values) < self.window:
            return False
        n = len(self.values)
        mean = math.fsum(self.values) / n
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in self.values) / n)
        return value >= mean + self.num_std * std and value > mean

    def push(self, value: float) -> bool:
        """Add one value; True if it was a spike. NaN/inf count as spikes and stay out of the window."""
        value = float(value)
        if not math.isfinite(value):
            self.count += 1
            return True
        spike = self.is_spike(value)
        self.count += spike
        self.values.append(value)
        return spike

    def state_dict(self) -> dict[str, Any]:
        return {'values': list(self.values), 'count': self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = deque((float(v) for v in state.get('values', [])), maxlen=self.window)
        self.count = int(state.get('count', 0))


# --- collapse ----------------------------------------------------------------------------------------


def position_cosine(hidden: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between the hidden states of different positions of each sequence,
    averaged over the batch: 1.0 when every position carries the same vector (the collapse that a
    too-short ProRes warmup causes in Post-LN), near 0 for unrelated directions.

    `hidden` is (batch, seq, dim). Exact and O(seq): with u_t the unit vectors,
    |sum_t u_t|^2 = T + sum_{s != t} cos(u_s, u_t).
    """
    if hidden.ndim != 3 or hidden.shape[1] < 2:
        raise ValueError(f'position_cosine needs (batch, seq >= 2, dim) hidden states, got {tuple(hidden.shape)}')
    u = torch.nn.functional.normalize(hidden.detach().float(), dim=-1)
    T = u.shape[1]
    pair_sum = u.sum(1).square().sum(-1) - T
    return (pair_sum / (T * (T - 1))).mean()


# --- branch size at initialisation --------------------------------------------------------------------

# A stream that leaves a norm has one RMS at every position (exactly, up to the norm's eps, a trained
# gain and the rounding of its dtype); a Pre-LN stream, a sum of an embedding and branch outputs, varies
# by ~1/sqrt(2·width) between positions: 1% at width 4096. In float32 a thousandth separates the two. A
# norm computed in bfloat16 rounds its 1/RMS to 2^-8 relative, a spread of ~0.1-0.3% between positions,
# so a stream in a half-precision dtype is judged against half its epsilon instead (0.4% in bfloat16,
# still below a Pre-LN stream's spread up to a width of ~30000).
NORMALISED_SPREAD = 1e-3


def normalised_spread_tolerance(dtype: torch.dtype) -> float:
    """The per-position RMS spread below which a stream of `dtype` counts as leaving a norm."""
    return max(NORMALISED_SPREAD, torch.finfo(dtype).eps / 2) if dtype.is_floating_point else NORMALISED_SPREAD


def _first_tensor(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    return None


@torch.no_grad()
def branch_to_stream_ratio(model: nn.Module, *args, layers=None, **kwargs) -> dict[str, Any]:
    """How large each residual branch is against the residual stream, on one forward pass.

    For every branch of every transformer layer: RMS of the branch's output over RMS of the hidden
    states entering its layer (the stream the branch is added to; for a layer's second branch the
    stream also holds the first branch, which this leaves out). Run it on the model as initialised and
    without ProRes (or at α = 1): with ProRes attached the branch outputs carry α.

    `model(*args, **kwargs)` is called once in eval mode. Returns `{'per_branch': [[r, ...] per layer],
    'median': float, 'min': float, 'max': float, 'normalised_stream': bool}`. `normalised_stream` is
    True when the stream entering every layer after the first has the same RMS at every position (to
    `normalised_spread_tolerance` of its dtype): a norm sits on the stream itself (Post-LN, DeepNorm), where the ratio means
    something else than in Pre-LN, whose stream is a sum of unnormalised branches.
    """
    found = layers if layers is not None else find_residual_layers(model)
    stream: dict[int, float] = {}
    spread: dict[int, float] = {}  # per layer: std / mean of the per-position RMS of its input
    tolerance: dict[int, float] = {}  # per layer: the spread its input's dtype allows a normalised stream
    branch: dict[tuple[int, int], float] = {}

    def rms(t: torch.Tensor) -> float:
        return float(t.detach().float().square().mean().sqrt())

    def on_layer(i):
        def hook(module, a, kw):
            x = _first_tensor(a) if a else _first_tensor(kw.get('hidden_states'))
            if x is not None and i not in stream:
                stream[i] = rms(x)
                per_position = x.detach().float().square().mean(-1).sqrt().flatten()
                if per_position.numel() > 1 and float(per_position.mean()) > 0:
                    spread[i] = float(per_position.std() / per_position.mean())
                    tolerance[i] = normalised_spread_tolerance(x.dtype)

        return hook

    def on_branch(i, j):
        def hook(module, a, out):
            y = _first_tensor(out)
            if y is not None and (i, j) not in branch:
                branch[(i, j)] = rms(y)

        return hook

    handles = []
    for rl in found:
        handles.append(rl.module.register_forward_pre_hook(on_layer(rl.index), with_kwargs=True))
        for j, name in enumerate(rl.branches):
            handles.append(resolve_branch(rl.module, name).register_forward_hook(on_branch(rl.index, j)))
    was_training = model.training
    model.eval()
    try:
        model(*args, **kwargs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    per_branch = [
        [branch[(rl.index, j)] / stream[rl.index] for j in range(len(rl.branches)) if (rl.index, j) in branch]
        for rl in found
        if stream.get(rl.index)
    ]
    flat = sorted(r for row in per_branch for r in row)
    if not flat:
        raise ValueError('branch_to_stream_ratio: the forward pass reached no residual branch')
    later = [spread[rl.index] / tolerance[rl.index] for rl in found[1:] if rl.index in spread]
    return {
        'per_branch': per_branch,
        'median': flat[len(flat) // 2],
        'min': flat[0],
        'max': flat[-1],
        'normalised_stream': bool(later) and max(later) < 1.0,
    }
