#!/usr/bin/env python
"""ProRes overhead check on one GPU: plain PyTorch (+ torch.compile), ProRes on vs off.

Runs where only torch is installed (the occasional GPU machine: Python 3.12, torch 2.11, no Composer,
DeepSpeed or streaming). It imports only the torch-only core of prores_algo: schedules, policies,
surgery and models/decoder.

What it measures, for a ~350M reference decoder (d_model 1024, 24 layers, 16 heads, vocab 32000,
seq 1024), bf16 autocast, AdamW, grad clipping:
  * eager, then torch.compile (regional: every Block compiled; identical blocks share one compiled
    graph), each with ProRes off (no hooks) and on with each of its two mechanisms, in interleaved
    repeats (the order rotates): `hook` multiplies each branch output by α in a forward hook
    (`mechanism='hook'`), `gemm` (the default, `mechanism='auto'`) applies α inside the branch
    Linear's matrix multiplies (prores_algo/scaled_linear.py). ProRes runs mid-warmup: linear schedule
    at t = T/2 + i, so every layer's α changes at every step;
  * steady-state step time (median over timed steps after warmup steps), tokens/s, MFU (llm-foundry:
    Decoder.flops_per_token(seq) per token; peak bf16 dense 989 TFLOP/s for H100 SXM / H200), the
    on/off step-time ratio and peak-memory ratio (peak above the memory held at the start of a
    segment: activations + gradients; the other model's resident weights cancel out);
  * compile time (first step of each variant minus a steady step), and the number of torch.compile
    graph compilations caused by α updates during the timed steps (expected 0: α is a 0-dim buffer
    updated in place) and after `remove()` once warmup is over (the hooks change: a new graph, or
    reuse of the hook-free graph already compiled for the "off" model);
  * if `deepspeed` imports: a short single-GPU ZeRO-3 run of prores_algo.training.deepspeed.loop; otherwise says why
    it was skipped.
Results: printed, and written as JSON to $OUT/gpu_check.json when $OUT is set (after every phase, so
a timeout still leaves partial results).

    python -m benchmarks.gpu_check                 # on the GPU machine (see gpu_check.sh)
    python -m benchmarks.gpu_check --smoke         # CPU, tiny model, 3 steps, no compile (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

PEAK_BF16 = {'H100 PCIe': 756e12, 'H100': 989e12, 'H200': 989e12, 'GH200': 989e12, 'A100': 312e12}


# ---------------------------------------------------------------------------------------------------
def import_core():
    """(schedules, surgery, decoder) from prores_algo without Composer.

    prores_algo/__init__.py imports only the torch-only core and resolves Composer-backed names lazily,
    so a plain import works. Should a future __init__ import something missing here, fall back to
    loading the core modules under a bare package object that skips __init__.py."""
    try:
        from prores_algo import alpha_schedules, surgery
        from prores_algo.training.models import decoder

        return alpha_schedules, surgery, decoder, 'package'
    except ImportError as e:
        for name in [m for m in sys.modules if m == 'prores_algo' or m.startswith('prores_algo.')]:
            del sys.modules[name]
        for name, sub in (
            ('prores_algo', 'prores_algo'),
            ('prores_algo.training.models', 'prores_algo/training/models'),
        ):
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(ROOT / sub)]
            sys.modules[name] = pkg
        schedules = importlib.import_module('prores_algo.alpha_schedules')
        surgery = importlib.import_module('prores_algo.surgery')
        decoder = importlib.import_module('prores_algo.training.models.decoder')
        return schedules, surgery, decoder, f'bare (package __init__ failed: {e})'


class CountingBackend:
    """A torch.compile backend that counts the graphs it is asked to compile and delegates."""

    def __init__(self, inner: str = 'inductor'):
        self.inner = inner
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        if self.inner == 'inductor':
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(self.inner)(gm, example_inputs)


def dynamo_counts() -> dict:
    try:
        from torch._dynamo.utils import counters

        return {
            'unique_graphs': int(counters['stats'].get('unique_graphs', 0)),
            'frames_ok': int(counters['frames'].get('ok', 0)),
            'recompiles': int(sum(counters['recompiles'].values())) if 'recompiles' in counters else None,
        }
    except Exception as e:  # private API: never let it sink the run
        return {'error': repr(e)}


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    if device.type != 'cuda':
        return None, 'cpu'
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16.items():
        if all(part in name for part in key.split()):
            return value, name
    return None, name


# ---------------------------------------------------------------------------------------------------
class GPT2Logits(torch.nn.Module):
    """transformers' GPT-2 (branches end in a dropout after a `Conv1D`) with the reference decoder's
    interface: `model(ids) -> logits`, `num_params`, `flops_per_token`, `param_groups`."""

    def __init__(self, args):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(
            vocab_size=args.vocab,
            n_positions=args.seq_len,
            n_embd=args.d_model,
            n_layer=args.n_layers,
            n_head=args.n_heads,
        )
        cfg._attn_implementation = 'sdpa'
        self.hf = GPT2LMHeadModel(cfg)
        self.n_layers, self.d_model = args.n_layers, args.d_model

    def forward(self, ids):
        return self.hf(input_ids=ids).logits

    @property
    def blocks(self):  # what the regional compile compiles
        return self.hf.transformer.h

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> int:
        return 6 * self.num_params() + 12 * self.n_layers * self.d_model * seq_len

    def param_groups(self, weight_decay: float) -> list[dict]:
        decay = [p for p in self.parameters() if p.ndim == 2]
        ids = {id(p) for p in decay}
        return [
            {'params': decay, 'weight_decay': weight_decay},
            {'params': [p for p in self.parameters() if id(p) not in ids], 'weight_decay': 0.0},
        ]


class Runner:
    def __init__(self, args, core):
        self.args = args
        self.schedules, self.surgery, self.dec, _ = core
        self.device = torch.device('cuda' if torch.cuda.is_available() and not args.cpu else 'cpu')
        self.cuda = self.device.type == 'cuda'
        self.cfg = self.dec.DecoderConfig(
            vocab_size=args.vocab,
            d_model=args.d_model,
            n_layers=args.n_layers,
            n_heads=args.n_heads,
            max_seq_len=args.seq_len,
        )
        self.W = 1000.0 * args.n_layers  # paper default: T = 1000 steps per layer
        self.t0 = 500.0  # T / 2: every layer mid-ramp, every α changes at every step
        self.t = self.t0
        g = torch.Generator().manual_seed(0)
        self.batches = [
            torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g).to(self.device) for _ in range(4)
        ]
        self.tokens_per_step = args.batch * args.seq_len
        self.models = {}
        self.counter = CountingBackend(args.backend)

    def build(self, name: str, mechanism: str | None):
        """A model with ProRes off (`mechanism=None`) or on with that mechanism ('hook' or 'auto')."""
        torch.manual_seed(0)
        with torch.device(self.device):
            model = self.dec.Decoder(self.cfg) if self.args.arch == 'reference' else GPT2Logits(self.args)
        ctrl = None
        if mechanism is not None:
            try:
                ctrl = self.surgery.apply_prores(model, 'linear', t_warmup=self.W, mechanism=mechanism)
            except TypeError:  # a core from before the mechanism option: the hook is all it has
                if mechanism != 'hook':
                    raise
                ctrl = self.surgery.apply_prores(model, 'linear', t_warmup=self.W)
        if ctrl is not None:
            ctrl.set_step(self.t0)
        opt = torch.optim.AdamW(
            model.param_groups(0.1), lr=3e-4, betas=(0.9, 0.95), **({'fused': True} if self.cuda else {})
        )
        self.models[name] = {'model': model, 'ctrl': ctrl, 'opt': opt, 'i': 0}
        return model

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def step(self, name: str):
        m = self.models[name]
        model, ctrl, opt = m['model'], m['ctrl'], m['opt']
        if ctrl is not None and not ctrl.removed:
            self.t += 1
            ctrl.set_step(self.t)  # α changes every step
        ids = self.batches[m['i'] % len(self.batches)]
        m['i'] += 1
        ac = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.args.bf16 else contextlib.nullcontext()
        with ac:
            logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def segment(self, name: str, warmup: int, steps: int) -> dict:
        """`warmup` untimed steps then `steps` timed steps; per-step times and the segment's peak memory."""
        first = None
        for k in range(warmup):
            t = time.perf_counter()
            self.step(name)
            self.sync()
            if k == 0:
                first = time.perf_counter() - t
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        times, losses = [], []
        for _ in range(steps):
            t = time.perf_counter()
            losses.append(self.step(name).detach())
            self.sync()
            times.append(time.perf_counter() - t)
        out = {'times': times, 'first_step_s': first, 'loss_last': float(losses[-1]) if losses else None}
        if self.cuda:
            out['peak_bytes'] = torch.cuda.max_memory_allocated()
            out['peak_above_base_bytes'] = out['peak_bytes'] - base
        return out

    def phase(self, label: str, warmup: int, steps: int, repeats: int) -> dict:
        names = list(self.models)
        segs = {n: [] for n in names}
        for r in range(repeats):
            order = names[r % len(names) :] + names[: r % len(names)]  # rotate: every variant runs first once
            for name in order:
                segs[name].append(self.segment(name, warmup if r < 2 else max(1, warmup // 2), steps))
        res = {}
        fpt = self.models['off']['model'].flops_per_token(self.args.seq_len)
        peak, _ = peak_flops(self.device)
        for name, ss in segs.items():
            times = [t for s in ss for t in s['times']]
            med = statistics.median(times)
            tps = self.tokens_per_step / med
            res[name] = {
                'median_step_s': med,
                'p10_step_s': _quantile(times, 0.1),
                'p90_step_s': _quantile(times, 0.9),
                'tokens_per_s': tps,
                'mfu': (tps * fpt / peak) if peak else None,
                'first_step_s': ss[0]['first_step_s'],
                'timed_steps': len(times),
                'segment_medians_s': [statistics.median(s['times']) for s in ss],
                'loss_last': ss[-1]['loss_last'],
            }
            if self.cuda:
                res[name]['peak_gib'] = max(s['peak_bytes'] for s in ss) / 2**30
                res[name]['peak_above_base_gib'] = max(s['peak_above_base_bytes'] for s in ss) / 2**30
        res['step_time_ratio'] = {n: res[n]['median_step_s'] / res['off']['median_step_s'] for n in names if n != 'off'}
        # per repeat: the variant's segment median over the baseline's in the same repeat (the spread)
        res['step_time_ratio_per_repeat'] = {
            n: [a / b for a, b in zip(res[n]['segment_medians_s'], res['off']['segment_medians_s'], strict=True)]
            for n in names
            if n != 'off'
        }
        if self.cuda:
            res['peak_mem_ratio'] = {
                n: res[n]['peak_above_base_gib'] / res['off']['peak_above_base_gib'] for n in names if n != 'off'
            }
        res['flops_per_token'] = fpt
        for name in names:
            r = res[name]
            print(
                f'[{label}] {name:4s}: {r["median_step_s"] * 1e3:8.2f} ms/step  {r["tokens_per_s"]:10.0f} tok/s'
                f'  MFU {_pct(r["mfu"])}',
                flush=True,
            )
        for n, ratio in res['step_time_ratio'].items():
            extra = f'  peak-mem ratio {res["peak_mem_ratio"][n]:.4f}' if self.cuda else ''
            print(f'[{label}] {n}/off step-time ratio {ratio:.4f}{extra}', flush=True)
        return res


def _quantile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))]


