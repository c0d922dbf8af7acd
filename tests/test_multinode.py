"""Two nodes on one machine: the launchers users run on real nodes, data streamed from a real S3 server.

Each simulated node is one launcher process tree, started the way a user starts it on each machine:

    composer --world_size W --nproc P --node_rank R --master_addr 127.0.0.1 --master_port PORT SCRIPT ...
    torchrun --nnodes 2 --nproc_per_node P --node_rank R --master_addr 127.0.0.1 --master_port PORT \\
        -m prores_algo.training.deepspeed.loop --config YAML ...

The data is in the object store (moto's S3 server, tests/support/s3_server.py) and every node caches it in a
local folder of its own (`data.local_cache`). What real machines have apart, the simulated nodes get
apart too:

* **/dev/shm.** streaming keeps each dataset's state in POSIX shared memory named `/<prefix>_<name>`;
  the integer prefix is chosen by scanning /dev/shm for the first free one (streaming/base/shared/
  prefix.py). Node identity comes from the environment (streaming/base/world.py: num_nodes =
  WORLD_SIZE // LOCAL_WORLD_SIZE, node = RANK // LOCAL_WORLD_SIZE), but the names carry no node: two
  "nodes" sharing one /dev/shm scan at the same time (a global barrier separates the scan from the
  create), pick the same prefix, and one dies with FileExistsError; prores_algo's machine-wide lock
  (/dev/shm/prores_algo_streaming_shm.lock) would first hold the second node back for its 120 s
  timeout. So each node runs in a private mount namespace with a fresh tmpfs on /dev/shm
  (`unshare --mount`, plus `--map-root-user` when not root): its own shared memory, as on a real
  machine. Network, files and processes stay shared.
* **TMPDIR.** streaming's file locks live in the temp dir (`/tmp/<prefix>_barrier_filelock`, ...) and
  its prefix scan skips prefixes whose lock file exists, so each node gets its own TMPDIR.
* **Caches.** `data.local_cache=<node folder>`: each node downloads what its ranks read.

Checked, for the Composer entry (DDP, 2 x 1) and the DeepSpeed ZeRO-3 entry (2 x 1), plus Composer 2 x 2:
α identical on every rank at every batch (and equal to the schedule); every training sample seen exactly
once in the epoch across all ranks of all nodes; checkpoints written by the right ranks; a resume from the
multi-node checkpoint bitwise equal to the uninterrupted run; and the resumed run finds both nodes'
caches warm: the server's request log shows no request for the dataset while it runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from prores_algo import alpha_schedules
from tests.support.helpers import DIST_ENV, free_port
from tests.support.s3_server import MotoS3, moto_available, process_env

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DRIVER = ROOT / 'tests' / 'support' / 'multinode_driver.py'
ZERO3_JSON = ROOT / 'yamls' / 'deepspeed' / 'zero3.json'
SEQ, N_TRAIN, GLOBAL_BATCH, LAYERS, T_WARMUP = 32, 64, 8, 3, 8
STEPS = N_TRAIN // GLOBAL_BATCH  # one epoch
PREFIX = 'mn'
RUN_TIMEOUT = 900  # s, per launch of all nodes (a CPU-starved CI machine; a run takes ~1 min on 2 idle cores)

pytestmark = pytest.mark.skipif(not moto_available(), reason="needs moto's S3 server: pip install 'moto[server]'")


def _node_wrapper() -> list[str] | None:
    """argv prefix that runs a command as its own machine as far as shared memory goes, or None."""
    unshare = shutil.which('unshare')
    if unshare is None:
        return None
    script = 'mount -t tmpfs -o size=2g,mode=1777 prores-node /dev/shm && exec "$@"'
    base = [unshare, '--mount'] + ([] if os.geteuid() == 0 else ['--map-root-user'])
    wrapper = [*base, 'sh', '-c', script, 'node']
    try:
        probe = subprocess.run([*wrapper, 'true'], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return wrapper if probe.returncode == 0 else None


NODE_WRAPPER = _node_wrapper()
needs_namespaces = pytest.mark.skipif(
    NODE_WRAPPER is None,
    reason='simulating nodes needs a private /dev/shm per node: `unshare --mount` (root) or '
    '`unshare --mount --map-root-user` (unprivileged user namespaces) must work here',
)


# ---------------------------------------------------------------------------------------------------
# the object store and the data
# ---------------------------------------------------------------------------------------------------
def _documents() -> tuple[list[str], list[int]]:
    """Documents of exactly SEQ - 1 bytes: with the byte tokenizer and eos each is exactly one sample, so
    the train split has a known size (N_TRAIN, a multiple of every world size x batch used here)."""
    from prores_algo.training.data import _is_val

    docs, train = [], []
    i = 0
    while len(train) < N_TRAIN:
        docs.append(f'document {i:04d} '.ljust(SEQ - 1, chr(ord('a') + i % 26)))
        if not _is_val(i, 0, 0.1):
            train.append(i)
        i += 1
    return docs, train


def _crc(doc: str) -> int:
    return zlib.crc32(np.array(list(doc.encode()) + [256], dtype=np.int64).tobytes())


@pytest.fixture(scope='module')
def store(tmp_path_factory):
    """A moto S3 server (stopped at teardown) holding the dataset, written by `prores-data --out s3://...`."""
    from prores_algo.training.data import main

    d = tmp_path_factory.mktemp('multinode')
    docs, train = _documents()
    source = d / 'docs.jsonl'
    source.write_text(''.join(json.dumps({'text': t}) + '\n' for t in docs))
    with MotoS3(log=d / 'moto.log') as s3:
        saved = dict(os.environ)
        os.environ.update(s3.env)
        try:
            assert (
                main(
                    [
                        '--source',
                        str(source),
                        '--out',
                        f's3://{s3.bucket}/{PREFIX}',
                        '--tokenizer',
                        'byte',
                        '--seq_len',
                        str(SEQ),
                        '--val_fraction',
                        '0.1',
                        '--no_progress',
                    ]
                )
                == 0
            )
        finally:
            os.environ.clear()
            os.environ.update(saved)
        pointer = s3.client().get_object(Bucket=s3.bucket, Key=f'{PREFIX}/prores_data.json')['Body'].read()
        yield SimpleNamespace(
            s3=s3,
            dir=d,
            url=f's3://{s3.bucket}/{PREFIX}',
            train={_crc(docs[i]) for i in train},
            log=d / 'moto.log',
            version=json.loads(pointer)['version'],  # the version the dataset's pointer names
        )


def _dataset_requests(log: Path, start: int) -> list[str]:
    """Requests for the dataset's objects in the server log after byte offset `start`."""
    text = log.read_bytes()[start:].decode(errors='replace')
    return re.findall(rf'"(?:GET|HEAD) /prores-test/{PREFIX}/[^"]*"', text)


