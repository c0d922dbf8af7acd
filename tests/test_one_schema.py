"""One YAML, two entries: `prores-train` (Composer) and `prores_algo.training.deepspeed.loop` (DeepSpeed) resolve the same
settings from it, and reject a bad key with the same message. In-process, no training, no data built.

The Composer side is what `prores_algo.training.composer_train` builds (the model, the optimizer, the LR scheduler, the
ProRes algorithm, the dataset arguments); the DeepSpeed side is what `ds_train.main` passes to its loop,
resolved to optimizer steps by `ds_settings.resolve`. Compared field by field.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

from prores_algo import alpha_schedules
from prores_algo.integrations.deepspeed import lr_lambda_from
from prores_algo.training import composer_train as composer_entry
from prores_algo.training.config import load_config
from prores_algo.training.deepspeed import loop as ds_train
from prores_algo.training.deepspeed.settings import from_flat, resolve

ROOT = Path(__file__).resolve().parents[1]

SMALL_YAML = """\
run_name: one-schema
seed: 5
model: {name: reference, vocab_size: 257, d_model: 32, n_layers: 3, n_heads: 4, norm: post}
tokenizer: byte
data: {source: stdlib, path: DATA, seq_len: 32, max_tokens: 50000, val_fraction: 0.1}
global_train_batch_size: 8
optimizer: {name: adamw, lr: 2.0e-3, betas: [0.9, 0.98], eps: 1.0e-8, weight_decay: 0.05}
scheduler: {name: wsd, lr_warmup: 4ba, lr_decay: 0.25dur, alpha_f: 0.1}
algorithms:
  prores: {schedule: linear_square, t_warmup: 12ba, lr_warmup_delay: 2ba}
max_duration: 40ba
eval_interval: 10ba
save_interval: 20ba
"""


@pytest.fixture(params=['written', 'quickstart'])
def yaml_path(request, tmp_path) -> str:
    if request.param == 'quickstart':
        return str(ROOT / 'yamls' / 'quickstart.yaml')
    path = tmp_path / 'small.yaml'
    path.write_text(SMALL_YAML.replace('DATA', str(tmp_path / 'data')))
    return str(path)


def _ds_entry(monkeypatch, argv: list[str]):
    """(TrainConfig, DSOptions) that `python -m prores_algo.training.deepspeed.loop argv` hands to its loop."""
    seen = {}

    def fake_train(config, options):
        seen.update(config=config, options=options)
        return {'rank': 1, 'final_eval_loss': None}

    monkeypatch.setattr(ds_train, 'train', fake_train)
    assert ds_train.main(argv) == 0
    return seen['config'], seen['options']


def _composer_side(cfg, monkeypatch) -> SimpleNamespace:
    """What prores-train builds from `cfg` (no Trainer, no data: ensure_dataset is recorded, not run)."""
    build = {}
    monkeypatch.setattr('prores_algo.training.data.ensure_dataset', lambda **kw: build.update(kw))
    composer_entry._prepare_data(cfg)
    build.pop('progress')
    model = composer_entry.build_model(cfg)
    algorithms = composer_entry._build_named('algorithms', composer_entry._algorithms(), cfg.algorithms)
    (prores,) = [a for a in algorithms if type(a).__name__ == 'ProRes']
    return SimpleNamespace(
        model=model.model.config,
        optimizer=composer_entry._build_optimizer(cfg, model),
        scheduler=composer_entry._build_scheduler(cfg),
        prores=prores,
        data_build=build,
    )


def _steps_of(time, max_steps: int):
    """A Composer time in batches, a 'dur' fraction resolved as Composer's schedulers do (floored)."""
    from composer.core import Time, TimeUnit

    time = Time.from_timestring(time) if isinstance(time, str) else time
    if time.unit == TimeUnit.DURATION:
        return int(time.value * max_steps)
    assert time.unit == TimeUnit.BATCH, time
    return time.value


