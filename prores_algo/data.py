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

from prores_algo.recipe import is_url
from prores_algo.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    'TEXT_SUFFIXES', 'META_FILENAME', 'iter_documents', 'write_mds', 'ensure_dataset', 'read_metadata',
    'TokenDataset', 'build_dataloader', 'verify_local_split', 'main', 'RemoteDataError'
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
# Every shard's hash is written into index.json; `build_dataloader` has streaming check it on every
# download from a remote (a corrupt or replaced object is an error, never silently different data).
HASH_ALGO = 'sha1'
# What a remote dataset's local cache records about its origin (never named prores_data.json: a cache
# is not a complete dataset, whatever it holds, so it must never be read as one).
CACHE_RECORD = 'prores_remote.json'
_SOURCE_HELP = ("'stdlib' (the Python standard library sources on this machine), an existing local file or "
                f"folder ({', '.join(TEXT_SUFFIXES)}; .jsonl needs a 'text' field), or "
                "'hf:NAME[:CONFIG[:SPLIT]]' (e.g. 'hf:allenai/c4:en')")


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
    if source == 'stdlib' or source.startswith('hf:') or is_url(source):
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
    if is_url(str(out_dir)):
        raise ValueError(f'`out_dir` {str(out_dir)!r}: only local folders can be built here; write to an object '
                         "store with write_mds(..., out_dir='s3://...') or `prores-data --out s3://...`")
    return Path(out_dir).expanduser().resolve()


# --------------------------------------------------------------------------------------------------
# Object stores (s3:// tested end to end; any scheme streaming uploads to / downloads from works)
# --------------------------------------------------------------------------------------------------


class RemoteDataError(ValueError):
    """A remote dataset (s3://...) cannot be written or read; the message names the URL and the likely cause."""


def _split_url(url: str) -> tuple[str, str, str]:
    from urllib.parse import urlparse
    u = urlparse(url)
    return u.scheme, u.netloc, u.path.strip('/')


def _error_code(e: BaseException) -> str:
    return str(((getattr(e, 'response', None) or {}).get('Error') or {}).get('Code', ''))


_DENIED = ('403', 'AccessDenied', 'InvalidAccessKeyId', 'SignatureDoesNotMatch', 'InvalidToken', 'ExpiredToken',
           'AllAccessDisabled', 'InvalidClientTokenId')
_CREDENTIALS_HELP = ('check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance '
                     'role) and their permissions on the bucket')


def _s3_endpoint() -> str:
    ep = os.environ.get('S3_ENDPOINT_URL')
    return f'the S3 endpoint {ep} (S3_ENDPOINT_URL)' if ep else 'AWS S3 (S3_ENDPOINT_URL is not set)'


def _s3_diagnosis(url: str, check_prefix: bool) -> Optional[str]:
    """Why s3://bucket/prefix cannot be used, from the store's own answers (None: no cause found).

    Uses the same endpoint rule as streaming's S3 uploader and downloader (S3_ENDPOINT_URL).
    """
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
    _, bucket, prefix = _split_url(url)
    client = boto3.session.Session().client('s3', endpoint_url=os.environ.get('S3_ENDPOINT_URL'),
                                            config=Config(retries={'max_attempts': 2, 'mode': 'standard'},
                                                          connect_timeout=10, read_timeout=30))
    try:
        client.head_bucket(Bucket=bucket)
        if not check_prefix:
            return None
        listing = client.list_objects_v2(Bucket=bucket, Prefix=f'{prefix}/' if prefix else '', MaxKeys=1)
    except NoCredentialsError:
        return f'no AWS credentials were found; {_CREDENTIALS_HELP}'
    except ClientError as e:
        code = _error_code(e)
        if code in ('404', 'NoSuchBucket'):
            return f'bucket {bucket!r} does not exist at {_s3_endpoint()}'
        if code in _DENIED:
            return f'access to bucket {bucket!r} was denied ({code}); {_CREDENTIALS_HELP}'
        return f'{type(e).__name__}: {e}'
    except BotoCoreError as e:  # EndpointConnectionError, ReadTimeoutError, ...
        return f'{_s3_endpoint()} cannot be reached ({type(e).__name__}: {e})'
    if not listing.get('Contents'):
        return f'nothing is stored under {url}/ (bucket {bucket!r} exists): check the prefix'
    return None


