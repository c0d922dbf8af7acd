#!/usr/bin/env python
"""Long-run stability of ProRes in a real Composer Trainer: no memory or object growth, hooks really gone.

    python -m benchmarks.long_run                       # 20k steps, writes benchmarks/results/long_run.json
    python -m benchmarks.long_run --steps 2000 --out -  # the CI variant's size (tests/test_reliability.py)

What runs: a tiny reference decoder (4 layers, d_model 32, seq 16, batch 4, synthetic tokens, AdamW, WSD
LR) for `--steps` optimizer steps with ProRes (linear, W = 25% of the run, so warmup ends part-way),
ProRes logging α every batch (`log_interval=1`) into a logger destination that discards everything
(an in-memory logger would grow by design), Composer's console logger at a long interval, and, when
`prores_algo.monitor` exists, the ResidualMonitor callback (per-layer RMS / grad norm / update ratio
every 50 steps, spike counters every step).

What is measured, from `settle` steps after the end of warmup to the end, every `sample_every` steps:
resident memory (psutil RSS, MB) and `len(gc.get_objects())` after a `gc.collect()`. The growth per
1k steps is the Theil-Sen slope (median of pairwise slopes: the sustained trend, which is what a leak
is; a one-time step such as an allocator arena growing once does not move it); the least-squares slope
is reported beside it. Also checked at the first batch after warmup
and at the end: the ProRes controller is removed, no `prores_alpha` buffer is still read by a hook (removal
leaves them as inert 1.0), and no forward hook is left on any branch module (and, at the end, on any
module at all). Step time before and after the
end of warmup is reported (median of 1 s windows).

Tolerances (what counts as flat):
  * objects: |slope| < 20 per 1k steps. Any per-step leak of a Python object (a dict of logged
    metrics, a hook handle, a closure) is >= 1000 per 1k steps; 20 leaves room for one-off objects
    (a lazily-created cache, an epoch boundary's iterator) without hiding a leak of 1 object per 50
    steps.
  * RSS: slope < 1.0 MB per 1k steps. The smallest tensor this model makes per step is 256 B
    (its α-sized scalars aside), its logits are 16 KB: leaking the logits every step would be 16 MB per
    1k steps, a metrics dict ~1 MB per 1k steps. glibc's allocator and lazily-grown caches make RSS
    step up once early on (seen: +3 MB within 100 steps after warmup, then flat), hence `settle` steps
    are skipped and the robust slope. The short CI variant (its fit spans ~650 steps) uses 2.5 MB per
    1k steps.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch
from composer import Callback, Trainer
from composer.loggers import LoggerDestination
from torch.utils.data import DataLoader, Dataset

from benchmarks._common import ROOT, write_json
from prores_algo import ProRes, WSDScheduler
from prores_algo.surgery import ALPHA_BUFFER, has_prores_hook
from prores_algo.training.models.composer_decoder import ComposerDecoder
from prores_algo.training.models.decoder import DecoderConfig

OBJ_TOL_PER_1K = 20.0
RSS_TOL_MB_PER_1K = 1.0
RSS_TOL_MB_PER_1K_SHORT = 2.5


class Tokens(Dataset):
    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab, (n, seq_len), generator=g)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {'input_ids': self.data[i]}


class Discard(LoggerDestination):
    """Receives every metric (α of every layer, every batch) and keeps nothing."""

    def __init__(self):
        self.calls = 0

    def log_metrics(self, metrics, step=None):
        self.calls += 1


def _num_tokens(batch):
    return int(batch['input_ids'].numel())


def branch_modules(model) -> list:
    out = []
    for blk in model.model.blocks:
        out += [blk.get_submodule(n) for n in blk.prores_branches]
    return out


def hook_report(model) -> dict:
    branches = branch_modules(model)
    return {
        # α buffers a ProRes hook still reads (removal leaves each buffer as an inert 1.0 for DDP's sake)
        'alpha_buffers': sum(1 for m in model.modules() if ALPHA_BUFFER in m._buffers and has_prores_hook(m)),
        'branch_forward_hooks': sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in branches),
        'all_forward_hooks': sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    }


class Sampler(Callback):
    def __init__(self, warmup_end: int, settle: int, sample_every: int, prores: ProRes):
        self.warmup_end, self.settle, self.every = warmup_end, settle, sample_every
        self.prores = prores
        self.proc = psutil.Process()
        self.samples: list[dict] = []
        self.after_warmup: dict | None = None
        self._window_start = None
        self._window_steps = 0
        self.step_times = {'warmup': [], 'after': []}

    def batch_start(self, state, logger):
        b = int(state.timestamp.batch)
        if b == self.warmup_end + 1 and self.after_warmup is None:
            self.after_warmup = {'batch': b, 'removed': self.prores.controller.removed, **hook_report(state.model)}

    def batch_end(self, state, logger):
        b = int(state.timestamp.batch)  # batches done
        now = time.perf_counter()
        if self._window_start is None:
            self._window_start, self._window_steps = now, 0
        self._window_steps += 1
        if now - self._window_start >= 1.0:
            phase = 'warmup' if b <= self.warmup_end else 'after'
            self.step_times[phase].append((now - self._window_start) / self._window_steps)
            self._window_start, self._window_steps = now, 0
        if b >= self.warmup_end + self.settle and (b - self.warmup_end - self.settle) % self.every == 0:
            gc.collect()
            self.samples.append(
                {'step': b, 'rss_mb': self.proc.memory_info().rss / 2**20, 'objects': len(gc.get_objects())}
            )
            self._window_start = None  # gc pauses stay out of the step-time windows


def slope_per_1k(xs, ys) -> float:
    """Least-squares slope, per 1000 steps."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    return 1000.0 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def theil_sen_per_1k(xs, ys) -> float:
    """Median of the pairwise slopes, per 1000 steps: the sustained trend, not moved by a one-time step
    (an allocator arena growing once) the way least squares is. A leak is a sustained trend."""
    slopes = [(ys[j] - ys[i]) / (xs[j] - xs[i]) for i in range(len(xs)) for j in range(i + 1, len(xs))]
    return 1000.0 * statistics.median(slopes)


