"""Object stores (s3:// tested end to end; any scheme streaming uploads to / downloads from works).

URL test, S3 endpoint, error diagnosis (RemoteDataError names the URL and the likely cause), the
remote side of a write (`_RemoteOut`) and reading a remote dataset's metadata.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from prores_algo.training.data.layout import FORMAT, META_FILENAME, SPLITS
from prores_algo.training.data.versions import ours, version_of


class RemoteDataError(ValueError):
    """A remote dataset (s3://...) cannot be written or read; the message names the URL and the likely cause."""


def _split_url(url: str) -> tuple[str, str, str]:
    from urllib.parse import urlparse

    u = urlparse(url)
    return u.scheme, u.netloc, u.path.strip('/')


def _error_code(e: BaseException) -> str:
    return str(((getattr(e, 'response', None) or {}).get('Error') or {}).get('Code', ''))


_DENIED = (
    '403',
    'AccessDenied',
    'InvalidAccessKeyId',
    'SignatureDoesNotMatch',
    'InvalidToken',
    'ExpiredToken',
    'AllAccessDisabled',
    'InvalidClientTokenId',
)
_CREDENTIALS_HELP = (
    'check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance '
    'role) and their permissions on the bucket'
)


def _s3_endpoint() -> str:
    ep = os.environ.get('S3_ENDPOINT_URL')
    return f'the S3 endpoint {ep} (S3_ENDPOINT_URL)' if ep else 'AWS S3 (S3_ENDPOINT_URL is not set)'


def _s3_diagnosis(url: str, check_prefix: bool) -> str | None:
    """Why s3://bucket/prefix cannot be used, from the store's own answers (None: no cause found).

    Uses the same endpoint rule as streaming's S3 uploader and downloader (S3_ENDPOINT_URL).
    """
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    _, bucket, prefix = _split_url(url)
    client = boto3.session.Session().client(
        's3',
        endpoint_url=os.environ.get('S3_ENDPOINT_URL'),
        config=Config(retries={'max_attempts': 2, 'mode': 'standard'}, connect_timeout=10, read_timeout=30),
    )
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


def _diagnose(url: str, check_prefix: bool) -> str | None:
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
            cause = (
                f'{what} does not exist: the upload of this dataset did not complete, or it was not written by '
                f'prores-data (`prores-data --out {remote}` uploads {META_FILENAME} last, once every shard is up)'
            )
        elif _error_code(e) in _DENIED:
            cause = f'access to {what} was denied ({_error_code(e)}); {_CREDENTIALS_HELP}'
        else:
            cause = f'{type(e).__name__}: {e}'
    return RemoteDataError(f'cannot read the dataset at {remote}: {cause}')


def _remote_write_error(remote: str, e: BaseException) -> RemoteDataError:
    cause = _diagnose(remote, check_prefix=False)
    if cause is None:
        cause = (
            f'access denied ({_error_code(e)}); {_CREDENTIALS_HELP}'
            if _error_code(e) in _DENIED
            else f'{type(e).__name__}: {e}'
        )
    return RemoteDataError(f'cannot write the dataset to {remote}: {cause}')


class _RemoteOut:
    """The remote side of a write: streaming's own uploader for `url` (which checks the bucket when it is
    created), plus listing and, on S3, deletion. Small objects (the metadata) are staged in a private
    temporary folder; `close()` removes it."""

    def __init__(self, url: str):
        from streaming.base.storage import CloudUploader

        self.url = url
        self.scheme, self.bucket, prefix = _split_url(url)
        self.base = f'{prefix}/' if prefix else ''
        self.staging = tempfile.mkdtemp(prefix='prores-data-meta-')
        try:
            self.uploader = CloudUploader.get((self.staging, url), keep_local=True, exist_ok=True)
        except Exception as e:
            self.close()
            raise _remote_write_error(url, e) from None

    def close(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def object_keys(self) -> list[str]:
        """Object names under the URL, relative to it."""
        try:
            names = self.uploader.list_objects() or []
        except Exception as e:
            raise _remote_write_error(self.url, e) from None
        return sorted(n[len(self.base) :] for n in names if n.startswith(self.base))

    def prepare(self, overwrite: bool) -> tuple[list[str], set[str]]:
        """Refuse a prefix that holds anything but our datasets' objects, or a complete dataset unless
        `overwrite`. Touches nothing: the new version goes under a new prefix, and the current dataset
        stays readable until the pointer moves. Returns the names found and the first path parts to keep
        after the pointer moves: the version the pointer names now (the split folders of a flat dataset),
        or, if the pointer cannot be read, everything (what readers use is then unknown)."""
        keys = self.object_keys()
        foreign = [k for k in keys if not ours(k)]
        if foreign:
            raise RemoteDataError(
                f'`out_dir` {self.url} holds other objects ({foreign[:5]}); refusing to write a '
                'dataset there (even with overwrite): choose an empty or new prefix'
            )
        if keys and self.scheme != 's3':
            raise RemoteDataError(
                f'`out_dir` {self.url} is not empty; writing over objects is implemented for s3:// only '
                '(old versions must be deleted): delete them first, or choose a new prefix'
            )
        if META_FILENAME not in keys:
            return keys, set()
        if not overwrite:
            raise RemoteDataError(
                f'`out_dir` {self.url} already holds a dataset; pass overwrite=True '
                '(--overwrite) to replace it, or choose another prefix'
            )
        try:
            previous = version_of(_remote_metadata(self.url))
        except ValueError:
            return keys, {k.split('/', 1)[0] for k in keys}
        return keys, {previous} if previous else set(SPLITS)

    def put_json(self, name: str, obj: Any) -> None:
        """Upload `obj` as the object `name` in one PUT (a small object is never uploaded in parts)."""
        local = Path(self.staging, name)
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(json.dumps(obj, indent=2) + '\n')
        self.upload(name)

    def upload(self, name: str) -> None:
        try:
            self.uploader.upload_file(name)
        except Exception as e:
            raise _remote_write_error(self.url, e) from None

    def delete(self, names: list[str]) -> None:
        if not names:
            return
        if self.scheme != 's3':
            raise RemoteDataError(
                f'cannot delete {len(names)} object(s) under {self.url}: implemented for s3:// only; '
                'delete them yourself'
            )
        try:
            for i in range(0, len(names), 1000):
                answer = self.uploader.s3.delete_objects(
                    Bucket=self.bucket,
                    Delete={'Objects': [{'Key': self.base + n} for n in names[i : i + 1000]], 'Quiet': True},
                )
                if answer.get('Errors'):
                    raise RuntimeError(f'the store refused to delete: {answer["Errors"][:3]}')
        except Exception as e:
            raise _remote_write_error(self.url, e) from None


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
        raise RemoteDataError(
            f'cannot read the dataset at {remote}: {url} is not the metadata of a prores_algo '
            f'dataset (format {meta.get("format") if isinstance(meta, dict) else None!r})'
        )
    try:
        version_of(meta)
    except ValueError as e:
        raise RemoteDataError(f'cannot read the dataset at {remote}: {e}') from None
    return meta


def _remote_metadata_if_any(remote: str) -> dict[str, Any] | None:
    """The metadata the pointer at `remote` names, or None if nothing there is complete (an empty prefix,
    or only the debris of an unfinished write); RemoteDataError if the store cannot be used."""
    dest = _RemoteOut(remote)  # checks the bucket and the credentials
    try:
        present = META_FILENAME in dest.object_keys()
    finally:
        dest.close()
    return _remote_metadata(remote) if present else None
