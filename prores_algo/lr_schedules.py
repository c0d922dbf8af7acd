"""Learning-rate schedules as plain functions of the optimizer step: the one table both training entries
read, so a schedule's name means the same curve under prores-train (as a Composer scheduler) and
prores-ds-train or a plain PyTorch loop (as a `LambdaLR`).

`LR_SCHEDULES` maps each name to its Composer scheduler and its multiplier, written here as Composer
writes it (composer.optim.scheduler, with `t_max` = the run and no scale-schedule ratio). Durations are
the same strings everywhere; the LR warmup is `lr_warmup` (Composer's schedulers call it `t_warmup`,
a name this project keeps for ProRes' W). `delayed_time` is the LR-warmup delay ProRes asks for
(docs/paper.md, "Learning-rate warmup"): for t < D the multiplier holds its t = 0 value, the warmup then
runs its full length from D, and the rest is compressed so the schedule still ends at the run's end.

Nothing here imports a training framework; the Composer side (`WSDScheduler`, the delay applied to a
Trainer's schedulers) lives in `prores_algo.integrations.composer.lr`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from prores_algo.timing import whole_steps

__all__ = [
    'LR_SCHEDULES',
    'LR_ALIASES',
    'LRSchedule',
    'lr_schedule_params',
    'wsd_multiplier',
    'delayed_time',
    'lr_lambda_from',
    'build_lr_scheduler',
    'lr_scheduler_factory',
]

REQUIRED = dataclasses.MISSING
DURATIONS = ('lr_warmup', 'lr_decay')  # parameters that are durations (resolved to optimizer steps)


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


# --- the multipliers, as Composer computes them (t and the durations in optimizer steps, M = the run) -----
def _warming(t: float, warmup: float) -> bool:
    return t < warmup  # Composer: `state.timestamp < t_warmup`, so a zero warmup is no warmup


def _after_warmup(t: float, warmup: float, M: float) -> float:
    return min(1.0, (t - warmup) / (M - warmup)) if warmup < M else 0.0


def _cosine(frac: float, alpha_f: float) -> float:
    return alpha_f + (1.0 - alpha_f) * (1.0 + math.cos(frac * math.pi)) / 2


def _wsd(t, M, lr_warmup, lr_decay, alpha_f):
    return wsd_multiplier(t, M, lr_warmup, lr_decay, alpha_f)


def _constant(t, M, alpha):
    return alpha if t < M else 1.0  # Composer's ConstantScheduler: `alpha` until t_max, then 1


def _constant_with_warmup(t, M, lr_warmup, alpha):
    return t / lr_warmup * alpha if _warming(t, lr_warmup) else alpha


def _linear(t, M, alpha_i, alpha_f):
    return alpha_i + min(1.0, t / M) * (alpha_f - alpha_i)


def _linear_with_warmup(t, M, lr_warmup, alpha_i, alpha_f):
    if _warming(t, lr_warmup):
        return t / lr_warmup * alpha_i
    return alpha_i + _after_warmup(t, lr_warmup, M) * (alpha_f - alpha_i)


def _cosine_annealing(t, M, alpha_f):
    return _cosine(t / M, alpha_f)


def _cosine_with_warmup(t, M, lr_warmup, alpha_f):
    return t / lr_warmup if _warming(t, lr_warmup) else _cosine(_after_warmup(t, lr_warmup, M), alpha_f)


def _polynomial_with_warmup(t, M, lr_warmup, power, alpha_f):
    if _warming(t, lr_warmup):
        return t / lr_warmup
    return alpha_f + (1.0 - _after_warmup(t, lr_warmup, M)) ** power * (1.0 - alpha_f)


@dataclasses.dataclass(frozen=True)
class LRSchedule:
    """One named schedule: its Composer scheduler (a class of composer.optim, or prores_algo's
    WSDScheduler), its parameters with their defaults (REQUIRED: none) and its multiplier."""

    composer: str
    params: Mapping[str, Any]
    multiplier: Callable[..., float]


LR_SCHEDULES: dict[str, LRSchedule] = {
    'wsd': LRSchedule('WSDScheduler', {'lr_warmup': '0.02dur', 'lr_decay': '0.1dur', 'alpha_f': 0.0}, _wsd),
    'constant': LRSchedule('ConstantScheduler', {'alpha': 1.0}, _constant),
    'constant_with_warmup': LRSchedule(
        'ConstantWithWarmupScheduler', {'lr_warmup': REQUIRED, 'alpha': 1.0}, _constant_with_warmup
    ),
    'linear': LRSchedule('LinearScheduler', {'alpha_i': 1.0, 'alpha_f': 0.0}, _linear),
    'linear_with_warmup': LRSchedule(
        'LinearWithWarmupScheduler', {'lr_warmup': REQUIRED, 'alpha_i': 1.0, 'alpha_f': 0.0}, _linear_with_warmup
    ),
    'cosine': LRSchedule('CosineAnnealingScheduler', {'alpha_f': 0.0}, _cosine_annealing),
    'cosine_with_warmup': LRSchedule(
        'CosineAnnealingWithWarmupScheduler', {'lr_warmup': REQUIRED, 'alpha_f': 0.0}, _cosine_with_warmup
    ),
    'polynomial_with_warmup': LRSchedule(
        'PolynomialWithWarmupScheduler',
        {'lr_warmup': REQUIRED, 'power': 2.0, 'alpha_f': 0.0},
        _polynomial_with_warmup,
    ),
}
# other spellings of the same curves (llm-foundry's scheduler names)
LR_ALIASES = {
    'warmup_stable_decay': 'wsd',
    'linear_decay_with_warmup': 'linear_with_warmup',
    'cosine_decay_with_warmup': 'cosine_with_warmup',
    'polynomial_decay_with_warmup': 'polynomial_with_warmup',
}


def _canonical(name: Any, field: str) -> str:
    if isinstance(name, str) and name in LR_SCHEDULES:
        return name
    if isinstance(name, str) and name in LR_ALIASES:
        return LR_ALIASES[name]
    names = sorted(LR_SCHEDULES)
    close = difflib.get_close_matches(str(name), names + sorted(LR_ALIASES), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ''
    raise ValueError(f"{field}: unknown scheduler '{name}'{hint}; available: {names}")


def _check_number(key: str, value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f'{field}.{key} must be a finite number, got {value!r}')
    return float(value)


def lr_schedule_params(name: Any, kwargs: Mapping[str, Any] | None = None, field: str = 'scheduler'):
    """(canonical name, every parameter with its value or default) for a schedule written as `name` plus
    `kwargs`; a ValueError naming the key and the fix for an unknown name or key or a missing value."""
    canonical = _canonical(name, f'{field}.name')
    spec = LR_SCHEDULES[canonical]
    kwargs = dict(kwargs or {})
    for key in sorted(set(kwargs) - set(spec.params)):
        if key == 't_warmup' and 'lr_warmup' in spec.params:
            fix = ": the LR warmup is `lr_warmup` (t_warmup is ProRes' W, under algorithms.prores)"
        else:
            close = difflib.get_close_matches(key, list(spec.params), n=1)
            fix = f" (did you mean '{close[0]}'?)" if close else f'; {canonical} takes {sorted(spec.params)}'
        raise ValueError(f"{field} ({name}): unknown key '{key}'{fix}")
    params = {key: kwargs.get(key, default) for key, default in spec.params.items()}
    missing = [key for key, value in params.items() if value is REQUIRED]
    if missing:
        raise ValueError(f'{field} ({name}): missing {missing[0]}, e.g. {missing[0]}: 0.02dur')
    for key, value in params.items():
        if key not in DURATIONS:
            params[key] = _check_number(key, value, field)
    return canonical, params


def lr_lambda_from(
    schedule: str | Mapping = 'wsd',
    *,
    max_steps: int,
    lr_warmup_delay: Any = 0,
    field: str = 'scheduler',
    **kwargs: Any,
) -> Callable[[int], float]:
    """The LR multiplier of a schedule of `LR_SCHEDULES` as a plain function `f(step) -> float`.

    `schedule` is a name (parameters as keyword arguments) or a mapping `{name: ..., lr_warmup: ...}`
    as the YAML's `scheduler:` block. Durations are ints (steps), "Nba" or "Xdur" (floored, as
    Composer does). `lr_warmup_delay` D > 0 holds the t = 0 multiplier for t < D, runs the full warmup
    from D, and compresses the rest so the schedule still ends at `max_steps` (`delayed_time`).

    Returned as a plain function (not a callable object) so `LambdaLR.state_dict()` does not store it:
    a resumed run recomputes the multiplier from the restored step with this run's schedule.
    Optimizer step t (0-based) uses `f(t)`, as under Composer (the scheduler steps after each update).
    """
    if isinstance(schedule, Mapping):
        kwargs = {**kwargs, **{k: v for k, v in schedule.items() if k != 'name'}}
        schedule = schedule.get('name')
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f'max_steps must be a positive int, got {max_steps!r}')
    name, params = lr_schedule_params(schedule, kwargs, field)
    M = max_steps
    for key in DURATIONS:
        if key in params:
            params[key] = whole_steps(params[key], f'{field}.{key}', M)
    W = params.get('lr_warmup', 0)
    D = whole_steps(lr_warmup_delay, 'lr_warmup_delay', M)
    if name == 'wsd':
        wsd_multiplier(0, M, W, params['lr_decay'], params['alpha_f'])  # validates warmup + decay <= max_steps
    elif W > M:
        raise ValueError(f'{field}.lr_warmup ({W} steps) must not exceed the run ({M} steps)')
    if D > 0 and D + W >= M:
        raise ValueError(f'lr_warmup_delay ({D} steps) + LR warmup ({W} steps) must be shorter than the run ({M})')
    curve = LR_SCHEDULES[name].multiplier

    def lr_lambda(step: int) -> float:
        t = float(step)
        if D > 0:
            t = delayed_time(t, D, W, M)
        return curve(t, M, **params)

    lr_lambda.__qualname__ = lr_lambda.__name__ = f'prores_lr_{name}'
    return lr_lambda


def build_lr_scheduler(optimizer, schedule: str | Mapping = 'wsd', **kwargs) -> torch.optim.lr_scheduler.LambdaLR:
    """`LambdaLR(optimizer, lr_lambda_from(schedule, **kwargs))`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_from(schedule, **kwargs))


def lr_scheduler_factory(schedule: str | Mapping = 'wsd', **kwargs) -> Callable:
    """A callable `optimizer -> LambdaLR` for `deepspeed.initialize(lr_scheduler=...)`: DeepSpeed calls it
    with the optimizer it built (or the one you passed). The schedule is validated now, not then."""
    lr_lambda_from(schedule, **kwargs)  # fail early

    def make(optimizer):
        return build_lr_scheduler(optimizer, schedule, **kwargs)

    return make
