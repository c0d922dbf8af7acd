"""Writing MDS: `write_mds` (a local folder, written atomically, or an object-store URL through
streaming's uploader) and `ensure_dataset` (reuse a dataset built with the same settings, else build it)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prores_algo.training.data.layout import (
    COLUMN,
    DTYPE,
    FORMAT,
    FORMAT_VERSION,
    HASH_ALGO,
    META_FILENAME,
    read_metadata,
)
from prores_algo.training.data.local_folder import (
    _check_replaceable,
    _clean_stale_tmp,
    _lock,
    _move_into_place,
    _out_path,
    _staging_folder,
)
from prores_algo.training.data.packing import _check_samples, _pack_documents, _Packer
from prores_algo.training.data.remote import (
    RemoteDataError,
    _remote_metadata_if_any,
    _remote_write_error,
    _RemoteOut,
    _split_url,
)
from prores_algo.training.data.settings import (
    _checked_tokenizer,
    _normalize_tokenizer_name,
    _requested_settings,
    _validate_args,
)
from prores_algo.training.data.sources import _normalize_source, iter_documents
from prores_algo.training.data.versions import VERSION_KEY, new_version, stale_keys
from prores_algo.training.recipe import is_url
from prores_algo.warn import warn_user


class _UploadErrors:
    """Mixin for streaming's MDSWriter that keeps the first upload error (streaming only logs it and then
    raises a bare 'One of the threads failed')."""

    upload_error: BaseException | None = None

    def exception_callback(self, future: Any) -> None:
        if future.exception() is not None and self.upload_error is None:
            self.upload_error = future.exception()
        super().exception_callback(future)  # type: ignore[misc]


@contextlib.contextmanager
def _finish_on_success(writer: Any) -> Iterator[Any]:
    """MDSWriter's own __exit__ calls finish() even while an exception propagates, which writes (and, to a
    remote, uploads) a valid-looking index.json over a partial split. Finish only on success; on error
    cancel the queued uploads and wait for the running ones, so nothing is uploaded after we return."""
    try:
        yield writer
    except BaseException:
        writer.executor.shutdown(wait=True, cancel_futures=True)
        raise
    writer.finish()


def _write_splits(
    docs: Iterator[str],
    tok: Any,
    tmp: Path,
    splits: tuple[str, ...],
    writers: dict[str, Any],
    *,
    remote: str | None,
    keep_local: bool,
    seq_len: int,
    val_fraction: float,
    max_tokens: int | None,
    compression: str | None,
    seed: int,
    progress: bool,
    desc: str,
) -> dict[str, dict[str, int]]:
    """Tokenize and pack `docs` into one MDS writer per split under `tmp` (with `remote`, each shard is
    uploaded as it is written). `writers` is filled as the writers open, so that the caller still sees
    their upload errors after a failure. Returns each split's packing summary."""
    from streaming import MDSWriter
    from tqdm.auto import tqdm

    class Writer(_UploadErrors, MDSWriter):
        pass

    columns = {COLUMN: f'ndarray:{DTYPE}:{seq_len}'}  # static dtype and shape: no per-sample header
    with contextlib.ExitStack() as stack:
        for s in splits:
            # With a remote, streaming uploads each shard as soon as it is written (and drops the local
            # file unless a local copy is kept); index.json goes up when the split is finished.
            target = (str(tmp / s), f'{remote}/{s}') if remote else str(tmp / s)
            writers[s] = stack.enter_context(
                _finish_on_success(
                    Writer(
                        out=target, columns=columns, compression=compression, hashes=[HASH_ALGO], keep_local=keep_local
                    )
                )
            )
        packers = {s: _Packer(writers[s], seq_len) for s in splits}
        bar = stack.enter_context(
            tqdm(
                total=max_tokens,
                unit='tok',
                unit_scale=True,
                desc=f'prores-data {desc}',
                disable=not progress,
                dynamic_ncols=True,
            )
        )
        _pack_documents(docs, tok, packers, bar, max_tokens, seed, val_fraction)
    return {s: p.summary() for s, p in packers.items()}


def _metadata(
    source: str,
    tok: Any,
    seq_len: int,
    val_fraction: float,
    max_tokens: int | None,
    max_bytes: int | None,
    seed: int,
    compression: str | None,
    summary: dict[str, dict[str, int]],
) -> dict[str, Any]:
    """What prores_data.json records: the format, the settings that determine the samples, and each split's counts."""
    return {
        'format': FORMAT,
        'format_version': FORMAT_VERSION,
        'source': _normalize_source(source),
        'tokenizer': _normalize_tokenizer_name(tok.name),
        'vocab_size': int(tok.vocab_size),
        'eos_token_id': int(tok.eos_token_id),
        'seq_len': seq_len,
        'val_fraction': float(val_fraction),
        'max_tokens': max_tokens,
        'max_bytes': max_bytes,
        'seed': seed,
        'compression': compression,
        'hashes': [HASH_ALGO],
        'column': COLUMN,
        'dtype': DTYPE,
        'python': sys.version.split()[0],  # informative: what 'stdlib' meant when this was built
        'splits': summary,
    }


