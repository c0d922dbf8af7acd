"""What the DeepSpeed loop (`prores_algo.ds_train`) runs from: a `TrainConfig` plus `DSOptions`.

The model, optimizer, LR schedule, ProRes, data and checkpoint settings are a `TrainConfig`, the schema
`prores-train` reads (`prores_algo.config`); `DSOptions` holds what only this loop has (its DeepSpeed
JSON, micro-batch checks, ZeRO init, synthetic-data sizes, logging). They come from

  * a YAML: `--config YAML key=value ...` goes through `load_config`, as for `prores-train`;
  * the flat flags (`--n_layers 4 --steps 20 ...`) or the flat dict of `ds_train.train(dict)`:
    `from_flat` maps them onto the same two objects (the one place that knows the flat names).

`resolve(config)` is the loop's view of a `TrainConfig`: what `prores_algo.recipe` builds from it, with
every time turned into optimizer steps, after refusing what the loop cannot honour.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING, Any, Mapping, Optional

from prores_algo import recipe
from prores_algo.config import ConfigError, TrainConfig, load_config
from prores_algo.timing import to_steps, whole_steps

if TYPE_CHECKING:
    from prores_algo.models.decoder import DecoderConfig

__all__ = ['DSOptions', 'DEFAULTS', 'DEFAULT_LR', 'from_flat', 'from_yaml', 'StepPlan', 'resolve', 'parser']

DEFAULT_LR = 1e-3  # the peak LR when neither the config nor the DeepSpeed JSON gives one


@dataclasses.dataclass
class DSOptions:
    """The DeepSpeed loop's own options (none of them is in a `TrainConfig`)."""

    deepspeed_config: Any = 'yamls/deepspeed/zero3.json'  # path or dict
    # None: take it from the DeepSpeed JSON; a value must agree with it (fills it if absent / "auto")
    micro_batch_size: Optional[int] = None
    grad_accum: Optional[int] = None
    require_stage3: bool = False
    zero_init: bool = True  # build the model under deepspeed.zero.Init (stage 3)
    num_samples: Optional[int] = None  # synthetic train samples (default: one epoch of the run)
    eval_samples: int = 64  # synthetic eval samples (0: no evaluation)
    load_tag: Optional[str] = None
    summary: Optional[str] = None  # JSON summary path (rank 0; '{rank}' in it: every rank)
    log_every: int = 1
    verbose: bool = False  # keep DeepSpeed INFO logs
    # the summary lists, per step, a CRC-32 of every sample this rank trained on (checks data partitioning)
    record_samples: bool = False


_OPTION_KEYS = tuple(f.name for f in dataclasses.fields(DSOptions))

# The flat options (CLI flags, `ds_train.train(dict)`): DSOptions' plus these, mapped by `from_flat`.
DEFAULTS: dict[str, Any] = {
    # model
    'n_layers': 4,
    'd_model': 64,
    'n_heads': 4,
    'seq_len': 64,
    'vocab': 256,
    'norm': 'pre',
    'd_ffn': None,  # None: DecoderConfig's default (SwiGLU 8/3 x d_model, rounded); the paper's 1.3B sets 5632
    'final_norm': True,
    'deepnet_init': None,  # None: the official rule, default_deepnet_init(prores on)
    # optimisation (lr None: the JSON optimizer's lr, else DEFAULT_LR)
    'steps': 20,
    'lr': None,
    'weight_decay': 0.1,
    'betas': (0.9, 0.95),
    'lr_schedule': 'wsd',
    'lr_warmup': '0.02dur',
    'lr_decay': '0.1dur',
    'alpha_f': 0.0,
    'lr_warmup_delay': 0,
    # ProRes
    'prores': True,
    'schedule': 'linear',
    't_warmup': None,
    # data (None: the synthetic token set) and loop
    'data': None,
    'local_cache': None,
    'seed': 0,
    'eval_every': 0,
    'save_dir': None,
    'save_interval': 0,
    'load_dir': None,
    # checked against the JSON's train_batch_size when given (None: the JSON's)
    'global_train_batch_size': None,
    # resume from save_dir's `latest` checkpoint if there is one (the same command restarts a killed run)
    'autoresume': False,
    **{f.name: f.default for f in dataclasses.fields(DSOptions)},
}


