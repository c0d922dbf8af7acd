"""Loading: `build_dataloader` (a local folder read in place, or a URL streamed into a local cache) and
`verify_local_split`; a remote dataset's cache records where it came from."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch

from prores_algo.training.data.layout import CACHE_RECORD, HASH_ALGO, META_FILENAME, SPLITS, read_metadata
from prores_algo.training.data.remote import RemoteDataError, _remote_metadata, _remote_read_error
from prores_algo.training.data.token_dataset import TokenDataset
from prores_algo.training.data.versions import stream_paths
from prores_algo.training.recipe import is_url
from prores_algo.warn import warn_user


def _num_tokens_in_batch(batch: dict[str, torch.Tensor]) -> int:
    # Module-level (not a lambda) so the DataSpec stays picklable.
    return int(batch['input_ids'].numel())


def _default_cache_dir(remote: str) -> str:
    # Deterministic, so every rank of a job picks the same `local` (streaming requires that).
    key = hashlib.sha1(remote.rstrip('/').encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), 'prores_algo_streaming', key)


def _cache_record(local: str, remote: str) -> dict[str, Any] | None:
    """The metadata a warm `local` cache recorded for `remote` (None when cold). A cache that belongs to
    another remote is an error: streaming would serve that remote's cached shards as this one's."""
    try:
        record = json.loads(Path(local, CACHE_RECORD).read_text())
    except (OSError, ValueError):
        record = None
    if isinstance(record, dict) and isinstance(record.get('meta'), dict):
        if record.get('remote') != remote:
            raise RemoteDataError(
                f'`local_cache` {local!r} holds a cache of {record.get("remote")!r}, not of '
                f'{remote!r}; use a separate local_cache for each remote dataset'
            )
        return record['meta']
    stray = [s for s in SPLITS if os.path.exists(os.path.join(local, s, 'index.json'))]
    if stray:
        warn_user(
            f'`local_cache` {local!r} holds {stray} index files but no {CACHE_RECORD}: assuming they are '
            f'a cache of {remote!r} (an earlier run stopped before recording it)'
        )
    return None


def _write_cache_record(local: str, remote: str, meta: dict[str, Any]) -> None:
    # Atomic (unique temporary name, then rename): every rank on a node may write it at once.
    if not os.path.isdir(local):
        return
    tmp = os.path.join(local, f'.{CACHE_RECORD}.{os.getpid()}-{uuid.uuid4().hex[:8]}')
    with open(tmp, 'w') as f:
        json.dump({'remote': remote, 'meta': meta}, f, indent=1)
    os.replace(tmp, os.path.join(local, CACHE_RECORD))


def _check_meta(meta: dict[str, Any], where: str, seq_len: int | None, vocab_size: int | None) -> None:
    if seq_len is not None and meta.get('seq_len') is not None and seq_len != meta['seq_len']:
        raise ValueError(
            f'`seq_len` {seq_len} does not match the dataset at {where!r}, built with '
            f'seq_len={meta["seq_len"]}; set seq_len to {meta["seq_len"]} or rebuild the data'
        )
    if vocab_size is not None and meta.get('vocab_size') is not None and vocab_size < meta['vocab_size']:
        raise ValueError(
            f"the model's `vocab_size` {vocab_size} is smaller than the dataset's tokenizer vocab "
            f'({meta.get("tokenizer")!r}: {meta["vocab_size"]} ids) at {where!r}; token ids would '
            f'overflow the embedding. Set vocab_size >= {meta["vocab_size"]}.'
        )


def verify_local_split(path: str | os.PathLike, split: str) -> int:
    """Check that every shard `path/split/index.json` lists is on disk with the size it lists; returns
    the number of shards. Raises ValueError naming the shard and the fix.

    Catches truncated or missing shard files (an interrupted copy or sync, a full disk) when the loader
    is built, instead of a cryptic decode error partway through an epoch. Costs one stat per shard; it
    does not hash the contents, so a same-size corruption is not detected here.
    """
    folder = Path(path) / split
    fix = (
        f'rebuild it (`prores-data --out {str(path)} --overwrite ...`, same settings) or copy it again from '
        'where it was built'
    )
    try:
        index = json.loads((folder / 'index.json').read_text())
        shards = index['shards']
        if not isinstance(shards, list):
            raise TypeError('`shards` is not a list')
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f'{str(folder / "index.json")!r} is not a valid MDS index ({type(e).__name__}: {e}): '
            f'the dataset is damaged; {fix}'
        ) from None
    for shard in shards:
        try:
            files = [(shard[k]['basename'], int(shard[k]['bytes'])) for k in ('raw_data', 'zip_data') if shard.get(k)]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f'{str(folder / "index.json")!r} has a malformed shard entry ({type(e).__name__}: {e}): '
                f'the dataset is damaged; {fix}'
            ) from None
        present = 0
        for basename, expected in files:
            f = folder / basename
            if not f.is_file():
                continue
            present += 1
            size = f.stat().st_size
            if size != expected:
                raise ValueError(
                    f'shard {str(f)!r} has {size} bytes but its index.json lists {expected}: the file '
                    f'is truncated or damaged; {fix}'
                )
        if not present:
            raise ValueError(
                f'shard {files[0][0] if files else "?"!r} listed in {str(folder / "index.json")!r} is '
                f'missing from {str(folder)!r}; {fix}'
            )
    return len(shards)


def _remote_source(path_or_remote: str, local_cache: str | None) -> tuple[str, str, dict[str, Any], bool]:
    """A URL's remote, its local cache folder, the dataset's metadata (the same on every rank, naming the
    version to read), and whether this process's cache had already recorded exactly that."""
    remote = path_or_remote.rstrip('/')
    local = os.path.abspath(os.path.expanduser(local_cache)) if local_cache else _default_cache_dir(remote)
    try:
        own, failed = _cache_record(local, remote), None  # a warm cache needs no request to the store at all
    except RemoteDataError as e:
        own, failed = None, e

    def resolve() -> dict[str, Any]:
        if failed is not None:
            raise failed
        return own if own is not None else _remote_metadata(remote)

    meta = _agree_on_meta(resolve)  # every rank takes part before any raises, so none waits forever
    if failed is not None:
        raise failed
    return remote, local, meta, own == meta


