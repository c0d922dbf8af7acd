"""ProRes overhead benchmark: step time, peak memory and torch.compile recompilations vs a baseline.

Two models of the same size (CPU, fp32): the reference decoder (`prores_algo.training.models.decoder`, Pre-LN)
and a transformers `LlamaForCausalLM`. Three variants of each, with identical initial weights:

  baseline        no ProRes
  prores_warmup   ProRes attached, α changing every step (`controller.set_step(t)` inside the timed step)
  prores_done     ProRes attached and then removed at the end of warmup (must be the baseline again)

Step time: a full training step (zero_grad, forward, cross-entropy, backward, AdamW step). The
variants are interleaved: in each round every variant runs `--steps-per-round` consecutive steps, in
a shuffled order, so a change in machine load hits all variants alike. The headline number is the
median over rounds of (median variant step time in that round / median baseline step time in that
round); the spread over rounds is reported as the interquartile range.

Peak memory: CPU has no `max_memory_allocated`, so we count the CPU allocator directly. Under
`torch.profiler.profile(profile_memory=True)` the allocator reports every allocation and free as a
`[memory]` event (bytes, timestamp). Replaying those events in time order over one full training
step gives the exact high-water mark of live tensor bytes above the step's starting point; adding
the bytes already live at the start (parameters, optimizer state) gives the step's peak. Unlike RSS
this does not depend on glibc's caching of freed memory, and unlike summing saved activations it
also sees transient buffers (the extra `output * α` tensor, the backward's temporaries, AdamW's
update). We also report the bytes autograd saves for backward (`saved_tensors_hooks`, unique
storages) as a cross-check.

Recompilations: the reference model is compiled with a counting backend (`CompileCounter`, eager
execution) and trained for `--compile-steps` steps with ProRes' W in the middle: α changes every step
before W (expected: 0 recompilations, α is a 0-dim buffer updated in place with `fill_`) and the
hooks are removed at W (expected: exactly 1 recompilation, the module's hook dict changed).

Mechanisms (`mechanism_comparison`): ProRes' two ways of applying α side by side with the baseline,
`hook` (multiply each branch output by α in a forward hook) and `gemm` (the default: α inside the
branch Linear's matrix multiplies, prores_algo/scaled_linear.py):
  * extra bytes moved per training step (forward + backward) for the 369M-shaped reference model
    (24 layers, d_model 1024, seq 1024, batch 16), counted exactly: every aten op of the step runs under
    a TorchDispatchMode on fake tensors (no memory, no compute) that adds up the bytes of its tensor
    inputs and outputs (views excluded); the variant's total minus the baseline's is ProRes' traffic,
    which a GPU pays at memory bandwidth;
  * CPU step-time ratios of an eager model where activation traffic matters (width 1024, seq 512).

Usage:
  python -m benchmarks.overhead            # full (a few minutes on 2 shared cores)
  python -m benchmarks.overhead --quick    # < 1 minute
  python -m benchmarks.overhead --smoke    # seconds, for tests (tiny models)
Writes benchmarks/results/overhead.json (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import itertools
import math
import os
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks._common import ROOT, machine_info, peak_bytes_above_start, write_json
from prores_algo.surgery import apply_prores
from prores_algo.training.models.decoder import Decoder, DecoderConfig, default_d_ffn

VARIANTS = ('baseline', 'prores_warmup', 'prores_done')
TARGETS = {
    'step_time_ratio_warmup': 1.02,
    'step_time_ratio_after': 1.01,
    'peak_memory_ratio': 1.01,
    'recompiles_from_alpha_updates': 0,
    'recompiles_at_removal': 1,
}
VOCAB = 257  # the byte tokenizer's vocabulary


# --------------------------------------------------------------------------------------------- models
def build_reference(layers: int, d_model: int, heads: int, seq: int, seed: int):
    torch.manual_seed(seed)
    return Decoder(
        DecoderConfig(vocab_size=VOCAB, d_model=d_model, n_layers=layers, n_heads=heads, max_seq_len=seq, norm='pre')
    )


def build_llama(layers: int, d_model: int, heads: int, seq: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=d_model,
        intermediate_size=default_d_ffn(d_model),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=seq,
        use_cache=False,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = 'sdpa'
    return LlamaForCausalLM(cfg)


BUILDERS = {'reference': build_reference, 'llama': build_llama}


def logits_of(model, x):
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def train_step(model, opt, x, controller=None, t=None):
    if controller is not None:
        controller.set_step(t)
    opt.zero_grad(set_to_none=True)
    logits = logits_of(model, x)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    return loss


class Variant:
    """A way of running the *shared* model: `enter()` / `exit()` (untimed) put ProRes on or take it off.

    All variants train one model instance with one optimizer. Separate deep copies would differ in
    where their tensors sit in memory, and that alone moved step times by ±2% between two *identical*
    copies on this machine, more than the effect being measured.
    """

    def __init__(self, name: str, shared: dict, warmup_len: float, mechanism: str = 'auto'):
        self.name, self.shared, self.warmup_len, self.mechanism = name, shared, warmup_len, mechanism
        self.model, self.opt = shared['model'], shared['opt']
        self.controller = None
        self.t = 0.01 * warmup_len  # W far away: every α strictly between 0 and 1, changing at every step
        self.alphas_seen = []

    def enter(self):
        if self.name.startswith('prores') and self.name != 'prores_done':
            self.controller = apply_prores(self.model, 'linear', t_warmup=self.warmup_len, mechanism=self.mechanism)
            self.controller.set_step(self.t)
        elif self.name == 'prores_done':
            c = apply_prores(self.model, 'linear', t_warmup=self.warmup_len)
            c.set_step(self.warmup_len)  # end of warmup: hooks and buffers are removed
            assert c.removed and c.num_hooks == 0
        assert self.controller is not None or not any(m._forward_hooks for m in self.model.modules())

    def exit(self):
        if self.controller is not None:
            self.alphas_seen.append(self.controller.alphas)
            self.controller.remove()
            self.controller = None

    def step(self, x):
        if self.controller is not None:
            self.t += 1.0
        return train_step(self.model, self.opt, x, self.controller, self.t)

    def check_alpha_moving(self):
        """Every α strictly inside (0, 1) and different from one step to the next."""
        if self.controller is None and not self.alphas_seen:
            return True
        a = self.alphas_seen
        inside = all(0.0 < v < 1.0 for row in a for v in row)
        moving = all(x != y for r1, r2 in itertools.pairwise(a) for x, y in zip(r1, r2, strict=True))
        return bool(a) and inside and moving


# ------------------------------------------------------------------------------------------- timing
def _q(xs, q):
    xs = sorted(xs)
    if not xs:
        return float('nan')
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _ratios(per_round: dict, k: str) -> dict:
    ratios = [a / b for a, b in zip(per_round[k], per_round['baseline'], strict=True)]
    return {'ratio_median': statistics.median(ratios), 'ratio_q25': _q(ratios, 0.25), 'ratio_q75': _q(ratios, 0.75)}


def time_variants(variants: dict, x, rounds: int, per_round: int, warmup_steps: int, seed: int):
    """Interleaved timing. Per step we take both the wall time and the process CPU time.

    The CPU time (`time.process_time`, all threads of this process) is the headline: on a machine whose
    cores are shared with other jobs, the wall time of a step also counts the time this process waited
    for a core, which swamps a 1% effect; the CPU time counts the work the step did. Both are reported.
    """
    rng = random.Random(seed)
    for v in variants.values():
        v.enter()
        for _ in range(warmup_steps):
            v.step(x)
        v.exit()
    clocks = {'cpu': time.process_time, 'wall': time.perf_counter}
    per_round_med = {c: {k: [] for k in variants} for c in clocks}
    for _ in range(rounds):
        order = list(variants)
        rng.shuffle(order)
        for k in order:
            ts = {c: [] for c in clocks}
            variants[k].enter()
            for _ in range(per_round):
                c0, w0 = time.process_time(), time.perf_counter()
                variants[k].step(x)
                ts['cpu'].append(time.process_time() - c0)
                ts['wall'].append(time.perf_counter() - w0)
            variants[k].exit()
            for c in clocks:
                per_round_med[c][k].append(statistics.median(ts[c]))
    out = {}
    for k in variants:
        cpu = _ratios(per_round_med['cpu'], k)
        wall = _ratios(per_round_med['wall'], k)
        out[k] = {
            'timed_steps': rounds * per_round,
            'median_step_s': statistics.median(per_round_med['wall'][k]),
            'median_step_cpu_s': statistics.median(per_round_med['cpu'][k]),
            **cpu,
            'wall_ratio_median': wall['ratio_median'],
            'wall_ratio_q25': wall['ratio_q25'],
            'wall_ratio_q75': wall['ratio_q75'],
            # interference only ever adds time: the lower quartiles of each variant's CPU times are the
            # least disturbed estimate of its cost
            'cpu_q25_ratio': _q(per_round_med['cpu'][k], 0.25) / _q(per_round_med['cpu']['baseline'], 0.25),
        }
    return out


def hook_microbench(d_model: int, batch: int, seq: int, reps: int, seed: int) -> dict:
    """Cost of ProRes' mechanism on one branch, isolated: Linear(d, d) forward + backward with and without
    the α hook (the surgery's own hook function and 0-dim buffer), interleaved, `reps` times each.

    The per-branch extra CPU time x the number of hooked branches (2 per layer) / the baseline step's
    CPU time predicts the step-time ratio with far less noise than timing whole steps.
    """
    from prores_algo.branch_scaling import scale_branch_output
    from prores_algo.scaled_linear import ALPHA_BUFFER

    torch.manual_seed(seed)
    plain = torch.nn.Linear(d_model, d_model, bias=False)
    hooked = copy.deepcopy(plain)
    hooked.register_buffer(ALPHA_BUFFER, torch.tensor(0.5), persistent=False)
    hooked.register_forward_hook(scale_branch_output)
    x = torch.randn(batch, seq, d_model, requires_grad=True)
    g = torch.randn(batch, seq, d_model)

    def once(m):
        t0 = time.process_time()
        m(x).backward(g)
        return time.process_time() - t0

    for _ in range(5):
        once(plain), once(hooked)
    tp, th = [], []
    for i in range(reps):
        if i % 2:
            tp.append(once(plain))
            th.append(once(hooked))
        else:
            th.append(once(hooked))
            tp.append(once(plain))
    return {
        'reps': reps,
        'plain_median_s': statistics.median(tp),
        'hooked_median_s': statistics.median(th),
        'extra_per_branch_s': statistics.median(th) - statistics.median(tp),
        'extra_per_branch_q25_s': _q(th, 0.25) - _q(tp, 0.25),
    }


# ------------------------------------------------------------------------------------------- memory
def _live_state_bytes(variant: Variant) -> int:
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()

    for p in variant.model.parameters():
        add(p)
        add(p.grad)
    for b in variant.model.buffers():
        add(b)
    for st in variant.opt.state.values():
        for t in st.values():
            add(t)
    return total


def step_peak_memory(variant: Variant, x) -> dict:
    """Peak of live CPU tensor bytes over one training step, from the allocator's profiler events."""
    # Free last step's gradients *before* profiling: the profiler cannot see the release of blocks
    # allocated before it started, which would count those gradients twice.
    variant.opt.zero_grad(set_to_none=True)
    gc.collect()
    start = _live_state_bytes(variant)
    peak, n_events = peak_bytes_above_start(variant.step, x)
    return {
        'state_bytes': start,
        'step_peak_above_start_bytes': peak,
        'peak_bytes': start + peak,
        'memory_events': n_events,
    }


def saved_activation_bytes(variant: Variant, x) -> int:
    """Bytes of the (unique) tensors autograd saves for backward during one forward."""
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    if variant.controller is not None:
        variant.controller.set_step(variant.t)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = logits_of(variant.model, x)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    del loss, logits
    return total


# ------------------------------------------------------------------------------------- recompiles
def count_recompiles(build, x, compile_steps: int, warmup_at: int) -> dict:
    """Train a compiled ProRes model across α changes and the end of warmup; count dynamo compilations."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = build()
    controller = apply_prores(model, 'linear', t_warmup=warmup_at)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    frames, alphas = [], []
    for t in range(compile_steps):
        train_step(compiled, opt, x, controller, t)
        frames.append(counter.frame_count)
        alphas.append(round(sum(controller.alphas) / controller.num_layers, 4))
    first = frames[0]
    before = frames[warmup_at - 1] - first  # steps 1 .. W-1: α changes every step
    at_removal = frames[warmup_at] - frames[warmup_at - 1]  # step W: hooks removed
    after = frames[-1] - frames[warmup_at]
    reasons = []
    try:
        from torch._dynamo.utils import guard_failures

        for code, fails in guard_failures.items():
            reasons.extend(f'{getattr(code, "co_name", code)}: {str(r)[:200]}' for r in fails)
    except Exception:  # pragma: no cover - private API
        pass
    torch._dynamo.reset()
    return {
        'compile_steps': compile_steps,
        'warmup_ends_at_step': warmup_at,
        'initial_frames': first,
        'recompiles_from_alpha_updates': before,
        'recompiles_at_removal': at_removal,
        'recompiles_after_removal': after,
        'frames_per_step': frames,
        'mean_alpha_per_step': alphas,
        'guard_failure_reasons': reasons[:10],
    }


# ----------------------------------------------------------------------------------------- driver
def identical_after_removal(base_model, x) -> bool:
    a = copy.deepcopy(base_model)
    b = copy.deepcopy(base_model)
    c = apply_prores(b, 'linear', t_warmup=4)
    c.set_step(0.5)
    c.set_step(4)
    with torch.no_grad():
        return (
            bool(torch.equal(logits_of(a, x), logits_of(b, x)))
            and c.removed
            and not any(m._forward_hooks for m in b.modules())
        )


def bench_model(name: str, args, dims: dict) -> dict:
    build = lambda: BUILDERS[name](dims['layers'], dims['d_model'], dims['heads'], dims['seq'], args.seed)  # noqa: E731
    base = build()
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randint(0, VOCAB, (dims['batch'], dims['seq']), generator=g)
    warmup_len = 1e6
    model = copy.deepcopy(base)
    shared = {
        'model': model,
        'opt': torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1),
    }
    variants = {k: Variant(k, shared, warmup_len) for k in VARIANTS}
    res = {
        'params': sum(p.numel() for p in base.parameters()),
        'identical_after_removal': identical_after_removal(base, x),
    }
    print(
        f'[{name}] {res["params"] / 1e6:.2f}M params; timing {args.rounds} rounds x {args.steps_per_round} steps '
        f'per variant (+{args.warmup_steps} warm-up)',
        flush=True,
    )
    res['timing'] = time_variants(variants, x, args.rounds, args.steps_per_round, args.warmup_steps, args.seed)
    res['alpha_moving_during_timing'] = variants['prores_warmup'].check_alpha_moving()
    n_branches = 2 * dims['layers']
    micro = hook_microbench(dims['d_model'], dims['batch'], dims['seq'], args.micro_reps, args.seed)
    micro['branches'] = n_branches
    micro['predicted_step_ratio'] = (
        1 + n_branches * micro['extra_per_branch_s'] / res['timing']['baseline']['median_step_cpu_s']
    )
    res['hook_microbench'] = micro
    mem = {}
    for k, v in variants.items():
        v.enter()
        mem[k] = step_peak_memory(v, x)
        mem[k]['saved_activation_bytes'] = saved_activation_bytes(v, x)
        v.exit()
    for k in VARIANTS:
        mem[k]['peak_ratio'] = mem[k]['peak_bytes'] / mem['baseline']['peak_bytes']
        mem[k]['step_peak_above_start_ratio'] = (
            mem[k]['step_peak_above_start_bytes'] / mem['baseline']['step_peak_above_start_bytes']
        )
        mem[k]['saved_activation_ratio'] = mem[k]['saved_activation_bytes'] / mem['baseline']['saved_activation_bytes']
    res['memory'] = mem
    if not args.no_compile:
        print(f'[{name}] torch.compile recompilation count over {args.compile_steps} steps', flush=True)
        cdims = dict(dims) if name == 'reference' else dict(dims, layers=min(dims['layers'], 4))
        cbuild = lambda: BUILDERS[name](cdims['layers'], cdims['d_model'], cdims['heads'], cdims['seq'], args.seed)  # noqa: E731
        res['compile'] = count_recompiles(cbuild, x, args.compile_steps, args.compile_steps // 2)
        res['compile']['layers'] = cdims['layers']
    res['summary'] = {
        'step_time_ratio_warmup': res['timing']['prores_warmup']['ratio_median'],
        'step_time_ratio_after': res['timing']['prores_done']['ratio_median'],
        'predicted_step_ratio_warmup': micro['predicted_step_ratio'],
        'cpu_q25_ratio_warmup': res['timing']['prores_warmup']['cpu_q25_ratio'],
        'cpu_q25_ratio_after': res['timing']['prores_done']['cpu_q25_ratio'],
        'wall_time_ratio_warmup': res['timing']['prores_warmup']['wall_ratio_median'],
        'wall_time_ratio_after': res['timing']['prores_done']['wall_ratio_median'],
        'peak_memory_ratio': mem['prores_warmup']['peak_ratio'],
        'peak_memory_ratio_after': mem['prores_done']['peak_ratio'],
        'step_peak_above_start_ratio': mem['prores_warmup']['step_peak_above_start_ratio'],
        'saved_activation_ratio': mem['prores_warmup']['saved_activation_ratio'],
    }
    if 'compile' in res:
        res['summary']['recompiles_from_alpha_updates'] = res['compile']['recompiles_from_alpha_updates']
        res['summary']['recompiles_at_removal'] = res['compile']['recompiles_at_removal']
    return res


# ----------------------------------------------------------------------------------- mechanisms
# ops that move no tensor data: views the schema does not mark as such, and allocations
NO_DATA_OPS = {
    torch.ops.aten.detach.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.new_empty.default,
    torch.ops.aten.empty.memory_format,
    torch.ops.aten.empty_like.default,
}


class _ByteCounter:
    """Adds up the bytes of every aten op's tensor inputs and outputs (views and metadata ops excluded)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        counter = self
        self.bytes = 0
        self.by_op: dict[str, int] = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
                if outs and not func.is_view and func not in NO_DATA_OPS:
                    ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
                    n = sum(t.numel() * t.element_size() for t in ins + outs)
                    counter.bytes += n
                    counter.by_op[str(func)] = counter.by_op.get(str(func), 0) + n
                return out

        self.mode = Mode()


def step_bytes(dims: dict, mechanism: str | None, dtype=torch.float32) -> dict:
    """Bytes read + written by the aten ops of one forward + backward (no optimizer), on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = Decoder(
            DecoderConfig(
                vocab_size=dims['vocab'],
                d_model=dims['d_model'],
                n_layers=dims['layers'],
                n_heads=dims['heads'],
                max_seq_len=dims['seq'],
            )
        ).to(dtype)
        if mechanism is not None:
            c = apply_prores(model, 'linear', t_warmup=1000 * dims['layers'], mechanism=mechanism)
            c.set_step(123)  # every α strictly between 0 and 1
        x = torch.randint(0, dims['vocab'], (dims['batch'], dims['seq']))
        counter = _ByteCounter()
        with counter.mode:
            logits = model(x)
            F.cross_entropy(logits.reshape(-1, dims['vocab']).float(), x.reshape(-1)).backward()
    return {'bytes': counter.bytes, 'by_op': counter.by_op}


def mechanism_comparison(args) -> dict:
    shape = {'layers': 24, 'd_model': 1024, 'heads': 16, 'seq': 1024, 'batch': 16, 'vocab': 32000}
    if args.smoke:
        shape = {'layers': 2, 'd_model': 64, 'heads': 4, 'seq': 32, 'batch': 2, 'vocab': 128}
    res = {'bytes_shape': shape, 'bytes': {}}
    for dtype_name, dtype in (('float32', torch.float32), ('bfloat16', torch.bfloat16)):
        counts = {k: step_bytes(shape, m, dtype) for k, m in (('baseline', None), ('hook', 'hook'), ('gemm', 'auto'))}
        base = counts['baseline']['bytes']
        row = {'baseline_bytes': base}
        for k in ('hook', 'gemm'):
            row[f'{k}_extra_bytes'] = counts[k]['bytes'] - base
            ops = {op: n - counts['baseline']['by_op'].get(op, 0) for op, n in counts[k]['by_op'].items()}
            row[f'{k}_extra_by_op'] = {op: n for op, n in ops.items() if n}
        row['hook_over_gemm_extra'] = (
            row['hook_extra_bytes'] / row['gemm_extra_bytes'] if row['gemm_extra_bytes'] > 0 else None
        )
        res['bytes'][dtype_name] = row
        print(
            f'[mechanisms] {dtype_name}: extra bytes per step, hook {row["hook_extra_bytes"] / 1e9:.3f} GB, '
            f'gemm {row["gemm_extra_bytes"] / 1e9:.6f} GB (baseline step moves {base / 1e9:.1f} GB)',
            flush=True,
        )
    dims = {'layers': 2, 'd_model': 1024, 'heads': 8, 'seq': 512, 'batch': 2}
    rounds = args.rounds
    if args.smoke:
        dims = {'layers': 2, 'd_model': 64, 'heads': 4, 'seq': 32, 'batch': 2}
    base = build_reference(dims['layers'], dims['d_model'], dims['heads'], dims['seq'], args.seed)
    x = torch.randint(0, VOCAB, (dims['batch'], dims['seq']), generator=torch.Generator().manual_seed(args.seed))
    shared = {'model': base, 'opt': torch.optim.AdamW(base.parameters(), lr=1e-4)}
    variants = {
        'baseline': Variant('baseline', shared, 1e6),
        'prores_hook': Variant('prores_hook', shared, 1e6, 'hook'),
        'prores_gemm': Variant('prores_gemm', shared, 1e6, 'auto'),
    }
    print(f'[mechanisms] timing eager {dims} over {rounds} rounds', flush=True)
    res['timing_dims'] = dims
    res['timing'] = time_variants(variants, x, rounds, args.steps_per_round, args.warmup_steps, args.seed)
    res['alpha_moving_during_timing'] = all(v.check_alpha_moving() for v in variants.values())
    for k in ('prores_hook', 'prores_gemm'):
        t = res['timing'][k]
        print(
            f'[mechanisms] {k}: CPU step-time ratio {t["ratio_median"]:.4f} [{t["ratio_q25"]:.4f}, '
            f'{t["ratio_q75"]:.4f}]',
            flush=True,
        )
    return res


def print_table(results: dict) -> None:
    rows = [
        (
            'model',
            'warmup CPU-t ratio [IQR]',
            'after CPU-t ratio [IQR]',
            'wall ratio warm/after',
            'micro-bench predicted',
            'peak mem ratio',
            'saved-act ratio',
            'recompiles α / removal',
            'base step (wall)',
        )
    ]
    for name, r in results['models'].items():
        t, s = r['timing'], r['summary']
        w, a = t['prores_warmup'], t['prores_done']
        rc = (
            f'{s["recompiles_from_alpha_updates"]} / {s["recompiles_at_removal"]}'
            if 'recompiles_at_removal' in s
            else 'n/a'
        )
        rows.append(
            (
                name,
                f'{w["ratio_median"]:.3f} [{w["ratio_q25"]:.3f}, {w["ratio_q75"]:.3f}]',
                f'{a["ratio_median"]:.3f} [{a["ratio_q25"]:.3f}, {a["ratio_q75"]:.3f}]',
                f'{w["wall_ratio_median"]:.3f} / {a["wall_ratio_median"]:.3f}',
                f'{s["predicted_step_ratio_warmup"]:.4f}',
                f'{s["peak_memory_ratio"]:.4f}',
                f'{s["saved_activation_ratio"]:.4f}',
                rc,
                f'{t["baseline"]["median_step_s"] * 1e3:.0f} ms',
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print('  '.join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        if i == 0:
            print('  '.join('-' * w for w in widths))
    print(
        f'targets: warmup <= {TARGETS["step_time_ratio_warmup"]}, after <= {TARGETS["step_time_ratio_after"]}, '
        f'memory <= {TARGETS["peak_memory_ratio"]}, recompiles 0 from α updates and 1 at removal'
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument('--quick', action='store_true', help='fewer rounds (< 1 minute)')
    mode.add_argument('--smoke', action='store_true', help='tiny models, a few steps (tests)')
    p.add_argument('--layers', type=int, default=12)
    p.add_argument('--d-model', type=int, default=256)
    p.add_argument('--heads', type=int, default=4)
    p.add_argument('--seq', type=int, default=128)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--rounds', type=int, default=None, help='interleaved rounds (default 60; quick 12; smoke 2)')
    p.add_argument('--steps-per-round', type=int, default=None, help='steps per variant per round (default 1)')
    p.add_argument('--warmup-steps', type=int, default=None, help='untimed steps per variant (default 3)')
    p.add_argument('--compile-steps', type=int, default=20)
    p.add_argument('--micro-reps', type=int, default=None, help='hook micro-benchmark repetitions (default 400)')
    p.add_argument('--no-compile', action='store_true')
    p.add_argument('--models', default='reference,llama')
    p.add_argument(
        '--threads',
        type=int,
        default=1,
        help='torch intra-op threads (default 1: on a shared 2-core machine, OpenMP threads that '
        'wait on each other under contention make step times erratic)',
    )
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' / 'overhead.json'))
    args = p.parse_args(argv)
    mode = 'smoke' if args.smoke else 'quick' if args.quick else 'full'
    defaults = {'full': (60, 1, 3), 'quick': (12, 1, 2), 'smoke': (2, 1, 1)}[mode]
    args.micro_reps = args.micro_reps or {'full': 400, 'quick': 100, 'smoke': 10}[mode]
    args.rounds = args.rounds or defaults[0]
    args.steps_per_round = args.steps_per_round or defaults[1]
    args.warmup_steps = defaults[2] if args.warmup_steps is None else args.warmup_steps
    if args.smoke:
        args.layers, args.d_model, args.heads, args.seq, args.batch = 2, 32, 2, 16, 2
        args.compile_steps = min(args.compile_steps, 6)
    elif args.quick:  # same width and sequence, fewer layers and a smaller batch: < 1 minute
        args.layers, args.batch = min(args.layers, 4), min(args.batch, 4)
        args.compile_steps = min(args.compile_steps, 10)
    args.mode = mode
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    dims = {'layers': args.layers, 'd_model': args.d_model, 'heads': args.heads, 'seq': args.seq, 'batch': args.batch}
    results = {
        'benchmark': 'overhead',
        'mode': args.mode,
        'config': {
            **dims,
            'rounds': args.rounds,
            'steps_per_round': args.steps_per_round,
            'warmup_steps': args.warmup_steps,
            'compile_steps': args.compile_steps,
            'dtype': 'float32',
            'device': 'cpu',
            'optimizer': 'AdamW',
            'schedule': 'linear',
        },
        'command': 'python -m benchmarks.overhead' + ('' if args.mode == 'full' else f' --{args.mode}'),
        'machine': machine_info(),
        'targets': TARGETS,
        'models': {},
    }
    for name in [m.strip() for m in args.models.split(',') if m.strip()]:
        results['models'][name] = bench_model(name, args, dims)
    results['mechanisms'] = mechanism_comparison(args)
    results['wall_s'] = time.time() - t0
    with contextlib.suppress(OSError):  # no load average on this platform
        results['machine']['loadavg_at_end'] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, results, indent=2)
    print_table(results)
    print(f'wrote {out} in {results["wall_s"]:.0f} s')
    return results


if __name__ == '__main__':
    main()