# ---------------------------------------------------------------------------------------------------
# the flat options and the YAML, onto (TrainConfig, DSOptions)
# ---------------------------------------------------------------------------------------------------
def from_flat(cfg: Mapping[str, Any]) -> tuple[TrainConfig, DSOptions]:
    """The flat options (DEFAULTS' keys; missing ones take their default) as a TrainConfig + DSOptions."""
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ValueError(f'unknown ds_train option(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}')
    f = {**DEFAULTS, **cfg}
    steps = int(f['steps'])
    if steps < 1:
        raise ValueError(f'steps must be >= 1, got {steps}')
    model = {
        'name': 'reference',
        'vocab_size': f['vocab'],
        'd_model': f['d_model'],
        'n_layers': f['n_layers'],
        'n_heads': f['n_heads'],
        'max_seq_len': f['seq_len'],
        'norm': f['norm'],
        'final_norm': f['final_norm'],
    }
    for key in ('d_ffn', 'deepnet_init'):
        if f[key] is not None:
            model[key] = f[key]
    delay = f'{whole_steps(f["lr_warmup_delay"], "lr_warmup_delay", steps)}ba'  # a 'dur' fraction: floored
    algorithms = {}
    if f['prores'] and f['schedule'] not in (None, 'none', 'off'):
        algorithms['prores'] = {'schedule': f['schedule'], 'lr_warmup_delay': delay}
        if f['t_warmup'] is not None:
            algorithms['prores']['t_warmup'] = f['t_warmup']
    elif delay != '0ba':
        raise ValueError(
            f'lr_warmup_delay={f["lr_warmup_delay"]!r} delays the LR warmup for ProRes '
            '(algorithms.prores.lr_warmup_delay): it needs ProRes on'
        )
    raw = {
        'seed': f['seed'],
        'model': model,
        'global_train_batch_size': f['global_train_batch_size'],
        'data': {'path': f['data'], 'source': None, 'seq_len': f['seq_len'], 'local_cache': f['local_cache']},
        'optimizer': {'name': 'adamw', 'lr': f['lr'], 'betas': list(f['betas']), 'weight_decay': f['weight_decay']},
        'scheduler': {
            'name': f['lr_schedule'],
            't_warmup': f['lr_warmup'],
            't_decay': f['lr_decay'],
            'alpha_f': f['alpha_f'],
        },
        'algorithms': algorithms,
        'max_duration': f'{steps}ba',
        'eval_interval': f['eval_every'],
        'save_folder': f['save_dir'],
        'save_interval': f['save_interval'],
        'load_path': f['load_dir'],
        'autoresume': f['autoresume'],
    }
    return load_config(data=raw), DSOptions(**{k: f[k] for k in _OPTION_KEYS})


def from_yaml(
    path: str, overrides: Optional[list[str]] = None, flags: Optional[Mapping[str, Any]] = None
) -> tuple[TrainConfig, DSOptions]:
    """`--config YAML key=value ...`: the YAML through `load_config` (as prores-train reads it), DSOptions
    from the flags. `--autoresume` and `--local_cache`, when given, win over the YAML."""
    config = load_config(path, overrides)
    flags = {**DEFAULTS, **(flags or {})}
    update: dict[str, Any] = {}
    if flags['autoresume']:  # else the YAML's
        update['autoresume'] = True
    if flags['local_cache'] is not None:
        update['data'] = config.data.model_copy(update={'local_cache': flags['local_cache']})
    return config.model_copy(update=update), DSOptions(**{k: flags[k] for k in _OPTION_KEYS})


# ---------------------------------------------------------------------------------------------------
# a TrainConfig as the loop runs it: times in optimizer steps
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StepPlan:
    model: DecoderConfig
    prores: recipe.ProResSettings  # as written; t_warmup / lr_warmup_delay below are in steps
    t_warmup: Optional[float]  # ProRes W in optimizer steps (None: 1000 per layer)
    lr_warmup_delay: int
    optimizer: recipe.OptimizerSettings
    lr_schedule: str
    lr_warmup: Any  # int, "Nba" or "Xdur" (resolved by integrations.deepspeed.lr_lambda_from)
    lr_decay: Any
    alpha_f: float
    steps: int
    seed: int
    data: Optional[str]  # MDS folder / URL, or None: the synthetic token set
    seq_len: int  # data.seq_len
    local_cache: Optional[str]
    data_build: Optional[dict]  # prores_algo.data.ensure_dataset arguments
    global_train_batch_size: Optional[int]
    eval_every: int
    save_dir: Optional[str]
    save_interval: int
    load_dir: Optional[str]
    autoresume: bool


