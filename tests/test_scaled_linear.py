"""α inside the Linear's GEMMs (prores_algo.scaled_linear): the same function and gradients as α·F, exact
at α = 0 and α = 1, autocast like F.linear, no recompilation when α changes, no hook left behind."""

import copy

import pytest
import torch
from torch import nn

from prores_algo import apply_prores
from prores_algo.scaled_linear import (
    can_scale_in_gemm,
    has_scaled_forward,
    install_scaled_forward,
    scaled_linear,
    set_scaled_alpha,
    uninstall_scaled_forward,
)
from prores_algo.surgery import ALPHA_BUFFER, has_prores_hook
from tests.support.helpers import tiny_config


def _pair(bias, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(16, 8, bias=bias)
    return lin, copy.deepcopy(lin)


def _fwd_bwd(module, x, scale=1.0):
    x = x.detach().clone().requires_grad_()
    y = module(x) * scale
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), x.grad, module.weight.grad.clone(), None if module.bias is None else module.bias.grad.clone()


@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('alpha', [0.0, 0.37, 1.0])
def test_equals_alpha_times_linear(bias, alpha):
    lin, ref = _pair(bias)
    install_scaled_forward(lin, alpha)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    got = _fwd_bwd(lin, x)
    want = _fwd_bwd(ref, x, alpha)
    for g, w, what in zip(got, want, ('output', 'grad x', 'grad W', 'grad b'), strict=True):
        if w is None:
            continue
        if alpha in (0.0, 1.0):  # exact: BLAS skips the product at 0, multiplies by 1 exactly
            assert torch.equal(g, w), what
        else:
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6, msg=what)
    uninstall_scaled_forward(lin)
    assert not has_scaled_forward(lin) and 'forward' not in lin.__dict__
    assert torch.equal(lin(x), ref(x))  # the class's own forward again


