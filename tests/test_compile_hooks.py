"""ProRes' output hooks under torch.compile: compiled code must never run without them.

Dynamo does not guard on forward hooks by default, so a block compiled before the hooks were added, or
compiled for an unhooked instance of the same class, would reuse code that drops α (found on an H200 in
`benchmarks/gpu_check`: the hooked variant compiled no graph of its own). Each case here compares the
compiled model with the same model run eagerly.
"""

import pytest
import torch
import torch._dynamo

from prores_algo import apply_prores
from prores_algo.training.models import build_decoder

IDS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))


def _model(mechanism=None, **kw):
    torch.manual_seed(0)
    model = build_decoder(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16)
    if mechanism is not None:
        apply_prores(model, 'linear', t_warmup=100, mechanism=mechanism, **kw).set_step(30)
    return model


def _compile_blocks(model):
    for block in model.blocks:
        block.compile(backend='eager')


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize('mechanism', ['hook', 'auto'])
def test_blocks_compiled_before_prores_attaches(mechanism):
    model = _model()
    _compile_blocks(model)
    model(IDS)
    apply_prores(model, 'linear', t_warmup=100, mechanism=mechanism).set_step(30)
    torch.testing.assert_close(model(IDS), _model(mechanism)(IDS))


@pytest.mark.parametrize('mechanism', ['hook', 'auto'])
def test_prores_on_a_subset_of_layers_under_regional_compile(mechanism):
    """Block 0 unhooked and block 1 hooked share one class: block 1 must not reuse block 0's code."""
    model = _model(mechanism, layer_pattern='blocks.1')
    eager = model(IDS).detach()
    _compile_blocks(model)
    torch.testing.assert_close(model(IDS), eager)


@pytest.mark.parametrize('mechanism', ['hook', 'auto'])
def test_a_hooked_model_after_an_unhooked_one_in_the_same_process(mechanism):
    off = _model()
    _compile_blocks(off)
    off(IDS)
    model = _model(mechanism)
    eager = model(IDS).detach()
    _compile_blocks(model)
    torch.testing.assert_close(model(IDS), eager)
    assert not torch.allclose(model(IDS), off(IDS))  # ProRes at α < 1 really changes the output
