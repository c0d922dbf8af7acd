"""The local dataset folder: path check, the inter-process lock beside it, the hidden temporary sibling a
build is written into, what may be replaced, and the atomic move into place."""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from prores_algo.training.data.layout import META_FILENAME, SPLITS, read_metadata
from prores_algo.training.recipe import is_url

_TMP_MARK = '.prores-tmp-'


def _out_path(out_dir: Any) -> Path:
    if not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir):
        raise ValueError(f'`out_dir` must be a local folder path, got {out_dir!r}')
    if is_url(str(out_dir)):
        raise ValueError(
            f'`out_dir` {str(out_dir)!r}: only local folders can be built here; write to an object '
            "store with write_mds(..., out_dir='s3://...') or `prores-data --out s3://...`"
        )
    return Path(out_dir).expanduser().resolve()


def _lock(out: Path):
    """Inter-process lock beside out_dir: concurrent builders (e.g. every rank of a distributed job
    calling ensure_dataset) serialize, so one builds and the others then reuse, and no run deletes
    another live run's temporary folder."""
    from filelock import FileLock  # a dependency of mosaicml-streaming

    out.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(out.parent / f'.{out.name}.prores-lock'))


def _clean_stale_tmp(out: Path) -> None:
    # Only called with the lock held, so any folder matching the pattern is from a dead run.
    for p in out.parent.glob(f'.{glob.escape(out.name)}{_TMP_MARK}*'):
        shutil.rmtree(p, ignore_errors=True)


def _looks_like_ours(out: Path) -> bool:
    """Only an empty folder or something shaped like our output may be replaced (never e.g. $HOME)."""
    return all(c.name in (*SPLITS, META_FILENAME) or c.name.startswith('.') for c in out.iterdir())


def _check_replaceable(out: Path, overwrite: bool, name: str) -> None:
    """ValueError unless `out` is absent, empty, or an earlier dataset of ours (which needs `overwrite`);
    `name` is the argument that named it."""
    if out.exists():
        if not out.is_dir():
            raise ValueError(f'{name} {str(out)!r} exists and is not a folder')
        if read_metadata(out) is not None and not overwrite:
            raise ValueError(
                f'{name} {str(out)!r} already holds a dataset; pass overwrite=True (--overwrite) '
                'to replace it, or choose another folder'
            )
        if any(out.iterdir()) and not _looks_like_ours(out):
            raise ValueError(
                f'{name} {str(out)!r} exists and holds other files; refusing to replace it '
                '(even with overwrite); choose an empty or new folder'
            )


def _staging_folder(out: Path | None) -> Path:
    """Where a build is written: a hidden sibling of `out`, or (no local copy kept) a new temporary folder."""
    if out is not None:
        return out.parent / f'.{out.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}'
    return Path(tempfile.mkdtemp(prefix='prores-data-upload-'))


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the complete `tmp` to `out`, replacing an earlier dataset there.

    A reader that opens `out` afterwards sees the new dataset whole; between the two renames `out` is
    briefly absent (such a reader fails with 'not a folder', never reads a mix). A reader that is still
    reading the old dataset's shards reads them by name, so it would get the new files: local folders
    give no protection to readers in flight (a remote dataset keeps its previous version for them)."""
    if out.exists():
        # Move the old folder aside first (rename onto a non-empty folder fails), then drop it.
        trash = out.parent / f'.{out.name}{_TMP_MARK}old-{uuid.uuid4().hex[:8]}'
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)