def _pct(x):
    return f'{100 * x:5.1f}%' if x is not None else '  n/a'


# ---------------------------------------------------------------------------------------------------
def run_deepspeed(args) -> dict:
    try:
        import deepspeed  # noqa: F401  (only: does it import here?)
    except Exception as e:
        msg = f'skipped: deepspeed does not import here ({type(e).__name__}: {e})'
        print(f'[deepspeed] {msg}', flush=True)
        return {'status': 'skipped', 'reason': msg}
    if not torch.cuda.is_available():
        return {'status': 'skipped', 'reason': 'no CUDA device'}
    cfg = json.loads((ROOT / 'yamls' / 'deepspeed' / 'zero3.json').read_text())
    cfg.update(train_micro_batch_size_per_gpu=args.ds_micro_batch, gradient_accumulation_steps=1)
    cfg['bf16'] = {'enabled': True}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, 'zero3_bf16.json')
        Path(path).write_text(json.dumps(cfg))
        summary = os.path.join(d, 'summary.json')
        cmd = [
            sys.executable,
            '-m',
            'prores_algo.training.deepspeed.loop',
            '--deepspeed_config',
            path,
            '--n_layers',
            str(args.n_layers),
            '--d_model',
            str(args.d_model),
            '--n_heads',
            str(args.n_heads),
            '--seq_len',
            str(args.seq_len),
            '--vocab_size',
            str(args.vocab),
            '--steps',
            str(args.ds_steps),
            '--prores_warmup',
            str(1000 * args.n_layers),
            '--lr',
            '3e-4',
            '--lr_warmup',
            '2',
            '--require_stage3',
            '--eval_samples',
            str(args.ds_micro_batch),
            '--summary',
            summary,
        ]
        env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_PORT')}
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.ds_timeout)
        except subprocess.TimeoutExpired:
            return {'status': 'timeout', 'timeout_s': args.ds_timeout}
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], flush=True)
            return {'status': 'failed', 'returncode': proc.returncode, 'stderr_tail': proc.stderr[-3000:]}
        s = json.loads(Path(summary).read_text())
    out = {
        'status': 'ok',
        'wall_s': wall,
        'losses': s['losses'],
        'alphas_last': s['alphas'][-1],
        'partition_init': s['partition_init'],
        'zero_stage': s['zero_stage'],
        'train_batch_size': s['train_batch_size'],
    }
    ok = all(a == b for a, b in zip(s['alphas'][-1], _core_alphas(args, s['steps'][-1]), strict=True))
    out['alphas_match_schedule'] = ok
    print(
        f'[deepspeed] ZeRO-3 bf16 single GPU: {len(s["losses"])} steps in {wall:.1f}s, losses '
        f'{s["losses"][0]:.3f} -> {s["losses"][-1]:.3f}, alphas match schedule: {ok}',
        flush=True,
    )
    return out


