"""Watch the residual stream while ProRes warms it up: per-layer RMS, gradient norm, update size, spikes.

`ResidualMonitor` (Composer `Callback`) and `ResidualMonitorCallback` (`transformers.TrainerCallback`)
log, every `log_interval` optimizer steps, for each transformer layer i (found with
`layers.find_residual_layers`, the same layers ProRes scales):

  residual_monitor/rms/layer_{i}              RMS of the layer's output (the residual stream after layer
                                              i) over the whole batch (all micro-batches; all ranks)
  residual_monitor/grad_norm/layer_{i}        L2 norm of the gradient of the layer's parameters after the
                                              last backward of the step, before clipping and the update
  residual_monitor/update_ratio/layer_{i}     ||θ_after − θ_before|| / ||θ_before|| over the layer's
                                              parameters, for the optimizer step of that batch
  residual_monitor/position_cosine/layer_{i}  mean cosine similarity between the positions of each
                                              sequence in the layer's output (1 = every position the
                                              same vector: collapse)
  residual_monitor/collapse                   1 once the largest position cosine has stayed >=
                                              `collapse_threshold` for `collapse_patience` measured
                                              steps (then also a warning, once, and a stop with
                                              `stop_on_collapse=True`)

and, counted over every step (OLMo's definition: a value is a spike when it is >= mean + spike_std·std
of the previous `spike_window` values, population std, once that many values exist; with std = 0 the
value must also exceed the mean):

  residual_monitor/loss_spikes, residual_monitor/grad_spikes   cumulative counts (grad: the global
                                                                gradient norm)

Cost: nothing is registered between measured steps except what the spike counters need (Composer:
the loss it already syncs, one fused norm over the gradients per micro-batch when `grad_norm`; HF: the
loss from each forward output and the Trainer's logged `grad_norm`). On a measured step: one forward
hook per layer, one norm per parameter, and (for `update_ratio`) a copy of the layers' parameters.
Activation-checkpointing recomputation is not counted twice (only the real forward is recorded).

Distributed: RMS sums are all-reduced over ranks; gradient and parameter norms are all-reduced when the
parameters are sharded (FSDP / DTensor), not under DDP (replicated). Under DeepSpeed ZeRO the HF
callback logs RMS and spikes; per-layer gradient norms and update ratios need the parameters' own
`.grad` / data, which ZeRO-2/3 partition, and are skipped there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from prores_algo.layers import find_residual_layers
from prores_algo.measures import SpikeCounter, branch_to_stream_ratio, position_cosine
from prores_algo.timing import to_steps
from prores_algo.warn import warn_user

__all__ = ['SpikeCounter', 'position_cosine', 'branch_to_stream_ratio', 'LayerStats', 'MonitorBase']


# --- per-layer measurements --------------------------------------------------------------------------


def _dist_world() -> int:
    return (
        torch.distributed.get_world_size()
        if (torch.distributed.is_available() and torch.distributed.is_initialized())
        else 1
    )


def local_tensor(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(local tensor, is sharded): a DTensor's local shard, else the tensor itself."""
    local = getattr(t, '_local_tensor', None)
    if local is not None:
        return local, True
    return t, False


def sum_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    norms = torch._foreach_norm([t.float() if t.dtype not in (torch.float32, torch.float64) else t for t in tensors])
    return torch.stack([n.float() for n in norms]).square().sum()


def _mean_over_ranks(sums: list[torch.Tensor], counts: list[int]) -> list[float] | None:
    """Per layer: sum over ranks of `sums` / sum over ranks of `counts` (one all-reduce); None if nothing
    was recorded here, NaN for a layer nothing was recorded for on any rank."""
    if not counts or not any(counts):
        return None
    device = next((s.device for s in sums if s.device.type != 'cpu'), torch.device('cpu'))
    packed = torch.stack(
        [s.to(device) for s in sums] + [torch.tensor(float(c), dtype=torch.float64, device=device) for c in counts]
    )
    if _dist_world() > 1:
        torch.distributed.all_reduce(packed)
    n = len(sums)
    totals, ns = packed[:n].tolist(), packed[n:].tolist()
    return [t / c if c else float('nan') for t, c in zip(totals, ns, strict=True)]


