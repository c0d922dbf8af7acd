"""Interrupted and long runs.

* Composer: a real 2-process run (`composer -n 2`, DDP over gloo, checkpoints every 3 batches,
  autoresume on, fixed run_name) is killed with SIGKILL, the whole process group at once, right after
  its first checkpoint appears. A kill in the middle of a later checkpoint write is reproduced on top
  (Composer writes checkpoint files in place, so a kill during `torch.save` leaves a partial file under
  the final name while `latest` still points at the previous one). The *same command* restarted
  finishes with bitwise the same final parameters, the same α at every batch it runs, the same
  train losses and the same final validation metrics as an uninterrupted run launched beside it.
* DeepSpeed (`prores_algo.training.deepspeed.loop`, ZeRO-3, 2 processes via torchrun): the same, with the restart
  adding `--load_dir` (ds_train has no autoresume flag): bitwise the same fp32 parameters
  (consolidated from the ZeRO-3 shards), α, losses and final eval loss.
* `prores-data` killed while writing leaves nothing that loads as a dataset (a fresh build and an
  --overwrite rebuild alike: the old dataset stays intact); the next run completes it.
* A 1000-step Composer run with ProRes (warmup ending at 25%), α logged every batch and the residual
  monitor on: no growth of gc-tracked objects or resident memory after warmup, and no α buffer or
  forward hook left (the short CI variant of benchmarks/long_run.py).

Shared memory: SIGKILL skips every cleanup, so the killed ranks' POSIX shared memory (streaming's
per-dataset segments, DeepSpeed's CPU all-reduce buffers) stays in /dev/shm. The restart does not
need it gone (new segments get new names); the test unlinks exactly the segments the killed processes
had mapped, so repeated test runs do not fill /dev/shm.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from prores_algo import alpha_schedules
from tests.support.helpers import env_without_dist, free_port
from tests.support.processes import finish as _finish
from tests.support.processes import kill_group_when
from tests.support.processes import start_in_session as _start
from tests.support.processes import unlink_shm as _unlink_shm
from tests.support.small_runs import DS_ARGS, DS_ENTRY, N_LAYERS, SAVE_EVERY, STEPS, T_WARMUP

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DRIVER = ROOT / 'tests' / 'support' / 'reliability_driver.py'


def _env(**extra) -> dict:
    env = env_without_dist()
    env.update(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONPATH=str(ROOT) + os.pathsep + env.get('PYTHONPATH', ''))
    env.update(extra)
    return env


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    from prores_algo.training.data import write_mds

    out = tmp_path_factory.mktemp('reliability') / 'mds'
    write_mds('stdlib', out, tokenizer='byte', seq_len=32, val_fraction=0.05, max_tokens=100_000, progress=False)
    return out


# ----------------------------------------------------------------------------------------------- Composer


def composer_cmd(out: Path, ckpt: Path, data: Path) -> list[str]:
    return [
        str(BIN / 'composer'),
        '-n',
        '2',
        '--master_port',
        str(free_port()),
        '--stdout',
        f'{out}/stdout{{rank}}.txt',
        '--stderr',
        f'{out}/stderr{{rank}}.txt',
        str(DRIVER),
        str(out),
        str(ROOT / 'yamls' / 'quickstart.yaml'),
        f'data.path={data}',
        'data.source=null',
        'data.seq_len=32',
        'model.max_seq_len=32',
        'model.d_model=32',
        'model.n_heads=4',
        f'model.n_layers={N_LAYERS}',
        'global_train_batch_size=8',
        'eval_batch_size=8',
        'eval_interval=100ba',
        'eval_subset_num_batches=2',
        f'algorithms.prores.t_warmup={T_WARMUP}ba',
        'console_log_interval=100ba',
        f'max_duration={STEPS}ba',
        f'save_folder={ckpt}',
        f'save_interval={SAVE_EVERY}ba',
        'autoresume=true',
        'run_name=reliability',
    ]


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f'rank{r}.json').read_text()) for r in (0, 1)]


def _model_state(path: Path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=False)['state']['model']


@pytest.mark.slow
def test_composer_kill9_then_autoresume_matches_uninterrupted(data, tmp_path):
    a_out, b_out = tmp_path / 'a', tmp_path / 'b'
    a_out.mkdir()
    b_out.mkdir()
    a_ck, b_ck = tmp_path / 'ck_a', tmp_path / 'ck_b'
    b_cmd = composer_cmd(b_out, b_ck, data)
    # the uninterrupted reference runs beside the one we kill (each batch of the latter sleeps 0.3 s)
    straight = _start(composer_cmd(a_out, a_ck, data), tmp_path / 'a.log', _env(), a_out)
    victim = _start(b_cmd, tmp_path / 'b1.log', _env(PRORES_TEST_SLEEP='0.3'), b_out)
    killed = kill_group_when(victim, lambda: (b_ck / 'latest-rank0.pt').exists(), tmp_path / 'b1.log')
    assert killed['killed'] >= 3  # launcher + 2 ranks

    # the kill landed mid-run: no result, no final checkpoint
    assert not (b_out / 'rank0.json').exists() and not (b_ck / f'ep0-ba{STEPS}-rank0.pt').exists()
    latest = os.readlink(b_ck / 'latest-rank0.pt')
    k = int(latest.split('-ba')[1].split('-')[0])
    assert 0 < k < STEPS
    # ...and a kill during the next checkpoint's write: a partial file under its final name
    partial = b_ck / f'ep0-ba{k + SAVE_EVERY}-rank0.pt'
    if not partial.exists():
        partial.write_bytes((b_ck / latest).read_bytes()[:4096])
    _unlink_shm(killed['shm'])

    resumed = _start(b_cmd, tmp_path / 'b2.log', _env(), b_out)  # the same command
    _finish(resumed, tmp_path / 'b2.log')
    _finish(straight, tmp_path / 'a.log')
    a, b = _ranks(a_out), _ranks(b_out)

    for r in (0, 1):
        assert a[r]['first_batch'] == 0 and b[r]['first_batch'] == k, 'the restart must resume, not start over'
        assert a[r]['final_batch'] == b[r]['final_batch'] == STEPS
        for t in range(STEPS):  # the reference follows the schedule; from W on no hooked branch is left
            expected = alpha_schedules.alphas('linear', N_LAYERS, t, T_WARMUP) if t < T_WARMUP else []
            got = a[r]['alphas'][str(t)]
            assert len(got) == 2 * len(expected), (t, got)
            for path, value in got.items():
                assert value == pytest.approx(expected[int(path.split('blocks.')[1].split('.')[0])], abs=1e-7)
        for t in range(k, STEPS):  # ...and the resumed run uses exactly its α and gets exactly its losses
            assert b[r]['alphas'][str(t)] == a[r]['alphas'][str(t)], t
            assert b[r]['losses'][str(t)] == a[r]['losses'][str(t)], t
        for run in (a[r], b[r]):
            assert run['final_alphas'] == [1.0] * N_LAYERS and run['removed']
            assert run['num_hooks'] == 0 and run['prores_hooks_end'] == 0
            # the α buffers stay as inert 1.0 that no hook reads (a DDP wrapper keeps finding them)
            assert run['alpha_buffers_end'] == 2 * N_LAYERS and run['alpha_values_end'] == [1.0]
        assert b[r]['eval'] == a[r]['eval'] and 'LanguageCrossEntropy' in a[r]['eval']
    final_a = _model_state(a_ck / f'ep0-ba{STEPS}-rank0.pt')
    final_b = _model_state(b_ck / f'ep0-ba{STEPS}-rank0.pt')
    assert final_a.keys() == final_b.keys() and len(final_a) > 0
    for name in final_a:
        assert torch.equal(final_a[name], final_b[name]), name
    # the partial file was overwritten by the resumed run's real checkpoint
    assert partial.stat().st_size > 4096


def test_autoresume_may_overwrite_only_in_the_runs_own_folder(tmp_path):
    """What lets the restart above overwrite its killed attempt's partial checkpoint, and no more: only
    with autoresume and this folder's own `latest-rank0.pt` (the checkpoint autoresume loads)."""
    from prores_algo.training.checkpoint_store import save_overwrite as _save_overwrite
    from prores_algo.training.config import load_config

    qs = ROOT / 'yamls' / 'quickstart.yaml'
    base = [f'save_folder={tmp_path}/{{run_name}}/ck', 'autoresume=true', 'run_name=r']
    folder = tmp_path / 'r' / 'ck'
    assert not _save_overwrite(load_config(qs, base))  # nothing there yet
    folder.mkdir(parents=True)
    (folder / 'ep0-ba6-rank0.pt').write_bytes(b'another run')
    assert not _save_overwrite(load_config(qs, base))  # files but no `latest`: Composer's guard stays on
    os.symlink('ep0-ba3-rank0.pt', folder / 'latest-rank0.pt')
    assert _save_overwrite(load_config(qs, base))
    assert not _save_overwrite(load_config(qs, base + ['autoresume=false']))
    assert not _save_overwrite(load_config(qs, base + ['run_name=other']))
    assert _save_overwrite(load_config(qs, base + ['autoresume=false', 'save_overwrite=true']))


