"""DeepSpeed path: the public helper (prores_algo.integrations.deepspeed) and the thin loop (prores_algo.training.deepspeed.loop).

The distributed tests are real: `torchrun --nproc_per_node 2` processes running DeepSpeed ZeRO-3 on CPU
(gloo, OMP_NUM_THREADS=1). Six launches in all: four of a few seconds of training on a tiny decoder
(4 layers, d_model 32, seq 16, 8 optimizer steps), one that builds the decoder under zero.Init for
every norm placement, and a DeepNorm CLI run under zero.Init; most of their wall time is interpreter +
DeepSpeed start-up. The first DeepSpeed launch on a machine JIT-builds DeepSpeed's small shm-comm C++ op (about
1.5 minutes, cached under ~/.cache/torch_extensions afterwards), hence the generous timeouts.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from prores_algo import alpha_schedules
from prores_algo.integrations.deepspeed import (
    CLIENT_STATE_KEY,
    SIDECAR_FILE,
    DeepSpeedProRes,
    apply_prores,
    build_lr_scheduler,
    check_deepspeed_config,
    load_checkpoint,
    lr_lambda_from,
    lr_scheduler_factory,
    save_checkpoint,
)
from prores_algo.lr_schedules import delayed_time, wsd_multiplier
from prores_algo.training.models.decoder import Decoder, DecoderConfig
from tests.support.helpers import DIST_ENV, env_without_dist, free_port

ROOT = Path(__file__).resolve().parents[2]
ZERO3_JSON = ROOT / 'yamls' / 'deepspeed' / 'zero3.json'
TORCHRUN = Path(sys.executable).parent / 'torchrun'
STEPS, T_WARMUP, N_LAYERS = 8, 8, 4
TINY = [
    '--n_layers',
    str(N_LAYERS),
    '--d_model',
    '32',
    '--n_heads',
    '4',
    '--seq_len',
    '16',
    '--vocab_size',
    '64',
    '--steps',
    str(STEPS),
    '--prores_warmup',
    str(T_WARMUP),
    '--lr',
    '1e-2',
    '--lr_warmup',
    '1',
    '--eval_samples',
    '16',
    '--seed',
    '0',
]


def _launch(nproc: int, args: list[str], timeout: float = 600, module: str = 'prores_algo.training.deepspeed.loop'):
    """`torchrun --nproc_per_node nproc -m module args` from the repo root (a CompletedProcess)."""
    env = env_without_dist()
    env.update(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONPATH=str(ROOT) + os.pathsep + env.get('PYTHONPATH', ''))
    cmd = [
        str(TORCHRUN),
        f'--nproc_per_node={nproc}',
        '--nnodes=1',
        '--master_addr=127.0.0.1',
        f'--master_port={free_port()}',
        '-m',
        module,
        *args,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f'exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-8000:]}'
    )


def _summaries(pattern: Path, nproc: int) -> list[dict]:
    return [json.loads(Path(str(pattern).format(rank=r)).read_text()) for r in range(nproc)]


# ---------------------------------------------------------------------------------------------------
# Real 2-process ZeRO-3 runs (module-scoped: launched once, checked by several tests)
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def run_a(tmp_path_factory):
    """Uninterrupted 2-process ZeRO-3 run with the shipped JSON (micro 2 x accum 2 x 2 ranks = 8),
    model built under zero.Init, checkpoints at steps 4 and 8."""
    d = tmp_path_factory.mktemp('ds_a')
    proc = _launch(
        2,
        [
            '--deepspeed_config',
            str(ZERO3_JSON),
            *TINY,
            '--save_dir',
            str(d / 'ckpt'),
            '--save_interval',
            '4',
            '--require_stage3',
            '--summary',
            str(d / 'summary_{rank}.json'),
        ],
    )
    _ok(proc)
    return SimpleNamespace(
        dir=d, ckpt=d / 'ckpt', ranks=_summaries(d / 'summary_{rank}.json', 2), stdout=proc.stdout, stderr=proc.stderr
    )


def test_zero3_partitions_parameters(run_a):
    for s in run_a.ranks:
        assert s['zero_stage'] == 3 and s['zero_init'] and s['world_size'] == 2
        p = s['partition_init']
        assert p['zero3']
        # Each rank stores about half of every parameter (ceil(numel / 2): at most 1 padding element
        # per parameter), and, outside a gather, no parameter is materialised at all.
        assert p['total_numel'] == 69920
        assert 0 <= 2 * p['local_numel'] - p['total_numel'] <= p['num_params']
        assert p['visible_numel'] == 0
        # ... and so does the fp32 optimizer partition (AdamW states are per partition).
        assert p['optimizer_fp32_numel'] == p['local_numel']
        assert s['partition_end']['local_numel'] == p['local_numel']


def test_zero3_alpha_identical_on_ranks_and_equal_to_schedule(run_a):
    r0, r1 = run_a.ranks
    assert r0['steps'] == r1['steps'] == list(range(STEPS))
    assert r0['alphas'] == r1['alphas']
    for t, alphas in zip(r0['steps'], r0['alphas'], strict=True):
        assert alphas == alpha_schedules.alphas('linear', N_LAYERS, t, T_WARMUP)  # exact: same float computation
    # the buffers inside the ZeRO-3 (zero.Init-built) model hold the α of the last step, on both ranks
    for s in (r0, r1):
        bufs = s['alpha_buffers_end']
        assert len(bufs) == 2 * N_LAYERS
        for name, value in bufs.items():
            layer = int(name.split('.')[1])
            assert value == pytest.approx(r0['alphas'][-1][layer], abs=1e-7)  # stored as fp32
    assert r0['prores'] == {
        'enabled': True,
        'schedule': 'linear',
        't_warmup': float(T_WARMUP),
        'num_layers': N_LAYERS,
        'time_unit': 'steps',
        'layer_class': None,
        'branches': None,
        'layer_pattern': None,
    }


def test_zero3_measures_the_first_batch_on_every_rank(run_a):
    """measure_init (on by default) on a fresh ZeRO-3 run built under zero.Init: every rank runs the
    measuring forward in step (it gathers the partitioned weights), the ratio is averaged over the ranks,
    and the advice is for that regime: 4 Pre-LN layers 32 wide, W / L = 2, short in any regime."""
    m0, m1 = (r['init_measure'] for r in run_a.ranks)
    assert m0 == m1 and m0['normalised_stream'] is False and 0 < m0['ratio'] < 10
    assert f'prores: branches start at {m0["ratio"]:.3g} of the residual stream' in run_a.stdout
    short = [ln for ln in run_a.stderr.splitlines() if 'steps of alpha warmup per layer' in ln]
    assert short and all('branches start at' in ln for ln in short)  # the measured advice, not the generic one


def test_zero3_loss_falls_and_is_logged(run_a):
    r0, r1 = run_a.ranks
    assert r0['losses'] == r1['losses']  # all-reduced mean over ranks
    losses = r0['losses']
    assert all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(64), abs=0.05)  # ~uniform at init
    assert losses[-1] < losses[0] - 0.3, losses
    assert r0['final_eval_loss'] < losses[0] - 0.3
    assert r0['final_perplexity'] == pytest.approx(math.exp(r0['final_eval_loss']))
    assert r0['lrs'][0] == 0.0 and r0['lrs'][1] == pytest.approx(1e-2)  # WSD: warmup of 1 step, decay last 10%
    lines = [ln for ln in run_a.stdout.splitlines() if ln.startswith('step ')]
    assert len(lines) == STEPS and 'loss' in lines[0] and 'lr' in lines[0] and 'prores/alpha/mean' in lines[0]
    assert (run_a.ckpt / 'global_step4' / SIDECAR_FILE).is_file()


@pytest.mark.slow
def test_zero3_resume_matches_uninterrupted(run_a, tmp_path):
    """Save at step 4 -> new processes load it -> steps 4..7 reproduce the uninterrupted run exactly.

    Exact equality is expected and required: same world size, same fp32 CPU kernels, same gloo
    reduction order, restored fp32 master partitions + Adam moments + LR scheduler step, α recomputed
    from the restored engine.global_steps, and the data position restored by skipping consumed batches.
    """
    proc = _launch(
        2,
        [
            '--deepspeed_config',
            str(ZERO3_JSON),
            *TINY,
            '--load_dir',
            str(run_a.ckpt),
            '--load_tag',
            'global_step4',
            '--summary',
            str(tmp_path / 'summary_{rank}.json'),
        ],
    )
    _ok(proc)
    b = _summaries(tmp_path / 'summary_{rank}.json', 2)
    a = run_a.ranks[0]
    for s in b:
        assert s['start_step'] == 4 and s['resumed_from']
        assert s['steps'] == a['steps'][4:]
        assert s['alphas'] == a['alphas'][4:]
        assert s['lrs'] == a['lrs'][4:]
        assert s['losses'] == a['losses'][4:]
        assert s['final_eval_loss'] == a['final_eval_loss']


def test_zero3_resume_with_different_prores_config_fails(run_a, no_dist_env):
    """ds_train refuses the 2-process run's checkpoint under another ProRes configuration, before it
    builds a model or a process group (so in-process here); the engine-level guard is tested below."""
    from prores_algo.training.deepspeed.loop import train

    base = {
        'deepspeed_config': str(ZERO3_JSON),
        'n_layers': N_LAYERS,
        'd_model': 32,
        'seq_len': 16,
        'vocab_size': 64,
        'steps': STEPS,
        'load_dir': str(run_a.ckpt),
    }
    with pytest.raises(ValueError, match='different ProRes configuration') as info:
        train({**base, 't_warmup': 16})
    assert "'t_warmup'" in str(info.value) and 't_warmup=8.0' in str(info.value) and 't_warmup=16.0' in str(info.value)
    with pytest.raises(ValueError, match=r"\['schedule'\]"):
        train({**base, 't_warmup': T_WARMUP, 'schedule': 'linear_square', 'load_tag': 'global_step4'})
    with pytest.raises(ValueError, match='ProRes off'):
        train({**base, 'prores': False})
    with pytest.raises(ValueError, match=r"'num_layers'"):
        train({**base, 't_warmup': T_WARMUP, 'n_layers': 6})


@pytest.mark.slow
def test_single_vs_two_process_zero3(run_a, tmp_path):
    """One process with micro 4 x accum 2 sees the same global batch per step as 2 x (micro 2 x accum 2)
    (DistributedSampler interleaves one permutation over ranks), and is built without zero.Init.

    Tolerances: step 0 is a forward on identical weights (zero.Init reproduces the plain build
    bitwise), differing only in how per-sample losses are grouped into means (4+4 vs 2+2+2+2, then a gloo
    all-reduce): fp32 rounding, a few 1e-8 relative (one ulp of 4.16 is 1.1e-7 relative); rel 1e-6
    allows ~10 ulps. Later steps also see gradients reduced in a different order (DeepSpeed's
    reduce-scatter over gloo vs a local sum), last-bit noise that Adam passes on: measured <= 7e-8
    relative over the 8 steps; rel 1e-5 leaves >100x margin, while dropping ProRes moves the losses by
    2e-5 at step 1 and 3e-3..7e-3 afterwards (and a wrong batch or LR by more), so steps 1..7 also show
    the hooks act identically on the zero.Init-built model (intermediate α there; α = 0 at step 0).
    """
    cfg = json.loads(ZERO3_JSON.read_text())
    cfg['train_micro_batch_size_per_gpu'] = 4
    path = tmp_path / 'zero3_single.json'
    path.write_text(json.dumps(cfg))
    proc = _launch(
        1,
        ['--deepspeed_config', str(path), *TINY, '--no_zero_init', '--summary', str(tmp_path / 'summary_{rank}.json')],
    )
    _ok(proc)
    (one,) = _summaries(tmp_path / 'summary_{rank}.json', 1)
    two = run_a.ranks[0]
    assert one['world_size'] == 1 and one['train_batch_size'] == two['train_batch_size'] == 8
    assert not one['zero_init'] and one['partition_init']['zero3']  # stage 3, built without zero.Init
    assert one['alphas'] == two['alphas']
    assert one['losses'][0] == pytest.approx(two['losses'][0], rel=1e-6, abs=0)
    assert one['losses'] == pytest.approx(two['losses'], rel=1e-5, abs=0)
    assert one['final_eval_loss'] == pytest.approx(two['final_eval_loss'], rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# Initialisation under zero.Init: every norm placement, DeepNorm's xavier init included
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_deepnorm_zero3_init_matches_plain_build(tmp_path):
    """One 2-process launch (tests/support/zero3_init_driver.py) builds the decoder under zero.Init for
    every placement, ProRes on and off, gathers its initial parameters and compares them bitwise with
    the same seed's build without ZeRO-3. DeepNorm without ProRes is the DeepNet (xavier) init, which
    failed on the partitioned (empty, 1-D) parameters before."""
    from prores_algo.training.models.decoder import NORM_PLACEMENTS

    out = tmp_path / 'init_{rank}.json'
    _ok(_launch(2, [str(out), str(ZERO3_JSON)], module='tests.support.zero3_init_driver'))
    for s in _summaries(out, 2):
        assert s['world_size'] == 2
        cases = {(c['norm'], c['prores']): c for c in s['cases']}
        assert set(cases) == {(n, p) for n in NORM_PLACEMENTS for p in (True, False)}
        for key, c in cases.items():
            assert c['partitioned'] and c['num_params'] > 0, key
            assert c['differ'] == [], key
        assert 'xavier' in cases['deepnorm', False]['kinds']  # the DeepNet init ran (plain DeepNorm)
        assert 'xavier' not in cases['deepnorm', True]['kinds']  # official: DeepNorm + ProRes is normal()


@pytest.mark.slow
def test_deepnorm_zero3_cli_runs(tmp_path):
    """A user's DeepNorm command (2 steps instead of 4): DeepNorm, ProRes off, model under zero.Init."""
    summary = tmp_path / 'summary_{rank}.json'
    args = ['--deepspeed_config', str(ZERO3_JSON), '--require_stage3', '--norm', 'deepnorm', '--no_prores']
    _ok(_launch(2, [*args, '--steps', '2', '--eval_samples', '8', '--summary', str(summary)]))
    for s in _summaries(summary, 2):
        assert s['zero_stage'] == 3 and s['zero_init'] and s['partition_init']['visible_numel'] == 0
        model = s['config']['model']
        assert model['norm'] == 'deepnorm' and model['deepnet_init'] and s['prores'] is None
        assert len(s['losses']) == 2 and all(math.isfinite(x) for x in s['losses'])


