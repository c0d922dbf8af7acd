"""ProRes for a DeepSpeed training loop (any ZeRO stage, ZeRO-3 included), in a few lines.

    from prores_algo.integrations.deepspeed import apply_prores, save_checkpoint, load_checkpoint

    prores = apply_prores(model, schedule='linear', t_warmup=24000)     # before deepspeed.initialize
    engine, optimizer, _, lr_scheduler = deepspeed.initialize(model=model, ...)
    for batch in loader:
        prores.step(engine)               # α from engine.global_steps; call before the forward
        loss = loss_fn(engine(batch['input_ids']), ...)
        engine.backward(loss)
        engine.step()

`apply_prores` works on a model built under `deepspeed.zero.Init` as well: α is a 0-dim, non-persistent
fp32 buffer that the branch's GEMM takes as a scalar (or a forward hook multiplies into the branch output
where no GEMM can carry it). ProRes never replaces or copies a parameter, so ZeRO-3's partitioning (which
only manages parameters) does not touch it, and every rank computes the same α from the same
`engine.global_steps` (no communication).

`t` is `engine.global_steps`, the number of optimizer steps taken so far (it advances once per
gradient-accumulation boundary), so the batch of optimizer step t trains with α(t), as in the Composer
algorithm. Under gradient accumulation every micro-batch of a step sees the same α.

Also here: `lr_lambda_from` (the YAML-style LR schedules as a plain function of the step, for a torch
`LambdaLR`; it lives in `prores_algo.lr_schedules`), `check_deepspeed_config` (batch-size / accumulation / ZeRO-stage conflicts raised as
ValueError naming the key), and `save_checkpoint` / `load_checkpoint`, which store the ProRes
configuration with the checkpoint and refuse to resume under a different one.

This module imports DeepSpeed lazily: the config checks and LR functions work without it.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence

import torch

# the LR helpers are plain functions of the step (prores_algo.lr_schedules); re-exported for DeepSpeed loops
from prores_algo.lr_schedules import LR_SCHEDULES, build_lr_scheduler, lr_lambda_from, lr_scheduler_factory
from prores_algo.spec import DISABLED_RECORD, ProResSpec, check_resume
from prores_algo.surgery import ProResController
from prores_algo.surgery import apply_prores as apply_prores_to_module
from prores_algo.warn import warn_user

__all__ = [
    'DeepSpeedProRes',
    'apply_prores',
    'attach_prores',
    'lr_lambda_from',
    'build_lr_scheduler',
    'lr_scheduler_factory',
    'check_deepspeed_config',
    'save_checkpoint',
    'load_checkpoint',
    'check_checkpoint',
    'prores_state',
    'CLIENT_STATE_KEY',
    'SIDECAR_FILE',
    'LR_SCHEDULES',
]

CLIENT_STATE_KEY = 'prores'  # key of the ProRes configuration in DeepSpeed's client_state
SIDECAR_FILE = 'prores.json'  # written next to the checkpoint files so a mismatch is caught before loading
_TIME_UNITS = ('steps', 'samples')


# ---------------------------------------------------------------------------------------------------
# ProRes on an engine
# ---------------------------------------------------------------------------------------------------
class DeepSpeedProRes:
    """A `ProResController` driven by a DeepSpeed engine: `step(engine)` sets α from the engine's clock.

    `time_unit='steps'` (default) reads `engine.global_steps` (optimizer steps), 'samples' reads
    `engine.global_samples`; `t_warmup` is in that unit.
    """

    def __init__(self, controller: ProResController, time_unit: str = 'steps', spec: ProResSpec | None = None):
        if time_unit not in _TIME_UNITS:
            raise ValueError(f'time_unit must be one of {_TIME_UNITS}, got {time_unit!r}')
        self.controller = controller
        self.spec = (
            spec
            if spec is not None
            else ProResSpec(controller.schedule, controller.warmup_steps, remove_when_done=controller.remove_when_done)
        )
        self.time_unit = time_unit
        self._checked_dtype = False

    # --- the loop API ------------------------------------------------------------------------------
    def time_of(self, engine) -> int:
        """The engine's clock in `time_unit` (what `step(engine)` passes to the schedule)."""
        attr = 'global_steps' if self.time_unit == 'steps' else 'global_samples'
        try:
            return int(getattr(engine, attr))
        except AttributeError:
            raise TypeError(
                f'prores.step(engine) needs a DeepSpeed engine (an object with `.{attr}`), got '
                f'{type(engine).__name__}; use prores.set_step(t) to drive α yourself'
            ) from None

    def step(self, engine) -> list[float]:
        """Set every α to its value at the engine's current step; returns them. Call before the forward."""
        if not self._checked_dtype:
            self._keep_alpha_fp32()
        return self.controller.set_step(self.time_of(engine))

    def set_step(self, t: float) -> list[float]:
        return self.controller.set_step(t)

    def remove(self) -> None:
        self.controller.remove()

    # --- introspection -----------------------------------------------------------------------------
    @property
    def alphas(self) -> list[float]:
        return self.controller.alphas

    @property
    def schedule(self) -> str:
        return self.controller.schedule

    @property
    def t_warmup(self) -> float:
        return self.controller.warmup_steps

    @property
    def num_layers(self) -> int:
        return self.controller.num_layers

    @property
    def removed(self) -> bool:
        return self.controller.removed

    def state(self) -> dict:
        """The ProRes configuration a checkpoint records (α itself is a function of the step: not saved)."""
        return self.spec.record(self.num_layers, t_warmup=float(self.t_warmup), time_unit=self.time_unit)

    def _keep_alpha_fp32(self) -> None:
        # DeepSpeed 0.19 keeps buffers fp32 under bf16/fp16 (unless `buffer_dtype` is configured); older
        # releases cast the whole module with .half()/.bfloat16(). α must stay fp32 so that intermediate
        # values are not rounded to 8 bits of mantissa (a 0-dim fp32 tensor does not promote bf16 outputs).
        if not self.controller.removed:
            self.controller.ensure_fp32()
        self._checked_dtype = True

    def __repr__(self) -> str:
        return f'DeepSpeedProRes({self.controller!r}, time_unit={self.time_unit!r})'


