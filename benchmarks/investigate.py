"""Why ProRes does not help in the quality miniature: change one factor at a time and compare again.

The miniature (benchmarks/quality.py: 24 layers x 64 wide, 300 steps, ProRes t_warmup = 0.25dur) is far
from the paper's regime (DESIGN.md section 2: 100k steps, t_warmup 12-24k, i.e. 500-1000 steps per
layer, width >= 768). Each factor below moves one setting of the main-table comparison towards the
paper's regime (or, for the LR, towards stability) and reruns baseline vs ProRes `linear` with the same
seeds, everything else equal:

  reference         the main table's configuration (reused from quality.json when the spec matches)
  lr/3              Post-LN LR 5e-4 instead of 1.5e-3
  width 128         d_model 128 (head_dim 32) instead of 64
  6 layers          6 layers: 12.5 steps of α warmup per layer instead of 3.1, same W
  4x steps          1200 steps instead of 300 (W = 300 steps: 12.5 per layer), LR schedule scaled along

Usage:
  python benchmarks/investigate.py               # ~2 h with --jobs 2 on the 2-core machine (longest: 1200-step runs)
  python benchmarks/investigate.py --smoke       # seconds (tests)
  python benchmarks/investigate.py --resume      # reuse finished runs with identical specs
Writes benchmarks/results/investigation.json and quality_investigation.png; benchmarks/report.py renders it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import quality  # noqa: E402  (benchmarks/quality.py: the runs, the data and the spec format)
from _common import machine_info, write_json  # noqa: E402

# (factor, norms it is tried on, changes to the main-table spec, seeds)
FACTORS = {
    'full': [
        ('reference', ('pre', 'post'), {}, (0, 1, 2)),  # reused from the main table
        ('lr/3', ('post',), {'lr': 5e-4}, (0,)),
        ('width 128', ('post',), {'d_model': 128}, (0,)),
        ('6 layers', ('post',), {'layers': 6}, (0,)),
        # flipped the sign in seed 0; 3 seeds put both norms within 2 SE of zero: 5 seeds
        ('4x steps', ('pre', 'post'), {'steps': 1200}, (0, 1, 2, 3, 4)),
    ],
    'smoke': [
        ('reference', ('post',), {}, (0,)),
        ('2x steps', ('post',), {'steps': 8}, (0, 1)),
    ],
}


def run_key(spec: dict) -> str:
    return (f"{spec['norm']}-L{spec['layers']}-d{spec['d_model']}-{spec['steps']}st-lr{spec['lr']:g}-"
            f"{spec['variant']}-s{spec['seed']}")


def plan(mode: str) -> tuple[list[dict], list[dict]]:
    m = dict(quality.MODES[mode])
    specs, pairs = {}, []
    for factor, norms, change, seeds in FACTORS[mode]:
        for norm in norms:
            for seed in seeds:
                pair = {'factor': factor, 'norm': norm, 'seed': seed, 'change': change}
                for v in ('baseline', 'linear'):
                    s = quality.make_spec(norm, m['layers'], v, seed, m)
                    s.update(change)
                    specs.setdefault(run_key(s), s)
                    pair[v] = run_key(s)
                pairs.append(pair)
    return list(specs.values()), pairs


def steps_per_layer(spec: dict) -> float:
    """ProRes `linear` warmup length per layer, in optimizer steps (the paper: T = 500-1000)."""
    return float(spec['prores_t_warmup'].removesuffix('dur')) * spec['steps'] / spec['layers']


def _worker_init(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def _execute(spec: dict, data_path: str) -> dict:
    try:
        return quality.execute(spec, Path(data_path))
    except Exception as e:  # a diverging configuration must not end the benchmark
        return {'spec': spec, 'error': f'{type(e).__name__}: {e}', 'val_loss': float('nan'), 'val_ppl': float('nan'),
                'wall_s': float('nan'), 'spikes': 0, 'diverged': True, 'curve': []}


def summarize(runs: dict, pairs: list[dict]) -> list[dict]:
    rows = []
    for p in pairs:
        b, l = runs.get(p['baseline']), runs.get(p['linear'])
        if not b or not l:
            continue
        rows.append({**p, 'baseline_val_loss': b['val_loss'], 'linear_val_loss': l['val_loss'],
                     'delta': l['val_loss'] - b['val_loss'], 'steps_per_layer': steps_per_layer(l['spec']),
                     'steps': l['spec']['steps'], 'layers': l['spec']['layers'], 'd_model': l['spec']['d_model'],
                     'lr': l['spec']['lr'], 'wall_s': b['wall_s'] + l['wall_s'],
                     'diverged': bool(b['diverged'] or l['diverged'])})
    return rows


def aggregate(rows: list[dict]) -> list[dict]:
    """Per (factor, norm): mean ± std of the paired Δ over seeds, and in how many seeds ProRes won."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r['factor'], r['norm']), []).append(r)
    out = []
    for (factor, norm), rs in groups.items():
        d = [r['delta'] for r in rs]
        out.append({'factor': factor, 'norm': norm, 'seeds': [r['seed'] for r in rs], 'n': len(d),
                    'delta_mean': statistics.fmean(d), 'delta_std': statistics.stdev(d) if len(d) > 1 else 0.0,
                    'wins': sum(x < 0 for x in d),
                    'baseline_mean': statistics.fmean(r['baseline_val_loss'] for r in rs),
                    'linear_mean': statistics.fmean(r['linear_val_loss'] for r in rs),
                    'steps_per_layer': rs[0]['steps_per_layer']})
    return out