@pytest.mark.slow
def test_deepspeed_launcher_streams_the_data_on_two_processes(tmp_path):
    """`deepspeed --num_gpus 2 --module ...`, the launcher the docs name, on streaming MDS data. It sets
    LOCAL_SIZE, not the LOCAL_WORLD_SIZE streaming reads: without the translation in
    `process_group.init_distributed` streaming takes each rank for a node of its own and both register
    the same shared memory (the run hung on the machine lock, then failed)."""
    from prores_algo.training.data import write_mds

    write_mds('stdlib', tmp_path / 'data', seq_len=32, val_fraction=0.1, max_tokens=20_000, progress=False)
    env = env_without_dist()
    env.update(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONPATH=str(ROOT) + os.pathsep + env.get('PYTHONPATH', ''))
    summary = tmp_path / 'summary_{rank}.json'
    cmd = [str(TORCHRUN.parent / 'deepspeed'), '--num_gpus', '2', '--master_port', str(free_port())]
    cmd += ['--module', 'prores_algo.training.deepspeed.loop', '--config', str(ROOT / 'yamls' / 'quickstart.yaml')]
    cmd += ['--deepspeed_config', str(ZERO3_JSON), '--require_stage3', '--summary', str(summary)]
    cmd += [f'data.path={tmp_path / "data"}', 'data.source=null', 'data.seq_len=32', 'model.d_model=32']
    cmd += ['model.n_heads=4', 'model.n_layers=3', 'global_train_batch_size=8', 'algorithms.prores.t_warmup=8ba']
    cmd += ['max_duration=4ba', 'eval_interval=100ba']
    _ok(subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300))
    for s in _summaries(summary, 2):
        assert s['world_size'] == 2 and s['zero_stage'] == 3
        assert len(s['losses']) == 4 and all(math.isfinite(x) for x in s['losses'])


