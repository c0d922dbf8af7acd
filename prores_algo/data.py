"""Data layer: text sources -> packed token samples in MDS shards -> StreamingDataset loaders.

Pipeline::

    iter_documents(source)            str documents, deterministic order
      -> tokenizer.encode + [eos]     (prores_algo.tokenizers)
      -> split by document            stable hash of (seed, document index) -> train / val
      -> pack                         each split's token stream cut into samples of exactly seq_len
      -> MDSWriter                    out_dir/{train,val}/ shards + index.json, out_dir/prores_data.json
    build_dataloader(out_dir, split)  TokenDataset (StreamingDataset) -> DataLoader -> composer DataSpec

Sources: 'stdlib' (this machine's Python standard library sources: no download, the default),
a local file/folder (.txt .md .py .rst .jsonl), or 'hf:NAME[:CONFIG[:SPLIT]]' (Hugging Face
`datasets`, streamed; e.g. 'hf:allenai/c4:en').

CLI: ``prores-data --out data/stdlib`` or ``python -m prores_algo.data --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from streaming import StreamingDataset

from prores_algo.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    'TEXT_SUFFIXES', 'META_FILENAME', 'iter_documents', 'write_mds', 'ensure_dataset', 'read_metadata',
    'TokenDataset', 'build_dataloader', 'verify_local_split', 'main'
]

TEXT_SUFFIXES = ('.txt', '.md', '.py', '.rst', '.jsonl')
META_FILENAME = 'prores_data.json'
FORMAT = 'prores_algo/mds-tokens'
FORMAT_VERSION = 1
COLUMN = 'tokens'
DTYPE = 'int32'
SPLITS = ('train', 'val')
# Settings that determine the samples; `ensure_dataset` reuses a dataset only if all of them match.
# (`compression` is deliberately absent: it changes the bytes on disk, not the samples.)
SETTING_FIELDS = ('source', 'tokenizer', 'seq_len', 'val_fraction', 'max_tokens', 'max_bytes', 'seed')
_TMP_MARK = '.prores-tmp-'
_SOURCE_HELP = ("'stdlib' (the Python standard library sources on this machine), an existing local file or "
                f"folder ({', '.join(TEXT_SUFFIXES)}; .jsonl needs a 'text' field), or "
                "'hf:NAME[:CONFIG[:SPLIT]]' (e.g. 'hf:allenai/c4:en')")
_URL_RE = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*://')


def _is_url(path: str) -> bool:
    return bool(_URL_RE.match(path))


# --------------------------------------------------------------------------------------------------
# Text sources
# --------------------------------------------------------------------------------------------------


def iter_documents(source: str = 'stdlib', *, max_bytes: Optional[int] = None) -> Iterator[str]:
    """Yield the documents of `source` as strings, in a deterministic order.

    Args:
        source: see the module docstring (`_SOURCE_HELP`).
        max_bytes: stop after this many UTF-8 bytes in total (the last document is truncated), so
            quick runs stay quick. None: no cap.

    The source is validated eagerly (a missing path raises here, not on first `next()`); a source
    that yields no text raises ValueError('empty corpus ...') when exhausted.
    Whitespace-only documents are skipped.
    """
    if not isinstance(source, str) or not source:
        raise ValueError(f'`source` must be {_SOURCE_HELP}; got {source!r}')
    if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes <= 0):
        raise ValueError(f'`max_bytes` must be a positive int or None, got {max_bytes!r}')
    if source == 'stdlib':
        docs = _stdlib_documents()
    elif source.startswith('hf:'):
        docs = _hf_documents(source)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f'`source` {source!r} does not exist. Accepted: {_SOURCE_HELP}.')
        if path.is_file():
            if path.suffix.lower() not in TEXT_SUFFIXES:
                raise ValueError(f'`source` file {source!r} has an unsupported suffix {path.suffix!r}. '
                                 f'Accepted: {_SOURCE_HELP}.')
            docs = _file_documents(path, strict=True)
        else:
            docs = _folder_documents(path)
    return _checked(docs, source, max_bytes)


def _checked(docs: Iterator[str], source: str, max_bytes: Optional[int]) -> Iterator[str]:
    """Skip blank documents, apply the byte cap, and raise 'empty corpus' if nothing came out."""
    n_docs = 0
    remaining = max_bytes
    for doc in docs:
        if not doc.strip():
            continue
        if remaining is not None:
            data = doc.encode('utf-8')
            if len(data) >= remaining:
                # Cut at a byte boundary; drop a split multi-byte character rather than emit U+FFFD.
                doc = data[:remaining].decode('utf-8', errors='ignore')
                remaining = 0
            else:
                remaining -= len(data)
        if doc.strip():
            n_docs += 1
            yield doc
        if remaining == 0:
            break
    if n_docs == 0:
        raise ValueError(f'empty corpus: `source` {source!r} yielded no text. Accepted: {_SOURCE_HELP}.')


def _read_text(path: Path) -> str:
    with open(path, encoding='utf-8') as f:
        return f.read()


def _sorted_files(root: Path, suffixes: tuple[str, ...], skip_dirs: tuple[str, ...] = ()) -> list[Path]:
    """Files under `root` with one of `suffixes`, sorted by relative POSIX path (machine-independent).

    Hidden folders, __pycache__ and `skip_dirs` are pruned so e.g. `.git` never leaks into a corpus.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith('.') and d != '__pycache__' and d not in skip_dirs]
        for fn in filenames:
            if not fn.startswith('.') and fn.lower().endswith(suffixes):
                p = Path(dirpath, fn)
                found.append((p.relative_to(root).as_posix(), p))
    found.sort()
    return [p for _, p in found]


