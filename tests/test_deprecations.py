"""Old public names work for one release, each with a warning that names its replacement."""

import pytest

import prores_algo
from prores_algo.spec import ProResSpec
from tests.support.helpers import tiny_decoder


def test_old_module_name_of_the_alpha_schedules():
    with pytest.warns(DeprecationWarning, match='use prores_algo.alpha_schedules'):
        old = prores_algo.schedules
    assert old is prores_algo.alpha_schedules


def test_attach_prores_is_apply_prores():
    from prores_algo.integrations.deepspeed import apply_prores, attach_prores

    with pytest.warns(DeprecationWarning, match='use apply_prores'):
        old = attach_prores(tiny_decoder(), 'linear', 40)
    new = apply_prores(tiny_decoder(), 'linear', 40)
    for step in (0, 7, 25, 60):
        old.controller.set_step(step)
        new.controller.set_step(step)
        assert old.controller.alphas == new.controller.alphas


def test_spec_attach_is_spec_apply():
    with pytest.warns(DeprecationWarning, match='use ProResSpec.apply'):
        old = ProResSpec('linear_sqrt').attach(tiny_decoder(), 30.0)
    new = ProResSpec('linear_sqrt').apply(tiny_decoder(), 30.0)
    old.set_step(11)
    new.set_step(11)
    assert old.alphas == new.alphas and 0 < min(new.alphas) < 1


def test_wsd_scheduler_t_warmup_and_monitor_interval():
    from prores_algo.integrations.composer import ResidualMonitor, WSDScheduler

    with pytest.warns(DeprecationWarning, match='use lr_warmup= and lr_decay='):
        old = WSDScheduler(t_warmup='8ba', t_decay='0.25dur')
    assert (str(old.lr_warmup), str(old.lr_decay)) == (str(WSDScheduler('8ba', '0.25dur').lr_warmup), '0.25dur')
    with pytest.warns(DeprecationWarning, match='use log_interval='):
        assert ResidualMonitor(interval='4ba').log_interval == 4


@pytest.mark.parametrize(
    'old,new,key,value',
    [('--t_warmup', '--prores_warmup', 't_warmup', 300.0), ('--log_every', '--log_interval', 'log_interval', 5)],
)
def test_old_deepspeed_flag_spellings(old, new, key, value):
    from prores_algo.training.deepspeed.cli import parser

    with pytest.warns(FutureWarning, match=f'{old} is deprecated: use {new}'):
        args = parser().parse_args([old, str(value)])
    assert getattr(args, key) == value == getattr(parser().parse_args([new, str(value)]), key)