# ---------------------------------------------------------------------------------------------------
# ds_train config errors (raised before any process group exists: in-process and fast)
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def no_dist_env(monkeypatch):
    for k in DIST_ENV:
        monkeypatch.delenv(k, raising=False)


def test_ds_train_batch_conflict_raises(no_dist_env):
    from prores_algo.training.deepspeed.loop import train

    with pytest.raises(ValueError, match='train_micro_batch_size_per_gpu'):
        train({'deepspeed_config': str(ZERO3_JSON), 'micro_batch_size': 3})
    with pytest.raises(ValueError, match='gradient_accumulation_steps'):
        train({'deepspeed_config': str(ZERO3_JSON), 'grad_accum': 4})
    bad = {**json.loads(ZERO3_JSON.read_text()), 'train_batch_size': 6}
    with pytest.raises(ValueError, match='train_batch_size'):
        train({'deepspeed_config': bad})


def test_ds_train_stage3_required(no_dist_env):
    from prores_algo.training.deepspeed.loop import train

    cfg = json.loads(ZERO3_JSON.read_text())
    cfg['zero_optimization'] = {'stage': 2}
    with pytest.raises(ValueError, match=r'zero_optimization\.stage'):
        train({'deepspeed_config': cfg, 'require_stage3': True})


def test_ds_train_other_config_errors(no_dist_env):
    from prores_algo.training.deepspeed.loop import train

    cfg = {**json.loads(ZERO3_JSON.read_text()), 'scheduler': {'type': 'WarmupLR'}}
    with pytest.raises(ValueError, match='`scheduler`'):
        train({'deepspeed_config': cfg})
    cfg = {**json.loads(ZERO3_JSON.read_text()), 'optimizer': {'type': 'AdamW', 'params': {'lr': 1e-3}}}
    with pytest.raises(ValueError, match=r'optimizer\.params\.lr'):
        train({'deepspeed_config': cfg, 'lr': 2e-3})
    with pytest.raises(ValueError, match='unknown ds_train option'):
        train({'deepspeed_config': str(ZERO3_JSON), 'n_layer': 3})
    with pytest.raises(ValueError, match='unknown schedule'):
        train({'deepspeed_config': str(ZERO3_JSON), 'schedule': 'nope'})
    with pytest.raises(ValueError, match="unknown scheduler 'nope'"):
        train({'deepspeed_config': str(ZERO3_JSON), 'lr_schedule': 'nope'})