def _stdlib_documents() -> Iterator[str]:
    root = Path(sysconfig.get_paths()['stdlib'])
    for path in _sorted_files(root, ('.py',), skip_dirs=('site-packages', 'dist-packages')):
        try:
            yield _read_text(path)
        except (OSError, UnicodeDecodeError):
            # The stdlib test suite ships deliberately mis-encoded files; skip those and anything unreadable.
            continue


def _folder_documents(root: Path) -> Iterator[str]:
    skipped = []
    for path in _sorted_files(root, TEXT_SUFFIXES):
        try:
            yield from _file_documents(path, strict=False)
        except (OSError, UnicodeDecodeError) as e:
            skipped.append(f'{path}: {type(e).__name__}')
    if skipped:
        warnings.warn(f'skipped {len(skipped)} unreadable file(s) under {str(root)!r}: {skipped[:5]}')


def _file_documents(path: Path, strict: bool) -> Iterator[str]:
    """One document per file, or one per line ('text' field) for .jsonl."""
    try:
        if path.suffix.lower() != '.jsonl':
            yield _read_text(path)
            return
        with open(path, encoding='utf-8') as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f'`source` file {str(path)!r} line {lineno}: invalid JSON ({e})') from e
                if not isinstance(row, dict) or not isinstance(row.get('text'), str):
                    raise ValueError(f'`source` file {str(path)!r} line {lineno}: expected a JSON object '
                                     "with a string 'text' field")
                yield row['text']
    except (OSError, UnicodeDecodeError) as e:
        if strict:
            raise ValueError(f'`source` file {str(path)!r} could not be read as UTF-8 text: {e}') from e
        raise


def _hf_documents(source: str) -> Iterator[str]:
    parts = source[len('hf:'):].split(':')
    if not parts[0] or len(parts) > 3:
        raise ValueError(f'`source` {source!r}: expected hf:NAME, hf:NAME:CONFIG or hf:NAME:CONFIG:SPLIT')
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), \
        (parts[2] if len(parts) > 2 and parts[2] else 'train')
    try:
        import datasets  # only needed for hf: sources, so not a hard dependency
    except ImportError as e:
        raise ValueError(f'`source` {source!r} needs the Hugging Face `datasets` package: pip install datasets '
                         "(or use source='stdlib' or a local path)") from e
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:
        raise ValueError(f'`source` {source!r}: could not load Hugging Face dataset: {type(e).__name__}: {e}') from e

    def gen() -> Iterator[str]:
        for row in ds:
            if 'text' not in row:
                raise ValueError(f"`source` {source!r}: rows have no 'text' column (columns: {sorted(row)})")
            yield row['text']

    return gen()


