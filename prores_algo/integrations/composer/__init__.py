"""ProRes for MosaicML Composer, one folder as Composer's own algorithms have: the algorithm `ProRes`
(YAML name `prores`) and the `ResidualMonitor` callback (`prores.py`), the LR pieces ProRes asks for
(`lr.py`: `WSDScheduler`, the LR-warmup delay), durations as Composer `Time` (`time.py`) and the
method card `metadata.json`."""

from prores_algo.integrations.composer.lr import WSDScheduler
from prores_algo.integrations.composer.prores import ProRes, ResidualMonitor

__all__ = ['ProRes', 'ResidualMonitor', 'WSDScheduler']
