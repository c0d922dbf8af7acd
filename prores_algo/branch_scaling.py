"""How α reaches one residual branch: inside the GEMMs of the projection that produces it
(`prores_algo.scaled_linear`, directly or through `policies.FOLD_TARGETS` behind a dropout or an MoE
block), or by an output hook; and how either is undone. `ProResController` (surgery) decides per branch
and calls these; `fold_prores` (export) uses them to take the scaling off.

Torch only.
"""

from __future__ import annotations

import fnmatch
import logging

import torch
from torch import nn

from prores_algo.policies import fold_targets_for
from prores_algo.scaled_linear import (
    ALPHA_BUFFER,
    can_scale_in_gemm,
    has_scaled_forward,
    set_scaled_alpha,
    uninstall_scaled_forward,
)

__all__ = [
    'MECHANISMS',
    'check_mechanism',
    'guard_hooks_under_compile',
    'scale_branch_output',
    'has_prores_hook',
    'gemm_targets',
    'ScaledForwardHandle',
    'unscale',
    'make_alpha_inert',
    'set_module_alpha',
    'submodule',
    'fold_target_modules',
]

log = logging.getLogger('prores_algo.surgery')


def guard_hooks_under_compile() -> None:
    """Make torch.compile guard on forward hooks, so compiled code never runs without ProRes' hooks.

    By default dynamo does not check a module's hooks before reusing compiled code
    (`torch._dynamo.config.skip_nnmodule_hook_guards`, for speed): a block compiled before ProRes hooked
    it, or compiled for another instance of its class without hooks (ProRes on a subset of layers, a second
    model in the process), keeps running that code and silently drops α. Turning the hook guards on makes
    such code recompile once instead: the first time, the code compiled so far in the process is dropped
    (`torch._dynamo.reset()`), since it has no hook guards. Global to the process; α updates still recompile
    nothing (a buffer's value is not a guard), and the GEMM mechanism does not need it (the scaled forward
    is per instance).
    """
    try:
        import torch._dynamo
    except ImportError:  # pragma: no cover  (builds without dynamo)
        return
    config = torch._dynamo.config
    if getattr(config, 'skip_nnmodule_hook_guards', False):
        config.skip_nnmodule_hook_guards = False
        # code compiled so far carries no hook guards: drop it, so it recompiles (once) with them
        torch._dynamo.reset()
        log.info('ProRes: torch.compile now guards on forward hooks (skip_nnmodule_hook_guards=False); reset once')


def scale_branch_output(module: nn.Module, args, output):
    """Forward hook: output · α. α is looked up at call time so it follows `.to()` and FSDP moves.

    A 0-dim fp32 tensor does not promote a bf16/fp16 activation (0-dim tensors don't take part in type
    promotion against dimensioned ones of the same category), so the branch keeps its dtype.
    """
    alpha = module._buffers[ALPHA_BUFFER]
    if isinstance(output, torch.Tensor):
        return output * alpha
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (output[0] * alpha, *output[1:])
    raise TypeError(
        f'ProRes cannot scale the output of {type(module).__name__}: expected a tensor or a tuple '
        f'starting with one, got {type(output).__name__}. Name a different branch module.'
    )


def has_prores_hook(module: nn.Module) -> bool:
    """True while ProRes scales `module`'s output, by an output hook or inside its GEMMs (its α buffer
    may outlive the scaling: see `remove`)."""
    return has_scaled_forward(module) or any(fn is scale_branch_output for fn in module._forward_hooks.values())


MECHANISMS = ('auto', 'hook')


def fold_target_modules(layer: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    patterns = fold_targets_for(layer, name) or ()
    return [(n, m) for n, m in layer.named_modules() if n and any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def gemm_targets(layer: nn.Module, name: str, branch: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The modules that apply α inside their GEMMs for branch `name` of `layer` (relative name, module), or
    None where the output hook must stay.

    The branch-final module itself when it can (nn.Linear, Conv1D, FalconLinear, see scaled_linear); else the
    modules `policies.FOLD_TARGETS` names for the branch (the projection in front of a dropout, every expert's
    down projection of an MoE block), when there are some and every one of them can: their outputs reach the
    branch output through operations that commute with a scalar, so scaling them scales the branch once.
    """
    if can_scale_in_gemm(branch):
        return [(name, branch)]
    found = fold_target_modules(layer, name)
    if not found or not all(can_scale_in_gemm(m) for _, m in found):
        return None
    return found


class ScaledForwardHandle:
    """What `remove()` calls for a branch whose Linear applies α inside its GEMMs (see scaled_linear)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def remove(self) -> None:
        uninstall_scaled_forward(self.module)


def unscale(module: nn.Module) -> None:
    """Stop scaling `module` by either mechanism, wherever that was set up (a model whose controller is
    gone), and leave its α buffer as the inert 1.0 that `ProResController.remove` leaves."""
    for key, fn in list(module._forward_hooks.items()):
        if fn is scale_branch_output:
            del module._forward_hooks[key]
            module._forward_hooks_with_kwargs.pop(key, None)
            module._forward_hooks_always_called.pop(key, None)
    uninstall_scaled_forward(module)
    make_alpha_inert(module)


def make_alpha_inert(module: nn.Module) -> None:
    """After the hook is gone: leave `module`'s α buffer in place as a constant 1.0 that nothing reads."""
    alpha = module._buffers.get(ALPHA_BUFFER)
    if alpha is not None:
        with torch.no_grad():
            alpha.fill_(1.0)


def submodule(layer: nn.Module, name: str) -> nn.Module | None:
    try:
        return layer.get_submodule(name)
    except AttributeError:
        return None


def set_module_alpha(module: nn.Module, handle, value: float) -> None:
    module._buffers[ALPHA_BUFFER].fill_(value)
    if isinstance(handle, ScaledForwardHandle):
        set_scaled_alpha(module, value)  # the GEMM's scalar: a Python float, no device sync


def check_mechanism(mechanism: str) -> str:
    """`mechanism`, if it is one of MECHANISMS; a ValueError naming the choices otherwise."""
    if mechanism not in MECHANISMS:
        raise ValueError(
            f'mechanism must be one of {MECHANISMS}, got {mechanism!r}: "auto" applies α inside the '
            'matrix multiplies of the projection producing each branch where it can, and by an output hook '
            'elsewhere; "hook" uses the output hook everywhere'
        )
    return mechanism
