"""On-disk layout of a prores token dataset, shared by the writer and the loader.

    out_dir/prores_data.json           metadata (META_FILENAME), written last: its presence marks a complete dataset
    out_dir/{train,val}/index.json     MDS index of each split (SPLITS), listing every shard and its hash
    out_dir/{train,val}/shard.*.mds    samples: one column COLUMN of DTYPE, exactly seq_len tokens each

`read_metadata` says whether a folder holds a complete dataset. A remote dataset holds this layout under
a version prefix, named by a pointer at its URL (versions.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

META_FILENAME = 'prores_data.json'
FORMAT = 'prores_algo/mds-tokens'
FORMAT_VERSION = 1
COLUMN = 'tokens'
DTYPE = 'int32'
SPLITS = ('train', 'val')
# Every shard's hash is written into index.json; `build_dataloader` has streaming check it on every
# download from a remote (a corrupt or replaced object is an error, never silently different data).
HASH_ALGO = 'sha1'
# What a remote dataset's local cache records about its origin (never named prores_data.json: a cache
# is not a complete dataset, whatever it holds, so it must never be read as one).
CACHE_RECORD = 'prores_remote.json'


def read_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The metadata of a *complete* dataset at `path`, or None if there is none.

    Complete means: prores_data.json parses, has our format tag, and every split it lists has an
    index.json. The metadata file is the last thing written before the atomic rename, so a partial
    dataset never has one; a crashed run's temporary folder has a different name altogether.
    """
    p = Path(path)
    try:
        meta = json.loads((p / META_FILENAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get('format') != FORMAT:
        return None
    if not all((p / s / 'index.json').is_file() for s in meta.get('splits', {})):
        return None
    return meta
