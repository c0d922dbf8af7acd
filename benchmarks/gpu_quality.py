#!/usr/bin/env python
"""ProRes vs baseline on one GPU, on a wider model than the CPU study: paired seeds, in parallel processes.

The CPU study (`benchmarks/quality.py`) runs at width 64, where the official N(0, 0.02) initialisation
makes every branch start small against the residual stream (std * sqrt(width) = 0.16; 0.55 in the
paper's 768-wide 130M model). This check runs the same paired comparison on a 12-layer, 512-wide
reference decoder (std * sqrt(width) = 0.45, near the paper's regime), Pre-LN, official initialisation,
byte-level text of the Python standard library (read on the machine: no download, no Composer or
streaming needed), bf16 autocast, AdamW (0.9, 0.95) wd 0.1, clip 1.0, WSD (2% LR warmup, linear decay
over the last 10%), W = 25% of the run, so a run is 4 W steps.

Every (W / L, seed, variant) is one process on the same GPU, all started together; each writes its
result as soon as it has it, and stops at the deadline (`--budget_s`) if it has not finished, so a
slow machine gives fewer finished pairs, never a hung call. The summary is written to
$OUT/gpu_quality.json (or --out) after every finished run.

    python -m benchmarks.gpu_quality                  # GPU: W / L 100 and 250, seeds 0-2 (~5 min on an H200)
    python -m benchmarks.gpu_quality --smoke          # CPU, tiny, seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VAL_EVERY = 20  # every 20th stdlib file (sorted order) is validation text


def stdlib_bytes(max_bytes: int) -> tuple[bytes, bytes]:
    """(train, val) byte strings from this machine's standard library sources, files in sorted order."""
    root = Path(sysconfig.get_paths()['stdlib'])
    train, val, n = bytearray(), bytearray(), 0
    for i, path in enumerate(sorted(p for p in root.rglob('*.py') if 'site-packages' not in p.parts)):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        (val if i % VAL_EVERY == 0 else train).extend(data + b'\0')
        n += len(data)
        if n >= max_bytes:
            break
    return bytes(train), bytes(val)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--smoke', action='store_true', help='CPU, tiny model, a few steps')
    p.add_argument('--layers', type=int, default=12)
    p.add_argument('--d_model', type=int, default=512)
    p.add_argument('--heads', type=int, default=8)
    p.add_argument('--seq', type=int, default=256)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--lr', type=float, default=2e-3, help="the official scripts' LR at 71M / 130M")
    p.add_argument('--spl', default='100,250', help='W / L values (optimizer steps of α warmup per layer)')
    p.add_argument('--seeds', default='0,1,2')
    p.add_argument('--w_fraction', type=float, default=0.25)
    p.add_argument('--max_bytes', type=int, default=40_000_000)
    p.add_argument('--eval_seqs', type=int, default=256)
    p.add_argument('--budget_s', type=float, default=300.0, help='every run stops at this wall time')
    p.add_argument('--out', default=None, help='JSON path (default $OUT/gpu_quality.json)')
    p.add_argument('--worker', default=None, help=argparse.SUPPRESS)  # one run: 'spl,seed,variant'
    p.add_argument('--deadline', type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.d_model, args.heads, args.seq, args.batch = 2, 32, 4, 32, 4
        args.spl, args.seeds, args.max_bytes, args.eval_seqs = '2', '0,1', 400_000, 8
    return args


def lr_at(step: int, total: int, peak: float) -> float:
    """WSD: linear warmup over 2% of the run, constant, linear decay to 0 over the last 10%."""
    warm, decay = max(1, int(0.02 * total)), max(1, int(0.1 * total))
    if step < warm:
        return peak * (step + 1) / warm
    if step >= total - decay:
        return peak * max(0.0, (total - step) / decay)
    return peak


def train_one(args, spl: float, seed: int, variant: str, deadline: float) -> dict:
    """One run: returns its final validation loss (nats/byte), or how far it got by the deadline."""
    import torch
    import torch.nn.functional as F

    from prores_algo.surgery import apply_prores
    from prores_algo.training.models.decoder import build_decoder

    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device('cuda' if cuda else 'cpu')
    torch.manual_seed(seed)
    train, val = stdlib_bytes(args.max_bytes)
    train_t = torch.frombuffer(bytearray(train), dtype=torch.uint8).long()
    val_t = torch.frombuffer(bytearray(val), dtype=torch.uint8).long()
    model = build_decoder(
        vocab_size=256, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, max_seq_len=args.seq
    ).to(device)
    W = int(round(spl * args.layers))
    total = int(round(W / args.w_fraction))
    prores = apply_prores(model, schedule='linear', t_warmup=W) if variant == 'prores' else None
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=cuda)
    data_gen = torch.Generator().manual_seed(seed)  # the same batches for both variants of a seed
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    t0, step, losses = time.time(), 0, []
    while step < total:
        if time.time() > deadline:
            return {'finished': False, 'steps_done': step, 'steps': total, 'wall_s': time.time() - t0}
        if prores is not None:
            prores.set_step(step)
        starts = torch.randint(0, len(train_t) - args.seq - 1, (args.batch,), generator=data_gen)
        x = torch.stack([train_t[s : s + args.seq + 1] for s in starts.tolist()]).to(device, non_blocking=True)
        for g in opt.param_groups:
            g['lr'] = lr_at(step, total, args.lr)
        with autocast:
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % max(1, total // 50) == 0:
            losses.append(float(loss))
    model.eval()
    n = min(args.eval_seqs, (len(val_t) - 1) // args.seq)
    ev = val_t[: n * args.seq + 1]
    xs = torch.stack([ev[i * args.seq : i * args.seq + args.seq + 1] for i in range(n)]).to(device)
    tot = 0.0
    with torch.no_grad(), autocast:
        for i in range(0, n, 32):
            lg = model(xs[i : i + 32, :-1]).float()
            tot += float(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), xs[i : i + 32, 1:].reshape(-1), reduction='sum'))
    val_loss = tot / (n * args.seq)
    return {
        'finished': True,
        'val_loss': val_loss,
        'steps': total,
        't_warmup': W,
        'wall_s': time.time() - t0,
        'curve': losses,
        'diverged': not math.isfinite(val_loss),
    }


