"""Checkpoints in an S3-compatible object store (`s3://bucket/prefix`).

Both entries check the store before training (`check_store`): a missing bucket, refused credentials or
an unreachable endpoint is a one-line error naming the setting, not a traceback after the first save.

The DeepSpeed entry writes through a `CheckpointStore`: every checkpoint is first written by DeepSpeed
into a local staging folder (one per node; ZeRO-3 writes one file per rank), then

1. every rank uploads the files it wrote (`zero_pp_rank_<rank>_*`; rank 0 also the shared ones), so on
   several nodes each node uploads its own ranks' shards;
2. rank 0, once every rank reports its upload done, writes `<prefix>/<tag>/manifest.json` (each file's
   size and sha256), then `<prefix>/latest` (the tag) -- last.

`latest` therefore only ever names a checkpoint whose every file is in the store: a job killed, or a
server lost, between the shard uploads and the pointer leaves the previous checkpoint in use. A failed
upload is reported and the run goes on; its local copy stays in the staging folder (an uploaded one is
removed from it). A resume reads `latest`, downloads that tag's files (checked against the manifest)
into the staging folder, and loads them from there.

The endpoint is S3_ENDPOINT_URL when set (as for streaming and Composer), credentials boto3's own chain.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile

from prores_algo.training.config import ConfigError
from prores_algo.training.data.remote import _error_code, _s3_diagnosis, _split_url

__all__ = ['CheckpointStore', 'StoreError', 'check_store', 'staging_folder', 'save_overwrite']

LATEST = 'latest'
MANIFEST = 'manifest.json'
_RANK_FILE = re.compile(r'zero_pp_rank_(\d+)_')


class StoreError(RuntimeError):
    """A transfer to or from the store failed; the message names the object and the cause."""


def check_store(url: str, field: str, require_object: bool = False) -> None:
    """ConfigError (one line, naming `field`) unless the bucket of `url` exists and answers these
    credentials; with `require_object`, `url` must also name an existing object. Schemes other than
    s3:// are left to the library that reads them."""
    scheme, bucket, key = _split_url(url)
    if scheme != 's3':
        return
    cause = _s3_diagnosis(url, check_prefix=False)
    if cause is None and require_object:
        try:
            _client().head_object(Bucket=bucket, Key=key)
        except Exception as e:
            code = _error_code(e)
            if code not in ('404', 'NoSuchKey', 'NotFound'):
                raise
            cause = f'no object {key!r} in bucket {bucket!r}: check the path (a checkpoint file the run saved)'
    if cause is not None:
        if cause.startswith(f'bucket {bucket!r} does not exist'):
            cause += ': create it, or fix the bucket name'
        raise ConfigError(f'{field}={url!r}: {cause}')


def staging_folder(url: str) -> str:
    """This node's local folder for the checkpoints of `url` (under the temp dir, one per URL)."""
    digest = hashlib.sha1(url.rstrip('/').encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), 'prores-checkpoints', digest)


def _client():
    import boto3
    from botocore.config import Config

    # Few, short retries: a lost server is reported within seconds and the run goes on.
    config = Config(retries={'max_attempts': 3, 'mode': 'standard'}, connect_timeout=5, read_timeout=60)
    return boto3.session.Session().client('s3', endpoint_url=os.environ.get('S3_ENDPOINT_URL'), config=config)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


