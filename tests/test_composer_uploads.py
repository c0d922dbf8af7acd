"""prores-train's checkpoint upload executor (`training.composer_uploads._KeepFailed`), driven directly as
Composer 0.32's RemoteUploader drives it (keyword arguments only): a failed file is moved into the
staging folder and named in one line, a failed `latest` pointer is reported as what it is, files queued
after a failure are kept without a try, and nothing lands outside the staging folder. The same executor
against a real S3 server that goes away mid-upload: tests/test_object_store_checkpoint.py."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from prores_algo.training.checkpoint_store import staging_folder
from prores_algo.training.composer_uploads import UploadFailed, _KeepFailed

URL = 's3://bucket/runs/store'


@pytest.fixture
def staging(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path / 'tmp'))
    return Path(staging_folder(URL))


def _file(tmp_path: Path, name: str, text: str = 'weights') -> str:
    path = tmp_path / 'uploader' / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def _lost(**kwargs):
    raise ConnectionError('Could not connect to the endpoint URL: "http://127.0.0.1:1/bucket"')


def _submit(ex, fn, tmp_path, remote_name):
    return ex.submit(fn, remote_file_name=remote_name, local_file_path=_file(tmp_path, Path(remote_name).name))


def test_a_failed_checkpoint_is_kept_in_the_staging_folder_and_named(tmp_path, staging):
    ex = _KeepFailed(URL)
    ok = _submit(ex, lambda **kw: 7, tmp_path, 'runs/store/ep0-ba3-rank0.pt')
    failed = _submit(ex, _lost, tmp_path, 'runs/store/ep0-ba6-rank0.pt')
    queued = _submit(ex, lambda **kw: pytest.fail('tried after a failure'), tmp_path, 'runs/store/ep0-ba9-rank0.pt')
    pointer = _submit(ex, lambda **kw: pytest.fail('tried after a failure'), tmp_path, 'runs/store/latest.symlink')
    assert ok.result() == 7
    with pytest.raises(UploadFailed) as e:
        failed.result()
    msg = str(e.value)
    assert '\n' not in msg and URL in msg and 'ep0-ba6-rank0.pt' in msg and 'Could not connect' in msg
    assert f'kept at {staging / "ep0-ba6-rank0.pt"}' in msg
    assert queued.result() == 0 and pointer.result() == 0
    assert (staging / 'ep0-ba6-rank0.pt').read_text() == 'weights'
    assert (staging / 'ep0-ba9-rank0.pt').is_file()  # queued behind the failure: kept without a try
    assert not (staging / 'latest.symlink').exists()  # a pointer is no checkpoint
    ex.shutdown()


def test_a_failed_pointer_is_reported_as_the_pointer(tmp_path, staging):
    ex = _KeepFailed(URL)
    with pytest.raises(UploadFailed, match="latest-checkpoint pointer .* the checkpoint's files reached the store"):
        _submit(ex, _lost, tmp_path, 'runs/store/latest-rank0.pt.symlink').result()
    assert not staging.exists()
    ex.shutdown()


def test_a_name_outside_the_prefix_stays_inside_the_staging_folder(tmp_path, staging):
    ex = _KeepFailed(URL)
    with pytest.raises(UploadFailed):
        _submit(ex, _lost, tmp_path, 'elsewhere/ep0-ba3-rank0.pt').result()
    kept = staging / 'elsewhere' / 'ep0-ba3-rank0.pt'
    assert kept.is_file() and os.path.commonpath([kept, staging]) == str(staging)
    ex.shutdown()


def test_positional_arguments_are_refused_not_dropped():
    ex = _KeepFailed(URL)
    with pytest.raises(TypeError, match='keyword arguments only'):
        ex.submit(lambda *a, **kw: None, 'runs/store/x.pt', local_file_path='x')
    ex.shutdown()
