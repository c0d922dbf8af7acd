"""Which modules of a model are its transformer layers, and which module ends each residual branch.

`find_residual_layers` walks the model once: a module is a layer when its class is in
`policies.LAYER_POLICIES`, when it declares `prores_branches`, or when it matches the user's
`layer_class` / `layer_pattern`; its branches come from the user, the class, or the policy table
(`policies.BRANCH_REWRITES` maps names that differ between configurations of one class). Errors name
what was found and how to fix it. Torch-only; used by ProRes (surgery) and the residual monitor.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from prores_algo.policies import BRANCH_REWRITES, BRANCHES_ATTRIBUTE, LAYER_POLICIES, check_branches, policy_for

__all__ = ['ResidualLayer', 'find_residual_layers', 'resolve_branch']


@dataclass(frozen=True)
class ResidualLayer:
    """One transformer layer: where it sits in the model and the names of its branch-final modules."""

    index: int  # 0-based depth
    path: str  # dotted name in the model
    module: nn.Module
    branches: tuple[str, ...]  # dotted names relative to `module`


def _is_layer(path: str, module: nn.Module, layer_class, layer_pattern: str | None) -> bool:
    if layer_pattern is not None:
        return fnmatch.fnmatchcase(path, layer_pattern)
    if layer_class is not None:
        if isinstance(layer_class, str):
            return type(module).__name__ == layer_class
        return isinstance(module, layer_class)
    return type(module).__name__ in LAYER_POLICIES or isinstance(getattr(module, BRANCHES_ATTRIBUTE, None), tuple)


def _branches_for(module: nn.Module, branches: Sequence[str] | None) -> tuple[str, ...] | None:
    if branches is not None:
        return tuple(branches)
    own = getattr(module, BRANCHES_ATTRIBUTE, None)
    if isinstance(own, tuple):
        return own
    return policy_for(module)


def resolve_branch(layer: nn.Module, name: str) -> nn.Module:
    """The module ending branch `name` of `layer`, following BRANCH_REWRITES (AttributeError if absent)."""
    parent_name, _, child = name.rpartition('.')
    parent = layer.get_submodule(parent_name) if parent_name else layer
    child = BRANCH_REWRITES.get(type(parent).__name__, {}).get(child, child)
    return parent.get_submodule(child)


def _repeated_module_classes(model: nn.Module) -> list[str]:
    """Classes that occur several times inside ModuleLists: the likely transformer layers (for errors)."""
    counts: Counter[str] = Counter()
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            counts.update(type(m).__name__ for m in module)
    return [name for name, n in counts.most_common(5) if n > 1]


def find_residual_layers(
    model: nn.Module,
    layer_class: type | str | None = None,
    branches: Sequence[str] | None = None,
    layer_pattern: str | None = None,
) -> list[ResidualLayer]:
    """Find every transformer layer of `model` (outermost match, in module order = depth order)."""
    if layer_class is not None and layer_pattern is not None:
        raise ValueError('pass either layer_class or layer_pattern, not both')
    if branches is not None:
        branches = check_branches(branches)
    layers: list[ResidualLayer] = []
    inside: str | None = None  # path of the layer we are inside: nested matches belong to it
    for path, module in model.named_modules():
        if inside is not None and (path == inside or path.startswith(inside + '.')):
            continue
        if not _is_layer(path, module, layer_class, layer_pattern):
            continue
        names = _branches_for(module, branches)
        if names is None:
            raise ValueError(
                f'layer {path!r} ({type(module).__name__}) matched layer_class/layer_pattern but ProRes does not know '
                f"its residual branches: pass branches=['<attention output module>', '<mlp output module>'] "
                f'(dotted names inside the layer), or prores_algo.register_policy({type(module).__name__!r}, ...).'
            )
        for name in names:
            try:
                resolve_branch(module, name)
            except AttributeError:
                children = [n for n, _ in module.named_modules() if n][:40]
                raise ValueError(
                    f'branch {name!r} not found in layer {path!r} ({type(module).__name__}); fix `branches`. '
                    f'Submodules of that layer: {children}'
                ) from None
        layers.append(ResidualLayer(len(layers), path, module, names))
        inside = path
    if not layers:
        hint = ''
        if layer_class is None and layer_pattern is None:
            candidates = _repeated_module_classes(model)
            hint = f' Repeated module classes in this model: {candidates}.' if candidates else ''
        how = (
            f'layer_class={layer_class!r}'
            if layer_class is not None
            else f'layer_pattern={layer_pattern!r}'
            if layer_pattern is not None
            else f'none of its modules is a known transformer layer ({sorted(LAYER_POLICIES)}) or defines '
            f'`{BRANCHES_ATTRIBUTE}`'
        )
        raise ValueError(
            f'ProRes found no residual branch in {type(model).__name__}: {how}.{hint} Pass '
            f"layer_class='YourBlock' and branches=['attn.out_proj', 'mlp.down_proj'] (the modules whose output is "
            f'added to the residual stream), or register_policy() them.'
        )
    return layers
