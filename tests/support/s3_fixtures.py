"""The S3 fixtures the object-store tests share: `s3_server`, one real S3-compatible server (moto's) per
test module, and `s3`, that server reached from the test's own process (streaming and boto3 read the
endpoint and credentials from the environment)."""

import pytest

from tests.support.s3_server import AWS_ENV, MotoS3


@pytest.fixture(scope='module')
def s3_server(tmp_path_factory):
    with MotoS3(log=tmp_path_factory.mktemp('moto') / 'moto.log') as server:
        yield server


@pytest.fixture
def s3(s3_server, monkeypatch):
    for k in AWS_ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    return s3_server