def _normalize_source(source: str) -> str:
    """Local paths are recorded absolute so './data' and '/abs/data' compare equal in ensure_dataset."""
    if source == 'stdlib' or source.startswith('hf:') or _is_url(source):
        return source
    return str(Path(source).expanduser().resolve())


def _normalize_tokenizer_name(name: str) -> str:
    if name == 'byte':
        return name
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name


# --------------------------------------------------------------------------------------------------
# Writing MDS
# --------------------------------------------------------------------------------------------------


def _is_val(doc_index: int, seed: int, val_fraction: float) -> bool:
    """Stable (process- and platform-independent, unlike hash()) document -> split assignment."""
    h = hashlib.blake2b(f'{seed}:{doc_index}'.encode(), digest_size=8).digest()
    return int.from_bytes(h, 'big') / 2.0**64 < val_fraction


class _Packer:
    """Cuts one split's token stream into rows of exactly seq_len and writes them; keeps the remainder."""

    def __init__(self, writer: Any, seq_len: int):
        self.writer = writer
        self.seq_len = seq_len
        self.carry = np.zeros(0, dtype=DTYPE)
        self.samples = 0
        self.tokens_read = 0
        self.documents = 0

    def add(self, tokens: np.ndarray) -> None:
        self.documents += 1
        self.tokens_read += len(tokens)
        stream = np.concatenate([self.carry, tokens]) if len(self.carry) else tokens
        n = len(stream) // self.seq_len
        for row in stream[:n * self.seq_len].reshape(n, self.seq_len):
            self.writer.write({COLUMN: np.ascontiguousarray(row)})
        self.samples += n
        self.carry = stream[n * self.seq_len:].copy()

    def summary(self) -> dict[str, int]:
        return {
            'samples': self.samples,
            'tokens': self.samples * self.seq_len,
            'documents': self.documents,
            'tokens_read': self.tokens_read,
            'tokens_dropped': len(self.carry),
        }


def _validate_args(seq_len: Any, val_fraction: Any, max_tokens: Any, compression: Any, seed: Any) -> None:
    from streaming.base.compression import get_compressions, is_compression
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f'`seq_len` must be an int >= 2 (next-token prediction needs 2), got {seq_len!r}')
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ValueError(f'`val_fraction` must be in [0, 1) (0 writes no val split), got {val_fraction!r}')
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or
                                   max_tokens <= 0):
        raise ValueError(f'`max_tokens` must be a positive int or None, got {max_tokens!r}')
    if compression is not None and not is_compression(compression):
        raise ValueError(f'`compression` {compression!r} is not supported by streaming; use None or one of '
                         f'{sorted(get_compressions())}')
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f'`seed` must be an int, got {seed!r}')


def _out_path(out_dir: Any) -> Path:
    if not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir):
        raise ValueError(f'`out_dir` must be a local folder path, got {out_dir!r}')
    if _is_url(str(out_dir)):
        raise ValueError(f'`out_dir` {str(out_dir)!r}: only local folders can be written (write locally, then '
                         'upload the folder and pass its URL to build_dataloader)')
    return Path(out_dir).expanduser().resolve()


def read_metadata(path: str | os.PathLike) -> Optional[dict[str, Any]]:
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


