"""`prores-compare`: will ProRes help *this* run? Paired runs of the user's own config, with statistics.

    prores-compare CONFIG.yaml --seeds 6 [--jobs 2] [--out DIR] [--smoke] [key=value ...]

For every seed, the config runs twice: as written (ProRes on, from its `algorithms.prores`) and with
`algorithms.prores` removed (the baseline). Both runs of a seed share the seed, so the same
initialisation and the same data order: their difference is ProRes' alone. The data set is built once,
before the runs, with the config's own seed, and every run reads it. Seed to seed that
difference can spread as widely as the effect, so the command reports per seed the final validation
loss of both and Δ = ProRes − baseline, then the mean ± standard error, the seeds ahead, a sign test, a
bootstrap 95% interval (`paired_stats`) and one sentence: ahead, behind, or inside the seed noise.

Runs go `--jobs` at a time, each in a fresh process (`run_pool`, shared with `benchmarks/quality.py`),
and every finished run is written to DIR/compare.json at once: run the same command again and it keeps
the finished runs whose settings are unchanged (resumable run by run). DIR/compare.png shows both loss
curves per seed and Δ per seed. `--smoke` shortens the runs (seconds each) to check the set-up.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from prores_algo.command_line import CommandParser
from prores_algo.paired_stats import summarize_deltas

__all__ = ['main', 'run_pool', 'pair_by_seed', 'compare', 'SENTENCES']

SMOKE_OVERRIDES = ['max_duration=24ba', 'eval_interval=0ba', 'eval_first=false', 'eval_subset_num_batches=2']
SENTENCES = {
    'ahead': 'ProRes is ahead on this config: the 95% interval of the mean Δ lies below 0.',
    'behind': 'ProRes is behind on this config: the 95% interval of the mean Δ lies above 0.',
    'inside the seed noise': (
        'Inside the seed noise: with these seeds the difference cannot be told from seed-to-seed variation '
        '(more seeds narrow the interval).'
    ),
    'too few seeds': 'Too few seeds for a verdict: run at least 4 (--seeds 6 is a good start).',
}


# ----------------------------------------------------------------------------------- shared machinery
def run_pool(fn: Callable, tasks: Iterable[tuple], jobs: int, on_result: Callable[[Any], None]) -> None:
    """`fn(*task)` for every task, `jobs` at a time, each in a fresh spawned process (Composer and
    streaming keep per-process state; a worker reused for dozens of runs once hit the open-file limit);
    `on_result` sees each result as soon as it is there, in the order they finish."""
    with ProcessPoolExecutor(
        max_workers=jobs, mp_context=multiprocessing.get_context('spawn'), max_tasks_per_child=1
    ) as pool:
        futures = [pool.submit(fn, *task) for task in tasks]
        for f in as_completed(futures):
            on_result(f.result())


def pair_by_seed(baselines: dict[int, Any], others: dict[int, Any]) -> list[tuple[Any, Any]]:
    """[(baseline, other)] for every seed both have, in seed order."""
    return [(baselines[s], others[s]) for s in sorted(baselines) if s in others]


# ---------------------------------------------------------------------------------------- one run
def _train(config: str, overrides: list[str], seed: int, variant: str, log_dir: str) -> dict:
    """One member of a pair, in its own process: the config with `seed`, ProRes dropped for the baseline.
    Its console output goes to LOG_DIR/<variant>-s<seed>.log (this process is the run's alone)."""
    import os

    log = open(Path(log_dir) / f'{variant}-s{seed}.log', 'w')  # noqa: SIM115  (held for the process' life)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    import torch
    from composer.loggers import InMemoryLogger

    from prores_algo.training.composer_train import run
    from prores_algo.training.config import load_config

    torch.set_num_threads(1)  # `--jobs` processes on as many cores
    cfg = load_config(config, [*overrides, f'seed={seed}'])
    # the shards the parent built with the config's own seed: a pair's seed sets the initialisation and the
    # data order, not which documents are held out
    update: dict[str, Any] = {'data': cfg.data.model_copy(update={'source': None})}
    if variant == 'baseline':
        update['algorithms'] = {k: v for k, v in cfg.algorithms.items() if k != 'prores'}
    cfg = cfg.model_copy(update=update)
    mem = InMemoryLogger()
    t0 = time.time()
    try:
        res = run(cfg, extra_loggers=(mem,))
    except Exception as e:  # one failed run must not end the comparison
        return {'variant': variant, 'seed': seed, 'error': f'{type(e).__name__}: {e}'}
    curve = [(int(t.batch), float(v)) for t, v in mem.data.get('loss/train/total', [])]
    return {
        'variant': variant,
        'seed': seed,
        'val_loss': res['val_loss'],
        'wall_s': time.time() - t0,
        'prores_logged': any(k.startswith('prores/alpha') for k in mem.data),
        'curve': curve[:: max(1, len(curve) // 400)],
    }


# ------------------------------------------------------------------------------------------ driver
def _settings(config: Path, overrides: list[str]) -> dict:
    """What a finished run must still match to be kept: the config's text and the overrides."""
    return {'config_sha256': hashlib.sha256(config.read_bytes()).hexdigest(), 'overrides': list(overrides)}


def _check(config: Path, overrides: list[str]) -> None:
    """Fail fast, in this process, on anything the runs would fail on: the config, and ProRes in it."""
    from prores_algo.training.config import ConfigError, load_config

    cfg = load_config(config, overrides)
    if 'prores' not in cfg.algorithms:
        raise ConfigError(
            f'{config}: no algorithms.prores to compare against its baseline: add `algorithms: {{prores: '
            '{t_warmup: ...}}` (or prores=... overrides) to the config'
        )
    from prores_algo.training.composer_train import _prepare_data

    try:
        _prepare_data(cfg)  # built once here, not by every run at once
    except (ValueError, FileNotFoundError) as e:  # the data settings cannot give a data set: the user's to fix
        raise ConfigError(f'data: {e}') from None


def compare(
    config: str, seeds: int = 6, jobs: int = 2, out: str | None = None, overrides: list[str] | None = None
) -> dict:
    """Run (or resume) the paired comparison; returns the results record written to OUT/compare.json."""
    config_path = Path(config)
    overrides = list(overrides or [])
    _check(config_path, overrides)
    out_dir = Path(out or Path('runs') / f'compare-{config_path.stem}')
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / 'compare.json'
    settings = _settings(config_path, overrides)
    record = {
        'command': 'prores-compare',
        'config': str(config_path),
        'settings': settings,
        'seeds': seeds,
        'out_dir': str(out_dir),
    }
    old = json.loads(path.read_text()) if path.is_file() else {}
    keep = old.get('settings') == settings
    record['runs'] = {k: r for k, r in old.get('runs', {}).items() if keep and 'error' not in r}
    (out_dir / 'logs').mkdir(exist_ok=True)
    todo = [
        (str(config_path), overrides, s, v, str(out_dir / 'logs'))
        for s in range(seeds)
        for v in ('baseline', 'prores')
        if f'{v}-s{s}' not in record['runs']
    ]
    print(
        f'{2 * seeds} runs: {2 * seeds - len(todo)} kept from {path}, {len(todo)} to run, {jobs} at a time', flush=True
    )

    def on_result(r):
        record['runs'][f'{r["variant"]}-s{r["seed"]}'] = r
        record['summary'] = summarize(record['runs'])
        _write(path, record)
        msg = r.get('error') or f'val loss {r["val_loss"]:.4f} in {r["wall_s"]:.0f} s'
        msg += f' (log: {out_dir / "logs" / (r["variant"] + "-s" + str(r["seed"]) + ".log")})'
        print(f'  seed {r["seed"]} {r["variant"]}: {msg}', flush=True)

    run_pool(_train, todo, jobs, on_result)
    record['summary'] = summarize(record['runs'])
    record['figure'] = plot(record, out_dir / 'compare.png')
    _write(path, record)
    return record


def summarize(runs: dict) -> dict:
    done = [r for r in runs.values() if 'error' not in r]
    by_variant = {v: {r['seed']: r for r in done if r['variant'] == v} for v in ('baseline', 'prores')}
    pairs = pair_by_seed(by_variant['baseline'], by_variant['prores'])
    deltas = [p['val_loss'] - b['val_loss'] for b, p in pairs]
    return {
        **summarize_deltas(deltas),
        'per_seed': [
            {'seed': b['seed'], 'baseline': b['val_loss'], 'prores': p['val_loss'], 'delta': d}
            for (b, p), d in zip(pairs, deltas, strict=True)
        ],
        'failed_runs': sorted(k for k, r in runs.items() if 'error' in r),
    }


def _write(path: Path, record: dict) -> None:
    tmp = path.with_suffix('.tmp')
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)  # atomic: a killed comparison never leaves half a file


def plot(record: dict, path: Path) -> str:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.get_cmap('tab10')
    for _key, r in sorted(record['runs'].items()):
        if 'curve' in r and r['curve']:
            x, y = zip(*r['curve'], strict=True)
            style = '--' if r['variant'] == 'baseline' else '-'
            ax.plot(x, y, style, color=colors(r['seed'] % 10), lw=1, label=f'seed {r["seed"]} {r["variant"]}')
    ax.set_xlabel('optimizer step')
    ax.set_ylabel('training loss (dashed: baseline, solid: ProRes)')
    ax.grid(alpha=0.3)
    s = record['summary']
    seeds = [p['seed'] for p in s['per_seed']]
    ax2.scatter(seeds, [p['delta'] for p in s['per_seed']], color='tab:red')
    if s['delta_mean'] is not None:
        ax2.axhline(s['delta_mean'], color='tab:red', lw=1, label='mean Δ')
    if s['ci95']:
        ax2.axhspan(*s['ci95'], color='tab:red', alpha=0.15, label='bootstrap 95% CI')
    ax2.axhline(0, color='gray', lw=1)
    ax2.set_xlabel('seed')
    ax2.set_ylabel('Δ final val loss, ProRes − baseline')
    ax2.set_title(s['verdict'])
    ax2.grid(alpha=0.3)
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def print_report(record: dict) -> None:
    s = record['summary']
    print(f'\n{"seed":>4}  {"baseline":>9}  {"ProRes":>9}  {"Δ":>8}')
    for p in s['per_seed']:
        print(f'{p["seed"]:>4}  {p["baseline"]:9.4f}  {p["prores"]:9.4f}  {p["delta"]:+8.4f}')
    if s['delta_mean'] is not None:
        se = f' ± {s["delta_se"]:.4f}' if s['delta_se'] is not None else ''
        ci = f', 95% CI [{s["ci95"][0]:+.4f}, {s["ci95"][1]:+.4f}]' if s['ci95'] else ''
        p = f', sign test p = {s["sign_test_p"]:.2f}' if s['sign_test_p'] is not None else ''
        print(f'mean Δ {s["delta_mean"]:+.4f}{se}{ci}; ProRes ahead in {s["wins"]} of {s["n"]} seeds{p}')
    if s['failed_runs']:
        print(f'failed runs (see compare.json): {", ".join(s["failed_runs"])}')
    print(SENTENCES[s['verdict']])


def parse_args(argv):
    p = CommandParser(
        prog='prores-compare',
        description='ProRes against its baseline on your own config: paired runs by seed, with statistics.',
        epilog='Overrides (key=value) apply to both runs of every pair, e.g. max_duration=2000ba.',
    )
    p.add_argument('config', help='a prores-train YAML with algorithms.prores')
    p.add_argument('overrides', nargs='*', help='key=value settings over the YAML')
    p.add_argument('--seeds', type=int, default=6, help='pairs to run, seeds 0..N-1 (default 6)')
    p.add_argument('--jobs', type=int, default=2, help='runs at a time, one process and one thread each')
    p.add_argument('--out', default=None, help='results folder (default runs/compare-<config name>)')
    p.add_argument('--smoke', action='store_true', help=f'tiny runs to check the set-up ({" ".join(SMOKE_OVERRIDES)})')
    args = p.parse_intermixed_args(argv)  # key=value overrides may come before or after the flags
    if args.seeds < 1 or args.jobs < 1:
        p.error('--seeds and --jobs must be at least 1')
    return args


def main(argv: list[str] | None = None) -> int:
    from prores_algo.training.config import ConfigError, report

    args = parse_args(sys.argv[1:] if argv is None else argv)
    overrides = (SMOKE_OVERRIDES if args.smoke else []) + list(args.overrides)
    try:
        record = compare(args.config, args.seeds, args.jobs, args.out, overrides)
    except ConfigError as e:
        return report(e)
    print_report(record)
    print(f'wrote {record["out_dir"]}/compare.json and compare.png')
    return 0


if __name__ == '__main__':
    sys.exit(main())
