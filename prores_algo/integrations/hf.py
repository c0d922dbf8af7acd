"""ProRes for the Hugging Face `transformers.Trainer`, as a `TrainerCallback`.

    from prores_algo.integrations.hf import ProResCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[ProResCallback(t_warmup=24000)])
    trainer.train()

What happens:
  on_train_begin  the trainer's model (unwrapped from DDP / DeepSpeed / torch.compile wrappers) gets
                  ProRes' hooks; α is set for `state.global_step` (so a resumed run continues exactly).
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
Works with `deepspeed=` (ZeRO-3 included): ProRes only scales module outputs by a non-persistent
buffer, which ZeRO never partitions. `ResidualMonitorCallback` (per-layer residual RMS, gradient norm,
update size, spike counters) is re-exported from `prores_algo.monitor`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

from torch import nn
from transformers import TrainerCallback

from prores_algo import schedules
from prores_algo.surgery import ProResController, find_residual_layers, warn_if_short_warmup

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
        if name in ('DistributedDataParallel', 'DataParallel', 'DeepSpeedEngine', 'PipelineEngine',
                    'FullyShardedDataParallel') and isinstance(getattr(model, 'module', None), nn.Module):
            model = model.module
            continue
        break
    return model


def _resolve_warmup(t_warmup, num_layers: int, max_steps: Optional[int]) -> float:
    """W in optimizer steps: a number, 'Nba', or a fraction of max_steps ('0.1dur')."""
    if t_warmup is None:
        return 1000.0 * num_layers
    if isinstance(t_warmup, str):
        text = t_warmup.strip()
        try:
            if text.endswith('dur'):
                frac = float(text[:-3])
                if not 0 < frac <= 1:
                    raise ValueError
                if not max_steps or max_steps <= 0:
                    raise ValueError(f't_warmup={t_warmup!r} needs the total number of steps, which the Trainer '
                                     'does not know (an IterableDataset without max_steps): give W in steps')
                return frac * max_steps
            if text.endswith('ba'):
                text = text[:-2]
            value = float(text)
        except ValueError as e:
            if 'needs the total' in str(e):
                raise
            raise ValueError(f"t_warmup={t_warmup!r}: use optimizer steps (24000 or '24000ba') or a fraction of "
                             "max_steps ('0.1dur')") from None
        t_warmup = value
    if isinstance(t_warmup, bool) or not isinstance(t_warmup, (int, float)) or not t_warmup > 0 \
            or math.isinf(t_warmup):
        raise ValueError(f't_warmup must be a positive number of optimizer steps, got {t_warmup!r}')
    return float(t_warmup)


class ProResCallback(TrainerCallback):
    """Progressive Residual Warmup for `transformers.Trainer`.

    Args:
        schedule: α schedule name (`prores_algo.schedules.names()`, default 'linear', the paper's).
        t_warmup: W, in optimizer steps (int, float or 'Nba'), or a fraction of `max_steps` ('0.1dur').
            Default: the paper's 1000 steps per layer (W = 1000·L).
        layer_class, branches, layer_pattern: for models ProRes does not know (see `apply_prores`).
        log_alphas: add `prores/alpha/layer_{i}` and `prores/alpha/mean` to every log.
        remove_when_done: remove the hooks once every α is 1 for good (default True).
    """

    def __init__(self,
                 schedule: str = 'linear',
                 t_warmup: Union[int, float, str, None] = None,
                 layer_class: Union[type, str, None] = None,
                 branches: Optional[Sequence[str]] = None,
                 log_alphas: bool = True,
                 *,
                 layer_pattern: Optional[str] = None,
                 remove_when_done: bool = True):
        self.schedule = schedules.canonical_name(schedule)
        if t_warmup is not None and not isinstance(t_warmup, str):
            _resolve_warmup(t_warmup, 1, None)  # validate numbers now, strings once max_steps is known
        elif isinstance(t_warmup, str) and not t_warmup.strip().endswith('dur'):
            _resolve_warmup(t_warmup, 1, None)
        self.t_warmup = t_warmup
        if branches is not None and (isinstance(branches, str) or not list(branches)):
            raise ValueError(f"branches must be a list of module names like ['self_attn.o_proj', 'mlp.down_proj'], "
                             f'got {branches!r}')
        self.layer_class = layer_class
        self.branches = None if branches is None else tuple(branches)
        self.layer_pattern = layer_pattern
        self.log_alphas = bool(log_alphas)
        self.remove_when_done = bool(remove_when_done)
        self.controller: Optional[ProResController] = None
        self.model: Optional[nn.Module] = None

    # --- placement ----------------------------------------------------------------------------------
    def install(self, trainer) -> 'ProResCallback':
        """Add this callback *first* in `trainer`'s callback list, so reporting integrations see α."""
        handler = trainer.callback_handler
        handler.callbacks = [cb for cb in handler.callbacks if cb is not self]
        handler.callbacks.insert(0, self)
        return self

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
        layers = find_residual_layers(model, self.layer_class, self.branches, self.layer_pattern)
        warmup = _resolve_warmup(self.t_warmup, len(layers), getattr(state, 'max_steps', None))
        self.controller = ProResController(layers, self.schedule, warmup, self.remove_when_done)
        self.controller.model = model  # lets prores_algo.export.fold_prores(callback) return the model
        self.model = model
        max_steps = getattr(state, 'max_steps', None)
        if max_steps and max_steps > 0 and self.controller.warmup_steps > max_steps:
            import warnings
            warnings.warn(f'ProRes t_warmup ({self.controller.warmup_steps:g} steps) exceeds max_steps ({max_steps}): '
                          'the deepest layers never reach α = 1 in this run. Use a shorter t_warmup, e.g. "0.1dur".')
        warn_if_short_warmup(self.controller)
        self.set_step(step)

    def on_step_begin(self, args, state, control, **kwargs):
        self.set_step(int(state.global_step))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.log_alphas or self.controller is None or logs is None:
            return
        metrics = self.alpha_metrics()
        last = state.log_history[-1] if state.log_history else None
        # Trainer.log appended {**logs, 'step': global_step} just before on_log: keep it in step with `logs`
        if isinstance(last, dict) and last.get('step') == state.global_step and all(
                k in last for k in logs if k != 'step'):
            last.update(metrics)
        logs.update(metrics)

    # --- helpers ------------------------------------------------------------------------------------
    def set_step(self, step: int) -> list[float]:
        c = self.controller
        if c is None:
            raise RuntimeError('ProResCallback is not attached yet (it attaches at on_train_begin)')
        if c.removed and c.done(step):
            return c.alphas
        return c.set_step(step)

    def alpha_metrics(self) -> dict[str, float]:
        alphas = self.controller.alphas
        metrics = {f'prores/alpha/layer_{i}': a for i, a in enumerate(alphas)}
        metrics['prores/alpha/mean'] = sum(alphas) / len(alphas)
        return metrics

    @property
    def alphas(self) -> list[float]:
        return [] if self.controller is None else self.controller.alphas

    def __repr__(self) -> str:
        return f'ProResCallback(schedule={self.schedule!r}, t_warmup={self.t_warmup!r})'


def __getattr__(name):
    if name == 'ResidualMonitorCallback':
        from prores_algo.monitor import ResidualMonitorCallback
        return ResidualMonitorCallback
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
