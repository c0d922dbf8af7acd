"""The benchmarks' smallest configurations run end to end (so they cannot rot) and write the JSON that
benchmarks/report.py reads, with finite numbers where numbers are promised."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
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
    _run(['-m', 'benchmarks.overhead', '--smoke', '--out', str(d / 'overhead.json')])
    _run(
        ['-m', 'benchmarks.quality', '--smoke', '--out', str(d / 'quality.json'), '--data', str(d / 'data')],
        timeout=300,
    )
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
    assert set(r['studies']) == {'spl', 'depth', 'ablation'}
    assert set(r['runs']) == set(r['planned'])
    for key, run in r['runs'].items():
        spec = run['spec']
        assert 'error' not in run, (key, run.get('error'))
        assert _finite(run['val_loss']) and _finite(run['wall_s'])
        assert run['curve'] and all(_finite(v) for v in run['curve'])
        assert isinstance(run['spikes'], int) and isinstance(run['stalled'], bool)
        assert run['stalled'] == (run['val_loss'] >= r['config']['unigram_level'] - r['config']['stall_margin'])
        assert len(run['position_cosine']) == spec['layers'] and all(-1 <= c <= 1 for c in run['position_cosine'])
        if spec['variant'] != 'baseline':
            # W = steps per layer x layers, and the α logged during the run is the schedule's, exactly
            assert spec['t_warmup'] == round(spec['spl'] * spec['layers'])
            if spec['study'] != 'depth':  # depth: the same steps for every depth (the paper's depth scaling)
                assert spec['steps'] == round(spec['t_warmup'] / r['config']['w_fraction'])
            else:
                assert spec['steps'] == r['config']['depth_steps']
            assert run['alpha_max_abs_err'] < 1e-6
    # every spl point of both norms has its paired baseline/ProRes runs
    for norm in ('pre', 'post'):
        for spl in r['config']['spl']:
            assert r['summary']['spl'][norm][str(spl)]['n_pairs'] == len(r['config']['seeds'])
    assert set(r['figures']) == {'quality_steps_per_layer.png', 'quality_depth.png', 'quality_ablation.png'} or set(
        r['figures']
    ) >= {'quality_steps_per_layer.png', 'quality_ablation.png'}
    for fig in r['figures']:
        assert (outputs / fig).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_paired_summary_counts_stalls_apart():
    from benchmarks import quality

    def run(seed, variant, loss, stalled=False):
        return {
            'spec': {'seed': seed, 'variant': variant},
            'val_loss': loss,
            'stalled': stalled,
            'diverged': False,
            'spikes': 0,
        }

    pairs = [
        (run(0, 'baseline', 2.0), run(0, 'linear', 1.9)),
        (run(1, 'baseline', 2.1), run(1, 'linear', 2.15)),
        (run(2, 'baseline', 2.0), run(2, 'linear', 3.1, stalled=True)),
    ]
    p = quality.paired(pairs)
    assert p['n_pairs'] == 3 and p['n'] == 2 and p['stalled_prores'] == 1 and p['wins'] == 1
    assert math.isclose(p['delta_mean'], (-0.1 + 0.05) / 2)
    assert math.isclose(p['delta_se'], abs(-0.1 - 0.05) / math.sqrt(2) / math.sqrt(2))
    assert quality.ahead_from(
        {
            'pre': {
                '3': {**p, 'delta_mean': 0.1, 'n_pairs': 3},
                '12': {**p, 'delta_mean': -0.1, 'stalled_prores': 0, 'n_pairs': 3},
                '25': {**p, 'delta_mean': -0.2, 'stalled_prores': 0, 'n_pairs': 3},
            }
        }
    ) == {'pre': 12.0}


def test_report_fills_only_the_generated_blocks(outputs):
    from benchmarks import report

    names = sorted(report.GENERATORS)
    template = 'Hand-written prose.\n\n' + '\n\n'.join(
        f'<!-- BEGIN generated:{n} -->\nold\n<!-- END generated:{n} -->\nprose after {n}' for n in names
    )
    md = outputs / 'RESULTS.md'
    md.write_text(template)
    args = ['--overhead', str(outputs / 'overhead.json'), '--quality', str(outputs / 'quality.json'), '--out', str(md)]
    text = report.main(args)
    assert text.startswith('Hand-written prose.') and '\nold\n' not in text
    for n in names:
        assert f'prose after {n}' in text
    assert '| Pre-LN |' in text and '| Post-LN |' in text
    assert not re.search(r'\bnan\b', text, re.IGNORECASE)
    report.main(args + ['--check'])  # up to date now
    md.write_text(template)
    with pytest.raises(SystemExit):
        report.main(args + ['--check'])


def test_committed_results_md_is_up_to_date():
    """The tables in benchmarks/RESULTS.md are the ones the committed JSON gives."""
    from benchmarks import report

    report.main(['--check'])


def test_sharded_memory_smoke(tmp_path):
    """2-process FSDP2 and ZeRO-3 runs: neither ProRes mechanism moves a step's peak memory (a mechanism
    that kept a gathered weight alive until the backward would)."""
    out = tmp_path / 'sharded_memory.json'
    _run(['-m', 'benchmarks.sharded_memory', '--smoke', '--out', str(out)], timeout=600)
    r = json.loads(out.read_text())
    assert set(r['stacks']) == {'fsdp2', 'zero3'}
    for stack, s in r['stacks'].items():
        for rank in s['per_rank']:
            assert rank['off']['peak_above_start_bytes'] > 0
            for v in ('hook', 'gemm'):
                assert rank[v]['alphas'] == [0.5, 0.25]  # mid-warmup: every branch really scaled
        assert s['within_target'], (stack, s['max_ratio_vs_off'])