def _publish_remote(dest: _RemoteOut, version: str, meta: dict[str, Any], found: list[str], keep: set[str]) -> None:
    """The pointer to the complete `version`, in one PUT: from that moment readers resolve the new version.
    Then delete what was found before the write and is no longer kept (older versions, debris of
    interrupted writes); if that fails the dataset is still complete: warn."""
    dest.put_json(META_FILENAME, {**meta, VERSION_KEY: version})
    stale = stale_keys(found, keep)
    try:
        dest.delete(stale)
    except RemoteDataError as e:
        warn_user(f'wrote {dest.url} (version {version}) but could not delete {len(stale)} old objects: {e}')


def _remote_write(
    remote: str, overwrite: bool, write: Callable[[str | None, dict[str, Any]], dict[str, Any]]
) -> dict[str, Any]:
    """Write a new version of the dataset at `remote`, then move the pointer to it. `write(url, writers)`
    writes and uploads the splits under `url` (the version's prefix), filling `writers` as they open,
    and returns the metadata. If the version cannot be completed its objects are deleted (the current
    dataset was never touched); once the pointer upload has been tried, nothing of the version is (the
    store may have taken it), and a later write removes what is not current."""
    dest = _RemoteOut(remote)  # checks the bucket and the credentials before any tokenizing
    version = new_version()
    writers: dict[str, Any] = {}
    try:
        found, keep = dest.prepare(overwrite)
        try:
            meta = write(f'{remote}/{version}', writers)
            dest.put_json(f'{version}/{META_FILENAME}', meta)  # the version is a complete dataset of its own
        except BaseException as e:
            with contextlib.suppress(Exception):
                dest.delete([k for k in dest.object_keys() if k.startswith(f'{version}/')])
            failed = next((w.upload_error for w in writers.values() if w.upload_error is not None), None)
            if failed is not None and not isinstance(e, RemoteDataError):
                raise _remote_write_error(remote, failed) from e
            raise
        _publish_remote(dest, version, meta, found, keep | {version})
        return {**meta, VERSION_KEY: version}
    finally:
        dest.close()


def _build(
    source: str,
    out: Path | None,
    tokenizer: Any,
    seq_len: int,
    val_fraction: float,
    max_tokens: int | None,
    compression: str | None,
    seed: int,
    max_bytes: int | None,
    overwrite: bool,
    progress: bool,
    remote: str | None = None,
) -> dict[str, Any]:
    """Write the dataset; caller holds the lock (of `out`) and has validated the arguments.

    `remote` (a URL): a new version goes there through streaming's uploader, shard by shard as they are
    written, then the pointer to it (see versions.py); `out` is an optional complete local copy (None:
    staged in a temporary folder, deleted as uploaded).
    """
    if out is not None:
        _check_replaceable(out, overwrite, '`keep_local`' if remote else '`out_dir`')
        _clean_stale_tmp(out)
    tok = _checked_tokenizer(tokenizer)
    docs = iter_documents(source, max_bytes=max_bytes)  # checks the source before anything is written
    splits = ('train', 'val') if val_fraction > 0 else ('train',)
    # Everything is written into a hidden sibling and renamed into place only when complete: MDSWriter's
    # __exit__ calls finish() even while an exception propagates, which would otherwise leave a
    # valid-looking index.json over a partial dataset at out_dir.
    tmp = _staging_folder(out)

    def write(url: str | None, writers: dict[str, Any]) -> dict[str, Any]:
        summary = _write_splits(
            docs,
            tok,
            tmp,
            splits,
            writers,
            remote=url,
            keep_local=out is not None,
            seq_len=seq_len,
            val_fraction=val_fraction,
            max_tokens=max_tokens,
            compression=compression,
            seed=seed,
            progress=progress,
            desc=out.name if out is not None else remote,
        )
        _check_samples(summary, seq_len, max_tokens, max_bytes, val_fraction)
        meta = _metadata(source, tok, seq_len, val_fraction, max_tokens, max_bytes, seed, compression, summary)
        # Metadata last: its presence (plus the index files) is what read_metadata calls complete.
        (tmp / META_FILENAME).write_text(json.dumps(meta, indent=2) + '\n')
        return meta

    try:
        meta = write(None, {}) if remote is None else _remote_write(remote, overwrite, write)
        if out is None:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            _move_into_place(tmp, out)
        return meta
    except BaseException:
        # Includes KeyboardInterrupt. A hard kill leaves `tmp`; the next run's _clean_stale_tmp removes it.
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remote_url(out_dir: Any) -> str | None:
    """`out_dir` without a trailing slash if it is a URL (None: a local folder); ValueError if it has no bucket."""
    if not (isinstance(out_dir, str) and is_url(out_dir)):
        return None
    if not _split_url(out_dir)[1]:
        raise ValueError(f'`out_dir` {out_dir!r}: a URL needs a bucket, e.g. s3://bucket/prefix')
    return out_dir.rstrip('/')


