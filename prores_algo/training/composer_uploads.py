"""How prores-train's checkpoint uploads to an s3:// `save_folder` run, and how they fail.

Composer (0.32) gives a Trainer with a remote save_folder a `RemoteUploader` that uploads in spawned
worker processes; it has no thread option (`use_procs` is a knob of RemoteUploaderDownloader, which a
remote save_folder does not use). When the store goes away mid-upload, botocore's error still holds the
open file and cannot be pickled back to the trainer: the run dies with "cannot pickle
'_io.BufferedReader'", the cause is lost, and the staged copy of the checkpoint goes with the uploader's
temporary folder at exit.

`use_threads` therefore swaps the uploader's process pools, before anything is submitted, for threads of
the trainer's process (uploads are I/O that releases the GIL, and no process has to start): the error
arrives whole, and a file that did not reach the store is first moved out of that temporary folder into
`staging_folder(url)`, the folder the DeepSpeed entry keeps its local copies in. The run then stops
with `UploadFailed`, one line naming the file, the cause and where its copy is kept. Composer writes the
store's `latest-rank0.pt.symlink` only once a checkpoint's files are there, so autoresume resumes from
the last complete checkpoint, never from the one cut short.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor

from prores_algo.training.checkpoint_store import StoreError, staging_folder
from prores_algo.training.data.remote import _split_url

__all__ = ['UploadFailed', 'use_threads', 'stop_uploads']


class UploadFailed(StoreError):
    """A checkpoint did not reach the store; the message says where its local copy is kept."""


def _uploader(trainer):
    return getattr(getattr(trainer, '_checkpoint_saver', None), 'remote_uploader', None)


def use_threads(trainer, save_folder: str | None) -> None:
    """Composer's checkpoint uploads of `trainer` in threads, a failed file kept (see the module)."""
    from composer.utils import format_name_with_dist

    uploader = _uploader(trainer)
    if uploader is None:
        return
    url = format_name_with_dist(save_folder or '', trainer.state.run_name).rstrip('/')
    if _split_url(url)[0] != 's3':
        return
    # Composer polls for a checkpoint's uploaded files every 30 s before it writes `latest` to the store;
    # once a second, a run killed soon after a save still leaves that save to resume from
    trainer._checkpoint_saver._symlink_upload_wait_before_next_try_in_seconds = 1.0
    for pool in (uploader.upload_executor, uploader.check_remote_files_exist_executor):
        pool.shutdown(wait=False)  # nothing submitted yet: no worker process was started
    uploader.upload_executor = _KeepFailed(url)
    uploader.check_remote_files_exist_executor = ThreadPoolExecutor(2, thread_name_prefix='prores-check')


class _KeepFailed(ThreadPoolExecutor):
    """One upload at a time (Composer's default). A file that fails is moved to the keep folder and
    raises `UploadFailed`; after that, the files still queued are moved there without a try."""

    def __init__(self, url: str):
        super().__init__(1, thread_name_prefix='prores-upload')
        self.url, self.failed = url, False

    def submit(self, fn, /, *args, **kwargs):
        if args:  # Composer 0.32 names every argument; a file could not be kept from positional ones
            raise TypeError('prores-train checkpoint uploads take keyword arguments only (as Composer 0.32 passes)')
        return super().submit(self._upload, fn, kwargs)

    def _keep(self, kwargs: dict) -> tuple[str, str]:
        prefix = _split_url(self.url)[2]
        name = kwargs['remote_file_name']
        if prefix and not os.path.relpath(name, prefix).startswith('..'):
            name = os.path.relpath(name, prefix)
        kept = os.path.join(staging_folder(self.url), name.lstrip('/'))  # inside the staging folder, always
        os.makedirs(os.path.dirname(kept), exist_ok=True)
        shutil.move(kwargs['local_file_path'], kept)
        return name, kept

    def _upload(self, fn, kwargs: dict):
        if self.failed:
            if not kwargs['remote_file_name'].endswith('.symlink'):  # a pointer is no checkpoint
                self._keep(kwargs)
            return 0
        try:
            return fn(**kwargs)
        except FileExistsError:  # Composer's own advice (save_overwrite) stands
            raise
        except Exception as e:
            self.failed = True
            if kwargs['remote_file_name'].endswith('.symlink'):  # Composer uploads it once the files are there
                raise UploadFailed(
                    f'upload of the latest-checkpoint pointer to {self.url} failed: {_cause(e)}; the '
                    "checkpoint's files reached the store, and the store's pointer still names the previous "
                    'checkpoint; restart with autoresume once the store answers'
                ) from e
            name, kept = self._keep(kwargs)
            raise UploadFailed(
                f'checkpoint upload to {self.url} failed: {name}: {_cause(e)}; the local copy is kept at {kept}; '
                'restart with autoresume once the store answers'
            ) from e


def _cause(e: BaseException) -> str:
    """botocore's error under boto3's S3UploadFailedError (it names the endpoint), on one line."""
    chain: list[BaseException] = []
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    botocore = [x for x in chain if type(x).__module__.startswith('botocore')]
    e = botocore[-1] if botocore else chain[0]
    return ' '.join(f'{type(e).__name__}: {e}'.split()).rstrip('.')


def stop_uploads(trainer) -> None:
    """After `UploadFailed`: the pointer checks stop polling, the queued files are kept without a try,
    and Composer's close finds no error left to log."""
    uploader = _uploader(trainer)
    if uploader is None:
        return
    uploader.is_remote_upload_failed.set()
    uploader.upload_executor.shutdown(wait=True)
    uploader.check_remote_files_exist_executor.shutdown(wait=False, cancel_futures=True)
    uploader.futures = []
