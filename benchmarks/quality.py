"""ProRes quality benchmark: what decides whether ProRes helps, measured with enough seeds to say it.

Every point is a set of paired runs: baseline and ProRes with the same seed (so the same
initialisation and data order); Δ = ProRes' final validation loss − the baseline's, Δ < 0 = ProRes
ahead. Per point: mean ± SE, seeds ahead, a two-sided sign test and a bootstrap 95% CI of the mean
(`prores_algo.paired_stats`), and a verdict: ahead / behind / inside the seed noise.

Task: byte-level language modelling of the Python standard library sources (seq 128, batch 16),
reference decoder (RMSNorm, SwiGLU, RoPE, the official code's final norm), 8 layers, width 64, 4 heads.
AdamW (0.9, 0.95), wd 0.1, clip 1.0, WSD (linear decay over the last 10%). Pre-LN LR 3e-3 with a 2% LR
warmup; Post-LN LR 1.5e-3 with a 10% LR warmup (at this size Post-LN's baseline is unstable at 3e-3).

Studies:
  factor    W / L (optimizer steps of α warmup per layer) x initialisation x placement (Pre-LN, Post-LN),
            6 seeds. W is 25% of the run (the paper: 12-32%), so a run lasts 4 W steps. The
            initialisations set how large each branch starts against the residual stream (INITS); that
            ratio is measured for every (placement, initialisation, seed) on the first validation
            sequences before training (`monitor.branch_to_stream_ratio`, median over branches).
            Points run in priority order: W / L 25 and 100 at every initialisation, then 12 and 50.
  depth     the paper's rule, T = W / L fixed: 4 / 8 / 16 layers at each of DEPTH_SETTINGS (placement,
            initialisation, T), each run 4 W steps (W = 25% of the run), 4 seeds.
  ablation  Post-LN, official init, W / L = 50: linear, linear_square, equal, reverse, stagewise_0, staggered.

Per run: final validation loss (the same first `eval_batches` x 32 validation sequences for every
run), the training-loss curve, loss spikes counted with the library's own `SpikeCounter`, the mean
cosine between positions at every layer at the end (`monitor.position_cosine`: 1 = collapse), and
whether the run stalled: final validation loss within 0.1 nats of a unigram byte model's (it learned
nothing beyond byte frequencies). Stalled seeds are reported apart from the mean Δ.

Runs execute in `--jobs` processes (one torch thread each); results are written after every run to
benchmarks/results/quality.json, and `--resume` keeps every finished run whose settings are unchanged,
so an interrupted benchmark continues where it stopped. `--quick` and `--smoke` write under runs/
unless `--out` says otherwise, so they never overwrite the committed study.

Usage:
  python -m benchmarks.quality --resume        # full: ~8 h with 2 jobs on 2 cores (resumable)
  python -m benchmarks.quality --quick         # < 10 minutes
  python -m benchmarks.quality --smoke         # seconds (tests)
  python -m benchmarks.quality --plots-only    # redraw the figures from the JSON
  python -m benchmarks.report                  # tables into RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

try:  # run as `python -m benchmarks.quality` or loaded as part of the package
    from benchmarks._common import ROOT, machine_info, write_json
except ImportError:  # run as `python -m benchmarks.quality`: its folder is on sys.path
    from _common import ROOT, machine_info, write_json

from prores_algo.paired_stats import summarize_deltas
from prores_algo.training.compare import pair_by_seed, run_pool

RESULTS = ROOT / 'benchmarks' / 'results'
YAML = ROOT / 'benchmarks' / 'quality.yaml'
DATA = ROOT / 'benchmarks' / '.data' / 'stdlib-byte-128'
# The corpus: the first 8M bytes of the stdlib sources (in sorted path order), 5% of the files held out.
DATA_SETTINGS = dict(tokenizer='byte', seq_len=128, val_fraction=0.05, max_tokens=8_000_000, seed=0)
SMOKE_MAX_TOKENS = 1_500_000  # --smoke builds (and reuses) a small corpus of its own

LR = {'pre': 3e-3, 'post': 1.5e-3}
LR_WARMUP = {'pre': '0.02dur', 'post': '0.1dur'}
W_FRACTION = 0.25  # W = 25% of the run
STALL_MARGIN = 0.1  # nats/byte above (unigram level - margin) = stalled
ABLATION = ('linear', 'linear_square', 'equal', 'reverse', 'stagewise_0', 'staggered')
PAPER_WIDTH = 768  # the paper's 130M model: N(0, 0.02) there is std * sqrt(width) = 0.55


def init_overrides(init: str, d_model: int) -> dict:
    """`model.*` settings of each initialisation, from small branches (official at width 64) to large.

    official           the official code: Linear N(0, 0.02), embedding N(0, 0.02 sqrt(d))
    width768           Linear std with std sqrt(d) = 0.02 sqrt(768) and the embedding's std of a 768-wide
                       model, 0.02 sqrt(768): every activation starts as large as in the paper's 130M model
    torch              PyTorch's defaults: Linear kaiming-uniform (std 1 / sqrt(3 fan_in)), embedding N(0, 1)
    torch_small_embed  PyTorch's Linear with a small embedding, N(0, 0.02): branches start as large as the
                       stream (Pre-LN)
    """
    table = {
        'official': {},
        'width768': {'init_std': 0.02 * math.sqrt(PAPER_WIDTH / d_model), 'embed_std': 0.02 * math.sqrt(PAPER_WIDTH)},
        'torch': {'init': 'torch'},
        'torch_small_embed': {'init': 'torch', 'embed_std': 0.02},
    }
    if init not in table:
        raise ValueError(f'unknown initialisation {init!r}; one of {sorted(table)}')
    return table[init]


INITS = ('official', 'torch', 'torch_small_embed', 'width768')
# The depth study's settings (placement, initialisation, T = W / L). Pre-LN with PyTorch's init was chosen
# before the factor study had measured it (at 8 layers it turned out inside the seed noise); Post-LN with
# PyTorch's init is where the factor study has ProRes ahead in 6 of 6 seeds at T = 25, the setting the
# paper's depth claim should be tested at.
DEPTH_SETTINGS = ({'norm': 'pre', 'init': 'torch', 'spl': 25}, {'norm': 'post', 'init': 'torch', 'spl': 25})


def depth_label(setting: dict) -> str:
    """'pre-torch-T25': the key of one depth setting in the summary."""
    return f'{setting["norm"]}-{setting["init"]}-T{setting["spl"]:g}'


MODES = {
    'full': dict(
        layers=8,
        d_model=64,
        heads=4,
        inits=INITS,
        factor_spl=(25, 100, 12, 50),  # priority order: 25 and 100 at every init first
        seeds=(0, 1, 2, 3, 4, 5),
        depth_settings=DEPTH_SETTINGS,
        depths=(4, 8, 16),
        depth_seeds=(0, 1, 2, 3),
        ablation_spl=50,
        ablation=ABLATION,
        ablation_seeds=(0, 1),
        eval_batches=20,
    ),
    'quick': dict(
        layers=4,
        d_model=64,
        heads=4,
        inits=('official', 'torch'),
        factor_spl=(6,),
        seeds=(0, 1),
        depth_settings=({'norm': 'pre', 'init': 'torch', 'spl': 6}, {'norm': 'post', 'init': 'torch', 'spl': 6}),
        depths=(2, 4),
        depth_seeds=(0,),
        ablation_spl=6,
        ablation=('linear', 'linear_square'),
        ablation_seeds=(0,),
        eval_batches=4,
    ),
    'smoke': dict(
        layers=2,
        d_model=32,
        heads=4,
        inits=('official', 'torch'),
        factor_spl=(2,),
        seeds=(0,),
        depth_settings=({'norm': 'pre', 'init': 'torch', 'spl': 2}, {'norm': 'post', 'init': 'torch', 'spl': 2}),
        depths=(2,),
        depth_seeds=(0,),
        ablation_spl=2,
        ablation=('linear', 'equal'),
        ablation_seeds=(0,),
        eval_batches=1,
    ),
}


# ------------------------------------------------------------------------------------------- runs
def make_spec(
    study: str, norm: str, layers: int, steps: int, variant: str, seed: int, spl: float, m: dict, init: str = 'official'
) -> dict:
    """One run. `variant` is 'baseline' or a schedule name; `spl` = W / L, so W = spl · layers steps."""
    return {
        'study': study,
        'norm': norm,
        'layers': layers,
        'd_model': m['d_model'],
        'heads': m['heads'],
        'steps': steps,
        'variant': variant,
        'seed': seed,
        'spl': spl,
        't_warmup': None if variant == 'baseline' else int(round(spl * layers)),
        'lr': LR[norm],
        'lr_warmup': LR_WARMUP[norm],
        'eval_batches': m['eval_batches'],
        'batch': 16,
        'seq_len': 128,
        'init': init,
    }


def same_run(a: dict, b: dict) -> bool:
    """Settings equal, a spec from before initialisations were a factor counting as init 'official'
    and the study label ignored (a run shared by two studies is one run)."""

    def strip(s):
        return {k: v for k, v in {'init': 'official', **s}.items() if k != 'study'}

    return strip(a) == strip(b)


def init_key(spec: dict) -> str:
    """What fixes the initial weights: placement, depth, width, initialisation and seed."""
    return f'{spec["norm"]}-L{spec["layers"]}-d{spec["d_model"]}-{spec.get("init", "official")}-s{spec["seed"]}'


def run_key(spec: dict) -> str:
    """Runs shared between studies (same settings) get the same key and are trained once."""
    init = spec.get('init', 'official')
    return (
        f'{spec["norm"]}-L{spec["layers"]}-{spec["steps"]}st-{spec["variant"]}'
        + (f'@{spec["t_warmup"]}' if spec['t_warmup'] else '')
        + ('' if init == 'official' else f'-{init}')
        + f'-s{spec["seed"]}'
    )


def plan(m: dict) -> tuple[list[dict], dict[str, list[str]]]:
    """Every run, in priority order: each factor point's seeds together, W / L 25 and 100 at every
    initialisation first, then the depth study, then the other W / L values (12 and 50), then the
    (already measured) schedule ablation."""
    runs: dict[str, dict] = {}
    studies: dict[str, list[str]] = {'factor': [], 'depth': [], 'ablation': []}

    def add(study, spec):
        k = run_key(spec)
        runs.setdefault(k, spec)
        studies[study].append(k)

    def add_depth():
        for setting in m['depth_settings']:
            dn, di, ds = setting['norm'], setting['init'], setting['spl']
            for seed in m['depth_seeds']:
                for depth in m['depths']:
                    for v in ('baseline', 'linear'):
                        steps = int(round(ds * depth / W_FRACTION))
                        add('depth', make_spec('depth', dn, depth, steps, v, seed, ds, m, di))

    L = m['layers']
    for i, spl in enumerate(m['factor_spl']):
        steps = int(round(spl * L / W_FRACTION))
        for init in m['inits']:
            for seed in m['seeds']:
                for norm in ('pre', 'post'):
                    for v in ('baseline', 'linear'):
                        add('factor', make_spec('factor', norm, L, steps, v, seed, spl, m, init))
        if i == min(1, len(m['factor_spl']) - 1):  # the depth study right after the first two factor points
            add_depth()
    steps = int(round(m['ablation_spl'] * L / W_FRACTION))
    for seed in m['ablation_seeds']:
        for v in ('baseline', *m['ablation']):
            add('ablation', make_spec('ablation', 'post', L, steps, v, seed, m['ablation_spl'], m))
    return list(runs.values()), {k: list(dict.fromkeys(v)) for k, v in studies.items()}


def init_ratios(specs: list[dict], data_path: Path, known: dict, n_seqs: int = 32) -> dict:
    """`monitor.branch_to_stream_ratio` of every initial model of the plan (keyed by `init_key`), built as
    `train.build_trainer` builds it (seed, then model), on the first validation sequences."""
    import torch
    from composer.utils import reproducibility

    from prores_algo.monitor import branch_to_stream_ratio
    from prores_algo.training.composer_train import build_model
    from prores_algo.training.config import load_config
    from prores_algo.training.data import TokenDataset
    from prores_algo.training.tokenizers import load_tokenizer

    ds = TokenDataset(local=str(data_path), split='val', shuffle=False, batch_size=1)
    ids = torch.stack([ds[i]['input_ids'] for i in range(min(n_seqs, len(ds)))])
    out = dict(known)
    for spec in specs:
        k = init_key(spec)
        if k in out or spec['variant'] != 'baseline':
            continue
        cfg = load_config(YAML, overrides(spec, data_path))
        reproducibility.seed_all(cfg.seed)
        model = build_model(cfg, load_tokenizer(cfg.tokenizer).vocab_size)
        r = branch_to_stream_ratio(model.model, ids)
        out[k] = {'median': r['median'], 'min': r['min'], 'max': r['max']}
    return out


def overrides(spec: dict, data_path: Path) -> list[str]:
    o = {
        'run_name': run_key(spec),
        'seed': spec['seed'],
        'data.path': str(data_path),
        'model.n_layers': spec['layers'],
        'model.d_model': spec['d_model'],
        'model.n_heads': spec['heads'],
        'model.norm': spec['norm'],
        **{f'model.{k}': v for k, v in init_overrides(spec.get('init', 'official'), spec['d_model']).items()},
        'optimizer.lr': spec['lr'],
        'scheduler.lr_warmup': spec['lr_warmup'],
        'max_duration': f'{spec["steps"]}ba',
        'eval_subset_num_batches': spec['eval_batches'],
        'console_log_interval': f'{max(1, spec["steps"] // 4)}ba',
    }
    if spec['variant'] != 'baseline':
        o.update(
            {
                'algorithms.prores.schedule': spec['variant'],
                'algorithms.prores.t_warmup': f'{spec["t_warmup"]}ba',
                'algorithms.prores.log_interval': max(1, spec['steps'] // 50),
            }
        )
    return [f'{k}={v}' for k, v in o.items()]


def _final_position_cosine(data_path: Path, n_seqs: int = 32):
    """Composer callback: at fit end, `position_cosine` of every layer's output on the first validation
    sequences (ProRes is removed by then, so this is the trained model itself)."""
    import torch
    from composer.core import Callback

    from prores_algo.monitor import position_cosine
    from prores_algo.surgery import find_residual_layers
    from prores_algo.training.data import TokenDataset

    class FinalCosine(Callback):
        def __init__(self):
            self.values: list[float] = []

        def fit_end(self, state, logger):
            ds = TokenDataset(local=str(data_path), split='val', shuffle=False, batch_size=1)
            ids = torch.stack([ds[i]['input_ids'] for i in range(min(n_seqs, len(ds)))])
            model = state.model.model
            out = []
            hooks = [
                layer.register_forward_hook(lambda m, a, o: out.append(float(position_cosine(o))))
                for layer in (rl.module for rl in find_residual_layers(model))
            ]
            try:
                with torch.no_grad():
                    model(ids)
            finally:
                for h in hooks:
                    h.remove()
            self.values = out

    return FinalCosine()


def execute(spec: dict, data_path: Path, unigram: float) -> dict:
    import torch
    from composer.loggers import InMemoryLogger

    from prores_algo.monitor import SpikeCounter
    from prores_algo.training.composer_train import run
    from prores_algo.training.config import load_config

    torch.set_num_threads(1)  # two 1-thread jobs on 2 cores; 2 threads that wait on each other are far slower
    cfg = load_config(YAML, overrides(spec, data_path))
    mem, cos = InMemoryLogger(), _final_position_cosine(data_path)
    res = run(cfg, extra_callbacks=(cos,), extra_loggers=(mem,))
    curve = [float(v) for _, v in mem.data.get('loss/train/total', [])]
    spikes = SpikeCounter(window=max(20, spec['steps'] // 20))
    spike_steps = [i for i, v in enumerate(curve) if spikes.push(v)]
    out = {
        'spec': spec,
        'val_loss': res['val_loss'],
        'wall_s': res['wall_s'],
        'spikes': len(spike_steps),
        'spike_steps': spike_steps,
        'position_cosine': cos.values,
        'diverged': not all(math.isfinite(v) for v in curve) or not math.isfinite(res['val_loss']),
        'stalled': res['val_loss'] >= unigram - STALL_MARGIN,
        'curve': curve[:: max(1, len(curve) // 400)],
    }
    alpha_keys = sorted(
        (k for k in mem.data if k.startswith('prores/alpha/layer_')), key=lambda k: int(k.rsplit('_')[-1])
    )
    if alpha_keys:  # the logged α against the formula, so a wrong schedule cannot hide in the numbers
        from prores_algo import alpha_schedules

        worst = 0.0
        for layer, key in enumerate(alpha_keys):
            for t, a in mem.data[key]:
                want = alpha_schedules.alphas(spec['variant'], spec['layers'], int(t.batch), spec['t_warmup'])[layer]
                worst = max(worst, abs(float(a) - want))
        out['alpha_max_abs_err'] = worst
    return out


def unigram_level(data_path: Path, eval_batches: int, train_samples: int = 20000) -> float:
    """Cross-entropy (nats/byte) on the evaluated validation sequences of a unigram byte model counted on
    the first training sequences (add-one smoothing): what a model that ignores context gets."""
    import numpy as np

    from prores_algo.training.data import TokenDataset

    def load(split, n):
        ds = TokenDataset(local=str(data_path), split=split, shuffle=False, batch_size=1)
        return np.stack([ds[i]['input_ids'].numpy() for i in range(min(n, len(ds)))])

    tr, va = load('train', train_samples), load('val', eval_batches * 32)
    counts = np.bincount(tr.ravel(), minlength=257) + 1.0
    return float(-np.log((counts / counts.sum())[va[:, 1:].ravel()]).mean())


def _safe_execute(spec: dict, data_path: str, unigram: float) -> dict:
    try:
        return execute(spec, Path(data_path), unigram)
    except Exception as e:  # a diverging configuration must not end the benchmark
        return {
            'spec': spec,
            'error': f'{type(e).__name__}: {e}',
            'val_loss': float('nan'),
            'wall_s': float('nan'),
            'spikes': 0,
            'diverged': True,
            'stalled': False,
            'curve': [],
            'position_cosine': [],
        }


# ----------------------------------------------------------------------------------------- summary
def _pairs(runs: dict, keys: list[str], variant: str = 'linear', **match) -> list[tuple[dict, dict]]:
    """(baseline, variant) run pairs with the same seed among `keys` matching `match`."""

    def field(spec, a):  # a spec from before initialisations were a factor is init 'official'
        return spec.get(a, 'official' if a == 'init' else None)

    sel = [runs[k] for k in keys if k in runs and all(field(runs[k]['spec'], a) == b for a, b in match.items())]

    def by_seed(v):
        return {r['spec']['seed']: r for r in sel if r['spec']['variant'] == v}

    return pair_by_seed(by_seed('baseline'), by_seed(variant))


def paired(pairs: list[tuple[dict, dict]], ratios: dict | None = None) -> dict:
    """Δ = variant − baseline per seed, with `paired_stats.summarize_deltas` (mean ± SE, seeds ahead, sign
    test, bootstrap CI, verdict) over pairs where neither run stalled or diverged; stalled / diverged
    seeds are counted apart, so one stall does not hide in a mean. `ratios`: branch-to-stream ratio at
    initialisation by `init_key`, reported per seed."""
    ok = [(b, r) for b, r in pairs if not (b['stalled'] or r['stalled'] or b['diverged'] or r['diverged'])]
    d = [r['val_loss'] - b['val_loss'] for b, r in ok]
    ratio = [((ratios or {}).get(init_key(b['spec'])) or {}).get('median') for b, _ in ok]
    return {
        'n_pairs': len(pairs),
        **summarize_deltas(d),
        'seeds': [r['spec']['seed'] for _, r in ok],
        'per_seed': d,
        'init_ratio': ratio,
        'baseline_mean': statistics.fmean(b['val_loss'] for b, _ in ok) if ok else None,
        'prores_mean': statistics.fmean(r['val_loss'] for _, r in ok) if ok else None,
        'stalled_prores': sum(r['stalled'] for _, r in pairs),
        'stalled_baseline': sum(b['stalled'] for b, _ in pairs),
        'diverged': sum(b['diverged'] or r['diverged'] for b, r in pairs),
        'spikes_baseline': sum(b['spikes'] for b, _ in pairs),
        'spikes_prores': sum(r['spikes'] for _, r in pairs),
    }


def summarize(runs: dict, studies: dict, m: dict, ratios: dict | None = None) -> dict:
    factor = {
        init: {
            norm: {
                str(x): paired(_pairs(runs, studies['factor'], norm=norm, spl=x, init=init), ratios)
                for x in m['factor_spl']
            }
            for norm in ('pre', 'post')
        }
        for init in m['inits']
    }
    depth = {
        depth_label(st): {
            'setting': dict(st),
            'layers': {
                str(d): paired(
                    _pairs(runs, studies['depth'], layers=d, norm=st['norm'], init=st['init'], spl=st['spl']), ratios
                )
                for d in m['depths']
            },
        }
        for st in m['depth_settings']
    }
    ablation = {v: paired(_pairs(runs, studies['ablation'], variant=v)) for v in m['ablation']}
    return {
        'factor': factor,
        'depth': depth,
        'ablation': ablation,
        'threshold': {init: ahead_from(points) for init, points in factor.items()},
    }


def ahead_from(spl: dict) -> dict:
    """Per norm: the smallest measured W / L from which ProRes is ahead at every longer measured point
    (the bootstrap CI of the mean Δ below 0, no ProRes stall), or None."""
    out = {}
    for norm, points in spl.items():
        xs = sorted((float(x), p) for x, p in points.items() if p['n_pairs'])
        first = None
        for x, p in reversed(xs):
            if p['verdict'] == 'ahead' and p['stalled_prores'] == 0:
                first = x
            else:
                break
        out[norm] = first
    return out


# -------------------------------------------------------------------------------------------- plots
INIT_COLORS = {'official': 'tab:blue', 'width768': 'tab:orange', 'torch': 'tab:green', 'torch_small_embed': 'tab:red'}


def make_plots(results: dict, out_dir: Path) -> list[str]:
    """The figures whose study has measured pairs; returns their file names."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    made = []
    for name, plot in (
        ('quality_factors.png', _plot_factors),
        ('quality_ratio.png', _plot_ratio),
        ('quality_depth.png', _plot_depth),
        ('quality_ablation.png', _plot_ablation),
    ):
        fig = plot(plt, results)
        if fig is not None:
            made.append(_save(fig, out_dir / name))
    return made


