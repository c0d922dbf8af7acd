"""Export a model trained with ProRes: fold the current α into the weights and drop the hooks.

During warmup a ProRes model is `x + α·F(x)`, with α living in hooks, not in the checkpoint. A model
saved mid-warmup (or with a schedule that never reaches 1 in the run) would load into plain
`transformers` / plain PyTorch as a *different* function. `fold_prores` makes the scaling part of the
weights so that the plain architecture computes exactly what the hooked one did:

  * Linear-like branch modules (nn.Linear, HF Conv1D, FalconLinear, convolutions): weight and bias · α.
  * Norms with an affine weight (LayerNorm, RMSNorm): weight and bias · α; norms computing
    `x̂·(1 + w)` (Gemma's RMSNorm) get `w ← α·(1 + w) − 1`. Which of the two a norm computes is probed
    numerically, so new norm classes need no table entry.
  * Branch modules without weights of their own (the dropout ending GPT-2 / GPT-NeoX / BERT / MPT
    branches, Mixtral's whole MoE block): α goes into the modules that `policies.FOLD_TARGETS` names
    (e.g. GPT-2's `c_proj`), whose output reaches the branch output linearly.

Parameters are scaled in place (same Parameter objects), so an optimizer built on the model stays
valid. Folding needs the full (unsharded) weights: run it on the unwrapped module, not on FSDP /
ZeRO-3 shards (consolidate first).

Torch only; no Composer or transformers import.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from prores_algo.policies import BRANCHES_ATTRIBUTE, FOLD_TARGETS_ATTRIBUTE, fold_targets_for, policy_for
from prores_algo.surgery import ALPHA_BUFFER, ProResController, has_prores_hook, unscale

__all__ = ['fold_prores', 'fold_alpha_into_module', 'FOLD_TARGETS_ATTRIBUTE']

# A custom layer class may declare `prores_fold_targets = {'branch': ('module.pattern', ...)}`
# (FOLD_TARGETS_ATTRIBUTE, defined in policies).


def _own_weight(module: nn.Module):
    weight = module._parameters.get('weight')
    return weight if isinstance(weight, torch.Tensor) else None


def _check_materialised(module: nn.Module, what: str) -> None:
    for p in module.parameters(recurse=False):
        if p.numel() == 0 or p.is_meta:  # ZeRO-3 leaves an empty tensor outside GatheredParameters
            raise RuntimeError(
                f'fold_prores: the parameters of {what} ({type(module).__name__}) are sharded, offloaded or on the '
                f'meta device (shape {tuple(p.shape)}). Fold on the full model: unwrap FSDP / gather ZeRO-3 '
                f'parameters (deepspeed.zero.GatheredParameters, modifier_rank=0) or consolidate the checkpoint first.'
            )


@torch.no_grad()
def _norm_offset(module: nn.Module, weight: torch.Tensor) -> float:
    """0 if the norm computes x̂·w (+b), 1 if it computes x̂·(1 + w) (+b) (Gemma): found by probing."""
    saved_w = weight.detach().clone()
    bias = module._parameters.get('bias')
    saved_b = None if bias is None else bias.detach().clone()
    try:
        g = torch.Generator(device='cpu').manual_seed(0)
        x = torch.randn(3, *weight.shape, generator=g).to(device=weight.device, dtype=weight.dtype)
        if bias is not None:
            bias.zero_()
        # module.forward, not module(): our own α hook (or any other) must not take part in the probe
        weight.zero_()
        out0 = module.forward(x).float()
        weight.fill_(1.0)
        out1 = module.forward(x).float()
    finally:
        weight.copy_(saved_w)
        if bias is not None:
            bias.copy_(saved_b)
    scale = out1.abs().max().item()
    if out0.abs().max().item() <= 1e-3 * scale:
        return 0.0
    if torch.allclose(out1, 2 * out0, rtol=1e-2, atol=1e-3 * scale):
        return 1.0
    raise ValueError(
        f'fold_prores cannot tell how {type(module).__name__} uses its weight (neither x·w nor '
        'x·(1+w)); name a Linear producing the branch in policies.FOLD_TARGETS instead.'
    )


@torch.no_grad()
def fold_alpha_into_module(module: nn.Module, alpha: float, what: str = 'module') -> None:
    """Scale `module`'s output by α through its own parameters (in place)."""
    weight = _own_weight(module)
    if weight is None:
        raise ValueError(f'{what} ({type(module).__name__}) has no weight to fold α into')
    _check_materialised(module, what)
    bias = module._parameters.get('bias')
    if weight.ndim == 1 or isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):  # elementwise affine
        offset = _norm_offset(module, weight)
        if offset:
            weight.mul_(alpha).add_(alpha - 1.0)  # α·(1 + w) − 1 = α·w + (α − 1)
        else:
            weight.mul_(alpha)
    else:  # Linear / Conv1D / conv: output = f(x; W) + b, linear in (W, b)
        weight.mul_(alpha)
    if bias is not None:
        bias.mul_(alpha)


