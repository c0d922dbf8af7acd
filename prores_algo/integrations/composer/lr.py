"""ProRes' LR pieces as Composer schedulers: the paper's warmup-stable-decay (`WSDScheduler`), the
schedules of `prores_algo.lr_schedules.LR_SCHEDULES` built as Composer objects (`composer_scheduler`),
and the LR-warmup delay applied to a Trainer's compiled schedulers (`delay_lr_warmup`).

The curves themselves are written once, in `prores_algo.lr_schedules`; `tests/test_lr_schedules.py`
checks that each name gives the same multiplier at every step here and there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from composer import optim
from composer.core import TimeUnit
from composer.optim.scheduler import _convert_time
from torch.optim.lr_scheduler import LambdaLR

from prores_algo.integrations.composer.time import parse_time
from prores_algo.lr_schedules import LR_SCHEDULES, delayed_time, lr_schedule_params, wsd_multiplier
from prores_algo.warn import warn_user

__all__ = ['WSDScheduler', 'composer_scheduler', 'delay_lr_warmup']


class WSDScheduler:
    """Composer scheduler for warmup-stable-decay (Composer's `ComposerScheduler` is a Protocol: any
    callable `(state, ssr) -> float` is one).

    Args:
        lr_warmup: LR warmup length (Time string), default '0.02dur'; the paper: '2000ba'.
        lr_decay: length of the final linear decay, default '0.1dur' (the paper: last 10%).
        alpha_f: final multiplier, default 0.
    """

    def __init__(
        self,
        lr_warmup: str | int = '0.02dur',
        lr_decay: str | int = '0.1dur',
        alpha_f: float = 0.0,
        *,
        t_warmup: str | int | None = None,
        t_decay: str | int | None = None,
    ):
        if t_warmup is not None or t_decay is not None:  # the names of earlier releases
            warn_user(
                'WSDScheduler(t_warmup=, t_decay=) are deprecated: use lr_warmup= and lr_decay=', DeprecationWarning
            )
            lr_warmup = lr_warmup if t_warmup is None else t_warmup
            lr_decay = lr_decay if t_decay is None else t_decay
        self.lr_warmup = parse_time(lr_warmup, 'lr_warmup')
        self.lr_decay = parse_time(lr_decay, 'lr_decay')
        if isinstance(alpha_f, bool) or not isinstance(alpha_f, (int, float)) or not math.isfinite(alpha_f):
            raise ValueError(
                f'alpha_f (the final LR multiplier) must be a finite number, e.g. 0.0 or 0.1, got {alpha_f!r}'
            )
        self.alpha_f = float(alpha_f)

    def __call__(self, state, ssr: float = 1.0) -> float:
        max_time = _convert_time('1dur', state, ssr)
        warmup = _convert_time(self.lr_warmup, state)
        decay = _convert_time(self.lr_decay, state, ssr)
        if not (warmup.unit == decay.unit == max_time.unit):
            raise ValueError(
                f'WSDScheduler: lr_warmup ({self.lr_warmup}), lr_decay ({self.lr_decay}) and max_duration '
                f'({state.max_duration}) must resolve to one unit; use "dur" fractions or one unit'
            )
        step = state.timestamp.get(max_time.unit).value
        return wsd_multiplier(step, max_time.value, warmup.value, decay.value, self.alpha_f)

    def __repr__(self) -> str:
        return f'WSDScheduler(lr_warmup={self.lr_warmup}, lr_decay={self.lr_decay}, alpha_f={self.alpha_f})'


def composer_scheduler(name: str, kwargs: Mapping[str, Any] | None = None, field: str = 'scheduler'):
    """The Composer scheduler of `LR_SCHEDULES[name]` with the YAML's parameters (`lr_warmup` is handed to
    Composer's classes as their `t_warmup`); a ValueError naming the key for anything else."""
    canonical, params = lr_schedule_params(name, kwargs, field)
    cls_name = LR_SCHEDULES[canonical].composer
    if cls_name == 'WSDScheduler':
        return WSDScheduler(**params)
    if 'lr_warmup' in params:
        params['t_warmup'] = parse_time(params.pop('lr_warmup'), f'{field}.lr_warmup')
    return getattr(optim, cls_name)(**params)


def _warmup_of(scheduler) -> Any:
    """A scheduler's LR warmup: Composer's warmup schedulers call it `t_warmup`, ours `lr_warmup`."""
    return getattr(scheduler, 't_warmup', None) or getattr(scheduler, 'lr_warmup', None)


