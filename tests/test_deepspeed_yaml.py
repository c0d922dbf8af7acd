"""The same YAMLs train through DeepSpeed ZeRO-3: `torchrun -m prores_algo.training.deepspeed.loop --config YAML`."""

import json

import pytest

from prores_algo import alpha_schedules
from prores_algo.training.deepspeed.loop import train
from prores_algo.training.deepspeed.settings import from_yaml, resolve
from tests.integrations.test_deepspeed import ROOT, ZERO3_JSON, _launch, _ok

QS = ROOT / 'yamls' / 'quickstart.yaml'
SMALL = [
    'model.n_layers=3',
    'model.d_model=32',
    'model.n_heads=4',
    'model.max_seq_len=32',
    'data.seq_len=32',
    'data.max_tokens=500000',
    'data.val_fraction=0.1',
    'max_duration=6ba',
    'global_train_batch_size=8',
    'eval_interval=6ba',
    'algorithms.prores.t_warmup=4ba',
]


def test_yaml_maps_onto_the_deepspeed_loop(tmp_path):
    plan = resolve(from_yaml(str(QS), [f'data.path={tmp_path}/d', *SMALL])[0])
    assert (plan.model.n_layers, plan.model.d_model, plan.model.vocab_size, plan.seq_len) == (3, 32, 257, 32)
    assert (plan.steps, plan.t_warmup, plan.prores.schedule, plan.optimizer.lr) == (6, 4, 'linear', 3e-3)
    assert plan.lr_schedule == {'name': 'wsd', 'lr_warmup': '0.05dur', 'lr_decay': '0.2dur'}
    assert plan.global_train_batch_size == 8 and plan.data == f'{tmp_path}/d'


@pytest.mark.slow
def test_yaml_trains_under_two_process_zero3(tmp_path):
    out = tmp_path / 'summary_{rank}.json'
    proc = _launch(
        2,
        [
            '--config',
            str(QS),
            '--deepspeed_config',
            str(ZERO3_JSON),
            '--require_stage3',
            '--summary',
            str(out),
            f'data.path={tmp_path}/d',
            *SMALL,
        ],
    )
    _ok(proc)
    ranks = [json.loads((tmp_path / f'summary_{r}.json').read_text()) for r in (0, 1)]
    assert ranks[0]['alphas'] == ranks[1]['alphas']
    for t, alphas in zip(ranks[0]['steps'], ranks[0]['alphas'], strict=True):
        assert alphas == pytest.approx(alpha_schedules.alphas('linear', 3, t, 4))
    assert ranks[0]['losses'][-1] < ranks[0]['losses'][0]
    assert ranks[0]['final_eval_loss'] is not None


@pytest.fixture
def no_dist_env(monkeypatch):
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(k, raising=False)


def test_yaml_batch_conflicting_with_deepspeed_json_is_an_error(tmp_path, no_dist_env):
    config, options = from_yaml(
        str(QS),
        [f'data.path={tmp_path}/d', *SMALL, 'global_train_batch_size=16'],
        {'deepspeed_config': str(ZERO3_JSON)},
    )
    with pytest.raises(ValueError, match=r'global_train_batch_size=16 conflicts with the DeepSpeed config'):
        train(config, options)
    assert not (tmp_path / 'd').exists()


@pytest.mark.parametrize(
    'override,match',
    [
        ('model={name: hf_causal_lm, model_type: llama}', 'reference decoder'),
        ('algorithms.low_precision_layernorm={}', 'Composer algorithms'),
        ('max_duration=2ep', 'counts optimizer steps'),
    ],
)
def test_yaml_settings_the_deepspeed_loop_cannot_honour(override, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        resolve(from_yaml(str(QS), [f'data.path={tmp_path}/d', *SMALL, override])[0])