def apply_prores(
    model: torch.nn.Module,
    schedule: str = 'linear',
    t_warmup: float | str | None = None,
    *,
    layer_class: type | str | None = None,
    branches: Sequence[str] | None = None,
    layer_pattern: str | None = None,
    remove_when_done: bool = True,
    mechanism: str = 'auto',
    time_unit: str = 'steps',
    total_steps: int | None = None,
    example_inputs=None,
    advise: bool = True,
) -> DeepSpeedProRes:
    """Apply ProRes to `model` (call before `deepspeed.initialize`; a model built under
    `deepspeed.zero.Init` is fine). Returns a `DeepSpeedProRes`; call `.step(engine)` before each forward.

    `t_warmup` is W in `time_unit` (optimizer steps by default; default W = 1000 steps per layer, the
    paper's T = 1000). `t_warmup='auto'`: W = min(1000·L, 0.25·total_steps), rounded to whole steps
    (`timing.auto_warmup_steps`); it needs `total_steps`, the run length in optimizer steps, and
    `time_unit='steps'`. `layer_class`, `branches`, `layer_pattern`, `remove_when_done`, `mechanism`,
    `example_inputs` (a batch to measure the branches on, for advice in this model's regime) and `advise`
    are `prores_algo.apply_prores`'s. Under ZeRO-3 with `zero.Init` the model cannot run before
    `deepspeed.initialize`: pass `advise=False`, then `warmup_advice.advise_warmup(prores.controller,
    engine, first_batch, every_rank=True)` on every rank (the forward gathers the partitioned weights).
    """
    if hasattr(model, 'global_steps') and hasattr(model, 'module'):
        model = model.module  # a DeepSpeed engine was passed: apply to the model inside it
    spec = ProResSpec(schedule, t_warmup, layer_class, branches, layer_pattern, remove_when_done, mechanism)
    if spec.auto and time_unit != 'steps':  # validated before any hook is attached
        raise ValueError(f"t_warmup='auto' counts optimizer steps: use time_unit='steps', not {time_unit!r}")
    if example_inputs is not None and time_unit != 'steps':  # the advice compares W / L in optimizer steps
        raise ValueError(f"example_inputs advises on W in optimizer steps: use time_unit='steps', not {time_unit!r}")
    controller = apply_prores_to_module(
        model,
        schedule,
        t_warmup,
        total_steps=total_steps,
        layer_class=layer_class,
        branches=branches,
        layer_pattern=layer_pattern,
        remove_when_done=remove_when_done,
        mechanism=mechanism,
        example_inputs=example_inputs,
        advise=advise,
    )
    return DeepSpeedProRes(controller, time_unit, spec)