def _diagnose(url: str, check_prefix: bool) -> Optional[str]:
    if _split_url(url)[0] != 's3':
        return None
    try:
        return _s3_diagnosis(url, check_prefix)
    except Exception:  # the diagnosis is a courtesy; the caller still reports the original error
        return None


def _remote_read_error(remote: str, what: str, e: BaseException) -> RemoteDataError:
    cause = _diagnose(remote, check_prefix=True)
    if cause is None:
        if _error_code(e) in ('404', 'NoSuchKey') or isinstance(e, FileNotFoundError):
            cause = (f'{what} does not exist: the upload of this dataset did not complete, or it was not written by '
                     f'prores-data (`prores-data --out {remote}` uploads {META_FILENAME} last, once every shard is up)')
        elif _error_code(e) in _DENIED:
            cause = f'access to {what} was denied ({_error_code(e)}); {_CREDENTIALS_HELP}'
        else:
            cause = f'{type(e).__name__}: {e}'
    return RemoteDataError(f'cannot read the dataset at {remote}: {cause}')


def _remote_write_error(remote: str, e: BaseException) -> RemoteDataError:
    cause = _diagnose(remote, check_prefix=False)
    if cause is None:
        cause = (f'access denied ({_error_code(e)}); {_CREDENTIALS_HELP}' if _error_code(e) in _DENIED else
                 f'{type(e).__name__}: {e}')
    return RemoteDataError(f'cannot write the dataset to {remote}: {cause}')


class _RemoteOut:
    """The remote side of a write: streaming's own uploader for `url` (which checks the bucket when it is
    created), plus listing and, on S3, deletion. `staging` is the local folder uploads are read from."""

    def __init__(self, url: str, staging: Path):
        from streaming.base.storage import CloudUploader
        self.url = url
        self.scheme, self.bucket, prefix = _split_url(url)
        self.base = f'{prefix}/' if prefix else ''
        try:
            self.uploader = CloudUploader.get((str(staging), url), keep_local=True, exist_ok=True)
        except Exception as e:
            raise _remote_write_error(url, e) from None

    def keys(self) -> list[str]:
        """Object names under the URL, relative to it."""
        try:
            names = self.uploader.list_objects() or []
        except Exception as e:
            raise _remote_write_error(self.url, e) from None
        return sorted(n[len(self.base):] for n in names if n.startswith(self.base))

    def prepare(self, overwrite: bool) -> list[str]:
        """Refuse a prefix that holds anything but (the debris of) one of our datasets, or a complete dataset
        unless `overwrite`; when overwriting, first delete its metadata, so from then on the old dataset
        is incomplete and no mix of old and new objects ever looks complete. Returns the names found."""
        keys = self.keys()
        foreign = [k for k in keys if k != META_FILENAME and k.split('/', 1)[0] not in SPLITS]
        if foreign:
            raise RemoteDataError(f'`out_dir` {self.url} holds other objects ({foreign[:5]}); refusing to write a '
                                  'dataset there (even with overwrite): choose an empty or new prefix')
        if META_FILENAME in keys:
            if not overwrite:
                raise RemoteDataError(f'`out_dir` {self.url} already holds a dataset; pass overwrite=True '
                                      '(--overwrite) to replace it, or choose another prefix')
            self.delete([META_FILENAME])
        elif keys and self.scheme != 's3':
            raise RemoteDataError(f'`out_dir` {self.url} holds the objects of an unfinished write; delete them first '
                                  f'(replacing objects is implemented for s3:// only)')
        return keys

    def upload(self, name: str) -> None:
        try:
            self.uploader.upload_file(name)
        except Exception as e:
            raise _remote_write_error(self.url, e) from None

    def delete(self, names: list[str]) -> None:
        if not names:
            return
        if self.scheme != 's3':
            raise RemoteDataError(f'cannot delete {len(names)} object(s) under {self.url}: implemented for s3:// only; '
                                  'delete them yourself')
        try:
            for i in range(0, len(names), 1000):
                answer = self.uploader.s3.delete_objects(Bucket=self.bucket, Delete={
                    'Objects': [{'Key': self.base + n} for n in names[i:i + 1000]], 'Quiet': True})
                if answer.get('Errors'):
                    raise RuntimeError(f'the store refused to delete: {answer["Errors"][:3]}')
        except Exception as e:
            raise _remote_write_error(self.url, e) from None


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