# ----------------------------------------------------------------------------------------------- DeepSpeed


def ds_cmd(save: Path, *extra) -> list[str]:
    return [
        str(BIN / 'torchrun'),
        '--nproc_per_node=2',
        '--nnodes=1',
        '--master_addr=127.0.0.1',
        f'--master_port={free_port()}',
        str(DS_ENTRY),
        *DS_ARGS,
        '--save_dir',
        str(save),
        '--summary',
        str(save.parent / f'{save.name}_summary_{{rank}}.json'),
        *extra,
    ]


def test_deepspeed_sidecar_is_written_before_latest_names_the_tag(tmp_path):
    """Whenever DeepSpeed's `latest` names a tag, that tag's ProRes record is already on disk, so a kill
    at any moment leaves a resumable checkpoint (the 2-process test above kills right after `latest`
    appears; this pins the order down deterministically)."""
    from prores_algo.integrations.deepspeed import SIDECAR_FILE, apply_prores, check_checkpoint, save_checkpoint
    from prores_algo.training.models.decoder import Decoder, DecoderConfig

    class Engine:  # DeepSpeed's order: files first, `latest` as the last step of save_checkpoint
        global_steps = 3
        seen = []

        def __init__(self, module):
            self.module = module

        def save_checkpoint(self, save_dir, tag=None, client_state=None, **kw):
            os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
            self.seen.append(os.path.isfile(os.path.join(save_dir, tag, SIDECAR_FILE)))
            with open(os.path.join(save_dir, 'latest'), 'w') as f:
                f.write(tag)

    model = Decoder(DecoderConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16))
    prores = apply_prores(model, 'linear', t_warmup=8)
    engine = Engine(model)
    save_checkpoint(engine, prores, str(tmp_path), tag='global_step3')
    assert engine.seen == [True]
    assert check_checkpoint(str(tmp_path), prores) == 'global_step3'


