"""Statistics of paired runs: is ProRes ahead of its baseline, behind, or inside the seed noise?

A pair is two runs that differ only in ProRes (same seed, so the same initialisation and data order);
its Δ is ProRes' final validation loss minus the baseline's, so Δ < 0 means ProRes is ahead. Seed to
seed, Δ can spread as widely as the effect itself, so one pair says little: `summarize_deltas` gives
the mean with its standard error, how many seeds are ahead, a two-sided sign test and a bootstrap
confidence interval of the mean, and a verdict in words. Pure Python (no torch), deterministic.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence

__all__ = ['sign_test_p', 'bootstrap_ci', 'summarize_deltas', 'verdict']

BOOTSTRAP_RESAMPLES = 10_000
CONFIDENCE = 0.95
# Below this many pairs a bootstrap interval is too narrow to trust (with 2 pairs it is just [min, max]):
# no verdict but 'too few seeds'.
MIN_PAIRS_FOR_VERDICT = 4


def sign_test_p(deltas: Sequence[float]) -> float | None:
    """Two-sided exact sign test of 'Δ is as often below 0 as above' (ties dropped); None without data."""
    signs = [d for d in deltas if d != 0]
    n = len(signs)
    if n == 0:
        return None
    k = min(sum(d < 0 for d in signs), sum(d > 0 for d in signs))
    tail = math.fsum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def bootstrap_ci(
    deltas: Sequence[float], confidence: float = CONFIDENCE, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean Δ (seeded, so the same data always give the same
    interval); None with fewer than 2 values."""
    d = list(deltas)
    n = len(d)
    if n < 2:
        return None
    rng = random.Random(seed)
    means = sorted(math.fsum(rng.choices(d, k=n)) / n for _ in range(resamples))
    lo_i = int(math.floor((1 - confidence) / 2 * resamples))
    hi_i = int(math.ceil((1 + confidence) / 2 * resamples)) - 1
    return means[lo_i], means[min(hi_i, resamples - 1)]


def verdict(ci: tuple[float, float] | None, n: int) -> str:
    """'ahead' (the whole interval below 0), 'behind' (above 0), else 'inside the seed noise'; 'too few
    seeds' below MIN_PAIRS_FOR_VERDICT pairs."""
    if ci is None or n < MIN_PAIRS_FOR_VERDICT:
        return 'too few seeds'
    if ci[1] < 0:
        return 'ahead'
    if ci[0] > 0:
        return 'behind'
    return 'inside the seed noise'


def summarize_deltas(deltas: Sequence[float]) -> dict:
    """Mean ± standard error, seeds ahead, sign-test p, bootstrap 95% CI and the verdict of paired Δs."""
    d = [float(x) for x in deltas]
    n = len(d)
    ci = bootstrap_ci(d)
    return {
        'n': n,
        'delta_mean': statistics.fmean(d) if d else None,
        'delta_se': statistics.stdev(d) / math.sqrt(n) if n > 1 else None,
        'wins': sum(x < 0 for x in d),
        'sign_test_p': sign_test_p(d),
        'ci95': list(ci) if ci else None,
        'verdict': verdict(ci, n),
    }
