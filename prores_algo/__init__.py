"""prores_algo: Progressive Residual Warmup (ProRes, arXiv 2603.05369) for Composer, DeepSpeed and HF.

The core (`alpha_schedules`, `surgery`, `policies`, every top-level module) needs only torch; `ProRes` (the Composer algorithm) and
`WSDScheduler` are imported lazily so `import prores_algo` works where Composer is not installed.
"""

from prores_algo import alpha_schedules
from prores_algo.export import fold_prores
from prores_algo.layers import find_residual_layers
from prores_algo.policies import register_policy
from prores_algo.surgery import ProResController, apply_prores

__version__ = '0.1.0'

__all__ = [
    'ProRes',
    'apply_prores',
    'find_residual_layers',
    'ProResController',
    'register_policy',
    'alpha_schedules',
    'WSDScheduler',
    'wsd_multiplier',
    'fold_prores',
    'ResidualMonitor',
    'ProResCallback',
    'plot_alpha_heatmap',
    '__version__',
]

_LAZY = {
    'ProRes': 'prores_algo.integrations.composer',
    'WSDScheduler': 'prores_algo.integrations.composer.lr',
    'wsd_multiplier': 'prores_algo.lr_schedules',
    'ResidualMonitor': 'prores_algo.integrations.composer',
    'ProResCallback': 'prores_algo.integrations.hf',
    'plot_alpha_heatmap': 'prores_algo.preview',
}


# old public names, kept for one release: each warns and points at its replacement
_DEPRECATED = {'schedules': ('prores_algo.alpha_schedules', None)}


def __getattr__(name):
    if name in _DEPRECATED:
        import importlib
        import warnings

        module, attr = _DEPRECATED[name]
        new = module + (f'.{attr}' if attr else '')
        warnings.warn(f'prores_algo.{name} is deprecated; use {new}', DeprecationWarning, stacklevel=2)
        target = importlib.import_module(module)
        return getattr(target, attr) if attr else target
    if name in _LAZY:  # Composer / transformers / matplotlib are imported only when asked for
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