class LayerStats:
    """Framework-free measurements over the residual layers of one model (shared by both callbacks)."""

    def __init__(self, model: nn.Module, layers: Sequence[nn.Module], sharded: bool | None = None):
        self.model = model
        self.layers = list(layers)
        self.params = [[p for p in layer.parameters() if p.requires_grad] for layer in self.layers]
        self.sharded = any(local_tensor(p)[1] for ps in self.params for p in ps) if sharded is None else sharded
        self.recording = False  # True during a real forward pass of a measured step
        self._rms_handles: list = []
        self._sumsq: list[torch.Tensor] = []
        self._count: list[int] = []
        self.track_cosine = False  # also accumulate position_cosine of each layer's output in the same hook
        self._cos_sum: list[torch.Tensor] = []
        self._cos_n: list[int] = []
        self._snapshot: list[list[torch.Tensor]] | None = None

    # RMS of each layer's output ----------------------------------------------------------------------
    def start_rms(self) -> None:
        self.stop_rms()
        self._sumsq = [torch.zeros((), dtype=torch.float64) for _ in self.layers]
        self._count = [0] * len(self.layers)
        self._cos_sum = [torch.zeros((), dtype=torch.float64) for _ in self.layers]
        self._cos_n = [0] * len(self.layers)
        for i, layer in enumerate(self.layers):
            self._rms_handles.append(layer.register_forward_hook(self._make_rms_hook(i)))

    def _make_rms_hook(self, i: int):
        def hook(module, args, output):
            if not self.recording:
                return
            out = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(out, torch.Tensor):
                return
            with torch.no_grad():
                s = out.detach().float().square().sum().double()
                if self._sumsq[i].device != s.device:
                    self._sumsq[i] = self._sumsq[i].to(s.device)
                self._sumsq[i] += s
                self._count[i] += out.numel()
                if self.track_cosine and out.ndim == 3 and out.shape[1] > 1:
                    c = position_cosine(out).double() * out.shape[0]
                    if self._cos_sum[i].device != c.device:
                        self._cos_sum[i] = self._cos_sum[i].to(c.device)
                    self._cos_sum[i] += c
                    self._cos_n[i] += out.shape[0]

        return hook

    def stop_rms(self) -> None:
        for h in self._rms_handles:
            h.remove()
        self._rms_handles = []

    def rms(self) -> list[float] | None:
        """RMS per layer over everything recorded since start_rms (None if no forward was recorded)."""
        self.stop_rms()
        means = _mean_over_ranks(self._sumsq, self._count)
        return None if means is None else [math.sqrt(m) for m in means]

    def cosines(self) -> list[float] | None:
        """position_cosine per layer, averaged over the sequences recorded since start_rms (all ranks)."""
        self.stop_rms()
        return _mean_over_ranks(self._cos_sum, self._cos_n)

    # gradient norms --------------------------------------------------------------------------------
    def grad_norms_sq(self) -> torch.Tensor | None:
        """Squared gradient norm per layer (a device tensor, no sync); None if no parameter has a grad."""
        rows, any_grad = [], False
        for ps in self.params:
            grads = [local_tensor(p.grad)[0] for p in ps if p.grad is not None]
            any_grad |= bool(grads)
            rows.append(sum_squares(grads))
        if not any_grad:
            return None
        device = next((r.device for r in rows if r.device.type != 'cpu'), rows[0].device)
        return torch.stack([r.to(device) for r in rows])

    def reduce_sharded(self, t: torch.Tensor) -> torch.Tensor:
        if self.sharded and _dist_world() > 1:
            t = t.clone()
            torch.distributed.all_reduce(t)
        return t

    # relative update size --------------------------------------------------------------------------
    @torch.no_grad()
    def snapshot(self) -> None:
        self._snapshot = [[local_tensor(p.detach())[0].clone() for p in ps] for ps in self.params]

    @torch.no_grad()
    def update_ratios(self) -> list[float] | None:
        if self._snapshot is None:
            return None
        before, self._snapshot = self._snapshot, None
        diff_sq, base_sq = [], []
        for ps, olds in zip(self.params, before, strict=True):
            news = [local_tensor(p.detach())[0] for p in ps]
            if any(n.shape != o.shape for n, o in zip(news, olds, strict=True)):
                return None  # parameters were re-partitioned in between (ZeRO-3): cannot compare
            diff_sq.append(sum_squares([n.float() - o.float() for n, o in zip(news, olds, strict=True)]))
            base_sq.append(sum_squares(olds))
        device = next((d.device for d in diff_sq if d.device.type != 'cpu'), torch.device('cpu'))
        packed = self.reduce_sharded(torch.stack([d.to(device) for d in diff_sq + base_sq]))
        n = len(self.layers)
        d, b = packed[:n].tolist(), packed[n:].tolist()
        return [math.sqrt(x) / math.sqrt(y) if y > 0 else float('nan') for x, y in zip(d, b, strict=True)]


