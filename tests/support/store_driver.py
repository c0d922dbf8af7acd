"""`prores-train` (prores_algo.training.composer_train.run: the same Trainer, evaluation and output) with a recording callback,
for tests/test_object_store_checkpoint.py.

usage: python tests/support/store_driver.py OUT.json CONFIG.yaml [key=value ...]

Env PRORES_TEST_SLEEP=<seconds>: sleep after every batch (time to kill the run mid-training; no number
changes). OUT.json gets the α each batch used, each batch's train loss (full precision), the first batch
this process trained and the final validation metrics; written atomically, so a killed run leaves none.
"""

import json
import os
import sys
from pathlib import Path

from prores_algo.training.checkpoint_store import StoreError
from prores_algo.training.composer_train import run
from prores_algo.training.config import ConfigError, load_config, report
from tests.support.reliability_driver import Record


def main() -> int:
    out, yaml, *overrides = sys.argv[1:]
    rec = Record(float(os.environ.get('PRORES_TEST_SLEEP', '0')))
    try:
        result = run(load_config(yaml, overrides), extra_callbacks=(rec,))
    except (ConfigError, StoreError) as e:  # as prores-train reports them
        return report(e)
    result.pop('wall_s')
    record = {'alphas': rec.alphas, 'losses': rec.losses, 'first_batch': rec.first_batch, 'result': result}
    tmp = Path(f'{out}.tmp')
    tmp.write_text(json.dumps(record))
    os.replace(tmp, out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