class CheckpointStore:
    """The checkpoints under `url` (s3://bucket/prefix), staged in `staging` (default: `staging_folder`)."""

    def __init__(self, url: str, staging: str | None = None):
        scheme, self.bucket, prefix = _split_url(url)
        if scheme != 's3' or not self.bucket:
            raise ConfigError(f'{url!r}: checkpoints in an object store need an s3://bucket/prefix URL')
        self.url = url.rstrip('/')
        self.prefix = f'{prefix}/' if prefix else ''
        self.staging = staging or staging_folder(url)
        self._s3 = None

    @property
    def s3(self):
        if self._s3 is None:
            self._s3 = _client()
        return self._s3

    def _key(self, *parts: str) -> str:
        return self.prefix + '/'.join(parts)

    def _fail(self, what: str, e: BaseException) -> StoreError:
        return StoreError(f'{what} {self.url}: {type(e).__name__}: {e}')

    # -- the pointer and the manifest ---------------------------------------------------------------------
    def latest(self) -> str | None:
        """The tag `latest` names (a complete checkpoint), or None when the store holds none yet."""
        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=self._key(LATEST))['Body'].read()
        except Exception as e:
            if _error_code(e) in ('404', 'NoSuchKey'):
                return None
            raise self._fail('cannot read `latest` of', e) from None
        return body.decode().strip() or None

    def manifest(self, tag: str) -> dict[str, dict]:
        """{file name: {'size', 'sha256'}} of a complete checkpoint `tag`."""
        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=self._key(tag, MANIFEST))['Body'].read()
        except Exception as e:
            if _error_code(e) in ('404', 'NoSuchKey'):
                raise StoreError(
                    f'checkpoint {tag!r} is not complete in {self.url} (no {MANIFEST}: its upload did not finish)'
                ) from None
            raise self._fail(f'cannot read the manifest of {tag!r} in', e) from None
        return json.loads(body)['files']

    def publish(self, tag: str, files: dict[str, dict]) -> None:
        """The manifest of `tag`, then `latest` = tag. Call once every file of `tag` is uploaded."""
        body = json.dumps({'tag': tag, 'files': files}, indent=1, sort_keys=True).encode()
        try:
            self.s3.put_object(Bucket=self.bucket, Key=self._key(tag, MANIFEST), Body=body)
            self.s3.put_object(Bucket=self.bucket, Key=self._key(LATEST), Body=tag.encode())
        except Exception as e:
            raise self._fail(f'cannot write the manifest and `latest` of {tag!r} to', e) from None

    # -- files ------------------------------------------------------------------------------------------
    def own_files(self, tag: str, rank: int) -> list[str]:
        """The files of staged checkpoint `tag` that `rank` uploads: its own `zero_pp_rank_<rank>_*`
        shards; rank 0 also every file no rank number marks (model states, the ProRes sidecar)."""
        folder = os.path.join(self.staging, tag)
        names = []
        for name in sorted(os.listdir(folder)):
            if not os.path.isfile(os.path.join(folder, name)) or name.endswith('.tmp'):
                continue
            m = _RANK_FILE.search(name)
            if (m is not None and int(m.group(1)) == rank) or (m is None and rank == 0):
                names.append(name)
        return names

    def upload(self, tag: str, names: list[str]) -> dict[str, dict]:
        """Upload staged files of `tag`; returns their manifest entries. StoreError on failure."""
        entries = {}
        for name in names:
            path = os.path.join(self.staging, tag, name)
            entries[name] = {'size': os.path.getsize(path), 'sha256': _sha256(path)}
            try:
                self.s3.upload_file(path, self.bucket, self._key(tag, name))
            except Exception as e:
                raise self._fail(f'cannot upload {tag}/{name} to', e) from None
        return entries

    def download(self, tag: str, names: list[str] | None = None) -> str:
        """Fetch files of complete checkpoint `tag` (all, or `names`) into the staging folder, each checked
        against the manifest (a staged file that already matches is kept). Returns the staging folder."""
        files = self.manifest(tag)
        folder = os.path.join(self.staging, tag)
        os.makedirs(folder, exist_ok=True)
        for name in names if names is not None else sorted(files):
            want = files.get(name)
            if want is None:
                raise StoreError(f'checkpoint {tag!r} in {self.url} has no file {name!r}')
            path = os.path.join(folder, name)
            if os.path.isfile(path) and os.path.getsize(path) == want['size'] and _sha256(path) == want['sha256']:
                continue
            tmp = f'{path}.{os.getpid()}.tmp'  # other processes of this node may fetch the same file
            try:
                self.s3.download_file(self.bucket, self._key(tag, name), tmp)
            except Exception as e:
                raise self._fail(f'cannot download {tag}/{name} from', e) from None
            if _sha256(tmp) != want['sha256']:
                os.remove(tmp)
                raise StoreError(
                    f'{self.url}/{tag}/{name} does not match its sha256 in the manifest: the stored checkpoint '
                    'is damaged; resume from an earlier tag (--load_tag)'
                )
            os.replace(tmp, path)
        return self.staging


