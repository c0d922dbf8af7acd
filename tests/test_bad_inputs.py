"""The bad-input matrix: malformed input anywhere in the public surface gets a clear, actionable error.

One parametrized test, one row per bad input, across
  * the Python API: apply_prores / ProResController, the Composer algorithm ProRes, schedules,
    register_policy, WSDScheduler / wsd_multiplier;
  * the YAML entry: load_config (wrong types, unknown keys, out-of-range values, malformed files and
    overrides) and build_trainer (unknown names, conflicting settings, a model without residual branches);
  * the data CLI `prores_algo.training.data.main` and the loader (missing files, empty corpus, seq_len larger than
    the data, bad numbers, truncated / missing shards, a damaged index);
  * the DeepSpeed path (conflicting DeepSpeed JSON, ds_train options);
  * resuming under a different ProRes configuration (Composer load_path and autoresume, DeepSpeed).

Every row asserts the exception type, that the message names the field and says how to fix it (the
accepted values, an example, or the option to use), and, where a side effect is possible, that none is
left: the model is untouched, no dataset folder appears (or the old one still loads), no checkpoint is
written, registries are unchanged, no process group was created.

Heavy fixtures are built once per session (a small stdlib dataset, a 2-batch Composer checkpoint) and
only when a row needs them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
from torch import nn

import prores_algo
from prores_algo import alpha_schedules, apply_prores, register_policy
from prores_algo.policies import LAYER_POLICIES
from prores_algo.surgery import ALPHA_BUFFER
from prores_algo.training.config import ConfigError, load_config
from prores_algo.training.models.decoder import Decoder, DecoderConfig
from tests.support.helpers import DIST_ENV

ROOT = Path(__file__).resolve().parents[1]
QS = ROOT / 'yamls' / 'quickstart.yaml'
ZERO3_JSON = ROOT / 'yamls' / 'deepspeed' / 'zero3.json'


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope='session')
def bad_inputs_dataset(tmp_path_factory):
    """Byte-level stdlib shards, seq_len 32 (train + val)."""
    from prores_algo.training.data import write_mds

    out = tmp_path_factory.mktemp('bad_inputs') / 'stdlib-32'
    write_mds('stdlib', out, tokenizer='byte', seq_len=32, val_fraction=0.05, max_tokens=60_000, progress=False)
    return out


def small(data_path, *extra):
    return [
        f'data.path={data_path}',
        'data.source=null',
        'data.seq_len=32',
        'model.max_seq_len=32',
        'model.d_model=32',
        'model.n_heads=4',
        'model.n_layers=2',
        'global_train_batch_size=4',
        'eval_batch_size=4',
        'eval_interval=100ba',
        'eval_subset_num_batches=1',
        'console_log_interval=100ba',
        'algorithms.prores.t_warmup=4ba',
        'max_duration=2ba',
        *extra,
    ]


@pytest.fixture(scope='session')
def bad_inputs_checkpoint(bad_inputs_dataset, tmp_path_factory):
    """A 2-batch Composer run (ProRes linear, t_warmup 4ba) saved at batch 2, run_name 'ckpt-run'."""
    from prores_algo.training.composer_train import build_trainer

    folder = tmp_path_factory.mktemp('bad_inputs_ckpt') / 'ckpt'
    trainer = build_trainer(
        load_config(QS, small(bad_inputs_dataset, f'save_folder={folder}', 'save_interval=2ba', 'run_name=ckpt-run'))
    )
    trainer.fit()
    trainer.close()
    assert (folder / 'ep0-ba2-rank0.pt').is_file()
    return folder


@dataclass
class Ctx:
    tmp: Path
    request: Any
    state: dict = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.request.getfixturevalue('bad_inputs_dataset')

    @property
    def ckpt(self) -> Path:
        return self.request.getfixturevalue('bad_inputs_checkpoint')

    def data_copy(self) -> Path:
        dst = self.tmp / 'copy'
        shutil.copytree(self.data, dst)
        return dst


@dataclass
class Bad:
    id: str
    fn: Callable[[Ctx], Any]
    exc: type
    must: tuple  # regexes that must all occur in the message
    after: Optional[Callable[[Ctx], None]] = None


# ----------------------------------------------------------------------------------------------- helpers


def tiny(n_layers=2):
    torch.manual_seed(0)
    return Decoder(DecoderConfig(vocab_size=64, d_model=32, n_layers=n_layers, n_heads=4, max_seq_len=16))


def untouched(model):
    assert not [n for n, _ in model.named_buffers() if n.endswith(ALPHA_BUFFER)], 'α buffers left behind'
    assert not any(m._forward_hooks for m in model.modules()), 'forward hooks left behind'


def keep_model(ctx, fn):
    """Run fn on a fresh tiny model kept in ctx so the after-check can inspect it."""
    ctx.state['model'] = tiny()
    return fn(ctx.state['model'])


def model_untouched(ctx):
    untouched(ctx.state['model'])


def no_dataset(name='out'):
    def check(ctx):
        out = ctx.tmp / name
        assert not out.exists(), f'{out} was created'
        assert not list(ctx.tmp.glob(f'.{name}.prores-tmp-*')), 'temporary folder left behind'

    return check


def nothing_in(name):
    def check(ctx):
        d = ctx.tmp / name
        assert not d.exists() or not any(d.iterdir()), f'{d} holds {list(d.iterdir())}'

    return check


def sub(text, ctx):
    """Fill in {tmp} and {ckpt} (plain replace: overrides contain YAML braces)."""
    text = text.replace('{tmp}', str(ctx.tmp))
    return text.replace('{ckpt}', str(ctx.ckpt)) if '{ckpt}' in text else text


def cli(*argv):
    def fn(ctx):
        from prores_algo.training.data import main

        args = [sub(a, ctx) for a in argv]
        if '--no_progress' not in args:
            args.append('--no_progress')
        main(args)

    return fn


def yaml_load(*overrides):
    return lambda ctx: load_config(QS, [sub(o, ctx) for o in overrides])


def build(*overrides, fit=False, data=False):
    """build_trainer from the quickstart with overrides; data=True points it at the session dataset."""

    def fn(ctx):
        from prores_algo.training.composer_train import build_trainer

        over = small(ctx.data) if data else [f'data.path={ctx.tmp}/d', 'model.max_seq_len=128']
        trainer = build_trainer(load_config(QS, [*over, *(sub(o, ctx) for o in overrides)]))
        ctx.state['trainer'] = trainer
        if fit:
            trainer.fit()

    return fn


def trainer_without_layers(ctx):
    """A Composer Trainer with ProRes over a model that has no transformer layer: refused at Event.INIT."""
    from composer import Trainer
    from composer.models import ComposerClassifier

    from prores_algo import ProRes

    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    ctx.state['model'] = net
    Trainer(
        model=ComposerClassifier(net, num_classes=4),
        max_duration='1ba',
        algorithms=[ProRes()],
        progress_bar=False,
        log_to_console=False,
    )


def write(name, text):
    def fn(ctx):
        (ctx.tmp / name).write_text(text)

    return fn


def then(*fns):
    def fn(ctx):
        out = None
        for f in fns:
            out = f(ctx)
        return out

    return fn


def ds_json(**changes):
    cfg = json.loads(ZERO3_JSON.read_text())
    for key, value in changes.items():
        cfg[key] = value
    return cfg


def ds_train(cfg):
    def fn(ctx):
        from prores_algo.training.deepspeed.loop import train

        return train({k: (sub(v, ctx) if isinstance(v, str) else v) for k, v in cfg.items()})

    return fn


def fake_ds_checkpoint(ctx):
    """A DeepSpeed checkpoint folder as save_checkpoint leaves it (sidecar + `latest`), ProRes t_warmup 8."""
    from prores_algo.integrations.deepspeed import SIDECAR_FILE

    tag = ctx.tmp / 'ds_ckpt' / 'global_step4'
    tag.mkdir(parents=True)
    (tag / SIDECAR_FILE).write_text(
        json.dumps({'enabled': True, 'schedule': 'linear', 't_warmup': 8.0, 'num_layers': 4, 'time_unit': 'steps'})
    )
    (ctx.tmp / 'ds_ckpt' / 'latest').write_text('global_step4')


def no_process_group(ctx):
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())


def truncate_shard(ctx):
    d = ctx.data_copy()
    shard = d / 'train' / 'shard.00000.mds'
    os.truncate(shard, shard.stat().st_size // 2)
    return d


def loader(path_fn, split='train', **kw):
    def fn(ctx):
        from prores_algo.training.data import build_dataloader

        return build_dataloader(str(path_fn(ctx)), split, 2, **kw)

    return fn


def composer_resume(*overrides):
    """A new Trainer over the session checkpoint with other settings; saves (if at all) into tmp/new_ckpt."""

    def fn(ctx):
        from prores_algo.training.composer_train import build_trainer

        over = [sub(o, ctx) for o in overrides]
        build_trainer(load_config(QS, small(ctx.data, 'max_duration=4ba', *over)))

    return fn


def resume_refused_and_weights_only_works(ctx):
    nothing_in('new_ckpt')(ctx)
    from prores_algo.training.composer_train import build_trainer

    trainer = build_trainer(
        load_config(
            QS,
            small(
                ctx.data,
                'max_duration=4ba',
                'algorithms.prores.t_warmup=8ba',
                f'load_path={ctx.ckpt}/ep0-ba2-rank0.pt',
                'load_weights_only=true',
            ),
        )
    )
    assert int(trainer.state.timestamp.batch) == 0  # weights only: a new run that starts from those weights
    trainer.close()


def autoresume_copy(ctx):
    folder = ctx.tmp / 'auto'
    shutil.copytree(ctx.ckpt, folder, symlinks=True)
    return folder


def autoresume_folder_unchanged(ctx):
    assert sorted(p.name for p in (ctx.tmp / 'auto').iterdir()) == ['ep0-ba2-rank0.pt', 'latest-rank0.pt']


def schedules_unchanged(ctx):
    assert alpha_schedules.names() == ctx.state['names'] and alpha_schedules.aliases() == ctx.state['aliases']


def snapshot_schedules(fn):
    def wrapped(ctx):
        ctx.state['names'], ctx.state['aliases'] = alpha_schedules.names(), alpha_schedules.aliases()
        return fn(ctx)

    return wrapped


def policy_absent(name):
    def check(ctx):
        assert name not in LAYER_POLICIES

    return check


def llama_policy_unchanged(ctx):
    assert LAYER_POLICIES['LlamaDecoderLayer'] == ('self_attn.o_proj', 'mlp.down_proj')


# ----------------------------------------------------------------------------------------------- the matrix


def _api():
    from prores_algo import ProRes, WSDScheduler, wsd_multiplier

    return [
        # --- apply_prores / the controller ------------------------------------------------------------
        Bad(
            'api-unknown-schedule',
            lambda c: keep_model(c, lambda m: apply_prores(m, 'cosine')),
            ValueError,
            (r"unknown schedule 'cosine'", r'`schedule`', r"'linear'", r'register'),
            model_untouched,
        ),
        Bad(
            'api-t_warmup-zero',
            lambda c: keep_model(c, lambda m: apply_prores(m, t_warmup=0)),
            ValueError,
            (r't_warmup', r'positive, finite number of steps'),
            model_untouched,
        ),
        Bad(
            'api-t_warmup-nan',
            lambda c: keep_model(c, lambda m: apply_prores(m, t_warmup=float('nan'))),
            ValueError,
            (r't_warmup', r'positive, finite'),
            model_untouched,
        ),
        Bad(
            'api-t_warmup-timestring',
            lambda c: keep_model(c, lambda m: apply_prores(m, t_warmup='24000ba')),
            ValueError,
            (r"t_warmup='24000ba'", r'number of steps', r'prores_algo\.ProRes'),
            model_untouched,
        ),
        Bad(
            'api-no-residual-branch',
            lambda c: apply_prores(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))),
            ValueError,
            (r'no residual branch', r"layer_class='YourBlock'", r"branches=\['attn.out_proj'", r'register_policy'),
        ),
        Bad(
            'api-branch-not-found',
            lambda c: keep_model(
                c, lambda m: apply_prores(m, layer_class='Block', branches=['attn.o_proj', 'mlp.nope'])
            ),
            ValueError,
            (r"branch 'mlp\.nope' not found", r'fix `branches`', r"'mlp\.down_proj'"),
            model_untouched,
        ),
        Bad(
            'api-branches-string',
            lambda c: keep_model(c, lambda m: apply_prores(m, branches='attn.o_proj')),
            ValueError,
            (r'branches must be a non-empty list', r"e\.g\. \['attn\.o_proj', 'mlp\.down_proj'\]"),
            model_untouched,
        ),
        Bad(
            'api-class-and-pattern',
            lambda c: keep_model(c, lambda m: apply_prores(m, layer_class='Block', layer_pattern='blocks.*')),
            ValueError,
            (r'either layer_class or layer_pattern, not both',),
            model_untouched,
        ),
        Bad(
            'api-layer-without-known-branches',
            lambda c: keep_model(c, lambda m: apply_prores(m, layer_class='Linear')),
            ValueError,
            (r'matched layer_class', r'pass branches=\[', r"register_policy\('Linear'"),
            model_untouched,
        ),
        Bad(
            'api-applied-twice',
            lambda c: keep_model(c, lambda m: (apply_prores(m), apply_prores(m))),
            ValueError,
            (r'already applied', r'call remove\(\) on the first controller'),
            lambda c: assert_hooks(c.state['model'], 4),
        ),
        Bad(
            'api-set_step-not-a-number',
            lambda c: apply_prores(tiny(), t_warmup=10).set_step('10'),
            ValueError,
            (r'step must be a number', r"got '10'"),
        ),
        Bad(
            'api-set_step-back-after-removal',
            lambda c: then_set_back(),
            RuntimeError,
            (r'cannot go back to step 3', r'Apply ProRes again to a fresh model'),
        ),
        # --- the Composer algorithm -------------------------------------------------------------------
        Bad(
            'algo-unknown-schedule',
            lambda c: ProRes(schedule='cosine'),
            ValueError,
            (r"unknown schedule 'cosine'", r"'linear_square'", r'aliases'),
        ),
        Bad(
            'algo-t_warmup-epochs',
            lambda c: ProRes(t_warmup='10ep'),
            ValueError,
            (r"t_warmup='10ep'", r'"24000ba"', r'"0\.2dur"'),
        ),
        Bad(
            'algo-t_warmup-over-whole-run',
            lambda c: ProRes(t_warmup='1.5dur'),
            ValueError,
            (r"t_warmup='1\.5dur'", r'fraction in \(0, 1\]'),
        ),
        Bad(
            'algo-t_warmup-garbage',
            lambda c: ProRes(t_warmup='soon'),
            ValueError,
            (r"t_warmup='soon' is not a Time string", r'e\.g\. "24000ba"'),
        ),
        Bad(
            'algo-t_warmup-zero',
            lambda c: ProRes(t_warmup='0ba'),
            ValueError,
            (r't_warmup must be positive', r'e\.g\. "24000ba"'),
        ),
        Bad(
            'algo-negative-lr-delay',
            lambda c: ProRes(lr_warmup_delay='-5ba'),
            ValueError,
            (r'lr_warmup_delay must be >= 0', r'e\.g\. "0ba"', r"'-5ba'"),
        ),
        Bad(
            'algo-log-interval',
            lambda c: ProRes(log_interval=0),
            ValueError,
            (r'log_interval must be a positive number of batches', r'e\.g\. 1 or "100ba"'),
        ),
        Bad(
            'algo-remove_when_done-not-bool',
            lambda c: ProRes(remove_when_done='no'),
            ValueError,
            (r'remove_when_done must be true or false', r"'no'"),
        ),
        # --- schedules --------------------------------------------------------------------------------
        Bad(
            'sched-layer-index',
            lambda c: alpha_schedules.alpha('linear', 4, 4, 10, 100),
            ValueError,
            (r'layer_index must be an int in \[0, 4\)', r'got 4'),
        ),
        Bad(
            'sched-warmup-negative',
            lambda c: alpha_schedules.alpha('linear', 0, 4, 10, -1),
            ValueError,
            (r'warmup_steps \(t_warmup\) must be a positive finite number',),
        ),
        Bad(
            'sched-register-existing-alias',
            snapshot_schedules(lambda c: alpha_schedules.register('sqrt', lambda *a: 1.0)),
            ValueError,
            (r"schedule 'sqrt' is already registered", r'overwrite=True'),
            schedules_unchanged,
        ),
        Bad(
            'sched-register-empty-name',
            snapshot_schedules(lambda c: alpha_schedules.register('', lambda *a: 1.0)),
            ValueError,
            (r'schedule name must be a non-empty string',),
            schedules_unchanged,
        ),
        Bad(
            'sched-name-not-a-string',
            lambda c: alpha_schedules.alpha(3, 0, 4, 1, 10),
            ValueError,
            (r'schedule must be a string', r"'linear'", r'got int 3'),
        ),
        # --- register_policy --------------------------------------------------------------------------
        Bad(
            'policy-overwrite-existing',
            lambda c: register_policy('LlamaDecoderLayer', ('attn.x', 'mlp.y')),
            ValueError,
            (r"policy for 'LlamaDecoderLayer' exists", r'overwrite=True'),
            llama_policy_unchanged,
        ),
        Bad(
            'policy-branches-as-string',
            lambda c: register_policy('MyBadBlock', 'attn.o_proj'),
            ValueError,
            (r'branches must be a non-empty list', r"e\.g\. \['attn\.o_proj', 'mlp\.down_proj'\]", r'got the string'),
            policy_absent('MyBadBlock'),
        ),
        Bad(
            'policy-empty-branches',
            lambda c: register_policy('MyBadBlock', []),
            ValueError,
            (r'branches must be a non-empty list', r'e\.g\.'),
            policy_absent('MyBadBlock'),
        ),
        Bad(
            'policy-empty-name',
            lambda c: register_policy('', ('a', 'b')),
            ValueError,
            (r'layer_class_name must be a non-empty class name',),
            policy_absent(''),
        ),
        # --- WSD ------------------------------------------------------------------------------------------
        Bad(
            'wsd-warmup-plus-decay-too-long',
            lambda c: wsd_multiplier(5, 100, 60, 60),
            ValueError,
            (r'warmup \(60\)', r'decay \(60\)', r'warmup \+ decay <= max_steps \(100\)'),
        ),
        Bad(
            'wsd-scheduler-bad-time',
            lambda c: WSDScheduler(lr_warmup='soon'),
            ValueError,
            (r"lr_warmup='soon'", r'e\.g\. "24000ba"'),
        ),
        Bad(
            'wsd-scheduler-alpha_f',
            lambda c: WSDScheduler(alpha_f='x'),
            ValueError,
            (r'alpha_f \(the final LR multiplier\)', r'e\.g\. 0\.0'),
        ),
    ]


def assert_hooks(model, n):
    from prores_algo.surgery import has_prores_hook

    assert sum(has_prores_hook(m) for m in model.modules()) == n, 'the failed second apply added hooks'


def then_set_back():
    ctrl = apply_prores(tiny(), t_warmup=10)
    ctrl.set_step(10)  # done: hooks removed
    ctrl.set_step(3)


def _yaml():
    d = no_dataset('d')
    return [
        # --- load_config ---------------------------------------------------------------------------------
        Bad(
            'yaml-typo-key',
            yaml_load('max_duraton=10ba'),
            ConfigError,
            (r"unknown key 'max_duraton'", r"did you mean 'max_duration'", r'valid keys here'),
        ),
        Bad(
            'yaml-nested-typo-key',
            yaml_load('data.seq_lenn=64'),
            ConfigError,
            (r"unknown key 'data\.seq_lenn'", r"did you mean 'data\.seq_len'"),
        ),
        Bad(
            'yaml-wrong-type',
            yaml_load('global_train_batch_size=abc'),
            ConfigError,
            (r"'global_train_batch_size'", r'valid integer', r"got 'abc'"),
        ),
        Bad(
            'yaml-unknown-precision',
            yaml_load('precision=fp64'),
            ConfigError,
            (r"'precision'", r"'fp32', 'amp_bf16', 'amp_fp16' or 'amp_fp8'", r"got 'fp64'"),
        ),
        Bad(
            'yaml-unknown-model-family',
            yaml_load('model.name=gpt5'),
            ConfigError,
            (r"'model\.name'", r"'reference' or 'hf_causal_lm'"),
        ),
        Bad(
            'yaml-batch-size-zero',
            yaml_load('global_train_batch_size=0'),
            ConfigError,
            (r"'global_train_batch_size'", r'must be a positive int'),
        ),
        Bad(
            'yaml-negative-lr',
            yaml_load('optimizer.lr=-1e-3'),
            ConfigError,
            (r"'optimizer\.lr'", r'positive finite number, e\.g\. 1\.0e-3'),
        ),
        Bad(
            'yaml-beta-out-of-range',
            yaml_load('optimizer.betas=[0.9,1.5]'),
            ConfigError,
            (r"'optimizer\.betas'", r'\[0, 1\), e\.g\. \[0\.9, 0\.95\]'),
        ),
        Bad(
            'yaml-bad-time-string',
            yaml_load('max_duration=forever'),
            ConfigError,
            (r"'max_duration'", r"e\.g\. '600ba'", r"got 'forever'"),
        ),
        Bad(
            'yaml-list-over-mapping',
            yaml_load('algorithms=[prores]'),
            ConfigError,
            (r"override 'algorithms=\[prores\]' cannot be applied", r'algorithms\.<name>=<value>'),
        ),
        Bad('yaml-bool-expected', yaml_load('autoresume=maybe'), ConfigError, (r"'autoresume'", r'valid boolean')),
        Bad(
            'yaml-override-without-equals',
            yaml_load('max_duration'),
            ConfigError,
            (r"override 'max_duration' must look like key=value", r'e\.g\. max_duration=100ba'),
        ),
        Bad(
            'yaml-top-level-not-mapping',
            then(write('list.yaml', '- a\n- b\n'), lambda c: load_config(c.tmp / 'list.yaml')),
            ConfigError,
            (r'list\.yaml', r'top level of the YAML must be a mapping'),
        ),
        Bad(
            'yaml-syntax-error',
            then(write('broken.yaml', 'model: [unclosed\n'), lambda c: load_config(c.tmp / 'broken.yaml')),
            ConfigError,
            (r'broken\.yaml: not valid YAML',),
        ),
        Bad(
            'yaml-missing-file',
            lambda c: load_config(c.tmp / 'nope.yaml'),
            ConfigError,
            (r"config file '.*nope\.yaml' not found", r'yamls/'),
        ),
        # --- build_trainer: names, conflicts (fail before any data is built) -------------------------------
        Bad(
            'build-unknown-algorithm',
            build('algorithms.prorez={}'),
            ConfigError,
            (r"algorithms: unknown name 'prorez'", r"did you mean 'prores'", r'available: \['),
            d,
        ),
        Bad(
            'build-unknown-algorithm-key',
            build('algorithms.prores.t_warmpu=10ba'),
            ConfigError,
            (r"algorithms\.prores: unknown key 't_warmpu'", r"did you mean 't_warmup'", r'accepted'),
            d,
        ),
        Bad(
            'build-unknown-prores-schedule',
            build('algorithms.prores.schedule=cosine'),
            ConfigError,
            (r'algorithms\.prores', r"unknown schedule 'cosine'", r"'linear'"),
            d,
        ),
        Bad(
            'build-unknown-scheduler',
            build('scheduler.name=wsdd'),
            ConfigError,
            (r"scheduler\.name: unknown scheduler 'wsdd'", r"did you mean 'wsd'", r'available'),
            d,
        ),
        Bad(
            'build-unknown-callback',
            build('callbacks.lr_monitr={}'),
            ConfigError,
            (r"callbacks: unknown name 'lr_monitr'", r"did you mean 'lr_monitor'"),
            d,
        ),
        Bad(
            'build-vocab-smaller-than-tokenizer',
            build('model.vocab_size=200'),
            ConfigError,
            (r'model\.vocab_size=200 is smaller than the tokenizer', r'set model\.vocab_size >= 257'),
            d,
        ),
        Bad(
            'build-seq-len-over-model',
            build('data.seq_len=4096'),
            ConfigError,
            (r'data\.seq_len=4096 exceeds model\.max_seq_len=128', r'raise model\.max_seq_len or lower data\.seq_len'),
            d,
        ),
        Bad(
            'build-model-norm',
            build('model.norm=middle'),
            ConfigError,
            (r'DecoderConfig\.norm must be one of', r"'pre', 'post'"),
            d,
        ),
        Bad(
            'build-parallelism-conflict',
            build('parallelism={fsdp: {}, fsdp2: {}}'),
            ConfigError,
            (r'parallelism: use one of fsdp', r'or fsdp2', r"\['fsdp', 'fsdp2'\]"),
            d,
        ),
        Bad(
            'build-no-data-no-source',
            build('data.source=null'),
            ConfigError,
            (r"data\.path='.*/d' does not exist and data\.source is null", r'`prores-data`', r'set data\.source'),
            d,
        ),
        Bad(
            'build-val-fraction',
            build('data.val_fraction=1.5'),
            ValueError,
            (r'`val_fraction` must be in \[0, 1\)',),
            d,
        ),
        # --- build_trainer on real data: conflicts found when the Trainer is assembled / starts -----------
        Bad(
            'build-delay-without-scheduler',
            build('scheduler=null', 'algorithms.prores.lr_warmup_delay=2ba', data=True, fit=True),
            ValueError,
            (
                r'lr_warmup_delay is set but the Trainer has no LR scheduler',
                r'set lr_warmup_delay to "0ba"',
                r'WSDScheduler',
            ),
        ),
        Bad(
            'trainer-model-without-residual-branches',
            trainer_without_layers,
            ValueError,
            (
                r'ProRes found no residual branch in ComposerClassifier',
                r"layer_class='YourBlock'",
                r"branches=\['attn.out_proj', 'mlp.down_proj'\]",
                r'register_policy',
            ),
            model_untouched,
        ),
        Bad(
            'build-truncated-shard',
            lambda c: build(f'data.path={truncate_shard(c)}', data=True)(c),
            ValueError,
            (r'shard .*shard\.00000\.mds.* has \d+ bytes but its index\.json lists \d+', r'truncated', r'--overwrite'),
        ),
    ]


def _data():
    out = no_dataset('out')
    return [
        # --- prores-data CLI (exits 2 with the message on stderr) -----------------------------------------
        Bad(
            'cli-missing-source',
            cli('--source', '{tmp}/missing', '--out', '{tmp}/out'),
            SystemExit,
            (r"`source` '.*missing' does not exist", r"Accepted: 'stdlib'"),
            out,
        ),
        Bad(
            'cli-empty-corpus',
            then(
                lambda c: (c.tmp / 'empty').mkdir(),
                write('empty/a.txt', ' \n'),
                cli('--source', '{tmp}/empty', '--out', '{tmp}/out'),
            ),
            SystemExit,
            (r'empty corpus: `source`', r'yielded no text', r'Accepted:'),
            out,
        ),
        Bad(
            'cli-seq-len-larger-than-data',
            then(
                write('small.txt', 'tiny corpus ' * 10),
                cli('--source', '{tmp}/small.txt', '--out', '{tmp}/out', '--seq_len', '4096', '--val_fraction', '0'),
            ),
            SystemExit,
            (r"split 'train' got 0 samples", r'Lower `seq_len`', r'raise `max_tokens`'),
            out,
        ),
        Bad(
            'cli-seq-len-not-int',
            cli('--out', '{tmp}/out', '--seq_len', 'abc'),
            SystemExit,
            (r'argument --seq_len: invalid int value', r"'abc'"),
            out,
        ),
        Bad(
            'cli-seq-len-too-small',
            cli('--out', '{tmp}/out', '--seq_len', '1'),
            SystemExit,
            (r'`seq_len` must be an int >= 2',),
            out,
        ),
        Bad(
            'cli-val-fraction',
            cli('--out', '{tmp}/out', '--val_fraction', '1'),
            SystemExit,
            (r'`val_fraction` must be in \[0, 1\)', r'0 writes no val split'),
            out,
        ),
        Bad(
            'cli-negative-max-tokens',
            cli('--out', '{tmp}/out', '--max_tokens', '-5'),
            SystemExit,
            (r'`max_tokens` must be a positive int or None', r'got -5'),
            out,
        ),
        Bad(
            'cli-unknown-compression',
            cli('--out', '{tmp}/out', '--compression', 'lzma9000'),
            SystemExit,
            (r"`compression` 'lzma9000' is not supported", r"'zstd'"),
            out,
        ),
        Bad(
            'cli-unsupported-suffix',
            then(write('x.csv', 'a,b\n'), cli('--source', '{tmp}/x.csv', '--out', '{tmp}/out')),
            SystemExit,
            (r'unsupported suffix', r"'\.csv'", r'\.txt'),
            out,
        ),
        # writing to s3:// works (tests/data/test_object_store.py); without a reachable store the error names the URL
        Bad(
            'cli-out-is-a-url',
            cli('--out', 's3://bucket/ds'),
            SystemExit,
            (r'cannot write the dataset to s3://bucket/ds', r'credentials|cannot be reached|does not exist'),
        ),
        Bad(
            'cli-out-holds-a-dataset',
            lambda c: cli('--out', str(c.data_copy()), '--max_tokens', '100')(c),
            SystemExit,
            (r'`out_dir` .* already holds a dataset', r'--overwrite'),
            lambda c: loader(lambda c: c.tmp / 'copy', seq_len=32)(c),
        ),  # the old one still loads
        # --- the loader: damaged or mismatched datasets --------------------------------------------------
        Bad(
            'loader-truncated-shard',
            loader(truncate_shard),
            ValueError,
            (
                r'shard .*train/shard\.00000\.mds.* has \d+ bytes but its index\.json lists \d+',
                r'truncated',
                r'prores-data --out .* --overwrite',
            ),
        ),
        Bad(
            'loader-missing-shard',
            loader(
                lambda c: then(
                    lambda c: c.data_copy(),
                    lambda c: (c.tmp / 'copy/val/shard.00000.mds').unlink(),
                    lambda c: c.tmp / 'copy',
                )(c),
                split='val',
            ),
            ValueError,
            (r"shard 'shard\.00000\.mds' listed in .* is missing", r'rebuild it'),
        ),
        Bad(
            'loader-damaged-index',
            loader(
                lambda c: then(
                    lambda c: c.data_copy(),
                    lambda c: (c.tmp / 'copy/train/index.json').write_text('{"shar'),
                    lambda c: c.tmp / 'copy',
                )(c)
            ),
            ValueError,
            (r'index\.json.* is not a valid MDS index', r'rebuild it'),
        ),
        Bad(
            'loader-seq-len-mismatch',
            loader(lambda c: c.data, seq_len=16),
            ValueError,
            (r'`seq_len` 16 does not match', r'set seq_len to 32'),
        ),
        Bad(
            'loader-vocab-too-small',
            loader(lambda c: c.data, vocab_size=100),
            ValueError,
            (r"model's `vocab_size` 100", r'Set vocab_size >= 257'),
        ),
        Bad(
            'loader-unknown-split',
            loader(lambda c: c.data, split='test'),
            FileNotFoundError,
            (r"split 'test' not found", r"splits present: \['train', 'val'\]"),
        ),
        Bad(
            'loader-missing-folder',
            loader(lambda c: c.tmp / 'nothing'),
            FileNotFoundError,
            (r"data path '.*nothing' is not a folder", r'prores-data --out'),
        ),
    ]


def _deepspeed():
    from prores_algo.integrations.deepspeed import check_deepspeed_config, lr_lambda_from

    return [
        Bad(
            'ds-micro-batch-conflict',
            lambda c: check_deepspeed_config(ds_json(), train_micro_batch_size_per_gpu=3),
            ValueError,
            (
                r'`train_micro_batch_size_per_gpu` = 2 but the training config asks for 3',
                r'set "train_micro_batch_size_per_gpu": 3',
            ),
        ),
        Bad(
            'ds-batch-product-conflict',
            lambda c: check_deepspeed_config(ds_json(train_batch_size=6), world_size=2),
            ValueError,
            (r'`train_batch_size` = 6', r'set "train_batch_size": 8'),
        ),
        Bad(
            'ds-stage3-required',
            lambda c: check_deepspeed_config(ds_json(zero_optimization={'stage': 2}), require_stage3=True),
            ValueError,
            (r'`zero_optimization\.stage` = 2', r'"stage": 3'),
        ),
        Bad(
            'ds-lr-schedule-unknown',
            lambda c: lr_lambda_from('nope', max_steps=10),
            ValueError,
            (r"unknown LR schedule 'nope'", r"'wsd'"),
        ),
        Bad(
            'ds-train-scheduler-in-json',
            ds_train({'deepspeed_config': ds_json(scheduler={'type': 'WarmupLR'})}),
            ValueError,
            (r'DeepSpeed config `scheduler` is set', r'remove "scheduler" from the JSON'),
            no_process_group,
        ),
        Bad(
            'ds-train-lr-conflict',
            ds_train({'deepspeed_config': ds_json(optimizer={'type': 'AdamW', 'params': {'lr': 1e-3}}), 'lr': 2e-3}),
            ValueError,
            (r'`optimizer\.params\.lr` = 0\.001 but lr = 0\.002', r'set one of them'),
            no_process_group,
        ),
        Bad(
            'ds-train-unknown-option',
            ds_train({'deepspeed_config': str(ZERO3_JSON), 'n_layer': 3}),
            ValueError,
            (r"unknown ds_train option\(s\) \['n_layer'\]", r"'n_layers'"),
            no_process_group,
        ),
    ]


def _resume():
    return [
        Bad(
            'resume-composer-other-t_warmup',
            composer_resume(
                'algorithms.prores.t_warmup=8ba',
                'load_path={ckpt}/ep0-ba2-rank0.pt',
                'save_folder={tmp}/new_ckpt',
                'save_interval=1ba',
            ),
            ValueError,
            (
                r'cannot resume from this checkpoint: it was trained with a different ProRes configuration',
                r"t_warmup: checkpoint '4ba' vs now '8ba'",
                r'Resume with the same ProRes settings',
                r'load_weights_only=True',
            ),
            resume_refused_and_weights_only_works,
        ),
        Bad(
            'resume-composer-autoresume-other-schedule',
            lambda c: composer_resume(
                'algorithms.prores.schedule=equal',
                'autoresume=true',
                'run_name=ckpt-run',
                f'save_folder={autoresume_copy(c)}',
                'save_interval=1ba',
            )(c),
            ValueError,
            (r"schedule: checkpoint 'linear' vs now 'equal'", r'Resume with the same ProRes settings'),
            autoresume_folder_unchanged,
        ),
        Bad(
            'resume-deepspeed-other-t_warmup',
            then(
                fake_ds_checkpoint,
                ds_train(
                    {
                        'deepspeed_config': str(ZERO3_JSON),
                        'n_layers': 4,
                        'd_model': 32,
                        'seq_len': 16,
                        'vocab': 64,
                        'steps': 8,
                        't_warmup': 16,
                        'load_dir': '{tmp}/ds_ckpt',
                    }
                ),
            ),
            ValueError,
            (
                r'different ProRes configuration',
                r"differs in \['t_warmup'\]",
                r't_warmup=8\.0',
                r't_warmup=16\.0',
                r"Resume with the checkpoint's ProRes settings",
            ),
            no_process_group,
        ),
    ]


CASES = _api() + _yaml() + _data() + _deepspeed() + _resume()


def test_matrix_size_and_ids():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 30


@pytest.mark.parametrize('case', CASES, ids=lambda c: c.id)
def test_bad_input(case, tmp_path, request, capsys, monkeypatch):
    for k in DIST_ENV:  # the DeepSpeed rows must see a single, not-yet-launched process
        monkeypatch.delenv(k, raising=False)
    ctx = Ctx(tmp=tmp_path, request=request)
    with pytest.raises(case.exc) as info:
        case.fn(ctx)
    if isinstance(info.value, SystemExit):
        assert info.value.code == 2
        msg = capsys.readouterr().err
    else:
        msg = str(info.value)
    for pattern in case.must:
        assert re.search(pattern, msg), f'{case.id}: {pattern!r} not in message:\n{msg}'
    if case.after is not None:
        case.after(ctx)
    trainer = ctx.state.get('trainer')
    if trainer is not None:
        trainer.close()


# ----------------------------------------------------------------------------------------------- safe loading


def test_yaml_python_tags_are_rejected_and_run_nothing(tmp_path):
    """OmegaConf's loader is a safe loader: python object tags are an error, in files and in overrides."""
    marker = tmp_path / 'pwned'
    evil = tmp_path / 'evil.yaml'
    evil.write_text(QS.read_text() + f'\npayload: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError, match='not valid YAML') as info:
        load_config(evil)
    assert 'python/object/apply' in str(info.value)
    for text in (
        f'!!python/object/apply:os.system ["touch {marker}"]',
        f'!!python/object/new:subprocess.Popen [["touch", "{marker}"]]',
    ):
        evil.write_text(f'run_name: {text}\n')
        with pytest.raises(ConfigError):
            load_config(evil)
        with pytest.raises(ConfigError, match=r"override 'run_name=!!python/object.*cannot be applied"):
            load_config(QS, [f'run_name={text}'])
    assert not marker.exists()


@pytest.mark.parametrize(
    'section,name',
    [
        ('algorithms', 'os.system'),
        ('algorithms', 'composer.algorithms.GradientClipping'),
        ('callbacks', 'builtins.eval'),
        ('loggers', 'prores_algo.training.composer_train.main'),
    ],
)
def test_names_are_never_imported_from_strings(section, name, tmp_path):
    from prores_algo.training.composer_train import build_trainer

    raw = load_config(QS, [f'data.path={tmp_path}/d']).model_dump()
    raw[section] = {name: {}}
    with pytest.raises(ConfigError, match=rf"{section}: unknown name '{re.escape(name)}'.*available: \["):
        build_trainer(load_config(data=raw))
    assert not (tmp_path / 'd').exists()


def test_scheduler_name_is_not_imported(tmp_path):
    from prores_algo.training.composer_train import build_trainer

    raw = load_config(QS, [f'data.path={tmp_path}/d']).model_dump()
    raw['scheduler'] = {'name': 'torch.optim.lr_scheduler.StepLR'}
    with pytest.raises(ConfigError, match=r"unknown scheduler 'torch\.optim\.lr_scheduler\.StepLR'; available"):
        build_trainer(load_config(data=raw))


def _calls(tree):
    import ast

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else (f.id if isinstance(f, ast.Name) else '')
            base = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ''
            yield node, base, name


def test_package_source_has_no_unsafe_loading():
    """Over every module of prores_algo: torch.load only with weights_only=True; no pickle loading, no
    unsafe yaml loaders, no eval/exec, no import of a name that comes from configuration."""
    import ast

    pkg = Path(prores_algo.__file__).parent
    files = sorted(pkg.rglob('*.py'))
    assert len(files) > 10
    problems = []
    for path in files:
        rel = path.relative_to(pkg).as_posix()
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, base, name in _calls(tree):
            where = f'{rel}:{node.lineno}'
            if name == 'load' and base == 'torch':
                kw = {k.arg: k.value for k in node.keywords}
                ok = (
                    'weights_only' in kw
                    and isinstance(kw['weights_only'], ast.Constant)
                    and kw['weights_only'].value is True
                )
                if not ok:
                    problems.append(f'{where}: torch.load without weights_only=True')
            elif base in ('pickle', 'dill', 'cloudpickle', 'marshal') and name in ('load', 'loads'):
                problems.append(f'{where}: {base}.{name}')
            elif base == 'yaml' and name in ('load', 'unsafe_load', 'full_load', 'load_all', 'unsafe_load_all'):
                problems.append(f'{where}: yaml.{name} (use yaml.safe_load / OmegaConf)')
            elif base == '' and name in ('eval', 'exec', '__import__'):
                problems.append(f'{where}: {name}()')
            elif name == 'import_module':
                # allowed only with a module name taken from a fixed table in the package itself
                if rel != '__init__.py':
                    problems.append(f'{where}: import_module outside the lazy-import table')
            elif name == 'instantiate' or name == 'locate':
                problems.append(f'{where}: {name}() builds objects from strings')
        if "'_target_'" in path.read_text() or '"_target_"' in path.read_text():
            problems.append(f'{rel}: _target_ (hydra-style instantiation)')
    assert not problems, '\n'.join(problems)
    # The lazy table maps fixed attribute names to fixed modules of this package only.
    assert all(v.startswith('prores_algo.') for v in prores_algo._LAZY.values())


def test_what_we_load_ourselves_is_data_not_code(tmp_path, monkeypatch, bad_inputs_dataset):
    """Everything prores_algo reads by itself (configs, dataset metadata and indexes, the DeepSpeed ProRes
    sidecar) is YAML/JSON parsed as data; torch.load is never called by it, and a pickle planted where
    JSON is expected is an error, not code that runs."""
    import pickle

    from prores_algo.integrations.deepspeed import SIDECAR_FILE, check_checkpoint
    from prores_algo.training.data import build_dataloader, read_metadata

    calls = []
    real_load = torch.load

    def spy(*a, **k):
        calls.append(k.get('weights_only'))
        return real_load(*a, **k)

    monkeypatch.setattr(torch, 'load', spy)
    marker = tmp_path / 'pwned'

    class Evil:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))

    payload = pickle.dumps(Evil())
    # a dataset whose metadata and index are pickles
    ds = tmp_path / 'ds'
    shutil.copytree(bad_inputs_dataset, ds)
    (ds / 'prores_data.json').write_bytes(payload)
    assert read_metadata(ds) is None
    (ds / 'train' / 'index.json').write_bytes(payload)
    with pytest.raises(ValueError, match='not a valid MDS index'):
        build_dataloader(str(ds), 'train', 2)
    # a DeepSpeed checkpoint whose ProRes sidecar is a pickle
    tag = tmp_path / 'ck' / 'step1'
    tag.mkdir(parents=True)
    (tag / SIDECAR_FILE).write_bytes(payload)
    with pytest.raises(ValueError):
        check_checkpoint(str(tmp_path / 'ck'), None, 'step1')
    # a config file that is a pickle
    (tmp_path / 'cfg.yaml').write_bytes(payload)
    with pytest.raises(ConfigError):
        load_config(tmp_path / 'cfg.yaml')
    # and the regular paths: load a real dataset and config
    build_dataloader(str(bad_inputs_dataset), 'train', 2, seq_len=32)
    load_config(QS)
    assert calls == [] and not marker.exists()
