"""prores_algo: Progressive Residual Warmup (ProRes, arXiv 2603.05369) for Composer, DeepSpeed and HF.

The core (`schedules`, `surgery`, `policies`) needs only torch; `ProRes` (the Composer algorithm) and
`WSDScheduler` are imported lazily so `import prores_algo` works where Composer is not installed.
"""

from prores_algo import schedules
from prores_algo.policies import register_policy
from prores_algo.surgery import ProResController, apply_prores, find_residual_layers

__version__ = '0.1.0'

__all__ = ['ProRes', 'apply_prores', 'find_residual_layers', 'ProResController', 'register_policy', 'schedules',
           'WSDScheduler', 'wsd_multiplier', '__version__']


def __getattr__(name):
    if name == 'ProRes':
        from prores_algo.algorithm import ProRes
        return ProRes
    if name in ('WSDScheduler', 'wsd_multiplier'):
        from prores_algo import lr_schedules
        return getattr(lr_schedules, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
