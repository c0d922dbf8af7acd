"""What a `TrainConfig` asks for, independent of the loop that runs it (Composer or DeepSpeed).

Both training entries read the same YAML schema (`prores_algo.training.config.TrainConfig`) and take from here
what it means:

  * `decoder_config(cfg)` — the reference decoder's `DecoderConfig` (`max_seq_len` defaults to
    `data.seq_len`; `deepnet_init` follows the official rule `default_deepnet_init(prores_on)` unless
    the YAML sets it);
  * `prores(cfg)` — whether ProRes is on, and its schedule, W (`t_warmup`) and `lr_warmup_delay` as
    written in the YAML;
  * `optimizer(cfg)` and `param_groups(model, weight_decay)` — lr, betas, eps, weight decay, and weight
    decay on matrices only (the paper);
  * `lr_schedule(cfg)` — the LR scheduler's name and its warmup / decay / final multiplier;
  * `dataset_build_args(cfg)` — the arguments of `prores_algo.training.data.ensure_dataset` (None when there is
    nothing to build: no `data.source`, no `data.path`, or a URL);
  * `is_url(path)` — the one test for a remote location (`scheme://...`).

Times stay as the YAML writes them ('600ba', '0.3dur', an int): Composer resolves them itself and the
DeepSpeed loop turns them into optimizer steps (`prores_algo.training.deepspeed.settings`). Nothing here imports
Composer or DeepSpeed.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from prores_algo.training.config import TrainConfig
    from prores_algo.training.models.decoder import DecoderConfig

__all__ = [
    'is_url',
    'decoder_config',
    'prores_enabled',
    'ProResSettings',
    'prores',
    'OptimizerSettings',
    'optimizer',
    'param_groups',
    'LRSchedule',
    'lr_schedule',
    'dataset_build_args',
]

_URL_RE = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*://')


def is_url(path: str | None) -> bool:
    """True for a remote location such as 's3://bucket/x' or 'gs://...'; False for a local path (or None)."""
    return path is not None and bool(_URL_RE.match(str(path)))


# --- model ------------------------------------------------------------------------------------------


def prores_enabled(cfg: TrainConfig) -> bool:
    """ProRes is on when the YAML lists it under `algorithms` (with or without arguments)."""
    return 'prores' in cfg.algorithms


def decoder_config(cfg: TrainConfig) -> DecoderConfig:
    """The reference decoder the YAML describes (`model.name: reference`); ConfigError names a bad key."""
    from prores_algo.training.config import ConfigError, check_kwargs
    from prores_algo.training.models.decoder import DecoderConfig, default_deepnet_init

    kwargs = cfg.model.kwargs
    check_kwargs('model (reference)', DecoderConfig, kwargs)
    kwargs.setdefault('max_seq_len', cfg.data.seq_len)
    kwargs.setdefault('deepnet_init', default_deepnet_init(prores_enabled(cfg)))
    try:
        dcfg = DecoderConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f'model: {e}') from None
    if cfg.data.seq_len > dcfg.max_seq_len:
        raise ConfigError(
            f'data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={dcfg.max_seq_len}: raise '
            'model.max_seq_len or lower data.seq_len'
        )
    return dcfg


# --- ProRes -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProResSettings:
    """`algorithms.prores` as written: times are YAML times (None: W defaults to 1000 steps per layer)."""

    enabled: bool
    schedule: str = 'linear'
    t_warmup: Any = None
    lr_warmup_delay: Any = 0
    mechanism: str = 'auto'
    measure_init: bool = True


def prores(cfg: TrainConfig) -> ProResSettings:
    if not prores_enabled(cfg):
        return ProResSettings(enabled=False)
    kw = dict(cfg.algorithms['prores'] or {})
    return ProResSettings(
        enabled=True,
        schedule=kw.get('schedule', 'linear'),
        t_warmup=kw.get('t_warmup'),
        lr_warmup_delay=kw.get('lr_warmup_delay', 0),
        mechanism=kw.get('mechanism', 'auto'),
        measure_init=kw.get('measure_init', True),
    )


# --- optimizer and LR schedule ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    name: str
    lr: float | None  # None only from the DeepSpeed loop's flat options: its JSON's lr, else its default
    betas: tuple[float, float]
    eps: float
    weight_decay: float


def optimizer(cfg: TrainConfig) -> OptimizerSettings:
    o = cfg.optimizer
    return OptimizerSettings(name=o.name, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The paper: weight decay on matrices only — none on biases, norm weights, embeddings."""
    import torch

    if hasattr(model, 'param_groups'):
        return model.param_groups(weight_decay)
    embed_ids = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in embed_ids else no_decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]


@dataclasses.dataclass(frozen=True)
class LRSchedule:
    """`scheduler:` as written: its name (`prores_algo.lr_schedules.LR_SCHEDULES`) and parameters
    (`lr_warmup`, `lr_decay`, `alpha_f`, ...)."""

    name: str
    kwargs: dict


def lr_schedule(cfg: TrainConfig) -> LRSchedule | None:
    """The YAML's LR schedule, or None for a constant LR (no `scheduler:`)."""
    if cfg.scheduler is None:
        return None
    return LRSchedule(name=cfg.scheduler.name, kwargs=cfg.scheduler.kwargs)


# --- data -------------------------------------------------------------------------------------------


def dataset_build_args(cfg: TrainConfig) -> dict[str, Any] | None:
    """Keyword arguments of `prores_algo.training.data.ensure_dataset` for the YAML's shards, or None when nothing
    is built here: no `data.source` (prebuilt shards), no `data.path`, or a remote `data.path`."""
    d = cfg.data
    if d.source is None or d.path is None or is_url(d.path):
        return None
    return dict(
        source=d.source,
        out_dir=d.path,
        tokenizer=cfg.tokenizer,
        seq_len=d.seq_len,
        val_fraction=d.val_fraction,
        max_tokens=d.max_tokens,
        seed=cfg.seed,
        max_bytes=d.max_bytes,
    )
