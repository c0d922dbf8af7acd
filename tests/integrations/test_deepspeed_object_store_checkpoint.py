"""DeepSpeed checkpoints in the object store (`--save_dir s3://...`), against the real S3-compatible server.

2 processes under torchrun, ZeRO-3 (every rank writes and uploads its own shard files). Each run gets a
TMPDIR of its own, so its staging folder is its own "node-local disk": a restarted run finds nothing
staged and must download the checkpoint from the store.

* kill -9 of the whole job once `latest` is in the store, plus the debris of an upload cut before its
  pointer: the same command restarted resumes from the checkpoint `latest` names and ends bitwise equal
  (fp32 parameters consolidated from the stored ZeRO-3 shards, α, losses, LRs, final eval) to an
  uninterrupted run.
* the server lost in the middle of a checkpoint's upload (after its first file): the run says so, keeps
  the local copy, trains on; the store's `latest` still names the previous complete checkpoint, and a
  resume from it ends bitwise equal to the run itself.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support.cut_proxy import CutProxy
from tests.support.helpers import free_port
from tests.support.processes import finish as _finish
from tests.support.processes import kill_group_when
from tests.support.processes import unlink_shm as _unlink_shm
from tests.support.s3_server import AWS_ENV, MotoS3, moto_available, process_env
from tests.support.small_runs import DS_ARGS, DS_ENTRY, ROOT, SAVE_EVERY, STEPS

BIN = Path(sys.executable).parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not moto_available(), reason="needs moto's S3 server: pip install 'moto[server]'"),
]


@pytest.fixture
def s3(tmp_path, monkeypatch):
    with MotoS3(log=tmp_path / 'moto.log') as server:
        for k in AWS_ENV:
            monkeypatch.delenv(k, raising=False)
        for k, v in server.env.items():  # this process reads the store too
            monkeypatch.setenv(k, v)
        yield server


def _cmd(url: str, summary: Path, *extra) -> list[str]:
    return [
        str(BIN / 'torchrun'),
        '--nproc_per_node=2',
        '--nnodes=1',
        '--master_addr=127.0.0.1',
        f'--master_port={free_port()}',
        str(DS_ENTRY),
        *DS_ARGS,
        '--save_dir',
        url,
        '--summary',
        str(summary) + '_{rank}.json',
        *extra,
    ]


def _start(cmd, tmp: Path, name: str, env: dict) -> subprocess.Popen:
    node_tmp = tmp / f'{name}_tmp'  # this run's node-local disk: its staging folder lives here
    node_tmp.mkdir()
    env = process_env({**env, 'TMPDIR': str(node_tmp), 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)})
    return subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=open(tmp / f'{name}.log', 'w'), stderr=subprocess.STDOUT, start_new_session=True
    )


def _summaries(prefix: Path) -> list[dict]:
    return [json.loads(Path(f'{prefix}_{r}.json').read_text()) for r in (0, 1)]


def _latest(s3, prefix: str, client=None):
    client = client or s3.client()
    try:
        return client.get_object(Bucket=s3.bucket, Key=f'{prefix}/latest')['Body'].read().decode()
    except client.exceptions.NoSuchKey:
        return None


def _stored_params(url: str, tag: str, folder: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from prores_algo.training.checkpoint_store import CheckpointStore

    CheckpointStore(url, staging=str(folder)).download(tag)
    return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)


def _assert_same_tail(a: dict, b: dict, k: int) -> None:
    assert b['start_step'] == k and b['resumed_from']
    for key in ('steps', 'alphas', 'losses', 'lrs'):
        assert b[key] == a[key][k:], key
    assert b['final_eval_loss'] == a['final_eval_loss'] is not None


def _assert_same_params(pa: dict, pb: dict) -> None:
    assert pa.keys() == pb.keys() and len(pa) > 0
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


def test_deepspeed_object_store_checkpoint_kill9_resume_bitwise(s3, reaper, tmp_path):
    url_a, url_b = f's3://{s3.bucket}/a', f's3://{s3.bucket}/b'
    straight = _start(_cmd(url_a, tmp_path / 'a'), tmp_path, 'a', s3.env)
    reaper(straight)
    victim_cmd = _cmd(url_b, tmp_path / 'b', '--autoresume')
    victim = _start(victim_cmd, tmp_path, 'b1', {**s3.env, 'PRORES_TEST_SLEEP': '0.15'})
    poll = s3.client()
    killed = kill_group_when(victim, lambda: _latest(s3, 'b', poll) is not None, tmp_path / 'b1.log')
    assert killed['killed'] >= 3
    _unlink_shm(killed['shm'])
    tag = _latest(s3, 'b')
    k = int(tag.removeprefix('global_step'))
    assert 0 < k < STEPS and f'b/global_step{STEPS}/manifest.json' not in s3.keys('b/')
    # An upload cut before its pointer (its files there, no manifest, `latest` unmoved): never chosen.
    cut = f'global_step{k + SAVE_EVERY}'
    client = s3.client()
    for key in s3.keys(f'b/{tag}/'):
        if not key.endswith('manifest.json'):
            client.copy_object(
                Bucket=s3.bucket, Key=key.replace(tag, cut), CopySource={'Bucket': s3.bucket, 'Key': key}
            )
    client.delete_object(Bucket=s3.bucket, Key=f'b/{cut}/manifest.json')

    resumed = _start(victim_cmd, tmp_path, 'b2', s3.env)  # the same command, on a fresh node-local disk
    reaper(resumed)
    _finish(resumed, tmp_path / 'b2.log')
    _finish(straight, tmp_path / 'a.log')
    for a, b in zip(_summaries(tmp_path / 'a'), _summaries(tmp_path / 'b'), strict=True):
        _assert_same_tail(a, b, k)
        assert b['upload_failed'] == [] and a['upload_failed'] == []
    assert _latest(s3, 'a') == _latest(s3, 'b') == f'global_step{STEPS}'
    final = f'global_step{STEPS}'
    _assert_same_params(_stored_params(url_a, final, tmp_path / 'pa'), _stored_params(url_b, final, tmp_path / 'pb'))


def test_deepspeed_object_store_checkpoint_server_lost_mid_upload(s3, tmp_path):
    url = f's3://{s3.bucket}/run'
    lost = f'global_step{2 * SAVE_EVERY}'
    # the second upload request into `lost` (of the 5 files two ranks upload) never arrives
    with CutProxy(s3.port, cut_at=rb'PUT /[^ ]*/' + lost.encode() + rb'/', nth=2) as proxy:
        env = {**s3.env, 'S3_ENDPOINT_URL': proxy.url}
        run = _start(_cmd(url, tmp_path / 'a', '--autoresume'), tmp_path, 'a', env)
        _finish(run, tmp_path / 'a.log')
        assert proxy.cut.is_set() and proxy.seen >= 2
    log = (tmp_path / 'a.log').read_text()
    staged = sorted((tmp_path / 'a_tmp' / 'prores-checkpoints').glob(f'*/{lost}'))
    assert len(staged) == 1
    message = (
        re.escape(f'[prores] checkpoint {lost}: the upload to {url} failed (')
        + r'rank \d: .*'
        + re.escape(f'the local copy stays in {staged[0]}, and {url}/latest still names the last complete checkpoint')
    )
    assert re.search(message, log), log[-3000:]
    assert 'Traceback' not in log
    a = _summaries(tmp_path / 'a')
    failed = [f'global_step{s}' for s in range(2 * SAVE_EVERY, STEPS + 1, SAVE_EVERY)]  # the server stays away
    assert a[0]['upload_failed'] == a[1]['upload_failed'] == failed and failed[0] == lost
    # the local copy is whole: both ranks' shards, the ProRes record
    names = sorted(p.name for p in staged[0].iterdir())
    assert [n for n in names if 'zero_pp_rank_' in n and 'optim' in n] == [
        'zero_pp_rank_0_mp_rank_00_optim_states.pt',
        'zero_pp_rank_1_mp_rank_00_optim_states.pt',
    ]
    assert 'prores.json' in names
    # `lost` has no manifest in the store (its first file may have landed before the cut, or not), and
    # `latest` names the previous checkpoint
    assert f'run/{lost}/manifest.json' not in s3.keys(f'run/{lost}/')
    assert _latest(s3, 'run') == f'global_step{SAVE_EVERY}'

    resumed = _start(_cmd(url, tmp_path / 'b', '--autoresume'), tmp_path, 'b', s3.env)  # the server is back
    _finish(resumed, tmp_path / 'b.log')
    for ra, rb in zip(a, _summaries(tmp_path / 'b'), strict=True):
        _assert_same_tail(ra, rb, SAVE_EVERY)
    assert _latest(s3, 'run') == f'global_step{STEPS}'
    # the resumed run's final parameters equal those the first run kept locally (its upload failed)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    local = get_fp32_state_dict_from_zero_checkpoint(str(staged[0].parent), tag=f'global_step{STEPS}')
    _assert_same_params(local, _stored_params(url, f'global_step{STEPS}', tmp_path / 'pb'))