def _composer_scheduler_of(lr_lambda: Callable):
    """The ComposerScheduler a compiled LambdaLR closure wraps (composer.optim.compile_composer_scheduler)."""
    code = getattr(lr_lambda, '__code__', None)
    cells = getattr(lr_lambda, '__closure__', None)
    if code is None or cells is None:
        return None
    free = dict(zip(code.co_freevars, cells, strict=True))
    cell = free.get('scheduler')
    return cell.cell_contents if cell is not None else None


_DELAYED_MARK = '_prores_lr_delay'


def delay_lr_warmup(state, delay) -> int:
    """Delay the warmup of every scheduler in `state.schedulers` by `delay` (Time). Returns how many.

    Called at Event.FIT_START (Composer compiles schedulers into LambdaLR after Event.INIT). The
    replacement is a plain closure, not a callable object: `LambdaLR.state_dict()` pickles callable
    objects' `__dict__`, which would drag the whole `State` into checkpoints. It is stateless (a
    function of `state.timestamp`), so resume is exact: the next FIT_START wraps again.
    """
    delay = parse_time(delay, 'lr_warmup_delay')
    if delay.value < 0:
        raise ValueError(f'lr_warmup_delay must be >= 0, got {delay}')
    if delay.value == 0:
        return 0
    if not state.schedulers:
        raise ValueError(
            'lr_warmup_delay is set but the Trainer has no LR scheduler: pass a Composer scheduler with '
            'a warmup (e.g. LinearWithWarmupScheduler, CosineAnnealingWithWarmupScheduler or '
            'prores_algo.WSDScheduler), or set lr_warmup_delay to "0ba"'
        )
    count = 0
    for lr_scheduler in state.schedulers:
        if not isinstance(lr_scheduler, LambdaLR):
            raise ValueError(
                f'lr_warmup_delay cannot shift {type(lr_scheduler).__name__}: only Composer schedulers '
                'with a `t_warmup` can be delayed; set lr_warmup_delay to "0ba" or use a Composer scheduler'
            )
        for i, fn in enumerate(lr_scheduler.lr_lambdas):
            if getattr(fn, _DELAYED_MARK, False):
                continue  # a second fit() call: already delayed
            scheduler = _composer_scheduler_of(fn)
            if scheduler is None or _warmup_of(scheduler) is None:
                name = type(scheduler).__name__ if scheduler is not None else 'this scheduler'
                raise ValueError(
                    f'lr_warmup_delay cannot shift {name}: it has no warmup (`t_warmup`). Use a Composer '
                    'scheduler with a warmup or set lr_warmup_delay to "0ba"'
                )
            lr_scheduler.lr_lambdas[i] = _make_delayed(fn, scheduler, state, delay)
            count += 1
    # The optimizer's LR was set from the undelayed lambda when the scheduler was built: recompute it.
    for lr_scheduler in state.schedulers:
        for group, base_lr, fn in zip(
            lr_scheduler.optimizer.param_groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas, strict=False
        ):
            group['lr'] = base_lr * fn(lr_scheduler.last_epoch)
    return count


def _make_delayed(fn, scheduler, state, delay):
    field_of = {TimeUnit.BATCH: 'batch', TimeUnit.TOKEN: 'token', TimeUnit.SAMPLE: 'sample'}

    def delayed_lr_lambda(epoch):
        max_time = _convert_time('1dur', state)
        d = _convert_time(delay, state)
        warmup = _convert_time(_warmup_of(scheduler), state)
        unit = max_time.unit
        if unit not in field_of or d.unit != unit or warmup.unit != unit:
            raise ValueError(
                f'lr_warmup_delay ({delay}), the scheduler warmup ({_warmup_of(scheduler)}) and max_duration '
                f'({state.max_duration}) must resolve to one unit of batches, tokens or samples'
            )
        if d.value + warmup.value >= max_time.value:
            raise ValueError(
                f'lr_warmup_delay ({d}) + LR warmup ({warmup}) must be shorter than max_duration ({max_time})'
            )
        real = state.timestamp
        t = real.get(unit).value
        tau = delayed_time(t, d.value, warmup.value, max_time.value)
        if tau == t:
            return fn(epoch)
        state.timestamp = real.copy(**{field_of[unit]: int(round(tau))})
        try:
            return fn(epoch)
        finally:
            state.timestamp = real

    setattr(delayed_lr_lambda, _DELAYED_MARK, True)
    return delayed_lr_lambda
