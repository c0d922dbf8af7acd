"""Learning-rate schedule pieces ProRes needs: the paper's WSD schedule and the LR-warmup delay.

* `wsd_multiplier(step, ...)` — warmup-stable-decay as a plain function of the step (for DeepSpeed or
  any loop without a Composer `State`); `WSDScheduler` — the same as a Composer scheduler.
* `delay_lr_warmup(state, delay)` — makes every compiled Composer scheduler start its warmup `delay`
  later (docs/paper.md, "Learning-rate warmup"): for t < D the multiplier holds its t = 0 value, the warmup then runs its full
  length from D, and the post-warmup part is compressed so the schedule still ends at `max_duration`.
  With Composer's warmup schedulers the t = 0 multiplier is 0: during the delay no parameter moves.
* `lr_lambda_from(schedule, max_steps=..., ...)` — the YAML's LR schedules (wsd, linear, cosine,
  constant; with the delay) as a plain function of the optimizer step, for a torch `LambdaLR` in loops
  without Composer (DeepSpeed, plain PyTorch); `build_lr_scheduler` / `lr_scheduler_factory` wrap it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable, Union

import torch

from prores_algo.timing import parse_time, whole_steps

__all__ = [
    'wsd_multiplier',
    'WSDScheduler',
    'delay_lr_warmup',
    'delayed_time',
    'LR_SCHEDULES',
    'lr_lambda_from',
    'build_lr_scheduler',
    'lr_scheduler_factory',
]


def wsd_multiplier(
    step: float, max_steps: float, warmup_steps: float, decay_steps: float, alpha_f: float = 0.0
) -> float:
    """Warmup-stable-decay: linear 0 → 1 over `warmup_steps`, 1, then linear 1 → `alpha_f` over the last
    `decay_steps` of `max_steps` (the paper: 2000 warmup steps, decay over the last 10%)."""
    if max_steps <= 0 or warmup_steps < 0 or decay_steps < 0 or warmup_steps + decay_steps > max_steps:
        raise ValueError(
            f'WSD needs 0 <= warmup ({warmup_steps}) and 0 <= decay ({decay_steps}) with '
            f'warmup + decay <= max_steps ({max_steps})'
        )
    if step < warmup_steps:
        return step / warmup_steps
    decay_start = max_steps - decay_steps
    if step < decay_start or decay_steps == 0:
        return 1.0
    frac = min(1.0, (step - decay_start) / decay_steps)
    return 1.0 + (alpha_f - 1.0) * frac


def delayed_time(t: float, delay: float, warmup: float, max_time: float) -> float:
    """The time at which the undelayed schedule is evaluated for real time `t` (all in one unit).

    [0, D) → 0;  [D, D+Wlr) → t − D (full-length warmup);  [D+Wlr, M] → linearly compressed onto [Wlr, M].
    """
    if t < delay:
        return 0.0
    if t < delay + warmup:
        return t - delay
    rest_real = max_time - delay - warmup
    return warmup + (t - delay - warmup) * (max_time - warmup) / rest_real


class WSDScheduler:
    """Composer scheduler for warmup-stable-decay (Composer's `ComposerScheduler` is a Protocol: any
    callable `(state, ssr) -> float` is one, so this module need not import Composer).

    Args:
        t_warmup: warmup length (Time string), e.g. '2000ba'.
        t_decay: length of the final linear decay, default '0.1dur' (the paper: last 10%).
        alpha_f: final multiplier, default 0.
    """

    def __init__(
        self, t_warmup: Union[str, int] = '0.02dur', t_decay: Union[str, int] = '0.1dur', alpha_f: float = 0.0
    ):
        self.t_warmup = parse_time(t_warmup, 't_warmup')
        self.t_decay = parse_time(t_decay, 't_decay')
        if isinstance(alpha_f, bool) or not isinstance(alpha_f, (int, float)) or not math.isfinite(alpha_f):
            raise ValueError(
                f'alpha_f (the final LR multiplier) must be a finite number, e.g. 0.0 or 0.1, got {alpha_f!r}'
            )
        self.alpha_f = float(alpha_f)

    def __call__(self, state, ssr: float = 1.0) -> float:
        from composer.optim.scheduler import _convert_time

        max_time = _convert_time('1dur', state, ssr)
        warmup = _convert_time(self.t_warmup, state)
        decay = _convert_time(self.t_decay, state, ssr)
        if not (warmup.unit == decay.unit == max_time.unit):
            raise ValueError(
                f'WSDScheduler: t_warmup ({self.t_warmup}), t_decay ({self.t_decay}) and max_duration '
                f'({state.max_duration}) must resolve to one unit; use "dur" fractions or one unit'
            )
        step = state.timestamp.get(max_time.unit).value
        return wsd_multiplier(step, max_time.value, warmup.value, decay.value, self.alpha_f)

    def __repr__(self) -> str:
        return f'WSDScheduler(t_warmup={self.t_warmup}, t_decay={self.t_decay}, alpha_f={self.alpha_f})'


def _composer_scheduler_of(lr_lambda: Callable):
    """The ComposerScheduler a compiled LambdaLR closure wraps (composer.optim.compile_composer_scheduler)."""
    code = getattr(lr_lambda, '__code__', None)
    cells = getattr(lr_lambda, '__closure__', None)
    if code is None or cells is None:
        return None
    free = dict(zip(code.co_freevars, cells))
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
    from composer.core import TimeUnit
    from composer.optim.scheduler import _convert_time
    from torch.optim.lr_scheduler import LambdaLR

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
            if scheduler is None or not hasattr(scheduler, 't_warmup'):
                name = type(scheduler).__name__ if scheduler is not None else 'this scheduler'
                raise ValueError(
                    f'lr_warmup_delay cannot shift {name}: it has no warmup (`t_warmup`). Use a Composer '
                    'scheduler with a warmup or set lr_warmup_delay to "0ba"'
                )
            lr_scheduler.lr_lambdas[i] = _make_delayed(fn, scheduler, state, delay, _convert_time, TimeUnit)
            count += 1
    # The optimizer's LR was set from the undelayed lambda when the scheduler was built: recompute it.
    for lr_scheduler in state.schedulers:
        for group, base_lr, fn in zip(
            lr_scheduler.optimizer.param_groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas
        ):
            group['lr'] = base_lr * fn(lr_scheduler.last_epoch)
    return count


def _make_delayed(fn, scheduler, state, delay, _convert_time, TimeUnit):
    field_of = {TimeUnit.BATCH: 'batch', TimeUnit.TOKEN: 'token', TimeUnit.SAMPLE: 'sample'}

    def delayed_lr_lambda(epoch):
        max_time = _convert_time('1dur', state)
        d = _convert_time(delay, state)
        warmup = _convert_time(scheduler.t_warmup, state)
        unit = max_time.unit
        if unit not in field_of or d.unit != unit or warmup.unit != unit:
            raise ValueError(
                f'lr_warmup_delay ({delay}), the scheduler warmup ({scheduler.t_warmup}) and max_duration '
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


# ---------------------------------------------------------------------------------------------------
# LR schedules as plain functions of the step
# ---------------------------------------------------------------------------------------------------
# YAML names (Composer's registry names are accepted too) -> canonical
LR_SCHEDULES = {
    'wsd': 'wsd',
    'warmup_stable_decay': 'wsd',
    'linear': 'linear',
    'linear_decay_with_warmup': 'linear',
    'cosine': 'cosine',
    'cosine_decay_with_warmup': 'cosine',
    'constant': 'constant',
    'constant_with_warmup': 'constant',
}


def lr_lambda_from(
    schedule: Union[str, Mapping] = 'wsd',
    *,
    max_steps: int,
    t_warmup: Any = '0.02dur',
    t_decay: Any = '0.1dur',
    alpha_f: float = 0.0,
    lr_warmup_delay: Any = 0,
) -> Callable[[int], float]:
    """The LR multiplier of a YAML-style schedule as a plain function `f(step) -> float`.

    `schedule` is a name or a YAML mapping `{name: ..., t_warmup: ..., t_decay: ..., alpha_f: ...}`
    (keys of the mapping win over the keyword arguments). Names:
      wsd        linear warmup 0 → 1 over t_warmup, 1, linear decay to alpha_f over the last t_decay
      linear     warmup, then linear 1 → alpha_f until max_steps   (Composer linear_decay_with_warmup)
      cosine     warmup, then cosine 1 → alpha_f until max_steps   (Composer cosine_decay_with_warmup)
      constant   warmup, then 1                                     (Composer constant_with_warmup)
    Times are ints (steps), "Nba" or "Xdur". `lr_warmup_delay` D > 0 holds the t = 0 multiplier (0)
    for t < D, runs the full warmup from D, and compresses the rest so the schedule still ends at
    `max_steps` (`prores_algo.lr_schedules.delayed_time`).

    Returned as a plain function (not a callable object) so `LambdaLR.state_dict()` does not store it:
    a resumed run recomputes the multiplier from the restored step with this run's schedule.
    With DeepSpeed the scheduler is stepped once per optimizer step, after the update, so optimizer
    step t (0-based, = engine.global_steps during its forward) uses `f(t)`.
    """
    if isinstance(schedule, Mapping):
        spec = dict(schedule)
        name = spec.pop('name', None)
        known = {'t_warmup', 't_decay', 'alpha_f', 'lr_warmup_delay', 't_max', 'alpha_i'}
        unknown = set(spec) - known
        if unknown:
            raise ValueError(f'unknown LR schedule key(s) {sorted(unknown)}; known: {sorted(known | {"name"})}')
        if spec.get('t_max', '1dur') not in ('1dur', 1.0):
            raise ValueError(f"LR schedule t_max={spec['t_max']!r}: only '1dur' (the whole run) is supported")
        if spec.get('alpha_i', 1.0) != 1.0:
            raise ValueError(f'LR schedule alpha_i={spec["alpha_i"]!r}: only 1.0 is supported')
        t_warmup = spec.get('t_warmup', t_warmup)
        t_decay = spec.get('t_decay', t_decay)
        alpha_f = spec.get('alpha_f', alpha_f)
        lr_warmup_delay = spec.get('lr_warmup_delay', lr_warmup_delay)
    else:
        name = schedule
    if not isinstance(name, str) or name.lower() not in LR_SCHEDULES:
        raise ValueError(f'unknown LR schedule {name!r}; use one of {sorted(LR_SCHEDULES)}')
    kind = LR_SCHEDULES[name.lower()]
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f'max_steps must be a positive int, got {max_steps!r}')
    if isinstance(alpha_f, bool) or not isinstance(alpha_f, (int, float)) or not math.isfinite(alpha_f):
        raise ValueError(f'alpha_f must be a finite number, got {alpha_f!r}')
    alpha_f = float(alpha_f)
    M = max_steps
    W = whole_steps(t_warmup, 't_warmup', M)
    D = whole_steps(lr_warmup_delay, 'lr_warmup_delay', M)
    decay = whole_steps(t_decay, 't_decay', M) if kind == 'wsd' else 0
    if kind == 'wsd':
        wsd_multiplier(0, M, W, decay, alpha_f)  # validates warmup + decay <= max_steps
    elif W > M:
        raise ValueError(f't_warmup ({W} steps) must not exceed max_steps ({M})')
    if D > 0 and D + W >= M:
        raise ValueError(f'lr_warmup_delay ({D} steps) + LR warmup ({W} steps) must be shorter than max_steps ({M})')

    def base(t: float) -> float:
        if kind == 'wsd':
            return wsd_multiplier(t, M, W, decay, alpha_f)
        if t < W:
            return t / W
        if kind == 'constant':
            return 1.0
        frac = min(1.0, (t - W) / (M - W)) if M > W else 1.0
        if kind == 'linear':
            return 1.0 + (alpha_f - 1.0) * frac
        return alpha_f + (1.0 - alpha_f) * 0.5 * (1.0 + math.cos(math.pi * frac))

    def lr_lambda(step: int) -> float:
        t = float(step)
        if D > 0:
            t = delayed_time(t, D, W, M)
        return base(t)

    lr_lambda.__qualname__ = lr_lambda.__name__ = f'prores_lr_{kind}'
    return lr_lambda


def build_lr_scheduler(optimizer, schedule: Union[str, Mapping] = 'wsd', **kwargs) -> torch.optim.lr_scheduler.LambdaLR:
    """`LambdaLR(optimizer, lr_lambda_from(schedule, **kwargs))`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_from(schedule, **kwargs))


def lr_scheduler_factory(schedule: Union[str, Mapping] = 'wsd', **kwargs) -> Callable:
    """A callable `optimizer -> LambdaLR` for `deepspeed.initialize(lr_scheduler=...)`: DeepSpeed calls it
    with the optimizer it built (or the one you passed). The schedule is validated now, not then."""
    lr_lambda_from(schedule, **kwargs)  # fail early

    def make(optimizer):
        return build_lr_scheduler(optimizer, schedule, **kwargs)

    return make