# ---------------------------------------------------------------------------------------------------
# launching nodes
# ---------------------------------------------------------------------------------------------------
def _run_nodes(commands: list[list[str]], node_dirs: list[Path], extra_env: dict[str, str]) -> None:
    """Start every node's launcher at once (each in its own session, /dev/shm and TMPDIR), wait for all;
    on a failure or the timeout, stop every node. Asserts that all exit 0."""
    procs = []
    try:
        for cmd, nd in zip(commands, node_dirs, strict=True):
            (nd / 'tmp').mkdir(parents=True, exist_ok=True)
            env = process_env(extra_env)
            for k in DIST_ENV:
                env.pop(k, None)
            env.update(
                OMP_NUM_THREADS='1',
                MKL_NUM_THREADS='1',
                TMPDIR=str(nd / 'tmp'),
                PYTHONUNBUFFERED='1',
                PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / 'tests' / 'support'), env.get('PYTHONPATH', '')]),
            )
            out = open(nd / 'launcher.log', 'ab')  # noqa: SIM115 (the launcher's log, open while it runs)
            procs.append(
                subprocess.Popen(
                    [*NODE_WRAPPER, *cmd],
                    cwd=ROOT,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            out.close()
        deadline = time.monotonic() + RUN_TIMEOUT
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.5)
        time.sleep(0.5)
    finally:
        for p in procs:  # a node that failed leaves its peers blocked in a collective: stop them all
            if p.poll() is None:
                with _suppress():
                    os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with _suppress():
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
    codes = [p.returncode for p in procs]
    if codes != [0] * len(procs):
        logs = '\n'.join(
            f'--- node {i} (exit {c}) ---\n' + _tail(nd) for i, (c, nd) in enumerate(zip(codes, node_dirs, strict=True))
        )
        pytest.fail(f'nodes exited with {codes}\n{logs}')


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], (ProcessLookupError, PermissionError))