def attach_prores(*args, **kwargs) -> DeepSpeedProRes:
    """Deprecated name of `apply_prores` (one release)."""
    warn_user('attach_prores is deprecated: use apply_prores', DeprecationWarning)
    return apply_prores(*args, **kwargs)


def prores_state(prores: DeepSpeedProRes | None) -> dict:
    """What a checkpoint records about ProRes (`{'enabled': False}` for a run without it)."""
    if prores is None:
        return dict(DISABLED_RECORD)
    if isinstance(prores, ProResController):
        prores = DeepSpeedProRes(prores)
    return prores.state()


# ---------------------------------------------------------------------------------------------------
_BATCH_KEYS = ('train_micro_batch_size_per_gpu', 'gradient_accumulation_steps', 'train_batch_size')


def _pos_int_or_none(value, where: str):
    if value is None or value == 'auto':
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'{where} must be a positive int (or "auto"), got {value!r}')
    return value


def _batch_with_world(micro, accum, total, world: int):
    """micro batch, accumulation and train_batch_size made consistent with the world size; ValueError
    naming the keys when they cannot be."""
    if micro is not None and accum is not None:
        product = micro * accum * world
        if total is not None and total != product:
            raise ValueError(
                f'DeepSpeed config `train_batch_size` = {total} but train_micro_batch_size_per_gpu ({micro}) x '
                f'gradient_accumulation_steps ({accum}) x world_size ({world}) = {product}: set '
                f'"train_batch_size": {product} (or "auto", or remove it), or change the micro batch size / '
                f'accumulation so that their product with the world size is {total}.'
            )
        total = product
    elif total is not None:
        if micro is None and accum is None:
            accum = 1  # DeepSpeed's default
        known_key, known = (
            ('gradient_accumulation_steps', accum) if micro is None else ('train_micro_batch_size_per_gpu', micro)
        )
        if total % (known * world):
            raise ValueError(
                f'DeepSpeed config `train_batch_size` = {total} is not divisible by {known_key} '
                f'({known}) x world_size ({world}): set "train_batch_size" to a multiple of '
                f'{known * world}, or give both train_micro_batch_size_per_gpu and '
                'gradient_accumulation_steps.'
            )
        if micro is None:
            micro = total // (known * world)
        else:
            accum = total // (known * world)
    return micro, accum, total


