"""Two simulated nodes (tests/test_multinode.py: own /dev/shm, own TMPDIR, own data cache each), DeepSpeed
ZeRO-3 with its checkpoints in the object store: one node's processes are killed mid-run (SIGKILL), the
other is stopped as a scheduler stops a job that lost a node, and the same commands restarted on fresh
node-local disks resume from the store and end bitwise equal to an uninterrupted two-node run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.support.helpers import DIST_ENV, free_port
from tests.support.processes import kill_group_when
from tests.support.s3_server import AWS_ENV, process_env
from tests.test_multinode import (
    BIN,
    GLOBAL_BATCH,
    LAYERS,
    NODE_WRAPPER,
    ROOT,
    SEQ,
    STEPS,
    T_WARMUP,
    ZERO3_JSON,
    _ds_run,
    needs_namespaces,
)
from tests.test_multinode import store as _store  # noqa: F401  (the `store` fixture: the dataset in the store)

pytestmark = pytest.mark.slow
SAVE_EVERY = 2


def _commands(store, tmp: Path, name: str, url: str) -> tuple[list[list[str]], list[Path]]:
    port, commands, dirs = free_port(), [], []
    for r in range(2):
        nd = tmp / name / f'node{r}'
        (nd / 'tmp').mkdir(parents=True)
        dirs.append(nd)
        commands.append(
            [
                *NODE_WRAPPER,
                str(BIN / 'torchrun'),
                '--nnodes=2',
                '--nproc_per_node=1',
                f'--node_rank={r}',
                '--master_addr=127.0.0.1',
                f'--master_port={port}',
                '-m',
                'slow_ds_train',  # prores_algo.training.deepspeed.loop; PRORES_TEST_SLEEP slows it down
                '--config',
                str(ROOT / 'yamls' / 'quickstart.yaml'),
                '--deepspeed_config',
                str(ZERO3_JSON),
                '--require_stage3',
                '--autoresume',
                '--summary',
                str(tmp / name / 'summary_{rank}.json'),
                f'data.path={store.url}',
                f'data.seq_len={SEQ}',
                'model.d_model=32',
                'model.n_heads=4',
                f'model.n_layers={LAYERS}',
                f'global_train_batch_size={GLOBAL_BATCH}',
                f'algorithms.prores.t_warmup={T_WARMUP}ba',
                f'max_duration={STEPS}ba',
                'eval_interval=100ba',
                f'save_interval={SAVE_EVERY}ba',
                f'save_folder={url}',
                f'data.local_cache={tmp / "caches" / f"node{r}"}',
            ]
        )
    return commands, dirs


def _spawn(commands, dirs, extra: dict) -> list[subprocess.Popen]:
    procs = []
    for cmd, nd in zip(commands, dirs, strict=True):
        env = process_env(extra)
        for k in DIST_ENV:
            env.pop(k, None)
        env.update(
            OMP_NUM_THREADS='1',
            TMPDIR=str(nd / 'tmp'),  # this node's disk: its checkpoint staging folder lives here
            PYTHONUNBUFFERED='1',
            PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / 'tests' / 'support')]),
        )
        log = open(nd / 'launcher.log', 'ab')  # noqa: SIM115 (the launcher's log, open while it runs)
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )
        log.close()
    return procs


def _wait_all(procs, dirs, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    codes = [p.returncode for p in procs]
    logs = '\n'.join((nd / 'launcher.log').read_text(errors='replace')[-3000:] for nd in dirs)
    assert codes == [0, 0], f'{codes}\n{logs}'


def _latest(s3, prefix: str, client):
    try:
        return client.get_object(Bucket=s3.bucket, Key=f'{prefix}/latest')['Body'].read().decode()
    except client.exceptions.NoSuchKey:
        return None


def _fp32(url: str, tag: str, folder: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from prores_algo.training.checkpoint_store import CheckpointStore

    CheckpointStore(url, staging=str(folder)).download(tag)
    return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)


@needs_namespaces
def test_multinode_object_store_checkpoint_node_killed_then_job_restarted(_store, tmp_path, monkeypatch):  # noqa: F811
    store, s3 = _store, _store.s3
    for k in AWS_ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    url_a, url_b = f's3://{s3.bucket}/mnk_a', f's3://{s3.bucket}/mnk_b'
    commands, dirs = _commands(store, tmp_path, 'b1', url_b)
    victim = _spawn(commands, dirs, {**s3.env, 'PRORES_TEST_SLEEP': '1.0'})
    poll = s3.client()
    # node 1 loses its processes once a checkpoint is in the store
    killed = kill_group_when(victim[1], lambda: _latest(s3, 'mnk_b', poll) is not None, dirs[1] / 'launcher.log')
    assert killed['killed'] >= 2  # its launcher and its rank
    # node 0 is left waiting on its lost peer: the job is stopped as a whole
    if victim[0].poll() is None:
        kill_group_when(victim[0], lambda: True, dirs[0] / 'launcher.log')
    tag = _latest(s3, 'mnk_b', poll)
    k = int(tag.removeprefix('global_step'))
    assert 0 < k < STEPS and f'mnk_b/global_step{STEPS}/manifest.json' not in s3.keys('mnk_b/')

    a = _ds_run(store, tmp_path, 'a', [], [f'save_folder={url_a}', f'save_interval={SAVE_EVERY}ba'])
    commands, dirs = _commands(store, tmp_path, 'b2', url_b)  # the same commands, on fresh node-local disks
    _wait_all(_spawn(commands, dirs, s3.env), dirs)
    b = [json.loads((tmp_path / 'b2' / f'summary_{r}.json').read_text()) for r in (0, 1)]
    for sa, sb in zip(a, b, strict=True):
        assert sb['start_step'] == k and sb['resumed_from'] and sb['world_size'] == 2
        for key in ('steps', 'alphas', 'losses', 'lrs'):
            assert sb[key] == sa[key][k:], key
        assert sb['final_eval_loss'] == sa['final_eval_loss'] is not None
    final = f'global_step{STEPS}'
    pa, pb = _fp32(url_a, final, tmp_path / 'pa'), _fp32(url_b, final, tmp_path / 'pb')
    assert pa.keys() == pb.keys() and len(pa) > 0
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name