class _UploadErrors:
    """Mixin for streaming's MDSWriter that keeps the first upload error (streaming only logs it and then
    raises a bare 'One of the threads failed')."""
    upload_error: Optional[BaseException] = None

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


def _build(source: str, out: Optional[Path], tokenizer: Any, seq_len: int, val_fraction: float,
           max_tokens: Optional[int], compression: Optional[str], seed: int, max_bytes: Optional[int], overwrite: bool,
           progress: bool, remote: Optional[str] = None) -> dict[str, Any]:
    """Write the dataset; caller holds the lock (of `out`) and has validated the arguments.

    `remote` (a URL): the shards go there through streaming's uploader, as they are written, and
    `out` is an optional complete local copy (None: staged in a temporary folder, deleted as uploaded).
    """
    from streaming import MDSWriter
    from tqdm.auto import tqdm

    class Writer(_UploadErrors, MDSWriter):
        pass

    name = '`keep_local`' if remote else '`out_dir`'
    if out is not None and out.exists():
        if not out.is_dir():
            raise ValueError(f'{name} {str(out)!r} exists and is not a folder')
        if read_metadata(out) is not None and not overwrite:
            raise ValueError(f'{name} {str(out)!r} already holds a dataset; pass overwrite=True (--overwrite) '
                             'to replace it, or choose another folder')
        if any(out.iterdir()) and not _looks_like_ours(out):
            raise ValueError(f'{name} {str(out)!r} exists and holds other files; refusing to replace it '
                             '(even with overwrite); choose an empty or new folder')
    if out is not None:
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
    if out is not None:
        tmp = out.parent / f'.{out.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}'
    else:
        tmp = Path(tempfile.mkdtemp(prefix='prores-data-upload-'))
    columns = {COLUMN: f'ndarray:{DTYPE}:{seq_len}'}  # static dtype and shape: no per-sample header
    splits = ('train', 'val') if val_fraction > 0 else ('train',)
    dest: Optional[_RemoteOut] = None
    writers: dict[str, Any] = {}
    started = False
    try:
        found = []
        if remote is not None:
            dest = _RemoteOut(remote, tmp)  # checks the bucket and the credentials before any tokenizing
            found = dest.prepare(overwrite)
        started = True
        with contextlib.ExitStack() as stack:
            for s in splits:
                # With a remote, streaming uploads each shard as soon as it is written (and drops the local
                # file unless a local copy is kept); index.json goes up when the split is finished.
                target = (str(tmp / s), f'{remote}/{s}') if remote else str(tmp / s)
                writers[s] = stack.enter_context(_finish_on_success(
                    Writer(out=target, columns=columns, compression=compression, hashes=[HASH_ALGO],
                           keep_local=out is not None)))
            packers = {s: _Packer(writers[s], seq_len) for s in splits}
            bar = stack.enter_context(
                tqdm(total=max_tokens, unit='tok', unit_scale=True,
                     desc=f'prores-data {out.name if out is not None else remote}', disable=not progress,
                     dynamic_ncols=True))
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
            'hashes': [HASH_ALGO],
            'column': COLUMN,
            'dtype': DTYPE,
            'python': sys.version.split()[0],  # informative: what 'stdlib' meant when this was built
            'splits': summary,
        }
        # Metadata last: its presence (plus the index files) is what read_metadata calls complete.
        (tmp / META_FILENAME).write_text(json.dumps(meta, indent=2) + '\n')
        if dest is not None:
            # The remote dataset is complete once its metadata is up: upload it last, then drop what an
            # earlier dataset or an unfinished write left under the prefix that the new indexes do not list.
            dest.upload(META_FILENAME)
            keep = {META_FILENAME} | {f'{s}/index.json' for s in splits} | {
                f'{s}/{shard[k]["basename"]}' for s in splits for shard in writers[s].shards
                for k in ('raw_data', 'zip_data') if shard.get(k)}
            dest.delete([k for k in found if k not in keep])
        if out is None:
            shutil.rmtree(tmp, ignore_errors=True)
        elif out.exists():
            # Move the old folder aside first (rename onto a non-empty folder fails), then drop it.
            trash = out.parent / f'.{out.name}{_TMP_MARK}old-{uuid.uuid4().hex[:8]}'
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
        return meta
    except BaseException as e:
        # Includes KeyboardInterrupt. A hard kill leaves `tmp`; the next run's _clean_stale_tmp removes it.
        shutil.rmtree(tmp, ignore_errors=True)
        if dest is None or not started:  # never delete what was there before we began writing
            raise
        # Remote: nothing there is complete (the metadata goes up last); remove the partial splits too.
        with contextlib.suppress(Exception):
            dest.delete([k for k in dest.keys() if k != META_FILENAME])
        failed = next((w.upload_error for w in writers.values() if w.upload_error is not None), None)
        if failed is not None and not isinstance(e, RemoteDataError):
            raise _remote_write_error(remote, failed) from e
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
              progress: bool = True,
              keep_local: Optional[str | os.PathLike] = None) -> dict[str, Any]:
    """Tokenize `source`, pack into samples of exactly `seq_len` tokens, write `out_dir/{train,val}` MDS shards.

    Each document's tokens are followed by eos; documents go to val when a stable hash of
    (seed, document index) falls below `val_fraction` (0: no val split); each split's stream is cut
    into seq_len rows and its remainder dropped. `max_tokens` caps the tokens read (both splits,
    eos included); `max_bytes` caps the text read. The write is atomic (temporary sibling folder,
    renamed when complete). Refuses to replace an existing dataset unless `overwrite`.

    `out_dir` may be an object-store URL (`s3://bucket/prefix`; S3_ENDPOINT_URL selects an
    S3-compatible store): streaming's uploader sends each shard up as it is written. The bucket and
    credentials are checked before any tokenizing; `prores_data.json` is uploaded last, so a remote
    dataset is complete exactly when it is there; a failed write deletes what it uploaded. With
    `keep_local` (a folder) a complete local copy is also kept, written atomically as above;
    without it the shards are staged in a temporary folder and dropped once uploaded.

    Returns the metadata dict also written to `out_dir/prores_data.json`.
    """
    _validate_args(seq_len, val_fraction, max_tokens, compression, seed)
    if isinstance(out_dir, str) and is_url(out_dir):
        remote = out_dir.rstrip('/')
        if not _split_url(remote)[1]:
            raise ValueError(f'`out_dir` {out_dir!r}: a URL needs a bucket, e.g. s3://bucket/prefix')
        if keep_local is None:
            return _build(source, None, tokenizer, seq_len, val_fraction, max_tokens, compression, seed, max_bytes,
                          overwrite, progress, remote=remote)
        out = _out_path(keep_local)
        with _lock(out):
            return _build(source, out, tokenizer, seq_len, val_fraction, max_tokens, compression, seed, max_bytes,
                          overwrite, progress, remote=remote)
    if keep_local is not None:
        raise ValueError('`keep_local` is for a remote `out_dir` (s3://...); a local `out_dir` is the local copy')
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

    _shard_error: Optional[BaseException] = None

    def __init__(self, *, seq_len: Optional[int] = None, **kwargs: Any) -> None:
        with _shm_registration_lock():
            super().__init__(**kwargs)
        self.seq_len = _shard_seq_len(self.shards)
        if seq_len is not None and seq_len != self.seq_len:
            raise ValueError(f'`seq_len` {seq_len} does not match the dataset, whose samples have '
                             f'seq_len={self.seq_len}; set seq_len to {self.seq_len} or rebuild the data')

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
            if 'Checksum failure' in str(e):
                for name in names:
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(folder, name))
                msg = (f'shard {url} failed its {stream.validate_hash} check: the bytes downloaded are not the ones '
                       f'its index.json lists (a corrupt or replaced object). The bad copy was deleted from '
                       f'{folder!r}. Rebuild the dataset at {stream.remote} (prores-data --out {stream.remote} '
                       '--overwrite ...) or restore the object.')
            else:
                msg = f'could not fetch shard {url} into {folder!r}: {type(e).__name__}: {e}'
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


