"""The DeepSpeed entry's process group: torchrun's (its environment variables), or one process of its own
when run as plain `python -m prores_algo.training.deepspeed.loop`."""

from __future__ import annotations

import os
import socket

import torch

__all__ = ['init_distributed', 'free_port']


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """(rank, world size), the default process group initialised by DeepSpeed (nccl on GPUs, gloo on CPU)."""
    import deepspeed

    if 'WORLD_SIZE' not in os.environ:  # plain `python -m prores_algo.training.deepspeed.loop`: one process
        os.environ.update(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0')
        os.environ.setdefault('MASTER_ADDR', '127.0.0.1')
        os.environ.setdefault('MASTER_PORT', str(free_port()))
    # The `deepspeed` launcher names the ranks per node LOCAL_SIZE; streaming reads LOCAL_WORLD_SIZE, and
    # without it takes every rank for a node of its own: all register the same shared-memory prefix.
    if 'LOCAL_SIZE' in os.environ:
        os.environ.setdefault('LOCAL_WORLD_SIZE', os.environ['LOCAL_SIZE'])
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(
            dist_backend='nccl' if torch.cuda.is_available() else 'gloo', auto_mpi_discovery=False, verbose=False
        )
    return torch.distributed.get_rank(), torch.distributed.get_world_size()