_MAPPED = ('n_layers', 'd_model', 'n_heads', 'vocab_size', 'norm', 'final_norm', 'deepnet_init', 'd_ffn', 'max_seq_len')


def resolve(config: TrainConfig) -> StepPlan:
    """What this loop trains for `config`; ConfigError / ValueError for what it cannot honour."""
    from prores_algo.models.decoder import DecoderConfig

    if config.model.name != 'reference':
        raise ConfigError(
            f'model.name={config.model.name!r}: the DeepSpeed loop trains the reference decoder; '
            'use model.name=reference (HF models: the Hugging Face Trainer with deepspeed=)'
        )
    m = config.model.kwargs
    defaults = {f.name: f.default for f in dataclasses.fields(DecoderConfig)}
    dropped = sorted(k for k, v in m.items() if k not in _MAPPED and (k not in defaults or v != defaults[k]))
    if dropped:  # keys not checked under ZeRO-3 here: refused rather than trained differently
        raise ConfigError(
            f'model: the DeepSpeed loop does not take {dropped} (it maps {sorted(_MAPPED)}); remove '
            'them or leave them at their defaults'
        )
    for key, value in (('save_folder', config.save_folder), ('load_path', config.load_path)):
        if value and recipe.is_url(value):
            raise ConfigError(
                f'{key}={value!r}: DeepSpeed reads and writes checkpoints as files; on several nodes '
                'use a folder every node can reach (a shared filesystem), not an object-store URL'
            )
    unknown_algos = set(config.algorithms) - {'prores', 'gradient_clipping'}
    if unknown_algos:
        raise ConfigError(
            f'algorithms: {sorted(unknown_algos)} are Composer algorithms; the DeepSpeed loop runs '
            'only prores (clipping comes from the DeepSpeed JSON `gradient_clipping`)'
        )
    steps = whole_steps(config.max_duration, 'max_duration')
    if steps < 1:
        raise ValueError(f'steps must be >= 1, got {steps}')
    prores = recipe.prores(config)
    sched = recipe.lr_schedule(config)
    return StepPlan(
        model=recipe.decoder_config(config),
        prores=prores,
        t_warmup=None
        if prores.t_warmup is None
        else _warmup_steps(prores.t_warmup, 'algorithms.prores.t_warmup', steps),
        lr_warmup_delay=whole_steps(prores.lr_warmup_delay, 'algorithms.prores.lr_warmup_delay', steps),
        optimizer=recipe.optimizer(config),
        lr_schedule='constant' if sched is None else sched.name,
        lr_warmup=0 if sched is None else sched.kwargs.get('t_warmup', DEFAULTS['lr_warmup']),
        lr_decay=DEFAULTS['lr_decay'] if sched is None else sched.kwargs.get('t_decay', DEFAULTS['lr_decay']),
        alpha_f=0.0 if sched is None else sched.kwargs.get('alpha_f', 0.0),
        steps=steps,
        seed=config.seed,
        data=config.data.path,
        seq_len=config.data.seq_len,
        local_cache=config.data.local_cache,
        data_build=recipe.dataset_build_args(config),
        global_train_batch_size=config.global_train_batch_size,
        eval_every=whole_steps(config.eval_interval, 'eval_interval', steps),
        save_dir=config.save_folder,
        save_interval=whole_steps(config.save_interval, 'save_interval', steps),
        load_dir=config.load_path,
        autoresume=config.autoresume,
    )


def _warmup_steps(value: Any, field: str, max_steps: int) -> float:
    """ProRes' W in optimizer steps, kept exact as the Composer algorithm and the HF callback keep it."""
    return to_steps(value, field, max_steps)


