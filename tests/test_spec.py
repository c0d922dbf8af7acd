"""The one ProRes specification and the one time parser that every front end uses."""

import math

import pytest
import torch
from torch import nn

from prores_algo import alpha_schedules
from prores_algo.integrations.composer.time import parse_time
from prores_algo.spec import ProResSpec, alpha_metrics, check_resume
from prores_algo.timing import to_steps


class Block(nn.Module):
    prores_branches = ('attn', 'mlp')

    def __init__(self):
        super().__init__()
        self.attn, self.mlp = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return x + self.attn(x) + self.mlp(x)


def model(n=3):
    return nn.Sequential(*[Block() for _ in range(n)])


# --- time -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    'value,max_steps,steps',
    [
        (24000, None, 24000.0),
        (2.5, None, 2.5),
        ('200', None, 200.0),
        ('1e3', None, 1000.0),
        ('24000ba', None, 24000.0),
        ('2.5ba', None, 2.5),
        ('1e3ba', None, 1000.0),
        ('0.1dur', 500, 50.0),
        ('0.25dur', 10, 2.5),
    ],
)
def test_to_steps_reads_every_spelling_of_optimizer_steps(value, max_steps, steps):
    assert to_steps(value, 'f', max_steps) == steps


@pytest.mark.parametrize(
    'value,match',
    [
        ('5e8tok', r'f=\'5e8tok\': this loop counts optimizer steps.*not "tok"'),
        ('2ep', r'counts optimizer steps.*not "ep"'),
        ('0.1dur', r"f='0\.1dur' is a fraction of the run, whose length .* is not known"),
        ('soon', r"f='soon' is not a Time string.*e\.g\. \"24000ba\""),
        (True, r'f must be a number of optimizer steps'),
        (math.inf, r'f must be a finite number'),
        ([3], r'f must be an int \(batches\) or a Time string'),
    ],
)
def test_to_steps_names_the_field_and_the_fix(value, match):
    with pytest.raises(ValueError, match=match):
        to_steps(value, 'f')


def test_parse_time_is_composers_time():
    from composer.core import Time, TimeUnit

    assert parse_time('0.1dur', 'f') == Time(0.1, TimeUnit.DURATION)
    assert parse_time(7, 'f') == Time(7, TimeUnit.BATCH)
    t = Time(5, TimeUnit.TOKEN)
    assert parse_time(t, 'f') is t


def test_every_front_end_refuses_tokens_for_an_optimizer_step_clock_with_the_same_message():
    from prores_algo.integrations.deepspeed import lr_lambda_from
    from prores_algo.integrations.hf import ProResCallback
    from prores_algo.monitor import MonitorBase

    errors = []
    for make in (
        lambda: ProResCallback(t_warmup='5e8tok'),
        lambda: lr_lambda_from('wsd', max_steps=100, lr_warmup='5e8tok'),
    ):
        with pytest.raises(ValueError) as info:
            make()
        errors.append(str(info.value))
    assert all('counts optimizer steps' in e and '"tok"' in e for e in errors), errors
    with pytest.raises(ValueError, match=r"log_interval must be a positive number of batches \(10 or '10ba'\)"):
        MonitorBase('5e8tok', True, False, False, 0, 7.0, None, None, None)


# --- the specification ----------------------------------------------------------------------------------
def test_spec_validates_and_canonicalises():
    assert ProResSpec('square').schedule == 'linear_square'  # the official code's name
    assert ProResSpec(branches=['attn', 'mlp']).branches == ('attn', 'mlp')
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        ProResSpec('cosine')
    with pytest.raises(ValueError, match=r"branches must be a non-empty list.*got the string 'attn'"):
        ProResSpec(branches='attn')
    with pytest.raises(ValueError, match=r'branches must be a non-empty list'):
        ProResSpec(branches=[])
    with pytest.raises(ValueError, match='either layer_class or layer_pattern, not both'):
        ProResSpec(layer_class='Block', layer_pattern='*')
    with pytest.raises(ValueError, match='remove_when_done must be true or false'):
        ProResSpec(remove_when_done='no')


@pytest.mark.parametrize(
    't_warmup,max_steps,expected',
    [
        (None, None, 3000.0),
        (120, None, 120.0),
        ('120ba', None, 120.0),
        (2.5, None, 2.5),
        ('0.5dur', 400, 200.0),
    ],
)
def test_warmup_steps(t_warmup, max_steps, expected):
    assert ProResSpec(t_warmup=t_warmup).warmup_steps(3, max_steps) == expected
    assert alpha_schedules.default_warmup(3) == 3000.0  # the paper's 1000 steps per layer


