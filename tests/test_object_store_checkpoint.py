"""prores-train checkpoints in the object store (`save_folder: s3://...`), and the store's faults, against the
real S3-compatible server (tests/support/s3_server.py).

* kill -9 mid-run once a checkpoint and its `latest` are in the store; the same command restarted on a fresh
  node (an empty working directory: Composer's local copies are gone) resumes from the store and ends with
  parameters, α at every batch, losses and validation metrics bitwise equal to an uninterrupted run.
* `load_path: s3://...` starts a fresh run from a stored checkpoint and ends equal to that run.
* the server lost in the middle of a checkpoint's upload: the run stops with one line naming the store,
  the file and where its local copy is kept (exit status 2, no traceback); the store's `latest` still names
  the last complete checkpoint, and the same command, restarted once the server is back, resumes from it
  and ends bitwise equal to an uninterrupted run.
* faults, each a one-line error naming the setting and the fix, exit status 2, no traceback, before any
  training: a missing bucket, refused credentials (both entries), a load_path naming no object.

The DeepSpeed entry's store (staging, upload, pointer, a server lost mid-upload) is tested in
tests/integrations/test_deepspeed_object_store_checkpoint.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prores_algo import alpha_schedules
from tests.support.cut_proxy import CutProxy
from tests.support.processes import kill_group_when
from tests.support.processes import unlink_shm as _unlink_shm
from tests.support.s3_server import moto_available, process_env

pytestmark = pytest.mark.skipif(not moto_available(), reason="needs moto's S3 server: pip install 'moto[server]'")

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / 'tests' / 'support' / 'store_driver.py'
N_LAYERS, T_WARMUP, STEPS, SAVE_EVERY = 3, 8, 30, 3
DS_JSON = ['--deepspeed_config', str(ROOT / 'yamls' / 'deepspeed' / 'zero3.json')]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    from prores_algo.training.data import write_mds

    out = tmp_path_factory.mktemp('store') / 'mds'
    write_mds('stdlib', out, tokenizer='byte', seq_len=32, val_fraction=0.05, max_tokens=100_000, progress=False)
    return out


def _overrides(data: Path, url: str, *extra) -> list[str]:
    return [
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
        f'save_folder={url}',
        f'save_interval={SAVE_EVERY}ba',
        'autoresume=true',
        'run_name=store',
        *extra,
    ]


def _start(
    args: list[str], cwd: Path, env: dict, log: Path, module: bool = False, err: Path | None = None
) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    head = (
        [sys.executable, '-m', 'prores_algo.training.composer_train']
        if module
        else [sys.executable, str(DRIVER), 'out.json']
    )
    env = process_env({**env, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)})
    stderr = open(err, 'w') if err else subprocess.STDOUT  # noqa: SIM115 (the run's own, open while it runs)
    return subprocess.Popen(head + args, cwd=cwd, env=env, stdout=open(log, 'w'), stderr=stderr, start_new_session=True)


def _finish(proc: subprocess.Popen, log: Path) -> None:
    assert proc.wait(timeout=600) == 0, log.read_text()[-5000:]


def _stored_model(s3, key: str, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / Path(key).name
    s3.client().download_file(s3.bucket, key, str(path))
    return torch.load(path, map_location='cpu', weights_only=False)['state']['model']


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_composer_object_store_checkpoint_kill9_autoresume_bitwise(s3, reaper, data, tmp_path):
    url_a, url_b = f's3://{s3.bucket}/kill/a', f's3://{s3.bucket}/kill/b'
    straight = _start(_overrides(data, url_a), tmp_path / 'a', s3.env, tmp_path / 'a.log')
    reaper(straight)
    # Composer writes `latest` once a checkpoint's files are in the store (it polls for them once a second):
    # slow batches leave that time before the end of the run, on a loaded machine too
    victim = _start(
        _overrides(data, url_b), tmp_path / 'b1', {**s3.env, 'PRORES_TEST_SLEEP': '5.0'}, tmp_path / 'b1.log'
    )
    poll = s3.client()

    def latest_stored() -> bool:
        return poll.list_objects_v2(Bucket=s3.bucket, Prefix='kill/b/latest-rank0.pt.symlink').get('KeyCount', 0) > 0

    killed = kill_group_when(victim, latest_stored, tmp_path / 'b1.log')
    _unlink_shm(killed['shm'])
    latest = poll.get_object(Bucket=s3.bucket, Key='kill/b/latest-rank0.pt.symlink')['Body'].read().decode()
    k = int(latest.split('-ba')[1].split('-')[0])
    assert 0 < k < STEPS and not (tmp_path / 'b1' / 'out.json').exists()  # killed mid-run

    # the same command on a fresh node: nothing local, the checkpoint comes from the store
    resumed = _start(_overrides(data, url_b), tmp_path / 'b2', s3.env, tmp_path / 'b2.log')
    reaper(resumed)
    _finish(resumed, tmp_path / 'b2.log')
    _finish(straight, tmp_path / 'a.log')
    a = json.loads((tmp_path / 'a' / 'out.json').read_text())
    b = json.loads((tmp_path / 'b2' / 'out.json').read_text())
    assert a['first_batch'] == 0 and b['first_batch'] == k, 'the restart must resume, not start over'
    for t in range(STEPS):  # the schedule, per layer (both branches of each block); from W on no hook is left
        expected = alpha_schedules.alphas('linear', N_LAYERS, t, T_WARMUP) if t < T_WARMUP else []
        got = a['alphas'][str(t)]
        assert len(got) == 2 * len(expected), (t, got)
        for path, value in got.items():
            assert value == pytest.approx(expected[int(path.split('blocks.')[1].split('.')[0])], abs=1e-7)
    for t in range(k, STEPS):
        assert b['alphas'][str(t)] == a['alphas'][str(t)], t
        assert b['losses'][str(t)] == a['losses'][str(t)], t
    assert b['result']['val_loss'] == a['result']['val_loss']
    final = f'ep0-ba{STEPS}-rank0.pt'
    _assert_same(
        _stored_model(s3, f'kill/a/{final}', tmp_path / 'fa'), _stored_model(s3, f'kill/b/{final}', tmp_path / 'fb')
    )


@pytest.mark.slow
def test_composer_object_store_checkpoint_load_path_starts_a_fresh_run(s3, data, tmp_path):
    url = f's3://{s3.bucket}/load/a'
    first = _start(_overrides(data, url), tmp_path / 'a', s3.env, tmp_path / 'a.log', module=True)
    _finish(first, tmp_path / 'a.log')
    assert f'validation loss after {STEPS} batches' in (tmp_path / 'a.log').read_text()
    # a new run (its own save_folder, no autoresume) from the store's checkpoint of batch 6
    from_store = _overrides(
        data, f's3://{s3.bucket}/load/b', 'autoresume=false', 'run_name=other', f'load_path={url}/ep0-ba6-rank0.pt'
    )
    second = _start(from_store, tmp_path / 'b', s3.env, tmp_path / 'b.log', module=True)
    _finish(second, tmp_path / 'b.log')
    log = (tmp_path / 'b.log').read_text()
    assert f'validation loss after {STEPS} batches' in log and 'validation loss before training' not in log
    saved = sorted(f'load/b/ep0-ba{s}-rank0.pt' for s in range(6 + SAVE_EVERY, STEPS + 1, SAVE_EVERY))
    assert s3.keys('load/b/') == saved + ['load/b/latest-rank0.pt.symlink']
    final = f'ep0-ba{STEPS}-rank0.pt'
    _assert_same(
        _stored_model(s3, f'load/a/{final}', tmp_path / 'fa'), _stored_model(s3, f'load/b/{final}', tmp_path / 'fb')
    )


@pytest.mark.slow
def test_composer_object_store_checkpoint_server_lost_mid_upload(s3, reaper, data, tmp_path):
    url_a, url = f's3://{s3.bucket}/lost/a', f's3://{s3.bucket}/lost/b'
    steps = 8
    short = (f'max_duration={steps}ba', 'save_interval=1ba')
    straight = _start(_overrides(data, url_a, *short), tmp_path / 'a', s3.env, tmp_path / 'a.log')
    reaper(straight)
    poll = s3.client()  # the server itself; the run reaches it through the proxy
    with CutProxy(s3.port) as proxy:
        node_tmp = tmp_path / 'b_tmp'  # this run's temp dir: Composer's staging and the kept copy live here
        node_tmp.mkdir()
        env = {**s3.env, 'S3_ENDPOINT_URL': proxy.url, 'PRORES_TEST_SLEEP': '1.5', 'TMPDIR': str(node_tmp)}
        run = _start(_overrides(data, url, *short), tmp_path / 'b', env, tmp_path / 'b.log', err=tmp_path / 'b.err')
        reaper(run)
        t0 = time.time()
        while not s3.keys('lost/b/latest-rank0.pt.symlink'):  # a first checkpoint is complete in the store
            assert run.poll() is None, (tmp_path / 'b.log').read_text()[-3000:] + (tmp_path / 'b.err').read_text()
            assert time.time() - t0 < 300, 'no checkpoint reached the store'
            time.sleep(0.05)
        # the server goes away as the next checkpoint file is sent (it never arrives)
        proxy.arm(rb'PUT /[^ ]*lost/b/ep0-ba\d+-rank0\.pt ')
        assert run.wait(timeout=300) == 2, (tmp_path / 'b.log').read_text()[-3000:] + (tmp_path / 'b.err').read_text()
        assert proxy.cut.is_set()
    # one line (Composer's console log shares stderr; nothing else there speaks of an error), no traceback
    err = (tmp_path / 'b.err').read_text()
    line = err.splitlines()[-1]
    assert 'Traceback' not in err + (tmp_path / 'b.log').read_text(), err[-3000:]
    assert [ln for ln in err.splitlines() if re.search('error|exception|fail', ln, re.I)] == [line], err[-3000:]
    m = re.fullmatch(
        re.escape(f'error: checkpoint upload to {url} failed: ')
        + r'(ep0-ba(\d+)-rank0\.pt): .+; the local copy is kept at (\S+); '
        + re.escape('restart with autoresume once the store answers'),
        line,
    )
    assert m, line
    name, c, kept = m.group(1), int(m.group(2)), Path(m.group(3))
    assert kept.name == name and kept.is_file() and kept.is_relative_to(node_tmp)
    kept_state = torch.load(kept, map_location='cpu', weights_only=False)['state']
    assert kept_state['timestamp']['Timestamp']['batch'] == c
    latest = poll.get_object(Bucket=s3.bucket, Key='lost/b/latest-rank0.pt.symlink')['Body'].read().decode()
    k = int(latest.split('-ba')[1].split('-')[0])
    assert 0 < k < c <= steps and f'lost/b/{name}' not in s3.keys('lost/b/')  # nothing of it in the store

    resumed = _start(_overrides(data, url, *short), tmp_path / 'b', s3.env, tmp_path / 'b2.log')  # the server is back
    reaper(resumed)
    _finish(resumed, tmp_path / 'b2.log')
    _finish(straight, tmp_path / 'a.log')
    a = json.loads((tmp_path / 'a' / 'out.json').read_text())
    b = json.loads((tmp_path / 'b' / 'out.json').read_text())
    assert b['first_batch'] == k, 'the restart resumes from the last complete checkpoint in the store'
    for t in range(k, steps):
        assert b['losses'][str(t)] == a['losses'][str(t)], t
    assert b['result']['val_loss'] == a['result']['val_loss']
    final = f'ep0-ba{steps}-rank0.pt'
    _assert_same(
        _stored_model(s3, f'lost/a/{final}', tmp_path / 'fa'), _stored_model(s3, f'lost/b/{final}', tmp_path / 'fb')
    )
    _assert_same(kept_state['model'], _stored_model(s3, f'lost/a/{name}', tmp_path / 'fc'))  # the kept copy is whole


# ---------------------------------------------------------------------------------------------------
# faults: one line, exit 2, before training
# ---------------------------------------------------------------------------------------------------
def _composer(data, url, env, cwd, *extra):
    args = _overrides(data, url, *extra)
    return subprocess.run(
        [sys.executable, '-m', 'prores_algo.training.composer_train', *args],
        cwd=cwd,
        env=process_env({**env, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _deepspeed(url, env, cwd, *extra):
    args = [
        '--n_layers',
        '2',
        '--d_model',
        '16',
        '--n_heads',
        '2',
        '--seq_len',
        '8',
        '--vocab_size',
        '32',
        '--steps',
        '2',
    ]
    return subprocess.run(
        [sys.executable, '-m', 'prores_algo.training.deepspeed.loop', *args, *DS_JSON, '--save_dir', url, *extra],
        cwd=cwd,
        env=process_env({**env, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _one_line(proc, pattern: str) -> None:
    import re

    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and 'Warning' not in ln and 'warn(' not in ln]
    assert 'Traceback' not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize('entry', ['composer', 'deepspeed'])
def test_object_store_checkpoint_missing_bucket_and_wrong_credentials(s3, data, tmp_path, entry):
    run = (
        (lambda url, env: _composer(data, url, env, tmp_path))
        if entry == 'composer'
        else (lambda url, env: _deepspeed(url, env, tmp_path))
    )
    field = r"save_folder='" if entry == 'composer' else r"save_folder \(--save_dir\)='"
    missing = run('s3://no-such-bucket/run', s3.env)
    _one_line(
        missing,
        field + r"s3://no-such-bucket/run': bucket 'no-such-bucket' does not exist at the S3 endpoint "
        r'http://127\.0\.0\.1:\d+ \(S3_ENDPOINT_URL\): create it, or fix the bucket name',
    )
    denied = run(f's3://{s3.bucket}/run', s3.env_with('AKIAIOSFODNN7EXAMPLE', 'wrong-secret'))
    _one_line(denied, field + rf"s3://{s3.bucket}/run': access to bucket '{s3.bucket}' was denied .*AWS_ACCESS_KEY_ID")
    assert not list(tmp_path.rglob('*.pt')) and s3.keys('run/') == []  # nothing trained, nothing written


def test_object_store_checkpoint_load_path_naming_no_object(s3, data, tmp_path):
    proc = _composer(data, f's3://{s3.bucket}/x/b', s3.env, tmp_path, f'load_path=s3://{s3.bucket}/x/nothing.pt')
    _one_line(proc, rf"load_path='s3://{s3.bucket}/x/nothing\.pt': no object 'x/nothing\.pt' in bucket '{s3.bucket}'")
    proc = _deepspeed(f's3://{s3.bucket}/x/b', s3.env, tmp_path, '--load_dir', f's3://{s3.bucket}/x/none')
    _one_line(proc, rf"load_path \(--load_dir\)='s3://{s3.bucket}/x/none': no checkpoint there \(no `latest` object\)")


def test_object_store_checkpoint_download_checks_the_manifest(s3, tmp_path):
    """What a DeepSpeed resume downloads: only a published tag, every file checked against its sha256."""
    from prores_algo.training.checkpoint_store import CheckpointStore, StoreError

    url = f's3://{s3.bucket}/manifest'
    writer = CheckpointStore(url, staging=str(tmp_path / 'w'))
    (tmp_path / 'w' / 'step1').mkdir(parents=True)
    for name, body in (('zero_pp_rank_0_x.pt', b'rank0' * 100), ('zero_pp_rank_1_x.pt', b'rank1' * 100)):
        (tmp_path / 'w' / 'step1' / name).write_bytes(body)
    (tmp_path / 'w' / 'step1' / 'prores.json').write_text('{}')
    assert writer.own_files('step1', 0) == ['prores.json', 'zero_pp_rank_0_x.pt']
    assert writer.own_files('step1', 1) == ['zero_pp_rank_1_x.pt']
    files = {**writer.upload('step1', writer.own_files('step1', 0)), **writer.upload('step1', ['zero_pp_rank_1_x.pt'])}
    reader = CheckpointStore(url, staging=str(tmp_path / 'r'))
    assert reader.latest() is None  # uploaded, not published: no checkpoint to resume from
    with pytest.raises(StoreError, match=r"checkpoint 'step1' is not complete in .*no manifest\.json"):
        reader.download('step1')
    writer.publish('step1', files)
    assert reader.latest() == 'step1'
    reader.download('step1')
    for name in files:
        assert (tmp_path / 'r' / 'step1' / name).read_bytes() == (tmp_path / 'w' / 'step1' / name).read_bytes()
    # a stored file damaged after its upload (same size): refused by name, nothing kept in its place
    body = bytearray((tmp_path / 'w' / 'step1' / 'zero_pp_rank_1_x.pt').read_bytes())
    body[7] ^= 0xFF
    s3.client().put_object(Bucket=s3.bucket, Key='manifest/step1/zero_pp_rank_1_x.pt', Body=bytes(body))
    fresh = CheckpointStore(url, staging=str(tmp_path / 'f'))
    with pytest.raises(StoreError, match=rf'{url}/step1/zero_pp_rank_1_x\.pt does not match its sha256'):
        fresh.download('step1')
    assert sorted(p.name for p in (tmp_path / 'f' / 'step1').iterdir()) == ['prores.json', 'zero_pp_rank_0_x.pt']