# ---------------------------------------------------------------------------------------------------
# the DeepSpeed entry: save, resume
# ---------------------------------------------------------------------------------------------------
def save_to_store(engine, prores, store: CheckpointStore, tag: str) -> bool:
    """Save checkpoint `tag` into the staging folder, upload it, publish it. Call on every rank.

    True when `latest` now names `tag`; False when an upload failed (rank 0 says which and where the
    local copy is; `latest` keeps naming the previous complete checkpoint and training goes on).
    """
    import torch.distributed as dist

    from prores_algo.integrations.deepspeed import save_checkpoint

    rank = dist.get_rank()
    save_checkpoint(engine, prores, store.staging, tag=tag)
    dist.barrier()  # every rank's files are written before anyone lists the folder
    mine = store.own_files(tag, rank)
    try:
        report = (store.upload(tag, mine), None)
    except (StoreError, OSError) as e:
        report = (None, f'rank {rank}: {e}')
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    errors = [err for _, err in reports if err is not None]
    if rank == 0 and not errors:
        files = {name: entry for entries, _ in reports for name, entry in entries.items()}
        try:
            store.publish(tag, files)
        except StoreError as e:
            errors.append(f'rank 0: {e}')
    outcome = [errors]
    dist.broadcast_object_list(outcome, src=0)
    errors = outcome[0]
    if not errors:  # in the store for good: the staged copy would only fill this node's disk
        for name in mine:
            os.remove(os.path.join(store.staging, tag, name))
    if rank == 0:
        if errors:
            print(
                f'[prores] checkpoint {tag}: the upload to {store.url} failed ({errors[0]}); the local copy '
                f'stays in {os.path.join(store.staging, tag)}, and {store.url}/latest still names the last '
                'complete checkpoint',
                flush=True,
            )
        else:
            print(f'[prores] checkpoint {tag} is in {store.url} ({len(files)} files)', flush=True)
    return not errors


def resume_source(store: CheckpointStore, tag: str | None, field: str) -> tuple[str | None, str | None]:
    """(staging folder, tag) to resume from `store` -- `tag`, or the one `latest` names -- with the
    manifest and the ProRes sidecar already fetched (for the checks made before any process group
    exists); (None, None) when the store holds no checkpoint yet and no tag is asked for."""
    from prores_algo.integrations.deepspeed import SIDECAR_FILE

    try:
        tag = tag or store.latest()
        if tag is None:
            return None, None
        names = [SIDECAR_FILE] if SIDECAR_FILE in store.manifest(tag) else []
        return store.download(tag, names), tag
    except StoreError as e:
        raise ConfigError(f'{field}={store.url!r}: {e}') from None


def store_locations(plan, load_tag: str | None):
    """(store for saving or None, load_dir, load_tag) of a DeepSpeed `StepPlan` once every s3:// location
    answers: the save store (with autoresume, its `latest` checkpoint) and a load_path store resolve to
    their local staging folder and the tag to load, its ProRes record already fetched."""
    from prores_algo.training.recipe import is_url

    store, load_dir = None, plan.load_dir
    if is_url(plan.save_dir):
        check_store(plan.save_dir, 'save_folder (--save_dir)')
        store = CheckpointStore(plan.save_dir)
        if plan.autoresume and not load_dir:
            load_dir, found = resume_source(store, load_tag, 'save_folder (--save_dir)')
            load_tag = found or load_tag
    if is_url(plan.load_dir):
        check_store(plan.load_dir, 'load_path (--load_dir)')
        load_dir, load_tag = resume_source(CheckpointStore(plan.load_dir), load_tag, 'load_path (--load_dir)')
        if load_dir is None:
            raise ConfigError(f'load_path (--load_dir)={plan.load_dir!r}: no checkpoint there (no `latest` object)')
    return store, load_dir, load_tag