def test_shipped_zero3_json():
    cfg = json.loads(ZERO3_JSON.read_text())
    assert cfg['zero_optimization']['stage'] == 3
    assert cfg['gradient_clipping'] == 1.0
    assert cfg['bf16']['enabled'] is False
    assert 'optimizer' not in cfg and 'scheduler' not in cfg  # torch AdamW + LambdaLR are passed in
    out = check_deepspeed_config(cfg, world_size=2, require_stage3=True)
    assert out['train_batch_size'] == 2 * 2 * 2


# ---------------------------------------------------------------------------------------------------
# check_deepspeed_config
# ---------------------------------------------------------------------------------------------------
def test_check_config_fills_and_accepts():
    base = {'zero_optimization': {'stage': 3}}
    out = check_deepspeed_config(base, train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2, world_size=2)
    assert (out['train_micro_batch_size_per_gpu'], out['gradient_accumulation_steps'], out['train_batch_size']) == (
        4,
        2,
        16,
    )
    assert 'train_batch_size' not in base  # a copy
    auto = {'train_micro_batch_size_per_gpu': 'auto', 'gradient_accumulation_steps': 'auto', 'train_batch_size': 'auto'}
    out = check_deepspeed_config(auto, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=3, world_size=4)
    assert out['train_batch_size'] == 24
    out = check_deepspeed_config({'train_batch_size': 32, 'gradient_accumulation_steps': 2}, world_size=4)
    assert out['train_micro_batch_size_per_gpu'] == 4
    out = check_deepspeed_config({'train_batch_size': 32}, world_size=4)
    assert (out['train_micro_batch_size_per_gpu'], out['gradient_accumulation_steps']) == (8, 1)
    out = check_deepspeed_config({'train_micro_batch_size_per_gpu': 'auto'})
    assert 'train_micro_batch_size_per_gpu' not in out
    check_deepspeed_config(
        {
            'train_batch_size': 16,
            'train_micro_batch_size_per_gpu': 4,
            'gradient_accumulation_steps': 2,
            'zero_optimization': {'stage': 3},
        },
        world_size=2,
        require_stage3=True,
    )


