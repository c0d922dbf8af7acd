"""torchrun entry used by tests/test_reliability.py: `prores_algo.training.deepspeed.loop`, optionally slowed down.

Env PRORES_TEST_SLEEP=<seconds>: sleep that long before every micro-batch loss, so a test can kill the
run mid-training. Sleeping changes no number; every other argument goes to ds_train's CLI unchanged.
"""

import os
import sys
import time

from prores_algo.training.deepspeed import loop as ds_train

_SLEEP = float(os.environ.get('PRORES_TEST_SLEEP', '0'))
if _SLEEP:
    _real_loss = ds_train._lm_loss

    def _slow_loss(logits, ids):
        time.sleep(_SLEEP)
        return _real_loss(logits, ids)

    ds_train._lm_loss = _slow_loss

if __name__ == '__main__':
    sys.exit(ds_train.main())