def test_one_yaml_gives_the_same_settings_to_both_entries(yaml_path, monkeypatch):
    from composer.core import Time, Timestamp, TimeUnit

    overrides = ['algorithms.prores.log_interval=1']
    cfg = load_config(yaml_path, overrides)  # what prores-train reads
    c = _composer_side(cfg, monkeypatch)
    config, options = _ds_entry(monkeypatch, ['--config', yaml_path, *overrides])
    assert config == cfg  # the DeepSpeed entry reads the same TrainConfig ...
    plan = resolve(config)  # ... and runs it in optimizer steps

    # model, run length, seed, data, batch
    assert plan.model == c.model  # every DecoderConfig field, deepnet_init and max_seq_len included
    steps = Time.from_timestring(cfg.max_duration).value
    assert plan.steps == steps and plan.seed == cfg.seed
    assert (plan.data, plan.local_cache, plan.seq_len) == (cfg.data.path, cfg.data.local_cache, cfg.data.seq_len)
    assert plan.data_build == c.data_build and c.data_build['out_dir'] == cfg.data.path
    assert plan.global_train_batch_size == cfg.global_train_batch_size

    # optimizer: the peak LR, betas, eps and the weight decay of each parameter group
    groups = c.optimizer.param_groups
    assert (plan.optimizer.lr, plan.optimizer.betas, plan.optimizer.eps) == (
        groups[0]['lr'],
        groups[0]['betas'],
        groups[0]['eps'],
    )
    assert [g['weight_decay'] for g in groups] == [plan.optimizer.weight_decay, 0.0]

    # LR schedule: warmup / decay lengths, final multiplier, and the multiplier at every step
    s = c.scheduler
    assert type(s).__name__ == 'WSDScheduler' and plan.lr_schedule['name'] == 'wsd'
    assert _steps_of(s.lr_warmup, steps) == _steps_of(plan.lr_schedule['lr_warmup'], steps)
    assert _steps_of(s.lr_decay, steps) == _steps_of(plan.lr_schedule['lr_decay'], steps)
    assert s.alpha_f == plan.lr_schedule.get('alpha_f', 0.0)
    ds_lr = lr_lambda_from(plan.lr_schedule, max_steps=plan.steps)
    for t in range(steps + 1):
        state = SimpleNamespace(max_duration=Time(steps, 'ba'), timestamp=Timestamp(batch=t), dataloader_len=None)
        assert s(state) == ds_lr(t), t

    # ProRes: on, its schedule, W (Composer's ProRes takes a 'dur' W unrounded) and the LR warmup delay
    p = c.prores
    assert plan.prores.enabled and alpha_schedules.canonical_name(plan.prores.schedule) == p.schedule
    w = p.t_warmup.value * steps if p.t_warmup.unit == TimeUnit.DURATION else _steps_of(p.t_warmup, steps)
    assert plan.t_warmup == pytest.approx(w, abs=1e-9)
    assert plan.lr_warmup_delay == _steps_of(p.lr_warmup_delay, steps)


@pytest.mark.parametrize(
    'override',
    ['optimizer.lrr=1e-3', 'max_duraton=5ba', 'model={name: gpt}', 'data.seq_len=many', 'global_train_batch_size=0'],
)
def test_a_bad_key_gets_the_same_message_from_both_entries(override, monkeypatch, capsys):
    qs = str(ROOT / 'yamls' / 'quickstart.yaml')
    monkeypatch.setattr(ds_train, 'train', lambda *a: pytest.fail('the DeepSpeed loop started'))
    assert composer_entry.main([qs, override]) == 2
    composer_msg = capsys.readouterr().err
    assert ds_train.main(['--config', qs, override]) == 2
    assert capsys.readouterr().err == composer_msg
    assert composer_msg.startswith(f'config error: {qs}: ')


def test_the_flat_options_are_the_same_schema():
    """`--n_layers 3 --steps 40 ...` and the YAML saying the same resolve to the same run."""
    flat, _ = from_flat(
        {
            'n_layers': 3,
            'd_model': 32,
            'n_heads': 4,
            'seq_len': 32,
            'vocab_size': 257,
            'norm': 'post',
            'steps': 40,
            'lr': 2e-3,
            'betas': (0.9, 0.98),
            'weight_decay': 0.05,
            'lr_warmup': '4ba',
            'lr_decay': '0.25dur',
            'alpha_f': 0.1,
            'schedule': 'linear_square',
            't_warmup': 12,
            'lr_warmup_delay': 2,
            'seed': 5,
            'eval_every': 10,
            'save_interval': 20,
        }
    )
    yaml = load_config(
        data={
            'seed': 5,
            'model': {
                'name': 'reference',
                'vocab_size': 257,
                'd_model': 32,
                'n_layers': 3,
                'n_heads': 4,
                'norm': 'post',
                'max_seq_len': 32,
            },
            'data': {'seq_len': 32, 'source': None},
            'optimizer': {'lr': 2e-3, 'betas': [0.9, 0.98], 'weight_decay': 0.05},
            'scheduler': {'name': 'wsd', 'lr_warmup': '4ba', 'lr_decay': '0.25dur', 'alpha_f': 0.1},
            'algorithms': {'prores': {'schedule': 'linear_square', 't_warmup': '12ba', 'lr_warmup_delay': '2ba'}},
            'max_duration': '40ba',
            'eval_interval': '10ba',
            'save_interval': '20ba',
        }
    )
    a, b = resolve(flat), resolve(yaml)
    assert (a.prores.enabled, a.prores.schedule) == (b.prores.enabled, b.prores.schedule)
    assert dataclasses.replace(a, prores=b.prores) == b  # the times as written differ (12 vs '12ba'), not in steps
