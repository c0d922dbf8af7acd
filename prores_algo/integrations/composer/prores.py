"""ProRes for MosaicML Composer: the algorithm `ProRes` (YAML name `prores`) and the `ResidualMonitor` callback.

`ProRes` is a thin event layer over `ProResSpec` (prores_algo.spec) and the hooks of `prores_algo.surgery`.

Events:
  INIT        surgery: hook every layer's residual branches (α at t = 0).
  FIT_START   re-attach to branch modules other INIT-time algorithms replaced; resolve `t_warmup`
              (a `dur` fraction and 'auto' need `max_duration`; 'auto' is resolved once, and a resumed
              run keeps the W its checkpoint recorded); log `prores/warmup_steps`; warn if W > max_duration or if W / L is below the
              steps per layer where ProRes helps (on a fresh run with `measure_init`, that waits for the
              first batch); delay the LR warmup.
  BATCH_START α ← schedule(state.timestamp): stateless, so a resumed run is exact; log α; once every
              α is 1 for good, the hooks are removed (zero overhead after warmup). On a fresh run's first
              batch, measure how large the branches start (`warmup_advice`), log it under
              `prores/init/*` and warn if W / L is short for that regime; the checkpoint keeps it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch
from composer.core import Algorithm, Callback, Event, State, Time, TimeUnit
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from torch.nn.parallel import DistributedDataParallel

from prores_algo.integrations.composer.lr import delay_lr_warmup
from prores_algo.integrations.composer.time import parse_time
from prores_algo.monitor import MonitorBase, local_tensor, per_layer_metrics, sum_squares
from prores_algo.spec import WARMUP_STEPS_METRIC, ProResSpec, alpha_metrics, check_resume, default_warmup
from prores_algo.surgery import ProResController
from prores_algo.timing import auto_warmup_steps, is_auto
from prores_algo.warmup_advice import MEASURE_SAMPLES, InitMeasure, advise_warmup, head_of_batch

__all__ = ['ProRes', 'ResidualMonitor']

log = logging.getLogger(__name__)

_UNIT_FIELD = {TimeUnit.BATCH: 'batch', TimeUnit.TOKEN: 'token', TimeUnit.SAMPLE: 'sample'}


class ProRes(Algorithm):
    """Progressive Residual Warmup (arXiv 2603.05369): `x_{l+1} = x_l + α(l, t)·F(x_l)`, α warming 0 → 1.

    Args:
        schedule: α schedule, one of `prores_algo.alpha_schedules.names()` (default 'linear', the paper's).
        t_warmup: W, when every α reaches 1: a Time string ('24000ba', '0.2dur', '5e8tok') or an int
            (batches). Default: the paper's 1000 batches per layer (W = 1000·L ba). 'auto':
            W = min(1000·L, 0.25·max_duration) batches (`timing.auto_warmup_steps`), max_duration in
            batches or epochs; resolved once at FIT_START and recorded in the checkpoint.
        layer_class, branches, layer_pattern: for models ProRes does not know (see `apply_prores`).
        remove_when_done: remove the hooks once every α is 1 for good (default True).
        mechanism: 'auto' (α in the GEMM where it can ride, default) or 'hook' (see `apply_prores`).
        lr_warmup_delay: start the LR scheduler's warmup this much later (default '0ba', the paper's).
            With a warmup from 0, no parameter moves during the delay.
        log_interval: log `prores/alpha/layer_{i}` every this many batches (int or 'Nba'); default 1.
        measure_init: on a fresh run's first batch, run the model once more on a few of its samples
            (eval mode, no gradient, every α at 1) to measure how large the residual branches start against
            the stream, log it (`prores/init/branch_to_stream`, `prores/init/normalised_stream`,
            `prores/init/min_steps_per_layer`) and warn only if W / L is short for that regime (default
            True; False: the conservative 100-steps-per-layer warning at FIT_START). Only where W is
            counted in batches (optimizer steps): W in tokens or samples is not comparable to the study's
            steps per layer, so nothing is measured or advised.

    Every front end takes `schedule` and `t_warmup` first, then the same keyword-only arguments in the
    same order (`ProResCallback`, `integrations.deepspeed.apply_prores`), then its own.
    """

    def __init__(
        self,
        schedule: str = 'linear',
        t_warmup: str | int | Time | None = None,
        *,
        layer_class: str | None = None,
        branches: Sequence[str] | None = None,
        layer_pattern: str | None = None,
        remove_when_done: bool = True,
        mechanism: str = 'auto',
        lr_warmup_delay: str | int | Time = '0ba',
        log_interval: str | int = 1,
        measure_init: bool = True,
    ):
        self.spec = ProResSpec(schedule, t_warmup, layer_class, branches, layer_pattern, remove_when_done, mechanism)
        self.schedule = self.spec.schedule
        self.auto = is_auto(t_warmup)
        self._auto_w: float | None = None  # W of t_warmup='auto', in batches, once resolved or restored
        self.t_warmup = None if t_warmup is None or self.auto else parse_time(t_warmup, 't_warmup')
        if self.t_warmup is not None:
            if self.t_warmup.unit not in (*_UNIT_FIELD, TimeUnit.DURATION):
                raise ValueError(
                    f't_warmup={t_warmup!r}: use batches ("24000ba"), tokens ("5e8tok"), samples ("1e6sp") '
                    f'or a fraction of max_duration ("0.2dur"), not {self.t_warmup.unit.value}'
                )
            if not self.t_warmup.value > 0:
                raise ValueError(f't_warmup must be positive, e.g. "24000ba" or "0.1dur", got {t_warmup!r}')
            if self.t_warmup.unit == TimeUnit.DURATION and self.t_warmup.value > 1:
                raise ValueError(f't_warmup={t_warmup!r} is more than the whole run: use a fraction in (0, 1]')
        self.lr_warmup_delay = parse_time(lr_warmup_delay, 'lr_warmup_delay')
        if self.lr_warmup_delay.value < 0:
            raise ValueError(
                f'lr_warmup_delay must be >= 0, e.g. "0ba" (the default: no delay) or "500ba", got {lr_warmup_delay!r}'
            )
        interval = parse_time(log_interval, 'log_interval')
        if interval.unit != TimeUnit.BATCH or interval.value < 1:
            raise ValueError(
                f'log_interval must be a positive number of batches (e.g. 1 or "100ba"), got {log_interval!r}'
            )
        self.log_interval = int(interval.value)
        if not isinstance(measure_init, bool):
            raise ValueError(f'measure_init must be true or false, got {measure_init!r}')
        self.measure_init = measure_init
        self.init_measure: InitMeasure | None = None  # measured on the first batch, or from the checkpoint
        self._measure_pending = False
        self.layer_class = layer_class
        self.branches = self.spec.branches
        self.layer_pattern = layer_pattern
        self.remove_when_done = remove_when_done
        self.controller: ProResController | None = None
        self._unit: TimeUnit | None = None
        self._warned_long = False  # the "W exceeds the run" warning, once per instance

    # --- Composer plumbing -------------------------------------------------------------------------
    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.FIT_START, Event.BATCH_START)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._init(state, logger)
        elif event == Event.FIT_START:
            self._fit_start(state, logger)
        elif event == Event.BATCH_START:
            self._batch_start(state, logger)

    def _init(self, state: State, logger: Logger) -> None:
        if self.controller is not None:
            raise ValueError('this ProRes instance was already applied to a model; create a new ProRes() per Trainer')
        # W stays unresolved (every α = 0) until max_duration is known when t_warmup is a 'dur' fraction.
        self.controller = self.spec.apply(state.model, None)
        if self._try_resolve_warmup(state):
            self.controller.set_step(self._now(state))
        log.info(
            'ProRes: %d layers, schedule %s, t_warmup %s',
            self.controller.num_layers,
            self.schedule,
            'auto' if self.auto else self.t_warmup or f'{default_warmup(self.controller.num_layers):g}ba (default)',
        )
        logger.log_hyperparameters({f'prores/{k}': v for k, v in self.config.items()})

    def _fit_start(self, state: State, logger: Logger) -> None:
        assert self.controller is not None
        moved = self.controller.refresh()
        if moved:
            log.info('ProRes: re-attached %d branch hooks after another algorithm replaced modules', moved)
        if self.auto:
            self._resolve_auto(state)
        elif not self._try_resolve_warmup(state):
            raise ValueError(
                'ProRes t_warmup is a fraction of max_duration ("dur"), but the Trainer has no '
                'max_duration: set max_duration or give t_warmup in batches/tokens'
            )
        self._warn_if_longer_than_run(state)
        if self._unit == TimeUnit.BATCH:  # batches are optimizer steps: W / L is comparable to the paper's T
            logger.log_hyperparameters({WARMUP_STEPS_METRIC: float(self.controller.warmup_steps)})
            fresh = int(state.timestamp.batch) == 0 and not self.controller.removed
            if self.init_measure is None and self.measure_init and fresh:
                self._measure_pending = True  # the advice waits for the first batch to measure on
            else:  # a resumed run repeats the advice its first run measured
                self.controller.init_measure = self.init_measure
                self.spec.warn_if_short(self.controller, self.init_measure)
        delay_lr_warmup(state, self.lr_warmup_delay)
        if not self.controller.removed:
            # a model cast after INIT (`model.to(torch.bfloat16)`) casts α too: keep it fp32 and exact
            self.controller.ensure_fp32()
            self.controller.set_step(self._now(state))

    def _batch_start(self, state: State, logger: Logger) -> None:
        assert self.controller is not None
        alphas = self.controller.set_step(self._now(state))
        batch = int(state.timestamp.batch)
        if batch % self.log_interval == 0:
            logger.log_metrics(alpha_metrics(alphas))
        if self._measure_pending:
            self._measure_pending = False
            self._measure(state, logger)

    def _measure(self, state: State, logger: Logger) -> None:
        """Measure the model on the first samples of the first batch and give the advice for its regime."""
        assert self.controller is not None
        model = state.model
        if isinstance(model, DistributedDataParallel):  # replicated weights: no collective needed
            model = model.module
        with get_precision_context(state.precision, state.precision_config):  # a Composer batch is one argument
            head = head_of_batch(state.batch, MEASURE_SAMPLES)
            measure = advise_warmup(self.controller, model, (head,), every_rank=True)
        self.init_measure = measure
        if measure is not None:
            logger.log_hyperparameters(measure.metrics())
            log.info('ProRes: branches start at %.3g of the residual stream (%s)', measure.ratio, measure.regime)

    # --- time ----------------------------------------------------------------------------------------
    def _now(self, state: State) -> float:
        return float(state.timestamp.get(self._unit).value)

    def _run_batches(self, state: State) -> float | None:
        """max_duration in batches (optimizer steps), converted as a 'dur' fraction is; None if unknown."""
        max_duration = state.max_duration
        if max_duration is None:
            return None
        if max_duration.unit == TimeUnit.BATCH:
            return float(max_duration.value)
        if max_duration.unit == TimeUnit.EPOCH:
            return None if state.dataloader_len is None else float(max_duration.value * int(state.dataloader_len))
        raise ValueError(
            f"ProRes t_warmup='auto' needs max_duration in batches or epochs (optimizer steps), got "
            f'{max_duration}: give t_warmup in {max_duration.unit.value} or as a fraction ("0.2dur")'
        )

    def _resolve_auto(self, state: State) -> None:
        """t_warmup='auto': W = min(1000·L, 0.25·run) batches, resolved once; a checkpoint's W wins."""
        assert self.controller is not None
        total = self._run_batches(state)
        if self._auto_w is None:
            if total is None:
                raise ValueError(
                    "ProRes t_warmup='auto' needs the run length: set the Trainer's max_duration (batches or "
                    'epochs with a sized dataloader), or give t_warmup in batches'
                )
            self._auto_w = float(auto_warmup_steps(self.controller.num_layers, total))
        self._unit = TimeUnit.BATCH
        self.controller.warmup_steps = self._auto_w
        self.controller.auto_run_steps = total

    def _try_resolve_warmup(self, state: State) -> bool:
        """Turn `t_warmup` into (W, unit). A 'dur' fraction needs max_duration (known by FIT_START);
        'auto' waits for FIT_START (or keeps the W it already has)."""
        assert self.controller is not None
        if self.auto:
            if self._auto_w is None:
                return False
            self._unit = TimeUnit.BATCH
            self.controller.warmup_steps = self._auto_w
            return True
        tw = (
            self.t_warmup
            if self.t_warmup is not None
            else Time(int(default_warmup(self.controller.num_layers)), TimeUnit.BATCH)
        )
        value, unit = float(tw.value), tw.unit
        if unit == TimeUnit.DURATION:
            max_duration = state.max_duration
            if max_duration is None:
                return False
            if max_duration.unit == TimeUnit.EPOCH:
                if state.dataloader_len is None:
                    return False
                value, unit = value * max_duration.value * int(state.dataloader_len), TimeUnit.BATCH
            elif max_duration.unit in _UNIT_FIELD:
                value, unit = value * max_duration.value, max_duration.unit
            else:
                raise ValueError(f't_warmup={self.t_warmup} cannot be resolved against max_duration={max_duration}')
        self._unit = unit
        self.controller.warmup_steps = value
        return True

    def _warn_if_longer_than_run(self, state: State) -> None:
        max_duration = state.max_duration
        if max_duration is None or self.controller is None:
            return
        total = None
        if max_duration.unit == self._unit:
            total = max_duration.value
        elif max_duration.unit == TimeUnit.EPOCH and self._unit == TimeUnit.BATCH and state.dataloader_len is not None:
            total = max_duration.value * int(state.dataloader_len)
        if not self._warned_long:
            self._warned_long = self.spec.warn_if_longer_than_run(
                self.controller, total, self._unit.value, 'max_duration'
            )

    # --- checkpoints: the configuration travels with the run ------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        clock: dict[str, Any] = {
            't_warmup': 'auto' if self.auto else None if self.t_warmup is None else str(self.t_warmup),
            'lr_warmup_delay': str(self.lr_warmup_delay),
        }
        if self.auto and self._auto_w is not None:
            clock['warmup_steps'] = self._auto_w  # what a resume keeps, whatever its max_duration
        return self.spec.record(None if self.controller is None else self.controller.num_layers, **clock)

    def state_dict(self) -> dict[str, Any]:
        state = {**super().state_dict(), 'config': self.config}
        if self.init_measure is not None:  # measured once, on the fresh run's first batch
            state['init_measure'] = dataclasses.asdict(self.init_measure)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get('init_measure') is not None:
            self.init_measure = InitMeasure(**state['init_measure'])
        saved = state.get('config')
        if saved is None:
            return
        saved = dict(saved)
        recorded = saved.pop('warmup_steps', None)
        current = self.config
        current.pop('warmup_steps', None)
        check_resume(
            saved,
            current,
            'this checkpoint',
            'Resume with the same ProRes settings, or start a new run (load weights only with load_weights_only=True).',
        )
        if self.auto and recorded is not None:
            self._auto_w = float(recorded)  # W does not move under a running model
            if self.controller is not None:
                self.controller.warmup_steps = self._auto_w

    def __repr__(self) -> str:
        t = 'auto' if self.auto else None if self.t_warmup is None else str(self.t_warmup)
        return f'ProRes(schedule={self.schedule!r}, t_warmup={t!r}, lr_warmup_delay={str(self.lr_warmup_delay)!r})'


