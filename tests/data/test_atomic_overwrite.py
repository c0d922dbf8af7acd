"""Overwriting a remote dataset is atomic for its readers, against the real S3-compatible server.

A write puts a whole new version under <url>/v-<hex>/ and then moves the pointer (<url>/prores_data.json)
in one PUT; readers resolve the pointer and read that version only (prores_algo/training/data/versions.py).
Here: a writer killed in the middle of an upload (a shard, or the pointer itself) leaves the old dataset
current and whole, and a rerun publishes the new one whole; a reader that resolved a version before an
overwrite still reads it whole, and after a second overwrite fails naming the removed version; datasets
written before versions existed are read as they are; ensure_dataset's reuse check reads the version the
pointer names.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.s3_server import moto_available, process_env
from tests.support.stall_proxy import StallProxy

pytestmark = pytest.mark.skipif(not moto_available(), reason="needs moto's S3 server: pip install 'moto[server]'")

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = dict(max_tokens=20000, val_fraction=0.1, progress=False)
WRITE = ['--source', 'stdlib', '--tokenizer', 'byte', '--max-tokens', '20000', '--val-fraction', '0.1', '--no-progress']


def _samples(path, cache=None, split='train'):
    """Every sample of `split`, through the real loader, as a sorted list of token tuples."""
    from prores_algo.training.data import build_dataloader

    spec = build_dataloader(str(path), split, 1, shuffle=False, drop_last=False, local_cache=cache and str(cache))
    return sorted(tuple(row) for batch in spec.dataloader for row in batch['input_ids'].tolist())


def _pointer(s3, prefix):
    return json.loads(s3.client().get_object(Bucket=s3.bucket, Key=f'{prefix}/prores_data.json')['Body'].read())


def _versions(s3, prefix):
    return sorted({k.split('/')[1] for k in s3.keys(f'{prefix}/') if k.split('/')[1].startswith('v-')})


def _writer(endpoint_env, url, *extra):
    """`python -m prores_algo.training.data ... --out url` in its own process."""
    env = process_env({**endpoint_env, 'OMP_NUM_THREADS': '1'})
    env['PYTHONPATH'] = os.pathsep.join(p for p in (str(ROOT), env.get('PYTHONPATH')) if p)
    return [sys.executable, '-m', 'prores_algo.training.data', *WRITE, '--out', url, *extra], env


@pytest.mark.parametrize('stall_at', ['shard', 'pointer'])
def test_writer_killed_mid_upload_leaves_the_old_dataset_whole(stall_at, s3, tmp_path):
    from prores_algo.training.data import write_mds

    prefix = f'killed-{stall_at}'
    url = f's3://{s3.bucket}/{prefix}'
    old = write_mds('stdlib', url, seq_len=32, **SETTINGS)
    old_samples = _samples(url, tmp_path / 'cache-old')
    assert len(old_samples) == old['splits']['train']['samples'] > 0

    # The new write goes through a proxy that freezes one upload halfway: a shard of the new version, or
    # the pointer itself (everything else of the new version is up by then).
    pattern = {
        'shard': rb'PUT /%s/%s/v-[0-9a-f]{16}/train/shard\.\d+\.mds ' % (s3.bucket.encode(), prefix.encode()),
        'pointer': rb'PUT /%s/%s/prores_data\.json ' % (s3.bucket.encode(), prefix.encode()),
    }[stall_at]
    with StallProxy('127.0.0.1', s3.port, pattern) as proxy:
        cmd, env = _writer(s3.env_with() | {'S3_ENDPOINT_URL': proxy.url}, url, '--seq-len', '16', '--overwrite')
        writer = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            stalled = proxy.stalled.wait(300)
            writer.send_signal(signal.SIGKILL)
            out = writer.communicate(timeout=60)[0].decode()
        finally:
            if writer.poll() is None:
                writer.kill()
        assert stalled, f'the writer never reached the {stall_at} upload: {out[-3000:]}'
    assert writer.returncode == -signal.SIGKILL, out[-3000:]

    # The pointer still names the old version; the killed write left an unfinished version beside it.
    assert _pointer(s3, prefix) == old
    killed = [v for v in _versions(s3, prefix) if v != old['version']]
    assert len(killed) == 1
    left = s3.keys(f'{prefix}/{killed[0]}/')
    if stall_at == 'pointer':
        assert f'{prefix}/{killed[0]}/prores_data.json' in left and f'{prefix}/{killed[0]}/train/index.json' in left
    else:
        # The frozen shard never landed (its split's index.json may have: streaming uploads them concurrently).
        assert not any('/train/shard.' in k for k in left) and f'{prefix}/{killed[0]}/prores_data.json' not in left
    assert _samples(url, tmp_path / 'cache-after-kill') == old_samples  # the old dataset, whole

    # Rerun to completion: the new dataset, whole; the killed write's debris is gone, the old version kept.
    cmd, env = _writer(s3.env, url, '--seq-len', '16', '--overwrite', '--keep-local', str(tmp_path / 'copy'))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    new = _pointer(s3, prefix)
    assert f'(version {new["version"]})' in done.stdout
    assert new['seq_len'] == 16 and new['version'] not in (old['version'], killed[0])
    assert _versions(s3, prefix) == sorted([old['version'], new['version']])
    new_samples = _samples(url, tmp_path / 'cache-new')
    assert len(new_samples) == new['splits']['train']['samples'] and {len(s) for s in new_samples} == {16}
    assert new_samples == _samples(tmp_path / 'copy')
    assert new_samples != old_samples


def test_reader_in_flight_keeps_its_version_through_one_overwrite(s3, tmp_path):
    """A reader that resolved the pointer reads that version whole after one later write (the previous
    version is kept); after a second, the version is gone and its downloads fail naming it."""
    from prores_algo.training.data import RemoteDataError, build_dataloader, write_mds

    url = f's3://{s3.bucket}/inflight'
    first = write_mds('stdlib', url, seq_len=32, **SETTINGS)
    reference = _samples(url, tmp_path / 'ref')
    # Two readers resolve the first version; constructing them downloads its index files, no shard yet.
    readers = [
        build_dataloader(url, 'train', 1, shuffle=False, drop_last=False, local_cache=str(tmp_path / f'r{i}'))
        for i in range(2)
    ]
    assert sorted(os.listdir(tmp_path / 'r0' / first['version'] / 'train')) == ['index.json']

    second = write_mds('stdlib', url, seq_len=16, overwrite=True, **SETTINGS)
    assert _pointer(s3, 'inflight')['version'] == second['version']
    got = sorted(tuple(row) for batch in readers[0].dataloader for row in batch['input_ids'].tolist())
    assert got == reference  # the first version, whole, although the pointer has moved on

    third = write_mds('stdlib', url, seq_len=8, overwrite=True, **SETTINGS)
    assert _versions(s3, 'inflight') == sorted([second['version'], third['version']])
    with pytest.raises(
        RemoteDataError,
        match=rf'could not fetch shard {url}/{first["version"]}/train/shard\.00000\.mds.*removed by a later write',
    ):
        for _ in readers[1].dataloader:
            pass
    assert {len(s) for s in _samples(url, tmp_path / 'fresh')} == {8}  # a new reader gets the current one


def test_dataset_without_versions_is_read_and_replaced(s3, tmp_path):
    """A dataset whose index files sit directly under the URL (no versions) reads as it is; the first
    versioned write keeps it as the previous version, the second removes it."""
    from prores_algo.training.data import write_mds

    url, client = f's3://{s3.bucket}/flat', s3.client()
    meta = write_mds('stdlib', url, seq_len=32, **SETTINGS)
    reference = _samples(url, tmp_path / 'ref')
    version = meta.pop('version')
    for key in s3.keys(f'flat/{version}/'):  # move the version's objects up to the URL itself
        client.copy_object(
            Bucket=s3.bucket, Key=key.replace(f'/{version}/', '/'), CopySource={'Bucket': s3.bucket, 'Key': key}
        )
        client.delete_object(Bucket=s3.bucket, Key=key)
    client.put_object(Bucket=s3.bucket, Key='flat/prores_data.json', Body=json.dumps(meta).encode())
    flat_keys = s3.keys('flat/')
    assert not _versions(s3, 'flat') and 'flat/train/index.json' in flat_keys
    assert _samples(url, tmp_path / 'flat-cache') == reference

    second = write_mds('stdlib', url, seq_len=16, overwrite=True, **SETTINGS)
    assert set(flat_keys) - {'flat/prores_data.json'} <= set(s3.keys('flat/'))  # kept for readers in flight
    assert {len(s) for s in _samples(url, tmp_path / 'second')} == {16}
    third = write_mds('stdlib', url, seq_len=8, overwrite=True, **SETTINGS)
    assert not [k for k in s3.keys('flat/') if k.startswith(('flat/train/', 'flat/val/'))]
    assert _versions(s3, 'flat') == sorted([second['version'], third['version']])


def test_ensure_dataset_reuses_the_current_version(s3, tmp_path):
    from prores_algo.training.data import ensure_dataset, write_mds

    url = f's3://{s3.bucket}/ensure'
    built = ensure_dataset('stdlib', url, seq_len=32, **SETTINGS)  # nothing there: built
    keys = s3.keys('ensure/')
    assert _pointer(s3, 'ensure') == built and _versions(s3, 'ensure') == [built['version']]
    assert ensure_dataset('stdlib', url, seq_len=32, **SETTINGS) == built
    assert s3.keys('ensure/') == keys  # reused: nothing written
    with pytest.raises(
        ValueError,
        match=rf"`out_dir` '{url}' holds a dataset built with different settings "
        r'\(seq_len: dataset has 32, requested 16\)',
    ):
        ensure_dataset('stdlib', url, seq_len=16, **SETTINGS)
    rebuilt = write_mds('stdlib', url, seq_len=16, overwrite=True, **SETTINGS)
    assert ensure_dataset('stdlib', url, seq_len=16, **SETTINGS) == rebuilt  # checks the version now current
    with pytest.raises(ValueError, match='seq_len: dataset has 16, requested 32'):
        ensure_dataset('stdlib', url, seq_len=32, **SETTINGS)
    assert {len(s) for s in _samples(url, tmp_path / 'cache')} == {16}
