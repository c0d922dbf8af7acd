"""Run by tests under `composer -n 2`: trains from a YAML and writes what each rank saw to JSON.

usage: composer -n 2 tests/support/dist_driver.py OUT_DIR CONFIG.yaml [key=value ...]
Per rank: alphas read from the model's α buffers before every forward, the train losses, and for
sharded runs the local vs full size of every parameter (proof that FSDP2 really partitions), and ProRes'
measurement of the branches on the first batch.
"""

import dataclasses
import json
import sys
from pathlib import Path

from composer import Callback
from composer.utils import dist

from prores_algo.training.composer_train import build_trainer
from prores_algo.training.config import load_config


class Record(Callback):
    def __init__(self):
        self.alphas, self.losses, self.shards = {}, [], {}

    def fit_start(self, state, logger):
        from torch.distributed.tensor import DTensor

        for name, p in state.model.named_parameters():
            if isinstance(p, DTensor):
                self.shards[name] = [p.to_local().numel(), p.numel()]

    def before_forward(self, state, logger):
        bufs = {n.rsplit('.', 1)[0]: float(b) for n, b in state.model.named_buffers() if n.endswith('prores_alpha')}
        self.alphas[int(state.timestamp.batch)] = bufs

    def after_train_batch(self, state, logger):
        self.losses.append(float(state.total_loss) if hasattr(state, 'total_loss') else float(state.loss))


def main():
    out, yaml, *overrides = sys.argv[1:]
    rec = Record()
    trainer = build_trainer(load_config(yaml, overrides), extra_callbacks=(rec,))
    trainer.fit()
    rank = dist.get_global_rank()
    prores = next(a for a in trainer.state.algorithms if type(a).__name__ == 'ProRes')
    measure = None if prores.init_measure is None else dataclasses.asdict(prores.init_measure)
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, f'rank{rank}.json').write_text(
        json.dumps(
            {
                'alphas': rec.alphas,
                'losses': rec.losses,
                'shards': rec.shards,
                'world_size': dist.get_world_size(),
                'init_measure': measure,
            }
        )
    )
    trainer.close()


if __name__ == '__main__':
    main()
