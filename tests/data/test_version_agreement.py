"""Every rank of a distributed job reads the version rank 0 resolved (two real gloo processes): ranks that
each read the pointer could straddle an overwrite and read two different versions."""

from __future__ import annotations

import os

import pytest
import torch.multiprocessing as mp

from tests.support.helpers import free_port


def _rank(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    from prores_algo.training.data.loader import _agree_on_meta
    from prores_algo.training.data.remote import RemoteDataError

    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=2)
    try:
        # What each rank would find on its own: rank 1 saw a later pointer than rank 0.
        own = {'version': ['v-000000000000000a', 'v-000000000000000b'][rank]}
        agreed = _agree_on_meta(lambda: own)

        def fails():
            raise RemoteDataError('cannot read the dataset at s3://b/ds: bucket gone')

        try:
            _agree_on_meta(fails if rank == 0 else lambda: own)
            error = None
        except RemoteDataError as e:
            error = str(e)
        results[rank] = (agreed, error)
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_rank_zeros_version_and_error():
    results = mp.Manager().dict()
    mp.start_processes(_rank, args=(free_port(), results), nprocs=2, join=True, start_method='spawn')
    assert results[0][0] == results[1][0] == {'version': 'v-000000000000000a'}
    assert results[0][1] == 'cannot read the dataset at s3://b/ds: bucket gone'
    assert (
        results[1][1] == 'rank 0 could not read the dataset: RemoteDataError: cannot read the dataset at '
        's3://b/ds: bucket gone'
    )


def test_one_process_resolves_itself():
    from prores_algo.training.data.loader import _agree_on_meta

    assert _agree_on_meta(lambda: {'version': None}) == {'version': None}
    with pytest.raises(ValueError, match='boom'):
        _agree_on_meta(lambda: (_ for _ in ()).throw(ValueError('boom')))
