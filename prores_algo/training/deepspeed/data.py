"""The DeepSpeed loop's data: a synthetic deterministic token set split over ranks, or MDS shards.

* `SyntheticTokens` — learnable arithmetic sequences, the same sample k in every run and on every
  rank; `synthetic_loader` splits it over ranks with a `DistributedSampler` (no `data.path`);
* `mds_loader` — MDS shards through `prores_algo.training.data.build_dataloader`, which partitions over ranks
  itself;
* `micro_batches` — endless micro-batches from a given position (resume skips what was consumed);
* `loaders` — the train / eval loaders of a run.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

if TYPE_CHECKING:
    from prores_algo.training.deepspeed.settings import DSOptions, StepPlan

__all__ = ['SyntheticTokens', 'synthetic_loader', 'mds_loader', 'micro_batches', 'loaders']


class SyntheticTokens(Dataset):
    """Deterministic, learnable token sequences: x_i = (start + stride·i) mod vocab, stride in 1..4.

    Sample k is the same in every run and on every rank (a function of seed and k only).
    """

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        stride = torch.randint(1, 5, (n, 1), generator=g)
        self.data = (start + stride * torch.arange(seq_len)) % vocab

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {'input_ids': self.data[i]}


def synthetic_loader(n: int, seq_len: int, vocab: int, micro: int, rank: int, world: int, seed: int, shuffle: bool):
    """(loader, sampler) over `n` synthetic samples, this rank's share in micro-batches of `micro`."""
    dataset = SyntheticTokens(n, seq_len, vocab, seed)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=micro, sampler=sampler, drop_last=True)
    if len(loader) == 0:
        raise ValueError(f'{n} samples give no micro-batch of {micro} per rank on {world} ranks; raise num_samples')
    return loader, sampler


def mds_loader(
    path: str, split: str, micro: int, *, seq_len: int, vocab: int, seed: int, local_cache: str | None, shuffle: bool
):
    try:
        from prores_algo.training.data import build_dataloader
    except ImportError as e:
        raise ValueError(
            f'--data needs prores_algo.training.data.build_dataloader (and mosaicml-streaming): {e}'
        ) from e
    spec = build_dataloader(
        path, split, micro, seq_len=seq_len, shuffle=shuffle, seed=seed, vocab_size=vocab, local_cache=local_cache
    )
    return getattr(spec, 'dataloader', spec)


def micro_batches(loader, sampler, start: int) -> Iterator[dict]:
    """Endless micro-batches starting at micro-batch `start` (epochs re-shuffled via set_epoch)."""
    per_epoch = len(loader)
    epoch, skip = divmod(start, per_epoch)
    while True:
        if sampler is not None:
            sampler.set_epoch(epoch)
        for batch in loader:
            if skip:
                skip -= 1
                continue
            yield batch
        epoch += 1


def loaders(plan: StepPlan, opts: DSOptions, micro: int, accum: int, rank: int, world: int):
    """(train loader, its sampler or None, eval loader or None) for this rank: MDS shards when the run has
    a data path, else the synthetic token set (`opts.num_samples`, default one epoch of the run)."""
    seq_len, vocab = plan.seq_len, plan.model.vocab_size
    if plan.data:
        mds = dict(seq_len=seq_len, vocab=vocab, seed=plan.seed, local_cache=plan.local_cache)
        train_loader = mds_loader(plan.data, 'train', micro, shuffle=True, **mds)
        try:
            eval_loader = mds_loader(plan.data, 'val', micro, shuffle=False, **mds)
        except (FileNotFoundError, ValueError) as e:  # no val split, or too small for one batch per rank
            eval_loader = None
            if rank == 0:
                print(f'no evaluation: {e}', flush=True)
        return train_loader, None, eval_loader
    n = opts.num_samples or max(plan.steps * micro * accum * world, micro * world)
    train_loader, sampler = synthetic_loader(n, seq_len, vocab, micro, rank, world, plan.seed, shuffle=True)
    eval_loader = (
        synthetic_loader(
            max(opts.eval_samples, micro * world),
            seq_len,
            vocab,
            micro,
            rank,
            world,
            plan.seed + 1_000_003,
            shuffle=False,
        )[0]
        if opts.eval_samples
        else None
    )
    return train_loader, sampler, eval_loader
