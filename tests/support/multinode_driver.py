"""Run by tests/test_multinode.py under the `composer` launcher, once per simulated node:

    composer --world_size W --nproc P --node_rank R --master_addr 127.0.0.1 --master_port PORT \\
        tests/support/multinode_driver.py OUT_DIR CONFIG.yaml [key=value ...]

Trains exactly as `prores-train CONFIG.yaml key=value ...` does (prores_algo.training.composer_train.build_trainer) and
writes what this rank saw to OUT_DIR/rank{R}.json: per batch, the α of every hooked branch read from
the model's buffers just before the forward pass, a CRC-32 of every sample in the batch, and the loss;
plus the node/rank layout streaming derived from the launcher's environment.
"""

import json
import os
import sys
import zlib
from pathlib import Path

from composer import Callback
from composer.utils import dist

from prores_algo.training.composer_train import build_trainer
from prores_algo.training.config import load_config


class Record(Callback):
    def __init__(self):
        self.alphas, self.samples, self.losses = {}, {}, {}

    def before_forward(self, state, logger):
        batch = int(state.timestamp.batch)
        self.alphas[batch] = {
            n.rsplit('.', 1)[0]: float(b) for n, b in state.model.named_buffers() if n.endswith('prores_alpha')
        }
        self.samples[batch] = [zlib.crc32(row.numpy().tobytes()) for row in state.batch['input_ids'].cpu()]

    def after_train_batch(self, state, logger):
        self.losses[int(state.timestamp.batch) - 1] = float(state.loss)


def main():
    out, yaml, *overrides = sys.argv[1:]
    rec = Record()
    trainer = build_trainer(load_config(yaml, overrides), extra_callbacks=(rec,))
    dataset = trainer.state.train_dataloader.dataset
    trainer.fit()
    from streaming.base.world import World

    world = World.detect()
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, f'rank{dist.get_global_rank()}.json').write_text(
        json.dumps(
            {
                'alphas': rec.alphas,
                'samples': rec.samples,
                'losses': rec.losses,
                'rank': dist.get_global_rank(),
                'world_size': dist.get_world_size(),
                'node_rank': dist.get_node_rank(),
                'local_rank': dist.get_local_rank(),
                'streaming_nodes': world.num_nodes,
                'streaming_node': world.node,
                'num_canonical_nodes': dataset.num_canonical_nodes,
                'dataset_len': len(dataset),
                'cache': os.path.abspath(dataset.streams[0].local),
                'tmpdir': os.environ.get('TMPDIR'),
            }
        )
    )
    trainer.close()


if __name__ == '__main__':
    main()
