"""Preview a ProRes schedule: α(l, t) as a table and a heat map, before spending a run on it.

    python -m prores_algo.preview --layers 24 --t_warmup 24000 --schedule linear --duration 30000 \\
        [--steps 10] [--png alpha.png] [--max_columns 12]
    python -m prores_algo.preview --layers 24 --t_warmup 0.3dur --max_duration 100000ba
    python -m prores_algo.preview --layers 24 --t_warmup auto --max_duration 100000ba

--t_warmup takes what the trainers take: optimizer steps ('24000' or '24000ba'), a fraction of the run
('0.3dur') or 'auto' (min(1000·L, 0.25·run), `timing.auto_warmup_steps`); the last two need
--max_duration, the run length in optimizer steps. The tool prints W / L and W's share of the run, and
flags a W / L below `alpha_schedules.MIN_STEPS_PER_LAYER` with the trainers' own words
(`warmup_advice.warmup_advice`, unmeasured).

Rows are sampled steps (evenly spaced from 0 to --duration, plus W itself), columns are layers; deep
models show a subset of layers (always the first and the last) unless --all_layers is given. The values
are exactly `prores_algo.alpha_schedules.alpha`. Needs no model and no device (matplotlib only for --png,
with the Agg backend: no display needed).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from prores_algo import alpha_schedules
from prores_algo.command_line import CommandParser
from prores_algo.timing import auto_warmup_steps, is_auto, to_steps
from prores_algo.warmup_advice import warmup_advice

__all__ = ['alpha_table', 'format_table', 'sample_steps', 'sample_layers', 'plot_alpha_heatmap', 'main']


def _positive(name: str, value, kind=float):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f'{name} must be a positive number, got {value!r}')
    return kind(value)


def sample_steps(duration: float, n: int, t_warmup: float | None = None) -> list[float]:
    """`n` + 1 evenly spaced steps from 0 to `duration` (integers when they are whole), plus W if inside."""
    duration = _positive('duration', duration)
    n = int(_positive('steps', n, int))
    steps = {duration * k / n for k in range(n + 1)}
    if t_warmup is not None and t_warmup <= duration:
        steps.add(float(t_warmup))
    return [int(s) if float(s).is_integer() else s for s in sorted(steps)]


def sample_layers(num_layers: int, max_columns: int) -> list[int]:
    """0-based layer indices to show: all if they fit, else evenly spread including first and last."""
    num_layers = int(_positive('layers', num_layers, int))
    if max_columns >= num_layers:
        return list(range(num_layers))
    if max_columns < 2:
        return [0, num_layers - 1][: max(1, max_columns)]
    picks = {round(k * (num_layers - 1) / (max_columns - 1)) for k in range(max_columns)}
    return sorted(picks)


def alpha_table(schedule: str, num_layers: int, t_warmup: float, steps: Sequence[float]) -> list[list[float]]:
    """α for every (step, layer): rows follow `steps`, columns are layers 0..L-1."""
    return [alpha_schedules.alphas(schedule, num_layers, t, t_warmup) for t in steps]


def format_table(
    schedule: str,
    num_layers: int,
    t_warmup: float,
    steps: Sequence[float],
    layers: Sequence[int] | None = None,
    digits: int = 4,
) -> str:
    """The table as text: a header of 1-based layer numbers (the paper's l), then one row per step."""
    layers = list(range(num_layers)) if layers is None else list(layers)
    rows = alpha_table(schedule, num_layers, t_warmup, steps)
    width = max(digits + 2, 6)
    step_w = max(len('step'), *(len(f'{s:g}') for s in steps))
    name = alpha_schedules.canonical_name(schedule)
    lines = [
        f'ProRes schedule {name!r}: L={num_layers}, t_warmup W={t_warmup:g} (T=W/L={t_warmup / num_layers:g}); '
        f'alpha(l, t), l = 1..{num_layers}'
        + ('' if len(layers) == num_layers else f' (showing {len(layers)} of {num_layers} layers)')
    ]
    header = (
        'step'.rjust(step_w) + ' ' + ' '.join(f'l={i + 1}'.rjust(width) for i in layers) + ' ' + 'mean'.rjust(width)
    )
    lines.append(header)
    for t, row in zip(steps, rows, strict=True):
        cells = ' '.join(f'{row[i]:.{digits}f}'.rjust(width) for i in layers)
        lines.append(f'{t:g}'.rjust(step_w) + ' ' + cells + ' ' + f'{sum(row) / len(row):.{digits}f}'.rjust(width))
    return '\n'.join(lines)


def plot_alpha_heatmap(
    schedule: str,
    num_layers: int,
    t_warmup: float,
    duration: float,
    path,
    *,
    resolution: int = 400,
    title: str | None = None,
):
    """Write an α(l, t) heat map (x: step 0..duration, y: layer 1..L) to `path` (PNG, PDF, ... by suffix).

    Returns the path. Uses matplotlib's Agg backend (no display); `resolution` time samples.
    """
    import matplotlib

    matplotlib.use('Agg', force=False)
    import matplotlib.pyplot as plt

    duration = _positive('duration', duration)
    num_layers = int(_positive('layers', num_layers, int))
    n = max(2, int(resolution))
    ts = [duration * k / (n - 1) for k in range(n)]
    grid = [[alpha_schedules.alpha(schedule, l, num_layers, t, t_warmup) for t in ts] for l in range(num_layers)]
    fig, ax = plt.subplots(figsize=(8, max(3.0, min(10.0, 0.25 * num_layers + 2))))
    try:
        im = ax.imshow(
            grid,
            aspect='auto',
            origin='lower',
            interpolation='nearest',
            vmin=0.0,
            vmax=1.0,
            cmap='viridis',
            extent=(0, duration, 0.5, num_layers + 0.5),
        )
        if t_warmup <= duration:
            ax.axvline(t_warmup, color='white', linestyle='--', linewidth=1, label=f'W = {t_warmup:g}')
            ax.legend(loc='lower right', fontsize=8)
        ax.set_xlabel('step t')
        ax.set_ylabel('layer l')
        ax.set_title(
            title or f'ProRes α(l, t): {alpha_schedules.canonical_name(schedule)}, L={num_layers}, W={t_warmup:g}'
        )
        fig.colorbar(im, ax=ax, label='α')
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def _parser() -> argparse.ArgumentParser:
    p = CommandParser(prog='prores-preview', description='Print / plot a ProRes α(l, t) schedule.')
    p.add_argument('--layers', type=int, required=True, help='number of transformer layers L')
    p.add_argument(
        '--t_warmup',
        default=None,
        help="W, when every layer reaches α = 1: optimizer steps ('24000', '24000ba'), a fraction of "
        "--max_duration ('0.3dur') or 'auto' (min(1000·L, 0.25·max_duration)); default: 1000·L, the paper's",
    )
    p.add_argument(
        '--max_duration',
        default=None,
        help="the run length in optimizer steps ('2000ba' or 2000): needed by 'Xdur' and 'auto'; gives W's share",
    )
    p.add_argument('--schedule', default='linear', help=f'one of {alpha_schedules.names()} or an alias')
    p.add_argument(
        '--duration', type=float, default=None, help='last step shown (default: --max_duration, else 1.25·W)'
    )
    p.add_argument('--steps', type=int, default=10, help='number of intervals between sampled steps (default 10)')
    p.add_argument('--max_columns', type=int, default=12, help='layers shown in the table (default 12)')
    p.add_argument('--all_layers', action='store_true', help='show every layer in the table')
    p.add_argument('--digits', type=int, default=4, help='decimals in the table (default 4)')
    p.add_argument('--png', default=None, help='also write a heat map to this file')
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        alpha_schedules.canonical_name(args.schedule)
        if args.layers < 1:
            raise ValueError(f'--layers must be >= 1, got {args.layers}')
        run = _run_length(args.max_duration)
        t_warmup = _warmup(args.t_warmup, args.layers, run)
        duration = float(args.duration) if args.duration is not None else run or 1.25 * t_warmup
        if not duration > 0:
            raise ValueError(f'--duration must be > 0, got {args.duration}')
        if args.steps < 1:
            raise ValueError(f'--steps must be >= 1, got {args.steps}')
    except ValueError as e:
        parser.error(str(e))
    steps = sample_steps(duration, args.steps, t_warmup)
    layers = list(range(args.layers)) if args.all_layers else sample_layers(args.layers, args.max_columns)
    print(format_table(args.schedule, args.layers, t_warmup, steps, layers, digits=args.digits))
    share = '' if run is None else f'; W is {100 * t_warmup / run:.3g}% of the run ({run:g} steps)'
    print(f'W / L = {t_warmup / args.layers:g} steps per layer{share}')
    short, advice = warmup_advice(t_warmup, args.layers, None, run if is_auto(args.t_warmup) else None)
    if short:
        print(f'warning: {advice}', file=sys.stderr)
    if t_warmup > duration:
        print(
            f'note: t_warmup ({t_warmup:g}) > duration ({duration:g}): the deepest layers never reach α = 1 '
            'in this window',
            file=sys.stderr,
        )
    if args.png:
        plot_alpha_heatmap(args.schedule, args.layers, t_warmup, duration, args.png)
        print(f'wrote {args.png}')
    return 0


def _run_length(value) -> float | None:
    """--max_duration in optimizer steps, or None."""
    if value is None:
        return None
    try:
        run = to_steps(value, '--max_duration')
    except ValueError:
        run = None
    if run is None or not run > 0 or not float(run).is_integer():
        raise ValueError(
            f"--max_duration {value!r}: give the run length as a whole number of optimizer steps, e.g. '2000ba' or 2000"
        )
    return run


def _warmup(value, num_layers: int, run: float | None) -> float:
    """--t_warmup in optimizer steps (the default, a number, 'Nba', 'Xdur' or 'auto')."""
    if value is None:
        return alpha_schedules.default_warmup(num_layers)
    needs_run = is_auto(value) or value.strip().endswith('dur')
    if needs_run and run is None:
        raise ValueError(f"--t_warmup {value!r} is relative to the run: add --max_duration, e.g. '2000ba'")
    if is_auto(value):
        return float(auto_warmup_steps(num_layers, run))
    fix = "give optimizer steps ('24000' or '24000ba'), a fraction of the run ('0.3dur', with --max_duration) or 'auto'"
    try:
        w = to_steps(value, '--t_warmup', run)
    except ValueError:
        raise ValueError(f'--t_warmup {value!r}: {fix}') from None
    if not w > 0 or (needs_run and w > run):
        raise ValueError(f'--t_warmup {value!r} must be > 0 (a fraction in (0, 1]): {fix}')
    return w


if __name__ == '__main__':
    sys.exit(main())