@pytest.mark.parametrize(
    't_warmup,max_steps,match',
    [
        (0, None, 't_warmup must be a positive number of optimizer steps'),
        ('-5ba', None, 't_warmup must be a positive number of optimizer steps'),
        ('1.5dur', 100, r'fraction of the run must be in \(0, 1\]'),
        ('0.5dur', None, 'needs the total number of steps'),
        ('5e8tok', 100, 'counts optimizer steps'),
    ],
)
def test_warmup_steps_errors(t_warmup, max_steps, match):
    with pytest.raises(ValueError, match=match):
        ProResSpec(t_warmup=t_warmup).warmup_steps(3, max_steps)


def test_attach_scales_the_branches_and_records_the_model():
    m = model()
    spec = ProResSpec('linear', layer_class='Block')
    c = spec.apply(m, 30.0)
    assert c.num_layers == 3 and c.model is m and c.warmup_steps == 30.0
    assert c.set_step(10) == alpha_schedules.alphas('linear', 3, 10, 30.0)
    scaled = c.scaled_branches()
    assert [(layer.index, name) for layer, name, _, _ in scaled] == [(i, b) for i in range(3) for b in ('attn', 'mlp')]
    assert all(alpha == c.alphas[layer.index] for layer, _, _, alpha in scaled)
    x = torch.randn(2, 4)
    block = m[1]
    a = c.alphas[1]
    torch.testing.assert_close(
        block(x),
        x
        + a
        * (
            nn.functional.linear(x, block.attn.weight, block.attn.bias)
            + nn.functional.linear(x, block.mlp.weight, block.mlp.bias)
        ),
    )
    c.remove()
    assert c.scaled_branches() == []


def test_alpha_metrics_names():
    assert alpha_metrics([0.25, 0.75]) == {
        'prores/alpha/layer_0': 0.25,
        'prores/alpha/layer_1': 0.75,
        'prores/alpha/mean': 0.5,
    }


def test_longer_than_run_warning():
    c = ProResSpec().apply(model(), 100.0)
    with pytest.warns(UserWarning, match=r't_warmup \(100 steps\) exceeds max_steps \(50 steps\)'):
        assert ProResSpec.warn_if_longer_than_run(c, 50, 'steps', 'max_steps')
    assert not ProResSpec.warn_if_longer_than_run(c, 100, 'steps', 'max_steps')
    assert not ProResSpec.warn_if_longer_than_run(c, None, 'steps', 'max_steps')


# --- the checkpoint record ------------------------------------------------------------------------------
def test_record_and_resume_check():
    spec = ProResSpec('linear', branches=['attn', 'mlp'], layer_class=Block)
    rec = spec.record(3, t_warmup=30.0, time_unit='steps')
    assert rec == {
        'enabled': True,
        'schedule': 'linear',
        'num_layers': 3,
        'layer_class': 'Block',
        'branches': ['attn', 'mlp'],
        'layer_pattern': None,
        't_warmup': 30.0,
        'time_unit': 'steps',
    }
    check_resume(rec, dict(rec), 'ckpt', 'hint')
    check_resume({**rec, 'schedule': 'square', 't_warmup': 30}, {**rec, 'schedule': 'linear_square'}, 'ckpt', 'hint')
    old = {'enabled': True, 'schedule': 'linear', 't_warmup': 30.0, 'num_layers': 3, 'time_unit': 'steps'}
    check_resume(old, rec, 'ckpt', 'hint')  # a record from an older version: its fields are compared
    with pytest.raises(ValueError) as info:
        check_resume(old, {**rec, 't_warmup': 60.0, 'num_layers': 4}, 'ckpt', 'Do X.')
    msg = str(info.value)
    assert msg.startswith('cannot resume from ckpt: it was trained with a different ProRes configuration')
    assert "differs in ['num_layers', 't_warmup']" in msg and 't_warmup: checkpoint 30.0 vs now 60.0' in msg
    assert 'num_layers=3' in msg and 'num_layers=4' in msg and msg.endswith('Do X.')
    with pytest.raises(ValueError, match='checkpoint: ProRes off; this run: ProRes on'):
        check_resume({'enabled': False}, rec, 'ckpt', 'hint')
    with pytest.raises(ValueError, match='checkpoint: ProRes on; this run: ProRes off'):
        check_resume(rec, {'enabled': False}, 'ckpt', 'hint')
    check_resume({'enabled': False}, {'enabled': False}, 'ckpt', 'hint')
