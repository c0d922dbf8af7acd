"""Run by tests/test_reliability.py under `composer -n 2`: train from a YAML (autoresume-ready) and
write what each rank saw.

usage: composer -n 2 tests/support/reliability_driver.py OUT_DIR CONFIG.yaml [key=value ...]

Env PRORES_TEST_SLEEP=<seconds>: sleep that long after every batch (gives a test time to kill the run
mid-training; sleeping changes no number). Per rank, OUT_DIR/rank{r}.json holds the α each batch used
(read from the α buffers right before the forward), the train loss of each batch, the first batch this
process trained (> 0 after an autoresume), ProRes's final α / hook count, and the validation metrics
after training. Written atomically (tmp + rename), so a killed run leaves no result file.
"""

import json
import os
import sys
import time
from pathlib import Path

from composer import Callback
from composer.utils import dist

from prores_algo.surgery import ALPHA_BUFFER, has_prores_hook
from prores_algo.training.composer_train import build_trainer
from prores_algo.training.config import load_config


class Record(Callback):
    def __init__(self, sleep: float):
        self.sleep = sleep
        self.alphas, self.losses, self.first_batch = {}, {}, None

    def before_forward(self, state, logger):
        b = int(state.timestamp.batch)
        if self.first_batch is None:
            self.first_batch = b
        # α of the hooked branches (after removal the buffers stay as inert 1.0 that no hook reads)
        self.alphas[b] = {
            n: float(m._buffers[ALPHA_BUFFER])
            for n, m in state.model.named_modules()
            if ALPHA_BUFFER in m._buffers and has_prores_hook(m)
        }

    def after_train_batch(self, state, logger):
        self.losses[int(state.timestamp.batch)] = float(state.loss)  # before the timestamp advances

    def batch_end(self, state, logger):
        if self.sleep:
            time.sleep(self.sleep)


def main():
    out, yaml, *overrides = sys.argv[1:]
    rec = Record(float(os.environ.get('PRORES_TEST_SLEEP', '0')))
    trainer = build_trainer(load_config(yaml, overrides), extra_callbacks=(rec,))
    trainer.fit()
    trainer.eval()
    prores = next(a for a in trainer.state.algorithms if type(a).__name__ == 'ProRes')
    rank = dist.get_global_rank()
    result = {
        'alphas': rec.alphas,
        'losses': rec.losses,
        'first_batch': rec.first_batch,
        'final_batch': int(trainer.state.timestamp.batch),
        'final_alphas': prores.controller.alphas,
        'removed': prores.controller.removed,
        'num_hooks': prores.controller.num_hooks,
        'alpha_buffers_end': sum(1 for n, _ in trainer.state.model.named_buffers() if n.endswith('prores_alpha')),
        'alpha_values_end': sorted(
            {float(b) for n, b in trainer.state.model.named_buffers() if n.endswith('prores_alpha')}
        ),
        'prores_hooks_end': sum(has_prores_hook(m) for m in trainer.state.model.modules()),
        'eval': {k: float(v) for k, v in trainer.state.eval_metric_values.items()},
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    tmp = Path(out, f'.rank{rank}.json.tmp')
    tmp.write_text(json.dumps(result))
    os.replace(tmp, Path(out, f'rank{rank}.json'))
    trainer.close()


if __name__ == '__main__':
    main()