def _build(source: str, out: Path, tokenizer: Any, seq_len: int, val_fraction: float, max_tokens: Optional[int],
           compression: Optional[str], seed: int, max_bytes: Optional[int], overwrite: bool,
           progress: bool) -> dict[str, Any]:
    """Write the dataset; caller holds the lock and has validated the arguments."""
    from streaming import MDSWriter
    from tqdm.auto import tqdm

    if out.exists():
        if not out.is_dir():
            raise ValueError(f'`out_dir` {str(out)!r} exists and is not a folder')
        if read_metadata(out) is not None and not overwrite:
            raise ValueError(f'`out_dir` {str(out)!r} already holds a dataset; pass overwrite=True (--overwrite) '
                             'to replace it, or choose another out_dir')
        if any(out.iterdir()) and not _looks_like_ours(out):
            raise ValueError(f'`out_dir` {str(out)!r} exists and holds other files; refusing to replace it '
                             '(even with overwrite); choose an empty or new folder')
    _clean_stale_tmp(out)

    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    if not isinstance(tok, (ByteTokenizer, HFTokenizer)) and not all(
            hasattr(tok, a) for a in ('encode', 'eos_token_id', 'vocab_size', 'name')):
        raise ValueError(f'`tokenizer` must be a name or a prores_algo.tokenizers tokenizer, got {tokenizer!r}')
    if tok.vocab_size > np.iinfo(DTYPE).max:
        raise ValueError(f'`tokenizer` vocab_size {tok.vocab_size} does not fit {DTYPE}')

    docs = iter_documents(source, max_bytes=max_bytes)
    # Everything is written into a hidden sibling and renamed into place only when complete: MDSWriter's
    # __exit__ calls finish() even while an exception propagates, which would otherwise leave a
    # valid-looking index.json over a partial dataset at out_dir.
    tmp = out.parent / f'.{out.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}'
    columns = {COLUMN: f'ndarray:{DTYPE}:{seq_len}'}  # static dtype and shape: no per-sample header
    splits = ('train', 'val') if val_fraction > 0 else ('train',)
    try:
        with contextlib.ExitStack() as stack:
            packers = {
                s: _Packer(stack.enter_context(MDSWriter(out=str(tmp / s), columns=columns, compression=compression)),
                           seq_len) for s in splits
            }
            bar = stack.enter_context(
                tqdm(total=max_tokens, unit='tok', unit_scale=True, desc=f'prores-data {out.name}',
                     disable=not progress, dynamic_ncols=True))
            budget = max_tokens
            eos = np.array([tok.eos_token_id], dtype=DTYPE)
            encode_array = getattr(tok, 'encode_array', None)
            for index, doc in enumerate(docs):
                ids = encode_array(doc) if encode_array else np.asarray(tok.encode(doc), dtype=DTYPE)
                tokens = np.concatenate([ids.astype(DTYPE, copy=False), eos])
                if budget is not None:
                    tokens = tokens[:budget]
                    budget -= len(tokens)
                split = 'val' if val_fraction > 0 and _is_val(index, seed, val_fraction) else 'train'
                packers[split].add(tokens)
                bar.update(len(tokens))
                if budget == 0:
                    break
        summary = {s: p.summary() for s, p in packers.items()}
        total = sum(v['tokens_read'] for v in summary.values())
        for s, v in summary.items():
            if v['samples'] == 0:
                raise ValueError(
                    f'split {s!r} got 0 samples: it has {v["tokens_read"]} tokens from {v["documents"]} document(s) '
                    f'({total} tokens in total) but `seq_len` is {seq_len}. Lower `seq_len`, raise `max_tokens` '
                    f'(now {max_tokens}) / `max_bytes` (now {max_bytes}), adjust `val_fraction` (now {val_fraction}), '
                    'or use a larger `source`.')
        meta = {
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
            'column': COLUMN,
            'dtype': DTYPE,
            'python': sys.version.split()[0],  # informative: what 'stdlib' meant when this was built
            'splits': summary,
        }
        # Metadata last: its presence (plus the index files) is what read_metadata calls complete.
        (tmp / META_FILENAME).write_text(json.dumps(meta, indent=2) + '\n')
        if out.exists():
            # Move the old folder aside first (rename onto a non-empty folder fails), then drop it.
            trash = out.parent / f'.{out.name}{_TMP_MARK}old-{uuid.uuid4().hex[:8]}'
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
        return meta
    except BaseException:
        # Includes KeyboardInterrupt. A hard kill leaves `tmp`; the next run's _clean_stale_tmp removes it.
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_mds(source: str,
              out_dir: str | os.PathLike,
              tokenizer: str = 'byte',
              seq_len: int = 128,
              val_fraction: float = 0.05,
              max_tokens: Optional[int] = None,
              compression: Optional[str] = None,
              seed: int = 0,
              *,
              max_bytes: Optional[int] = None,
              overwrite: bool = False,
              progress: bool = True) -> dict[str, Any]:
    """Tokenize `source`, pack into samples of exactly `seq_len` tokens, write `out_dir/{train,val}` MDS shards.

    Each document's tokens are followed by eos; documents go to val when a stable hash of
    (seed, document index) falls below `val_fraction` (0: no val split); each split's stream is cut
    into seq_len rows and its remainder dropped. `max_tokens` caps the tokens read (both splits,
    eos included); `max_bytes` caps the text read. The write is atomic (temporary sibling folder,
    renamed when complete). Refuses to replace an existing dataset unless `overwrite`.

    Returns the metadata dict also written to `out_dir/prores_data.json`.
    """
    _validate_args(seq_len, val_fraction, max_tokens, compression, seed)
    out = _out_path(out_dir)
    with _lock(out):
        return _build(source, out, tokenizer, seq_len, val_fraction, max_tokens, compression, seed, max_bytes,
                      overwrite, progress)


