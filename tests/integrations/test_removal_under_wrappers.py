"""ProRes removing itself (every α = 1) under a wrapper, on a model with NO buffers of its own.

torch 2.7's DDP records the module's buffers when it wraps it (`_assign_modules_buffers`, from
`_build_params_for_reducer`). Before every forward it checks `will_sync_module_buffers()` against that
recorded list, then `_sync_buffers()` re-reads `named_buffers()` and broadcasts what it finds. Were
ProRes' α buffers the only buffers and deleted at removal, DDP would broadcast an empty list:
`RuntimeError: !tensors.empty() INTERNAL ASSERT FAILED at .../c10d/reducer.cpp:2138`. Removal therefore
leaves each α buffer in place as an inert 1.0 (no hook reads it), so the buffer set never changes.

The model here (tests/support/removal_driver.py's PlainLM) is a tiny decoder with learned positions and no
buffers, like llm-foundry's MPT. Real 2-process runs (gloo, CPU): Composer DDP and FSDP2 under
`composer -n 2` (straight run == run resumed from a checkpoint saved after the removal, bitwise),
`apply_prores` + raw torch DDP (removal, `fold_prores` mid-run, re-apply, attach after wrapping),
the HF Trainer callback and DeepSpeed ZeRO-3 under torchrun. Plus an in-process 1-rank DDP check of
what removal leaves behind (the 1-rank DDP hit the same assert).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from prores_algo import alpha_schedules, apply_prores
from prores_algo.export import fold_prores
from prores_algo.surgery import ALPHA_BUFFER, has_prores_hook
from tests.support.helpers import composer_launch, env_without_dist, free_port
from tests.support.removal_driver import LAYERS, STEPS, T_WARMUP, batches, fresh_model, lm_loss

pytestmark = pytest.mark.filterwarnings('ignore:ProRes t_warmup')  # W = 4 steps is short on purpose

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / 'tests' / 'support' / 'removal_driver.py'
BIN = Path(sys.executable).parent


def _env() -> dict:
    env = env_without_dist()
    env.update(
        OMP_NUM_THREADS='1',
        MKL_NUM_THREADS='1',
        PYTHONPATH=os.pathsep.join(p for p in (env.get('PYTHONPATH'), str(ROOT)) if p),
    )
    return env


def _launch(mode: str, out: Path, *extra: str, launcher: str = 'torchrun') -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    if launcher == 'composer':
        cmd = composer_launch(2, out, str(DRIVER), mode, str(out), *extra)
    else:
        cmd = [
            str(BIN / 'torchrun'),
            '--nproc_per_node=2',
            '--nnodes=1',
            '--master_addr=127.0.0.1',
            f'--master_port={free_port()}',
            str(DRIVER),
            mode,
            str(out),
            *extra,
        ]
    proc = subprocess.run(cmd, cwd=out, env=_env(), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        logs = ''.join(f'\n--- {f.name}:\n{f.read_text()[-3000:]}' for f in sorted(out.glob('std*.txt')))
        pytest.fail(f'{mode} run failed (exit {proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}{logs}')
    return [json.loads((out / f'{mode}_rank{r}.json').read_text()) for r in (0, 1)]


def _inert(alphas: dict) -> bool:
    """Every α buffer is still there (2 per layer) and is the constant 1.0 that removal leaves."""
    return len(alphas) == 2 * LAYERS and all(v == 1.0 for v in alphas.values())


# ------------------------------------------------------------------------------------- Composer, 2 ranks
@pytest.mark.slow
@pytest.mark.parametrize('kind', ['ddp', 'fsdp2'])
def test_composer_removal_mid_run_finishes_and_resume_after_removal_is_exact(kind, tmp_path):
    ranks = _launch('composer', tmp_path, *(['fsdp2'] if kind == 'fsdp2' else []), launcher='composer')
    for r in ranks:
        straight, resumed = r['straight'], r['resumed']
        assert straight['wrapper'] == ('DistributedDataParallel' if kind == 'ddp' else 'FSDP2')
        assert sorted(map(int, straight['seen'])) == list(range(STEPS))
        for b, (alphas, hooks) in straight['seen'].items():
            b = int(b)
            expected = alpha_schedules.alphas('linear', LAYERS, b, T_WARMUP)
            assert len(alphas) == 2 * LAYERS, (b, alphas)
            for path, value in alphas.items():
                layer = int(path.split('blocks.')[1].split('.')[0])
                assert value == pytest.approx(expected[layer]), (b, path)
            assert hooks == (2 * LAYERS if b < T_WARMUP else 0), (b, hooks)  # removed at batch T_WARMUP
        assert sorted(map(int, resumed['seen'])) == [6, 7]  # resumed from the ba6 checkpoint (after removal)
        for run in (straight, resumed):
            assert run['removed'] and run['hooks_end'] == 0 and _inert(run['alphas_end'])
            assert not any(ALPHA_BUFFER in k for k in run['state_dict_keys'])
        assert straight['state_dict_keys'] == resumed['state_dict_keys']
        assert straight['params'] == resumed['params'], 'resumed run must end bitwise equal to the straight one'
    assert ranks[0]['straight']['params'] == ranks[1]['straight']['params']


# ------------------------------------------------------------------------------------- functional API, raw DDP
@pytest.mark.slow
def test_functional_api_under_raw_ddp_removal_fold_reapply_and_attach_after_wrap(tmp_path):
    ranks = _launch('ddp', tmp_path)
    for r in ranks:
        assert r['removal']['removed'] and r['removal']['hooks_end'] == 0 and _inert(r['removal']['alphas_end'])
        assert len(r['removal']['losses']) == STEPS
        assert len(r['fold']['losses']) == 4 and r['fold']['hooks_end'] == 0 and _inert(r['fold']['alphas_end'])
        assert r['reapply']['removed'] and len(r['reapply']['losses']) == 4 and _inert(r['reapply']['alphas_end'])
        assert r['attach_after_wrap']['removed'] and len(r['attach_after_wrap']['losses']) == STEPS
    assert ranks[0]['params'] == ranks[1]['params'], 'DDP replicas must stay identical'
    # rank 0 sees the same batches in the first run and after attaching after wrapping: same losses
    assert ranks[0]['removal']['losses'] == ranks[0]['attach_after_wrap']['losses']


# ------------------------------------------------------------------------------------- HF Trainer callback
@pytest.mark.slow
def test_hf_trainer_callback_removal_under_a_ddp_that_saw_alpha(tmp_path):
    ranks = _launch('hf', tmp_path)
    for r in ranks:
        assert r['wrapper'] == r['second_wrapper'] == 'DistributedDataParallel'
        assert r['kept_after_first'] and r['new_wrapper'], 'the second Trainer must wrap the hooked model anew'
        assert r['removed'] and r['step'] == STEPS and r['hooks_end'] == 0 and _inert(r['alphas_end'])
    assert ranks[0]['params'] == ranks[1]['params']


# ------------------------------------------------------------------------------------- DeepSpeed ZeRO-3
@pytest.mark.slow
def test_deepspeed_zero3_removal_on_buffer_free_model(tmp_path):
    pytest.importorskip('deepspeed')
    ranks = _launch('deepspeed', tmp_path)
    for r in ranks:
        assert r['removed'] and r['hooks_end'] == 0 and _inert(r['alphas_end']) and len(r['losses']) == STEPS


# ------------------------------------------------------------------------------------- in process, 1-rank DDP
@pytest.fixture
def one_rank_group(tmp_path):
    if dist.is_initialized():
        pytest.skip('a process group already exists in this process')
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _step(ddp, ids, opt=None):
    loss = lm_loss(ddp(ids), ids)
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad()
    return loss


def test_removal_keeps_the_buffer_set_a_ddp_wrapper_recorded(one_rank_group):
    model = fresh_model()
    controller = apply_prores(model, t_warmup=T_WARMUP)
    ddp = DDP(model)  # records the 6 α buffers: from now on it broadcasts buffers before every forward
    before = {n: b for n, b in model.named_buffers()}
    assert len(before) == 2 * LAYERS
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for t, ids in enumerate(batches(STEPS, 0)):
        controller.set_step(t)
        _step(ddp, ids, opt)  # t = T_WARMUP: would crash if removal deleted the buffers
    assert controller.removed and controller.num_hooks == 0
    after = {n: b for n, b in model.named_buffers()}
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before), 'same buffer objects'
    assert all(b.dtype == torch.float32 and float(b) == 1.0 for b in after.values())
    assert not any(has_prores_hook(m) or m._forward_hooks for m in model.modules()), 'no hook may run'
    # bitwise the un-scaled model, and the same state_dict keys as a model ProRes never touched
    plain = fresh_model()
    assert model.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(model.state_dict())
    ids = batches(1, 5)[0]
    with torch.no_grad():
        assert torch.equal(ddp(ids), plain(ids))

    # applying ProRes again reuses the inert buffers (the wrapper still sees the same ones) and removes again
    again = apply_prores(model, t_warmup=2)
    assert {n: b for n, b in model.named_buffers()}.keys() == before.keys()
    assert all(b is before[n] for n, b in model.named_buffers())
    assert all(float(b) == 0.0 for b in before.values()) and again.num_hooks == 2 * LAYERS
    for t, ids in enumerate(batches(3, 1)):
        again.set_step(t)
        _step(ddp, ids, opt)
    assert again.removed and all(float(b) == 1.0 for b in before.values())


def test_fold_mid_run_and_attach_after_wrap_under_ddp(one_rank_group):
    # fold_prores in the middle of warmup, training goes on under the same wrapper
    model = fresh_model()
    controller = apply_prores(model, t_warmup=T_WARMUP)
    ddp = DDP(model)
    controller.set_step(1)
    ids = batches(1, 0)[0]
    with torch.no_grad():  # the inner model: a no-grad DDP forward would skip DDP's next buffer sync
        hooked_out = model(ids)
    fold_prores(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hooked_out, rtol=1e-5, atol=1e-5)
    _step(ddp, ids)  # would crash here if fold deleted the only buffers DDP recorded
    _step(ddp, ids)
    assert not any(has_prores_hook(m) for m in model.modules())
    assert len(dict(model.named_buffers())) == 2 * LAYERS  # inert, so the wrapper keeps finding them

    # ProRes attached after DDP wrapped a buffer-free model: DDP recorded no buffer and never syncs one
    model = fresh_model()
    ddp = DDP(model)
    controller = apply_prores(ddp.module, t_warmup=2)
    for t, ids in enumerate(batches(4, 0)):
        controller.set_step(t)
        _step(ddp, ids)
    assert controller.removed


def test_fsdp1_full_precision_eval_after_removal(one_rank_group, monkeypatch):
    """FSDP1 records the buffers' dtypes by name at wrap time and, when it forces full precision (eval with
    FSDP_USE_FULL_PREC_IN_EVAL, or a forward under summon_full_params), zips the module's buffers against
    that list: deleting the α buffers failed its `len(buffers) == len(buffer_dtypes)` assert (here 0 vs 6;
    a model with buffers of its own failed the same way)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import MixedPrecision

    monkeypatch.setenv('FSDP_USE_FULL_PREC_IN_EVAL', '1')  # read when FSDP builds its flat-param handle
    model = fresh_model()
    controller = apply_prores(model, t_warmup=2)
    fsdp = FSDP(
        model,
        device_id=torch.device('cpu'),
        mixed_precision=MixedPrecision(param_dtype=torch.bfloat16, buffer_dtype=torch.bfloat16),
    )
    for t, ids in enumerate(batches(4, 0)):
        controller.set_step(t)
        fsdp.train()
        _step(fsdp, ids)
        fsdp.eval()
        with torch.no_grad():
            fsdp(ids)
    assert controller.removed and not any(has_prores_hook(m) for m in model.modules())
    assert len(dict(model.named_buffers())) == 2 * LAYERS