def run(
    steps: int = 20_000,
    warmup_frac: float = 0.25,
    settle: int | None = None,
    sample_every: int | None = None,
    monitor: bool = True,
    seed: int = 0,
) -> dict:
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    warmup_end = int(steps * warmup_frac)
    settle = settle if settle is not None else max(200, steps // 20)
    sample_every = sample_every if sample_every is not None else max(50, steps // 200)
    cfg = DecoderConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, max_seq_len=16)
    model = ComposerDecoder(cfg)
    loader = DataLoader(
        Tokens(2048, 16, 64, seed),
        batch_size=4,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    from composer.core import DataSpec

    prores = ProRes(schedule='linear', t_warmup=f'{warmup_end}ba', log_interval=1)
    sampler = Sampler(warmup_end, settle, sample_every, prores)
    callbacks = [sampler]
    monitor_on = False
    if monitor:
        try:
            from prores_algo.integrations.composer import ResidualMonitor

            callbacks.append(ResidualMonitor(log_interval='50ba'))
            monitor_on = True
        except ImportError:
            pass
    discard = Discard()
    trainer = Trainer(
        model=model,
        train_dataloader=DataSpec(loader, get_num_tokens_in_batch=_num_tokens),
        max_duration=f'{steps}ba',
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
        schedulers=WSDScheduler(lr_warmup='0.02dur', lr_decay='0.1dur'),
        algorithms=[prores],
        callbacks=callbacks,
        loggers=[discard],
        progress_bar=False,
        log_to_console=True,
        console_log_interval=f'{max(steps // 4, 1)}ba',
        seed=seed,
        device='cpu',
    )
    t0 = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - t0
    end = {'removed': prores.controller.removed, **hook_report(trainer.state.model)}
    trainer.close()
    xs = [s['step'] for s in sampler.samples]
    rss = [s['rss_mb'] for s in sampler.samples]
    objs = [s['objects'] for s in sampler.samples]
    med = {k: (statistics.median(v) if v else None) for k, v in sampler.step_times.items()}
    return {
        'steps': steps,
        'warmup_end': warmup_end,
        'settle': settle,
        'sample_every': sample_every,
        'num_samples': len(xs),
        'wall_s': wall,
        'monitor': monitor_on,
        'rss_mb_first': sampler.samples[0]['rss_mb'],
        'rss_mb_last': sampler.samples[-1]['rss_mb'],
        'rss_mb_min': min(s['rss_mb'] for s in sampler.samples),
        'rss_mb_max': max(s['rss_mb'] for s in sampler.samples),
        'objects_first': sampler.samples[0]['objects'],
        'objects_last': sampler.samples[-1]['objects'],
        'rss_slope_mb_per_1k_steps': theil_sen_per_1k(xs, rss),
        'objects_slope_per_1k_steps': theil_sen_per_1k(xs, objs),
        'rss_lsq_slope_mb_per_1k_steps': slope_per_1k(xs, rss),
        'objects_lsq_slope_per_1k_steps': slope_per_1k(xs, objs),
        'step_ms_during_warmup': None if med['warmup'] is None else 1000 * med['warmup'],
        'step_ms_after_warmup': None if med['after'] is None else 1000 * med['after'],
        'after_warmup': sampler.after_warmup,
        'end': end,
        'logger_calls': discard.calls,
        'samples': sampler.samples,
        'torch': torch.__version__,
        'python': sys.version.split()[0],
        'cpu_count': os.cpu_count(),
    }


def check(result: dict, rss_tol: float = RSS_TOL_MB_PER_1K, obj_tol: float = OBJ_TOL_PER_1K) -> list[str]:
    """The failed claims (empty when everything holds)."""
    bad = []
    for where in ('after_warmup', 'end'):
        r = result[where]
        if r is None or not r['removed'] or r['alpha_buffers'] or r['branch_forward_hooks']:
            bad.append(f'{where}: ProRes not fully removed: {r}')
    if result['end']['all_forward_hooks']:
        bad.append(f'end: {result["end"]["all_forward_hooks"]} forward hooks left on the model')
    if abs(result['objects_slope_per_1k_steps']) >= obj_tol:
        bad.append(f'objects grow by {result["objects_slope_per_1k_steps"]:.1f} per 1k steps (tolerance {obj_tol})')
    if result['rss_slope_mb_per_1k_steps'] >= rss_tol:
        bad.append(f'RSS grows by {result["rss_slope_mb_per_1k_steps"]:.3f} MB per 1k steps (tolerance {rss_tol})')
    if result['logger_calls'] < result['steps']:
        bad.append(f'α was not logged every batch ({result["logger_calls"]} logger calls)')
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--steps', type=int, default=20_000)
    p.add_argument('--no-monitor', action='store_true')
    p.add_argument(
        '--out',
        default=str(ROOT / 'benchmarks' / 'results' / 'long_run.json'),
        help="JSON result path ('-': don't write)",
    )
    args = p.parse_args(argv)
    result = run(args.steps, monitor=not args.no_monitor)
    rss_tol = RSS_TOL_MB_PER_1K if args.steps >= 10_000 else RSS_TOL_MB_PER_1K_SHORT
    failures = check(result, rss_tol=rss_tol)
    result['tolerances'] = {'rss_mb_per_1k_steps': rss_tol, 'objects_per_1k_steps': OBJ_TOL_PER_1K}
    result['failures'] = failures
    print(
        f'steps {result["steps"]} (warmup ends at {result["warmup_end"]}), wall {result["wall_s"]:.0f} s, '
        f'monitor {"on" if result["monitor"] else "off"}'
    )
    print(
        f'step time: {result["step_ms_during_warmup"]:.2f} ms during warmup, '
        f'{result["step_ms_after_warmup"]:.2f} ms after (hooks removed)'
    )
    print(
        f'RSS {result["rss_mb_first"]:.1f} -> {result["rss_mb_last"]:.1f} MB, slope '
        f'{result["rss_slope_mb_per_1k_steps"]:+.4f} MB per 1k steps (Theil-Sen; least squares '
        f'{result["rss_lsq_slope_mb_per_1k_steps"]:+.4f}; tolerance {rss_tol})'
    )
    print(
        f'gc objects {result["objects_first"]} -> {result["objects_last"]}, slope '
        f'{result["objects_slope_per_1k_steps"]:+.2f} per 1k steps (Theil-Sen; least squares '
        f'{result["objects_lsq_slope_per_1k_steps"]:+.2f}; tolerance {OBJ_TOL_PER_1K})'
    )
    print(f'after warmup: {result["after_warmup"]}; end: {result["end"]}')
    if args.out != '-':
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(args.out), result)
        print(f'wrote {args.out}')
    print('OK' if not failures else 'FAILED: ' + '; '.join(failures))
    return 0 if not failures else 1


if __name__ == '__main__':
    sys.exit(main())
