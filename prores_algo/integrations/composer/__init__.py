"""ProRes for MosaicML Composer, one folder as Composer's own algorithms have: the algorithm `ProRes`
(YAML name `prores`), the `ResidualMonitor` callback and the method card `metadata.json`."""

from prores_algo.integrations.composer.prores import ProRes, ResidualMonitor

__all__ = ['ProRes', 'ResidualMonitor']
