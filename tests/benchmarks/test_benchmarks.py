"""The benchmarks' smallest configurations run end to end (so they cannot rot) and write the JSON that
benchmarks/report.py reads, with finite numbers where numbers are promised."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import quality

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
        timeout=600,
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
    assert set(r['studies']) == {'factor', 'depth', 'ablation'}
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
            # W = steps per layer x layers, the run 4 W long, and the α logged during the run is the schedule's
            assert spec['t_warmup'] == round(spec['spl'] * spec['layers'])
            assert spec['steps'] == round(spec['t_warmup'] / r['config']['w_fraction'])
            assert run['alpha_max_abs_err'] < 1e-6
    # every factor point of every initialisation and both norms has its paired baseline/ProRes runs
    for init in r['config']['inits']:
        for norm in ('pre', 'post'):
            for spl in r['config']['factor_spl']:
                assert r['summary']['factor'][init][norm][str(spl)]['n_pairs'] == len(r['config']['seeds'])
    # the depth study at every setting: a pair per seed at every depth, T = W / L fixed across depths
    assert [e['setting'] for e in r['summary']['depth'].values()] == r['config']['depth_settings']
    assert {e['setting']['norm'] for e in r['summary']['depth'].values()} == {'pre', 'post'}
    for entry in r['summary']['depth'].values():
        for d in r['config']['depths']:
            assert entry['layers'][str(d)]['n_pairs'] == len(r['config']['depth_seeds'])
    depth_runs = [r['runs'][k]['spec'] for k in r['studies']['depth']]
    assert {s['t_warmup'] / s['layers'] for s in depth_runs if s['variant'] != 'baseline'} == {2}
    # the branch-to-stream ratio of every initial model, measured before training
    bases = {quality.init_key(run['spec']) for run in r['runs'].values() if run['spec']['variant'] == 'baseline'}
    assert bases == set(r['init_ratios'])
    assert all(0 < v['min'] <= v['median'] <= v['max'] and _finite(v['max']) for v in r['init_ratios'].values())
    for fig in r['figures']:
        assert fig in {'quality_factors.png', 'quality_ratio.png', 'quality_depth.png', 'quality_ablation.png'}
        assert (outputs / fig).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_quality_initialisations_span_the_branch_ratio():
    """The factor study's initialisations start branches from small to large against the stream, and
    width768 is what its name says: std * sqrt(width) and the embedding std of a 768-wide model."""
    import torch

    from prores_algo.monitor import branch_to_stream_ratio
    from prores_algo.training.models import build_decoder

    w = quality.init_overrides('width768', 64)
    assert w['init_std'] * math.sqrt(64) == pytest.approx(0.02 * math.sqrt(768))
    assert w['embed_std'] == pytest.approx(0.02 * math.sqrt(768))
    ids = torch.randint(0, 257, (4, 128), generator=torch.Generator().manual_seed(0))
    med = {}
    for init in quality.INITS:
        torch.manual_seed(0)
        model = build_decoder(vocab_size=257, d_model=64, n_layers=8, n_heads=4, **quality.init_overrides(init, 64))
        med[init] = branch_to_stream_ratio(model, ids)['median']
    assert med['official'] < med['torch'] < med['width768'] < med['torch_small_embed']
    assert med['official'] < 0.05 and med['torch_small_embed'] > 0.3
    with pytest.raises(ValueError, match='unknown initialisation'):
        quality.init_overrides('xavier', 64)


def test_quality_resume_keeps_runs_from_before_init_was_a_factor():
    """A run recorded before `init` existed is the official initialisation and is not trained again."""
    m = quality.MODES['full']
    specs, _ = quality.plan(m)
    official = next(s for s in specs if s['init'] == 'official' and s['study'] == 'factor')
    old = {k: v for k, v in official.items() if k != 'init'}
    assert quality.same_run(official, {**old, 'study': 'spl'})
    assert not quality.same_run(official, {**old, 'init': 'torch'})
    assert quality.run_key(official) == quality.run_key(old)  # the official key is unchanged


def test_quality_smoke_and_quick_never_write_the_committed_study():
    assert quality.parse_args(['--smoke']).out != str(quality.RESULTS / 'quality.json')
    assert quality.parse_args(['--quick']).out != str(quality.RESULTS / 'quality.json')
    assert quality.parse_args([]).out == str(quality.RESULTS / 'quality.json')
    assert quality.parse_args(['--smoke', '--out', 'x.json']).out == 'x.json'


def test_paired_summary_counts_stalls_apart():
    def run(seed, variant, loss, stalled=False):
        return {
            'spec': {'seed': seed, 'variant': variant, 'norm': 'pre', 'layers': 8, 'd_model': 64},
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
    p = quality.paired(pairs, {'pre-L8-d64-official-s0': {'median': 0.04}})
    assert p['n_pairs'] == 3 and p['n'] == 2 and p['stalled_prores'] == 1 and p['wins'] == 1
    assert math.isclose(p['delta_mean'], (-0.1 + 0.05) / 2)
    assert math.isclose(p['delta_se'], abs(-0.1 - 0.05) / math.sqrt(2) / math.sqrt(2))
    assert p['init_ratio'] == [0.04, None] and p['verdict'] == 'too few seeds'
    ahead = {**p, 'verdict': 'ahead', 'stalled_prores': 0}
    assert quality.ahead_from(
        {'pre': {'3': {**p, 'verdict': 'behind'}, '12': ahead, '25': ahead}, 'post': {'25': {**p}}}
    ) == {'pre': 12.0, 'post': None}


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


def test_gpu_quality_smoke(tmp_path):
    """The GPU paired comparison end to end at its CPU smoke size: every run a process, paired by seed."""
    out = tmp_path / 'gpu_quality.json'
    _run(['-m', 'benchmarks.gpu_quality', '--smoke', '--out', str(out)], timeout=300)
    r = json.loads(out.read_text())
    assert set(r['runs']) == {'2-s0-baseline', '2-s0-prores', '2-s1-baseline', '2-s1-prores'}
    for run in r['runs'].values():
        assert run['finished'] and _finite(run['val_loss']) and run['steps'] == 16 and run['t_warmup'] == 4
    s = r['summary']['2']
    assert s['n'] == 2 and s['unfinished_pairs'] == 0 and s['verdict'] == 'too few seeds'
    by_seed = [r['runs'][f'2-s{i}-prores']['val_loss'] - r['runs'][f'2-s{i}-baseline']['val_loss'] for i in (0, 1)]
    assert s['per_seed'] == pytest.approx(by_seed)


def test_gpu_quality_lr_schedule_is_wsd():
    from benchmarks.gpu_quality import lr_at

    total, peak = 1000, 1.0
    assert lr_at(0, total, peak) == pytest.approx(1 / 20)  # 2% warmup: 20 steps
    assert lr_at(19, total, peak) == peak and lr_at(500, total, peak) == peak
    assert lr_at(900, total, peak) == pytest.approx(1.0) and lr_at(950, total, peak) == pytest.approx(0.5)
    assert lr_at(999, total, peak) == pytest.approx(0.01)
