"""Text sources: `iter_documents(source)` yields a source's documents as strings, in a deterministic order.

Sources: 'stdlib' (this machine's Python standard library sources: no download, the default),
a local file/folder (.txt .md .py .rst .jsonl), or 'hf:NAME[:CONFIG[:SPLIT]]' (Hugging Face
`datasets`, streamed; e.g. 'hf:allenai/c4:en').
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from prores_algo.training.recipe import is_url
from prores_algo.warn import warn_user

TEXT_SUFFIXES = ('.txt', '.md', '.py', '.rst', '.jsonl')
_SOURCE_HELP = (
    "'stdlib' (the Python standard library sources on this machine), an existing local file or "
    f"folder ({', '.join(TEXT_SUFFIXES)}; .jsonl needs a 'text' field), or "
    "'hf:NAME[:CONFIG[:SPLIT]]' (e.g. 'hf:allenai/c4:en')"
)


def iter_documents(source: str = 'stdlib', *, max_bytes: int | None = None) -> Iterator[str]:
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
                raise ValueError(
                    f'`source` file {source!r} has an unsupported suffix {path.suffix!r}. Accepted: {_SOURCE_HELP}.'
                )
            docs = _file_documents(path, strict=True)
        else:
            docs = _folder_documents(path)
    return _checked(docs, source, max_bytes)


def _checked(docs: Iterator[str], source: str, max_bytes: int | None) -> Iterator[str]:
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
        warn_user(f'skipped {len(skipped)} unreadable file(s) under {str(root)!r}: {skipped[:5]}')


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
                    raise ValueError(
                        f"`source` file {str(path)!r} line {lineno}: expected a JSON object with a string 'text' field"
                    )
                yield row['text']
    except (OSError, UnicodeDecodeError) as e:
        if strict:
            raise ValueError(f'`source` file {str(path)!r} could not be read as UTF-8 text: {e}') from e
        raise


def _hf_documents(source: str) -> Iterator[str]:
    parts = source[len('hf:') :].split(':')
    if not parts[0] or len(parts) > 3:
        raise ValueError(f'`source` {source!r}: expected hf:NAME, hf:NAME:CONFIG or hf:NAME:CONFIG:SPLIT')
    name, config, split = (
        parts[0],
        (parts[1] if len(parts) > 1 and parts[1] else None),
        (parts[2] if len(parts) > 2 and parts[2] else 'train'),
    )
    try:
        import datasets  # only needed for hf: sources, so not a hard dependency
    except ImportError as e:
        raise ValueError(
            f'`source` {source!r} needs the Hugging Face `datasets` package: pip install datasets '
            "(or use source='stdlib' or a local path)"
        ) from e
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
