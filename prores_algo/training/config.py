"""The training configuration: YAML + `key=value` overrides → a validated, typed config.

OmegaConf loads the YAML (safe loader: no code execution) and merges dot-list overrides; pydantic
validates it with `extra='forbid'`, so a typo is an error that names the key and suggests the
nearest valid one. Names of things (models, algorithms, schedulers, callbacks, loggers) are looked
up in explicit tables, never imported from strings.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

__all__ = ['TrainConfig', 'load_config', 'ConfigError', 'check_kwargs', 'one_line', 'report']


class ConfigError(ValueError):
    """A configuration problem, with the offending key and the fix in its message."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra='forbid', protected_namespaces=())


class ModelConfig(BaseModel):
    """`name` picks the family; every other key is that family's argument (checked by the builder)."""

    model_config = ConfigDict(extra='allow', protected_namespaces=())
    name: Literal['reference', 'hf_causal_lm']

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DataConfig(_Strict):
    # MDS folder (built from `source` if missing) or a remote URL of prebuilt shards. Required by
    # prores-train; absent (None), the DeepSpeed loop trains on its synthetic token set.
    path: str | None = None
    source: str | None = 'stdlib'  # text to build shards from: 'stdlib', a local path, 'hf:NAME[:CONFIG]'
    seq_len: int = 128
    max_tokens: int | None = None
    max_bytes: int | None = None
    val_fraction: float = 0.05
    num_workers: int = 0
    shuffle: bool = True
    local_cache: str | None = None


class OptimizerConfig(_Strict):
    name: Literal['adamw', 'decoupled_adamw'] = 'adamw'
    lr: float | None = None  # required by prores-train; absent, the DeepSpeed loop takes its JSON's lr
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1

    @field_validator('lr', 'eps')
    @classmethod
    def _positive_float(cls, v):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError('must be a positive finite number, e.g. 1.0e-3')
        return v

    @field_validator('weight_decay')
    @classmethod
    def _non_negative(cls, v):
        if not (math.isfinite(v) and v >= 0):
            raise ValueError('must be >= 0, e.g. 0.1 (0 turns weight decay off)')
        return v

    @field_validator('betas')
    @classmethod
    def _betas(cls, v):
        if not all(0 <= b < 1 for b in v):
            raise ValueError('both betas must be in [0, 1), e.g. [0.9, 0.95]')
        return v


class SchedulerConfig(BaseModel):
    model_config = ConfigDict(extra='allow')
    name: str

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TrainConfig(_Strict):
    run_name: str | None = None
    seed: int = 17
    model: ModelConfig
    tokenizer: str = 'byte'
    data: DataConfig
    global_train_batch_size: int | None = None  # required by prores-train; the DeepSpeed loop: from its JSON
    device_train_microbatch_size: int | Literal['auto'] | None = None
    eval_batch_size: int | None = None
    optimizer: OptimizerConfig
    scheduler: SchedulerConfig | None = None
    algorithms: dict[str, dict[str, Any] | None] = {}
    callbacks: dict[str, dict[str, Any] | None] = {}
    loggers: dict[str, dict[str, Any] | None] = {}
    precision: Literal['fp32', 'amp_bf16', 'amp_fp16', 'amp_fp8'] = 'fp32'
    device: Literal['cpu', 'gpu'] | None = None
    max_duration: str
    eval_interval: str | int = '500ba'
    eval_subset_num_batches: int = -1
    eval_first: bool = True
    save_folder: str | None = None
    save_interval: str | int = '1000ba'
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False
    autoresume: bool = False
    load_path: str | None = None
    load_weights_only: bool = False  # with load_path: take only the weights (e.g. to start a new ProRes config)
    console_log_interval: str | int = '50ba'
    progress_bar: bool = False
    compile: bool = False
    parallelism: dict[str, Any] | None = None  # {'fsdp': {...FSDP/FSDP2 config...}}
    dist_timeout: float = 300.0

    @field_validator('global_train_batch_size')
    @classmethod
    def _positive(cls, v):
        if v is not None and v < 1:
            raise ValueError('must be a positive int')
        return v

    @field_validator('max_duration', 'eval_interval', 'save_interval', 'console_log_interval')
    @classmethod
    def _time_string(cls, v):
        """Checked here so a typo is reported with its key, not as Composer's bare 'Invalid time string'."""
        if isinstance(v, str):
            from composer.core import Time

            try:
                Time.from_timestring(v)
            except (ValueError, TypeError):
                raise ValueError(
                    "must be a number with a time unit, e.g. '600ba' (batches), '1ep' (epochs), "
                    "'5e8tok' (tokens) or '1e6sp' (samples)"
                ) from None
        return v


def _suggest(key: str, valid) -> str:
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ''


