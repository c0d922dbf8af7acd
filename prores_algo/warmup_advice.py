"""Is this ProRes warmup long enough for *this* model? What the factor study measured, as data, and the
check that measures a user's model on its first batch.

`benchmarks/quality.py` paired ProRes and baseline runs (8 layers × 64 wide, byte-level text, 6 seeds
per point) across the steps of α warmup per layer (W / L), the norm placement and the initialisation.
What decided whether a short warmup hurt was how large the residual branches start against the stream
they join (`measures.branch_to_stream_ratio`) and, with it, where the norm sits:

* Pre-LN, branches small at init (ratio 0.058, the official N(0, 0.02) at width 64): ProRes behind in
  6 of 6 seeds at W / L = 12 and 25, still behind at 50 (4 of 6), ahead in 6 of 6 at 100.
* A norm on the stream (Post-LN), branches small (0.010, the same init): erratic at W / L = 12 (behind in
  4 of 5 seeds, one ProRes run stalled), ahead or inside the seed noise from 25 on.
* Branches larger (0.13–0.48: PyTorch's default init, a 768-wide model's scales, a small embedding), in
  either placement: ahead or inside the seed noise at every W / L tested, from 12 (the shortest) on.

Without a measurement (nothing to run the model on) the conservative `MIN_STEPS_PER_LAYER` holds.
Torch only.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping

import torch

from prores_algo.alpha_schedules import MIN_STEPS_PER_LAYER, PAPER_STEPS_PER_LAYER
from prores_algo.measures import branch_to_stream_ratio
from prores_algo.warn import warn_user

log = logging.getLogger(__name__)

__all__ = [
    'InitMeasure',
    'SMALL_BRANCH_RATIO',
    'STUDY_MIN_STEPS_PER_LAYER',
    'measure_init',
    'measure_and_advise',
    'min_steps_per_layer',
    'warmup_advice',
    'warn_if_short_warmup',
    'advise_warmup',
    'record_advice',
    'MEASURE_SAMPLES',
    'head_of_batch',
    'INIT_RATIO_METRIC',
    'INIT_NORMALISED_METRIC',
    'INIT_MIN_STEPS_METRIC',
]

INIT_RATIO_METRIC = 'prores/init/branch_to_stream'
INIT_NORMALISED_METRIC = 'prores/init/normalised_stream'
INIT_MIN_STEPS_METRIC = 'prores/init/min_steps_per_layer'

MEASURE_SAMPLES = 8  # samples of a batch to measure on: enough positions, little memory for the extra pass

# Between the study's small-branch points (0.058 Pre-LN, 0.010 Post-LN, the official init) and the next
# ones up (0.127 and 0.129, PyTorch's init), which were not behind at any W / L.
SMALL_BRANCH_RATIO = 0.1

# The fewest steps of α warmup per layer at which ProRes was never behind its baseline, per regime
# (6 seeds per point; 12 is the shortest W / L the study ran).
STUDY_MIN_STEPS_PER_LAYER: dict[str, int] = {
    'pre, small branches': MIN_STEPS_PER_LAYER,  # 0.058: behind 6/6 at 12 and 25, 4/6 at 50; ahead 6/6 at 100
    'normalised stream, small branches': 25,  # 0.010: at 12 behind 4/5, one ProRes stall; 5/6 ahead at 25, 6/6 at 50
    'large branches': 12,  # 0.13-0.48, Pre- and Post-LN: ahead or inside the noise at 12, 25 and 100
}


@dataclasses.dataclass(frozen=True)
class InitMeasure:
    """The model as initialised: the median branch-to-stream ratio and whether a norm sits on the stream."""

    ratio: float
    normalised_stream: bool

    @property
    def regime(self) -> str:
        if self.ratio >= SMALL_BRANCH_RATIO:
            return 'large branches'
        return 'normalised stream, small branches' if self.normalised_stream else 'pre, small branches'

    def metrics(self) -> dict[str, float]:
        return {
            INIT_RATIO_METRIC: self.ratio,
            INIT_NORMALISED_METRIC: float(self.normalised_stream),
            INIT_MIN_STEPS_METRIC: float(min_steps_per_layer(self)),
        }


def min_steps_per_layer(measure: InitMeasure | None) -> int:
    """The W / L below which the study saw ProRes behind, for this model's regime (None: not measured)."""
    return MIN_STEPS_PER_LAYER if measure is None else STUDY_MIN_STEPS_PER_LAYER[measure.regime]


