"""`TokenDataset`: a StreamingDataset over prores token shards, with failures that name the shard, and the
machine-wide lock around streaming's shared-memory registration."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from streaming import StreamingDataset

from prores_algo.training.data.layout import COLUMN
from prores_algo.training.data.remote import RemoteDataError, _error_code
from prores_algo.training.data.versions import dataset_root
from prores_algo.warn import warn_user


def _shard_seq_len(shards: list[Any]) -> int:
    """seq_len from the shards' static column encoding 'ndarray:int32:<seq_len>' (works for remotes too)."""
    lens = set()
    for shard in shards:
        names = getattr(shard, 'column_names', None)
        if not names or COLUMN not in names:
            raise ValueError(f'not a prores token dataset: shards have columns {names}, expected {COLUMN!r}')
        enc = shard.column_encodings[names.index(COLUMN)]
        m = re.fullmatch(r'ndarray:(\w+):(\d+)', enc)
        if not m:
            raise ValueError(
                f'not a prores token dataset: column {COLUMN!r} has encoding {enc!r}, '
                "expected 'ndarray:<dtype>:<seq_len>'"
            )
        lens.add(int(m.group(2)))
    if len(lens) != 1:
        raise ValueError(f'shards disagree on seq_len: {sorted(lens)}')
    return lens.pop()


SHM_LOCK_TIMEOUT_S = 120.0
_NOT_FOUND = ('404', 'NoSuchKey', 'NotFound')
# Shared-memory names are machine-wide, so the lock must be too: /dev/shm itself where it exists (the
# temp dir can differ between jobs through TMPDIR).
_SHM_LOCK_DIR = '/dev/shm' if os.path.isdir('/dev/shm') and os.access('/dev/shm', os.W_OK) else tempfile.gettempdir()


@contextlib.contextmanager
def _shm_registration_lock():
    """Serialise StreamingDataset construction across the jobs running on this machine.

    streaming 0.13 registers a dataset's shared memory by scanning for the first free integer prefix
    and then creating `/<prefix>_locals`; the scan and the create are not atomic, so two jobs that
    construct datasets at the same moment pick the same prefix and one dies with
    `FileExistsError: '/000745_locals'`. A machine-wide flock held by streaming's local leader
    across the whole constructor makes scan-and-create atomic between jobs. The other ranks of a job
    never take the lock: they meet their leader at barriers inside the constructor, so waiting on the
    lock as well would deadlock; they take their leader's prefix instead of scanning
    (`_leader_chooses_shm_prefix`). The flock is released if its holder dies; if it cannot be had in
    SHM_LOCK_TIMEOUT_S we go on without it.
    """
    from streaming.base.world import World

    lock = None
    if World.detect().is_local_leader:  # streaming's own notion of the leader (RANK, LOCAL_WORLD_SIZE)
        from filelock import FileLock, Timeout  # a dependency of mosaicml-streaming

        lock = FileLock(os.path.join(_SHM_LOCK_DIR, 'prores_algo_streaming_shm.lock'))
        try:
            lock.acquire(timeout=SHM_LOCK_TIMEOUT_S)
        except Timeout:
            warn_user(
                f'could not take {lock.lock_file} in {SHM_LOCK_TIMEOUT_S:g} s; registering the '
                "dataset's shared memory without it"
            )
            lock = None
    try:
        with _leader_chooses_shm_prefix():
            yield
    finally:
        if lock is not None:
            lock.release()


@contextlib.contextmanager
def _leader_chooses_shm_prefix():
    """Within it, every rank of a distributed job uses the shared-memory prefix its local leader found.

    streaming 0.13 has every rank scan /dev/shm for the first free prefix on its own and expects the
    scans to agree. They need not: a job that exits meanwhile frees its prefixes (its atexit cleanup
    takes no lock), and a non-leader whose scan ran after the free picks a lower prefix than its
    leader registered: 'shared memory prefix=N was not registered by local leader'. Here only the local
    leader scans (under the machine lock), and an all-reduce hands its choice to the ranks of its node;
    streaming's own registration and checks then run unchanged on that prefix. A failing scan on the
    leader (streaming's 'Reused local directory') still reaches the collective, and every rank of every
    node raises, so no rank waits in a barrier for ranks that gave up. One constructor at a time per
    process: the patch is module-wide."""
    import torch.distributed as dist
    from streaming.base import dataset as streaming_dataset
    from streaming.base.shared import prefix as streaming_prefix

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        yield
        return
    with _PATCH_LOCK:
        get_shm_prefix = streaming_dataset.get_shm_prefix
        scan = streaming_prefix._check_and_find_retrying
        streaming_dataset.get_shm_prefix = functools.partial(_leaders_prefix, get_shm_prefix, scan)
        try:
            yield
        finally:
            streaming_dataset.get_shm_prefix = get_shm_prefix


_PATCH_LOCK = threading.Lock()