# ---------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------
def _time_arg(value: str):
    return int(value) if value.lstrip('+-').isdigit() else value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='python -m prores_algo.ds_train',
        description='Thin DeepSpeed (ZeRO-3 ready) training loop: reference decoder + ProRes.',
    )
    d = DEFAULTS
    p.add_argument('--deepspeed_config', default=d['deepspeed_config'], help='DeepSpeed JSON (default: %(default)s)')
    p.add_argument('--local_rank', type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        '--config',
        default=None,
        help='a training YAML (as for prores-train); key=value overrides may '
        'follow; model/data/optimizer/scheduler/ProRes then come from it',
    )
    p.add_argument('overrides', nargs='*', help='key=value overrides of --config')  # passed by the deepspeed launcher
    g = p.add_argument_group('model')
    for k in ('n_layers', 'd_model', 'n_heads', 'seq_len', 'vocab'):
        g.add_argument(f'--{k}', type=int, default=d[k])
    g.add_argument('--d_ffn', type=int, default=d['d_ffn'], help='FFN width (default: 8/3 x d_model, rounded)')
    g.add_argument('--norm', default=d['norm'], choices=('pre', 'post', 'sandwich', 'deepnorm', 'lns'))
    g = p.add_argument_group('optimisation')
    g.add_argument('--steps', type=int, default=d['steps'], help='total optimizer steps (max duration)')
    g.add_argument(
        '--lr', type=float, default=d['lr'], help=f'peak LR (default {DEFAULT_LR}, or the JSON optimizer lr)'
    )
    g.add_argument('--weight_decay', type=float, default=d['weight_decay'])
    g.add_argument('--lr_schedule', default=d['lr_schedule'], help='wsd | linear | cosine | constant')
    g.add_argument('--lr_warmup', type=_time_arg, default=d['lr_warmup'], help='steps, "Nba" or "Xdur"')
    g.add_argument('--lr_decay', type=_time_arg, default=d['lr_decay'], help='WSD decay length')
    g.add_argument('--alpha_f', type=float, default=d['alpha_f'])
    g.add_argument('--lr_warmup_delay', type=_time_arg, default=d['lr_warmup_delay'])
    g.add_argument(
        '--micro_batch_size',
        type=int,
        default=d['micro_batch_size'],
        help='must agree with the JSON train_micro_batch_size_per_gpu (fills it if absent/"auto")',
    )
    g.add_argument(
        '--grad_accum',
        type=int,
        default=d['grad_accum'],
        help='must agree with the JSON gradient_accumulation_steps (fills it if absent/"auto")',
    )
    g = p.add_argument_group('ProRes')
    g.add_argument('--schedule', default=d['schedule'], help="ProRes schedule, or 'none' for a baseline")
    g.add_argument(
        '--t_warmup', type=float, default=d['t_warmup'], help='W in optimizer steps (default 1000 x n_layers)'
    )
    g.add_argument('--no_prores', dest='prores', action='store_false')
    g = p.add_argument_group('ZeRO')
    g.add_argument('--require_stage3', action='store_true')
    g.add_argument(
        '--no_zero_init',
        dest='zero_init',
        action='store_false',
        help='do not build the model under deepspeed.zero.Init',
    )
    g = p.add_argument_group('data and loop')
    g.add_argument('--data', default=None, help='folder/URL of MDS shards (prores_algo.data); default: synthetic')
    g.add_argument(
        '--local_cache',
        default=None,
        help='with a URL --data: where this node caches the shards (default: a folder under the temp dir)',
    )
    g.add_argument('--num_samples', type=int, default=None, help='synthetic train samples (default: one epoch)')
    g.add_argument('--eval_samples', type=int, default=d['eval_samples'])
    g.add_argument('--seed', type=int, default=d['seed'])
    g.add_argument('--eval_every', type=int, default=d['eval_every'], help='0: only at the end')
    g.add_argument('--save_dir', default=None)
    g.add_argument('--save_interval', type=int, default=d['save_interval'], help='0: only at the end')
    g.add_argument('--load_dir', default=None)
    g.add_argument('--load_tag', default=None)
    g.add_argument(
        '--autoresume',
        action='store_true',
        help="resume from --save_dir's latest checkpoint when there is one (restart a killed run as is)",
    )
    g.add_argument('--summary', default=None, help="JSON summary path (rank 0; '{rank}' in it: every rank)")
    g.add_argument('--log_every', type=int, default=d['log_every'])
    g.add_argument(
        '--record_samples',
        action='store_true',
        help='the summary lists a CRC-32 of every sample each rank trained on, per step',
    )
    g.add_argument('--verbose', action='store_true', help='keep DeepSpeed INFO logs')
    return p