def _fp32_params(save: Path, tag: str) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(save), tag=tag)


@pytest.mark.slow
def test_deepspeed_kill9_then_resume_matches_uninterrupted(tmp_path):
    a_ck, b_ck = tmp_path / 'ck_a', tmp_path / 'ck_b'
    straight = _start(ds_cmd(a_ck), tmp_path / 'a.log', _env(), ROOT)
    # the victim and its restart run the very same command: --autoresume picks up save_dir/latest
    victim = _start(ds_cmd(b_ck, '--autoresume'), tmp_path / 'b1.log', _env(PRORES_TEST_SLEEP='0.15'), ROOT)
    killed = kill_group_when(victim, lambda: (b_ck / 'latest').exists(), tmp_path / 'b1.log')
    assert killed['killed'] >= 3
    tag = (b_ck / 'latest').read_text().strip()
    k = int(tag.removeprefix('global_step'))
    assert 0 < k < STEPS and not (b_ck / f'global_step{STEPS}').exists()
    _unlink_shm(killed['shm'])

    resumed = _start(ds_cmd(b_ck, '--autoresume'), tmp_path / 'b2.log', _env(), ROOT)
    _finish(resumed, tmp_path / 'b2.log')
    _finish(straight, tmp_path / 'a.log')
    for r in (0, 1):
        a = json.loads((tmp_path / f'ck_a_summary_{r}.json').read_text())
        b = json.loads((tmp_path / f'ck_b_summary_{r}.json').read_text())
        assert b['start_step'] == k and b['resumed_from']
        assert b['steps'] == a['steps'][k:]
        assert b['alphas'] == a['alphas'][k:]
        assert b['losses'] == a['losses'][k:]
        assert b['lrs'] == a['lrs'][k:]
        assert b['final_eval_loss'] == a['final_eval_loss'] is not None
        assert a['prores_removed'] and b['prores_removed']
        assert set(b['alpha_buffers_end'].values()) == {1.0}  # left inert after removal: no hook reads them
    pa, pb = _fp32_params(a_ck, f'global_step{STEPS}'), _fp32_params(b_ck, f'global_step{STEPS}')
    assert pa.keys() == pb.keys() and len(pa) > 0
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


