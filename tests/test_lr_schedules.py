"""One table of LR schedules: every name gives the same multiplier at every step under prores-train (a
Composer scheduler evaluated on a real Composer `State`) and under prores-ds-train / plain PyTorch (the
step function of `lr_lambda_from`), both built from the same YAML."""

import pytest
import torch
from composer.core import State, Timestamp
from composer.devices import DeviceCPU

from prores_algo.lr_schedules import LR_ALIASES, LR_SCHEDULES, lr_lambda_from
from prores_algo.training import composer_train
from prores_algo.training.config import ConfigError, load_config
from prores_algo.training.deepspeed.settings import resolve

STEPS = 60
# every parameter of every schedule set away from its default, so a parameter dropped on one side shows
PARAMS = {
    'wsd': {'lr_warmup': '7ba', 'lr_decay': '0.2dur', 'alpha_f': 0.1},
    'constant': {'alpha': 0.5},
    'constant_with_warmup': {'lr_warmup': '0.1dur', 'alpha': 0.8},
    'linear': {'alpha_i': 0.9, 'alpha_f': 0.2},
    'linear_with_warmup': {'lr_warmup': '5ba', 'alpha_i': 0.9, 'alpha_f': 0.05},
    'cosine': {'alpha_f': 0.1},
    'cosine_with_warmup': {'lr_warmup': '9ba', 'alpha_f': 0.1},
    'polynomial_with_warmup': {'lr_warmup': '6ba', 'power': 1.5, 'alpha_f': 0.05},
}


def _config(name, params):
    return load_config(
        data={
            'model': {'name': 'reference', 'vocab_size': 257, 'd_model': 16, 'n_layers': 2, 'n_heads': 2},
            'data': {'path': 'unused', 'seq_len': 16},
            'optimizer': {'name': 'adamw', 'lr': 1e-3},
            'scheduler': {'name': name, **params},
            'max_duration': f'{STEPS}ba',
        }
    )


def _state():
    return State(
        model=torch.nn.Linear(1, 1), rank_zero_seed=0, run_name='lr', device=DeviceCPU(), max_duration=f'{STEPS}ba'
    )


def test_every_schedule_has_its_parameters_here():
    assert set(PARAMS) == set(LR_SCHEDULES)
    for name, params in PARAMS.items():
        assert set(params) == set(LR_SCHEDULES[name].params), name


@pytest.mark.parametrize('name', [*sorted(LR_SCHEDULES), *sorted(LR_ALIASES)])
def test_both_entries_give_the_same_lr_at_every_step(name):
    canonical = LR_ALIASES.get(name, name)
    cfg = _config(name, PARAMS[canonical])
    composer_scheduler = composer_train._build_scheduler(cfg)
    assert type(composer_scheduler).__name__ == LR_SCHEDULES[canonical].composer
    step_function = lr_lambda_from(resolve(cfg).lr_schedule, max_steps=STEPS)
    state = _state()
    composer_lr, loop_lr = [], []
    for t in range(STEPS + 1):
        state.timestamp = Timestamp(batch=t)
        composer_lr.append(composer_scheduler(state))
        loop_lr.append(step_function(t))
    assert loop_lr == pytest.approx(composer_lr, rel=1e-12, abs=1e-12)
    assert len(set(round(x, 9) for x in loop_lr)) > 1 or canonical == 'constant'  # not a flat line by accident


def test_unknown_names_and_keys_are_refused_alike_by_both_entries():
    cases = [
        ('cosine_with_warmpu', {'lr_warmup': '5ba'}, "did you mean 'cosine_with_warmup'"),
        ('cosine_with_warmup', {'t_warmup': '5ba'}, 'the LR warmup is `lr_warmup`'),
        ('wsd', {'lr_wramup': '5ba'}, "unknown key 'lr_wramup' (did you mean 'lr_warmup'?)"),
        ('linear_with_warmup', {}, 'missing lr_warmup'),
        ('cosine', {'alpha_f': 'low'}, 'alpha_f must be a finite number'),
    ]
    for name, params, message in cases:
        cfg = _config(name, params)
        errors = []
        for build in (
            composer_train._build_scheduler,
            lambda c: lr_lambda_from(resolve(c).lr_schedule, max_steps=STEPS),
        ):
            with pytest.raises((ConfigError, ValueError)) as info:
                build(cfg)
            errors.append(str(info.value))
        assert all(message in e for e in errors), errors
