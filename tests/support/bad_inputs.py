"""What the bad-input matrix shares (tests/test_bad_inputs_*.py, one file per front end): the row type
`Bad`, the context a row runs in, the session fixtures (a small stdlib dataset, a 2-batch Composer
checkpoint; registered for every test module by tests/conftest.py), the helpers rows call, and
`run_case`, which checks a row.

Every row asserts the exception type, that the message names the field and says how to fix it (the
accepted values, an example, or the option to use), and, where a side effect is possible, that none is
left: the model is untouched, no dataset folder appears (or the old one still loads), no checkpoint is
written, registries are unchanged, no process group was created.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from prores_algo import alpha_schedules, apply_prores
from prores_algo.policies import LAYER_POLICIES
from prores_algo.surgery import ALPHA_BUFFER
from prores_algo.training.config import load_config
from prores_algo.training.models.decoder import Decoder, DecoderConfig
from tests.support.helpers import DIST_ENV

ROOT = Path(__file__).resolve().parents[2]


QS = ROOT / 'yamls' / 'quickstart.yaml'


ZERO3_JSON = ROOT / 'yamls' / 'deepspeed' / 'zero3.json'


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
    after: Callable[[Ctx], None] | None = None


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


def assert_hooks(model, n):
    from prores_algo.surgery import has_prores_hook

    assert sum(has_prores_hook(m) for m in model.modules()) == n, 'the failed second apply added hooks'


def then_set_back():
    ctrl = apply_prores(tiny(), t_warmup=10)
    ctrl.set_step(10)  # done: hooks removed
    ctrl.set_step(3)


def run_case(case, tmp_path, request, capsys, monkeypatch) -> None:
    """One row: the exception type, every pattern in its message, then the row's side-effect checks."""
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