def fetch_staged(plan, load_dir: str, tag: str) -> None:
    """When `load_dir` is the staging folder of one of `plan`'s stores, download `tag` into it."""
    from prores_algo.training.recipe import is_url

    for url in (plan.load_dir, plan.save_dir):
        if is_url(url) and staging_folder(url) == load_dir:
            return fetch_for_resume(CheckpointStore(url), tag)


def fetch_for_resume(store: CheckpointStore, tag: str) -> None:
    """Download every file of `tag` (local rank 0 of each node), then wait on every rank."""
    import torch.distributed as dist

    error = None
    if int(os.environ.get('LOCAL_RANK', '0')) == 0:
        try:
            store.download(tag)
        except StoreError as e:
            error = str(e)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [e for e in errors if e is not None]
    if failed:
        raise StoreError(f'cannot resume from checkpoint {tag!r}: {failed[0]}')


# ---------------------------------------------------------------------------------------------------
# the Composer entry (Composer uploads and resumes itself: RemoteUploaderDownloader, autoresume)
# ---------------------------------------------------------------------------------------------------
def check_composer_locations(save_folder: str | None, load_path: str | None) -> None:
    """Before anything is built: the store of `save_folder` answers, and `load_path` is a stored object."""
    from prores_algo.training.recipe import is_url

    if is_url(save_folder):
        check_store(save_folder, 'save_folder')
    if is_url(load_path):
        check_store(load_path, 'load_path', require_object=True)


def composer_latest_is_stored(save_folder: str, run_name: str | None) -> bool:
    """True when `save_folder` (s3://) holds this run's `latest-rank0.pt.symlink`, the object Composer
    writes once a checkpoint's every file is uploaded and autoresume reads."""
    from composer.utils import format_name_with_dist

    scheme, bucket, prefix = _split_url(format_name_with_dist(save_folder, run_name))
    if scheme != 's3':
        return False
    key = f'{prefix}/latest-rank0.pt.symlink' if prefix else 'latest-rank0.pt.symlink'
    try:
        _client().head_object(Bucket=bucket, Key=key)
    except Exception as e:
        if _error_code(e) in ('404', 'NoSuchKey', 'NotFound'):
            return False
        raise
    return True


def save_overwrite(cfg) -> bool:
    """`save_overwrite`, or True when autoresume finds this run's own `latest` checkpoint in a local save_folder.

    Composer writes a checkpoint file in place and points `latest-rank0.pt` at it only once it is written,
    so a run killed during a save leaves a partial file for a later batch than `latest`. Restarted with
    autoresume, it resumes from `latest`, but Composer's guard against overwriting *another* run's
    checkpoints then refuses to start ("... may conflict with a future checkpoint of the current run").
    When `latest` is there, the folder is this run's own: the resumed run may overwrite what its killed
    attempt left behind. (A fresh run in a folder with no `latest` keeps Composer's guard.)
    """
    if cfg.save_overwrite:
        return True
    if not (cfg.autoresume and cfg.save_folder):
        return False
    from prores_algo.training.recipe import is_url

    if is_url(cfg.save_folder):  # the same rule, for the store's `latest`
        return composer_latest_is_stored(cfg.save_folder, cfg.run_name)
    from composer.utils import format_name_with_dist

    folder = format_name_with_dist(cfg.save_folder, cfg.run_name)
    return os.path.islink(os.path.join(folder, 'latest-rank0.pt'))
