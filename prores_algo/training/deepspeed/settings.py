"""What the DeepSpeed loop (`prores_algo.training.deepspeed.loop`) runs from: a `TrainConfig` plus `DSOptions`.

The model, optimizer, LR schedule, ProRes, data and checkpoint settings are a `TrainConfig`, the schema
`prores-train` reads (`prores_algo.training.config`); `DSOptions` holds what only this loop has (its DeepSpeed
JSON, micro-batch checks, ZeRO init, synthetic-data sizes, logging). They come from

  * a YAML: `--config YAML key=value ...` goes through `load_config` and the name / key checks of
    `prores-train` (`check_keys`); a flag that would set a TrainConfig field is refused (`ds_cli`);
  * the flat flags (`--n_layers 4 --steps 20 ...`) or the flat dict of `ds_train.train(dict)`:
    `from_flat` maps them onto the same two objects (the one place that knows the flat names).

`resolve(config)` is the loop's view of a `TrainConfig`: what `prores_algo.training.recipe` builds from it, with
every time turned into optimizer steps, after refusing what the loop cannot honour. `checked_ds_config`
checks the DeepSpeed JSON against it. Every mistake is a one-line `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from prores_algo.timing import auto_warmup_steps, is_auto, to_steps, whole_steps
from prores_algo.training import recipe
from prores_algo.training.config import ConfigError, TrainConfig, load_config

if TYPE_CHECKING:
    from prores_algo.training.models.decoder import DecoderConfig

__all__ = ['DSOptions', 'DEFAULTS', 'DEFAULT_LR', 'from_flat', 'from_yaml', 'StepPlan', 'resolve', 'checked_ds_config']

DEFAULT_LR = 1e-3  # the peak LR when neither the config nor the DeepSpeed JSON gives one


@dataclasses.dataclass
class DSOptions:
    """The DeepSpeed loop's own options (none of them is in a `TrainConfig`)."""

    deepspeed_config: Any = 'yamls/deepspeed/zero3.json'  # path or dict
    # None: take it from the DeepSpeed JSON; a value must agree with it (fills it if absent / "auto")
    micro_batch_size: int | None = None
    grad_accum: int | None = None
    require_stage3: bool = False
    zero_init: bool = True  # build the model under deepspeed.zero.Init (stage 3)
    num_samples: int | None = None  # synthetic train samples (default: one epoch of the run)
    eval_samples: int = 64  # synthetic eval samples (0: no evaluation)
    load_tag: str | None = None
    summary: str | None = None  # JSON summary path (rank 0; '{rank}' in it: every rank)
    log_interval: int = 1
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
    'vocab_size': 256,
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
    'measure_init': True,
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
        raise ConfigError(f'unknown ds_train option(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}')
    f = {**DEFAULTS, **cfg}
    steps = int(f['steps'])
    if steps < 1:
        raise ConfigError(f'steps must be >= 1, got {steps}')
    model = {
        'name': 'reference',
        'vocab_size': f['vocab_size'],
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
        if not f['measure_init']:
            algorithms['prores']['measure_init'] = False
    elif delay != '0ba':
        raise ConfigError(
            f'lr_warmup_delay={f["lr_warmup_delay"]!r} delays the LR warmup for ProRes '
            '(algorithms.prores.lr_warmup_delay): it needs ProRes on'
        )
    raw = {
        'seed': f['seed'],
        'model': model,
        'global_train_batch_size': f['global_train_batch_size'],
        'data': {'path': f['data'], 'source': None, 'seq_len': f['seq_len'], 'local_cache': f['local_cache']},
        'optimizer': {'name': 'adamw', 'lr': f['lr'], 'betas': list(f['betas']), 'weight_decay': f['weight_decay']},
        'scheduler': _flat_scheduler(f),
        'algorithms': algorithms,
        'max_duration': f'{steps}ba',
        'eval_interval': f['eval_every'],
        'save_folder': f['save_dir'],
        'save_interval': f['save_interval'],
        'load_path': f['load_dir'],
        'autoresume': f['autoresume'],
    }
    return load_config(data=raw), DSOptions(**{k: f[k] for k in _OPTION_KEYS})


def _flat_scheduler(f: Mapping[str, Any]) -> dict[str, Any]:
    """`scheduler:` from --lr_schedule and the LR flags its schedule takes; a flag it does not take, set
    to anything but its default, is an error rather than silently unused."""
    from prores_algo.lr_schedules import LR_ALIASES, LR_SCHEDULES

    name = f['lr_schedule']
    block = {'name': name}
    spec = LR_SCHEDULES.get(LR_ALIASES.get(name, name))
    if spec is None:
        return block  # the schedule check names the unknown schedule
    for flag in ('lr_warmup', 'lr_decay', 'alpha_f'):
        if flag in spec.params:
            block[flag] = f[flag]
        elif f[flag] != DEFAULTS[flag]:
            raise ConfigError(
                f'--{flag} has no effect with --lr_schedule {name} (it takes {sorted(spec.params)}): '
                'remove the flag or choose a schedule that takes it'
            )
    return block


def from_yaml(
    path: str, overrides: list[str] | None = None, flags: Mapping[str, Any] | None = None
) -> tuple[TrainConfig, DSOptions]:
    """`--config YAML key=value ...`: the YAML through `load_config` (as prores-train reads it), DSOptions
    from the flags. `--autoresume` and `--local_cache`, when given, win over the YAML."""
    config = load_config(path, overrides)
    check_keys(config)
    flags = {**DEFAULTS, **(flags or {})}
    update: dict[str, Any] = {}
    if flags['autoresume']:  # else the YAML's
        update['autoresume'] = True
    if flags['local_cache'] is not None:
        update['data'] = config.data.model_copy(update={'local_cache': flags['local_cache']})
    return config.model_copy(update=update), DSOptions(**{k: flags[k] for k in _OPTION_KEYS})


def check_keys(config: TrainConfig) -> None:
    """The names, keys and values under `algorithms` and `scheduler`, checked by prores-train's own checks
    (the same 'did you mean' messages; one table of LR schedules for both entries)."""
    from prores_algo.lr_schedules import lr_schedule_params
    from prores_algo.training import composer_train as composer_entry

    # built as prores-train builds them (nothing to train yet): names, keys and values get its messages
    composer_entry._build_named('algorithms', composer_entry.ALGORITHMS(), config.algorithms)
    schedule = recipe.lr_schedule(config)
    if schedule is not None:
        try:
            lr_schedule_params(schedule.name, schedule.kwargs)
        except ValueError as e:
            raise ConfigError(str(e)) from None


# what the loop takes of `algorithms.prores` and `scheduler` (the rest must be absent or at its default)
_PRORES_TAKEN = ('schedule', 't_warmup', 'lr_warmup_delay', 'log_interval', 'mechanism', 'measure_init')
_PRORES_DEFAULTS = {'layer_class': None, 'branches': None, 'layer_pattern': None, 'remove_when_done': True}


def _refuse_untaken(config: TrainConfig) -> None:
    """Keys the schema allows but this loop does not apply: refused rather than silently dropped."""
    prores = {k: v for k, v in (config.algorithms.get('prores') or {}).items() if k not in _PRORES_TAKEN}
    untaken = sorted(k for k, v in prores.items() if k not in _PRORES_DEFAULTS or v != _PRORES_DEFAULTS[k])
    if untaken:
        raise ConfigError(
            f'algorithms.prores: the DeepSpeed loop does not take {untaken} (it finds the layers of the reference '
            f'decoder itself and takes {list(_PRORES_TAKEN)}): remove them'
        )


# ---------------------------------------------------------------------------------------------------
# the DeepSpeed JSON, checked against the config
# ---------------------------------------------------------------------------------------------------
def _load_ds_config(value) -> dict:
    if isinstance(value, dict):
        return value
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f'deepspeed_config must be a dict or the path of a DeepSpeed JSON file, got {value!r}')
    if not os.path.isfile(value):
        raise ConfigError(
            f'deepspeed_config: file {str(value)!r} does not exist: pass the path of a DeepSpeed JSON, '
            'e.g. --deepspeed_config yamls/deepspeed/zero3.json'
        )
    try:
        with open(value) as f:
            ds_config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f'deepspeed_config: {str(value)!r} is not valid JSON ({e})') from None
    if not isinstance(ds_config, dict):
        raise ConfigError(f'deepspeed_config: {str(value)!r} must hold a JSON object {{"key": value, ...}}')
    return ds_config