def _leaders_prefix(get_shm_prefix, scan, streams_local, streams_remote, world, retry=100):
    """streaming's `get_shm_prefix` on the prefix this node's local leader found (see above)."""
    import torch.distributed as dist
    from streaming.base.constant import SHM_TO_CLEAN
    from streaming.base.shared import prefix as streaming_prefix

    streaming_prefix._check_self(streams_local)
    failure, chosen = None, 0
    if world.is_local_leader:
        try:
            chosen = max(scan(streams_local, streams_remote, shm_name=n, retry=retry) for n in SHM_TO_CLEAN)
        except Exception as e:  # reach the collective first: the other ranks wait in it
            failure, chosen = e, -1
    device = torch.device('cpu')
    if dist.get_backend() == 'nccl':
        device = torch.device('cuda', torch.cuda.current_device())
    choices = torch.zeros(dist.get_world_size(), dtype=torch.int64, device=device)
    choices[dist.get_rank()] = chosen
    dist.all_reduce(choices)
    if failure is not None:
        raise failure
    if bool((choices < 0).any()):
        raise RuntimeError("a local leader could not register the dataset's shared memory; its error says why")
    chosen = int(choices[world.node * world.ranks_per_node])
    streaming_prefix._check_and_find_retrying = lambda *args, **kwargs: chosen
    try:
        return get_shm_prefix(streams_local, streams_remote, world, retry)
    finally:
        streaming_prefix._check_and_find_retrying = scan


class TokenDataset(StreamingDataset):
    """StreamingDataset over prores token shards; each sample is {'input_ids': LongTensor (seq_len,)}.

    Keyword arguments are StreamingDataset's (local, remote, split, batch_size, shuffle, ...),
    plus `seq_len` which, if given, must match the shards.
    """

    _shard_error: BaseException | None = None

    def __init__(self, *, seq_len: int | None = None, **kwargs: Any) -> None:
        with _shm_registration_lock():
            super().__init__(**kwargs)
        self.seq_len = _shard_seq_len(self.shards)
        if seq_len is not None and seq_len != self.seq_len:
            raise ValueError(
                f'`seq_len` {seq_len} does not match the dataset, whose samples have '
                f'seq_len={self.seq_len}; set seq_len to {self.seq_len} or rebuild the data'
            )

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, torch.Tensor]:
        try:
            sample = super().get_item(sample_id, retry)
        except RuntimeError as e:
            if self._shard_error is not None:
                raise self._shard_error from e
            raise
        # astype copies: MDS decodes into a read-only buffer, and models want int64 ids anyway.
        return {'input_ids': torch.from_numpy(sample[COLUMN].astype(np.int64))}

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        """streaming's download (and hash check) of one shard, with failures that name the shard's URL.

        A shard that fails its hash check is deleted from the local cache: streaming renames a download
        into place before checking it, and would otherwise take the bad file as present on the next run.
        The shard goes back to 'remote', so other ranks of this node waiting for it do not hang: they
        retry and fail the same way.
        """
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception as e:
            from streaming.base.dataset import _IterState, _ShardState

            stream = self.streams[self.stream_per_shard[shard_id]]
            shard = self.shards[shard_id]
            folder = os.path.join(stream.local, stream.split)
            names = [info.basename for pair in shard.file_pairs for info in pair if info is not None]
            url = f'{stream.remote}/{stream.split}/{names[-1]}' if stream.remote else os.path.join(folder, names[0])
            root = dataset_root(stream.remote or '')
            if 'Checksum failure' in str(e):
                for name in names:
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(folder, name))
                msg = (
                    f'shard {url} failed its {stream.validate_hash} check: the bytes downloaded are not the ones '
                    f'its index.json lists (a corrupt or replaced object). The bad copy was deleted from '
                    f'{folder!r}. Rebuild the dataset at {root} (prores-data --out {root} --overwrite ...) or '
                    'restore the object.'
                )
            else:
                msg = f'could not fetch shard {url} into {folder!r}: {type(e).__name__}: {e}'
                if root != stream.remote and (isinstance(e, FileNotFoundError) or _error_code(e) in _NOT_FOUND):
                    msg += (
                        f'. This version of {root} was probably removed by a later write (a write keeps the '
                        'current and the previous version): a new loader reads the current one'
                    )
            self._shard_states[shard_id] = _ShardState.REMOTE
            self._shard_error = RemoteDataError(msg)
            # streaming's end of epoch waits for its download threads to report their exit, which a thread
            # that raised never does (it would wait forever): mark this epoch's iteration as exited.
            it = getattr(self, '_iterator', None)
            if it is not None:
                with it._lock:
                    it._state = _IterState.EXITED
            raise self._shard_error from e

    def on_exception(self, future: Any) -> None:
        # A shard failure we already reported: stop the other threads without streaming re-raising it in
        # the callback (which only prints a second traceback).
        if self._shard_error is not None and future.exception() is self._shard_error:
            self._event.set()
            return
        super().on_exception(future)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # streaming downloads in a background thread; when it fails, the epoch just ends early and the next
        # one raises 'Background thread failed'. Raise the shard's own error instead, right away.
        if self._shard_error is not None:
            raise self._shard_error
        try:
            yield from super().__iter__()
        except RuntimeError as e:
            if self._shard_error is not None:
                raise self._shard_error from e
            raise
        if self._shard_error is not None:
            raise self._shard_error