def _parse_interval(interval: int | str) -> int:
    message = f"log_interval must be a positive number of batches (10 or '10ba'), got {interval!r}"
    try:
        steps = to_steps(interval, 'log_interval')
    except ValueError:
        raise ValueError(message) from None
    if not steps.is_integer() or steps < 1:
        raise ValueError(message)
    return int(steps)


def per_layer_metrics(prefix: str, values: Sequence[float] | None) -> dict[str, float]:
    return {} if values is None else {f'residual_monitor/{prefix}/layer_{i}': float(v) for i, v in enumerate(values)}


class MonitorBase:
    """What both monitor callbacks share: settings (one signature, so a YAML's keys are checked against
    it), layer statistics, collapse detection, spike counters. A framework's callback adds its own state
    in `_init_loop_state`."""

    def __init__(
        self,
        log_interval: int | str = '10ba',
        rms: bool = True,
        grad_norm: bool = True,
        update_ratio: bool = True,
        spike_window: int = 100,
        spike_std: float = 7.0,
        layer_class: str | None = None,
        branches: Sequence[str] | None = None,
        layer_pattern: str | None = None,
        position_cosine: bool = True,
        collapse_threshold: float = 0.95,
        collapse_patience: int = 10,
        stop_on_collapse: bool = False,
        *,
        interval: int | str | None = None,
    ):
        if interval is not None:  # the name of earlier releases
            warn_user('interval= is deprecated: use log_interval=', DeprecationWarning)
            log_interval = interval
        self.log_interval = _parse_interval(log_interval)
        self.track_cosine = bool(position_cosine)
        if (
            isinstance(collapse_threshold, bool)
            or not isinstance(collapse_threshold, (int, float))
            or not 0 < collapse_threshold <= 1
        ):
            raise ValueError(f'collapse_threshold must be a number in (0, 1], e.g. 0.95, got {collapse_threshold!r}')
        if not isinstance(stop_on_collapse, bool):
            raise ValueError(f'stop_on_collapse must be true or false, got {stop_on_collapse!r}')
        if stop_on_collapse and not self.track_cosine:
            raise ValueError('stop_on_collapse=True needs position_cosine=True (collapse is measured by it)')
        if isinstance(collapse_patience, bool) or not isinstance(collapse_patience, int) or collapse_patience < 1:
            raise ValueError(f'collapse_patience must be a positive int (measured steps), got {collapse_patience!r}')
        self.collapse_threshold, self.stop_on_collapse = float(collapse_threshold), stop_on_collapse
        self.collapse_patience = collapse_patience
        self._high_cosine_run = 0  # consecutive measured steps at or above the threshold
        self.collapsed_at: int | None = None  # the step at which the collapse was reported
        self.track_rms, self.track_grad_norm, self.track_update_ratio = bool(rms), bool(grad_norm), bool(update_ratio)
        self.spikes = spike_window is not None and spike_window > 0
        self.loss_spikes = SpikeCounter(spike_window, spike_std) if self.spikes else None
        self.grad_spikes = SpikeCounter(spike_window, spike_std) if self.spikes else None
        self.layer_class, self.branches, self.layer_pattern = layer_class, branches, layer_pattern
        self.stats: LayerStats | None = None
        self.measuring = False
        self._init_loop_state()

    def _init_loop_state(self) -> None:
        """Per-framework state of a subclass (called at the end of `__init__`)."""

    def _find(self, model: nn.Module, sharded: bool | None = None) -> LayerStats:
        layers = find_residual_layers(model, self.layer_class, self.branches, self.layer_pattern)
        stats = LayerStats(model, [l.module for l in layers], sharded=sharded)
        stats.track_cosine = self.track_cosine
        return stats

    def _begin_measure(self) -> None:
        self.measuring = True
        if self.track_rms or self.track_cosine:
            self.stats.start_rms()
        if self.track_update_ratio:
            self.stats.snapshot()

    def _layer_metrics(self, step: int) -> tuple[dict[str, float], bool]:
        """RMS and position-cosine metrics of a measured step; True if this step shows a collapse (warned
        once per run: every position of a sequence carries nearly the same vector)."""
        metrics: dict[str, float] = {}
        rms = self.stats.rms() if self.track_rms else None  # each of these also takes the hooks away
        cos = self.stats.cosines() if self.track_cosine else None
        metrics.update(per_layer_metrics('rms', rms))
        if cos is None:
            return metrics, False
        metrics.update(per_layer_metrics('position_cosine', cos))
        worst = max(range(len(cos)), key=lambda i: cos[i] if math.isfinite(cos[i]) else -1.0)
        high = math.isfinite(cos[worst]) and cos[worst] >= self.collapse_threshold
        self._high_cosine_run = self._high_cosine_run + 1 if high else 0
        collapsed = self._high_cosine_run >= self.collapse_patience
        metrics['residual_monitor/collapse'] = float(collapsed)
        if collapsed and self.collapsed_at is None:
            self.collapsed_at = step
            warn_user(
                f'Residual stream collapse at step {step}: for {self._high_cosine_run} measured steps the mean cosine '
                f'similarity between positions has been >= collapse_threshold {self.collapse_threshold:g} (now '
                f'{cos[worst]:.3f} at layer {worst}), i.e. every position carries nearly the same vector and the model '
                'can only predict token frequencies. With ProRes this '
                'happens when the alpha warmup is too short per layer (Post-LN with the linear schedule above all): '
                'restart with a longer t_warmup (the paper: 1000 steps per layer) or another schedule'
                + (
                    '; stopping the run (stop_on_collapse=True).'
                    if self.stop_on_collapse
                    else '; set stop_on_collapse=True to stop such runs automatically.'
                )
            )
        return metrics, collapsed and self.collapsed_at == step

    def spike_metrics(self) -> dict[str, float]:
        if not self.spikes:
            return {}
        return {
            'residual_monitor/loss_spikes': self.loss_spikes.count,
            'residual_monitor/grad_spikes': self.grad_spikes.count,
        }

    def state_dict(self) -> dict[str, Any]:
        if not self.spikes:
            return {}
        return {'loss_spikes': self.loss_spikes.state_dict(), 'grad_spikes': self.grad_spikes.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.spikes and state:
            self.loss_spikes.load_state_dict(state.get('loss_spikes', {}))
            self.grad_spikes.load_state_dict(state.get('grad_spikes', {}))