def test_check_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r'`train_batch_size` = 12 .* = 16: set "train_batch_size": 16'):
        check_deepspeed_config(
            {'train_batch_size': 12, 'train_micro_batch_size_per_gpu': 4, 'gradient_accumulation_steps': 2},
            world_size=2,
        )
    with pytest.raises(ValueError, match=r'`gradient_accumulation_steps` = 2 but the training config asks for 4'):
        check_deepspeed_config({'gradient_accumulation_steps': 2}, gradient_accumulation_steps=4)
    with pytest.raises(ValueError, match=r'`train_micro_batch_size_per_gpu` = 8 .* asks for 2'):
        check_deepspeed_config({'train_micro_batch_size_per_gpu': 8}, train_micro_batch_size_per_gpu=2)
    with pytest.raises(ValueError, match='train_batch_size'):  # via the YAML values
        check_deepspeed_config(
            {'train_batch_size': 10}, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2, world_size=2
        )
    with pytest.raises(ValueError, match='not divisible'):
        check_deepspeed_config({'train_batch_size': 10, 'train_micro_batch_size_per_gpu': 4}, world_size=2)
    for stage_cfg in ({}, {'zero_optimization': {'stage': 2}}, {'zero_optimization': {'stage': 0}}):
        with pytest.raises(ValueError, match=r'`zero_optimization\.stage` = \d .*"stage": 3'):
            check_deepspeed_config(stage_cfg, require_stage3=True)
    check_deepspeed_config({'zero_optimization': {'stage': 2}})  # fine when stage 3 is not required
    with pytest.raises(ValueError, match='gradient_accumulation_steps'):
        check_deepspeed_config({'gradient_accumulation_steps': 0})
    with pytest.raises(ValueError, match='must be a dict'):
        check_deepspeed_config('zero3.json')