def _plot_factors(plt, results: dict):
    """Δ against W / L, one colour per initialisation: every seed a dot, the mean ± SE a line."""
    f = results['summary']['factor']
    if not any(p['n_pairs'] for pts in f.values() for norm in pts.values() for p in norm.values()):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=False)
    inits = list(f)
    for ax, norm, title in zip(axes, ('pre', 'post'), ('Pre-LN', 'Post-LN'), strict=True):
        ticks = sorted({float(x) for init in inits for x in f[init][norm]})
        for j, init in enumerate(inits):
            shift = 1 + 0.06 * (j - (len(inits) - 1) / 2)  # side by side on the log axis
            pts = sorted((float(x), p) for x, p in f[init][norm].items() if p['n'])
            if not pts:
                continue
            c = INIT_COLORS.get(init)
            for x, p in pts:
                ax.scatter([x * shift] * len(p['per_seed']), p['per_seed'], color=c, alpha=0.35, s=12)
            ax.errorbar(
                [x * shift for x, _ in pts],
                [p['delta_mean'] for _, p in pts],
                yerr=[p['delta_se'] or 0 for _, p in pts],
                marker='o',
                color=c,
                capsize=3,
                label=init,
            )
        ax.axhline(0, color='gray', lw=1)
        ax.set_xscale('log')
        ax.set_xticks(ticks)
        ax.set_xticklabels([f'{t:g}' for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel('α warmup steps per layer (W / L); the paper uses 1000')
        ax.set_ylabel('Δ val loss, ProRes − baseline (nats/byte)')
        ax.set_title(f'{title}, {results["config"]["layers"]} layers x {results["config"]["d_model"]}: dots = seeds')
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, title='initialisation')
    fig.tight_layout()
    return fig


def _plot_ratio(plt, results: dict):
    """Δ per seed against the branch-to-stream ratio at initialisation, one panel per placement."""
    f = results['summary']['factor']
    rows = [
        (norm, float(x), r, d, init)
        for init, pts in f.items()
        for norm, by_spl in pts.items()
        for x, p in by_spl.items()
        for r, d in zip(p['init_ratio'], p['per_seed'], strict=True)
        if r is not None
    ]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    spls = sorted({x for _, x, *_ in rows})
    cmap = plt.get_cmap('viridis')
    for ax, norm, title in zip(axes, ('pre', 'post'), ('Pre-LN', 'Post-LN'), strict=True):
        for i, x in enumerate(spls):
            sel = [(r, d) for n, xx, r, d, _ in rows if n == norm and xx == x]
            if sel:
                ax.scatter(
                    *zip(*sel, strict=True),
                    color=cmap(i / max(1, len(spls) - 1)),
                    s=16,
                    alpha=0.7,
                    label=f'W / L = {x:g}',
                )
        ax.axhline(0, color='gray', lw=1)
        ax.set_xscale('log')
        ax.set_xlabel('branch-to-stream RMS ratio at initialisation (median over branches)')
        ax.set_ylabel('Δ val loss, ProRes − baseline, per seed')
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _plot_depth(plt, results: dict):
    """Final validation loss against depth (means; dashed = baseline), and Δ per seed, at a fixed T = W / L,
    one colour per depth setting."""
    settings = {
        label: {int(d): p for d, p in entry['layers'].items() if p['n'] and p['baseline_mean'] is not None}
        for label, entry in results['summary']['depth'].items()
    }
    settings = {label: pts for label, pts in settings.items() if pts}
    if not settings:
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    all_depths = sorted({d for pts in settings.values() for d in pts})
    for i, (label, depth) in enumerate(settings.items()):
        color = ('tab:red', 'tab:blue', 'tab:green', 'tab:orange')[i % 4]
        st = results['summary']['depth'][label]['setting']
        name = f'{ {"pre": "Pre-LN", "post": "Post-LN"}[st["norm"]] }, {st["init"]} init'
        ds = sorted(depth)
        ax.plot(ds, [depth[d]['baseline_mean'] for d in ds], marker='o', ls='--', color=color, alpha=0.6)
        ax.plot(ds, [depth[d]['prores_mean'] for d in ds], marker='o', color=color, label=f'{name}: ProRes (solid)')
        for d in ds:
            ax2.scatter([d] * len(depth[d]['per_seed']), depth[d]['per_seed'], color=color, alpha=0.5, s=14)
        ax2.errorbar(
            ds,
            [depth[d]['delta_mean'] for d in ds],
            yerr=[depth[d]['delta_se'] or 0 for d in ds],
            marker='o',
            color=color,
            capsize=3,
            label=name,
        )
    ax.set_ylabel('final val loss (seed mean; dashed = baseline)')
    ax.legend(fontsize=8)
    ax2.axhline(0, color='gray', lw=1)
    ax2.set_ylabel('Δ val loss, ProRes − baseline (dots = seeds)')
    ax2.legend(fontsize=8)
    for a in (ax, ax2):
        a.set_xscale('log', base=2)
        a.set_xticks(all_depths)
        a.set_xticklabels([str(d) for d in all_depths])
        a.set_xlabel(f'layers (width {results["config"]["d_model"]}, run = 4 W steps)')
        a.grid(alpha=0.3)
    spls = sorted({st['spl'] for st in results['config']['depth_settings']})
    fig.suptitle(f'Depth at a fixed T = W / L = {", ".join(f"{x:g}" for x in spls)}')
    fig.tight_layout()
    return fig


def _plot_ablation(plt, results: dict):
    s = results['summary']
    ab = {v: p for v, p in s['ablation'].items() if p['n_pairs']}
    if not ab:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(ab)
    for i, v in enumerate(names):
        ax.scatter([i] * len(ab[v]['per_seed']), ab[v]['per_seed'], color='tab:red', alpha=0.5)
        if ab[v]['stalled_prores']:
            ax.annotate(
                f'{ab[v]["stalled_prores"]} stalled',
                (i, 0),
                textcoords='offset points',
                xytext=(0, 8),
                ha='center',
                fontsize=8,
                color='tab:purple',
            )
    ax.axhline(0, color='gray', lw=1)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha='right')
    ax.set_ylabel('Δ val loss vs baseline, per seed')
    ax.set_title(f'Post-LN schedule ablation, W / L = {results["config"]["ablation_spl"]}')
    ax.grid(alpha=0.3, axis='y')
    fig.tight_layout()
    return fig


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


