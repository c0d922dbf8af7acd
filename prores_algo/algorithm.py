"""Composer algorithm `ProRes` (YAML name `prores`): a thin event layer over `apply_prores`.

Events:
  INIT        surgery: hook every layer's residual branches (α at t = 0).
  FIT_START   re-attach to branch modules other INIT-time algorithms replaced; resolve `t_warmup`
              (a `dur` fraction needs `max_duration`); warn if W > max_duration or if W / L is below the
              steps per layer where ProRes helps; delay the LR warmup.
  BATCH_START α ← schedule(state.timestamp): stateless, so a resumed run is exact; log α; once every
              α is 1 for good, the hooks are removed (zero overhead after warmup).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Optional, Sequence, Union

from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.loggers import Logger

from prores_algo import schedules
from prores_algo.lr_schedules import delay_lr_warmup, parse_time
from prores_algo.surgery import ProResController, find_residual_layers, warn_if_short_warmup

__all__ = ['ProRes']

log = logging.getLogger(__name__)

_UNIT_FIELD = {TimeUnit.BATCH: 'batch', TimeUnit.TOKEN: 'token', TimeUnit.SAMPLE: 'sample'}


class ProRes(Algorithm):
    """Progressive Residual Warmup (arXiv 2603.05369): `x_{l+1} = x_l + α(l, t)·F(x_l)`, α warming 0 → 1.

    Args:
        schedule: α schedule, one of `prores_algo.schedules.names()` (default 'linear', the paper's).
        t_warmup: W, when every α reaches 1: a Time string ('24000ba', '0.2dur', '5e8tok') or an int
            (batches). Default: the paper's 1000 batches per layer (W = 1000·L ba).
        lr_warmup_delay: start the LR scheduler's warmup this much later (default '0ba', the paper's).
            With a warmup from 0, no parameter moves during the delay.
        log_interval: log `prores/alpha/layer_{i}` every this many batches (int or 'Nba'); default 1.
        layer_class, branches, layer_pattern: for models ProRes does not know (see `apply_prores`).
        remove_when_done: remove the hooks once every α is 1 for good (default True).
    """

    def __init__(self,
                 schedule: str = 'linear',
                 t_warmup: Union[str, int, Time, None] = None,
                 lr_warmup_delay: Union[str, int, Time] = '0ba',
                 log_interval: Union[str, int] = 1,
                 layer_class: Optional[str] = None,
                 branches: Optional[Sequence[str]] = None,
                 layer_pattern: Optional[str] = None,
                 remove_when_done: bool = True):
        self.schedule = schedules.canonical_name(schedule)
        self.t_warmup = None if t_warmup is None else parse_time(t_warmup, 't_warmup')
        if self.t_warmup is not None:
            if self.t_warmup.unit not in (*_UNIT_FIELD, TimeUnit.DURATION):
                raise ValueError(f't_warmup={t_warmup!r}: use batches ("24000ba"), tokens ("5e8tok"), samples ("1e6sp") '
                                 f'or a fraction of max_duration ("0.2dur"), not {self.t_warmup.unit.value}')
            if not self.t_warmup.value > 0:
                raise ValueError(f't_warmup must be positive, e.g. "24000ba" or "0.1dur", got {t_warmup!r}')
            if self.t_warmup.unit == TimeUnit.DURATION and self.t_warmup.value > 1:
                raise ValueError(f't_warmup={t_warmup!r} is more than the whole run: use a fraction in (0, 1]')
        self.lr_warmup_delay = parse_time(lr_warmup_delay, 'lr_warmup_delay')
        if self.lr_warmup_delay.value < 0:
            raise ValueError(f'lr_warmup_delay must be >= 0, e.g. "0ba" (the default: no delay) or "500ba", '
                             f'got {lr_warmup_delay!r}')
        interval = parse_time(log_interval, 'log_interval')
        if interval.unit != TimeUnit.BATCH or interval.value < 1:
            raise ValueError(f'log_interval must be a positive number of batches (e.g. 1 or "100ba"), got {log_interval!r}')
        self.log_interval = int(interval.value)
        if branches is not None and (isinstance(branches, str) or not list(branches)):
            raise ValueError(f"branches must be a list of module names like ['attn.o_proj', 'mlp.down_proj'], "
                             f'got {branches!r}')
        self.layer_class = layer_class
        self.branches = None if branches is None else tuple(branches)
        self.layer_pattern = layer_pattern
        if not isinstance(remove_when_done, bool):
            raise ValueError(f'remove_when_done must be true or false, got {remove_when_done!r}')
        self.remove_when_done = remove_when_done
        self.controller: Optional[ProResController] = None
        self._unit: Optional[TimeUnit] = None
        self._warned = False

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
        layers = find_residual_layers(state.model, self.layer_class, self.branches, self.layer_pattern)
        # W stays unresolved (every α = 0) until max_duration is known when t_warmup is a 'dur' fraction.
        self.controller = ProResController(layers, self.schedule, None, self.remove_when_done)
        self.controller.model = state.model
        if self._try_resolve_warmup(state):
            self.controller.set_step(self._now(state))
        log.info('ProRes: %d layers, schedule %s, t_warmup %s', self.controller.num_layers, self.schedule,
                 self.t_warmup or f'{1000 * self.controller.num_layers}ba (default)')
        logger.log_hyperparameters({f'prores/{k}': v for k, v in self.config.items()})

    def _fit_start(self, state: State, logger: Logger) -> None:
        assert self.controller is not None
        moved = self.controller.refresh()
        if moved:
            log.info('ProRes: re-attached %d branch hooks after another algorithm replaced modules', moved)
        if not self._try_resolve_warmup(state):
            raise ValueError('ProRes t_warmup is a fraction of max_duration ("dur"), but the Trainer has no '
                             'max_duration: set max_duration or give t_warmup in batches/tokens')
        self._warn_if_longer_than_run(state)
        if self._unit == TimeUnit.BATCH:  # batches are optimizer steps: W / L is comparable to the paper's T
            warn_if_short_warmup(self.controller)
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
            metrics = {f'prores/alpha/layer_{i}': a for i, a in enumerate(alphas)}
            metrics['prores/alpha/mean'] = sum(alphas) / len(alphas)
            logger.log_metrics(metrics)

    # --- time ----------------------------------------------------------------------------------------
    def _now(self, state: State) -> float:
        return float(state.timestamp.get(self._unit).value)

    def _try_resolve_warmup(self, state: State) -> bool:
        """Turn `t_warmup` into (W, unit). A 'dur' fraction needs max_duration (known by FIT_START)."""
        assert self.controller is not None
        tw = self.t_warmup if self.t_warmup is not None else Time(schedules.PAPER_STEPS_PER_LAYER * self.controller.num_layers, TimeUnit.BATCH)
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
        if self._warned or max_duration is None or self.controller is None:
            return
        total = None
        if max_duration.unit == self._unit:
            total = max_duration.value
        elif max_duration.unit == TimeUnit.EPOCH and self._unit == TimeUnit.BATCH and state.dataloader_len is not None:
            total = max_duration.value * int(state.dataloader_len)
        if total is not None and self.controller.warmup_steps > total:
            self._warned = True
            warnings.warn(f'ProRes t_warmup ({self.controller.warmup_steps:g} {self._unit.value}) exceeds max_duration '
                          f'({max_duration}): the deepest layers never reach α = 1 in this run. Use a shorter t_warmup, '
                          f'e.g. "0.1dur" (the paper used 12-32% of training).')

    # --- checkpoints: the configuration travels with the run ------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        return {
            'schedule': self.schedule,
            't_warmup': None if self.t_warmup is None else str(self.t_warmup),
            'lr_warmup_delay': str(self.lr_warmup_delay),
            'num_layers': None if self.controller is None else self.controller.num_layers,
            'layer_class': self.layer_class,
            'branches': None if self.branches is None else list(self.branches),
            'layer_pattern': self.layer_pattern,
        }

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), 'config': self.config}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get('config')
        if saved is None:
            return
        ours = self.config
        diff = {k: (saved.get(k), v) for k, v in ours.items() if saved.get(k) != v}
        if diff:
            lines = ', '.join(f'{k}: checkpoint {a!r} vs now {b!r}' for k, (a, b) in diff.items())
            raise ValueError(f'ProRes configuration differs from the checkpoint being resumed ({lines}). Resume with '
                             'the same ProRes settings, or start a new run (load weights only with '
                             'load_weights_only=True).')

    def __repr__(self) -> str:
        t = None if self.t_warmup is None else str(self.t_warmup)
        return f'ProRes(schedule={self.schedule!r}, t_warmup={t!r}, lr_warmup_delay={str(self.lr_warmup_delay)!r})'
