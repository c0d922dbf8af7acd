"""The benchmarks' smallest configurations run end to end (so they cannot rot) and write the JSON that
benchmarks/report.py reads, with finite numbers where numbers are promised."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _run(args, timeout=120):
    proc = subprocess.run([PY, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f'{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return proc


def _finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope='module')
def outputs(tmp_path_factory):
    """Run both benchmarks' --smoke configurations once; the tests below check what they wrote."""
    d = tmp_path_factory.mktemp('bench')
    _run(['benchmarks/overhead.py', '--smoke', '--out', str(d / 'overhead.json')])
    _run(['benchmarks/quality.py', '--smoke', '--out', str(d / 'quality.json'), '--data', str(d / 'data')], timeout=180)
    _run(['benchmarks/quality.py', '--smoke', '--diagnose', '--out', str(d / 'quality.json'), '--data', str(d / 'data')])
    _run(['benchmarks/investigate.py', '--smoke', '--jobs', '1', '--out', str(d / 'investigation.json'),
          '--quality', str(d / 'quality.json'), '--data', str(d / 'data')], timeout=300)
    return d


def test_overhead_smoke(outputs):
    r = json.loads((outputs / 'overhead.json').read_text())
    assert r['benchmark'] == 'overhead' and r['mode'] == 'smoke'
    assert set(r['models']) == {'reference', 'llama'}
    for name, m in r['models'].items():
        s = m['summary']
        for k in ('step_time_ratio_warmup', 'step_time_ratio_after', 'peak_memory_ratio', 'saved_activation_ratio'):
            assert _finite(s[k]) and s[k] > 0, (name, k, s[k])
        for v in ('baseline', 'prores_warmup', 'prores_done'):
            assert _finite(m['timing'][v]['median_step_s']) and m['timing'][v]['timed_steps'] >= 1
            assert m['memory'][v]['peak_bytes'] > 0
        # exact properties of the mechanism hold even in the smallest configuration
        assert m['identical_after_removal'] is True
        assert m['alpha_moving_during_timing'] is True
        assert s['recompiles_from_alpha_updates'] == 0
        assert s['recompiles_at_removal'] == 1
        assert m['compile']['recompiles_after_removal'] == 0
        assert s['peak_memory_ratio'] < 1.01


def test_quality_smoke(outputs):
    r = json.loads((outputs / 'quality.json').read_text())
    assert r['benchmark'] == 'quality' and r['mode'] == 'smoke' and r['status'] == 'complete'
    assert set(r['experiments']) == {'main', 'depth', 'ablation', 'warmup_length'}
    assert r['runs'] and not r['skipped']
    for key, run in r['runs'].items():
        assert 'error' not in run, (key, run.get('error'))
        for k in ('val_loss', 'val_ppl', 'wall_s'):
            assert _finite(run[k]), (key, k, run[k])
        assert len(run['curve']) == run['spec']['steps'] and all(_finite(v) for v in run['curve'])
        assert isinstance(run['spikes'], int) and isinstance(run['diverged'], bool)
    for norm in ('pre', 'post'):
        for v in ('baseline', 'linear'):
            assert _finite(r['summary']['main'][norm][v]['val_loss']['mean'])
    assert r['summary']['depth'] and r['summary']['ablation']
    assert r['alpha_log_check']['max_abs_diff'] < 1e-6
    assert set(r['figures']) == {'quality_loss_curves.png', 'quality_depth.png', 'quality_ablation.png',
                                 'alpha_heatmap.png'}
    for fig in r['figures']:
        assert (outputs / fig).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_diagnostics_smoke(outputs):
    r = json.loads((outputs / 'diagnostics.json').read_text())
    ref = r['reference_levels']
    assert _finite(ref['unigram']) and _finite(ref['bigram']) and ref['bigram'] < ref['unigram']
    assert len(r['runs']) == 3
    for key, run in r['runs'].items():
        assert _finite(run['val_loss'])
        probe = run['probe']
        assert probe and probe[0]['step'] == 0 and probe[-1]['step'] == run['spec']['steps'] - 1
        layers = run['spec']['layers']
        for row in probe:
            assert len(row['attn']) == len(row['mlp']) == len(row['grad']) == len(row['w_attn']) == layers
            assert all(_finite(v) and v >= 0 for v in row['attn'] + row['mlp'] + row['grad'] + row['w_mlp'])
    assert (outputs / 'quality_postln_diagnostics.png').stat().st_size > 0


def test_investigation_smoke(outputs):
    r = json.loads((outputs / 'investigation.json').read_text())
    q = json.loads((outputs / 'quality.json').read_text())
    assert r['benchmark'] == 'quality-investigation' and r['mode'] == 'smoke'
    # every planned pair ran (or was reused) and is summarised with finite numbers
    assert len(r['summary']) == len(r['pairs']) == 3  # reference (1 seed) + 2x steps (2 seeds)
    for row in r['summary']:
        for k in ('baseline_val_loss', 'linear_val_loss', 'delta', 'steps_per_layer'):
            assert _finite(row[k]), (row['factor'], k)
        assert row['delta'] == row['linear_val_loss'] - row['baseline_val_loss']
    ref, longer, longer_s1 = r['summary']
    assert (longer['seed'], longer_s1['seed']) == (0, 1) and longer_s1['baseline_val_loss'] != longer['baseline_val_loss']
    agg = {(a['factor'], a['norm']): a for a in r['aggregate']}
    a = agg[(longer['factor'], 'post')]
    assert a['n'] == 2 and a['wins'] == sum(x['delta'] < 0 for x in (longer, longer_s1))
    assert math.isclose(a['delta_mean'], (longer['delta'] + longer_s1['delta']) / 2, rel_tol=1e-12)
    assert ref['factor'] == 'reference' and longer['steps'] == 2 * ref['steps']
    assert longer['steps_per_layer'] == 2 * ref['steps_per_layer']
    # the reference pair has the main table's specs, so its runs are reused from quality.json, not rerun
    for key in (ref['baseline'], ref['linear']):
        assert key in r['reused']
        assert r['runs'][key]['val_loss'] == next(x['val_loss'] for x in q['runs'].values()
                                                  if x['spec'] == r['runs'][key]['spec'])
    assert longer['baseline'] not in r['reused'] and len(r['runs'][longer['linear']]['curve']) == longer['steps']
    assert (outputs / 'quality_investigation.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_report_renders(outputs):
    sys.path.insert(0, str(ROOT / 'benchmarks'))
    import report  # in-process: no second interpreter start-up
    out = outputs / 'RESULTS.md'
    report.main(['--overhead', str(outputs / 'overhead.json'), '--quality', str(outputs / 'quality.json'),
                 '--out', str(out)])
    text = out.read_text()
    for heading in ('## 1. Overhead', '## 2. Quality', '### 2.1 Main table', '### 2.5 Diagnostics',
                    '### 2.6 One factor at a time', '## 3. Comparison with the paper'):
        assert heading in text
    assert not re.search(r'\bnan\b', text, re.IGNORECASE)


def test_report_rebuilds_a_missing_investigation_aggregate(outputs):
    # a partial investigation.json from before every write carried `aggregate` renders the same prose
    sys.path.insert(0, str(ROOT / 'benchmarks'))
    import report
    inv = json.loads((outputs / 'investigation.json').read_text())
    with_agg = report.investigation_section(inv, None)
    del inv['aggregate']
    assert report.investigation_section(inv, None) == with_agg