def _tail(nd: Path) -> str:
    parts = []
    for f in sorted(nd.glob('*.log')) + sorted(nd.glob('std*.txt')):
        parts.append(f'[{f.name}]\n' + f.read_text(errors='replace')[-3000:])
    return '\n'.join(parts)


def _composer_run(store, tmp: Path, name: str, nproc: int, overrides: list[str]) -> list[dict]:
    nodes, port = 2, free_port()
    world = nodes * nproc
    out = tmp / name / 'out'
    base = [
        f'data.path={store.url}',
        f'data.seq_len={SEQ}',
        f'model.max_seq_len={SEQ}',
        'model.d_model=32',
        'model.n_heads=4',
        f'model.n_layers={LAYERS}',
        f'global_train_batch_size={GLOBAL_BATCH}',
        f'eval_batch_size={GLOBAL_BATCH // world}',
        'eval_interval=4ba',
        'eval_subset_num_batches=1',
        f'algorithms.prores.t_warmup={T_WARMUP}ba',
        'algorithms.prores.log_interval=1',
        'console_log_interval=100ba',
        'data.shuffle=true',
        f'max_duration={STEPS}ba',
        'save_interval=4ba',
    ]
    commands, dirs = [], []
    for r in range(nodes):
        nd = tmp / name / f'node{r}'
        nd.mkdir(parents=True, exist_ok=True)
        dirs.append(nd)
        commands.append(
            [
                str(BIN / 'composer'),
                '--world_size',
                str(world),
                '--nproc',
                str(nproc),
                '--node_rank',
                str(r),
                '--master_addr',
                '127.0.0.1',
                '--master_port',
                str(port),
                '--stdout',
                f'{nd}/stdout{{rank}}.txt',
                '--stderr',
                f'{nd}/stderr{{rank}}.txt',
                str(DRIVER),
                str(out),
                str(ROOT / 'yamls' / 'quickstart.yaml'),
                *base,
                *overrides,
                f'data.local_cache={tmp / "caches" / f"node{r}"}',
            ]
        )
    _run_nodes(commands, dirs, store.s3.env)
    return [json.loads((out / f'rank{r}.json').read_text()) for r in range(world)]


def _check_alphas(ranks: list[dict], batches) -> None:
    first = ranks[0]['alphas']
    for r in ranks[1:]:
        assert r['alphas'] == first, 'α must be identical on every rank at every batch'
    for b in batches:
        expected = alpha_schedules.alphas('linear', LAYERS, b, T_WARMUP)
        bufs = first[str(b)]
        assert len(bufs) == 2 * LAYERS
        for path, value in bufs.items():
            assert value == pytest.approx(expected[int(path.split('blocks.')[1].split('.')[0])]), (b, path)