# ------------------------------------------------------------------------------------------- driver
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument('--quick', action='store_true')
    mode.add_argument('--smoke', action='store_true')
    p.add_argument('--jobs', type=int, default=2, help='runs in parallel, one torch thread each')
    p.add_argument('--resume', action='store_true', help='keep finished runs with unchanged settings from --out')
    p.add_argument('--plots-only', action='store_true', help='recompute the summary and redraw the figures from --out')
    p.add_argument('--only', default=None, help='comma list of studies to run (factor,depth,ablation)')
    p.add_argument(
        '--out', default=None, help='results JSON (default: the committed study for the full run, runs/ else)'
    )
    p.add_argument('--data', default=None, help=f'MDS folder (default {DATA.relative_to(ROOT)}; smoke: ...-smoke)')
    args = p.parse_args(argv)
    args.mode = 'smoke' if args.smoke else 'quick' if args.quick else 'full'
    if args.out is None:  # a smoke or quick run never overwrites the committed study and its figures
        full = args.mode == 'full'
        args.out = str(RESULTS / 'quality.json' if full else ROOT / 'runs' / 'benchmarks' / f'quality-{args.mode}.json')
    return args


def new_results(args, m: dict, specs: list, studies: dict, settings: dict, meta: dict, unigram: float) -> dict:
    """The results record before any run: what is measured, on what, and the plan."""
    cmd = 'python -m benchmarks.quality' + ('' if args.mode == 'full' else f' --{args.mode}')
    return {
        'benchmark': 'quality',
        'mode': args.mode,
        'command': cmd,
        'status': 'running',
        'config': {
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in m.items()},
            'lr': LR,
            'lr_warmup': LR_WARMUP,
            'w_fraction': W_FRACTION,
            'stall_margin': STALL_MARGIN,
            'unigram_level': unigram,
            'batch': 16,
            'seq_len': 128,
            'yaml': 'benchmarks/quality.yaml',
            'data': {
                **settings,
                'source': 'stdlib',
                'python': meta.get('python'),
                'train_tokens': meta['splits']['train']['tokens'],
                'val_tokens': meta['splits']['val']['tokens'],
            },
        },
        'machine': machine_info(),
        'jobs': args.jobs,
        'studies': studies,
        'planned': [run_key(s) for s in specs],
        'runs': {},
        'init_ratios': {},
        'started': time.strftime('%Y-%m-%d %H:%M:%S'),
        'elapsed_s_previous': 0.0,
    }


