"""α·Linear(x) with α inside the matrix multiply: no activation-sized traffic for ProRes in eager mode.

Modules that qualify (`can_scale_in_gemm`): `nn.Linear` and subclasses keeping its forward, and modules
whose forward is known to compute the same affine map: transformers' `Conv1D` (GPT-2; `addmm(b, x, W)`
with W stored (in, out)) and `FalconLinear` (`x @ Wᵀ + b`). The surgery scales either the branch-final
module itself or, for a branch ending in a dropout / an MoE block, the projections that
`policies.FOLD_TARGETS` names (their output reaches the branch output linearly).

The output-hook mechanism computes `out = linear(x) * α`: one extra read and write of the branch output
in the forward pass and one of its gradient in the backward pass, at memory bandwidth on a GPU (4.5% of
an eager H200 step for a 369M model). For a branch that ends in an `nn.Linear`, α can instead ride in
the GEMM's own scalars, which BLAS applies to the accumulator before the single write of the result:

    forward    y      = α·(x Wᵀ) + α·b           addmm(b, x, Wᵀ, beta=α, alpha=α)
    backward   ∂L/∂x  = α·(g W)                  addmm(·, g, W, beta=0, alpha=α)
               ∂L/∂W  = α·(gᵀ x)                 addmm(·, gᵀ, x, beta=0, alpha=α)
               ∂L/∂b  = α·Σ g                    bias-sized

so the only extra traffic is bias-sized. The autograd function saves exactly what `F.linear` saves (the
input and the weight, the weight by reference), so peak memory is unchanged, also under FSDP and ZeRO-3,
which gather the weight before this module runs and free it after.

α is a Python float here (a BLAS scalar). On a GPU reading it from the 0-dim α buffer would synchronise,
and under `torch.compile` a float that changes every step would recompile, so the module's forward
takes the other path while dynamo traces it: `linear(x) * α_buffer`, which inductor fuses into the
GEMM's epilogue itself (the α buffer is a graph input: no recompilation when it changes).

Under autocast the inputs are cast to the autocast dtype first, exactly as autocast casts `F.linear`'s.
"""

from __future__ import annotations

import types

import torch
from torch import nn

# The name of the 0-dim fp32 α buffer ProRes registers on every branch-final module (non-persistent).
ALPHA_BUFFER = 'prores_alpha'

__all__ = [
    'ScaledLinearFunction',
    'scaled_linear',
    'install_scaled_forward',
    'uninstall_scaled_forward',
    'has_scaled_forward',
    'can_scale_in_gemm',
    'ALPHA_VALUE_ATTR',
]

