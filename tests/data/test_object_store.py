"""Object-store data end to end, against a real S3-compatible server (moto's, tests/support/s3_server.py; started
here on a free 127.0.0.1 port, authentication on, stopped at teardown).

`prores-data --out s3://...` writes the shards through streaming's uploader; `build_dataloader` (so
`prores-train` and `prores-ds-train`) streams them into a local cache, checking every shard's hash.
Bad input — a missing bucket or prefix, wrong credentials, an unfinished upload, a shard that fails its
hash — gives an error that names the URL, and leaves nothing local that loads as a complete dataset.
Training, resuming and the warm second run are here for `prores-train` (one process; the server is
stopped before the second run); tests/test_multinode.py does the same on two nodes for both entries.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tests.support.s3_server import MotoS3, moto_available, process_env

pytestmark = pytest.mark.skipif(not moto_available(), reason="needs moto's S3 server: pip install 'moto[server]'")

ROOT = Path(__file__).resolve().parents[2]
WRITE = [
    '--source',
    'stdlib',
    '--tokenizer',
    'byte',
    '--seq_len',
    '32',
    '--max_tokens',
    '20000',
    '--val_fraction',
    '0.1',
    '--no_progress',
]


@pytest.fixture(scope='module')
def dataset(s3_server, tmp_path_factory):
    """`prores-data --out s3://prores-test/ds --keep_local copy ...`, once for the module."""
    from prores_algo.training.data import main

    d = tmp_path_factory.mktemp('written')
    saved = dict(os.environ)
    os.environ.update(s3_server.env)
    try:
        assert main([*WRITE, '--out', f's3://{s3_server.bucket}/ds', '--keep_local', str(d / 'copy')]) == 0
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return f's3://{s3_server.bucket}/ds', d / 'copy'


def _nothing_loadable(folder: Path) -> None:
    """Nothing under `folder` reads as a complete dataset, or as any split."""
    from prores_algo.training.data import read_metadata

    assert read_metadata(folder) is None
    if folder.exists():
        assert not list(folder.rglob('index.json')) and not list(folder.rglob('prores_data.json'))


def _iterate(url, cache, split='train', batch_size=4):
    from prores_algo.training.data import build_dataloader

    spec = build_dataloader(url, split, batch_size, seq_len=32, local_cache=str(cache))
    return [b['input_ids'] for b in spec.dataloader]


# ---------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------
def test_cli_writes_through_streaming_uploader(s3, dataset):
    from prores_algo.training.data import HASH_ALGO, META_FILENAME, read_metadata

    url, copy = dataset
    client = s3.client()
    pointer = json.loads(client.get_object(Bucket=s3.bucket, Key='ds/prores_data.json')['Body'].read())
    v = pointer['version']  # the write went under its own version prefix; the pointer names it
    keys = s3.keys('ds/')
    assert keys == [
        'ds/prores_data.json',
        f'ds/{v}/prores_data.json',
        f'ds/{v}/train/index.json',
        f'ds/{v}/train/shard.00000.mds',
        f'ds/{v}/val/index.json',
        f'ds/{v}/val/shard.00000.mds',
    ]
    meta = read_metadata(copy)  # the local copy is complete, and is the same bytes as the version
    assert meta is not None and meta['hashes'] == [HASH_ALGO]
    for key in keys[1:]:
        body = client.get_object(Bucket=s3.bucket, Key=key)['Body'].read()
        assert body == (copy / key.split('/', 2)[2]).read_bytes(), key
    assert pointer == {**meta, 'version': v}
    assert json.loads((copy / META_FILENAME).read_text()) == meta
    index = json.loads((copy / 'train' / 'index.json').read_text())
    import hashlib

    for shard in index['shards']:  # every shard's hash is recorded, for the reader to check
        raw = shard['raw_data']
        assert raw['hashes'][HASH_ALGO] == hashlib.sha1((copy / 'train' / raw['basename']).read_bytes()).hexdigest()
    assert sorted(p.name for p in copy.parent.iterdir()) == ['.copy.prores-lock', 'copy']  # no temp folder left


def test_write_without_local_copy_keeps_nothing_local(s3, tmp_path, monkeypatch):
    from prores_algo.training.data import write_mds

    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))  # where the shards are staged before upload
    meta = write_mds('stdlib', f's3://{s3.bucket}/nolocal', seq_len=32, max_tokens=5000, val_fraction=0, progress=False)
    assert meta['splits']['train']['samples'] > 0
    assert list(tmp_path.iterdir()) == []
    assert 'nolocal/prores_data.json' in s3.keys('nolocal/')
    assert f'nolocal/{meta["version"]}/train/index.json' in s3.keys('nolocal/')


def test_write_refuses_then_overwrites_and_cleans_up(s3):
    from prores_algo.training.data import RemoteDataError, write_mds

    url = f's3://{s3.bucket}/over'
    write_mds('stdlib', url, seq_len=32, max_tokens=5000, val_fraction=0, progress=False)
    with pytest.raises(RemoteDataError, match=rf'`out_dir` {url} already holds a dataset.*--overwrite'):
        write_mds('stdlib', url, seq_len=32, max_tokens=5000, val_fraction=0, progress=False)
    client = s3.client()
    client.put_object(Bucket=s3.bucket, Key='over/train/shard.00007.mds', Body=b'left by an older dataset')
    client.put_object(Bucket=s3.bucket, Key='over/v-0123456789abcdef/train/index.json', Body=b'an unfinished write')
    meta = write_mds('stdlib', url, seq_len=16, max_tokens=4000, val_fraction=0, progress=False, overwrite=True)
    assert meta['seq_len'] == 16
    keys = s3.keys('over/')  # neither the current nor the previous version: removed
    assert 'over/train/shard.00007.mds' not in keys and 'over/v-0123456789abcdef/train/index.json' not in keys
    assert json.loads(client.get_object(Bucket=s3.bucket, Key='over/prores_data.json')['Body'].read())['seq_len'] == 16
    client.put_object(Bucket=s3.bucket, Key='over/notes.txt', Body=b'not ours')
    with pytest.raises(RemoteDataError, match=rf'`out_dir` {url} holds other objects.*notes\.txt'):
        write_mds('stdlib', url, seq_len=32, max_tokens=5000, val_fraction=0, progress=False, overwrite=True)
    assert 'over/prores_data.json' in s3.keys('over/')  # refused before touching anything


def test_failed_write_removes_what_it_uploaded(s3, tmp_path):
    """A write that fails after its shards and indexes went up (here: the val split ends up empty) deletes
    them again; the metadata, uploaded last, never went up; the local copy is not left either."""
    from prores_algo.training.data import write_mds

    with pytest.raises(ValueError, match="split 'val' got 0 samples"):
        write_mds(
            'stdlib',
            f's3://{s3.bucket}/failed',
            seq_len=32,
            max_tokens=5000,
            val_fraction=0.05,
            progress=False,
            keep_local=tmp_path / 'copy',
        )
    assert s3.keys('failed/') == []
    assert [p.name for p in tmp_path.iterdir()] == ['.copy.prores-lock']


@pytest.mark.parametrize('case', ['missing-bucket', 'wrong-credentials'])
def test_write_errors_name_the_url_and_leave_nothing(case, s3, tmp_path, monkeypatch, capsys):
    from prores_algo.training.data import main

    if case == 'missing-bucket':
        url, expect = 's3://no-such-bucket/ds', r"bucket 'no-such-bucket' does not exist"
    else:
        url, expect = f's3://{s3.bucket}/denied', r'access to bucket .* was denied.*check the credentials'
        monkeypatch.setenv('AWS_ACCESS_KEY_ID', 'AKIAWRONGWRONGWRONG0')
        monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', 'wrong')
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path / 'tmp'))
    (tmp_path / 'tmp').mkdir()
    with pytest.raises(SystemExit) as info:
        main([*WRITE, '--out', url, '--keep_local', str(tmp_path / 'copy')])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f'cannot write the dataset to {url}' in err
    assert re.search(expect, err), err
    assert not (tmp_path / 'copy').exists() and list((tmp_path / 'tmp').iterdir()) == []
    assert [p.name for p in tmp_path.iterdir() if p.name not in ('tmp', '.copy.prores-lock')] == []
    monkeypatch.undo()
    assert s3.keys('denied/') == []


# ---------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------
def test_stream_from_s3_with_local_cache(s3, dataset, tmp_path):
    from prores_algo.training.data import CACHE_RECORD, build_dataloader, read_metadata

    url, copy = dataset
    batches = _iterate(url, tmp_path / 'cache', batch_size=4)
    local = build_dataloader(str(copy), 'train', 4, seq_len=32, shuffle=True)
    assert sorted(map(tuple, torch.cat(batches).tolist())) == sorted(
        map(tuple, torch.cat([b['input_ids'] for b in local.dataloader]).tolist())
    )
    record = json.loads((tmp_path / 'cache' / CACHE_RECORD).read_text())
    version = record['meta'].pop('version')  # the cache records which version it holds, in its own folder
    assert record['remote'] == url and record['meta'] == read_metadata(copy)
    assert (tmp_path / 'cache' / version / 'train' / 'index.json').is_file()
    assert read_metadata(tmp_path / 'cache') is None  # a cache never passes for a complete local dataset


@pytest.mark.parametrize(
    'case', ['missing-bucket', 'missing-prefix', 'wrong-credentials', 'unfinished-upload', 'missing-index']
)
def test_read_errors_name_the_url_and_leave_nothing(case, s3, dataset, tmp_path, monkeypatch):
    from prores_algo.training.data import RemoteDataError

    url = {
        'missing-bucket': 's3://no-such-bucket/ds',
        'missing-prefix': f's3://{s3.bucket}/no-such-prefix',
        'wrong-credentials': dataset[0],
        'unfinished-upload': f's3://{s3.bucket}/unfinished',
        'missing-index': f's3://{s3.bucket}/noindex',
    }[case]
    expect = {
        'missing-bucket': r"bucket 'no-such-bucket' does not exist at the S3 endpoint http://127\.0\.0\.1",
        'missing-prefix': rf'nothing is stored under {url}/ .*check the prefix',
        'wrong-credentials': r'access to bucket .* was denied \(403\).*check the credentials',
        'unfinished-upload': rf'{url}/prores_data\.json does not exist: the upload of this dataset did not '
        r'complete',
        'missing-index': rf'{url}/v-[0-9a-f]{{16}}/train/index\.json does not exist',
    }[case]
    if case == 'wrong-credentials':
        monkeypatch.setenv('AWS_ACCESS_KEY_ID', 'AKIAWRONGWRONGWRONG0')
        monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', 'wrong')
    if case in ('unfinished-upload', 'missing-index'):  # all but the metadata / the train index
        client, missing = s3.client(), {'unfinished-upload': 'prores_data.json', 'missing-index': 'train/index.json'}
        for key in s3.keys('ds/'):
            if not key.endswith(missing[case]):
                client.copy_object(
                    Bucket=s3.bucket,
                    Key=url.split('/')[-1] + '/' + key.split('/', 1)[1],
                    CopySource={'Bucket': s3.bucket, 'Key': key},
                )
    cache = tmp_path / 'cache'
    with pytest.raises(RemoteDataError, match=f'cannot read the dataset at {url}: {expect}'):
        _iterate(url, cache)
    _nothing_loadable(cache)
    if case != 'missing-index':  # nothing is written before the dataset's metadata has been read
        assert not cache.exists()


def test_corrupt_shard_fails_its_hash_and_is_not_kept(s3, dataset, tmp_path):
    from prores_algo.training.data import RemoteDataError

    client = s3.client()
    for key in s3.keys('ds/'):
        client.copy_object(
            Bucket=s3.bucket, Key='corrupt/' + key.split('/', 1)[1], CopySource={'Bucket': s3.bucket, 'Key': key}
        )
    v = json.loads(client.get_object(Bucket=s3.bucket, Key='corrupt/prores_data.json')['Body'].read())['version']
    body = bytearray(client.get_object(Bucket=s3.bucket, Key=f'corrupt/{v}/train/shard.00000.mds')['Body'].read())
    body[-5] ^= 0xFF  # same size: only the hash can tell
    client.put_object(Bucket=s3.bucket, Key=f'corrupt/{v}/train/shard.00000.mds', Body=bytes(body))
    url, cache = f's3://{s3.bucket}/corrupt', tmp_path / 'cache'
    match = rf'shard {url}/{v}/train/shard\.00000\.mds failed its sha1 check.*deleted.*Rebuild the dataset at {url} '
    with pytest.raises(RemoteDataError, match=match):
        _iterate(url, cache)
    assert (cache / v / 'train' / 'index.json').is_file()  # the version's own cache folder
    assert not (cache / v / 'train' / 'shard.00000.mds').exists()  # not taken as present next time
    with pytest.raises(RemoteDataError, match=match):  # so a second run fails the same way
        _iterate(url, cache)
    from prores_algo.training.data import build_dataloader

    with pytest.raises(ValueError, match=r'shard .*shard\.00000\.mds.* is missing'):  # the cache is no dataset
        build_dataloader(str(cache / v), 'train', 4)


def test_a_cache_serves_one_remote(s3, dataset, tmp_path):
    from prores_algo.training.data import RemoteDataError

    _iterate(dataset[0], tmp_path / 'cache', split='val', batch_size=1)
    with pytest.raises(
        RemoteDataError,
        match=r"`local_cache` .* holds a cache of 's3://prores-test/ds', not of "
        r"'s3://prores-test/over'",
    ):
        _iterate(f's3://{s3.bucket}/over', tmp_path / 'cache', split='val', batch_size=1)


# ---------------------------------------------------------------------------------------------------
# prores-train: train, resume, and a second run on the warm cache with the server gone
# ---------------------------------------------------------------------------------------------------
def test_prores_train_from_s3_resume_with_warm_cache_and_server_stopped(tmp_path):
    from prores_algo.training.data import write_mds

    exe = Path(sys.executable).parent / 'prores-train'
    cache, ck_a, ck_b = tmp_path / 'cache', tmp_path / 'ck_a', tmp_path / 'ck_b'
    common = [
        'data.seq_len=32',
        'model.max_seq_len=32',
        'model.d_model=32',
        'model.n_heads=4',
        'model.n_layers=3',
        'global_train_batch_size=8',
        'eval_batch_size=8',
        'eval_interval=2ba',
        'eval_subset_num_batches=1',
        'algorithms.prores.t_warmup=4ba',
        'console_log_interval=100ba',
        'max_duration=4ba',
        'save_interval=2ba',
        f'data.local_cache={cache}',
    ]

    def train(env, *extra):
        proc = subprocess.run(
            [str(exe), str(ROOT / 'yamls' / 'quickstart.yaml'), *common, *extra],
            env={**process_env(env), 'OMP_NUM_THREADS': '1'},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return proc.stdout

    with MotoS3() as s3:  # its own server: this test stops it
        saved = dict(os.environ)
        os.environ.update(s3.env)
        try:
            write_mds('stdlib', f's3://{s3.bucket}/train', seq_len=32, max_tokens=30000, progress=False)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        url = f's3://{s3.bucket}/train'
        out = train(s3.env, f'data.path={url}', f'save_folder={ck_a}')
        assert 'validation loss after 4 batches' in out
        env = s3.env
    assert not s3.running
    # The server is gone: the resumed run must not need it (cold, it would fail to reach the endpoint).
    out = train(env, f'data.path={url}', f'save_folder={ck_b}', f'load_path={ck_a}/ep0-ba2-rank0.pt')
    assert 'validation loss after 4 batches' in out
    a = torch.load(ck_a / 'ep0-ba4-rank0.pt', map_location='cpu', weights_only=False)['state']['model']
    b = torch.load(ck_b / 'ep0-ba4-rank0.pt', map_location='cpu', weights_only=False)['state']['model']
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