def test_autocast_like_f_linear():
    lin, ref = _pair(True)
    install_scaled_forward(lin, 0.5)
    x = torch.randn(4, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y, y_ref = lin(x), ref(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    # α = 0.5 is a power of two: scaling is exact, so the product equals the reference bitwise
    assert torch.equal(y, (y_ref.float() * 0.5).to(torch.bfloat16))
    y.float().sum().backward()
    assert lin.weight.grad.dtype == torch.float32 and lin.bias.grad.dtype == torch.float32


def test_only_plain_linears_are_scaled_in_the_gemm():
    class Lora(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    assert can_scale_in_gemm(nn.Linear(2, 2)) and not can_scale_in_gemm(Lora(2, 2))
    assert not can_scale_in_gemm(nn.LayerNorm(2))
    with pytest.raises(TypeError, match='output hook'):
        install_scaled_forward(Lora(2, 2), 0.5)


def test_controller_uses_the_gemm_for_linear_branches_and_the_hook_elsewhere():
    from prores_algo.training.models.decoder import Decoder

    pre = Decoder(tiny_config(norm='pre'))
    c = apply_prores(pre, t_warmup=1000)
    branches = [pre.blocks[0].attn.o_proj, pre.blocks[0].mlp.down_proj]
    assert all(has_scaled_forward(m) and not m._forward_hooks for m in branches)
    c.set_step(250)
    assert [m.__dict__['_prores_alpha_value'] for m in branches] == [c.alphas[0]] * 2
    assert float(branches[0]._buffers[ALPHA_BUFFER]) == pytest.approx(c.alphas[0])
    c.set_step(1000)  # removal
    assert not any(has_prores_hook(m) for m in pre.modules())
    sandwich = Decoder(tiny_config(norm='sandwich'))  # branches end in a norm: the output hook
    apply_prores(sandwich, t_warmup=1000)
    assert sandwich.blocks[0].attn_post_norm._forward_hooks and not has_scaled_forward(
        sandwich.blocks[0].attn_post_norm
    )
    hook = Decoder(tiny_config(norm='pre'))
    apply_prores(hook, t_warmup=1000, mechanism='hook')
    assert hook.blocks[0].attn.o_proj._forward_hooks and not has_scaled_forward(hook.blocks[0].attn.o_proj)
    with pytest.raises(ValueError, match='mechanism must be one of'):
        apply_prores(Decoder(tiny_config()), t_warmup=1000, mechanism='fast')


def test_both_mechanisms_give_the_same_training_step():
    from prores_algo.training.models.decoder import Decoder

    torch.manual_seed(0)
    a = Decoder(tiny_config(norm='pre'))
    b = copy.deepcopy(a)
    ca, cb = apply_prores(a, t_warmup=1000), apply_prores(b, t_warmup=1000, mechanism='hook')
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    for c in (ca, cb):
        c.set_step(333)
    for m in (a, b):
        logits = m(ids)
        torch.nn.functional.cross_entropy(logits.reshape(-1, 64), ids.reshape(-1)).backward()
    torch.testing.assert_close(a(ids), b(ids), rtol=1e-6, atol=1e-6)
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_compiled_no_recompile_when_alpha_changes():
    from torch._dynamo.testing import CompileCounter

    lin = nn.Linear(16, 8)
    lin.register_buffer(ALPHA_BUFFER, torch.tensor(0.5), persistent=False)
    install_scaled_forward(lin, 0.5)
    counter = CompileCounter()
    compiled = torch.compile(lin, backend=counter)
    x = torch.randn(4, 16)
    for a in (0.5, 0.6, 0.7):
        lin._buffers[ALPHA_BUFFER].fill_(a)
        set_scaled_alpha(lin, a)
        torch.testing.assert_close(compiled(x), (x @ lin.weight.t() + lin.bias) * a)
    assert counter.frame_count == 1


def _conv1d_and_falcon():
    from transformers.models.falcon.modeling_falcon import FalconLinear
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(8, 16)  # nf = 8 outputs, nx = 16 inputs: weight stored (16, 8)
    with torch.no_grad():
        conv.bias.normal_()
    return [conv, FalconLinear(16, 8, bias=True), FalconLinear(16, 8, bias=False)]


@pytest.mark.parametrize('which', [0, 1, 2], ids=['conv1d', 'falcon_linear', 'falcon_linear_no_bias'])
@pytest.mark.parametrize('alpha', [0.0, 0.37, 1.0])
def test_conv1d_and_falcon_linear_scaled_like_their_own_forward(which, alpha):
    """transformers' Conv1D (addmm(b, x, W), W stored (in, out)) and FalconLinear (x @ Wᵀ + b) take α in
    their GEMMs: output and every gradient equal α times the class's own forward (bitwise at α = 1)."""
    module = _conv1d_and_falcon()[which]
    ref = copy.deepcopy(module)
    assert can_scale_in_gemm(module)
    install_scaled_forward(module, alpha)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    got, want = _fwd_bwd(module, x), _fwd_bwd(ref, x, alpha)
    for g, w, what in zip(got, want, ('output', 'grad x', 'grad W', 'grad b'), strict=True):
        if w is None:
            continue
        if alpha == 1.0:
            assert torch.equal(g, w), what
        else:
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6, msg=what)
    uninstall_scaled_forward(module)
    assert torch.equal(module(x), ref(x))


def test_subclass_overriding_forward_of_a_known_class_is_not_scaled():
    from transformers.pytorch_utils import Conv1D

    class QuantConv1D(Conv1D):
        def forward(self, x):
            return super().forward(x).round()

    assert not can_scale_in_gemm(QuantConv1D(4, 4)) and not can_scale_in_gemm(nn.Dropout())


def test_branch_output_may_be_modified_in_place():
    """Falcon adds the attention output into the MLP output in place (`mlp_output += attention_output`):
    the scaled GEMM's output must allow it, with the gradients of alpha·(x Wᵀ + b) + r."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    x = torch.randn(2, 3, 8, requires_grad=True)
    r = torch.randn(2, 3, 4)
    y = scaled_linear(x, lin.weight, lin.bias, 0.25)
    y += r
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    ref = 0.25 * nn.functional.linear(x_ref, lin.weight, lin.bias) + r
    grads = torch.autograd.grad(ref.square().sum(), [x_ref, lin.weight])
    torch.testing.assert_close(x.grad, grads[0])
    torch.testing.assert_close(lin.weight.grad, grads[1])