def _check_epoch(store, per_rank_batches: list[list[list[int]]]) -> None:
    """Every training sample exactly once over the epoch, across all ranks of all nodes."""
    seen = [crc for batches in per_rank_batches for batch in batches for crc in batch]
    assert len(seen) == N_TRAIN and set(seen) == store.train, (
        f'{len(seen)} samples seen, {len(set(seen))} distinct, expected each of the {N_TRAIN} once'
    )
    # and the ranks did split the data: each saw its equal share
    assert {len([c for b in batches for c in b]) for batches in per_rank_batches} == {N_TRAIN // len(per_rank_batches)}


def _model_state(path: Path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=False)['state']['model']


# ---------------------------------------------------------------------------------------------------
# Composer
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
@needs_namespaces
def test_composer_two_nodes_train_and_exact_resume(store, tmp_path):
    ck_a, ck_b = tmp_path / 'ck_a', tmp_path / 'ck_b'  # the "shared filesystem" both nodes see
    start = store.log.stat().st_size
    a = _composer_run(store, tmp_path, 'a', 1, [f'save_folder={ck_a}'])
    assert [(r['rank'], r['node_rank'], r['local_rank'], r['world_size']) for r in a] == [(0, 0, 0, 2), (1, 1, 0, 2)]
    for r in a:  # streaming sees two nodes of one rank each, and each node used its own cache and temp dir
        assert (r['streaming_nodes'], r['streaming_node'], r['num_canonical_nodes']) == (2, r['node_rank'], 2)
        # the version the pointer named, in its own folder of the node's cache
        assert r['cache'] == str(tmp_path / 'caches' / f'node{r["node_rank"]}' / store.version)
        assert r['tmpdir'] == str(tmp_path / 'a' / f'node{r["node_rank"]}' / 'tmp')
        assert r['dataset_len'] == N_TRAIN // 2
    _check_alphas(a, range(STEPS))
    _check_epoch(store, [[r['samples'][str(b)] for b in range(STEPS)] for r in a])
    # both nodes downloaded (cold caches) ...
    cold = _dataset_requests(store.log, start)
    assert any('/train/shard.' in q for q in cold) and any('/prores_data.json' in q for q in cold)
    for node in (0, 1):
        assert list((tmp_path / 'caches' / f'node{node}').glob('v-*/train/shard.*.mds'))  # the version's folder
    # DDP checkpoints: global rank 0 writes the whole state; no other rank writes a file
    assert sorted(p.name for p in ck_a.iterdir()) == ['ep0-ba4-rank0.pt', 'ep0-ba8-rank0.pt', 'latest-rank0.pt']

    # resume both nodes from the batch-4 checkpoint: warm caches, no request for the data at all
    start = store.log.stat().st_size
    b = _composer_run(store, tmp_path, 'b', 1, [f'save_folder={ck_b}', f'load_path={ck_a}/ep0-ba4-rank0.pt'])
    assert _dataset_requests(store.log, start) == []
    assert sorted(b[0]['alphas'], key=int) == [str(i) for i in range(4, STEPS)]
    for ra, rb in zip(a, b, strict=True):
        assert {k: ra['alphas'][k] for k in rb['alphas']} == rb['alphas']
        assert {k: ra['samples'][k] for k in rb['samples']} == rb['samples'], 'the resumed run must see the same data'
        assert {k: ra['losses'][k] for k in rb['losses']} == rb['losses']
    sa, sb = _model_state(ck_a / 'ep0-ba8-rank0.pt'), _model_state(ck_b / 'ep0-ba8-rank0.pt')
    assert sa.keys() == sb.keys() and sa
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.slow
@needs_namespaces
def test_composer_two_nodes_of_two_processes(store, tmp_path):
    """2 nodes x 2 processes: streaming sees 2 nodes of 2 ranks; the data split and α hold on all 4 ranks."""
    ranks = _composer_run(store, tmp_path, 'a', 2, ['save_folder=null'])
    assert [(r['rank'], r['node_rank'], r['local_rank']) for r in ranks] == [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]
    for r in ranks:
        assert (r['streaming_nodes'], r['streaming_node'], r['world_size']) == (2, r['node_rank'], 4)
    _check_alphas(ranks, range(STEPS))
    _check_epoch(store, [[r['samples'][str(b)] for b in range(STEPS)] for r in ranks])


# ---------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3
# ---------------------------------------------------------------------------------------------------
def _ds_run(store, tmp: Path, name: str, options: list[str], overrides: list[str]) -> list[dict]:
    nodes, nproc, port = 2, 1, free_port()
    commands, dirs = [], []
    for r in range(nodes):
        nd = tmp / name / f'node{r}'
        nd.mkdir(parents=True, exist_ok=True)
        dirs.append(nd)
        commands.append(
            [
                str(BIN / 'torchrun'),
                '--nnodes',
                str(nodes),
                '--nproc_per_node',
                str(nproc),
                '--node_rank',
                str(r),
                '--master_addr',
                '127.0.0.1',
                '--master_port',
                str(port),
                '-m',
                'prores_algo.training.deepspeed.loop',
                '--config',
                str(ROOT / 'yamls' / 'quickstart.yaml'),
                '--deepspeed_config',
                str(ZERO3_JSON),
                '--require_stage3',
                '--record_samples',
                '--summary',
                str(tmp / name / 'summary_{rank}.json'),
                *options,
                *overrides,
                f'data.path={store.url}',
                f'data.seq_len={SEQ}',
                'model.d_model=32',
                'model.n_heads=4',
                f'model.n_layers={LAYERS}',
                f'global_train_batch_size={GLOBAL_BATCH}',
                f'algorithms.prores.t_warmup={T_WARMUP}ba',
                f'max_duration={STEPS}ba',
                'eval_interval=100ba',
                'save_interval=4ba',
                f'data.local_cache={tmp / "caches" / f"node{r}"}',
            ]
        )
    _run_nodes(commands, dirs, store.s3.env)
    return [json.loads((tmp / name / f'summary_{r}.json').read_text()) for r in range(nodes * nproc)]


def _ds_fp32_partitions(folder: Path, rank: int) -> list[torch.Tensor]:
    (f,) = folder.glob(f'*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt')
    sd = torch.load(f, map_location='cpu', weights_only=False)['optimizer_state_dict']
    return list(sd['fp32_flat_groups'])


@pytest.mark.slow
@needs_namespaces
def test_deepspeed_zero3_two_nodes_train_and_exact_resume(store, tmp_path):
    ck = tmp_path / 'ckpt'  # the shared filesystem DeepSpeed checkpoints need
    start = store.log.stat().st_size
    a = _ds_run(store, tmp_path, 'a', [], [f'save_folder={ck}'])
    assert _dataset_requests(store.log, start)  # cold caches: both nodes downloaded
    for s in a:
        assert s['world_size'] == 2 and s['zero_stage'] == 3 and s['train_batch_size'] == GLOBAL_BATCH
        assert s['steps'] == list(range(STEPS))
        p = s['partition_init']
        assert 0 < p['local_numel'] < p['total_numel'] and p['visible_numel'] == 0  # ZeRO-3 really partitions
    assert a[0]['alphas'] == a[1]['alphas']
    for t, alphas in enumerate(a[0]['alphas']):
        assert alphas == alpha_schedules.alphas('linear', LAYERS, t, T_WARMUP)
    _check_epoch(store, [s['samples'] for s in a])
    # ZeRO-3: every rank writes its own partition (model + optimizer states); rank 0 the tag and sidecar
    for tag in ('global_step4', 'global_step8'):
        names = sorted(p.name for p in (ck / tag).iterdir() if p.suffix == '.pt')
        assert names == sorted(
            f'{pre}zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt'
            for r in (0, 1)
            for pre, kind in (('', 'model'), ('', 'optim'))
        ), names
    assert (ck / 'latest').read_text().strip() == 'global_step8'

    start = store.log.stat().st_size
    b = _ds_run(
        store, tmp_path, 'b', ['--load_tag', 'global_step4'], [f'save_folder={tmp_path / "ckpt_b"}', f'load_path={ck}']
    )
    assert _dataset_requests(store.log, start) == []  # warm caches on both nodes
    for sa, sb in zip(a, b, strict=True):
        assert sb['start_step'] == 4 and sb['resumed_from']
        for key in ('steps', 'alphas', 'losses', 'lrs', 'samples'):
            assert sb[key] == sa[key][4:], key
        assert sb['final_eval_loss'] == sa['final_eval_loss']
    for r in (0, 1):  # bitwise: the fp32 master partitions and the Adam state of every rank
        pa = _ds_fp32_partitions(ck / 'global_step8', r)
        pb = _ds_fp32_partitions(tmp_path / 'ckpt_b' / 'global_step8', r)
        assert len(pa) == len(pb) > 0 and all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
