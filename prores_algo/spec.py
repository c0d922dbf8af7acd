"""`ProResSpec`: what a user asks of ProRes, written once for every front end.

The Composer algorithm, the Hugging Face callback and the DeepSpeed helper differ only in where the
clock comes from and how they log. Everything else lives here: the schedule name, W with its default
(the paper's 1000 optimizer steps per layer), which modules are layers and branches, the validation of
all of it, the metric names, the "W is longer than the run" warning, and the record a checkpoint keeps
so that a resume under another configuration is refused with one message.

Torch-only: no training framework is imported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from prores_algo import alpha_schedules
from prores_algo.alpha_schedules import default_warmup
from prores_algo.layers import ResidualLayer, find_residual_layers
from prores_algo.policies import check_branches
from prores_algo.surgery import ProResController, check_mechanism, warn_if_short_warmup
from prores_algo.timing import auto_warmup_steps, is_auto, to_steps
from prores_algo.warn import warn_user

__all__ = [
    'ProResSpec',
    'alpha_metrics',
    'default_warmup',
    'auto_warmup_steps',
    'check_resume',
    'DISABLED_RECORD',
    'WARMUP_STEPS_METRIC',
]

ALPHA_METRIC = 'prores/alpha/layer_{}'
ALPHA_MEAN_METRIC = 'prores/alpha/mean'
WARMUP_STEPS_METRIC = 'prores/warmup_steps'  # W as resolved, logged once by every front end
DISABLED_RECORD: dict[str, Any] = {'enabled': False}


def alpha_metrics(alphas: Sequence[float]) -> dict[str, float]:
    """`prores/alpha/layer_{i}` for every layer and `prores/alpha/mean`: the names every front end logs."""
    metrics = {ALPHA_METRIC.format(i): float(a) for i, a in enumerate(alphas)}
    metrics[ALPHA_MEAN_METRIC] = sum(alphas) / len(alphas) if alphas else 1.0
    return metrics


@dataclasses.dataclass
class ProResSpec:
    """One ProRes configuration, validated on construction.

    Args:
        schedule: α schedule, one of `prores_algo.alpha_schedules.names()` or an alias (default 'linear').
        t_warmup: W as the user wrote it: a number of steps, a Time string ('24000ba', '0.1dur'), 'auto'
            (min(1000·L, 0.25·run length), `timing.auto_warmup_steps`), or None for the paper's default
            (1000 steps per layer). Each front end resolves it against
            its own clock; `warmup_steps` does it for the loops that count optimizer steps.
        layer_class, branches, layer_pattern: for models ProRes does not know (see `apply_prores`).
        remove_when_done: remove the hooks once every α is 1 for good.
        mechanism: 'auto' (α inside the GEMM producing each branch where one can carry it, an output hook
            elsewhere) or 'hook' (the output hook everywhere). The same numbers either way, so a checkpoint
            does not record it and a resume may switch.
    """

    schedule: str = 'linear'
    t_warmup: Any = None
    layer_class: Any = None
    branches: Sequence[str] | None = None
    layer_pattern: str | None = None
    remove_when_done: bool = True
    mechanism: str = 'auto'

    def __post_init__(self) -> None:
        self.schedule = alpha_schedules.canonical_name(self.schedule)
        if is_auto(self.t_warmup):
            self.t_warmup = 'auto'
        if self.branches is not None:
            self.branches = check_branches(self.branches)
        if self.layer_class is not None and self.layer_pattern is not None:
            raise ValueError('pass either layer_class or layer_pattern, not both')
        if not isinstance(self.remove_when_done, bool):
            raise ValueError(f'remove_when_done must be true or false, got {self.remove_when_done!r}')
        check_mechanism(self.mechanism)

    # --- layers and hooks ------------------------------------------------------------------------------
    def find_layers(self, model: nn.Module) -> list[ResidualLayer]:
        return find_residual_layers(model, self.layer_class, self.branches, self.layer_pattern)

    def apply(
        self,
        model: nn.Module,
        warmup_steps: float | None,
        mechanism: str | None = None,
        layers: list[ResidualLayer] | None = None,
    ) -> ProResController:
        """Hook `model`'s branches; `warmup_steps` None leaves W unresolved (every α 0) until it is set."""
        controller = ProResController(
            self.find_layers(model) if layers is None else layers,
            self.schedule,
            warmup_steps,
            self.remove_when_done,
            self.mechanism if mechanism is None else mechanism,
        )
        controller.model = model  # lets prores_algo.export.fold_prores(controller) find the model
        return controller

    # --- W in optimizer steps (Hugging Face, DeepSpeed, plain PyTorch) ----------------------------------
    def attach(self, *args, **kwargs) -> ProResController:
        """Deprecated name of `apply` (one release)."""
        warn_user('ProResSpec.attach is deprecated: use ProResSpec.apply', DeprecationWarning)
        return self.apply(*args, **kwargs)

    def check_steps_warmup(self) -> None:
        """Validate a W given in optimizer steps now; a 'dur' fraction waits for the run length."""
        if self.t_warmup is not None and not self._is_fraction() and not self.auto:
            self.warmup_steps(1)

    def warmup_steps(self, num_layers: int, max_steps: float | None = None) -> float:
        """W in optimizer steps: the default, a number, 'Nba', or a fraction of `max_steps` ('0.1dur')."""
        if self.t_warmup is None:
            return default_warmup(num_layers)
        if self.auto:
            if not max_steps or max_steps <= 0:
                raise ValueError(
                    "t_warmup='auto' needs the total number of optimizer steps, which is not known (e.g. an "
                    'IterableDataset without max_steps): set max_steps or give W in steps'
                )
            return float(auto_warmup_steps(num_layers, max_steps))
        if self._is_fraction():
            fraction = to_steps(self.t_warmup, 't_warmup', 1.0)
            if not 0 < fraction <= 1:
                raise ValueError(f't_warmup={self.t_warmup!r}: a fraction of the run must be in (0, 1]')
            if not max_steps or max_steps <= 0:
                raise ValueError(
                    f't_warmup={self.t_warmup!r} needs the total number of steps, which is not known '
                    '(e.g. an IterableDataset without max_steps): give W in steps'
                )
            return fraction * float(max_steps)
        steps = to_steps(self.t_warmup, 't_warmup')
        if not steps > 0:
            raise ValueError(f't_warmup must be a positive number of optimizer steps, got {self.t_warmup!r}')
        return steps

    @property
    def auto(self) -> bool:
        """t_warmup='auto': W = min(1000·L, 0.25·run length), resolved once the run length is known."""
        return self.t_warmup == 'auto'

    def _is_fraction(self) -> bool:
        return isinstance(self.t_warmup, str) and self.t_warmup.strip().endswith('dur')

    # --- warnings ----------------------------------------------------------------------------------------
    @staticmethod
    def warn_if_longer_than_run(controller: ProResController, total: float | None, unit: str, limit: str) -> bool:
        """Warn when W exceeds the run (`total` in `unit`; `limit` names the setting, e.g. 'max_steps')."""
        w = controller.warmup_steps
        if total is None or w is None or not total > 0 or w <= total:
            return False
        warn_user(
            f'ProRes t_warmup ({w:g} {unit}) exceeds {limit} ({total:g} {unit}): the deepest layers never '
            'reach α = 1 in this run. Use a shorter t_warmup, e.g. "0.1dur" (the paper used 12-32% of '
            'training).'
        )
        return True

    @staticmethod
    def warn_if_short(controller: ProResController, measure=None) -> bool:
        """The short-warmup warning; `measure` (a `warmup_advice.InitMeasure`) makes it regime-aware."""
        return warn_if_short_warmup(controller, measure)

    # --- checkpoints ---------------------------------------------------------------------------------------
    def record(self, num_layers: int | None, **clock: Any) -> dict[str, Any]:
        """What a checkpoint keeps about this configuration; `clock` adds the front end's time fields
        (W as resolved or as written, its unit, the LR-warmup delay)."""
        layer_class = self.layer_class
        if layer_class is not None and not isinstance(layer_class, str):
            layer_class = getattr(layer_class, '__name__', str(layer_class))
        return {
            'enabled': True,
            'schedule': self.schedule,
            'num_layers': num_layers,
            'layer_class': layer_class,
            'branches': None if self.branches is None else list(self.branches),
            'layer_pattern': self.layer_pattern,
            **clock,
        }