# ----------------------------------------------------------------------------------------------- prores-data


def _data_cmd(out: Path, *extra) -> list[str]:
    return [
        sys.executable,
        '-m',
        'prores_algo.training.data',
        '--source',
        'stdlib',
        '--out',
        str(out),
        '--seq_len',
        '128',
        '--max_tokens',
        '2000000',
        '--val_fraction',
        '0.05',
        '--no_progress',
        *extra,
    ]


def _tmp_siblings(out: Path) -> list[Path]:
    return list(out.parent.glob(f'.{out.name}.prores-tmp-*'))


def _check_complete(out: Path, max_tokens: int = 2_000_000) -> dict:
    from prores_algo.training.data import build_dataloader, read_metadata

    meta = read_metadata(out)
    assert meta is not None and sum(s['tokens_read'] for s in meta['splits'].values()) == max_tokens
    for split, info in meta['splits'].items():
        spec = build_dataloader(str(out), split, 64, seq_len=128, shuffle=False, drop_last=False)
        assert spec.num_samples == info['samples']
    return meta


def test_prores_data_kill9_mid_write_never_leaves_a_loadable_partial(tmp_path):
    from prores_algo.training.data import build_dataloader, ensure_dataset, read_metadata

    out = tmp_path / 'ds'
    victim = _start(_data_cmd(out), tmp_path / 'd1.log', _env(), tmp_path)
    kill_group_when(victim, lambda: bool(_tmp_siblings(out)), tmp_path / 'd1.log', timeout=120)
    # killed while writing: the temporary sibling holds the partial shards, `out` does not exist
    assert _tmp_siblings(out) and not out.exists() and read_metadata(out) is None
    with pytest.raises(FileNotFoundError, match='prores-data'):
        build_dataloader(str(out), 'train', 8)

    # the next run (the same command) completes it and removes the dead run's temporary folder
    rerun = _start(_data_cmd(out), tmp_path / 'd2.log', _env(), tmp_path)
    _finish(rerun, tmp_path / 'd2.log', timeout=300)
    assert not _tmp_siblings(out)
    meta = _check_complete(out)

    # killed during an --overwrite rebuild: the old dataset stays whole and loadable
    victim = _start(_data_cmd(out, '--overwrite', '--seed', '1'), tmp_path / 'd3.log', _env(), tmp_path)
    kill_group_when(victim, lambda: bool(_tmp_siblings(out)), tmp_path / 'd3.log', timeout=120)
    assert read_metadata(out) == meta
    _check_complete(out)
    # and what the YAML entry does with it: reuse the complete dataset (same settings), clean nothing up yet
    assert (
        ensure_dataset('stdlib', out, seq_len=128, max_tokens=2_000_000, val_fraction=0.05, seed=0, progress=False)
        == meta
    )


# ----------------------------------------------------------------------------------------------- long run


def _long_run_module():
    return importlib.import_module('benchmarks.long_run')


def test_long_run_short_variant_is_flat_and_hooks_are_gone():
    lr = _long_run_module()
    result = lr.run(steps=1000, settle=100, sample_every=50)
    assert result['num_samples'] >= 12
    assert result['after_warmup'] == {
        'batch': 251,
        'removed': True,
        'alpha_buffers': 0,
        'branch_forward_hooks': 0,
        'all_forward_hooks': 0,
    }
    failures = lr.check(result, rss_tol=lr.RSS_TOL_MB_PER_1K_SHORT)
    assert not failures, (failures, result['samples'])
