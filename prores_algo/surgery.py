"""Apply ProRes to a model: scale each residual branch (found by `prores_algo.layers`) by its layer's α.

Mechanism (docs/mechanism.md): every branch-final module gets a 0-dim, non-persistent buffer
`prores_alpha`, updated in place with `fill_`, and its output is scaled by it: inside the GEMMs of an
`nn.Linear` / Conv1D / FalconLinear (`prores_algo.scaled_linear`, which also keeps α as a Python float for
the BLAS scalars), or by a forward hook on every other branch end (and everywhere with `mechanism='hook'`).
A branch ending in a dropout or an MoE block moves α into the projections `policies.FOLD_TARGETS` names
(GPT-2's c_proj, every expert's down projection), when all of them can take it in their GEMMs: the module
carrying α (and its buffer) is then that projection. `controller.mechanisms` says which branch got which
('gemm' or 'hook'); the choice is logged once at attach. Because of that choice:
  * parameter names and `state_dict` keys do not change (HF checkpoints still load);
  * optimizers built before the surgery keep working (no parameter is replaced);
  * FSDP / ZeRO-3 never shard α, and `.to(device)` moves it with the module;
  * `torch.compile` sees α as a buffer input, so updating it does not recompile;
  * activation checkpointing recomputes with the same α;
  * no branch is skipped at α = 0 (DDP/FSDP would otherwise see unused parameters).
Once every α is 1 for good (t >= W), `remove()` takes the hooks away: zero overhead in the model. The α
buffers stay behind as inert constants (1.0, read by nothing), so the set of buffers a wrapper recorded
(DDP broadcasts the buffers it saw at wrap time every forward) never changes under it.

This module imports only torch and the pure-Python schedules: it runs without Composer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn

from prores_algo import alpha_schedules
from prores_algo.branch_scaling import (
    MECHANISMS,
    ScaledForwardHandle,
    check_mechanism,
    fold_target_modules,
    gemm_targets,
    guard_hooks_under_compile,
    has_prores_hook,
    make_alpha_inert,
    scale_branch_output,
    set_module_alpha,
    submodule,
    unscale,
)
from prores_algo.layers import ResidualLayer, find_residual_layers, resolve_branch
from prores_algo.scaled_linear import ALPHA_BUFFER, install_scaled_forward
from prores_algo.timing import auto_warmup_steps, is_auto
from prores_algo.warmup_advice import advise_warmup, warn_if_short_warmup

# find_residual_layers and ResidualLayer live in prores_algo.layers; re-exported for code that imports them from here
__all__ = [
    'apply_prores',
    'find_residual_layers',
    'ProResController',
    'ResidualLayer',
    'ALPHA_BUFFER',
    'warn_if_short_warmup',
    'gemm_targets',
    'guard_hooks_under_compile',
    'has_prores_hook',
    'unscale',
    'check_mechanism',
    'MECHANISMS',
]

log = logging.getLogger(__name__)


def _check_warmup(warmup_steps) -> float:
    if isinstance(warmup_steps, str):
        raise ValueError(
            f't_warmup={warmup_steps!r}: apply_prores takes a number of steps; Time strings such as '
            "'24000ba' or '0.1dur' are resolved by the Composer algorithm prores_algo.ProRes"
        )
    if (
        isinstance(warmup_steps, bool)
        or not isinstance(warmup_steps, (int, float))
        or not warmup_steps > 0
        or math.isinf(warmup_steps)
    ):
        raise ValueError(f't_warmup must be a positive, finite number of steps, got {warmup_steps!r}')
    return float(warmup_steps)


class ProResController:
    """Owns the hooks of one model; `set_step(t)` moves every α to the schedule's value at t."""

    def __init__(
        self,
        layers: list[ResidualLayer],
        schedule: str,
        warmup_steps: float | None,
        remove_when_done: bool = True,
        mechanism: str = 'auto',
    ):
        self.mechanism = check_mechanism(mechanism)
        self._warned_short = False  # warn_if_short_warmup warns once per controller
        self.init_measure = None  # warmup_advice.InitMeasure, once the model was measured on a batch
        # the run length (optimizer steps) when W came from t_warmup='auto' (timing.auto_warmup_steps), else None
        self.auto_run_steps: float | None = None
        self.layers = layers
        self.schedule = alpha_schedules.canonical_name(schedule)
        self._warmup_steps = None if warmup_steps is None else _check_warmup(warmup_steps)
        self.remove_when_done = remove_when_done
        self.step: float = 0.0
        self._alphas: list[float] = [0.0] * len(layers)
        # one entry per module that applies α (the branch-final module, or its GEMM targets)
        self._hooks: list[tuple[int, str, nn.Module, torch.utils.hooks.RemovableHandle]] = []
        # one entry per branch: (layer index, branch name, branch-final module, GEMM targets or None)
        self._branches: list[tuple[int, str, nn.Module, tuple[tuple[str, nn.Module], ...] | None]] = []
        # '<layer path>.<branch>' -> 'gemm' (α inside the GEMMs) or 'hook' (output hook), in attach order
        self.mechanisms: dict[str, str] = {}
        self.removed = False
        self.model: nn.Module | None = None  # set by apply_prores / the integrations (fold_prores uses it)
        plans = []
        for layer in layers:  # check everything before touching anything: no half-applied state
            for name in layer.branches:
                branch = resolve_branch(layer.module, name)
                targets = self._gemm_targets(layer.module, name, branch)
                # the branch module and every module that may carry its α (the other mechanism's choice too)
                carriers = (
                    branch,
                    *(m for _, m in targets or ()),
                    *(m for _, m in fold_target_modules(layer.module, name)),
                )
                if any(has_prores_hook(m) for m in carriers):
                    raise ValueError(
                        f'ProRes is already applied to branch {name!r} of layer {layer.path!r}: '
                        'call remove() on the first controller before applying ProRes again.'
                    )
                plans.append((layer, name, branch, targets))
        for layer, name, branch, targets in plans:
            self._attach(layer, name, branch, targets)
        self._log_mechanisms()
        if self._warmup_steps is not None:
            self.set_step(0)

    # --- public API --------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def warmup_steps(self) -> float | None:
        return self._warmup_steps

    @warmup_steps.setter
    def warmup_steps(self, value: float) -> None:
        self._warmup_steps = _check_warmup(value)

    @property
    def alphas(self) -> list[float]:
        """α per layer (shallowest first), as Python floats: reading them never syncs a device."""
        return [1.0] * len(self.layers) if self.removed else list(self._alphas)

    def alphas_at(self, step: float) -> list[float]:
        return alpha_schedules.alphas(self.schedule, self.num_layers, step, self._require_warmup())

    def done(self, step: float | None = None) -> bool:
        """True once every α is 1 for good (t >= W), after which the scaling can be removed."""
        return (self.step if step is None else step) >= self._require_warmup()

    def set_step(self, step: float) -> list[float]:
        """Set every α to its value at time `step` (in the unit of `warmup_steps`)."""
        if isinstance(step, bool) or not isinstance(step, (int, float)) or math.isnan(step):
            raise ValueError(f'step must be a number, got {step!r}')
        if self.removed:
            if step >= self._require_warmup():
                self.step = float(step)
                return self.alphas
            raise RuntimeError(
                f'ProRes scaling was removed (warmup ended at {self._warmup_steps}); '
                f'cannot go back to step {step}. Apply ProRes again to a fresh model.'
            )
        self.step = float(step)
        new = self.alphas_at(step)
        for i, (old, a) in enumerate(zip(self._alphas, new, strict=True)):
            if a != old:
                self._fill(i, a)
        self._alphas = new
        if self.remove_when_done and self.done():
            self.remove()
        return self.alphas

    def set_alphas(self, alphas: Sequence[float]) -> list[float]:
        """Set α per layer directly, bypassing the schedule (tests, experiments); `set_step` overrides it."""
        alphas = [float(a) for a in alphas]
        if len(alphas) != self.num_layers:
            raise ValueError(f'set_alphas needs one α per layer ({self.num_layers}), got {len(alphas)}')
        if self.removed:
            raise RuntimeError('ProRes scaling was removed; apply ProRes again to set α')
        for i, a in enumerate(alphas):
            self._fill(i, a)
        self._alphas = alphas
        return list(alphas)

    def refresh(self) -> int:
        """Re-attach to branch modules another surgery replaced after us; returns how many moved.

        Composer algorithms such as `gated_linear_units` swap modules at Event.INIT; if they run after
        ProRes, our hook would be left on a module that is no longer part of the model.
        """
        if self.removed:
            return 0
        moved = 0
        for k, (layer_idx, name, branch, targets) in enumerate(list(self._branches)):
            layer = self.layers[layer_idx]
            try:
                current = resolve_branch(layer.module, name)
            except AttributeError:
                raise ValueError(
                    f'branch {name!r} of layer {layer.path!r} disappeared after another algorithm modified the '
                    f'model; name the new branch module in `branches`.'
                ) from None
            stale = current is not branch or any(submodule(layer.module, n) is not m for n, m in targets or ())
            if not stale:
                continue
            for entry in [e for e in self._hooks if e[0] == layer_idx and e[1] == name]:
                entry[3].remove()
                make_alpha_inert(entry[2])  # never delete an α buffer (see `remove`)
                self._hooks.remove(entry)
            new_targets = self._gemm_targets(layer.module, name, current)
            self._branches[k] = self._attach(layer, name, current, new_targets, record=False)
            for idx, n, module, handle in self._hooks:
                if idx == layer_idx and n == name:
                    set_module_alpha(module, handle, self._alphas[layer_idx])
            moved += 1
        return moved

    def remove(self) -> None:
        """Take every hook away: the model is exactly the un-scaled model (α = 1) and no hook runs.

        The α buffers are *not* deleted: each is set to 1.0 and left as an inert constant that nothing
        reads (non-persistent, so `state_dict` is unchanged). A wrapper that recorded the module's buffers
        when it wrapped it must keep finding them: torch's DDP re-reads `named_buffers()` before every
        forward only once its recorded list was non-empty (`will_sync_module_buffers`), so deleting the
        only buffers of a buffer-free model (MPT, plain transformers) would make it broadcast an empty list
        and crash; FSDP1 likewise zips buffers against the dtypes it recorded at wrap time.
        Applying ProRes again to the same modules reuses these buffers.
        """
        for _, _, module, handle in self._hooks:
            handle.remove()
            make_alpha_inert(module)
        self._hooks.clear()
        self._branches.clear()
        self.removed = True

    def ensure_fp32(self) -> None:
        """Re-cast α buffers to fp32 after something cast the model (`model.to(torch.bfloat16)`,
        older DeepSpeed's `.half()`), and restore their exact values: bf16 keeps 8 mantissa bits."""
        for _, _, module, _ in self._hooks:
            buf = module._buffers.get(ALPHA_BUFFER)
            if buf is not None and buf.dtype != torch.float32:
                module._buffers[ALPHA_BUFFER] = buf.detach().to(torch.float32)
        for i, a in enumerate(self._alphas):
            self._fill(i, a)

    @property
    def num_hooks(self) -> int:
        """How many branches are scaled now (by either mechanism; 0 once removed)."""
        return len(self._branches)

    def scaled_branches(self) -> list[tuple[ResidualLayer, str, nn.Module, float]]:
        """Every module this controller scales now: (its layer, the branch name, the module applying α: the
        branch-final module or a GEMM target standing in for it, several for an MoE block, its current α).
        Empty once the hooks are removed. `prores_algo.export.fold_prores` reads this."""
        return [(self.layers[idx], name, module, self._alphas[idx]) for idx, name, module, _ in self._hooks]

    # --- internals ---------------------------------------------------------------------------------
    def _require_warmup(self) -> float:
        if self._warmup_steps is None:
            raise RuntimeError('t_warmup is not resolved yet (it is set at Event.FIT_START for dur fractions)')
        return self._warmup_steps

    def _make_hook(self, layer_idx: int, name: str, module: nn.Module, gemm: bool = False):
        if has_prores_hook(module):
            raise ValueError(
                f'ProRes is already applied to {type(module).__name__} {name!r} of layer '
                f'{self.layers[layer_idx].path!r}: call remove() on the first controller before '
                'applying ProRes again.'
            )
        leftover = module._buffers.get(ALPHA_BUFFER)
        if leftover is not None and leftover.dim() == 0 and leftover.dtype == torch.float32:
            # the inert α a previous remove() left: reuse it, so a wrapper's view of the buffers stays the same
            leftover.fill_(0.0)
            return layer_idx, name, module, self._scale(module, gemm)
        # A dropout branch end (GPT-2, NeoX, BERT, MPT) owns no tensor: fall back to the layer's device.
        layer = self.layers[layer_idx].module
        device = next((t.device for m in (module, layer) for t in (*m.parameters(), *m.buffers())), torch.device('cpu'))
        # float32 so that α = 0 and α = 1 are exact and intermediate α keep full precision;
        # persistent=False keeps it out of state_dict.
        module.register_buffer(ALPHA_BUFFER, torch.zeros((), dtype=torch.float32, device=device), persistent=False)
        return layer_idx, name, module, self._scale(module, gemm)

    @staticmethod
    def _scale(module: nn.Module, gemm: bool):
        """Start scaling `module`'s output by its α: inside its GEMMs (no activation-sized traffic, see
        scaled_linear) or by a forward hook."""
        if gemm:
            install_scaled_forward(module, 0.0)  # the buffer was just zeroed too; reading it back would sync
            return ScaledForwardHandle(module)
        guard_hooks_under_compile()
        return module.register_forward_hook(scale_branch_output)

    def _gemm_targets(self, layer: nn.Module, name: str, branch: nn.Module):
        if self.mechanism != 'auto':
            return None
        found = gemm_targets(layer, name, branch)
        return None if found is None else tuple(found)

    def _attach(self, layer: ResidualLayer, name: str, branch: nn.Module, targets, record: bool = True):
        if targets is None:
            self._hooks.append(self._make_hook(layer.index, name, branch))
        else:
            for _, module in targets:
                self._hooks.append(self._make_hook(layer.index, name, module, gemm=True))
        entry = (layer.index, name, branch, targets)
        if record:
            self._branches.append(entry)
        self.mechanisms[f'{layer.path}.{name}'.lstrip('.')] = 'hook' if targets is None else 'gemm'
        return entry

    def _log_mechanisms(self) -> None:
        hooked = [p for p, m in self.mechanisms.items() if m == 'hook']
        n = len(self.mechanisms)
        msg = f'ProRes: α inside the GEMMs for {n - len(hooked)} of {n} residual branches'
        if hooked:
            shown = ', '.join(hooked[:4]) + (', ...' if len(hooked) > 4 else '')
            msg += f'; output hook for {len(hooked)} ({shown})'
        log.info(msg)

    def _fill(self, layer_idx: int, value: float) -> None:
        for idx, _, module, handle in self._hooks:
            if idx == layer_idx:
                set_module_alpha(module, handle, value)

    def __repr__(self) -> str:
        return (
            f'ProResController(schedule={self.schedule!r}, num_layers={self.num_layers}, '
            f'warmup_steps={self._warmup_steps}, step={self.step}, removed={self.removed})'
        )