def _requested_settings(source: str, tokenizer: Any, seq_len: int, val_fraction: float, max_tokens: Optional[int],
                        max_bytes: Optional[int], seed: int) -> dict[str, Any]:
    name = tokenizer if isinstance(tokenizer, str) else tokenizer.name
    return {
        'source': _normalize_source(source),
        'tokenizer': _normalize_tokenizer_name(name),
        'seq_len': seq_len,
        'val_fraction': float(val_fraction),
        'max_tokens': max_tokens,
        'max_bytes': max_bytes,
        'seed': seed,
    }


def ensure_dataset(source: str,
                   out_dir: str | os.PathLike,
                   tokenizer: str = 'byte',
                   seq_len: int = 128,
                   val_fraction: float = 0.05,
                   max_tokens: Optional[int] = None,
                   compression: Optional[str] = None,
                   seed: int = 0,
                   *,
                   max_bytes: Optional[int] = None,
                   progress: bool = True) -> dict[str, Any]:
    """Reuse the dataset at `out_dir` if it was built with the same settings, else build it.

    Raises ValueError listing the differing fields if `out_dir` holds a dataset built differently
    (never silently rebuilds: a training run must not change data under a checkpoint's feet).
    Safe to call from every rank at once: builders serialize on a file lock beside out_dir.
    """
    _validate_args(seq_len, val_fraction, max_tokens, compression, seed)
    out = _out_path(out_dir)
    want = _requested_settings(source, tokenizer, seq_len, val_fraction, max_tokens, max_bytes, seed)

    def check(meta: dict[str, Any]) -> dict[str, Any]:
        diff = [f'{k}: dataset has {meta.get(k)!r}, requested {v!r}' for k, v in want.items() if meta.get(k) != v]
        if diff:
            raise ValueError(f'`out_dir` {str(out)!r} holds a dataset built with different settings '
                             f'({"; ".join(diff)}). Use another out_dir, or rebuild it with '
                             'write_mds(..., overwrite=True) / prores-data --overwrite.')
        return meta

    # Lock-free fast path: datasets appear atomically, so a complete one can be read without the
    # lock (which also lets a prebuilt dataset live in a read-only folder).
    meta = read_metadata(out)
    if meta is not None:
        return check(meta)
    with _lock(out):
        meta = read_metadata(out)  # another process may have built it while we waited
        if meta is not None:
            return check(meta)
        return _build(source, out, tokenizer, seq_len, val_fraction, max_tokens, compression, seed, max_bytes,
                      False, progress)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


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
            raise ValueError(f'not a prores token dataset: column {COLUMN!r} has encoding {enc!r}, '
                             "expected 'ndarray:<dtype>:<seq_len>'")
        lens.add(int(m.group(2)))
    if len(lens) != 1:
        raise ValueError(f'shards disagree on seq_len: {sorted(lens)}')
    return lens.pop()


SHM_LOCK_TIMEOUT_S = 120.0
# Shared-memory names are machine-wide, so the lock must be too: /dev/shm itself where it exists (the
# temp dir can differ between jobs through TMPDIR).
_SHM_LOCK_DIR = '/dev/shm' if os.path.isdir('/dev/shm') and os.access('/dev/shm', os.W_OK) else tempfile.gettempdir()