ALPHA_VALUE_ATTR = '_prores_alpha_value'  # the Python float α of a module whose forward was replaced


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha·(a @ b) with alpha applied by the GEMM (beta = 0: the placeholder input is never read)."""
    if alpha == 1.0:
        return torch.mm(a, b)
    return torch.addmm(torch.empty((), dtype=a.dtype, device=a.device), a, b, beta=0.0, alpha=alpha)


class ScaledLinearFunction(torch.autograd.Function):
    """`alpha * F.linear(x, weight, bias)` with alpha a Python float applied inside the GEMMs, on x flattened to
    2-D; `scaled_linear` restores the leading dimensions.

    `transposed=True`: the weight is stored (in, out), as in transformers' Conv1D (`addmm(b, x, W)`).
    The output is a fresh 2-D tensor, not a view: a caller may modify the branch output in place (Falcon's
    `mlp_output += attention_output`), which autograd forbids on a view made inside a custom Function."""

    @staticmethod
    def forward(ctx, x, weight, bias, alpha: float, transposed: bool = False):
        dt = _autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            if dt is not None:  # what autocast does for F.linear / addmm: compute in its dtype
                x, w = x.to(dt), weight.to(dt)
                b = None if bias is None else bias.to(dt)
            else:
                w, b = weight, bias
            x2 = x.reshape(-1, x.shape[-1])
            wt = w if transposed else w.t()  # (in, out)
            y = torch.addmm(b, x2, wt, beta=alpha, alpha=alpha) if b is not None else _scaled_mm(x2, wt, alpha)
        ctx.save_for_backward(x, w)
        ctx.alpha, ctx.has_bias, ctx.transposed = alpha, bias is not None, transposed
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, w = ctx.saved_tensors
        alpha = ctx.alpha
        g = grad_out
        if g.dtype != w.dtype:
            g = g.to(w.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _scaled_mm(g, w.t() if ctx.transposed else w, alpha).reshape(*x.shape)
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])
            gw = _scaled_mm(x2.t(), g, alpha) if ctx.transposed else _scaled_mm(g.t(), x2, alpha)
            grad_w = gw.to(ctx.weight_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = (g.sum(0) * alpha).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None


def scaled_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, alpha: float, transposed: bool = False
) -> torch.Tensor:
    y = ScaledLinearFunction.apply(x, weight, bias, float(alpha), transposed)
    return y.reshape(*x.shape[:-1], y.shape[-1])


# Forwards known to compute exactly the affine map x·Wᵀ + b (up to rounding) of their `weight` and `bias`,
# by qualified name (no transformers import): True if the weight is stored (in, out).
_AFFINE_FORWARDS = {
    'transformers.pytorch_utils.Conv1D.forward': True,  # addmm(b, x.view(-1, in), W), W (in, out)
    'transformers.models.falcon.modeling_falcon.FalconLinear.forward': False,  # x @ W.T (+ b)
}


def _qualname(fn) -> str:
    return f'{getattr(fn, "__module__", "")}.{getattr(fn, "__qualname__", "")}'


def _weight_layout(module: nn.Module) -> bool | None:
    """False: weight (out, in) as in nn.Linear; True: (in, out) as in Conv1D; None: not an affine map we know."""
    fwd = type(module).forward
    if isinstance(module, nn.Linear) and fwd is nn.Linear.forward:
        return False
    transposed = _AFFINE_FORWARDS.get(_qualname(fwd))
    if transposed is None:
        return None
    weight = module._parameters.get('weight')
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    return transposed


def _scaled_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        # traced: the α buffer is a graph input and inductor fuses the multiply into the GEMM epilogue
        return type(self).forward(self, x) * self._buffers[ALPHA_BUFFER]
    alpha = self.__dict__[ALPHA_VALUE_ATTR]
    if alpha == 1.0:  # the class's own forward: bitwise what the module computes without ProRes
        return type(self).forward(self, x)
    return scaled_linear(x, self.weight, self.bias, alpha, self.__dict__[_TRANSPOSED_ATTR])


_TRANSPOSED_ATTR = '_prores_weight_transposed'


def can_scale_in_gemm(module: nn.Module) -> bool:
    """True for modules computing exactly the affine map of their `weight` and `bias`: nn.Linear and subclasses
    that keep its forward, transformers' Conv1D and FalconLinear (not e.g. quantised or LoRA layers, which
    override the forward)."""
    return _weight_layout(module) is not None


def install_scaled_forward(module: nn.Module, alpha: float) -> None:
    """Give this module instance the α-scaled forward (the class and every other instance are untouched;
    parameters, buffers and state_dict keys are unchanged)."""
    transposed = _weight_layout(module)
    if transposed is None:
        raise TypeError(f'{type(module).__name__} does not compute F.linear(x, weight, bias); use the output hook')
    module.__dict__[ALPHA_VALUE_ATTR] = float(alpha)
    module.__dict__[_TRANSPOSED_ATTR] = transposed
    module.forward = types.MethodType(_scaled_forward, module)


def set_scaled_alpha(module: nn.Module, alpha: float) -> None:
    module.__dict__[ALPHA_VALUE_ATTR] = float(alpha)


def has_scaled_forward(module: nn.Module) -> bool:
    fwd = module.__dict__.get('forward')
    return isinstance(fwd, types.MethodType) and fwd.__func__ is _scaled_forward


def uninstall_scaled_forward(module: nn.Module) -> None:
    """Back to the class's own forward: the module computes exactly what it did before."""
    if has_scaled_forward(module):
        del module.__dict__['forward']
    module.__dict__.pop(ALPHA_VALUE_ATTR, None)
    module.__dict__.pop(_TRANSPOSED_ATTR, None)