def apply_prores(
    model: nn.Module,
    schedule: str = 'linear',
    t_warmup: float | str | None = None,
    *,
    total_steps: float | None = None,
    layer_class: type | str | None = None,
    branches: Sequence[str] | None = None,
    layer_pattern: str | None = None,
    remove_when_done: bool = True,
    mechanism: str = 'auto',
    example_inputs=None,
    advise: bool = True,
) -> ProResController:
    """Scale every residual branch of `model` by its layer's α and return the controller.

    Args:
        model: any torch module containing transformer layers (HF models, Composer's HuggingFaceModel,
            our reference decoder, your own).
        schedule: name from `prores_algo.alpha_schedules.names()` (or an alias).
        t_warmup: W, in optimizer steps (or whatever unit you will pass to `set_step`): the time at which
            every α reaches 1. Default: the paper's 1000 steps per layer (W = 1000·L). 'auto':
            W = min(1000·L, 0.25·total_steps), rounded to whole steps (`timing.auto_warmup_steps`).
        total_steps: the run length in optimizer steps; needed (only) by t_warmup='auto'.
        layer_class / layer_pattern: which modules are layers (class or class name / fnmatch over module
            paths), when the model is not in `prores_algo.policies.LAYER_POLICIES`.
        branches: dotted names, inside each layer, of the modules whose output enters the residual add.
        remove_when_done: remove the hooks as soon as `set_step(t)` sees t >= W (α buffers stay, inert 1.0).
        mechanism: 'auto' (default) applies α inside the matrix multiplies of the projection that produces
            each branch (nn.Linear, Conv1D, FalconLinear; through a dropout or an MoE block's expert sum via
            `policies.FOLD_TARGETS`): no activation-sized memory traffic, `prores_algo.scaled_linear`; an
            output hook elsewhere. 'hook' uses the output hook everywhere. `controller.mechanisms` tells which.
        example_inputs: a batch of your training data, as the model takes it (a tensor, a tuple of
            positional arguments or a dict of keyword arguments). ProRes runs the model on it once (eval
            mode, no gradient) to measure how large the branches start against the stream, and warns
            only if W / L is short *for that regime* (`prores_algo.warmup_advice`); the measurement is
            `controller.init_measure`. Without it, the warning uses the conservative 100 steps per layer.
        advise: False gives no short-warmup advice now: the caller measures later, once the model can run
            (e.g. under DeepSpeed ZeRO-3, after `deepspeed.initialize`), with
            `warmup_advice.advise_warmup(controller, engine, batch, every_rank=True)` on every rank.

    The model is left at step 0 (every α from the schedule at t = 0): call `set_step` every optimizer step.
    """
    if example_inputs is not None and not advise:
        raise ValueError('apply_prores: example_inputs is for the advice, which advise=False turns off: pass one')
    auto = is_auto(t_warmup)
    if auto and total_steps is None:
        raise ValueError(
            "t_warmup='auto' needs the run length: pass total_steps=N (optimizer steps), e.g. "
            "apply_prores(model, t_warmup='auto', total_steps=N)"
        )
    layers = find_residual_layers(model, layer_class, branches, layer_pattern)
    if t_warmup is None:
        t_warmup = alpha_schedules.default_warmup(len(layers))
    elif auto:
        t_warmup = auto_warmup_steps(len(layers), total_steps)
    controller = ProResController(layers, schedule, t_warmup, remove_when_done, mechanism)
    controller.model = model
    if auto:
        controller.auto_run_steps = float(total_steps)
    if example_inputs is not None:
        advise_warmup(controller, model, example_inputs)
    elif advise:
        warn_if_short_warmup(controller)
    return controller