def _agree_on_meta(resolve: Any) -> dict[str, Any]:
    """`resolve()` (the dataset's metadata, naming its version) on global rank 0, the same answer on every
    rank: ranks that each read the pointer could straddle an overwrite and read two different versions.
    An error on rank 0 is raised on every rank (as RemoteDataError naming it), so none waits forever."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return resolve()
    box: list[Any] = [None]
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            box[0] = ('ok', resolve())
        except Exception as e:
            error = e
            box[0] = ('error', f'{type(e).__name__}: {e}')
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == 'ok':
        return value
    if error is not None:
        raise error
    raise RemoteDataError(f'rank 0 could not read the dataset: {value}')


def _local_source(path_or_remote: str, split: str) -> tuple[str, dict[str, Any] | None]:
    """A local folder, checked to hold `split` with all its shards, and its metadata (None: incomplete)."""
    local_path = Path(path_or_remote).expanduser().resolve()
    if not local_path.is_dir():
        raise FileNotFoundError(
            f'data path {path_or_remote!r} is not a folder; build it with '
            f'`prores-data --out {path_or_remote}` (or prores_algo.training.data.ensure_dataset)'
        )
    if not (local_path / split / 'index.json').is_file():
        have = sorted(p.name for p in local_path.iterdir() if (p / 'index.json').is_file())
        raise FileNotFoundError(
            f'split {split!r} not found under {str(local_path)!r} (no {split}/index.json; splits present: {have})'
        )
    verify_local_split(local_path, split)
    meta = read_metadata(local_path)
    if meta is None:
        warn_user(f'{str(local_path)!r} has no complete {META_FILENAME}; skipping the vocab_size check')
    return str(local_path), meta


def _open_dataset(
    local: str,
    remote: str | None,
    where: str,
    split: str,
    meta: dict[str, Any] | None,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    seq_len: int | None,
) -> TokenDataset:
    """The TokenDataset, with construction errors that say what to do (a reused cache, a shared-memory
    race, a remote that cannot be read)."""
    extra = {}
    if remote is not None:
        # Shards are checked against the hashes in index.json as they are downloaded (datasets written
        # before hashes were recorded are read unchecked).
        extra['validate_hash'] = HASH_ALGO if HASH_ALGO in (meta or {}).get('hashes', ()) else None
    try:
        dataset = TokenDataset(
            local=local,
            remote=remote,
            split=split,
            batch_size=batch_size,
            shuffle=shuffle,
            shuffle_seed=seed,
            seq_len=seq_len,
            **extra,
        )
    except ValueError as e:
        if 'Reused local directory' in str(e):
            raise ValueError(
                f'{e}\nAnother live loader uses the cache {local!r} for {where!r}/{split}; pass a '
                'distinct `local_cache`.'
            ) from e
        raise
    except FileExistsError as e:
        if '_locals' not in str(e):
            raise
        raise RuntimeError(
            f'{e}: another process on this machine registered streaming shared memory under the same '
            'name at the same moment. Several simulated nodes on one machine need a /dev/shm each '
            "(docs/multi-node.md, 'Two nodes on one machine')."
        ) from e
    except Exception as e:
        remote_side = type(e).__module__.split('.')[0] in (
            'botocore',
            'boto3',
            's3transfer',
            'urllib3',
            'google',
            'azure',
            'oci',
        ) or (remote is not None and remote in str(e))
        if remote is None or not remote_side:
            raise
        # e.g. the split's index.json is missing remotely, or the store went away since the metadata
        raise _remote_read_error(where, f'{remote}/{split}/index.json', e) from e
    return dataset


def build_dataloader(
    path_or_remote: str,
    split: str,
    batch_size: int,
    *,
    seq_len: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    local_cache: str | None = None,
    drop_last: bool = True,
    vocab_size: int | None = None,
):
    """A composer `DataSpec` over `path_or_remote/split`; batches are {'input_ids': LongTensor (B, seq_len)}.

    `batch_size` is per device: StreamingDataset partitions samples across ranks (read from the
    torch.distributed env vars) and needs it for that. A local folder is read in place
    (local=path, remote=None); a URL (s3://, gs://, oci://, hf://, https://, ...) is streamed into
    `local_cache` (default: a deterministic folder under the system temp dir). For a URL the
    dataset's prores_data.json must be there (it is uploaded last: no metadata, no complete dataset;
    RemoteDataError names the URL and the cause) and names the version to read (versions.py; rank 0
    resolves it for every rank), cached in a subfolder of its own. Shards are checked against the hashes
    in index.json as they are downloaded; the metadata is recorded in the cache (CACHE_RECORD), so a warm
    cache makes no request to the store at all (and keeps reading the version it recorded).
    `seq_len` / `vocab_size`, when given, are checked against the dataset before training starts.

    Shared memory (streaming 0.13): every StreamingDataset registers shared memory under a fresh
    integer prefix. With remote=None the local folder is *not* checked for reuse, so any number of
    loaders over the same local folder can coexist in one process (tests rely on this) with no
    cleanup. With a remote, two live datasets on the same local cache + split raise 'Reused local
    directory'; pass distinct `local_cache`s. We never call
    `streaming.base.util.clean_stale_shared_memory()` here: it unlinks the shared memory of *every*
    dataset in the process, including live ones (e.g. the train loader while building eval).
    Call it once at program start if a killed run left stale segments behind.
    """
    from composer.core import DataSpec

    if not isinstance(path_or_remote, (str, os.PathLike)) or not str(path_or_remote):
        raise ValueError(f'data path must be a local folder or a URL, got {path_or_remote!r}')
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f'`batch_size` must be a positive int, got {batch_size!r}')
    path_or_remote = str(path_or_remote)
    cached = True
    if is_url(path_or_remote):
        remote, local, meta, cached = _remote_source(path_or_remote, local_cache)
        where, stream = remote, stream_paths(remote, local, meta)  # the version the pointer names
    else:
        local, meta = _local_source(path_or_remote, split)
        remote, where, stream = None, local, (local, None)
    if meta is not None:
        _check_meta(meta, where, seq_len, vocab_size)
    if remote is not None and isinstance(meta.get('splits'), dict) and split not in meta['splits']:
        raise FileNotFoundError(f'split {split!r} not found at {remote} (splits present: {sorted(meta["splits"])})')
    dataset = _open_dataset(
        *stream, where, split, meta, batch_size=batch_size, shuffle=shuffle, seed=seed, seq_len=seq_len
    )
    if not cached:
        _write_cache_record(local, remote, meta)
    n = len(dataset)  # samples this rank will see per epoch
    if drop_last and n < batch_size:
        raise ValueError(
            f'split {split!r} at {where!r} has {n} samples per rank, fewer than `batch_size` '
            f'{batch_size}, so drop_last=True would yield no batch. Lower batch_size, pass '
            'drop_last=False, or rebuild with more data / a larger val_fraction.'
        )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
    )
    n_batches = n // batch_size if drop_last else -(-n // batch_size)
    n_samples = n_batches * batch_size if drop_last else n
    return DataSpec(
        loader,
        num_samples=n_samples,
        num_tokens=n_samples * dataset.seq_len,
        get_num_tokens_in_batch=_num_tokens_in_batch,
    )
