"""Every option of ProRes works in every front end: `mechanism='hook'` through the Composer algorithm, the
YAML of both training entries, the Hugging Face callback and the DeepSpeed helper, with the same α."""

import pytest
from composer import Trainer

from prores_algo import ProRes, apply_prores
from prores_algo.integrations.deepspeed import apply_prores as deepspeed_apply_prores
from prores_algo.integrations.hf import ProResCallback
from prores_algo.training import composer_train
from prores_algo.training.config import load_config
from prores_algo.training.deepspeed.settings import resolve
from tests.support.helpers import tiny_composer_model, tiny_decoder, token_loader

STEPS = 6


def _hooked(controller) -> set:
    return set(controller.mechanisms.values())


def test_composer_algorithm_takes_mechanism_hook():
    alphas = {}
    for mechanism in ('auto', 'hook'):
        prores = ProRes(t_warmup='80ba', mechanism=mechanism, remove_when_done=False)
        Trainer(
            model=tiny_composer_model(), train_dataloader=token_loader(), max_duration=f'{STEPS}ba',
            algorithms=[prores], device='cpu', progress_bar=False, log_to_console=False,
        ).fit()  # fmt: skip
        assert _hooked(prores.controller) == ({'hook'} if mechanism == 'hook' else {'gemm'})
        alphas[mechanism] = prores.controller.alphas
    assert alphas['hook'] == alphas['auto'] and 0 < max(alphas['hook']) < 1


def test_yaml_takes_mechanism_in_both_entries():
    cfg = load_config(
        data={
            'model': {'name': 'reference', 'vocab_size': 257, 'd_model': 16, 'n_layers': 2, 'n_heads': 2},
            'data': {'path': 'unused', 'seq_len': 16},
            'optimizer': {'name': 'adamw', 'lr': 1e-3},
            'algorithms': {'prores': {'t_warmup': '10ba', 'mechanism': 'hook'}},
            'max_duration': '20ba',
        }
    )
    (algorithm,) = composer_train._build_named('algorithms', composer_train._algorithms(), cfg.algorithms)
    assert algorithm.spec.mechanism == 'hook'
    assert resolve(cfg).prores.mechanism == 'hook'


def test_hf_callback_and_deepspeed_helper_take_mechanism_hook():
    callback = ProResCallback(t_warmup=10, mechanism='hook')
    assert callback.spec.mechanism == 'hook' and callback.state()['args']['mechanism'] == 'hook'
    assert ProResCallback(**callback.state()['args']).spec.mechanism == 'hook'  # a resumed Trainer rebuilds it
    assert _hooked(deepspeed_apply_prores(tiny_decoder(), 'linear', 10, mechanism='hook').controller) == {'hook'}
    assert _hooked(apply_prores(tiny_decoder(), 'linear', 10, mechanism='hook')) == {'hook'}


@pytest.mark.parametrize('front_end', [ProRes, ProResCallback])
def test_a_bad_mechanism_is_refused_with_the_choices(front_end):
    with pytest.raises(ValueError, match=r"mechanism must be one of \('auto', 'hook'\), got 'gemm'"):
        front_end(mechanism='gemm')


def test_front_ends_take_the_same_arguments_in_the_same_order():
    import inspect

    shared = ['schedule', 't_warmup', 'layer_class', 'branches', 'layer_pattern', 'remove_when_done', 'mechanism']
    for front_end in (ProRes, ProResCallback, deepspeed_apply_prores):
        names = [n for n in inspect.signature(front_end).parameters if n not in ('self', 'model')]
        assert [n for n in names if n in shared] == shared, front_end
    assert [n for n in inspect.signature(apply_prores).parameters if n in shared] == shared
