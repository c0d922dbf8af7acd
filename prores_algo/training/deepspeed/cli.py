"""The command line of the DeepSpeed entry (`prores-ds-train`, `python -m prores_algo.training.deepspeed.loop`).

Two ways to describe a run, never mixed:

  * the flat flags (`--n_layers 4 --steps 20 ...`), mapped onto a `TrainConfig` by `ds_settings.from_flat`;
  * `--config YAML key=value ...`: the YAML, read as prores-train reads it, is then the one source of the
    model, data, optimizer, LR schedule, ProRes and loop settings. A flag that would set one of them
    (`--norm`, `--steps`, `--no_prores`, `--prores_warmup`, ...) stops the run with a one-line message naming
    the `key=value` override that does it (`FLAG_KEYS`); nothing given is silently ignored. The
    DeepSpeed loop's own flags (`DSOptions`: `--deepspeed_config`, `--micro_batch_size`, `--summary`, ...)
    and `--autoresume` / `--local_cache` apply with a YAML too.
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

from prores_algo.command_line import CommandParser
from prores_algo.timing import is_auto
from prores_algo.training.config import ConfigError, TrainConfig
from prores_algo.training.deepspeed.settings import DEFAULT_LR, DEFAULTS, DSOptions, from_flat, from_yaml

__all__ = ['parser', 'parse', 'FLAG_KEYS', 'CONFIG_RULE']

# flags that set a TrainConfig field, and the YAML key (`key=value` override) that sets it under --config
FLAG_KEYS: dict[str, str] = {
    'n_layers': 'model.n_layers',
    'd_model': 'model.d_model',
    'n_heads': 'model.n_heads',
    'seq_len': 'data.seq_len',
    'vocab_size': 'model.vocab_size',
    'd_ffn': 'model.d_ffn',
    'norm': 'model.norm',
    'steps': 'max_duration',
    'lr': 'optimizer.lr',
    'weight_decay': 'optimizer.weight_decay',
    'lr_schedule': 'scheduler.name',
    'lr_warmup': 'scheduler.lr_warmup',
    'lr_decay': 'scheduler.lr_decay',
    'alpha_f': 'scheduler.alpha_f',
    'lr_warmup_delay': 'algorithms.prores.lr_warmup_delay',
    'schedule': 'algorithms.prores.schedule',
    't_warmup': 'algorithms.prores.t_warmup',
    'measure_init': 'algorithms.prores.measure_init',
    'prores': 'algorithms.prores',
    'data': 'data.path',
    'seed': 'seed',
    'eval_every': 'eval_interval',
    'save_dir': 'save_folder',
    'save_interval': 'save_interval',
    'load_dir': 'load_path',
}
_BATCHES = ('steps', 'lr_warmup', 'lr_decay', 'lr_warmup_delay', 't_warmup', 'eval_every', 'save_interval')

CONFIG_RULE = (
    'With --config the YAML sets the model, data, optimizer, LR schedule, ProRes and loop: a flag that would '
    'set one of them (--norm, --steps, --no_prores, --prores_warmup, ...) is an error naming the key=value override '
    'to use instead; the DeepSpeed flags (--deepspeed_config, --micro_batch_size, --grad_accum, --summary, ...) '
    'and --autoresume / --local_cache apply.'
)


def parse(argv: list[str] | None = None) -> tuple[TrainConfig, DSOptions]:
    """The run `argv` describes; ConfigError (one line) for a flag that has no effect with --config."""
    p = parser()
    args = vars(p.parse_args(argv))
    args.pop('local_rank', None)
    path, overrides = args.pop('config'), args.pop('overrides')
    if path is None:
        if overrides:
            raise ConfigError(f'key=value overrides {overrides} need --config YAML')
        return from_flat(args)
    unset = object()  # argparse sets a default only where the namespace has no value yet
    given = vars(p.parse_args(argv, argparse.Namespace(**dict.fromkeys(FLAG_KEYS, unset))))
    for flag in FLAG_KEYS:
        if given[flag] is not unset:
            raise ConfigError(_refusal(flag, args[flag]))
    return from_yaml(path, overrides, args)


def _refusal(flag: str, value: Any) -> str:
    key = FLAG_KEYS[flag]
    if flag == 'prores' or (flag == 'schedule' and value in (None, 'none', 'off')):
        return (
            f'--{"no_prores" if flag == "prores" else "schedule " + str(value)} has no effect with --config (ProRes is on when the YAML lists algorithms.prores): '
            'remove algorithms.prores from the YAML'
        )
    if isinstance(value, bool):
        value = str(value).lower()
    elif flag in _BATCHES and isinstance(value, (int, float)) and float(value).is_integer():
        value = f'{int(value)}ba'
    spelling = FLAG_SPELLING.get(flag, flag)
    return f'--{spelling} has no effect with --config (the YAML sets {key}): give the override {key}={value} instead'


# flags whose spelling differs from their key (`dest`)
FLAG_SPELLING = {'t_warmup': 'prores_warmup', 'prores': 'no_prores', 'measure_init': 'no_measure_init'}


class _DeprecatedAlias(argparse.Action):
    """An old flag spelling: works for one release, with a warning naming the new one."""

    def __init__(self, *args, new: str, convert=None, **kwargs):
        self.new, self.convert = new, convert
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        warnings.warn(f'{option_string} is deprecated: use {self.new}', FutureWarning, stacklevel=2)
        setattr(namespace, self.dest, self.convert(values) if self.convert else values)


def _deprecated_alias(group, old: str, new: str, dest: str, type) -> None:
    group.add_argument(old, dest=dest, action=_DeprecatedAlias, new=new, convert=type, help=argparse.SUPPRESS)


def _time_arg(value: str):
    return int(value) if value.lstrip('+-').isdigit() else value


def _warmup_arg(value: str):
    """--prores_warmup: a number of optimizer steps or 'auto'."""
    if is_auto(value):
        return 'auto'
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r}: give a number of optimizer steps (e.g. 24000) or 'auto'"
        ) from None


def parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog='prores-ds-train',
        description='Thin DeepSpeed (ZeRO-3 ready) training loop: reference decoder + ProRes.',
        epilog=CONFIG_RULE,
    )
    d = DEFAULTS
    p.add_argument('--deepspeed_config', default=d['deepspeed_config'], help='DeepSpeed JSON (default: %(default)s)')
    p.add_argument('--local_rank', type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        '--config',
        default=None,
        help='a training YAML (as for prores-train); key=value overrides may follow. The model, data, '
        'optimizer, scheduler, ProRes and loop then come from it only: their flags are an error (see below)',
    )
    p.add_argument('overrides', nargs='*', help='key=value overrides of --config')  # passed by the deepspeed launcher
    g = p.add_argument_group('model')
    for k in ('n_layers', 'd_model', 'n_heads', 'seq_len', 'vocab_size'):  # the YAML's model keys
        g.add_argument(f'--{k}', type=int, default=d[k])
    _deprecated_alias(g, '--vocab', '--vocab_size', dest='vocab_size', type=int)
    g.add_argument('--d_ffn', type=int, default=d['d_ffn'], help='FFN width (default: 8/3 x d_model, rounded)')
    g.add_argument('--norm', default=d['norm'], choices=('pre', 'post', 'sandwich', 'deepnorm', 'lns'))
    g = p.add_argument_group('optimisation')
    g.add_argument('--steps', type=int, default=d['steps'], help='total optimizer steps (max duration)')
    g.add_argument(
        '--lr', type=float, default=d['lr'], help=f'peak LR (default {DEFAULT_LR}, or the JSON optimizer lr)'
    )
    g.add_argument('--weight_decay', type=float, default=d['weight_decay'])
    g.add_argument(
        '--lr_schedule',
        default=d['lr_schedule'],
        help='an LR schedule: wsd (default), constant, linear, cosine, or *_with_warmup of these, polynomial_with_warmup',
    )
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
        '--prores_warmup',
        dest='t_warmup',
        type=_warmup_arg,
        default=d['t_warmup'],
        help="ProRes' W in optimizer steps (default 1000 x n_layers), or 'auto': min(1000 x n_layers, steps / 4)",
    )
    _deprecated_alias(g, '--t_warmup', '--prores_warmup', dest='t_warmup', type=_warmup_arg)
    g.add_argument('--no_prores', dest='prores', action='store_false')
    g.add_argument(
        '--no_measure_init',
        dest='measure_init',
        action='store_false',
        help='do not measure the branches on the first batch (algorithms.prores.measure_init: false)',
    )
    _loop_flags(p)
    return p


def _loop_flags(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    g = p.add_argument_group('ZeRO')
    g.add_argument('--require_stage3', action='store_true')
    g.add_argument(
        '--no_zero_init',
        dest='zero_init',
        action='store_false',
        help='do not build the model under deepspeed.zero.Init',
    )
    g = p.add_argument_group('data and loop')
    g.add_argument(
        '--data', default=None, help='folder/URL of MDS shards (prores_algo.training.data); default: synthetic'
    )
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
    g.add_argument('--log_interval', type=int, default=d['log_interval'], help='print every N optimizer steps')
    _deprecated_alias(g, '--log_every', '--log_interval', dest='log_interval', type=int)
    g.add_argument(
        '--record_samples',
        action='store_true',
        help='the summary lists a CRC-32 of every sample each rank trained on, per step',
    )
    g.add_argument('--verbose', action='store_true', help='keep DeepSpeed INFO logs')
