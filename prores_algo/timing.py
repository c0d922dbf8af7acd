"""The one time parser: every duration a user writes goes through here.

Durations are written the Composer way in every front end: '24000ba' (batches = optimizer steps),
'0.1dur' (a fraction of the run), '5e8tok', '1e6sp', '2ep'; a plain int means batches. ProRes' W also
takes 'auto': `auto_warmup_steps` is the one place its rule is written.

`parse_duration` reads a duration with Composer's own grammar (`Time.from_timestring`: a number `float()`
reads, then a unit; every unit but 'dur' needs a whole value) without importing Composer: the core runs
where no training framework is installed. The Composer side turns the result into a `Time`
(`integrations.composer.time.parse_time`); `to_steps` serves the loops that count optimizer steps (Hugging
Face, DeepSpeed, the monitor's interval): it also takes plain numbers and number strings (a command-line
flag arrives as '200'), resolves a 'dur' fraction against the run length, and refuses units it cannot
convert.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

__all__ = [
    'Duration',
    'parse_duration',
    'to_steps',
    'whole_steps',
    'TIME_EXAMPLES',
    'AUTO',
    'AUTO_RUN_FRACTION',
    'is_auto',
    'auto_warmup_steps',
]

TIME_EXAMPLES = '"24000ba" (batches), "0.1dur" (fraction of max_duration), "5e8tok" or "1e6sp"'
AUTO = 'auto'
# t_warmup='auto': W = min(T·L, AUTO_RUN_FRACTION · run length); the paper's runs keep W at 12-32% of the run
AUTO_RUN_FRACTION = 0.25
_NUMBER = re.compile(r'[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?')
# Composer's TimeUnit values; its regex is `^(.+)(unit|...)$`, case-insensitive, and the number is `float()`'s
UNITS = ('iter', 'ep', 'ba', 'sp', 'tok', 'dur', 'sec')
_TIME_STRING = re.compile(r'^(.+)(' + '|'.join(UNITS) + r')$', re.IGNORECASE)  # units in any case, as Composer


@dataclasses.dataclass(frozen=True)
class Duration:
    """A parsed duration: `value` (an int for every unit but 'dur') and `unit`, one of `UNITS`."""

    value: int | float
    unit: str

    def __str__(self) -> str:
        return f'{self.value}{self.unit}'


def _bad_string(field: str, value: Any) -> ValueError:
    return ValueError(
        f'{field}={value!r} is not a Time string: give a number with a unit, e.g. {TIME_EXAMPLES}; '
        f'a plain int means batches'
    )


def parse_duration(value: Any, field: str) -> Duration:
    """A `Duration` from a Time string ('24000ba', '0.1dur', '5e8tok') or an int (batches); an object with
    `value` and `unit` (Composer's `Time`) is taken as it is. Accepts exactly the strings Composer's
    `Time.from_timestring` accepts, wall-clock strings ('1h30m') excepted."""
    unit = getattr(value, 'unit', None)
    if unit is not None and hasattr(value, 'value'):  # a Composer Time, without importing Composer
        return Duration(value.value, getattr(unit, 'value', unit))
    if isinstance(value, bool):
        raise ValueError(f'{field} must be a Composer Time string such as "1000ba", got {value!r}')
    if isinstance(value, int):
        return Duration(value, 'ba')
    if not isinstance(value, str):
        raise ValueError(
            f'{field} must be an int (batches) or a Time string like "24000ba", got {type(value).__name__} {value!r}'
        )
    match = _TIME_STRING.match(value)
    if match is None:
        raise _bad_string(field, value)
    try:
        number = float(match.group(1))
        unit = match.group(2).lower()
        if unit == 'dur':
            return Duration(number, 'dur')
        if int(number) != number:
            raise _bad_string(field, value)
        return Duration(int(number), unit)
    except (ValueError, OverflowError):
        raise _bad_string(field, value) from None


def to_steps(value: Any, field: str, max_steps: float | None = None) -> float:
    """Optimizer steps (a float) from a number, a number string, 'Nba', or 'Xdur' (X · max_steps).

    Range checks (positive, whole) are the caller's: what is valid differs between a warmup length and
    an interval. A 'dur' fraction needs `max_steps`; tokens, samples and epochs cannot be converted by
    a loop that counts optimizer steps and are refused with the field's name.
    """
    if isinstance(value, bool):
        raise ValueError(f'{field} must be a number of optimizer steps, "Nba" or "Xdur", got {value!r}')
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f'{field} must be a finite number of optimizer steps, got {value!r}')
        return float(value)
    text = value.strip() if isinstance(value, str) else None
    if text is not None:
        if _NUMBER.fullmatch(text):
            return float(text)
        if text.endswith('ba') and _NUMBER.fullmatch(text[:-2]):  # '2.5ba': Composer's Time wants whole batches
            return float(text[:-2])
    t = parse_duration(value, field)
    unit = t.unit
    if unit == 'ba':
        return float(t.value)
    if unit == 'dur':
        if max_steps is None or not max_steps > 0:
            raise ValueError(
                f'{field}={value!r} is a fraction of the run, whose length in optimizer steps is not '
                'known here: give optimizer steps (e.g. 24000 or "24000ba")'
            )
        return float(t.value) * float(max_steps)
    raise ValueError(
        f'{field}={value!r}: this loop counts optimizer steps; give an int, "Nba" (steps) or "Xdur" '
        f'(a fraction of the run), not "{unit}" (tokens, samples and epochs are not converted here)'
    )


def whole_steps(value: Any, field: str, max_steps: float | None = None) -> int:
    """`to_steps` for counts that must be whole and >= 0 (intervals, delays, run lengths): a 'dur' fraction
    of the run is floored, as Composer does; any other non-integer is refused."""
    steps = to_steps(value, field, max_steps)
    if steps < 0:
        raise ValueError(f'{field} must be >= 0, got {value!r}')
    if not (isinstance(value, str) and value.strip().endswith('dur')) and not steps.is_integer():
        raise ValueError(f'{field}={value!r}: give a whole number of optimizer steps')
    return int(steps)


def is_auto(value: Any) -> bool:
    """True for t_warmup='auto' (any case, surrounding blanks ignored)."""
    return isinstance(value, str) and value.strip().lower() == AUTO


def auto_warmup_steps(num_layers: int, total_steps: Any) -> int:
    """W for t_warmup='auto', in optimizer steps: min(1000·L, 0.25·total_steps), rounded to whole steps
    (at least 1). The paper's T = 1000 steps per layer, capped at a quarter of the run.

    The one place the rule is written: every front end calls it once the run length is known."""
    from prores_algo.alpha_schedules import PAPER_STEPS_PER_LAYER

    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f'num_layers must be a positive int, got {num_layers!r}')
    if (
        isinstance(total_steps, bool)
        or not isinstance(total_steps, (int, float))
        or not math.isfinite(total_steps)
        or not total_steps > 0
    ):
        raise ValueError(
            f"t_warmup='auto' needs the run length in optimizer steps (total_steps / max_steps / "
            f'max_duration), got {total_steps!r}'
        )
    return max(1, round(min(PAPER_STEPS_PER_LAYER * num_layers, AUTO_RUN_FRACTION * total_steps)))