def checked_ds_config(plan: StepPlan, opts: DSOptions, world: int) -> tuple[dict, float]:
    """The JSON checked against the config, batch keys filled; and the peak LR."""
    from prores_algo.integrations.deepspeed import check_deepspeed_config

    ds_config = check_deepspeed_config(
        _load_ds_config(opts.deepspeed_config),
        train_micro_batch_size_per_gpu=opts.micro_batch_size,
        gradient_accumulation_steps=opts.grad_accum,
        world_size=world,
        require_stage3=opts.require_stage3,
    )
    if 'scheduler' in ds_config:
        raise ConfigError(
            'DeepSpeed config `scheduler` is set, but this loop builds the LR schedule itself '
            '(lr_schedule / lr_warmup / lr_decay / lr_warmup_delay): remove "scheduler" from the JSON.'
        )
    lr_cfg = plan.optimizer.lr
    json_opt = ds_config.get('optimizer')
    if json_opt is not None:
        json_lr = (json_opt.get('params') or {}).get('lr')
        if lr_cfg is not None and json_lr is not None and float(json_lr) != float(lr_cfg):
            raise ConfigError(
                f'DeepSpeed config `optimizer.params.lr` = {json_lr} but lr = {lr_cfg}: set one of '
                'them (or make them equal).'
            )
        lr = float(json_lr if json_lr is not None else lr_cfg or DEFAULT_LR)
    else:
        lr = float(lr_cfg if lr_cfg is not None else DEFAULT_LR)
    micro = ds_config.setdefault('train_micro_batch_size_per_gpu', 1)
    accum = ds_config.setdefault('gradient_accumulation_steps', 1)
    ds_config.setdefault('train_batch_size', micro * accum * world)
    if plan.global_train_batch_size is not None and plan.global_train_batch_size != ds_config['train_batch_size']:
        raise ConfigError(
            f"the YAML's global_train_batch_size={plan.global_train_batch_size} conflicts with the DeepSpeed config "
            f'(train_micro_batch_size_per_gpu={micro} x gradient_accumulation_steps={accum} x {world} processes = '
            f'{ds_config["train_batch_size"]}): make them agree in the JSON or the YAML'
        )
    return ds_config, lr


