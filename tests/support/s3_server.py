"""A real S3-compatible server for tests: moto's standalone server (`moto[server]`, the `dev` extra), run as
a subprocess on a free 127.0.0.1 port, with authentication on.

    with MotoS3() as s3:                      # started here, stopped (and waited for) on exit
        env = s3.env                           # S3_ENDPOINT_URL + the credentials of an IAM user
        s3.client().list_objects_v2(Bucket=s3.bucket)

Authentication: moto accepts any key by default, so a wrong-credentials test would pass for the wrong
reason. The server therefore creates an IAM user with an allow-all policy and an access key, then turns
on request authentication (`/moto-api/reset-auth`): from then on a request signed with any other key is
refused with InvalidAccessKeyId / 403, as AWS does. Requests go to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.helpers import free_port

REGION = 'us-east-1'
# Names that change which credentials / endpoint boto3 uses; cleared so the machine's own AWS setup
# never leaks into a test.
AWS_ENV = (
    'AWS_ACCESS_KEY_ID',
    'AWS_SECRET_ACCESS_KEY',
    'AWS_SESSION_TOKEN',
    'AWS_SECURITY_TOKEN',
    'AWS_PROFILE',
    'AWS_DEFAULT_PROFILE',
    'AWS_REGION',
    'AWS_DEFAULT_REGION',
    'AWS_CONFIG_FILE',
    'AWS_SHARED_CREDENTIALS_FILE',
    'AWS_ENDPOINT_URL',
    'AWS_ENDPOINT_URL_S3',
    'S3_ENDPOINT_URL',
    'AWS_EC2_METADATA_DISABLED',
    'MOSAICML_STREAMING_AWS_REQUESTER_PAYS',
    'S3_CANNED_ACL',
)


def moto_available() -> bool:
    return (
        shutil.which('moto_server', path=str(Path(sys.executable).parent)) is not None
        or shutil.which('moto_server') is not None
    )


class MotoS3:
    """moto_server as a context manager; `bucket` is created, `env` reaches it with valid credentials."""

    def __init__(self, bucket: str = 'prores-test', startup_timeout: float = 60.0, log: Path | None = None):
        self.bucket = bucket
        self.startup_timeout = startup_timeout
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.url = ''
        self.key_id = self.secret = ''

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> MotoS3:
        exe = shutil.which('moto_server', path=str(Path(sys.executable).parent)) or shutil.which('moto_server')
        if exe is None:
            raise RuntimeError("moto_server not found: pip install 'moto[server]' (the dev extra)")
        self.port = free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        out = open(self.log, 'ab') if self.log else subprocess.DEVNULL  # noqa: SIM115 (the server's log, open while it runs)
        env = {k: v for k, v in os.environ.items() if k not in AWS_ENV}
        self.proc = subprocess.Popen(
            [exe, '-H', '127.0.0.1', '-p', str(self.port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        if out is not subprocess.DEVNULL:
            out.close()
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f'moto_server exited with {self.proc.returncode} at start')
            try:
                urllib.request.urlopen(self.url + '/moto-api/', timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f'moto_server did not answer on {self.url} in {self.startup_timeout:.0f} s'
                    ) from None
                time.sleep(0.1)
        try:
            self._set_up()
        except BaseException:
            self.stop()
            raise
        return self

    def _set_up(self) -> None:
        # Before authentication is on, any key works: create the user, its key, and the bucket.
        iam = self._boto('iam', 'bootstrap', 'bootstrap')
        iam.create_user(UserName='prores')
        iam.put_user_policy(
            UserName='prores',
            PolicyName='all',
            PolicyDocument=json.dumps(
                {'Version': '2012-10-17', 'Statement': [{'Effect': 'Allow', 'Action': '*', 'Resource': '*'}]}
            ),
        )
        key = iam.create_access_key(UserName='prores')['AccessKey']
        self.key_id, self.secret = key['AccessKeyId'], key['SecretAccessKey']
        self.client().create_bucket(Bucket=self.bucket)
        request = urllib.request.Request(
            self.url + '/moto-api/reset-auth', data=b'0', method='POST', headers={'Content-Type': 'text/plain'}
        )
        urllib.request.urlopen(request, timeout=10).read()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> MotoS3:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- clients and environment --------------------------------------------------------------------------
    def env_with(self, key_id: str | None = None, secret: str | None = None) -> dict[str, str]:
        """What a process needs to reach the server: S3_ENDPOINT_URL (streaming and Composer honour it)
        and credentials (valid ones unless given). No IMDS probe, no ~/.aws files."""
        return {
            'S3_ENDPOINT_URL': self.url,
            'AWS_ACCESS_KEY_ID': key_id or self.key_id,
            'AWS_SECRET_ACCESS_KEY': secret or self.secret,
            'AWS_DEFAULT_REGION': REGION,
            'AWS_EC2_METADATA_DISABLED': 'true',
            'AWS_CONFIG_FILE': os.devnull,
            'AWS_SHARED_CREDENTIALS_FILE': os.devnull,
        }

    @property
    def env(self) -> dict[str, str]:
        return self.env_with()

    def _boto(self, service: str, key_id: str, secret: str):
        import boto3

        return boto3.session.Session().client(
            service, endpoint_url=self.url, region_name=REGION, aws_access_key_id=key_id, aws_secret_access_key=secret
        )

    def client(self):
        return self._boto('s3', self.key_id or 'bootstrap', self.secret or 'bootstrap')

    def keys(self, prefix: str = '') -> list[str]:
        pages = self.client().get_paginator('list_objects_v2').paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o['Key'] for page in pages for o in page.get('Contents', []))


def process_env(extra: dict[str, str]) -> dict[str, str]:
    """os.environ without the machine's AWS settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in AWS_ENV}
    env.update(extra)
    return env
