"""ProRes quality benchmark: the paper's experiments in miniature (arXiv 2603.05369, DESIGN.md section 2).

Byte-level language modelling of the Python standard library sources (seq 128, batch 16), narrow deep
reference decoders (d_model 64, 4 heads), the paper's WSD LR schedule, baseline vs ProRes at equal
steps, several seeds. Every run goes through `prores_algo.train.run` with
`load_config('benchmarks/quality.yaml', overrides)`.

Experiments (the paper's counterpart in brackets):
  main      Pre-LN and Post-LN, 24 layers, baseline vs `linear`                    [main table]
  depth     Pre-LN, 6 / 12 / 24 / 48 layers, baseline vs `linear`                 [depth scaling]
  ablation  Post-LN, 24 layers: linear, linear_square, equal, reverse, stagewise_0, staggered,
            and linear with `lr_warmup_delay`                                      [schedule ablation]
Runs shared between experiments (e.g. the main table's 24-layer runs) are trained once.

Protocol: AdamW (0.9, 0.95), weight decay 0.1, gradient clipping 1.0, WSD with linear decay over the
last 10%; Pre-LN LR 3e-3 with a 2% LR warmup; Post-LN half the LR (1.5e-3) and a 10% LR warmup
(the paper's text). ProRes t_warmup = 0.25dur (the paper used 12-32% of training).

Per run: final validation loss / perplexity (the first `eval_subset_num_batches` x 32 sequences of the
validation split, the same for every run), the training-loss curve ('loss/train/total' from an
InMemoryLogger), loss spikes (OLMo's definition: a training loss >= 7 standard deviations above the
mean of the previous window, window = max(20, steps // 20)), divergence, wall time.

Results are written after every run to benchmarks/results/quality.json (so a partial run reports),
and the figures to benchmarks/results/*.png at the end (`--plots-only` redraws them from the JSON).
The full run stops starting new runs when the next one would end past `--budget-h` hours.

Usage:
  python benchmarks/quality.py              # full (1-2.3 h on 2 shared cores, budget-capped)
  python benchmarks/quality.py --quick      # < 5 minutes: small models, few steps, one seed
  python benchmarks/quality.py --smoke      # seconds (tests)
  python benchmarks/quality.py --resume     # reuse finished runs with identical settings from the JSON
  python benchmarks/quality.py --plots-only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / 'benchmarks') not in sys.path:  # _common.py when this file is loaded by path (tests); appended,
    sys.path.append(str(ROOT / 'benchmarks'))  # so its generic module names shadow nothing

from _common import machine_info, write_json  # noqa: E402  (benchmarks/_common.py)

RESULTS = ROOT / 'benchmarks' / 'results'
YAML = ROOT / 'benchmarks' / 'quality.yaml'
DATA = ROOT / 'benchmarks' / '.data' / 'stdlib-byte-128'
# The corpus: the first 8M bytes of the stdlib sources (in sorted path order), 5% of the files held out.
DATA_SETTINGS = dict(tokenizer='byte', seq_len=128, val_fraction=0.05, max_tokens=8_000_000, seed=0)
SMOKE_MAX_TOKENS = 1_500_000  # --smoke builds (and reuses) a small corpus of its own: seconds, not ten

LR = {'pre': 3e-3, 'post': 1.5e-3}  # Post-LN: half the LR (the paper's text)
LR_WARMUP = {'pre': '0.02dur', 'post': '0.1dur'}  # the paper: 2000 of 100k steps; Post-LN 10%
PRORES_T_WARMUP = '0.25dur'
LR_DELAY = '0.05dur'
ABLATION = ('linear', 'linear_square', 'equal', 'reverse', 'stagewise_0', 'staggered', 'linear+lr_delay')

MODES = {
    # steps, main layers, width, heads, main seeds, depths, depth seeds, ablation variants, ablation seeds,
    # eval batches, budget hours
    'full': dict(steps=300, layers=24, d_model=64, heads=4, seeds=(0, 1, 2), depths=(6, 12, 24, 48), depth_seeds=(0, 1),
                 ablation=ABLATION, ablation_seeds=(0, 1), warmup_variants=('linear@0.1dur',), eval_batches=20,
                 budget_h=2.3),
    'quick': dict(steps=30, layers=6, d_model=64, heads=4, seeds=(0,), depths=(3, 6, 12), depth_seeds=(0,),
                  ablation=('linear', 'equal', 'linear+lr_delay'), ablation_seeds=(0,), warmup_variants=(),
                  eval_batches=4, budget_h=0.075),
    'smoke': dict(steps=4, layers=2, d_model=32, heads=4, seeds=(0,), depths=(2, 4), depth_seeds=(0,),
                  ablation=('linear', 'linear+lr_delay'), ablation_seeds=(0,), warmup_variants=(), eval_batches=1,
                  budget_h=0.05),
}


# ------------------------------------------------------------------------------------------- runs
def run_key(spec: dict) -> str:
    variant = spec['variant']
    return f"{spec['norm']}-L{spec['layers']}-{variant}-s{spec['seed']}"


def parse_variant(variant: str) -> tuple[str | None, str | None, bool]:
    """'baseline' | 'SCHEDULE[@T_WARMUP][+lr_delay]' -> (schedule, t_warmup, lr_delay)."""
    if variant == 'baseline':
        return None, None, False
    body, _, flag = variant.partition('+')
    schedule, _, tw = body.partition('@')
    return schedule, tw or PRORES_T_WARMUP, flag == 'lr_delay'


def make_spec(norm: str, layers: int, variant: str, seed: int, m: dict) -> dict:
    schedule, t_warmup, delay = parse_variant(variant)
    return {'norm': norm, 'layers': layers, 'variant': variant, 'seed': seed, 'steps': m['steps'],
            'd_model': m['d_model'], 'heads': m['heads'], 'lr': LR[norm], 'lr_warmup': LR_WARMUP[norm],
            'lr_decay': '0.1dur', 'schedule': schedule, 'prores_t_warmup': t_warmup,
            'lr_warmup_delay': LR_DELAY if delay else None,
            'eval_batches': m['eval_batches'], 'batch': 16, 'seq_len': 128}


def plan(m: dict) -> tuple[list[dict], dict[str, list[str]]]:
    """All runs in priority order (main table first, then one seed of each sweep, then more seeds)."""
    runs: dict[str, dict] = {}
    experiments: dict[str, list[str]] = {'main': [], 'depth': [], 'ablation': [], 'warmup_length': []}

    def add(exp, spec):
        k = run_key(spec)
        runs.setdefault(k, spec)
        if k not in experiments[exp]:
            experiments[exp].append(k)

    L = m['layers']
    for seed in m['seeds']:
        for norm in ('pre', 'post'):
            for v in ('baseline', 'linear'):
                add('main', make_spec(norm, L, v, seed, m))
    n_rounds = max(len(m['depth_seeds']), len(m['ablation_seeds']), len(m['seeds']) if m['warmup_variants'] else 0)
    for i in range(n_rounds):
        if i < len(m['ablation_seeds']):
            seed = m['ablation_seeds'][i]
            for v in ('baseline', *m['ablation']):
                add('ablation', make_spec('post', L, v, seed, m))
        if i < len(m['depth_seeds']):
            seed = m['depth_seeds'][i]
            for depth in m['depths']:
                for v in ('baseline', 'linear'):
                    add('depth', make_spec('pre', depth, v, seed, m))
        if m['warmup_variants'] and i < 2:  # ProRes t_warmup sensitivity (the paper: W = 12k vs 24k), 2 seeds
            seed = m['seeds'][i]
            for norm in ('pre', 'post'):
                for v in ('baseline', 'linear', *m['warmup_variants']):
                    add('warmup_length', make_spec(norm, L, v, seed, m))
    return list(runs.values()), experiments


def overrides(spec: dict, data_path: Path) -> list[str]:
    o = {
        'run_name': run_key(spec),
        'seed': spec['seed'],
        'data.path': str(data_path),
        'model.n_layers': spec['layers'],
        'model.d_model': spec['d_model'],
        'model.n_heads': spec['heads'],
        'model.norm': spec['norm'],
        'optimizer.lr': spec['lr'],
        'scheduler.t_warmup': spec['lr_warmup'],
        'scheduler.t_decay': spec['lr_decay'],
        'max_duration': f"{spec['steps']}ba",
        'eval_subset_num_batches': spec['eval_batches'],
        'console_log_interval': f"{max(1, spec['steps'] // 3)}ba",
    }
    if spec['variant'] != 'baseline':
        o['algorithms.prores.schedule'] = spec['schedule']
        o['algorithms.prores.t_warmup'] = spec['prores_t_warmup']
        o['algorithms.prores.log_interval'] = max(1, spec['steps'] // 100)
        if spec['lr_warmup_delay']:
            o['algorithms.prores.lr_warmup_delay'] = spec['lr_warmup_delay']
    return [f'{k}={v}' for k, v in o.items()]


def count_spikes(losses: list[float], window: int, k_sigma: float = 7.0) -> list[int]:
    """Indices i with loss[i] >= mean + k·std of losses[i-window:i] (OLMo's loss-spike definition)."""
    spikes = []
    for i in range(window, len(losses)):
        prev = losses[i - window:i]
        if not all(math.isfinite(v) for v in prev) or not math.isfinite(losses[i]):
            continue
        mu = statistics.fmean(prev)
        sd = statistics.pstdev(prev)
        if losses[i] >= mu + k_sigma * sd and sd > 0:
            spikes.append(i)
    return spikes


def num_params(spec: dict) -> int:
    import torch

    from prores_algo.models.decoder import Decoder, DecoderConfig
    with torch.device('meta'):
        return Decoder(DecoderConfig(vocab_size=257, d_model=spec['d_model'], n_layers=spec['layers'],
                                     n_heads=spec['heads'], max_seq_len=spec['seq_len'], norm=spec['norm'])).num_params()


def execute(spec: dict, data_path: Path, callbacks: tuple = ()) -> dict:
    from composer.loggers import InMemoryLogger

    from prores_algo.config import load_config
    from prores_algo.train import run
    cfg = load_config(YAML, overrides(spec, data_path))
    mem = InMemoryLogger()
    t0 = time.time()
    res = run(cfg, extra_callbacks=callbacks, extra_loggers=(mem,))
    wall = time.time() - t0
    curve = [float(v) for _, v in mem.data.get('loss/train/total', [])]
    window = max(20, spec['steps'] // 20)
    spikes = count_spikes(curve, window)
    finite = [v for v in curve if math.isfinite(v)]
    diverged = (len(finite) < len(curve) or not math.isfinite(res['val_loss']) or res['val_loss'] > math.log(257))
    out = {'spec': spec, 'params': num_params(spec), 'val_loss': res['val_loss'], 'val_ppl': res['val_ppl'], 'wall_s': wall,
           'train_s_per_step': None, 'spikes': len(spikes), 'spike_steps': spikes, 'spike_window': window,
           'diverged': bool(diverged), 'final_train_loss': statistics.fmean(finite[-10:]) if finite else float('nan'),
           'curve': curve}
    wct = [t.total_wct.total_seconds() for t, _ in mem.data.get('loss/train/total', [])]
    if len(wct) > 2:
        out['train_s_per_step'] = (wct[-1] - wct[1]) / (len(wct) - 2)
    alpha_keys = sorted((k for k in mem.data if k.startswith('prores/alpha/layer_')),
                        key=lambda k: int(k.rsplit('_', 1)[1]))
    if alpha_keys:
        steps = [int(t.batch) for t, _ in mem.data[alpha_keys[0]]]
        out['alpha_log'] = {'steps': steps, 'alphas': [[float(v) for _, v in mem.data[k]] for k in alpha_keys]}
    return out


# ------------------------------------------------------------------------------------- diagnostics
def make_probe(at_steps):
    """Composer callback: at the given steps, per layer, |branch| / |residual it is added to| for the attention
    and MLP branches (the branch *after* ProRes' α: our hooks are registered after ProRes' at INIT, so they run
    after it), the L2 norm of the layer's parameter gradients (before clipping) and the norms of the
    branch-final weights (o_proj, down_proj), and the mean cosine similarity between positions of each
    block's output (rank collapse: 1.0)."""
    import torch
    from composer.core import Callback

    class BranchProbe(Callback):

        def __init__(self):
            self.at, self.rows, self.handles, self.cur = set(at_steps), [], [], None

        def batch_start(self, state, logger):
            if int(state.timestamp.batch) not in self.at:
                return
            blocks = list(state.model.model.blocks)
            n = len(blocks)
            self.cur = {'step': int(state.timestamp.batch), 'attn': [0.0] * n, 'mlp': [0.0] * n, 'cos': [0.0] * n}
            for i, blk in enumerate(blocks):
                post = blk.norm in ('post', 'deepnorm')

                def block_out(mod, args, out, i=i):
                    # mean cosine similarity between the hidden states of different positions of a sequence:
                    # 1.0 = every position carries the same vector (rank collapse)
                    u = torch.nn.functional.normalize(out.detach().float(), dim=-1)
                    T = u.shape[1]
                    s = u.sum(1).pow(2).sum(-1)  # |sum_t u_t|^2 = T + sum_{s != t} cos(u_s, u_t)
                    self.cur['cos'][i] = float(((s - T) / (T * (T - 1))).mean())

                def block_in(mod, args, i=i):
                    self._x = args[0].detach()

                def mlp_in(mod, args, i=i):
                    self._h = args[0].detach()

                def norm2_in(mod, args, i=i):
                    self._h2 = args[0].detach()

                def attn_out(mod, args, out, i=i):
                    self.cur['attn'][i] = float(out.detach().norm() / self._x.norm())

                def mlp_out(mod, args, out, i=i, post=post):
                    h = self._h if post else self._h2  # the residual the MLP branch is added to
                    self.cur['mlp'][i] = float(out.detach().norm() / h.norm())

                self.handles += [blk.register_forward_pre_hook(block_in), blk.register_forward_hook(block_out),
                                 blk.mlp.register_forward_pre_hook(mlp_in),
                                 blk.norm2.register_forward_pre_hook(norm2_in),
                                 blk.attn.o_proj.register_forward_hook(attn_out),
                                 blk.mlp.down_proj.register_forward_hook(mlp_out)]

        def after_backward(self, state, logger):
            if self.cur is None:
                return
            for h in self.handles:
                h.remove()
            self.handles = []
            blocks = state.model.model.blocks
            self.cur['grad'] = [math.sqrt(sum(float(p.grad.pow(2).sum()) for p in blk.parameters() if p.grad is not None))
                                for blk in blocks]
            # weights of the branch-final projections (before this step's update)
            self.cur['w_attn'] = [float(blk.attn.o_proj.weight.norm()) for blk in blocks]
            self.cur['w_mlp'] = [float(blk.mlp.down_proj.weight.norm()) for blk in blocks]
            self.rows.append(self.cur)
            self.cur = None

    return BranchProbe()


def reference_levels(data_path: Path, eval_batches: int, train_samples: int = 20000) -> dict:
    """Cross-entropy (nats/byte) on the evaluated validation subset of a unigram and a bigram byte model
    counted on the first `train_samples` training sequences (add-one smoothing): the loss a model that
    ignores its context entirely (unigram) or uses only the current byte (bigram) would get."""
    import numpy as np

    from prores_algo.data import TokenDataset

    def load(split, n):
        ds = TokenDataset(local=str(data_path), split=split, shuffle=False, batch_size=1)
        return np.stack([ds[i]['input_ids'].numpy() for i in range(min(n, len(ds)))])

    tr, va = load('train', train_samples), load('val', eval_batches * 32)
    V = 257
    uni = np.bincount(tr.ravel(), minlength=V) + 1.0
    uni /= uni.sum()
    big = np.ones((V, V))
    np.add.at(big, (tr[:, :-1].ravel(), tr[:, 1:].ravel()), 1.0)
    big /= big.sum(1, keepdims=True)
    prev, tgt = va[:, :-1].ravel(), va[:, 1:].ravel()
    return {'unigram': float(-np.log(uni[tgt]).mean()), 'bigram': float(-np.log(big[prev, tgt]).mean()),
            'train_samples': int(len(tr)), 'val_samples': int(len(va))}


DIAG_VARIANTS = ('baseline', 'linear', 'stagewise_0')


def diagnose(args, m: dict, data_path: Path, out: Path) -> dict:
    """Post-LN, main depth, seed 0: baseline vs ProRes `linear` vs `stagewise_0`, with the branch probe."""
    steps = m['steps']
    at = sorted({0, *range(0, steps, max(1, steps // 30)), steps - 1})
    res = {'benchmark': 'quality-diagnostics', 'mode': args.mode, 'command': 'python benchmarks/quality.py --diagnose'
           + ('' if args.mode == 'full' else f' --{args.mode}'), 'machine': machine_info(),
           'reference_levels': reference_levels(data_path, m['eval_batches']), 'runs': {}}
    for v in DIAG_VARIANTS:
        spec = make_spec('post', m['layers'], v, 0, m)
        probe = make_probe(at)
        print(f'[diagnose] {run_key(spec)}', flush=True)
        r = execute(spec, data_path, callbacks=(probe,))
        r['probe'] = probe.rows
        res['runs'][run_key(spec)] = r
        print(f'[diagnose] {run_key(spec)}: val_loss {r["val_loss"]:.4f}', flush=True)
        write_json(out, res)
    res['figures'] = [plot_diagnostics(res, out.parent)]
    write_json(out, res)
    return res


def plot_diagnostics(res: dict, out_dir: Path) -> str:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    colors = {'baseline': 'tab:gray', 'linear': 'tab:red', 'stagewise_0': 'tab:blue'}
    for key, r in res['runs'].items():
        v = r['spec']['variant']
        rows = r['probe']
        steps = [row['step'] for row in rows]
        L = len(rows[0]['attn'])
        mid = [statistics.fmean(row['attn'][L // 2:] + row['mlp'][L // 2:]) for row in rows]
        axes[0].plot(steps, mid, color=colors.get(v), label=f'{v} (val loss {r["val_loss"]:.2f})')
        g1 = [max(row['grad'][0], 1e-12) for row in rows]
        gL = [max(row['grad'][-1], 1e-12) for row in rows]
        axes[1].plot(steps, g1, color=colors.get(v), label=f'{v}: layer 1')
        axes[1].plot(steps, gL, color=colors.get(v), ls='--', label=f'{v}: layer {L}')
        last = rows[-1]
        axes[2].plot(range(1, L + 1), [max(x, 1e-12) for x in last['grad']], color=colors.get(v), marker='.',
                     label=f'{v}, step {last["step"]}')
        if 'cos' in rows[0]:
            axes[3].plot(steps, [row['cos'][-1] for row in rows], color=colors.get(v), label=f'{v}: layer {L}')
            axes[3].plot(steps, [row['cos'][L // 3 - 1] for row in rows], color=colors.get(v), ls='--',
                         label=f'{v}: layer {L // 3}')
    axes[0].set_title('mean ‖α·F‖ / ‖residual‖, upper half of the layers')
    axes[0].set_xlabel('step')
    axes[1].set_yscale('log')
    axes[1].set_title('gradient norm of a layer\'s parameters')
    axes[1].set_xlabel('step')
    axes[2].set_yscale('log')
    axes[2].set_title('gradient norm by layer at the last step')
    axes[2].set_xlabel('layer')
    axes[3].set_title('mean cosine between positions (1 = collapse)')
    axes[3].set_xlabel('step')
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f'Post-LN, {len(rows[0]["attn"])} layers, seed 0: why ProRes `linear` stalls here')
    fig.tight_layout()
    p = out_dir / 'quality_postln_diagnostics.png'
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p.name


# ----------------------------------------------------------------------------------------- summary
def _ms(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return {'mean': None, 'std': None, 'n': 0}
    return {'mean': statistics.fmean(xs), 'std': statistics.stdev(xs) if len(xs) > 1 else 0.0, 'n': len(xs)}


def _group(runs: dict, keys: list[str], **match) -> list[dict]:
    return [runs[k] for k in keys if k in runs and all(runs[k]['spec'][a] == b for a, b in match.items())]


def summarize_group(rs: list[dict]) -> dict:
    return {'val_loss': _ms([r['val_loss'] for r in rs]), 'val_ppl': _ms([r['val_ppl'] for r in rs]),
            'spikes_total': sum(r['spikes'] for r in rs), 'diverged': sum(r['diverged'] for r in rs),
            'wall_s': _ms([r['wall_s'] for r in rs]), 'seeds': sorted(r['spec']['seed'] for r in rs)}


def paired_delta(base: list[dict], other: list[dict]) -> dict:
    """ProRes − baseline per seed (same seed = same init and data order), then mean ± std."""
    b = {r['spec']['seed']: r['val_loss'] for r in base}
    d = [r['val_loss'] - b[r['spec']['seed']] for r in other if r['spec']['seed'] in b]
    s = _ms(d)
    s['per_seed'] = d
    s['wins'] = sum(x < 0 for x in d)
    return s


def _pair_rows(runs: dict, keys: list[str], **match) -> dict:
    """Baseline and ProRes `linear` among the matching runs, and their paired per-seed delta."""
    base = _group(runs, keys, variant='baseline', **match)
    prores = _group(runs, keys, variant='linear', **match)
    return {'baseline': summarize_group(base), 'linear': summarize_group(prores), 'delta': paired_delta(base, prores)}


def _variant_rows(runs: dict, keys: list[str]) -> dict:
    """One row per variant (in first-run order), each but the baseline with its paired delta to it."""
    variants = list(dict.fromkeys(runs[k]['spec']['variant'] for k in keys if k in runs))
    base = _group(runs, keys, variant='baseline')
    rows = {}
    for v in variants:
        rs = _group(runs, keys, variant=v)
        rows[v] = summarize_group(rs)
        if v != 'baseline':
            rows[v]['delta'] = paired_delta(base, rs)
    return rows


def summarize(runs: dict, experiments: dict) -> dict:
    out: dict = {'main': {norm: _pair_rows(runs, experiments['main'], norm=norm) for norm in ('pre', 'post')}}
    depths = sorted({runs[k]['spec']['layers'] for k in experiments['depth'] if k in runs})
    out['depth'] = {str(d): _pair_rows(runs, experiments['depth'], layers=d) for d in depths}
    out['ablation'] = _variant_rows(runs, experiments['ablation'])
    wl = experiments.get('warmup_length', [])
    if any(k in runs for k in wl):
        out['warmup_length'] = {norm: _variant_rows(runs, [k for k in wl if k in runs and runs[k]['spec']['norm'] == norm])
                                for norm in ('pre', 'post')}
    return out


# -------------------------------------------------------------------------------------------- plots
def _smooth(xs, w):
    out, acc = [], []
    for x in xs:
        acc.append(x)
        if len(acc) > w:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def make_plots(results: dict, out_dir: Path) -> list[str]:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from prores_algo import schedules
    runs, exps = results['runs'], results['experiments']
    made = []
    steps = results['config']['steps']
    w = max(1, steps // 30)

    # 1. loss curves, main table
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, norm, title in zip(axes, ('pre', 'post'), ('Pre-LN', 'Post-LN')):
        lo = []
        for v, color in (('baseline', 'tab:gray'), ('linear', 'tab:red')):
            rs = _group(runs, exps['main'], norm=norm, variant=v)
            curves = [r['curve'] for r in rs if r['curve']]
            for c in curves:
                sc = _smooth(c, w)
                ax.plot(sc, color=color, alpha=0.25, lw=0.8)
                lo.extend(x for x in sc[len(sc) // 4:] if math.isfinite(x))
            if curves:
                n = min(len(c) for c in curves)
                mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
                sm = _smooth(mean, w)
                lo.extend(x for x in sm[n // 4:] if math.isfinite(x))
                ax.plot(sm, color=color, lw=1.8, label=f"{'ProRes linear' if v == 'linear' else 'baseline'} "
                        f"(mean of {len(curves)} seeds)")
        ax.axvline(0.25 * steps, color='tab:red', ls=':', lw=1, label='ProRes t_warmup (all α = 1)')
        if lo:
            ax.set_ylim(min(lo) - 0.05, max(lo) + 0.3)
        ax.set_title(f'{title}, {results["config"]["layers"]} layers x {results["config"]["d_model"]}')
        ax.set_xlabel('step')
        ax.set_ylabel(f'train loss (nats/byte, moving average over {w})')
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    p = out_dir / 'quality_loss_curves.png'
    fig.savefig(p, dpi=110)
    plt.close(fig)
    made.append(p.name)

    # 2. val loss vs depth
    depth = results['summary'].get('depth', {})
    if depth:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        ds = sorted(int(d) for d in depth)
        for v, color, label in (('baseline', 'tab:gray', 'Pre-LN baseline'), ('linear', 'tab:red', 'Pre-LN + ProRes')):
            xs = [d for d in ds if depth[str(d)][v]['val_loss']['mean'] is not None]
            ys = [depth[str(d)][v]['val_loss']['mean'] for d in xs]
            es = [depth[str(d)][v]['val_loss']['std'] for d in xs]
            ax.errorbar(xs, ys, yerr=es, marker='o', capsize=3, color=color, label=label)
        ax.set_xscale('log', base=2)
        ax.set_xticks(ds)
        ax.set_xticklabels([str(d) for d in ds])
        ax.set_xlabel('layers (width 64)')
        ax.set_ylabel('final validation loss (mean ± std over seeds)')
        ax.set_title(f'Depth sweep, {steps} steps')
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        p = out_dir / 'quality_depth.png'
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p.name)

    # 3. schedule ablation
    ab = results['summary'].get('ablation', {})
    if ab:
        fig, ax = plt.subplots(figsize=(7, 4))
        names = list(ab)
        ys = [ab[n]['val_loss']['mean'] for n in names]
        es = [ab[n]['val_loss']['std'] or 0 for n in names]
        ok = [y is not None for y in ys]
        names = [n for n, o in zip(names, ok) if o]
        ys = [y for y, o in zip(ys, ok) if o]
        es = [e for e, o in zip(es, ok) if o]
        colors = ['tab:gray' if n == 'baseline' else 'tab:red' for n in names]
        ax.bar(range(len(names)), ys, yerr=es, color=colors, capsize=3)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha='right')
        if ys:
            ax.set_ylim(min(ys) - 0.15, max(ys) + 0.15)
        ax.set_ylabel('final validation loss')
        ax.set_title(f'Post-LN schedule ablation ({results["config"]["layers"]} layers)')
        ax.grid(alpha=0.3, axis='y')
        fig.tight_layout()
        p = out_dir / 'quality_ablation.png'
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p.name)

    # 4. α(l, t) heat map: schedule linear, 24 layers, W = 0.25 of the run
    L = 24
    W = 0.25 * steps
    grid = [schedules.alphas('linear', L, t, W) for t in range(steps + 1)]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    im = ax.imshow([[grid[t][l] for t in range(steps + 1)] for l in range(L)], aspect='auto', origin='lower',
                   cmap='viridis', vmin=0, vmax=1, extent=(0, steps, 0.5, L + 0.5), interpolation='nearest')
    fig.colorbar(im, ax=ax, label='α(l, t)')
    ax.set_xlabel('optimizer step t')
    ax.set_ylabel('layer l (1 = shallowest)')
    ax.set_title(f"ProRes 'linear', {L} layers, t_warmup = {W:g} steps (0.25 of {steps})")
    fig.tight_layout()
    p = out_dir / 'alpha_heatmap.png'
    fig.savefig(p, dpi=110)
    plt.close(fig)
    made.append(p.name)
    return made


def alpha_log_check(results: dict) -> dict | None:
    """Largest |α logged during a run − α from the schedule formula| over every ProRes run's log."""
    from prores_algo import schedules
    worst, n = 0.0, 0
    for r in results['runs'].values():
        log = r.get('alpha_log')
        if not log:
            continue
        spec = r['spec']
        W = float(spec['prores_t_warmup'].removesuffix('dur')) * spec['steps']
        sched = spec['schedule']
        for j, t in enumerate(log['steps']):
            want = schedules.alphas(sched, spec['layers'], t, W)
            for l, a in enumerate(log['alphas']):
                if j < len(a):
                    worst = max(worst, abs(a[j] - want[l]))
                    n += 1
    return {'values_checked': n, 'max_abs_diff': worst} if n else None


# ------------------------------------------------------------------------------------------- driver
def _est_run_s(spec: dict, done: dict) -> float:
    """Expected wall time of a run, from the finished runs' seconds per (layer·step) plus fixed cost."""
    rates = [(r['wall_s'] - 8.0) / (r['spec']['layers'] * r['spec']['steps']) for r in done.values()
             if r['spec']['steps'] == spec['steps']]
    rate = statistics.median(rates) if rates else 0.4 / 24
    return 8.0 + max(rate, 0.0) * spec['layers'] * spec['steps']


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument('--quick', action='store_true')
    mode.add_argument('--smoke', action='store_true')
    p.add_argument('--steps', type=int, default=None, help='optimizer steps per run (overrides the mode)')
    p.add_argument('--budget-h', type=float, default=None, help='stop starting runs that would end after this')
    p.add_argument('--resume', action='store_true', help='reuse finished runs with identical specs from --out')
    p.add_argument('--plots-only', action='store_true', help='redraw the figures from --out and exit')
    p.add_argument('--diagnose', action='store_true',
                   help='Post-LN baseline / linear / stagewise_0 with per-layer branch and gradient probes; writes '
                        'diagnostics.json (beside --out) and quality_postln_diagnostics.png')
    p.add_argument('--only', default=None, help='comma list of experiments to run (main,depth,ablation)')
    p.add_argument('--out', default=str(RESULTS / 'quality.json'))
    p.add_argument('--plots-dir', default=None, help='default: the folder of --out')
    p.add_argument('--threads', type=int, default=1,
                   help='torch threads (default 1: on a shared 2-core machine two OpenMP threads that wait on each '
                        'other under contention made steps up to 10x slower)')
    p.add_argument('--data', default=None, help=f'MDS folder (default {DATA.relative_to(ROOT)}, smoke: ...-smoke)')
    args = p.parse_args(argv)
    args.mode = 'smoke' if args.smoke else 'quick' if args.quick else 'full'
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plots_dir = Path(args.plots_dir) if args.plots_dir else out.parent
    if args.plots_only:
        plots_dir.mkdir(parents=True, exist_ok=True)
        results = json.loads(out.read_text())
        print('wrote', make_plots(results, plots_dir))
        return results

    import torch
    torch.set_num_threads(args.threads)
    m = dict(MODES[args.mode])
    if args.steps:
        m['steps'] = args.steps
    budget_s = 3600 * (args.budget_h if args.budget_h is not None else m['budget_h'])
    specs, experiments = plan(m)
    if args.only:
        keep = set(args.only.split(','))
        experiments = {k: (v if k in keep else []) for k, v in experiments.items()}
        wanted = {k for v in experiments.values() for k in v}
        specs = [s for s in specs if run_key(s) in wanted]

    from prores_algo.data import ensure_dataset
    data_settings = dict(DATA_SETTINGS)
    if args.mode == 'smoke':
        data_settings['max_tokens'] = SMOKE_MAX_TOKENS
    data_path = Path(args.data or (str(DATA) + ('-smoke' if args.mode == 'smoke' else '')))
    meta = ensure_dataset('stdlib', data_path, progress=False, **data_settings)
    if args.diagnose:
        return diagnose(args, m, data_path, out.parent / 'diagnostics.json')

    cmd = 'python benchmarks/quality.py' + ('' if args.mode == 'full' else f' --{args.mode}')
    results = {'benchmark': 'quality', 'mode': args.mode, 'command': cmd, 'status': 'running',
               'config': {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in m.items()}, 'lr': LR,
                          'lr_warmup': LR_WARMUP, 'lr_decay': '0.1dur', 'prores_t_warmup': PRORES_T_WARMUP,
                          'lr_warmup_delay': LR_DELAY, 'batch': 16, 'seq_len': 128, 'yaml': 'benchmarks/quality.yaml',
                          'data': {**data_settings, 'source': 'stdlib', 'python': meta.get('python'),
                                   'train_tokens': meta['splits']['train']['tokens'],
                                   'val_tokens': meta['splits']['val']['tokens'],
                                   'val_documents': meta['splits']['val']['documents']}},
               'machine': machine_info(), 'experiments': experiments, 'planned': [run_key(s) for s in specs],
               'skipped': [], 'runs': {}, 'started': time.strftime('%Y-%m-%d %H:%M:%S')}
    old_runs, prev_elapsed = {}, 0.0
    if args.resume and out.is_file():
        old = json.loads(out.read_text())
        old_runs = old.get('runs', {})
        # the time budget covers the whole benchmark, across interruptions and resumes
        prev_elapsed = float(old.get('elapsed_s') or 0.0) + float(old.get('elapsed_s_previous') or 0.0)
        results['elapsed_s_previous'] = prev_elapsed
        results['resumed'] = int(old.get('resumed', 0)) + 1
    t_start = time.time()
    for i, spec in enumerate(specs):
        key = run_key(spec)
        if key in old_runs and old_runs[key]['spec'] == spec:
            results['runs'][key] = old_runs[key]
            print(f'[{i + 1}/{len(specs)}] {key}: reused from {out.name}', flush=True)
            continue
        elapsed = time.time() - t_start + prev_elapsed
        est = _est_run_s(spec, results['runs'])
        if elapsed + est > budget_s:
            results['skipped'].append(key)
            print(f'[{i + 1}/{len(specs)}] {key}: skipped (elapsed {elapsed:.0f} s + expected {est:.0f} s > budget '
                  f'{budget_s:.0f} s)', flush=True)
            continue
        print(f'[{i + 1}/{len(specs)}] {key}: start (elapsed {elapsed:.0f} s, expected {est:.0f} s)', flush=True)
        try:
            r = execute(spec, data_path)
        except Exception as e:  # a diverging configuration must not end the benchmark
            r = {'spec': spec, 'error': f'{type(e).__name__}: {e}', 'val_loss': float('nan'),
                 'val_ppl': float('nan'), 'wall_s': float('nan'), 'spikes': 0, 'diverged': True, 'curve': []}
        results['runs'][key] = r
        print(f'[{i + 1}/{len(specs)}] {key}: val_loss {r["val_loss"]:.4f} ppl {r["val_ppl"]:.3f} spikes {r["spikes"]} '
              f'diverged {r["diverged"]} wall {r["wall_s"]:.0f} s' + (f' ERROR {r["error"]}' if 'error' in r else ''),
              flush=True)
        results['summary'] = summarize(results['runs'], experiments)
        results['elapsed_s'] = time.time() - t_start
        write_json(out, results)
    results['summary'] = summarize(results['runs'], experiments)
    results['alpha_log_check'] = alpha_log_check(results)
    results['elapsed_s'] = time.time() - t_start
    results['status'] = 'complete' if not results['skipped'] else 'partial'
    try:
        results['machine']['loadavg_at_end'] = os.getloadavg()
    except OSError:  # pragma: no cover
        pass
    results['figures'] = make_plots(results, plots_dir)
    write_json(out, results)
    print(f'wrote {out} ({len(results["runs"])} runs, {len(results["skipped"])} skipped) and {results["figures"]} '
          f'in {results["elapsed_s"]:.0f} s', flush=True)
    return results


if __name__ == '__main__':
    main()