# ---------------------------------------------------------------------------------------------------
# a TrainConfig as the loop runs it: times in optimizer steps
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StepPlan:
    model: DecoderConfig
    prores: recipe.ProResSettings  # as written; t_warmup / lr_warmup_delay below are in steps
    t_warmup: float | None  # ProRes W in optimizer steps (None: 1000 per layer; 'auto' resolved here)
    lr_warmup_delay: int
    optimizer: recipe.OptimizerSettings
    lr_schedule: dict[str, Any]  # `scheduler:` as written (name and parameters); constant 1 when the YAML has none
    steps: int
    seed: int
    data: str | None  # MDS folder / URL, or None: the synthetic token set
    seq_len: int  # data.seq_len
    local_cache: str | None
    data_build: dict | None  # prores_algo.training.data.ensure_dataset arguments
    global_train_batch_size: int | None
    eval_every: int
    save_dir: str | None
    save_interval: int
    load_dir: str | None
    autoresume: bool


_MAPPED = ('n_layers', 'd_model', 'n_heads', 'vocab_size', 'norm', 'final_norm', 'deepnet_init', 'd_ffn', 'max_seq_len')


def resolve(config: TrainConfig) -> StepPlan:
    """What this loop trains for `config`; ConfigError / ValueError for what it cannot honour."""
    from prores_algo.training.models.decoder import DecoderConfig

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
        if value and recipe.is_url(value) and not str(value).startswith('s3://'):
            raise ConfigError(
                f'{key}={value!r}: the DeepSpeed loop keeps checkpoints in a folder or in an s3:// object '
                'store (S3_ENDPOINT_URL for other S3-compatible servers)'
            )
    unknown_algos = set(config.algorithms) - {'prores', 'gradient_clipping'}
    if unknown_algos:
        raise ConfigError(
            f'algorithms: {sorted(unknown_algos)} are Composer algorithms; the DeepSpeed loop runs '
            'only prores (clipping comes from the DeepSpeed JSON `gradient_clipping`)'
        )
    _refuse_untaken(config)
    steps = whole_steps(config.max_duration, 'max_duration')
    if steps < 1:
        raise ConfigError(f'steps must be >= 1, got {steps}')
    prores = recipe.prores(config)
    sched = recipe.lr_schedule(config)
    model = recipe.decoder_config(config)
    return StepPlan(
        model=model,
        prores=prores,
        t_warmup=None
        if prores.t_warmup is None
        else _warmup_steps(prores.t_warmup, 'algorithms.prores.t_warmup', steps, model.n_layers),
        lr_warmup_delay=whole_steps(prores.lr_warmup_delay, 'algorithms.prores.lr_warmup_delay', steps),
        optimizer=recipe.optimizer(config),
        lr_schedule={'name': 'constant'} if sched is None else {'name': sched.name, **sched.kwargs},
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


def _warmup_steps(value: Any, field: str, max_steps: int, num_layers: int) -> float:
    """ProRes' W in optimizer steps, kept exact as the Composer algorithm and the HF callback keep it;
    'auto' is `timing.auto_warmup_steps` of the run's `max_steps`."""
    if is_auto(value):
        return float(auto_warmup_steps(num_layers, max_steps))
    return to_steps(value, field, max_steps)