@contextlib.contextmanager
def _shm_registration_lock():
    """Serialise StreamingDataset construction across the jobs running on this machine.

    streaming 0.13 registers a dataset's shared memory by scanning for the first free integer prefix
    and then creating `/<prefix>_locals`; the scan and the create are not atomic, so two jobs that
    construct datasets at the same moment pick the same prefix and one dies with
    `FileExistsError: '/000745_locals'` (or, in a multi-rank job, with 'shared memory prefix=N was not
    registered by local leader', when a non-leader rank's scan saw a prefix that another job took
    before its leader's create). A machine-wide flock held by the local leader (LOCAL_RANK 0) across
    the whole constructor makes scan-and-create atomic between jobs. In a distributed job every
    rank scans, so the other ranks must not start until their leader holds the lock: a barrier after
    the leader acquires it. They never take the lock themselves: they meet their leader at barriers
    inside the constructor, so waiting on the lock as well would deadlock. The flock is released if
    its holder dies; if it cannot be had in SHM_LOCK_TIMEOUT_S we go on without it.
    """
    import torch.distributed as dist
    group = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    leader = int(os.environ.get('LOCAL_RANK', '0')) == 0
    lock = None
    if leader:
        from filelock import FileLock, Timeout  # a dependency of mosaicml-streaming
        lock = FileLock(os.path.join(_SHM_LOCK_DIR, 'prores_algo_streaming_shm.lock'))
        try:
            lock.acquire(timeout=SHM_LOCK_TIMEOUT_S)
        except Timeout:
            warnings.warn(f'could not take {lock.lock_file} in {SHM_LOCK_TIMEOUT_S:g} s; registering the '
                          "dataset's shared memory without it")
            lock = None
    try:
        if group:
            dist.barrier()  # every leader of this job holds its machine's lock before any rank scans
        yield
    finally:
        if lock is not None:
            lock.release()


class TokenDataset(StreamingDataset):
    """StreamingDataset over prores token shards; each sample is {'input_ids': LongTensor (seq_len,)}.

    Keyword arguments are StreamingDataset's (local, remote, split, batch_size, shuffle, ...),
    plus `seq_len` which, if given, must match the shards.
    """

    def __init__(self, *, seq_len: Optional[int] = None, **kwargs: Any) -> None:
        with _shm_registration_lock():
            super().__init__(**kwargs)
        self.seq_len = _shard_seq_len(self.shards)
        if seq_len is not None and seq_len != self.seq_len:
            raise ValueError(f'`seq_len` {seq_len} does not match the dataset, whose samples have '
                             f'seq_len={self.seq_len}; set seq_len to {self.seq_len} or rebuild the data')

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, torch.Tensor]:
        sample = super().get_item(sample_id, retry)
        # astype copies: MDS decodes into a read-only buffer, and models want int64 ids anyway.
        return {'input_ids': torch.from_numpy(sample[COLUMN].astype(np.int64))}


def _num_tokens_in_batch(batch: dict[str, torch.Tensor]) -> int:
    # Module-level (not a lambda) so the DataSpec stays picklable.
    return int(batch['input_ids'].numel())


def _default_cache_dir(remote: str) -> str:
    # Deterministic, so every rank of a job picks the same `local` (streaming requires that).
    key = hashlib.sha1(remote.rstrip('/').encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), 'prores_algo_streaming', key)


def _remote_metadata(remote: str) -> Optional[dict[str, Any]]:
    """Best-effort fetch of prores_data.json next to the remote splits (None if unavailable)."""
    from streaming.base.storage import CloudDownloader
    with tempfile.TemporaryDirectory() as d:
        # A fresh folder each time: the downloader skips files that already exist locally.
        local = os.path.join(d, META_FILENAME)
        try:
            CloudDownloader.direct_download(remote.rstrip('/') + '/' + META_FILENAME, local)
            return json.loads(Path(local).read_text())
        except Exception as e:  # missing file, no credentials, unsupported scheme...
            warnings.warn(f'could not read {META_FILENAME} at {remote!r} ({type(e).__name__}: {e}); '
                          'skipping the vocab_size check')
            return None