@torch.no_grad()
def measure_init(controller, model: torch.nn.Module, *args, **kwargs) -> InitMeasure:
    """Measure `controller`'s model on one forward pass, `model(*args, **kwargs)` in eval mode (no dropout,
    no random numbers drawn), with every α at 1 for the pass: the branches as they will be, not as
    ProRes damps them. α is set back afterwards. `model` may be a wrapper of the controller's model
    (DDP, FSDP, Composer's). Call it before the first optimizer step: later the ratio describes a
    trained model."""
    alphas = None if controller.removed else controller.alphas
    if alphas is not None:
        controller.set_alphas([1.0] * controller.num_layers)
    try:
        r = branch_to_stream_ratio(model, *args, layers=controller.layers, **kwargs)
    finally:
        if alphas is not None:
            controller.set_alphas(alphas)
    return InitMeasure(ratio=float(r['median']), normalised_stream=bool(r['normalised_stream']))


def _average_over_ranks(m: InitMeasure, inputs) -> InitMeasure:
    """`m` averaged over the ranks of the default process group (if one is initialised): every rank gives
    the same advice. A collective: every rank must reach it (a failed measurement arrives as NaN)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return m
    device = _device_of(inputs)
    if dist.get_backend() == 'nccl' and (device is None or device.type != 'cuda'):
        device = torch.device('cuda', torch.cuda.current_device())
    t = torch.tensor([m.ratio, float(m.normalised_stream)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    world = dist.get_world_size()
    return InitMeasure(ratio=float(t[0]) / world, normalised_stream=bool(t[1] == world))


def _device_of(obj) -> torch.device | None:
    """The device of the first tensor inside `obj` (tensors, dicts, lists, tuples), or None."""
    if isinstance(obj, torch.Tensor):
        return obj.device
    items = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (list, tuple)) else ()
    return next((d for d in map(_device_of, items) if d is not None), None)


def warmup_advice(
    warmup_steps: float, num_layers: int, measure: InitMeasure | None = None, auto_run_steps: float | None = None
) -> tuple[bool, str]:
    """(short, message): whether W / L is below what the study needed in this model's regime, and one
    line saying what was measured and what to do. `measure` None: the model was not measured, and the
    conservative `MIN_STEPS_PER_LAYER` applies. `auto_run_steps`: the run length when W came from
    t_warmup='auto' (then the run is too short for the warmup this regime needs). The one place the
    short-warmup advice is worded: every front end and `prores-preview` use it."""
    per_layer = warmup_steps / num_layers
    need = min_steps_per_layer(measure)
    if measure is None:
        where = 'the model was not measured'
    elif measure.normalised_stream:
        where = f'a norm sits on the residual stream (Post-LN-like), branches start at {measure.ratio:.3g} of it'
    else:
        where = f'Pre-LN, branches start at {measure.ratio:.3g} of the stream'
    if per_layer >= need:
        return False, (
            f'ProRes: {where}; W / L = {per_layer:.3g} steps per layer is at or above the {need} at which '
            f'ProRes was not behind its baseline in this regime (benchmarks/RESULTS.md).'
        )
    if measure is None:
        why = (
            f'below {need} per layer the study saw ProRes behind where residual branches start small against '
            f'the stream (Pre-LN, N(0, 0.02) at small width), Post-LN with small branches needed '
            f'{STUDY_MIN_STEPS_PER_LAYER["normalised stream, small branches"]} (and can collapse at a few steps per '
            f'layer), branches at a tenth of the stream or more {STUDY_MIN_STEPS_PER_LAYER["large branches"]}. '
            'To be told for your model, let ProRes measure a batch: apply_prores(..., example_inputs=batch), or '
            'measure_init (on by default where the front end can run the model: the Composer algorithm, the HF '
            'callback outside FSDP and DeepSpeed, a fresh prores-ds-train run)'
        )
    elif measure.regime == 'pre, small branches':
        why = (
            f'with branches this small (below {SMALL_BRANCH_RATIO}) the model already starts near identity, and '
            f'a short ProRes warmup only delays it: behind in 6 of 6 seeds at 12 and 25 steps per layer, still '
            f'behind at 50, ahead at {need}'
        )
    elif measure.regime == 'normalised stream, small branches':
        why = (
            f'with branches this small (below {SMALL_BRANCH_RATIO}) behind a norm, 12 steps per layer was erratic '
            f'(behind in 4 of 5 seeds, one ProRes run stalled) and {need} was not behind'
        )
    else:
        why = (
            f'{need} steps per layer is the shortest warmup the study ran; there and above, branches this large '
            'had ProRes ahead or inside the seed noise in both placements, below it nothing was measured'
        )
    fix = f'Use t_warmup >= {need * num_layers} steps (the paper: {PAPER_STEPS_PER_LAYER * num_layers})'
    head = f'ProRes t_warmup = {warmup_steps:g} steps over {num_layers} layers'
    if auto_run_steps is not None:
        head = f"ProRes t_warmup='auto' gives W = {warmup_steps:g} steps over {num_layers} layers"
        fix = (
            f'auto caps W at a quarter of the run ({auto_run_steps:g} steps long), where the paper would use W = '
            f'{PAPER_STEPS_PER_LAYER * num_layers}: train for at least {4 * need * num_layers} steps'
        )
    return True, (
        f'{head}, W / L = {per_layer:.3g} steps of alpha warmup per layer, and {where}: {why} '
        f'(benchmarks/RESULTS.md). {fix}, turn ProRes off for a run this short, or check with `prores-compare` '
        'on your own config.'
    )


def warn_if_short_warmup(controller, measure: InitMeasure | None = None) -> bool:
    """Warn (once per controller) when W / L, in optimizer steps, is below what ProRes needed: in the
    measured model's regime when `measure` is given, else below the conservative `MIN_STEPS_PER_LAYER`.
    Front ends call it once W is known in steps; True if it warned. A measured model with a long enough
    W gets its advice at INFO level."""
    if controller._warned_short or controller.warmup_steps is None:
        return False
    short, msg = warmup_advice(controller.warmup_steps, controller.num_layers, measure, controller.auto_run_steps)
    if not short:
        if measure is not None:
            log.info(msg)
        return False
    controller._warned_short = True
    warn_user(msg)
    return True


def advise_warmup(controller, model: torch.nn.Module, example_inputs, *, every_rank: bool = False):
    """Measure `model` on `example_inputs` (a tensor, a tuple of positional arguments, or a mapping of
    keyword arguments such as a tokenizer's `BatchEncoding`) and `record_advice` for it; returns the
    `InitMeasure`, or None when nothing could be measured. `every_rank`: average over the ranks of the
    default process group, which every rank must then call (Composer, the HF callback and the DeepSpeed
    loop do; a ZeRO-3 or FSDP forward needs every rank anyway)."""
    if isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, tuple):
        args, kwargs = example_inputs, {}
    else:
        args, kwargs = (example_inputs,), {}
    return measure_and_advise(controller, model, args, kwargs, every_rank=every_rank)


def measure_and_advise(controller, model: torch.nn.Module, args: tuple, kwargs: dict, every_rank: bool = False):
    """`model(*args, **kwargs)` measured, then `record_advice`. The measurement only gives advice: an error in
    its forward pass is a warning and the conservative advice, never the end of a run (nor, with
    `every_rank`, a rank missing from the collective)."""
    failure = None
    try:
        measure = measure_init(controller, model, *args, **kwargs)
    except Exception as e:  # noqa: BLE001 (any error of the user's model: advice is not worth a crash)
        failure = ' '.join(f'{type(e).__name__}: {e}'.split())[:300]
        measure = InitMeasure(ratio=math.nan, normalised_stream=False)
    if every_rank:
        measure = _average_over_ranks(measure, (args, kwargs))
    return record_advice(controller, measure, failure)


def record_advice(controller, measure: InitMeasure, failure: str | None = None) -> InitMeasure | None:
    """Keep `measure` as `controller.init_measure` and warn if W / L is short for its regime. A measurement
    without a finite ratio (the forward failed: `failure`, or gave a NaN) counts as not measured: the
    conservative advice, and None."""
    if not math.isfinite(measure.ratio):
        why = failure or f'the branch / stream ratio came out {measure.ratio}'
        warn_user(
            f'ProRes could not measure the residual branches on the first batch ({why}); W / L is judged as '
            f'for an unmeasured model ({MIN_STEPS_PER_LAYER} steps per layer)'
        )
        measure = None
    controller.init_measure = measure
    warn_if_short_warmup(controller, measure)
    return measure


def head_of_batch(batch, n: int):
    """The first `n` samples of a batch: every tensor whose first dimension is the batch size is sliced (inside
    any dict, list or tuple); others (a packed `pixel_values`, `cu_seq_lens`, a scalar) are kept whole, so
    the batch stays consistent. The batch size is that of `input_ids` where there is one, else of the first
    tensor; a batch of `n` samples or fewer is returned as it is."""
    size = _batch_size(batch)
    if size is None or size <= n:
        return batch
    return _head(batch, n, size)


def _batch_size(batch) -> int | None:
    if isinstance(batch, Mapping) and isinstance(batch.get('input_ids'), torch.Tensor) and batch['input_ids'].ndim:
        return batch['input_ids'].shape[0]
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.ndim else None
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    return next((b for b in map(_batch_size, items) if b is not None), None)


def _head(batch, n: int, size: int):
    if isinstance(batch, torch.Tensor):
        return batch[:n] if batch.ndim and batch.shape[0] == size else batch
    if isinstance(batch, Mapping):
        return {k: _head(v, n, size) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, '_fields'):  # a namedtuple
        return type(batch)(*(_head(v, n, size) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_head(v, n, size) for v in batch)
    return batch
