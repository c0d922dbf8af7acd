"""Versions of a remote dataset, so that an overwrite is atomic for its readers.

    <url>/prores_data.json                   the pointer: the current version's metadata plus `"version": "v-..."`
    <url>/v-<16 hex>/prores_data.json        that version's own metadata (the version is a flat dataset)
    <url>/v-<16 hex>/{train,val}/...         its MDS indexes and shards

A write uploads a whole new version under a fresh prefix, then the pointer in one PUT (a single object
is replaced atomically by S3 and the stores streaming supports), then deletes what is neither the new
version nor the one the pointer named before. A reader resolves the pointer once and then reads only
that version, so it sees the old dataset or the new one, each whole; a write that dies before its
pointer leaves the old dataset current. Keeping the previous version lets a reader that resolved it
just before an overwrite finish downloading; a second completed overwrite removes it. A dataset
written before versions existed (index files directly under <url>) is read as it is, and kept as the
previous version by the first versioned write. One writer per URL at a time: a concurrent write's
unfinished version is deleted as debris.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterable
from typing import Any

from prores_algo.training.data.layout import META_FILENAME, SPLITS

VERSION_KEY = 'version'
_VERSION_RE = re.compile(r'v-[0-9a-f]{16}')


def new_version() -> str:
    return f'v-{uuid.uuid4().hex[:16]}'


def is_version(name: str) -> bool:
    return _VERSION_RE.fullmatch(name) is not None


def version_of(meta: dict[str, Any]) -> str | None:
    """The version a pointer names (None: a flat dataset); ValueError if the field is not a version name,
    which would otherwise let the pointer send readers anywhere under the bucket."""
    version = meta.get(VERSION_KEY)
    if version is not None and not (isinstance(version, str) and is_version(version)):
        raise ValueError(f'{META_FILENAME} names version {version!r}, which is not of the form v-<16 hex digits>')
    return version


def stream_paths(remote: str, local: str, meta: dict[str, Any]) -> tuple[str, str]:
    """(local, remote) for StreamingDataset: a cache folder of the version's own, so shards and index files
    of two versions never meet in one folder, and the version's prefix."""
    version = version_of(meta)
    if version is None:
        return local, remote
    return os.path.join(local, version), f'{remote}/{version}'


def dataset_root(url: str) -> str:
    """The URL a user writes for the dataset that `url` (perhaps one of its versions) belongs to."""
    head, _, last = url.rstrip('/').rpartition('/')
    return head if head and is_version(last) else url


def ours(key: str) -> bool:
    """Whether an object name (relative to the dataset URL) belongs to a dataset layout, flat or versioned."""
    first = key.split('/', 1)[0]
    return key == META_FILENAME or first in SPLITS or is_version(first)


def stale_keys(keys: Iterable[str], keep: set[str]) -> list[str]:
    """What to delete once the pointer has moved: every object but the pointer and those whose first path
    part (a version, or a split folder of a flat dataset) is in `keep`."""
    return [k for k in keys if k != META_FILENAME and k.split('/', 1)[0] not in keep]