def _num_tokens_in_batch(batch: dict[str, torch.Tensor]) -> int:
    # Module-level (not a lambda) so the DataSpec stays picklable.
    return int(batch['input_ids'].numel())


def _default_cache_dir(remote: str) -> str:
    # Deterministic, so every rank of a job picks the same `local` (streaming requires that).
    key = hashlib.sha1(remote.rstrip('/').encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), 'prores_algo_streaming', key)


def _remote_metadata(remote: str) -> dict[str, Any]:
    """prores_data.json of the dataset at `remote`; RemoteDataError (naming the URL and the cause: no
    bucket, nothing under the prefix, denied credentials, unreachable endpoint, unfinished upload) if
    it cannot be read. Its presence is what makes a remote dataset complete: it is uploaded last."""
    from streaming.base.storage import CloudDownloader
    url = remote.rstrip('/') + '/' + META_FILENAME
    with tempfile.TemporaryDirectory() as d:
        # A fresh folder each time: the downloader skips files that already exist locally.
        local = os.path.join(d, META_FILENAME)
        try:
            CloudDownloader.direct_download(url, local)
        except Exception as e:  # missing object or bucket, credentials, endpoint, unsupported scheme...
            raise _remote_read_error(remote, url, e) from None
        try:
            meta = json.loads(Path(local).read_text())
        except (OSError, ValueError) as e:
            raise RemoteDataError(f'cannot read the dataset at {remote}: {url} is not valid JSON ({e})') from None
    if not isinstance(meta, dict) or meta.get('format') != FORMAT:
        raise RemoteDataError(f'cannot read the dataset at {remote}: {url} is not the metadata of a prores_algo '
                              f'dataset (format {meta.get("format") if isinstance(meta, dict) else None!r})')
    return meta


