"""paired_stats on planted numbers: the sign test, the bootstrap interval and the verdict."""

import math
import statistics

import pytest

from prores_algo.paired_stats import MIN_PAIRS_FOR_VERDICT, bootstrap_ci, sign_test_p, summarize_deltas, verdict


def test_sign_test_exact_binomial():
    assert sign_test_p([-1.0] * 6) == pytest.approx(2 / 64)  # all six ahead: the smallest p 6 seeds can give
    assert sign_test_p([-1.0] * 5 + [1.0]) == pytest.approx(2 * (1 + 6) / 64)
    assert sign_test_p([-1.0] * 3 + [1.0] * 3) == 1.0
    assert sign_test_p([-1.0, 0.0, 0.0]) == pytest.approx(1.0)  # ties dropped: one sign of one
    assert sign_test_p([]) is None


def test_bootstrap_ci_is_deterministic_and_brackets_the_mean():
    d = [-0.03, -0.01, -0.02, 0.005, -0.015, -0.025]
    lo, hi = bootstrap_ci(d)
    assert (lo, hi) == bootstrap_ci(d)  # seeded
    assert min(d) <= lo < statistics.fmean(d) < hi <= max(d)
    assert bootstrap_ci([0.2, 0.2, 0.2]) == (pytest.approx(0.2), pytest.approx(0.2))
    assert bootstrap_ci([0.1]) is None


@pytest.mark.parametrize(
    'deltas, expected',
    [
        ([-0.02, -0.03, -0.01, -0.025, -0.015, -0.02], 'ahead'),
        ([0.02, 0.03, 0.01, 0.025, 0.015, 0.02], 'behind'),
        ([-0.08, 0.06, -0.01, 0.04, -0.03, 0.02], 'inside the seed noise'),
        ([-0.02, -0.03, -0.01], 'too few seeds'),
    ],
)
def test_verdict(deltas, expected):
    assert summarize_deltas(deltas)['verdict'] == expected


def test_too_few_pairs_give_no_verdict_even_with_a_clear_interval():
    assert verdict((-0.5, -0.1), MIN_PAIRS_FOR_VERDICT - 1) == 'too few seeds'
    assert verdict((-0.5, -0.1), MIN_PAIRS_FOR_VERDICT) == 'ahead'
    assert verdict(None, 10) == 'too few seeds'


def test_summary_numbers():
    d = [-0.1, 0.05, -0.02, -0.04]
    s = summarize_deltas(d)
    assert s['n'] == 4 and s['wins'] == 3
    assert s['delta_mean'] == pytest.approx(-0.0275)
    assert s['delta_se'] == pytest.approx(statistics.stdev(d) / math.sqrt(4))
    assert s['sign_test_p'] == pytest.approx(2 * (1 + 4) / 16)
    assert s['ci95'][0] < s['delta_mean'] < s['ci95'][1]
    empty = summarize_deltas([])
    assert empty['n'] == 0 and empty['delta_mean'] is None and empty['verdict'] == 'too few seeds'