def _fields_of(model_cls, loc) -> list[str]:
    """Valid keys at location `loc` (a tuple of keys) of the schema, for 'did you mean'."""
    cls = model_cls
    for part in loc:
        field = getattr(cls, 'model_fields', {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        for cand in getattr(ann, '__args__', (ann,)):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                cls = cand
                break
        else:
            return []
    return list(getattr(cls, 'model_fields', {}))


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e['loc'] if not isinstance(p, int))
        dotted = '.'.join(str(p) for p in e['loc'])
        if e['type'] == 'extra_forbidden':
            valid = _fields_of(TrainConfig, loc[:-1])
            prefix = '.'.join(str(p) for p in loc[:-1])
            near = _suggest(loc[-1], valid).replace("'", f"'{prefix}.", 1) if prefix else _suggest(loc[-1], valid)
            lines.append(f"unknown key '{dotted}'{near}; valid keys here: {sorted(valid)}")
        elif e['type'] == 'missing':
            lines.append(f"missing required key '{dotted}'")
        else:
            lines.append(f"'{dotted}': {e['msg']} (got {e.get('input')!r})")
    return f'{source}: ' + '; '.join(lines)


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, data: dict[str, Any] | None = None
) -> TrainConfig:
    """Load a YAML file (or a dict) and apply `key=value` overrides (OmegaConf dot-list syntax)."""
    import yaml  # a dependency of omegaconf
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f'config file {str(path)!r} not found: pass the path of a YAML under yamls/')
        _check_yaml_file(path)
        try:
            cfg = OmegaConf.load(path)
        except Exception as e:  # yaml.YAMLError and OmegaConf errors: point at the file
            raise ConfigError(f'{path}: not valid YAML: {one_line(e)}') from None
        if not isinstance(cfg, DictConfig):
            raise ConfigError(
                f'{path}: not a YAML config: the top level of the YAML must be a mapping of keys '
                '(e.g. `max_duration: 600ba`)'
            )
    else:
        cfg = OmegaConf.create(data or {})
    for item in overrides or []:
        if '=' not in item:
            raise ConfigError(f'override {item!r} must look like key=value, e.g. max_duration=100ba')
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides or [])))
        raw = OmegaConf.to_container(cfg, resolve=True)
    except (OmegaConfBaseException, TypeError, ValueError, yaml.YAMLError) as e:
        raise ConfigError(f'{path or "config"}: {_culprit(cfg, overrides)}{one_line(e)}') from None
    if not isinstance(raw, dict):
        raise ConfigError(f'{path}: the top level of the YAML must be a mapping of keys')
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, str(path or 'config'))) from None


_NOT_YAML_SUFFIXES = ('.py', '.pyc', '.pyw', '.pyi', '.ipynb', '.sh', '.pt', '.bin', '.safetensors', '.zip', '.gz')


def _check_yaml_file(path: Path) -> None:
    """Refuse what is not a YAML config before parsing it: source code (which YAML may read as one odd key)
    and binary files."""
    hint = 'pass a training YAML, e.g. yamls/quickstart.yaml'
    if path.suffix.lower() in _NOT_YAML_SUFFIXES:
        raise ConfigError(f'{path}: not a YAML config (a {path.suffix} file): {hint}')
    if not _is_text(path.read_bytes()[:65536]):
        raise ConfigError(f'{path}: not a YAML config (binary content, not UTF-8 text): {hint}')


def _is_text(head: bytes) -> bool:
    import codecs

    if b'\0' in head:
        return False
    try:  # incremental: a character cut at the end of the read is not an error
        codecs.getincrementaldecoder('utf-8')().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def one_line(error: BaseException) -> str:
    """The message of `error` on one line (YAML and OmegaConf messages span several)."""
    return ' '.join(part.strip() for part in str(error).splitlines() if part.strip())


def report(error: BaseException) -> int:
    """How both training entries report a user's mistake (or a store that went away): one line on
    stderr, exit status 2."""
    import sys

    kind = 'config error' if isinstance(error, ConfigError) else 'error'
    print(f'{kind}: {one_line(error)}', file=sys.stderr)
    return 2


def _culprit(cfg, overrides) -> str:
    """Which override cannot be merged (e.g. a list over a mapping), to name it in the error."""
    from omegaconf import OmegaConf

    for item in overrides or []:
        try:
            OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except Exception:
            key = item.split('=', 1)[0]
            return (
                f"override {item!r} cannot be applied to '{key}': give a plain value of the same kind as in the "
                f'config (a mapping is overridden key by key, e.g. {key}.<name>=<value>). '
            )
    return ''


def check_kwargs(where: str, target, kwargs: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Fail with the key and the accepted names if `kwargs` has a key `target`'s signature lacks."""
    import inspect

    params = inspect.signature(target).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return kwargs
    valid = [n for n in params if n not in ('self', *skip)]
    for key in kwargs:
        if key not in valid:
            raise ConfigError(f"{where}: unknown key '{key}'{_suggest(key, valid)}; accepted: {valid}")
    return kwargs


def _decoder_fields() -> list[str]:
    import dataclasses

    from prores_algo.training.models.config import DecoderConfig

    return [f.name for f in dataclasses.fields(DecoderConfig)]


def keys_help() -> str:
    """Every key of the schema with its default ('required' when it has none), for `prores-train --help`."""
    from pydantic import BaseModel

    def lines(model, prefix: str) -> list[str]:
        out = []
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                out += lines(ann, f'{prefix}{name}.')
                if ann is ModelConfig:
                    out.append(f"  model.*: the model's arguments; reference: {', '.join(_decoder_fields())}")
                continue
            default = 'required' if field.is_required() else repr(field.get_default(call_default_factory=True))
            out.append(f'  {prefix}{name}: {default}')
        return out

    intro = (
        'Keys of CONFIG.yaml (override any with key=value, nested ones dotted: optimizer.lr=1e-3). '
        'yamls/quickstart.yaml is an annotated example; scheduler: takes name plus its parameters '
        "(prores_algo.lr_schedules.LR_SCHEDULES), algorithms.prores takes ProRes' arguments:"
    )
    return '\n'.join([intro, *lines(TrainConfig, '')])