# ---------------------------------------------------------------------------------------------------
# LR schedules
# ---------------------------------------------------------------------------------------------------
def test_lr_lambda_wsd_matches_wsd_multiplier():
    f = lr_lambda_from('wsd', max_steps=100, lr_warmup=10, lr_decay='0.2dur', alpha_f=0.1)
    for t in range(0, 101):
        assert f(t) == wsd_multiplier(t, 100, 10, 20, 0.1)
    g = lr_lambda_from({'name': 'wsd', 'lr_warmup': '10ba', 'lr_decay': '20ba', 'alpha_f': 0.1}, max_steps=100)
    assert [g(t) for t in range(101)] == [f(t) for t in range(101)]


def test_lr_lambda_linear_cosine_constant():
    lin = lr_lambda_from('linear_decay_with_warmup', max_steps=110, lr_warmup=10, alpha_f=0.0)
    assert [lin(t) for t in (0, 5, 10, 60, 110)] == pytest.approx([0, 0.5, 1.0, 0.5, 0.0])
    cos = lr_lambda_from('cosine_with_warmup', max_steps=110, lr_warmup='10ba', alpha_f=0.2)
    assert [cos(t) for t in (0, 5, 10, 60, 110)] == pytest.approx([0, 0.5, 1.0, 0.6, 0.2])
    const = lr_lambda_from('constant_with_warmup', max_steps=50, lr_warmup=0)
    assert {const(t) for t in range(50)} == {1.0}


def test_lr_lambda_warmup_delay():
    M, W, D = 100, 10, 20
    plain = lr_lambda_from('cosine_with_warmup', max_steps=M, lr_warmup=W, alpha_f=0.1)
    f = lr_lambda_from('cosine_with_warmup', max_steps=M, lr_warmup=W, alpha_f=0.1, lr_warmup_delay=D)
    assert [f(t) for t in range(D + 1)] == [0.0] * (D + 1)  # held at the t = 0 value (0) during the delay
    assert [f(D + k) for k in range(W + 1)] == [plain(k) for k in range(W + 1)]  # full-length warmup from D
    assert f(M) == pytest.approx(plain(M))  # still ends at max_steps
    assert all(f(t) == plain(delayed_time(t, D, W, M)) for t in range(M + 1))
    with pytest.raises(ValueError, match='lr_warmup_delay'):
        lr_lambda_from('wsd', max_steps=100, lr_warmup=10, lr_warmup_delay='0.95dur')


