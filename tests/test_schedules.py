"""Every schedule equals its formula (docs/paper.md §1) at sampled (l, t), including the ends."""

import math
import random

import pytest

from prores_algo import alpha_schedules


def clip(x):
    return min(1.0, max(0.0, x))


def reference(name, l, L, t, W):
    """The table of docs/paper.md, written independently of the implementation (l is 1-based, T = W / L)."""
    T = W / L
    if t >= W:
        return 1.0
    lin = min(1.0, t / (T * l))
    stage0 = clip((t - T * (l - 1)) / T)
    return {
        'linear': lin,
        'linear_sqrt': lin**0.5,
        'linear_square': lin**2,
        'equal': min(1.0, t / W),
        'reverse': min(1.0, t / (T * (L - l + 1))),
        'stagewise_0': stage0,
        'stagewise_L': 1 / L + (1 - 1 / L) * stage0,
        'stagewise_sqrt_L': 1 / math.sqrt(L) + (1 - 1 / math.sqrt(L)) * stage0,
        'stagewise_sqrt_l': 1 / math.sqrt(l) + (1 - 1 / math.sqrt(l)) * stage0,
        'fix_L': 1 / L,
        'fix_sqrt_L': 1 / math.sqrt(L),
        'fix_sqrt_l': 1 / math.sqrt(l),
        'staggered': min(1.0, max(0.0, t - (l - 1) / L * W) / (W - (l - 1) / L * W)),
    }[name]


PAPER_SCHEDULES = [
    'linear',
    'linear_sqrt',
    'linear_square',
    'equal',
    'reverse',
    'stagewise_0',
    'stagewise_L',
    'stagewise_sqrt_L',
    'stagewise_sqrt_l',
    'fix_L',
    'fix_sqrt_L',
    'fix_sqrt_l',
    'staggered',
]


def test_names_cover_design_table():
    assert set(PAPER_SCHEDULES) <= set(alpha_schedules.names())


@pytest.mark.parametrize('name', PAPER_SCHEDULES)
@pytest.mark.parametrize('L,W', [(1, 1000), (4, 4000), (12, 12000), (24, 24000), (7, 1234.5)])
def test_schedule_matches_formula(name, L, W):
    rng = random.Random(hash((name, L)) & 0xFFFF)
    ts = [0, 1, W / L, W / 2, W - 1, W, W + 1, 10 * W] + [rng.uniform(0, W) for _ in range(40)]
    for t in ts:
        for i in range(L):
            got = alpha_schedules.alpha(name, i, L, t, W)
            assert got == pytest.approx(reference(name, i + 1, L, t, W), abs=1e-12), (name, i, t)
            assert 0.0 <= got <= 1.0


@pytest.mark.parametrize('name', PAPER_SCHEDULES)
def test_every_schedule_is_exactly_one_at_and_after_warmup(name):
    for L in (1, 3, 12, 24, 120):
        W = 1000 * L
        assert alpha_schedules.alphas(name, L, W, W) == [1.0] * L
        assert alpha_schedules.alphas(name, L, 5 * W, W) == [1.0] * L


def test_paper_default_linear_values():
    # 12 layers, T = 1000: layer 1 done at 1000, layer 12 at 12000
    L, W = 12, 12000
    assert alpha_schedules.alpha('linear', 0, L, 500, W) == 0.5
    assert alpha_schedules.alpha('linear', 0, L, 1000, W) == 1.0
    assert alpha_schedules.alpha('linear', 11, L, 6000, W) == 0.5
    assert alpha_schedules.alpha('linear', 11, L, 0, W) == 0.0
    assert alpha_schedules.alpha('stagewise_0', 1, L, 1000, W) == 0.0  # layer 2 starts at T
    assert alpha_schedules.alpha('stagewise_0', 1, L, 1500, W) == 0.5
    assert alpha_schedules.alpha('staggered', 6, L, 6000, W) == 0.0  # layer 7 starts at 6/12 of W
    assert alpha_schedules.alpha('staggered', 6, L, 9000, W) == 0.5


@pytest.mark.parametrize(
    'alias,canonical',
    [('linear_equal', 'equal'), ('linear_reverse', 'reverse'), ('sqrt', 'linear_sqrt'), ('square', 'linear_square')],
)
def test_official_aliases(alias, canonical):
    assert alpha_schedules.canonical_name(alias) == canonical
    assert alpha_schedules.alphas(alias, 6, 1234, 6000) == alpha_schedules.alphas(canonical, 6, 1234, 6000)


def test_custom_schedule_registration():
    @alpha_schedules.register('test_cubic')
    def cubic(l, L, t, W):
        return (t / W) ** 3

    assert 'test_cubic' in alpha_schedules.names()
    assert alpha_schedules.alpha('test_cubic', 0, 4, 500, 1000) == 0.125
    assert alpha_schedules.alpha('test_cubic', 3, 4, 1000, 1000) == 1.0
    with pytest.raises(ValueError, match='already registered'):
        alpha_schedules.register('test_cubic', cubic)
    with pytest.raises(ValueError, match='already registered'):
        alpha_schedules.register('sqrt', cubic)  # aliases are taken too


@pytest.mark.parametrize(
    'kwargs,match',
    [
        (dict(name='cosine'), 'unknown schedule'),
        (dict(warmup_steps=0), 'warmup_steps'),
        (dict(warmup_steps=-5), 'warmup_steps'),
        (dict(warmup_steps=float('inf')), 'warmup_steps'),
        (dict(layer_index=4), 'layer_index'),
        (dict(layer_index=-1), 'layer_index'),
        (dict(num_layers=0, layer_index=0), 'num_layers'),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(name='linear', layer_index=0, num_layers=4, step=10, warmup_steps=100)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        alpha_schedules.alpha(**args)


def test_unknown_schedule_lists_accepted_values():
    with pytest.raises(ValueError) as e:
        alpha_schedules.alpha('lineer', 0, 2, 0, 10)
    assert 'linear' in str(e.value) and 'stagewise_0' in str(e.value)


def test_schedules_module_does_not_need_torch():
    import subprocess
    import sys

    code = (
        "import sys, importlib.util; sys.modules['torch'] = None; "
        "spec = importlib.util.spec_from_file_location('s', 'prores_algo/alpha_schedules.py'); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); print(m.alpha('linear', 0, 2, 5, 20))"
    )
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == '0.5'