def _cache_record(local: str, remote: str) -> Optional[dict[str, Any]]:
    """The metadata a warm `local` cache recorded for `remote` (None when cold). A cache that belongs to
    another remote is an error: streaming would serve that remote's cached shards as this one's."""
    try:
        record = json.loads(Path(local, CACHE_RECORD).read_text())
    except (OSError, ValueError):
        record = None
    if isinstance(record, dict) and isinstance(record.get('meta'), dict):
        if record.get('remote') != remote:
            raise RemoteDataError(f'`local_cache` {local!r} holds a cache of {record.get("remote")!r}, not of '
                                  f'{remote!r}; use a separate local_cache for each remote dataset')
        return record['meta']
    stray = [s for s in SPLITS if os.path.exists(os.path.join(local, s, 'index.json'))]
    if stray:
        warnings.warn(f'`local_cache` {local!r} holds {stray} index files but no {CACHE_RECORD}: assuming they are '
                      f'a cache of {remote!r} (an earlier run stopped before recording it)')
    return None


def _write_cache_record(local: str, remote: str, meta: dict[str, Any]) -> None:
    # Atomic (unique temporary name, then rename): every rank on a node may write it at once.
    if not os.path.isdir(local):
        return
    tmp = os.path.join(local, f'.{CACHE_RECORD}.{os.getpid()}-{uuid.uuid4().hex[:8]}')
    with open(tmp, 'w') as f:
        json.dump({'remote': remote, 'meta': meta}, f, indent=1)
    os.replace(tmp, os.path.join(local, CACHE_RECORD))


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
    `local_cache` (default: a deterministic folder under the system temp dir). For a URL the
    dataset's prores_data.json must be there (it is uploaded last: no metadata, no complete dataset;
    RemoteDataError names the URL and the cause), shards are checked against the hashes in index.json
    as they are downloaded, and the metadata is recorded in the cache (CACHE_RECORD), so a warm cache
    makes no request to the store at all.
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
        remote = path_or_remote.rstrip('/')
        local = os.path.abspath(os.path.expanduser(local_cache)) if local_cache else _default_cache_dir(remote)
        meta = _cache_record(local, remote)  # a warm cache needs no request to the store at all
        cached = meta is not None
        if meta is None:
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
    if remote is not None and isinstance(meta.get('splits'), dict) and split not in meta['splits']:
        raise FileNotFoundError(f'split {split!r} not found at {remote} (splits present: {sorted(meta["splits"])})')

    extra = {}
    if remote is not None:
        # Shards are checked against the hashes in index.json as they are downloaded (datasets written
        # before hashes were recorded are read unchecked).
        extra['validate_hash'] = HASH_ALGO if HASH_ALGO in (meta or {}).get('hashes', ()) else None
    try:
        dataset = TokenDataset(local=local, remote=remote, split=split, batch_size=batch_size, shuffle=shuffle,
                               shuffle_seed=seed, seq_len=seq_len, **extra)
    except ValueError as e:
        if 'Reused local directory' in str(e):
            raise ValueError(f'{e}\nAnother live loader uses the cache {local!r} for {where!r}/{split}; pass a '
                             'distinct `local_cache`.') from e
        raise
    except FileExistsError as e:
        if '_locals' not in str(e):
            raise
        raise RuntimeError(f'{e}: another process on this machine registered streaming shared memory under the same '
                           'name at the same moment. Several simulated nodes on one machine need a /dev/shm each '
                           "(README: 'Two nodes on one machine').") from e
    except Exception as e:
        remote_side = type(e).__module__.split('.')[0] in ('botocore', 'boto3', 's3transfer', 'urllib3', 'google',
                                                          'azure', 'oci') or (remote is not None and remote in str(e))
        if remote is None or not remote_side:
            raise
        # e.g. the split's index.json is missing remotely, or the store went away since the metadata
        raise _remote_read_error(remote, f'{remote}/{split}/index.json', e) from e
    if not cached:
        _write_cache_record(local, remote, meta)
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