def keep_finished(results: dict, out: Path, specs: list) -> None:
    """--resume: keep every finished run of `out` whose settings are unchanged (and count its wall time)."""
    if not out.is_file():
        return
    old = json.loads(out.read_text())
    for r in old.get('runs', {}).values():
        match = next((s for s in specs if same_run(s, r['spec'])), None)
        if 'error' not in r and match is not None:
            results['runs'][run_key(match)] = {**r, 'spec': match}
    results['init_ratios'].update(old.get('init_ratios', {}))
    if results['runs']:  # the wall time covers this study only, across resumes (not an unrelated old file)
        results['elapsed_s_previous'] = float(old.get('elapsed_s') or 0) + float(old.get('elapsed_s_previous') or 0)
        results['resumed'] = int(old.get('resumed', 0)) + 1


def _status(runs: dict, planned: list[str]) -> str:
    """'complete' when every planned run is measured, else 'partial' (`--resume` measures the rest)."""
    return 'complete' if all(k in runs for k in planned) else 'partial'


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.plots_only:  # the summary is recomputed from the runs, so a change of statistics reaches it
        results = json.loads(out.read_text())
        results['summary'] = summarize(results['runs'], results['studies'], results['config'], results['init_ratios'])
        results['status'] = _status(results['runs'], results['planned'])  # a stopped study no longer says running
        write_json(out, results)
        print('wrote', make_plots(results, out.parent))
        return results
    m = MODES[args.mode]
    specs, studies = plan(m)
    if args.only:
        keep = set(args.only.split(','))
        studies = {k: (v if k in keep else []) for k, v in studies.items()}
        specs = [s for s in specs if any(run_key(s) in v for v in studies.values())]

    from prores_algo.training.data import ensure_dataset

    settings = dict(DATA_SETTINGS, max_tokens=SMOKE_MAX_TOKENS) if args.mode == 'smoke' else dict(DATA_SETTINGS)
    data_path = Path(args.data or (str(DATA) + ('-smoke' if args.mode == 'smoke' else '')))
    meta = ensure_dataset('stdlib', data_path, progress=False, **settings)
    unigram = unigram_level(data_path, m['eval_batches'])

    results = new_results(args, m, specs, studies, settings, meta, unigram)
    if args.resume:
        keep_finished(results, out, specs)
    todo = [s for s in specs if run_key(s) not in results['runs']]
    results['init_ratios'] = init_ratios(specs, data_path, results['init_ratios'])
    print(
        f'{len(specs)} runs, {len(specs) - len(todo)} kept from {out.name}, {len(todo)} to run with {args.jobs} jobs',
        flush=True,
    )
    t0 = time.time()

    def record(r):
        results['runs'][run_key(r['spec'])] = r
        results['summary'] = summarize(results['runs'], studies, m, results['init_ratios'])
        results['elapsed_s'] = time.time() - t0
        write_json(out, results)

    def on_result(r):
        record(r)
        print(
            f'{run_key(r["spec"])}: val_loss {r["val_loss"]:.4f} stalled {r["stalled"]} spikes {r["spikes"]} '
            f'wall {r["wall_s"]:.0f} s' + (f' ERROR {r["error"]}' if 'error' in r else ''),
            flush=True,
        )

    run_pool(_safe_execute, [(s, str(data_path), unigram) for s in todo], args.jobs, on_result)  # priority order
    results['summary'] = summarize(results['runs'], studies, m, results['init_ratios'])
    results['status'] = _status(results['runs'], [run_key(s) for s in specs])
    results['elapsed_s'] = time.time() - t0
    results['figures'] = make_plots(results, out.parent)
    write_json(out, results)
    print(f'wrote {out}: {len(results["runs"])} runs, ahead from W/L = {results["summary"]["threshold"]}', flush=True)
    return results


if __name__ == '__main__':
    main()
