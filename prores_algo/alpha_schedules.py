"""Per-layer residual-scaling schedules α(l, t) of ProRes (arXiv 2603.05369).

Pure Python, no torch: the same numbers drive the Composer algorithm, the DeepSpeed helper, the
Hugging Face callback and the preview CLI.

Conventions: the public `alpha()` takes a 0-based `layer_index` (code) and converts it to the paper's
1-based l. `W` (`warmup_steps`) is the time at which every layer has α = 1; the paper's T (warmup of
the first layer) is W / L. Every formula is written so that α is exactly 1.0 at t >= W (products are
formed before the division, so T·L never rounds below W), which is what lets the scaling be removed
"for good" once W has passed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = [
    'alpha',
    'alphas',
    'names',
    'aliases',
    'register',
    'canonical_name',
    'ScheduleFn',
    'PAPER_STEPS_PER_LAYER',
    'MIN_STEPS_PER_LAYER',
]

# The paper's T = W / L: 1000 optimizer steps of α warmup per layer (500 from 96 layers on).
PAPER_STEPS_PER_LAYER = 1000
# Below this many steps per layer benchmarks/quality.py saw ProRes behind in the least forgiving regime
# it measured (Pre-LN with branches starting small); what other regimes need is in warmup_advice, used
# when the model was measured. This is the threshold when it was not.
MIN_STEPS_PER_LAYER = 100


def default_warmup(num_layers: int) -> float:
    """The paper's W for a model of `num_layers` layers: 1000 optimizer steps per layer (the one place the
    default is written; every front end calls this)."""
    return float(PAPER_STEPS_PER_LAYER * num_layers)


# fn(l, L, t, W) -> α with l in 1..L, t >= 0, W > 0.
ScheduleFn = Callable[[int, int, float, float], float]

_REGISTRY: dict[str, ScheduleFn] = {}
_ALIASES: dict[str, str] = {
    # names used by the paper's official code (--prores_schedule)
    'linear_equal': 'equal',
    'linear_reverse': 'reverse',
    'sqrt': 'linear_sqrt',
    'square': 'linear_square',
}


def _clip(x: float) -> float:
    return 0.0 if x <= 0.0 else (1.0 if x >= 1.0 else x)


def register(name: str, fn: ScheduleFn | None = None, *, overwrite: bool = False):
    """Register a schedule `fn(l, L, t, W) -> α` (l is 1-based). Usable as a decorator.

    A schedule must give α = 1 for every layer once t >= W; ProRes checks this when it is applied.
    """

    def _register(f: ScheduleFn) -> ScheduleFn:
        if not isinstance(name, str) or not name:
            raise ValueError(f'schedule name must be a non-empty string, got {name!r}')
        if (name in _REGISTRY or name in _ALIASES) and not overwrite:
            raise ValueError(f'schedule {name!r} is already registered; pass overwrite=True to replace it')
        _REGISTRY[name] = f
        return f

    return _register(fn) if fn is not None else _register


def names() -> list[str]:
    """Canonical schedule names (aliases excluded), in registration order."""
    return list(_REGISTRY)


def aliases() -> dict[str, str]:
    return dict(_ALIASES)


def canonical_name(name: str) -> str:
    if not isinstance(name, str):
        raise ValueError(f'schedule must be a string, one of {names()}, got {type(name).__name__} {name!r}')
    name = _ALIASES.get(name, name)
    if name not in _REGISTRY:
        raise ValueError(
            f'unknown schedule {name!r}: set `schedule` to one of {names()} '
            f'(aliases: {sorted(_ALIASES)}), or register your own with prores_algo.alpha_schedules.register().'
        )
    return name


def _check_args(layer_index: int, num_layers: int, warmup_steps: float) -> None:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f'num_layers must be a positive int, got {num_layers!r}')
    if isinstance(layer_index, bool) or not isinstance(layer_index, int) or not 0 <= layer_index < num_layers:
        raise ValueError(f'layer_index must be an int in [0, {num_layers}), got {layer_index!r}')
    if (
        not isinstance(warmup_steps, (int, float))
        or isinstance(warmup_steps, bool)
        or not warmup_steps > 0
        or math.isinf(warmup_steps)
    ):
        raise ValueError(f'warmup_steps (t_warmup) must be a positive finite number, got {warmup_steps!r}')


def alpha(name: str, layer_index: int, num_layers: int, step: float, warmup_steps: float) -> float:
    """α of layer `layer_index` (0-based) out of `num_layers` at time `step` for warmup `warmup_steps`."""
    fn = _REGISTRY[canonical_name(name)]
    _check_args(layer_index, num_layers, warmup_steps)
    t = max(0.0, float(step))
    if t >= warmup_steps:  # every schedule is done at W (contract checked for custom ones at apply time)
        return 1.0
    return _clip(float(fn(layer_index + 1, num_layers, t, float(warmup_steps))))


def alphas(name: str, num_layers: int, step: float, warmup_steps: float) -> list[float]:
    """α for every layer, shallowest first."""
    return [alpha(name, i, num_layers, step, warmup_steps) for i in range(num_layers)]


# --- the paper's schedules (docs/paper.md §1); l is 1-based, T = W / L --------------------------------------


@register('linear')
def _linear(l, L, t, W):  # min(1, t / (T·l)): all layers start together, deeper ones rise slower
    return _clip(t * L / (W * l))


@register('linear_sqrt')
def _linear_sqrt(l, L, t, W):
    return math.sqrt(_linear(l, L, t, W))


@register('linear_square')
def _linear_square(l, L, t, W):  # the paper's best for Post-LN
    return _linear(l, L, t, W) ** 2


@register('equal')
def _equal(l, L, t, W):  # the same ramp for every layer
    return _clip(t / W)


@register('reverse')
def _reverse(l, L, t, W):  # deepest first: an ablation (diverges on Post-LN in the paper)
    return _clip(t * L / (W * (L - l + 1)))


@register('stagewise_0')
def _stagewise_0(l, L, t, W):  # one layer at a time: layer l ramps during [T(l-1), T·l]
    return _clip((t * L - W * (l - 1)) / W)


def _stagewise(floor: float, l, L, t, W) -> float:
    return floor + (1.0 - floor) * _stagewise_0(l, L, t, W)


@register('stagewise_L')
def _stagewise_L(l, L, t, W):
    return _stagewise(1.0 / L, l, L, t, W)


@register('stagewise_sqrt_L')
def _stagewise_sqrt_L(l, L, t, W):
    return _stagewise(1.0 / math.sqrt(L), l, L, t, W)


@register('stagewise_sqrt_l')
def _stagewise_sqrt_l(l, L, t, W):
    return _stagewise(1.0 / math.sqrt(l), l, L, t, W)


# static ablations: a constant below 1 until W, then 1 (the official loop sets α = 1 once W has passed)
@register('fix_L')
def _fix_L(l, L, t, W):
    return 1.0 / L


@register('fix_sqrt_L')
def _fix_sqrt_L(l, L, t, W):
    return 1.0 / math.sqrt(L)


@register('fix_sqrt_l')
def _fix_sqrt_l(l, L, t, W):
    return 1.0 / math.sqrt(l)


@register('staggered')
def _staggered(l, L, t, W):
    """The original design document's variant: layer i = l-1 starts at s_i = (i/L)·W, all end at W."""
    start = (l - 1) * W / L
    return _clip((t - start) / (W - start))