def test_lr_lambda_errors_and_lambdalr():
    with pytest.raises(ValueError, match="unknown scheduler 'step'"):
        lr_lambda_from('step', max_steps=10)
    with pytest.raises(ValueError, match='tok'):
        lr_lambda_from('wsd', max_steps=10, lr_warmup='5e8tok')
    with pytest.raises(ValueError, match='warmup'):
        lr_lambda_from('wsd', max_steps=10, lr_warmup=8, lr_decay=5)
    with pytest.raises(ValueError, match="unknown key 'warmup'.*did you mean 'lr_warmup'"):
        lr_lambda_from({'name': 'wsd', 'warmup': 3}, max_steps=10)
    with pytest.raises(ValueError, match='lr_warmup'):
        lr_scheduler_factory('cosine_with_warmup', max_steps=10, lr_warmup=11)  # validated when the factory is made
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=2.0)
    sched = build_lr_scheduler(opt, 'wsd', max_steps=10, lr_warmup=4, lr_decay=2)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]['lr'])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.0 * wsd_multiplier(t, 10, 4, 2) for t in range(10)])
    # a plain function is not pickled into the scheduler's state: a resumed run uses its own schedule
    assert sched.state_dict()['lr_lambdas'] == [None]


# ---------------------------------------------------------------------------------------------------
# apply_prores + step(engine), checkpoint guard (single process, a stand-in engine)
# ---------------------------------------------------------------------------------------------------
class FakeEngine:
    """What the helpers use of a DeepSpeed engine: the clocks, `module`, save/load_checkpoint."""

    def __init__(self, module):
        self.module = module
        self.global_steps = 0
        self.global_samples = 0
        self.saved_client_state = None
        self.loads = 0

    def save_checkpoint(self, save_dir, tag=None, client_state=None, **kw):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        torch.save({'client_state': client_state, 'step': self.global_steps}, os.path.join(save_dir, tag, 'state.pt'))
        with open(os.path.join(save_dir, 'latest'), 'w') as f:
            f.write(tag)
        return True

    def load_checkpoint(self, load_dir, tag=None, **kw):
        self.loads += 1
        state = torch.load(os.path.join(load_dir, tag, 'state.pt'))
        self.global_steps = state['step']
        return os.path.join(load_dir, tag), state['client_state']


def _tiny_decoder(n_layers=4):
    torch.manual_seed(0)
    return Decoder(DecoderConfig(vocab_size=64, d_model=32, n_layers=n_layers, n_heads=4, max_seq_len=16))


def test_attach_prores_step_engine():
    model = _tiny_decoder()
    prores = apply_prores(model, 'linear', t_warmup=8)
    assert isinstance(prores, DeepSpeedProRes) and prores.num_layers == 4
    engine = FakeEngine(model)
    ids = torch.randint(0, 64, (2, 16))
    for t in range(10):
        engine.global_steps = t
        alphas = prores.step(engine)
        assert alphas == alpha_schedules.alphas('linear', 4, t, 8)
        if t < 8:
            bufs = [float(b) for n, b in model.named_buffers() if n.endswith('prores_alpha')]
            assert bufs == pytest.approx([a for a in alphas for _ in range(2)], abs=1e-7)
    assert prores.removed  # all α = 1 for good at t >= W: hooks gone
    assert not any(m._forward_hooks for m in model.modules())
    # the α buffers stay as inert 1.0 (no hook reads them), so the engine's module keeps the same buffers
    assert [float(b) for n, b in model.named_buffers() if n.endswith('prores_alpha')] == [1.0] * 8
    with torch.no_grad():
        ref = _tiny_decoder()(ids)
        assert torch.equal(model(ids), ref)
    # samples as the clock; an engine passed instead of the model; not an engine
    model2 = _tiny_decoder()
    p2 = apply_prores(FakeEngine(model2), 'equal', t_warmup=100, time_unit='samples')
    e2 = FakeEngine(model2)
    e2.global_steps, e2.global_samples = 3, 40
    assert p2.step(e2) == [0.4] * 4
    with pytest.raises(TypeError, match='global_steps'):
        prores.step(object())
    with pytest.raises(ValueError, match='time_unit'):
        apply_prores(_tiny_decoder(), time_unit='tokens')


