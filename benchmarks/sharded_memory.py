"""Peak memory of one training step under FSDP2 and DeepSpeed ZeRO-3 (2 CPU processes): ProRes off,
ProRes by output hook, ProRes inside the GEMMs.

Why: FSDP2 and ZeRO-3 gather a layer's full weights for its forward and free them afterwards. A ProRes
mechanism that kept a gathered (or scaled) copy of a weight alive until the backward would raise the
peak by the unsharded size of every layer, which is what sharding exists to avoid. Both mechanisms save
for the backward exactly what `F.linear` saves (the input and the weight it was given); this benchmark
checks that the peak does not move.

How: each variant builds the same reference decoder (same seed) in the same processes, attaches ProRes
before wrapping (as Composer's INIT and `apply_prores` do), takes 2 warm-up steps, then measures 3 more
steps (20 at the smoke size) on every rank and keeps the smallest: the peak of live CPU tensor bytes
above the step's start, replayed from the allocator's `[memory]` profiler events (`benchmarks._common`).
All-gather and reduce-scatter buffers are CPU tensors here, so they are counted.

    python -m benchmarks.sharded_memory            # both stacks, ~1-2 min on 2 cores
    python -m benchmarks.sharded_memory --smoke    # tiny (tests)

Writes benchmarks/results/sharded_memory.json: per stack, variant and rank the peak above start, and per
stack the largest ratio variant / off over ranks, and whether the weight-copy control was seen.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

from benchmarks._common import ROOT, machine_info, peak_bytes_above_start, write_json

OUT = ROOT / 'benchmarks' / 'results' / 'sharded_memory.json'
STACKS = ('fsdp2', 'zero3')
# ProRes off; on with mechanism 'hook'; on with mechanism 'auto' (GEMM); and a control that is not a ProRes
# mechanism: α applied to a scaled *copy* of each branch weight, which autograd keeps until the backward.
# The control must raise the peak, or the measurement could not see the problem it is looking for.
VARIANTS = ('off', 'hook', 'gemm', 'weight_copy')
SIZES = {
    'full': dict(layers=4, d_model=256, heads=4, seq=256, batch=4, vocab=256, reps=3),
    # tiny: a collective's buffer is a large share of the peak, so more steps to find the step's own peak
    'smoke': dict(layers=2, d_model=32, heads=2, seq=16, batch=2, vocab=64, reps=20),
}
TARGET_RATIO = 1.01


# ------------------------------------------------------------------------------------------------ worker
def _model(size: dict):
    import torch

    from prores_algo.training.models.decoder import Decoder, DecoderConfig

    torch.manual_seed(0)
    return Decoder(
        DecoderConfig(
            vocab_size=size['vocab'],
            d_model=size['d_model'],
            n_layers=size['layers'],
            n_heads=size['heads'],
            max_seq_len=size['seq'],
            norm='pre',
        )
    )


def _prores(model, variant: str, layers: int):
    """α strictly between 0 and 1 in every layer (mid-warmup), so every branch is really scaled."""
    if variant == 'off':
        return None
    from prores_algo import apply_prores

    c = apply_prores(model, 'linear', t_warmup=100.0 * layers, mechanism='hook' if variant == 'hook' else 'auto')
    c.set_step(50.0)
    if variant == 'weight_copy':
        alphas = c.alphas
        branches = [(layer.index, module) for layer, _, module, _ in c.scaled_branches()]
        c.remove()
        for idx, module in branches:
            _scale_a_weight_copy(module, alphas[idx])
        return types.SimpleNamespace(alphas=alphas)
    return c


def _scale_a_weight_copy(linear, alpha: float) -> None:
    """The anti-pattern: F.linear(x, α·W, α·b). α·W is a new full-size tensor that autograd saves."""
    import torch.nn.functional as F

    def forward(x):
        return F.linear(x, linear.weight * alpha, None if linear.bias is None else linear.bias * alpha)

    linear.forward = forward


def _fsdp2(size: dict, variant: str):
    import torch
    from torch.distributed.fsdp import fully_shard

    model = _model(size)
    controller = _prores(model, variant, size['layers'])
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(ids):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(ids)[:, :-1].reshape(-1, size['vocab']), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()

    return step, model, opt, controller


def _zero3(size: dict, variant: str):
    import deepspeed
    import torch

    model = _model(size)
    controller = _prores(model, variant, size['layers'])
    cfg = {
        'train_micro_batch_size_per_gpu': size['batch'],
        'gradient_accumulation_steps': 1,
        'zero_optimization': {'stage': 3, 'stage3_param_persistence_threshold': 0},
        'optimizer': {'type': 'AdamW', 'params': {'lr': 1e-3}},
        'zero_allow_untested_optimizer': True,
    }
    engine, opt, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=cfg, dist_init_required=False
    )

    def step(ids):
        loss = torch.nn.functional.cross_entropy(engine(ids)[:, :-1].reshape(-1, size['vocab']), ids[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()

    return step, engine, opt, controller


def _one_peak(step, ids) -> int:
    import torch

    gc.collect()
    peak, _ = peak_bytes_above_start(step, ids)
    torch.distributed.barrier()
    return peak


def _peak_above_start(step, ids, reps: int) -> dict:
    """The smallest of `reps` measured steps: FSDP2's communication runs beside the compute, and whether
    a collective's buffer (allocated by gloo's own thread) is still alive at the compute's peak varies from
    step to step (up to 18% of the peak at the smoke size); the minimum is what the step itself needs."""
    peaks = [_one_peak(step, ids) for _ in range(reps)]
    return {'peak_above_start_bytes': min(peaks), 'peaks': peaks}


def worker(stack: str, size: dict, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if stack == 'zero3':
        import logging

        import deepspeed
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
        deepspeed.init_distributed(dist_backend='gloo', auto_mpi_discovery=False, verbose=False)
    else:
        dist.init_process_group('gloo')
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(1 + rank)
    ids = torch.randint(0, size['vocab'], (size['batch'], size['seq']), generator=g)
    result = {}
    for variant in VARIANTS:
        step, model, opt, controller = (_fsdp2 if stack == 'fsdp2' else _zero3)(size, variant)
        for _ in range(2):  # warm-up: optimizer state exists, allocator settled
            step(ids)
        result[variant] = _peak_above_start(step, ids, size['reps'])
        if controller is not None:
            result[variant]['alphas'] = controller.alphas
        del step, model, opt, controller
        gc.collect()
    Path(out.format(rank=rank)).write_text(json.dumps(result))
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ driver
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _launch(stack: str, mode: str, folder: Path) -> list[dict]:
    out = str(folder / f'{stack}-{{rank}}.json')
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')
    }
    env.update(OMP_NUM_THREADS='1', PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get('PYTHONPATH')])))
    cmd = [
        sys.executable,
        '-m',
        'torch.distributed.run',
        '--nproc_per_node',
        '2',
        '--master_port',
        str(_free_port()),
        '-m',
        'benchmarks.sharded_memory',
        '--worker',
        stack,
        '--mode',
        mode,
        '--rank-out',
        out,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f'{stack} workers failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    return [json.loads((folder / f'{stack}-{r}.json').read_text()) for r in range(2)]


def summarize(ranks: list[dict]) -> dict:
    ratio = {
        v: max(r[v]['peak_above_start_bytes'] / r['off']['peak_above_start_bytes'] for r in ranks) for v in VARIANTS[1:]
    }
    return {
        'per_rank': ranks,
        'max_ratio_vs_off': ratio,
        'within_target': all(ratio[v] <= TARGET_RATIO for v in ('hook', 'gemm')),
        'control_detected': ratio['weight_copy'] > 1.0,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--smoke', action='store_true')
    p.add_argument('--out', default=str(OUT))
    p.add_argument('--worker', choices=STACKS, help=argparse.SUPPRESS)
    p.add_argument('--mode', default='full', help=argparse.SUPPRESS)
    p.add_argument('--rank-out', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, SIZES[args.mode], args.rank_out)
        return {}
    mode = 'smoke' if args.smoke else 'full'
    results = {
        'benchmark': 'sharded_memory',
        'mode': mode,
        'command': 'python -m benchmarks.sharded_memory' + (' --smoke' if args.smoke else ''),
        'config': {**SIZES[mode], 'processes': 2, 'target_ratio': TARGET_RATIO},
        'machine': machine_info(),
        'stacks': {},
    }
    with tempfile.TemporaryDirectory() as d:
        for stack in STACKS:
            results['stacks'][stack] = summarize(_launch(stack, mode, Path(d)))
            print(stack, {v: round(x, 4) for v, x in results['stacks'][stack]['max_ratio_vs_off'].items()}, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out), results)
    print('wrote', args.out)
    return results


if __name__ == '__main__':
    main()