def _core_alphas(args, t):
    from prores_algo import alpha_schedules

    return alpha_schedules.alphas('linear', args.n_layers, t, 1000 * args.n_layers)


# ---------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--smoke', action='store_true', help='CPU, tiny model, 3 steps, no compile')
    p.add_argument('--cpu', action='store_true', help='run on CPU even if CUDA is available')
    p.add_argument(
        '--arch', choices=('reference', 'gpt2'), default='reference', help="gpt2: transformers' GPT-2 (Conv1D)"
    )
    p.add_argument('--d_model', type=int, default=1024)
    p.add_argument('--n_layers', type=int, default=24)
    p.add_argument('--n_heads', type=int, default=16)
    p.add_argument('--vocab', type=int, default=32000)
    p.add_argument('--seq_len', type=int, default=1024)
    p.add_argument('--batch', type=int, default=16, help='sequences per step (16 x 1024 tokens fits an H100 easily)')
    p.add_argument('--warmup', type=int, default=3, help='untimed steps per segment (first repeats)')
    p.add_argument('--eager_steps', type=int, default=8, help='timed steps per eager segment')
    p.add_argument('--steps', type=int, default=20, help='timed steps per compiled segment')
    p.add_argument('--repeats', type=int, default=3, help='interleaved on/off repeats')
    p.add_argument(
        '--compile',
        choices=('blocks', 'model', 'none'),
        default='blocks',
        help='blocks: regional compile of every Block (one shared graph); model: whole model',
    )
    p.add_argument('--backend', default='inductor', help='inner torch.compile backend (eager/aot_eager for tests)')
    p.add_argument('--no_bf16', dest='bf16', action='store_false')
    p.add_argument('--skip_deepspeed', action='store_true')
    p.add_argument('--ds_steps', type=int, default=8)
    p.add_argument('--ds_micro_batch', type=int, default=8)
    p.add_argument('--ds_timeout', type=int, default=180)
    p.add_argument('--time_budget', type=float, default=420.0, help='skip later phases past this many seconds')
    args = p.parse_args(argv)
    if args.smoke:
        args.cpu, args.d_model, args.n_layers, args.n_heads, args.vocab = True, 64, 2, 4, 128
        args.seq_len, args.batch, args.warmup, args.eager_steps, args.steps, args.repeats = 32, 2, 1, 3, 3, 1
        if '--compile' not in ' '.join(argv if argv is not None else sys.argv):
            args.compile = 'none'
        args.skip_deepspeed = True
    return args


