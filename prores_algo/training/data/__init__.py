"""Data layer: text sources -> packed token samples in MDS shards -> StreamingDataset loaders.

Pipeline::

    iter_documents(source)            str documents, deterministic order
      -> tokenizer.encode + [eos]     (prores_algo.training.tokenizers)
      -> split by document            stable hash of (seed, document index) -> train / val
      -> pack                         each split's token stream cut into samples of exactly seq_len
      -> MDSWriter                    out_dir/{train,val}/ shards + index.json, out_dir/prores_data.json
    build_dataloader(out_dir, split)  TokenDataset (StreamingDataset) -> DataLoader -> composer DataSpec

Modules, one job each:

    sources         iter_documents: the text sources ('stdlib', local files and folders, hf:...)
    packing         tokens -> train / val by document -> samples of exactly seq_len
    settings        argument validation, tokenizer loading and names, the settings that identify a dataset
    layout          on-disk names and format; read_metadata (is a folder a complete dataset?)
    local_folder    the local output folder: lock, temporary sibling, replace rules, atomic move
    remote          object stores: URL test, error diagnosis (RemoteDataError), uploads, remote metadata
    versions        a remote dataset's versions and the pointer to the current one (atomic overwrite)
    writer          write_mds, ensure_dataset
    token_dataset   TokenDataset (StreamingDataset) and the shared-memory registration lock
    loader          build_dataloader, verify_local_split, the remote cache's record
    cli             the `prores-data` command

CLI: ``prores-data --out data/stdlib`` or ``python -m prores_algo.training.data --help``.
"""

# Everything that code, tests and benchmarks import from `prores_algo.training.data`. A test that patches a name must
# patch the module that uses it (e.g. prores_algo.training.data.writer._build), not this re-export.
from prores_algo.training.data.cli import _whole_number, main
from prores_algo.training.data.layout import (
    CACHE_RECORD,
    COLUMN,
    DTYPE,
    FORMAT,
    FORMAT_VERSION,
    HASH_ALGO,
    META_FILENAME,
    SPLITS,
    read_metadata,
)
from prores_algo.training.data.loader import _default_cache_dir, build_dataloader, verify_local_split
from prores_algo.training.data.local_folder import _TMP_MARK
from prores_algo.training.data.packing import _is_val
from prores_algo.training.data.remote import RemoteDataError
from prores_algo.training.data.settings import SETTING_FIELDS
from prores_algo.training.data.sources import TEXT_SUFFIXES, iter_documents
from prores_algo.training.data.token_dataset import SHM_LOCK_TIMEOUT_S, TokenDataset
from prores_algo.training.data.writer import ensure_dataset, write_mds

__all__ = [
    'TEXT_SUFFIXES',
    'META_FILENAME',
    'iter_documents',
    'write_mds',
    'ensure_dataset',
    'read_metadata',
    'TokenDataset',
    'build_dataloader',
    'verify_local_split',
    'main',
    'RemoteDataError',
]