def _normalised(record: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(record)
    if out.get('schedule') is not None:
        with contextlib.suppress(ValueError):
            out['schedule'] = alpha_schedules.canonical_name(out['schedule'])
    if isinstance(out.get('t_warmup'), (int, float)) and not isinstance(out.get('t_warmup'), bool):
        out['t_warmup'] = float(out['t_warmup'])
    return out


def check_resume(saved: Mapping[str, Any], current: Mapping[str, Any], where: str, hint: str) -> None:
    """Refuse (ValueError naming every differing field) to resume `current` from a checkpoint saved as `saved`.

    Fields a record does not have (written by an older version) are not compared; a run without ProRes
    records `{'enabled': False}`."""
    a, b = _normalised(saved), _normalised(current)
    a.setdefault('enabled', True)
    b.setdefault('enabled', True)
    if a['enabled'] and b['enabled']:
        shared = sorted((set(a) & set(b)) - {'enabled'})
        diff = [k for k in shared if a[k] != b[k]]
        if not diff:
            return
        lines = '; '.join(f'{k}: checkpoint {a[k]!r} vs now {b[k]!r}' for k in diff)

        def show(r):
            return ', '.join(f'{k}={r[k]!r}' for k in shared)

        detail = f'differs in {diff}; {lines}). Checkpoint: {show(a)}; this run: {show(b)}'
    elif a['enabled'] == b['enabled']:
        return
    else:
        show_on = {True: 'ProRes on', False: 'ProRes off'}
        detail = f'checkpoint: {show_on[a["enabled"]]}; this run: {show_on[b["enabled"]]})'
    raise ValueError(
        f'cannot resume from {where}: it was trained with a different ProRes configuration ({detail}. {hint}'
    )