def _check_meta(meta: dict[str, Any], where: str, seq_len: Optional[int], vocab_size: Optional[int]) -> None:
    if seq_len is not None and meta.get('seq_len') is not None and seq_len != meta['seq_len']:
        raise ValueError(f'`seq_len` {seq_len} does not match the dataset at {where!r}, built with '
                         f'seq_len={meta["seq_len"]}; set seq_len to {meta["seq_len"]} or rebuild the data')
    if vocab_size is not None and meta.get('vocab_size') is not None and vocab_size < meta['vocab_size']:
        raise ValueError(f"the model's `vocab_size` {vocab_size} is smaller than the dataset's tokenizer vocab "
                         f'({meta.get("tokenizer")!r}: {meta["vocab_size"]} ids) at {where!r}; token ids would '
                         f'overflow the embedding. Set vocab_size >= {meta["vocab_size"]}.')


def verify_local_split(path: str | os.PathLike, split: str) -> int:
    """Check that every shard `path/split/index.json` lists is on disk with the size it lists; returns
    the number of shards. Raises ValueError naming the shard and the fix.

    Catches truncated or missing shard files (an interrupted copy or sync, a full disk) when the loader
    is built, instead of a cryptic decode error partway through an epoch. Costs one stat per shard; it
    does not hash the contents, so a same-size corruption is not detected here.
    """
    folder = Path(path) / split
    fix = (f'rebuild it (`prores-data --out {str(path)} --overwrite ...`, same settings) or copy it again from '
           'where it was built')
    try:
        index = json.loads((folder / 'index.json').read_text())
        shards = index['shards']
        if not isinstance(shards, list):
            raise TypeError('`shards` is not a list')
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f'{str(folder / "index.json")!r} is not a valid MDS index ({type(e).__name__}: {e}): '
                         f'the dataset is damaged; {fix}') from None
    for shard in shards:
        try:
            files = [(shard[k]['basename'], int(shard[k]['bytes'])) for k in ('raw_data', 'zip_data') if shard.get(k)]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f'{str(folder / "index.json")!r} has a malformed shard entry ({type(e).__name__}: {e}): '
                             f'the dataset is damaged; {fix}') from None
        present = 0
        for basename, expected in files:
            f = folder / basename
            if not f.is_file():
                continue
            present += 1
            size = f.stat().st_size
            if size != expected:
                raise ValueError(f'shard {str(f)!r} has {size} bytes but its index.json lists {expected}: the file '
                                 f'is truncated or damaged; {fix}')
        if not present:
            raise ValueError(f'shard {files[0][0] if files else "?"!r} listed in {str(folder / "index.json")!r} is '
                             f'missing from {str(folder)!r}; {fix}')
    return len(shards)