def plot(res: dict, out_dir: Path) -> str:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows, agg = res['summary'], res['aggregate']
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={'width_ratios': [1, 1.3]})
    labels = [f"{quality_name(a['norm'])}\n{a['factor']}\n({a['n']} seed{'s' if a['n'] > 1 else ''})" for a in agg]
    deltas = [a['delta_mean'] for a in agg]
    axes[0].bar(range(len(agg)), deltas, color=['tab:green' if d < 0 else 'tab:red' for d in deltas], alpha=0.7)
    for i, a in enumerate(agg):  # every seed, so one stalled run is not mistaken for a spread
        seeds = [r['delta'] for r in rows if r['factor'] == a['factor'] and r['norm'] == a['norm']]
        axes[0].scatter([i] * len(seeds), seeds, color='k', s=10, zorder=3)
    axes[0].axhline(0, color='k', lw=0.8)
    axes[0].set_xticks(range(len(agg)))
    axes[0].set_xticklabels(labels, fontsize=7)
    axes[0].set_yscale('symlog', linthresh=0.05)
    axes[0].set_ylabel('val loss, ProRes − baseline (nats/byte)')
    axes[0].set_title('one factor at a time (bar: mean, dots: seeds); < 0: ProRes better')
    axes[0].grid(alpha=0.3, axis='y')
    for r, color in zip((x for x in rows if x['norm'] == 'post' and x['seed'] == 0), ('tab:gray', 'tab:blue', 'tab:orange', 'tab:green',
                                                                   'tab:purple', 'tab:brown')):
        for v, ls in (('baseline', ':'), ('linear', '-')):
            c = res['runs'][r[v]]['curve']
            if c:
                axes[1].plot([i / len(c) for i in range(len(c))], quality._smooth(c, max(1, len(c) // 30)),
                             color=color, ls=ls, lw=1.2, label=f"{r['factor']}, {'ProRes' if v == 'linear' else 'base'}")
    axes[1].set_xlabel('fraction of the run')
    axes[1].set_ylabel('train loss (moving average)')
    lows = [min(line.get_ydata()) for line in axes[1].get_lines()]
    axes[1].set_ylim(min(lows) - 0.05 if lows else 1.0, 3.6)
    axes[1].set_title('Post-LN training loss (solid: ProRes linear, dotted: baseline)')
    axes[1].legend(fontsize=7, ncol=2)
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    p = out_dir / 'quality_investigation.png'
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p.name


def quality_name(norm: str) -> str:
    return {'pre': 'Pre-LN', 'post': 'Post-LN'}[norm]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--smoke', action='store_true')
    p.add_argument('--resume', action='store_true', help='reuse finished runs with identical specs from --out')
    p.add_argument('--jobs', type=int, default=2, help='runs in parallel, one torch thread each')
    p.add_argument('--out', default=str(quality.RESULTS / 'investigation.json'))
    p.add_argument('--quality', default=str(quality.RESULTS / 'quality.json'),
                   help='finished main-table runs with identical specs are reused from here')
    p.add_argument('--data', default=None)
    args = p.parse_args(argv)
    mode = 'smoke' if args.smoke else 'full'
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    from prores_algo.data import ensure_dataset
    settings = dict(quality.DATA_SETTINGS)
    if mode == 'smoke':
        settings['max_tokens'] = quality.SMOKE_MAX_TOKENS
    data_path = Path(args.data or (str(quality.DATA) + ('-smoke' if mode == 'smoke' else '')))
    ensure_dataset('stdlib', data_path, progress=False, **settings)

    specs, pairs = plan(mode)
    known = {}
    for path in ([args.quality] if Path(args.quality).is_file() else []) + ([out] if args.resume and out.is_file() else []):
        for r in json.loads(Path(path).read_text()).get('runs', {}).values():
            if 'error' not in r:
                known[json.dumps(r['spec'], sort_keys=True)] = r
    res = {'benchmark': 'quality-investigation', 'mode': mode,
           'command': 'python benchmarks/investigate.py' + (' --smoke' if mode == 'smoke' else ''),
           'machine': machine_info(), 'jobs': args.jobs, 'factors': FACTORS[mode], 'pairs': pairs,
           'runs': {}, 'reused': [], 'started': time.strftime('%Y-%m-%d %H:%M:%S'), 'elapsed_s_previous': 0.0}
    if args.resume and out.is_file():  # wall time covers the whole benchmark, across resumes
        old = json.loads(out.read_text())
        res['elapsed_s_previous'] = float(old.get('elapsed_s') or 0.0) + float(old.get('elapsed_s_previous') or 0.0)
    todo = []
    for s in specs:
        old = known.get(json.dumps(s, sort_keys=True))
        if old is not None:
            res['runs'][run_key(s)] = old
            res['reused'].append(run_key(s))
        else:
            todo.append(s)
    todo.sort(key=lambda s: -s['layers'] * s['steps'] * s['d_model'])  # longest first: the pool balances better
    t0 = time.time()
    print(f'{len(specs)} runs, {len(res["reused"])} reused, {len(todo)} to run with {args.jobs} jobs', flush=True)
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context('spawn'),
                             initializer=_worker_init, initargs=(1,)) as pool:
        futures = {}
        for s in todo:  # starting together is safe: TokenDataset serialises streaming's shared-memory setup
            futures[pool.submit(_execute, s, str(data_path))] = s
        for f in as_completed(futures):
            r = f.result()
            k = run_key(r['spec'])
            res['runs'][k] = r
            print(f'{k}: val_loss {r["val_loss"]:.4f} wall {r["wall_s"]:.0f} s'
                  + (f' ERROR {r["error"]}' if 'error' in r else ''), flush=True)
            res['summary'] = summarize(res['runs'], pairs)
            res['aggregate'] = aggregate(res['summary'])
            res['elapsed_s'] = time.time() - t0
            write_json(out, res)
    res['summary'] = summarize(res['runs'], pairs)
    res['aggregate'] = aggregate(res['summary'])
    res['elapsed_s'] = time.time() - t0
    res['figures'] = [plot(res, out.parent)]
    write_json(out, res)
    for r in res['summary']:
        print(f"{r['norm']:>4} {r['factor']:<10} base {r['baseline_val_loss']:.4f} prores {r['linear_val_loss']:.4f} "
              f"delta {r['delta']:+.4f} ({r['steps_per_layer']:.1f} steps/layer)", flush=True)
    return res


if __name__ == '__main__':
    main()