def check_deepspeed_config(
    ds_config: Mapping,
    *,
    train_micro_batch_size_per_gpu: int | None = None,
    gradient_accumulation_steps: int | None = None,
    world_size: int | None = None,
    require_stage3: bool = False,
) -> dict:
    """Check a DeepSpeed config against the training config; return a copy with the batch keys filled.

    Raises ValueError naming the key and the fix when
      * `train_micro_batch_size_per_gpu` / `gradient_accumulation_steps` in the JSON differ from the
        values the training config (YAML/CLI) gives;
      * `train_batch_size` != micro × accumulation × world_size;
      * `zero_optimization.stage` is not 3 while `require_stage3`.
    "auto" (the Hugging Face convention) and missing keys are filled from the other values.
    """
    if not isinstance(ds_config, Mapping):
        raise ValueError(f'the DeepSpeed config must be a dict (the parsed JSON), got {type(ds_config).__name__}')
    cfg = copy.deepcopy(dict(ds_config))
    expected = {
        'train_micro_batch_size_per_gpu': _pos_int_or_none(
            train_micro_batch_size_per_gpu, 'train_micro_batch_size_per_gpu (training config)'
        ),
        'gradient_accumulation_steps': _pos_int_or_none(
            gradient_accumulation_steps, 'gradient_accumulation_steps (training config)'
        ),
    }
    world = _pos_int_or_none(world_size, 'world_size')
    values = {k: _pos_int_or_none(cfg.get(k), f'DeepSpeed config `{k}`') for k in _BATCH_KEYS}
    for key, want in expected.items():
        have = values[key]
        if want is not None and have is not None and have != want:
            raise ValueError(
                f'DeepSpeed config `{key}` = {have} but the training config asks for {want}: set '
                f'"{key}": {want} in the DeepSpeed JSON (or "auto", or remove the key), or change the '
                f'training config to {have}.'
            )
        if want is not None:
            values[key] = want
    micro, accum, total = (values[k] for k in _BATCH_KEYS)
    if world is not None:
        micro, accum, total = _batch_with_world(micro, accum, total, world)
    for key, value in zip(_BATCH_KEYS, (micro, accum, total), strict=True):
        if value is not None:
            cfg[key] = value
        elif cfg.get(key) == 'auto':
            del cfg[key]  # DeepSpeed itself does not understand "auto"
    zero = cfg.get('zero_optimization', {})
    if zero is None:
        zero = {}
    if not isinstance(zero, Mapping):
        raise ValueError(f'DeepSpeed config `zero_optimization` must be a mapping, got {zero!r}')
    stage = zero.get('stage', 0)
    if require_stage3 and stage != 3:
        raise ValueError(
            f'DeepSpeed config `zero_optimization.stage` = {stage!r} but ZeRO stage 3 is required here: '
            'set "zero_optimization": {"stage": 3, ...} in the DeepSpeed JSON (e.g. '
            'yamls/deepspeed/zero3.json), or drop the stage-3 requirement.'
        )
    return cfg


# ---------------------------------------------------------------------------------------------------
# Checkpoints with a ProRes guard
# ---------------------------------------------------------------------------------------------------
def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get('RANK', '0'))


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


_RESUME_HINT = (
    "Resume with the checkpoint's ProRes settings (schedule, t_warmup, model depth), or start a fresh run "
    'without load_dir.'
)


def _compare(saved: Mapping, current: Mapping, where: str) -> None:
    check_resume(saved, current, where, _RESUME_HINT)


def _read_latest(load_dir: str) -> str | None:
    path = os.path.join(load_dir, 'latest')
    if os.path.isfile(path):
        with open(path) as f:
            return f.read().strip()
    return None


def save_checkpoint(
    engine,
    prores: DeepSpeedProRes | None,
    save_dir: str,
    tag: str | None = None,
    client_state: dict | None = None,
    **kwargs,
) -> str:
    """`engine.save_checkpoint` with the ProRes configuration in `client_state['prores']` (and in
    `<save_dir>/<tag>/prores.json`). Call on every rank. Returns the tag."""
    state = dict(client_state or {})
    state[CLIENT_STATE_KEY] = prores_state(prores)
    tag = str(tag) if tag is not None else f'global_step{engine.global_steps}'
    # The sidecar goes first: DeepSpeed writes `latest` as the last step of its save, so a process killed
    # right after that must not leave a `latest` tag without its ProRes record (check_checkpoint would
    # then refuse the resume). A kill before `latest` moves leaves the previous tag in use.
    if _rank() == 0:
        folder = os.path.join(save_dir, tag)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, SIDECAR_FILE + '.tmp')
        with open(tmp, 'w') as f:
            json.dump(state[CLIENT_STATE_KEY], f, indent=2, sort_keys=True)
        os.replace(tmp, os.path.join(folder, SIDECAR_FILE))
    _barrier()
    engine.save_checkpoint(save_dir, tag=tag, client_state=state, **kwargs)
    return tag