def compiled_phase(runner, args) -> dict:
    """Compile every variant (whole model or block by block), time the first steps (compile time), then
    time the compiled steps while α changes every step, counting graph compilations; last, removal."""
    for name in runner.models:
        model = runner.models[name]['model']
        if args.compile == 'blocks':
            for block in model.blocks:
                block.compile(backend=runner.counter)
        else:
            model.compile(backend=runner.counter)
    comp = {}
    for name in runner.models:  # compile time: first steps of each variant, measured separately
        g0 = runner.counter.graphs
        t = time.perf_counter()
        runner.step(name)
        runner.sync()
        first = time.perf_counter() - t
        t = time.perf_counter()
        runner.step(name)
        runner.sync()
        second = time.perf_counter() - t
        comp[name] = {
            'first_step_s': first,
            'second_step_s': second,
            'compile_s': first - second,
            'graphs': runner.counter.graphs - g0,
        }
        print(
            f'[compile] {name}: first step {first:.1f}s (compile ~{first - second:.1f}s), '
            f'{comp[name]["graphs"]} graph(s)',
            flush=True,
        )
    g_before, d_before = runner.counter.graphs, dynamo_counts()
    res = runner.phase(f'compiled/{args.compile}', args.warmup, args.steps, args.repeats)
    res['compile'] = comp
    res['graphs_compiled_during_timed_steps'] = runner.counter.graphs - g_before
    res['dynamo_counts_before'], res['dynamo_counts_after'] = d_before, dynamo_counts()
    print(
        f'[compiled] graph compilations while α changed every step: '
        f'{res["graphs_compiled_during_timed_steps"]} (expected 0)',
        flush=True,
    )
    # after warmup: set_step(W) removes every hook -> the block graphs change once
    ctrl = runner.models['gemm']['ctrl']
    g = runner.counter.graphs
    ctrl.set_step(runner.W)
    assert ctrl.removed
    runner.step('gemm')
    runner.step('gemm')
    runner.sync()
    res['graphs_compiled_after_remove'] = runner.counter.graphs - g
    print(
        f'[compiled] graph compilations after remove(): {res["graphs_compiled_after_remove"]} '
        '(0 if the hook-free graph of the "off" model is reused, else 1)',
        flush=True,
    )
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    out_dir = os.environ.get('OUT')
    core = import_core()
    runner = Runner(args, core)
    peak, device_name = peak_flops(runner.device)
    result = {
        'env': {
            'python': platform.python_version(),
            'torch': torch.__version__,
            'cuda': torch.version.cuda,
            'device': device_name,
            'peak_bf16_flops': peak,
            'core_import': core[3],
            'composer_imported': 'composer' in sys.modules,
        },
        'config': vars(args),
        'model': {'num_params': None, 'flops_per_token': None},
    }

    def dump():
        result['wall_s'] = time.perf_counter() - t_start
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, 'gpu_check.json'), 'w') as f:
                json.dump(result, f, indent=1, default=str)

    print(json.dumps(result['env']), flush=True)
    try:
        runner.build('off', None)
        on = runner.build('gemm', 'auto')
        runner.build('hook', 'hook')
        result['model'] = {
            'num_params': on.num_params(),
            'flops_per_token': on.flops_per_token(args.seq_len),
            'alphas_at_start': runner.models['gemm']['ctrl'].alphas,
            # which branches the default mechanism scales inside a GEMM ('gemm') or by the output hook
            'mechanisms': getattr(runner.models['gemm']['ctrl'], 'mechanisms', None),
        }
        print(
            f'model: {on.num_params() / 1e6:.1f}M params, {args.batch}x{args.seq_len} tokens/step, '
            f'flops/token {on.flops_per_token(args.seq_len) / 1e9:.3f} GFLOP',
            flush=True,
        )
        result['eager'] = runner.phase('eager', args.warmup, args.eager_steps, args.repeats)
        dump()

        if args.compile != 'none' and time.perf_counter() - t_start < args.time_budget:
            res = compiled_phase(runner, args)
            result['compiled'] = res
            dump()
        elif args.compile != 'none':
            result['compiled'] = {'status': 'skipped', 'reason': 'time budget'}

        if args.skip_deepspeed:
            result['deepspeed'] = {'status': 'skipped', 'reason': '--skip_deepspeed / --smoke'}
            print('[deepspeed] skipped (--skip_deepspeed / --smoke)', flush=True)
        elif time.perf_counter() - t_start > args.time_budget:
            result['deepspeed'] = {'status': 'skipped', 'reason': 'time budget'}
            print('[deepspeed] skipped: time budget', flush=True)
        else:
            del runner.models  # free the GPU for the DeepSpeed process
            if runner.cuda:
                torch.cuda.empty_cache()
            result['deepspeed'] = run_deepspeed(args)
        result['status'] = 'ok'
    except Exception as e:
        result['status'] = 'error'
        result['error'] = ''.join(traceback.format_exception(e))[-4000:]
        print(result['error'], file=sys.stderr, flush=True)
    dump()
    print(f'done in {result["wall_s"]:.1f}s; status {result["status"]}', flush=True)
    return 0 if result['status'] == 'ok' else 1


if __name__ == '__main__':
    sys.exit(main())