def write_mds(
    source: str,
    out_dir: str | os.PathLike,
    tokenizer: str = 'byte',
    seq_len: int = 128,
    val_fraction: float = 0.05,
    max_tokens: int | None = None,
    compression: str | None = None,
    seed: int = 0,
    *,
    max_bytes: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    keep_local: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Tokenize `source`, pack into samples of exactly `seq_len` tokens, write `out_dir/{train,val}` MDS shards.

    Each document's tokens are followed by eos; documents go to val when a stable hash of
    (seed, document index) falls below `val_fraction` (0: no val split); each split's stream is cut
    into seq_len rows and its remainder dropped. `max_tokens` caps the tokens read (both splits,
    eos included); `max_bytes` caps the text read. The write is atomic (temporary sibling folder,
    renamed when complete). Refuses to replace an existing dataset unless `overwrite`.

    `out_dir` may be an object-store URL (`s3://bucket/prefix`; S3_ENDPOINT_URL selects an
    S3-compatible store): streaming's uploader sends each shard up as it is written. The bucket and
    credentials are checked before any tokenizing. The write goes under a new version prefix and
    `prores_data.json`, the pointer to it, is uploaded last in one PUT, so readers see the old dataset
    or the new one, whole (versions.py); a failed write deletes what it uploaded. With `keep_local`
    (a folder) a complete local copy is also kept, written atomically as above; without it the shards
    are staged in a temporary folder and dropped once uploaded.

    Returns the metadata dict also written to `out_dir/prores_data.json` (for a URL, the pointer: it
    adds the `version` written).
    """
    _validate_args(seq_len, val_fraction, max_tokens, compression, seed)
    remote = _remote_url(out_dir)
    if remote is not None:
        if keep_local is None:
            return _build(
                source,
                None,
                tokenizer,
                seq_len,
                val_fraction,
                max_tokens,
                compression,
                seed,
                max_bytes,
                overwrite,
                progress,
                remote=remote,
            )
        out = _out_path(keep_local)
        with _lock(out):
            return _build(
                source,
                out,
                tokenizer,
                seq_len,
                val_fraction,
                max_tokens,
                compression,
                seed,
                max_bytes,
                overwrite,
                progress,
                remote=remote,
            )
    if keep_local is not None:
        raise ValueError('`keep_local` is for a remote `out_dir` (s3://...); a local `out_dir` is the local copy')
    out = _out_path(out_dir)
    with _lock(out):
        return _build(
            source, out, tokenizer, seq_len, val_fraction, max_tokens, compression, seed, max_bytes, overwrite, progress
        )


def ensure_dataset(
    source: str,
    out_dir: str | os.PathLike,
    tokenizer: str = 'byte',
    seq_len: int = 128,
    val_fraction: float = 0.05,
    max_tokens: int | None = None,
    compression: str | None = None,
    seed: int = 0,
    *,
    max_bytes: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Reuse the dataset at `out_dir` if it was built with the same settings, else build it.

    Raises ValueError listing the differing fields if `out_dir` holds a dataset built differently
    (never silently rebuilds: a training run must not change data under a checkpoint's feet).
    A local `out_dir` is safe to call from every rank at once: builders serialize on a file lock beside
    it. A URL is checked against the metadata its pointer names (the current version) and, if it holds
    no dataset, built by this process: call it from one process only (no lock spans machines).
    """
    _validate_args(seq_len, val_fraction, max_tokens, compression, seed)
    remote = _remote_url(out_dir)
    out = None if remote is not None else _out_path(out_dir)
    want = _requested_settings(source, tokenizer, seq_len, val_fraction, max_tokens, max_bytes, seed)

    def check(meta: dict[str, Any]) -> dict[str, Any]:
        diff = [f'{k}: dataset has {meta.get(k)!r}, requested {v!r}' for k, v in want.items() if meta.get(k) != v]
        if diff:
            raise ValueError(
                f'`out_dir` {remote or str(out)!r} holds a dataset built with different settings '
                f'({"; ".join(diff)}). Use another out_dir, or rebuild it with '
                'write_mds(..., overwrite=True) / prores-data --overwrite.'
            )
        return meta

    args = (source, out, tokenizer, seq_len, val_fraction, max_tokens, compression, seed, max_bytes, False, progress)
    if remote is not None:
        meta = _remote_metadata_if_any(remote)
        return check(meta) if meta is not None else _build(*args, remote=remote)
    # Lock-free fast path: datasets appear atomically, so a complete one can be read without the
    # lock (which also lets a prebuilt dataset live in a read-only folder).
    meta = read_metadata(out)
    if meta is not None:
        return check(meta)
    with _lock(out):
        meta = read_metadata(out)  # another process may have built it while we waited
        if meta is not None:
            return check(meta)
        return _build(*args)
