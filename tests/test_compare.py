"""prores-compare: the statistics on planted numbers, and the command end to end on the quickstart YAML."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from prores_algo.training import compare

ROOT = Path(__file__).resolve().parents[1]


def _run(seed, variant, loss):
    return {'seed': seed, 'variant': variant, 'val_loss': loss, 'wall_s': 1.0, 'curve': [(1, 3.0), (2, 2.5)]}


def test_summary_pairs_by_seed_and_gives_the_verdict():
    runs = {}
    for seed, (b, p) in enumerate([(2.0, 1.97), (2.1, 2.08), (1.9, 1.88), (2.05, 2.02), (2.0, 1.99), (1.95, 1.93)]):
        runs[f'baseline-s{seed}'] = _run(seed, 'baseline', b)
        runs[f'prores-s{seed}'] = _run(seed, 'prores', p)
    runs['prores-s9'] = _run(9, 'prores', 1.0)  # no baseline of seed 9: not a pair
    runs['baseline-s7'] = {'seed': 7, 'variant': 'baseline', 'error': 'RuntimeError: boom'}
    s = compare.summarize(runs)
    assert [p['seed'] for p in s['per_seed']] == [0, 1, 2, 3, 4, 5]
    assert [round(p['delta'], 6) for p in s['per_seed']] == [-0.03, -0.02, -0.02, -0.03, -0.01, -0.02]
    assert s['n'] == 6 and s['wins'] == 6 and s['verdict'] == 'ahead'
    assert s['sign_test_p'] == pytest.approx(2 / 64)
    assert s['failed_runs'] == ['baseline-s7']
    mixed = {k: dict(v) for k, v in runs.items() if 'error' not in v and not k.endswith('s9')}
    for seed, d in enumerate([0.05, -0.04, 0.03, -0.05, 0.02, -0.02]):
        mixed[f'prores-s{seed}']['val_loss'] = mixed[f'baseline-s{seed}']['val_loss'] + d
    assert compare.summarize(mixed)['verdict'] == 'inside the seed noise'
    assert compare.pair_by_seed({0: 'b0', 2: 'b2'}, {2: 'p2', 3: 'p3'}) == [('b2', 'p2')]


def test_sentences_cover_every_verdict():
    from prores_algo.paired_stats import summarize_deltas

    for deltas in ([-1] * 6, [1] * 6, [1, -1] * 3, [1]):
        assert summarize_deltas(deltas)['verdict'] in compare.SENTENCES


def _compare(tmp_path, *extra, timeout=600):
    cmd = [sys.executable, '-m', 'prores_algo.training.compare', 'yamls/quickstart.yaml', '--seeds', '2', '--smoke']
    cmd += ['--out', str(tmp_path / 'cmp'), f'data.path={tmp_path / "data"}', *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_compare_smoke_end_to_end_and_resume(tmp_path):
    proc = _compare(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / 'cmp' / 'compare.json').read_text())
    assert set(r['runs']) == {'baseline-s0', 'prores-s0', 'baseline-s1', 'prores-s1'}
    for key, run in r['runs'].items():
        assert 'error' not in run, (key, run)
        assert run['prores_logged'] == (run['variant'] == 'prores')  # the baseline really runs without ProRes
        assert run['curve'] and (tmp_path / 'cmp' / 'logs' / f'{key}.log').is_file()
    s = r['summary']
    assert [p['seed'] for p in s['per_seed']] == [0, 1] and s['verdict'] == 'too few seeds'
    assert s['per_seed'][0]['delta'] == pytest.approx(
        r['runs']['prores-s0']['val_loss'] - r['runs']['baseline-s0']['val_loss']
    )
    assert 'Too few seeds for a verdict' in proc.stdout
    assert (tmp_path / 'cmp' / 'compare.png').read_bytes()[:4] == b'\x89PNG'
    # the same command again keeps every finished run
    again = _compare(tmp_path)
    assert again.returncode == 0 and '4 kept' in again.stdout and '0 to run' in again.stdout


def test_compare_refuses_a_config_without_prores(tmp_path):
    yaml = tmp_path / 'no_prores.yaml'
    text = (ROOT / 'yamls' / 'quickstart.yaml').read_text()
    start = text.index('  prores:')
    yaml.write_text(text[:start] + text[text.index('  gradient_clipping:') :])
    proc = subprocess.run(
        [sys.executable, '-m', 'prores_algo.training.compare', str(yaml), '--out', str(tmp_path / 'x')],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'no algorithms.prores' in lines[0] and 'Traceback' not in proc.stderr