_fold_targets_for = fold_targets_for


def _layer_and_branch(model: nn.Module, path: str) -> tuple[nn.Module, str, str] | None:
    """For a hooked module at `path`, the enclosing layer (deepest ancestor that declares this branch)."""
    parts = path.split('.')
    for cut in range(len(parts) - 1, -1, -1):
        layer_path, branch = '.'.join(parts[:cut]), '.'.join(parts[cut:])
        layer = model.get_submodule(layer_path) if layer_path else model
        known = getattr(layer, BRANCHES_ATTRIBUTE, None) or policy_for(layer) or ()
        if branch in known or _fold_targets_for(layer, branch) is not None:
            return layer, layer_path, branch
    return None


def _targets(layer: nn.Module, layer_path: str, branch: str, hooked: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that absorb α for one branch: the hooked module itself if it has a weight, else FOLD_TARGETS."""
    if _own_weight(hooked) is not None:
        return [(f'{layer_path}.{branch}'.lstrip('.'), hooked)]
    patterns = _fold_targets_for(layer, branch)
    where = f'branch {branch!r} of {layer_path or "the model"!r} ({type(layer).__name__})'
    if patterns is None:
        raise ValueError(
            f'fold_prores: {where} ends in a {type(hooked).__name__} without weights and no fold target is known. '
            f"Add prores_algo.policies.FOLD_TARGETS[{type(layer).__name__!r}] = {{{branch!r}: ('<projection producing "
            f"the branch>',)}} (or a `{FOLD_TARGETS_ATTRIBUTE}` dict on the layer class)."
        )
    found = [
        (f'{layer_path}.{n}'.lstrip('.'), m)
        for n, m in layer.named_modules()
        if n and any(fnmatch.fnmatchcase(n, p) for p in patterns)
    ]
    if not found:
        raise ValueError(
            f'fold_prores: none of the fold targets {patterns} exists in {where}; fix policies.FOLD_TARGETS.'
        )
    return found


def _hooked_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    # an α buffer without the hook is the inert 1.0 a removal leaves behind: nothing to fold there
    return [(p, m) for p, m in model.named_modules() if ALPHA_BUFFER in m._buffers and has_prores_hook(m)]


def _unwrap_controller(obj):
    controller = getattr(obj, 'controller', None)  # the Composer algorithm, the HF callback
    return controller if isinstance(controller, ProResController) else obj


@torch.no_grad()
def _plain_model(root: nn.Module) -> nn.Module:
    """The model a user saves: the Hugging Face model inside a wrapper that holds one as `.model`
    (Composer's HuggingFaceModel), else `root` itself."""
    inner = getattr(root, 'model', None)
    if not hasattr(root, 'save_pretrained') and isinstance(inner, nn.Module) and hasattr(inner, 'save_pretrained'):
        return inner
    return root


def fold_prores(model_or_controller: nn.Module | ProResController, *, model: nn.Module | None = None):
    """Multiply every layer's current α into its branch weights and remove ProRes' hooks.

    Args:
        model_or_controller: the model (hooks are found on modules with a `prores_alpha` buffer), the
            `ProResController` from `apply_prores`, or an object holding one as `.controller` (the
            Composer `ProRes` algorithm, `ProResCallback`).
        model: with a controller, the model to return (optional; also used to name modules in errors).

    Returns the plain model (the same object, modified in place; the Hugging Face model itself when
    the model is wrapped, as in Composer's HuggingFaceModel, so `.save_pretrained` works from every
    front end): it computes exactly what the hooked
    model computed at the current α, with unchanged parameter names, so `save_pretrained` /
    `state_dict` give a checkpoint that plain transformers / plain PyTorch load as is. With a
    controller and no `model=`, returns `controller.model` if the controller records it, else None.
    After warmup (hooks already removed) there is nothing to fold and the model is returned unchanged.
    As after a removal, each α buffer stays on the model as an inert, non-persistent 1.0 (not in
    `state_dict`, read by nothing), so a DDP / FSDP wrapper around the model keeps working mid-run.
    """
    target = _unwrap_controller(model_or_controller)
    if isinstance(target, ProResController):
        controller = target
        root = model if model is not None else getattr(controller, 'model', None)
        plan = []  # (alpha, [(name, module)])
        if not controller.removed:
            for layer, name, hooked, _ in controller.scaled_branches():
                alpha = float(hooked._buffers[ALPHA_BUFFER])  # what the forward uses (equal to the controller's α)
                plan.append((alpha, _targets(layer.module, layer.path, name, hooked)))
        _apply_plan(plan)
        controller.remove()
        return None if root is None else _plain_model(root)
    if not isinstance(target, nn.Module):
        raise TypeError(f'fold_prores takes a model or a ProResController, got {type(model_or_controller).__name__}')
    root = target
    plan = []
    for path, hooked in _hooked_modules(root):
        alpha = float(hooked._buffers[ALPHA_BUFFER])
        if _own_weight(hooked) is not None:
            plan.append((alpha, [(path, hooked)]))
            continue
        found = _layer_and_branch(root, path)
        if found is None:
            raise ValueError(
                f'fold_prores: {path!r} ({type(hooked).__name__}) carries a ProRes α but has no weight, '
                'and no enclosing layer names it as a branch; pass the ProResController instead.'
            )
        layer, layer_path, branch = found
        plan.append((alpha, _targets(layer, layer_path, branch, hooked)))
    _apply_plan(plan)
    for _, hooked in _hooked_modules(root):
        unscale(hooked)
    return _plain_model(root)


def _apply_plan(plan) -> None:
    """Check everything first (no half-folded model on error), then scale each parameter exactly once."""
    owner: dict[int, tuple[int, str]] = {}
    for _alpha, targets in plan:
        for name, module in targets:
            _check_materialised(module, name)
            for p in module.parameters(recurse=False):
                prev = owner.get(id(p))
                if prev is not None and prev[0] != id(module):
                    raise ValueError(
                        f'fold_prores: a parameter of {name!r} is shared with {prev[1]!r}; α cannot be '
                        'folded into a weight that two modules use.'
                    )
                owner[id(p)] = (id(module), name)
    done: dict[int, float] = {}
    for alpha, targets in plan:
        for name, module in targets:
            if id(module) in done:
                if done[id(module)] != alpha:
                    raise ValueError(
                        f'fold_prores: {name!r} would absorb two different α ({done[id(module)]}, {alpha})'
                    )
                continue
            done[id(module)] = alpha
    for alpha, targets in plan:
        for name, module in targets:
            if done.pop(id(module), None) is not None and alpha != 1.0:
                fold_alpha_into_module(module, alpha, name)
