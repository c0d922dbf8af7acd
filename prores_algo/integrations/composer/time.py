"""Durations as Composer `Time`: the core's one parser (`timing.parse_duration`, Composer's grammar),
returned as the object Composer's Trainer, schedulers and algorithms take."""

from __future__ import annotations

from typing import Any

from composer.core import Time

from prores_algo.timing import parse_duration

__all__ = ['parse_time']


def parse_time(value: Any, field: str) -> Time:
    """Composer `Time` from a Time, a Time string ('24000ba', '0.1dur', '5e8tok') or an int (batches);
    a ValueError naming `field` otherwise."""
    if isinstance(value, Time):
        return value
    duration = parse_duration(value, field)
    return Time(duration.value, duration.unit)