def check_checkpoint(
    load_dir: str, prores: DeepSpeedProRes | Mapping | None, tag: str | None = None, *, strict: bool = True
) -> str:
    """Check, without loading anything, that checkpoint `<load_dir>/<tag>` (tag default: `latest`) was
    saved under the same ProRes configuration as `prores` (a `DeepSpeedProRes`, None for ProRes off,
    or a `prores_state()` dict). Raises ValueError naming the differing fields; returns the tag.

    Lets a loop refuse a bad resume before it builds a model or a process group."""
    if not load_dir or not os.path.isdir(load_dir):
        raise FileNotFoundError(f'load_dir {load_dir!r} is not a folder with DeepSpeed checkpoints')
    resolved = str(tag) if tag is not None else _read_latest(load_dir)
    if resolved is None:
        raise FileNotFoundError(f'no checkpoint tag given and no `latest` file in {load_dir!r}; pass tag=')
    folder = os.path.join(load_dir, resolved)
    if not os.path.isdir(folder):
        have = sorted(d for d in os.listdir(load_dir) if os.path.isdir(os.path.join(load_dir, d)))
        raise FileNotFoundError(f'checkpoint tag {resolved!r} not found in {load_dir!r} (tags present: {have})')
    current = dict(prores) if isinstance(prores, Mapping) else prores_state(prores)
    sidecar = os.path.join(folder, SIDECAR_FILE)
    if os.path.isfile(sidecar):
        with open(sidecar) as f:
            _compare(json.load(f), current, f'{folder!r}')
    elif strict:
        raise ValueError(
            f'checkpoint {folder!r} records no ProRes configuration ({SIDECAR_FILE} missing: it was '
            'not saved with prores_algo.integrations.deepspeed.save_checkpoint). Pass strict=False to '
            'load it anyway.'
        )
    return resolved


def load_checkpoint(
    engine,
    prores: DeepSpeedProRes | None,
    load_dir: str,
    tag: str | None = None,
    *,
    strict: bool = True,
    **kwargs,
) -> tuple[str, dict]:
    """`engine.load_checkpoint` that refuses (ValueError) a checkpoint saved under a different ProRes
    configuration, then sets α to the restored `engine.global_steps`. Returns (load_path, client_state).

    The configuration is checked from `<load_dir>/<tag>/prores.json` *before* anything is loaded
    (`check_checkpoint`), and again from the restored `client_state`. `strict=False` accepts a
    checkpoint that records no ProRes configuration (saved by `engine.save_checkpoint` directly).
    Other keyword arguments go to `engine.load_checkpoint`.
    """
    resolved = check_checkpoint(load_dir, prores, tag, strict=strict)
    load_path, client_state = engine.load_checkpoint(load_dir, tag=resolved, **kwargs)
    if load_path is None:
        raise FileNotFoundError(f'DeepSpeed could not load checkpoint {resolved!r} from {load_dir!r}')
    client_state = client_state or {}
    saved = client_state.get(CLIENT_STATE_KEY)
    folder = os.path.join(load_dir, resolved)
    if saved is not None:
        _compare(saved, prores_state(prores), f'{folder!r} (client_state)')
    elif strict:
        raise ValueError(
            f'checkpoint {folder!r} has no `{CLIENT_STATE_KEY}` entry in client_state; pass '
            'strict=False to load it anyway'
        )
    if prores is not None:
        prores.step(engine)
    return load_path, client_state