def _whole_number(text: str) -> int:
    """argparse type: a whole number, also in scientific notation ('2e9'); its range is checked by write_mds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number: use e.g. 2000000 or 2e6') from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f'{text!r} must be a whole number, e.g. 2000000 or 2e6')
    return int(value)


def main(argv: Optional[list[str]] = None) -> int:
    """`prores-data`: convert a text source into packed-token MDS shards (train/val). Returns the exit code."""
    parser = argparse.ArgumentParser(
        prog='prores-data',
        description='Tokenize a text source and write packed fixed-length samples as MDS shards '
        '(OUT/train, OUT/val, OUT/prores_data.json) for prores_algo training.')
    parser.add_argument('--source', default='stdlib', help=f'text source: {_SOURCE_HELP} (default: stdlib)')
    parser.add_argument('--out', required=True,
                        help='output folder (created atomically), or an object-store URL such as s3://bucket/prefix '
                        '(uploaded through streaming; S3_ENDPOINT_URL selects an S3-compatible endpoint)')
    parser.add_argument('--keep-local', default=None, metavar='DIR',
                        help='with a URL --out: also keep a complete local copy in DIR (default: none)')
    parser.add_argument('--tokenizer', default='byte',
                        help="'byte' (default, no files needed), a local tokenizer folder or a HF hub id")
    parser.add_argument('--seq-len', type=int, default=128, help='tokens per sample (default: 128)')
    parser.add_argument('--val-fraction', type=float, default=0.05,
                        help='fraction of documents for the val split; 0: no val split (default: 0.05)')
    parser.add_argument('--max-tokens', type=_whole_number, default=None,
                        help='stop after this many tokens (default: all); 2e9 and 2000000000 both work')
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
                         progress=not args.no_progress, keep_local=args.keep_local)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))  # exits 2 with the message, no traceback
    parts = ', '.join(f'{s} {v["samples"]} samples ({v["tokens"]} tokens, {v["documents"]} docs)'
                      for s, v in meta['splits'].items())
    print(f'prores-data: wrote {args.out}: {parts}; seq_len={meta["seq_len"]} tokenizer={meta["tokenizer"]} '
          f'vocab_size={meta["vocab_size"]}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