def build_dataloader(path_or_remote: str,
                     split: str,
                     batch_size: int,
                     *,
                     seq_len: Optional[int] = None,
                     shuffle: bool = True,
                     seed: int = 0,
                     num_workers: int = 0,
                     local_cache: Optional[str] = None,
                     drop_last: bool = True,
                     vocab_size: Optional[int] = None):
    """A composer `DataSpec` over `path_or_remote/split`; batches are {'input_ids': LongTensor (B, seq_len)}.

    `batch_size` is per device: StreamingDataset partitions samples across ranks (read from the
    torch.distributed env vars) and needs it for that. A local folder is read in place
    (local=path, remote=None); a URL (s3://, gs://, oci://, hf://, https://, ...) is streamed into
    `local_cache` (default: a deterministic folder under the system temp dir).
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
    if _is_url(path_or_remote):
        remote, local = path_or_remote, (local_cache or _default_cache_dir(path_or_remote))
        meta = _remote_metadata(remote)
        where = remote
    else:
        local_path = Path(path_or_remote).expanduser().resolve()
        if not local_path.is_dir():
            raise FileNotFoundError(f'data path {path_or_remote!r} is not a folder; build it with '
                                    f'`prores-data --out {path_or_remote}` (or prores_algo.data.ensure_dataset)')
        if not (local_path / split / 'index.json').is_file():
            have = sorted(p.name for p in local_path.iterdir() if (p / 'index.json').is_file())
            raise FileNotFoundError(f'split {split!r} not found under {str(local_path)!r} '
                                    f'(no {split}/index.json; splits present: {have})')
        verify_local_split(local_path, split)
        remote, local, where = None, str(local_path), str(local_path)
        meta = read_metadata(local_path)
        if meta is None:
            warnings.warn(f'{str(local_path)!r} has no complete {META_FILENAME}; skipping the vocab_size check')
    if meta is not None:
        _check_meta(meta, where, seq_len, vocab_size)

    try:
        dataset = TokenDataset(local=local, remote=remote, split=split, batch_size=batch_size, shuffle=shuffle,
                               shuffle_seed=seed, seq_len=seq_len)
    except ValueError as e:
        if 'Reused local directory' in str(e):
            raise ValueError(f'{e}\nAnother live loader uses the cache {local!r} for {where!r}/{split}; pass a '
                             'distinct `local_cache`.') from e
        raise
    n = len(dataset)  # samples this rank will see per epoch
    if drop_last and n < batch_size:
        raise ValueError(f'split {split!r} at {where!r} has {n} samples per rank, fewer than `batch_size` '
                         f'{batch_size}, so drop_last=True would yield no batch. Lower batch_size, pass '
                         'drop_last=False, or rebuild with more data / a larger val_fraction.')
    loader = torch.utils.data.DataLoader(dataset,
                                         batch_size=batch_size,
                                         num_workers=num_workers,
                                         drop_last=drop_last,
                                         pin_memory=torch.cuda.is_available())
    n_batches = n // batch_size if drop_last else -(-n // batch_size)
    n_samples = n_batches * batch_size if drop_last else n
    return DataSpec(loader,
                    num_samples=n_samples,
                    num_tokens=n_samples * dataset.seq_len,
                    get_num_tokens_in_batch=_num_tokens_in_batch)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    """`prores-data`: convert a text source into packed-token MDS shards (train/val). Returns the exit code."""
    parser = argparse.ArgumentParser(
        prog='prores-data',
        description='Tokenize a text source and write packed fixed-length samples as MDS shards '
        '(OUT/train, OUT/val, OUT/prores_data.json) for prores_algo training.')
    parser.add_argument('--source', default='stdlib', help=f'text source: {_SOURCE_HELP} (default: stdlib)')
    parser.add_argument('--out', required=True, help='output folder (created atomically)')
    parser.add_argument('--tokenizer', default='byte',
                        help="'byte' (default, no files needed), a local tokenizer folder or a HF hub id")
    parser.add_argument('--seq-len', type=int, default=128, help='tokens per sample (default: 128)')
    parser.add_argument('--val-fraction', type=float, default=0.05,
                        help='fraction of documents for the val split; 0: no val split (default: 0.05)')
    parser.add_argument('--max-tokens', type=int, default=None, help='stop after this many tokens (default: all)')
    parser.add_argument('--max-bytes', type=int, default=None, help='stop after this much text (default: all)')
    parser.add_argument('--compression', default=None, help='MDS shard compression, e.g. zstd (default: none)')
    parser.add_argument('--seed', type=int, default=0, help='train/val split seed (default: 0)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing dataset at --out')
    parser.add_argument('--no-progress', action='store_true', help='hide the progress bar')
    args = parser.parse_args(argv)
    try:
        meta = write_mds(args.source, args.out, tokenizer=args.tokenizer, seq_len=args.seq_len,
                         val_fraction=args.val_fraction, max_tokens=args.max_tokens, compression=args.compression,
                         seed=args.seed, max_bytes=args.max_bytes, overwrite=args.overwrite,
                         progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))  # exits 2 with the message, no traceback
    parts = ', '.join(f'{s} {v["samples"]} samples ({v["tokens"]} tokens, {v["documents"]} docs)'
                      for s, v in meta['splits'].items())
    print(f'prores-data: wrote {args.out}: {parts}; seq_len={meta["seq_len"]} tokenizer={meta["tokenizer"]} '
          f'vocab_size={meta["vocab_size"]}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
