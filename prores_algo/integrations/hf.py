"""ProRes for the Hugging Face `transformers.Trainer`, as a `TrainerCallback`.

    from prores_algo.integrations.hf import ProResCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[ProResCallback(t_warmup=24000)])
    trainer.train()

What happens:
  on_train_begin  the trainer's model (unwrapped from DDP / DeepSpeed / torch.compile wrappers) gets
                  ProRes' hooks; α is set for `state.global_step` (so a resumed run continues exactly).
  first forward   (`measure_init`, a fresh run) before the first training forward runs, the model runs once
                  more on a few of its samples (eval mode, no gradient, α at 1) to measure how large the
                  branches start; the short-warmup advice is for that regime, and the first log carries
                  `prores/init/*`. Not under FSDP or DeepSpeed, where a nested forward would disturb the
                  sharding's own hooks: those runs get the conservative advice at on_train_begin.
  on_step_begin   α ← schedule(state.global_step). `global_step` counts *optimizer* steps, so with
                  gradient accumulation every micro-batch of a step trains with the same α, as in Composer.
  (t >= W)        the hooks are removed: zero overhead after warmup.
  on_log          `prores/alpha/layer_{i}` and `prores/alpha/mean` are added to the logs (and to
                  `state.log_history`).

Reporting integrations (W&B, TensorBoard, ...) are placed *before* user callbacks in the Trainer's list,
so they have already sent a log when our `on_log` adds α. `ProResCallback(...).install(trainer)` puts the
callback first, so that they see α too.

Evaluation and generation during warmup use the current α (the model *is* that function at step t).
Save a mid-warmup model for plain `from_pretrained` with `prores_algo.export.fold_prores(callback)`.
Works with `deepspeed=` (ZeRO-3 included): α is a non-persistent buffer, which ZeRO never partitions,
and ProRes never replaces a parameter. `ResidualMonitorCallback` (per-layer residual RMS, gradient norm,
update size, position cosine, spike counters) is the monitor's callback for the same Trainer.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from prores_algo.monitor import MonitorBase, local_tensor, per_layer_metrics, sum_squares
from prores_algo.spec import WARMUP_STEPS_METRIC, ProResSpec, alpha_metrics
from prores_algo.surgery import ProResController
from prores_algo.warmup_advice import MEASURE_SAMPLES, InitMeasure, head_of_batch, measure_and_advise

__all__ = ['ProResCallback', 'ResidualMonitorCallback', 'unwrap_model']


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / DeepSpeedEngine / FSDP-1 root / torch.compile wrappers (not PEFT)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = getattr(model, '_orig_mod', None)  # torch.compile's OptimizedModule
        if isinstance(inner, nn.Module):
            model = inner
            continue
        name = type(model).__name__
        if name in (
            'DistributedDataParallel',
            'DataParallel',
            'DeepSpeedEngine',
            'PipelineEngine',
            'FullyShardedDataParallel',
        ) and isinstance(getattr(model, 'module', None), nn.Module):
            model = model.module
            continue
        break
    return model


class _FirstInLine:
    """`install(trainer)`: put this callback first in the Trainer's list, so that reporting integrations
    (W&B, TensorBoard, ...), which the Trainer places before user callbacks, see what it adds to a log."""

    def install(self, trainer):
        handler = trainer.callback_handler
        handler.callbacks = [cb for cb in handler.callbacks if cb is not self]
        handler.callbacks.insert(0, self)
        return self


def _add_to_log(state, logs: dict, metrics: dict) -> None:
    """Add `metrics` to the log being written and to its `state.log_history` entry (`Trainer.log` appended
    {**logs, 'step': global_step} just before calling `on_log`)."""
    last = state.log_history[-1] if state.log_history else None
    if isinstance(last, dict) and last.get('step') == state.global_step and all(k in last for k in logs if k != 'step'):
        last.update(metrics)
    logs.update(metrics)


def _sharded(args, model: nn.Module) -> bool:
    """Whether the Trainer shards the model (FSDP or DeepSpeed, set in TrainingArguments or through
    accelerate's config): no nested forward there."""
    if getattr(args, 'fsdp', None) or getattr(args, 'deepspeed', None) is not None:
        return True
    if any(os.environ.get(k, '').lower() in ('1', 'true') for k in ('ACCELERATE_USE_DEEPSPEED', 'ACCELERATE_USE_FSDP')):
        return True
    return any(hasattr(p, 'ds_id') or type(p).__name__ in ('FlatParameter', 'DTensor') for p in model.parameters())


class ProResCallback(_FirstInLine, TrainerCallback, ExportableState):
    """Progressive Residual Warmup for `transformers.Trainer`.

    Args:
        schedule: α schedule name (`prores_algo.alpha_schedules.names()`, default 'linear', the paper's).
        t_warmup: W, in optimizer steps (int, float or 'Nba'), a fraction of `max_steps` ('0.1dur'), or
            'auto': min(1000·L, 0.25·max_steps), resolved at on_train_begin and kept in the checkpoint's
            trainer_state.json, so that a resume with a larger max_steps keeps W.
            Default: the paper's 1000 steps per layer (W = 1000·L).
        layer_class, branches, layer_pattern: for models ProRes does not know (see `apply_prores`).
        remove_when_done: remove the hooks once every α is 1 for good (default True).
        mechanism: 'auto' (α in the GEMM where it can ride, default) or 'hook' (see `apply_prores`).
        log_alphas: add `prores/alpha/layer_{i}` and `prores/alpha/mean` to every log.
        measure_init: on a fresh run, measure how large the branches start on the first training batch
            and advise for that regime (default True; see the module). False, or under FSDP / DeepSpeed:
            the conservative 100-steps-per-layer warning at on_train_begin.
    """

    def __init__(
        self,
        schedule: str = 'linear',
        t_warmup: int | float | str | None = None,
        *,
        layer_class: type | str | None = None,
        branches: Sequence[str] | None = None,
        layer_pattern: str | None = None,
        remove_when_done: bool = True,
        mechanism: str = 'auto',
        log_alphas: bool = True,
        measure_init: bool = True,
    ):
        if not isinstance(measure_init, bool):
            raise ValueError(f'measure_init must be true or false, got {measure_init!r}')
        self.spec = ProResSpec(
            schedule, t_warmup, layer_class, branches, layer_pattern, bool(remove_when_done), mechanism
        )
        self.spec.check_steps_warmup()  # numbers now; a 'dur' fraction once max_steps is known
        self.log_alphas = bool(log_alphas)
        self.controller: ProResController | None = None
        self.model: nn.Module | None = None
        self.recorded_warmup_steps: float | None = None  # W of an 'auto' run, from a checkpoint
        self.measure_init = measure_init
        self.init_measure: InitMeasure | None = None  # measured on the first batch, or from the checkpoint
        self._log_warmup = False
        self._log_measure: dict[str, float] = {}
        self._measure_hook = None

    @property
    def schedule(self) -> str:
        return self.spec.schedule

    @property
    def t_warmup(self):
        return self.spec.t_warmup

    # --- Trainer events -----------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError('ProResCallback.on_train_begin got no model from the Trainer')
        model = unwrap_model(model)
        step = int(state.global_step)
        c = self.controller
        if c is not None and self.model is model and (not c.removed or c.done(step)):
            self.set_step(step)  # a second train() on the same model (e.g. resume): keep the hooks
            return
        if c is not None and not c.removed:
            c.remove()  # a different model: let go of the old one
        max_steps = getattr(state, 'max_steps', None)
        layers = self.spec.find_layers(model)
        recorded = self._recorded_warmup(state) if self.spec.auto and step > 0 else None
        w = recorded if recorded is not None else self.spec.warmup_steps(len(layers), max_steps)
        self.controller = self.spec.apply(model, w, layers=layers)
        if self.spec.auto:
            self.controller.auto_run_steps = float(max_steps) if max_steps else None
        self.recorded_warmup_steps = w if self.spec.auto else None
        self._log_warmup = True
        self.model = model
        self.spec.warn_if_longer_than_run(self.controller, max_steps, 'steps', 'max_steps')
        if step > 0:  # a resumed run repeats the advice its first run measured (or the conservative one)
            self.init_measure = self._recorded_measure(state)
            self.controller.init_measure = self.init_measure
            self.spec.warn_if_short(self.controller, self.init_measure)
        elif self.measure_init and not _sharded(args, model):  # first in line: other hooks see only training
            self._measure_hook = model.register_forward_pre_hook(
                self._measure_first_forward, with_kwargs=True, prepend=True
            )
        else:
            self.spec.warn_if_short(self.controller)
        self.set_step(step)

    def _measure_first_forward(self, module, args, kwargs):
        """A one-shot pre-hook: measure on the head of the first *training* batch (an evaluation or a
        generation before it is let through), then let the forward run."""
        if self._measure_hook is None or not (module.training and torch.is_grad_enabled()):
            return
        self._measure_hook.remove()
        self._measure_hook = None
        kwargs = {k: v for k, v in kwargs.items() if k != 'past_key_values'}  # never write a caller's cache
        if not args:  # HF's Trainer calls model(**inputs): the batch size is that of input_ids
            kwargs = head_of_batch(kwargs, MEASURE_SAMPLES)
        else:
            args, kwargs = head_of_batch((tuple(args), kwargs), MEASURE_SAMPLES)
        measure = measure_and_advise(self.controller, module, tuple(args), kwargs, every_rank=True)
        self.init_measure = measure
        if measure is not None:
            self._log_measure = measure.metrics()

    def on_step_begin(self, args, state, control, **kwargs):
        self.set_step(int(state.global_step))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.controller is None or logs is None:
            return
        metrics = {}
        if self._log_measure:  # the branches as measured on the first batch, once (whatever log_alphas says)
            metrics.update(self._log_measure)
            self._log_measure = {}
        if self.log_alphas:
            metrics.update(self.alpha_metrics())
        if self.log_alphas and self._log_warmup:  # W as resolved, once per train()
            metrics[WARMUP_STEPS_METRIC] = float(self.controller.warmup_steps)
            self._log_warmup = False
        if metrics:
            _add_to_log(state, logs, metrics)

    # --- checkpoints: an 'auto' W travels in trainer_state.json (`stateful_callbacks`) ------------------
    def _recorded_warmup(self, state) -> float | None:
        if self.recorded_warmup_steps is not None:  # restore_callback_states_from_checkpoint=True set it
            return float(self.recorded_warmup_steps)
        saved = (getattr(state, 'stateful_callbacks', None) or {}).get(type(self).__name__)
        if isinstance(saved, list):
            saved = saved[0] if saved else None
        w = ((saved or {}).get('attributes') or {}).get('recorded_warmup_steps')
        return None if w is None else float(w)

    def _recorded_measure(self, state) -> InitMeasure | None:
        m = self.init_measure  # restore_callback_states_from_checkpoint=True sets it (as the saved dict)
        if m is None:
            saved = (getattr(state, 'stateful_callbacks', None) or {}).get(type(self).__name__)
            if isinstance(saved, list):
                saved = saved[0] if saved else None
            m = ((saved or {}).get('attributes') or {}).get('init_measure')
        return InitMeasure(**m) if isinstance(m, dict) else m

    def state(self) -> dict:
        """What `trainer_state.json` keeps (transformers' ExportableState): the arguments, JSON-safe, the W
        an 'auto' run resolved and the branches as measured on the first batch."""
        spec = self.spec
        layer_class = spec.layer_class
        if layer_class is not None and not isinstance(layer_class, str):
            layer_class = getattr(layer_class, '__name__', str(layer_class))
        return {
            'args': {
                'schedule': spec.schedule,
                't_warmup': spec.t_warmup,
                'layer_class': layer_class,
                'branches': None if spec.branches is None else list(spec.branches),
                'log_alphas': self.log_alphas,
                'layer_pattern': spec.layer_pattern,
                'remove_when_done': spec.remove_when_done,
                'mechanism': spec.mechanism,
                'measure_init': self.measure_init,
            },
            'attributes': {
                'recorded_warmup_steps': self.recorded_warmup_steps,
                'init_measure': None if self.init_measure is None else dataclasses.asdict(self.init_measure),
            },
        }

    # --- helpers ------------------------------------------------------------------------------------
    def set_step(self, step: int) -> list[float]:
        c = self.controller
        if c is None:
            raise RuntimeError('ProResCallback is not attached yet (it attaches at on_train_begin)')
        if c.removed and c.done(step):
            return c.alphas
        return c.set_step(step)

    def alpha_metrics(self) -> dict[str, float]:
        return alpha_metrics(self.controller.alphas)

    @property
    def alphas(self) -> list[float]:
        return [] if self.controller is None else self.controller.alphas

    def __repr__(self) -> str:
        return f'ProResCallback(schedule={self.schedule!r}, t_warmup={self.t_warmup!r})'


# --- the residual monitor ------------------------------------------------------------------------------
class ResidualMonitorCallback(MonitorBase, _FirstInLine, TrainerCallback):
    """`transformers.TrainerCallback` with the same measurements as `ResidualMonitor`.

    Steps are optimizer steps (`state.global_step`). Metrics of a measured step are added to the next
    `on_log` (place the callback first with `install(trainer)` for reporting integrations to see them).
    Per-layer gradient norms are taken from each parameter's gradient after its last accumulation of
    the step (a post-accumulate-grad hook), i.e. before the Trainer clips. The grad-spike counter uses
    the Trainer's own logged `grad_norm` (pre-clipping global norm), so its window holds logged steps;
    the loss-spike counter uses the mean forward loss of every step.
    """

    def _init_loop_state(self) -> None:
        self._root_handles: list = []
        self._grad_handles: list = []
        self._param_sq: dict[int, torch.Tensor] = {}
        self._step_losses: list[torch.Tensor] = []
        self._pending_losses: list[torch.Tensor] = []
        self._pending: dict[str, float] = {}

    # root-model hooks: record only real forwards; collect the loss of each training forward
    def _pre_forward(self, module, args):
        if module.training and self.stats is not None:
            self.stats.recording = self.measuring

    def _post_forward(self, module, args, output):
        if self.stats is not None:
            self.stats.recording = False
        if not (self.spikes and module.training and torch.is_grad_enabled()):
            return
        loss = getattr(output, 'loss', None)
        if loss is None and isinstance(output, dict):
            loss = output.get('loss')
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._step_losses.append(loss.detach().float().reshape(1))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model = unwrap_model(model)
        if self.stats is not None and self.stats.model is model:
            return
        for h in self._root_handles:
            h.remove()
        zero = bool(getattr(args, 'deepspeed', None)) if args is not None else False
        self.stats = self._find(model)
        self._zero = zero or any(hasattr(p, 'ds_id') for p in model.parameters())
        self._root_handles = [
            model.register_forward_pre_hook(self._pre_forward),
            model.register_forward_hook(self._post_forward),
        ]

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_losses = []
        if self.stats is None or int(state.global_step) % self.log_interval != 0:
            return
        self._measured_step = int(state.global_step)  # on_step_end sees global_step already advanced
        self._begin_measure_hf()

    def _begin_measure_hf(self) -> None:
        self.measuring = True
        if self.track_rms or self.track_cosine:
            self.stats.start_rms()
        if self._zero:
            return  # ZeRO partitions .grad and parameter data: per-layer grad / update are not measurable here
        if self.track_update_ratio:
            self.stats.snapshot()
        if self.track_grad_norm:
            self._param_sq = {}
            for ps in self.stats.params:
                for p in ps:
                    self._grad_handles.append(p.register_post_accumulate_grad_hook(self._grad_hook))

    def _grad_hook(self, p: torch.Tensor) -> None:
        if p.grad is not None:
            self._param_sq[id(p)] = sum_squares([local_tensor(p.grad)[0].detach()])

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for h in self._grad_handles:
            h.remove()
        self._grad_handles = []
        if self.measuring and self._param_sq:
            rows = []
            for ps in self.stats.params:
                vals = [self._param_sq[id(p)] for p in ps if id(p) in self._param_sq]
                rows.append(torch.stack(vals).sum() if vals else torch.zeros(()))
            device = next((r.device for r in rows if r.device.type != 'cpu'), torch.device('cpu'))
            grad_sq = self.stats.reduce_sharded(torch.stack([r.to(device) for r in rows]))
            self._pending.update(per_layer_metrics('grad_norm', grad_sq.sqrt().tolist()))
            self._param_sq = {}

    def on_step_end(self, args, state, control, **kwargs):
        for h in self._grad_handles:  # a step without on_pre_optimizer_step (should not happen)
            h.remove()
        self._grad_handles = []
        if self.spikes and self._step_losses:
            self._pending_losses.append(torch.cat(self._step_losses).mean().reshape(1))
        self._step_losses = []
        if not self.measuring:
            return
        self.measuring = False
        self.stats.recording = False
        layer_metrics, collapsed = self._layer_metrics(self._measured_step)
        self._pending.update(layer_metrics)
        if collapsed and self.stop_on_collapse:
            control.should_training_stop = True
        if self.track_update_ratio and not self._zero:
            self._pending.update(per_layer_metrics('update_ratio', self.stats.update_ratios()))
        if self.spikes:
            self._flush_losses()
            self._pending.update(self.spike_metrics())

    def _flush_losses(self) -> None:
        if self._pending_losses:
            device = self._pending_losses[0].device
            for v in torch.cat([l.to(device) for l in self._pending_losses]).tolist():
                self.loss_spikes.push(v)
            self._pending_losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        if self.spikes and 'grad_norm' in logs and logs['grad_norm'] is not None:
            self.grad_spikes.push(float(logs['grad_norm']))
            self._pending.update(self.spike_metrics())
        if not self._pending:
            return
        _add_to_log(state, logs, self._pending)
        self._pending = {}

    def on_train_end(self, args, state, control, **kwargs):
        if self.stats is not None:
            self.stats.stop_rms()
        for h in self._grad_handles:
            h.remove()
        self._grad_handles = []
        if self.spikes:
            self._flush_losses()