def test_attach_prores_keeps_alpha_fp32():
    model = _tiny_decoder()
    prores = apply_prores(model, 'linear', t_warmup=1000)
    model.bfloat16()  # what older DeepSpeed releases did to the whole module under bf16
    engine = FakeEngine(model)
    engine.global_steps = 7
    alphas = prores.step(engine)
    bufs = [b for n, b in model.named_buffers() if n.endswith('prores_alpha')]
    assert all(b.dtype == torch.float32 for b in bufs)
    assert [float(b) for b in bufs[::2]] == pytest.approx(alphas, rel=1e-7)


def test_checkpoint_guard(tmp_path):
    model = _tiny_decoder()
    prores = apply_prores(model, 'linear', t_warmup=8)
    engine = FakeEngine(model)
    engine.global_steps = 3
    tag = save_checkpoint(engine, prores, str(tmp_path), tag='step3')
    assert tag == 'step3'
    sidecar = json.loads((tmp_path / 'step3' / SIDECAR_FILE).read_text())
    assert sidecar == {
        'enabled': True,
        'schedule': 'linear',
        't_warmup': 8.0,
        'num_layers': 4,
        'time_unit': 'steps',
        'layer_class': None,
        'branches': None,
        'layer_pattern': None,
    }

    # same configuration (alias spelling accepted): loads and sets α from the restored step
    model2 = _tiny_decoder()
    p2 = apply_prores(model2, 'linear', t_warmup=8.0)
    e2 = FakeEngine(model2)
    path, client_state = load_checkpoint(e2, p2, str(tmp_path))  # tag from `latest`
    assert client_state[CLIENT_STATE_KEY] == sidecar and e2.global_steps == 3
    assert p2.alphas == alpha_schedules.alphas('linear', 4, 3, 8)

    def refused(prores_b, model_b, *match):
        e = FakeEngine(model_b)
        with pytest.raises(ValueError) as info:
            load_checkpoint(e, prores_b, str(tmp_path), tag='step3')
        for m in match:
            assert m in str(info.value)
        assert e.loads == 0  # refused before anything was loaded

    m = _tiny_decoder()
    refused(apply_prores(m, 'linear', t_warmup=16), m, "'t_warmup'", 't_warmup=8.0', 't_warmup=16.0')
    m = _tiny_decoder()
    refused(apply_prores(m, 'linear_square', t_warmup=8), m, "'schedule'", "'linear_square'")
    m = _tiny_decoder(n_layers=6)
    refused(apply_prores(m, 'linear', t_warmup=8), m, "'num_layers'")
    refused(None, _tiny_decoder(), 'ProRes off')
    m = _tiny_decoder()
    refused(apply_prores(m, 'linear', t_warmup=8, time_unit='samples'), m, "'time_unit'")

    # a checkpoint saved without ProRes refuses a ProRes run, and vice versa
    engine.global_steps = 5
    save_checkpoint(engine, None, str(tmp_path), tag='plain')
    m = _tiny_decoder()
    with pytest.raises(ValueError, match='ProRes off'):
        load_checkpoint(FakeEngine(m), apply_prores(m, t_warmup=8), str(tmp_path), tag='plain')
    load_checkpoint(FakeEngine(_tiny_decoder()), None, str(tmp_path), tag='plain')

    # the client_state check also works without the sidecar file; strict=False skips a missing record
    (tmp_path / 'step3' / SIDECAR_FILE).unlink()
    m = _tiny_decoder()
    with pytest.raises(ValueError, match='t_warmup'):
        load_checkpoint(FakeEngine(m), apply_prores(m, t_warmup=9), str(tmp_path), tag='step3', strict=False)
    with pytest.raises(ValueError, match='records no ProRes configuration'):
        load_checkpoint(FakeEngine(m), None, str(tmp_path), tag='step3')
    with pytest.raises(FileNotFoundError, match='not found'):
        load_checkpoint(FakeEngine(m), None, str(tmp_path), tag='nope')