def summarize(runs: dict, spls: list[float], seeds: list[int]) -> dict:
    from prores_algo.paired_stats import summarize_deltas

    out = {}
    for spl in spls:
        pairs = [(runs.get(f'{spl:g}-s{s}-baseline'), runs.get(f'{spl:g}-s{s}-prores')) for s in seeds]
        done = [(b, p) for b, p in pairs if b and p and b.get('finished') and p.get('finished')]
        d = [p['val_loss'] - b['val_loss'] for b, p in done]
        out[f'{spl:g}'] = {
            **summarize_deltas(d),
            'per_seed': d,
            'unfinished_pairs': len(pairs) - len(done),
            'baseline': [b['val_loss'] for b, _ in done],
        }
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:  # one run, in its own process
        spl, seed, variant = args.worker.split(',')
        r = train_one(args, float(spl), int(seed), variant, args.deadline)
        print('RESULT ' + json.dumps(r), flush=True)
        return 0
    out = Path(args.out or Path(os.environ.get('OUT', ROOT / 'runs' / 'benchmarks')) / 'gpu_quality.json')
    out.parent.mkdir(parents=True, exist_ok=True)
    spls = [float(x) for x in args.spl.split(',')]
    seeds = [int(x) for x in args.seeds.split(',')]
    deadline = time.time() + args.budget_s
    # every setting goes to the workers explicitly (the smoke sizes already applied), the output path does not
    forwarded = [f'--{k}={v}' for k, v in vars(args).items() if k not in ('smoke', 'out', 'worker', 'deadline')]
    forwarded += ['--smoke'] if args.smoke else []
    env = {**os.environ, 'PYTHONPATH': f'{ROOT}{os.pathsep}{os.environ.get("PYTHONPATH", "")}'}
    if args.smoke:
        env['OMP_NUM_THREADS'] = '1'
    procs = {}
    for spl in spls:
        for seed in seeds:
            for variant in ('baseline', 'prores'):
                key = f'{spl:g}-s{seed}-{variant}'
                cmd = [sys.executable, '-m', 'benchmarks.gpu_quality', *forwarded]
                cmd += ['--worker', f'{spl},{seed},{variant}', '--deadline', str(deadline)]
                procs[key] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    import torch

    result = {
        'benchmark': 'gpu_quality',
        'config': {k: v for k, v in vars(args).items() if k not in ('worker', 'deadline', 'out')},
        'device': torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.smoke else 'cpu',
        'torch': torch.__version__,
        'runs': {},
    }
    for key, proc in procs.items():
        stdout, _ = proc.communicate()
        line = next((ln for ln in stdout.splitlines() if ln.startswith('RESULT ')), None)
        result['runs'][key] = json.loads(line[7:]) if line else {'finished': False, 'error': f'exit {proc.returncode}'}
        result['summary'] = summarize(result['runs'], spls, seeds)
        out.write_text(json.dumps(result, indent=1))
        r = result['runs'][key]
        print(key, {k: r.get(k) for k in ('finished', 'val_loss', 'steps', 'wall_s', 'error')}, flush=True)
    for spl, s in result['summary'].items():
        print(
            f'W/L {spl}: Δ {s["delta_mean"]} ± {s["delta_se"]} ({s["wins"]}/{s["n"]} seeds ahead, '
            f'{s["verdict"]}); unfinished pairs {s["unfinished_pairs"]}',
            flush=True,
        )
    print('wrote', out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