# --- the residual monitor ------------------------------------------------------------------------------
class ResidualMonitor(MonitorBase, Callback):
    """Composer callback: per-layer residual RMS, gradient norm and update ratio, plus spike counters.

    Args:
        log_interval: measure every this many batches (optimizer steps): int or 'Nba' (default '10ba').
        rms, grad_norm, update_ratio: which per-layer quantities to measure.
        spike_window, spike_std: the spike rule (previous `spike_window` values, `spike_std` std);
            spike_window=0 turns the counters off.
        layer_class, branches, layer_pattern: for models `find_residual_layers` does not know.
        position_cosine: log `residual_monitor/position_cosine/layer_{i}` (see `position_cosine`) on measured steps.
        collapse_threshold, collapse_patience: a collapse is `collapse_patience` consecutive measured steps
            whose largest per-layer position cosine is >= `collapse_threshold`: logged as
            `residual_monitor/collapse` = 1 and warned about once. Small Post-LN
            models pass through a short high-cosine phase early in training even without ProRes (8
            measurements at interval 10 for a 16-layer, width-32 baseline), hence the patience.
        stop_on_collapse: also stop training when the collapse is reported.
    """

    def _init_loop_state(self) -> None:
        self._grad_sq: torch.Tensor | None = None  # per layer, from the last backward of the batch
        self._total_grad_sq: torch.Tensor | None = None
        self._pending_grad: list[torch.Tensor] = []  # global grad norms awaiting the spike counter

    def fit_start(self, state, logger) -> None:
        if self.stats is None:
            self.stats = self._find(state.model, sharded=None if not getattr(state, 'fsdp_enabled', False) else True)

    def batch_start(self, state, logger) -> None:
        if self.stats is None:
            self.fit_start(state, logger)
        self._grad_sq = self._total_grad_sq = None
        if int(state.timestamp.batch) % self.log_interval == 0:
            self._measured_step = int(state.timestamp.batch)  # BATCH_END sees the timestamp already advanced
            self._begin_measure()

    def before_forward(self, state, logger) -> None:
        self.stats.recording = self.measuring

    def after_forward(self, state, logger) -> None:
        self.stats.recording = False

    def after_backward(self, state, logger) -> None:
        need_layers = self.measuring and self.track_grad_norm
        need_total = self.spikes and self.track_grad_norm
        if not (need_layers or need_total):
            return
        per_layer = self.stats.grad_norms_sq() if need_layers else None
        scaler = getattr(state, 'scaler', None)
        scale = None
        if scaler is not None and getattr(scaler, 'is_enabled', lambda: False)():
            scale = scaler.get_scale()  # AFTER_BACKWARD grads are still multiplied by the loss scale
        if per_layer is not None:
            self._grad_sq = per_layer / (scale * scale) if scale else per_layer
        if need_total:
            grads = [local_tensor(p.grad)[0] for p in state.model.parameters() if p.grad is not None]
            if grads:
                total = sum_squares(grads)
                self._total_grad_sq = total / (scale * scale) if scale else total

    def batch_end(self, state, logger) -> None:
        metrics: dict[str, float] = {}
        if self.spikes:
            loss = (getattr(state, 'total_loss_dict', None) or {}).get('loss/train/total')
            if loss is not None:
                self.loss_spikes.push(float(loss))
            if self._total_grad_sq is not None:
                self._pending_grad.append(self.stats.reduce_sharded(self._total_grad_sq.reshape(1)))
        if self.measuring:
            self.measuring = False
            self.stats.recording = False
            layer_metrics, collapsed = self._layer_metrics(self._measured_step)
            metrics.update(layer_metrics)
            if collapsed and self.stop_on_collapse:
                state.stop_training()
            if self._grad_sq is not None:
                metrics.update(per_layer_metrics('grad_norm', self.stats.reduce_sharded(self._grad_sq).sqrt().tolist()))
            if self.track_update_ratio:
                metrics.update(per_layer_metrics('update_ratio', self.stats.update_ratios()))
            if self.spikes:  # one sync per interval for the deferred grad norms
                if self._pending_grad:
                    for g in (
                        torch.cat([g.to(self._pending_grad[0].device) for g in self._pending_grad]).sqrt().tolist()
                    ):
                        self.grad_spikes.push(g)
                    self._pending_grad = []
                metrics.update(self.spike_metrics())
        if metrics:
            logger.log_metrics(metrics)

    def fit_end(self, state, logger) -> None:
        if self.stats is not None:
            self.stats.stop_rms()
        if self._pending_grad:
            for g in torch.cat(self._pending_grad).sqrt().tolist():
                self.grad_spikes.push(g)
            self._pending_grad = []
