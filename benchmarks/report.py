"""Fill the generated tables of benchmarks/RESULTS.md from the benchmarks' JSON.

RESULTS.md is written by a person; each table in it sits between
`<!-- BEGIN generated:NAME -->` and `<!-- END generated:NAME -->`, and this script replaces only what is
between those markers. Prose stays as written: when the numbers change, reread it.

Usage:
  python -m benchmarks.report                     # results/overhead.json + results/quality.json -> RESULTS.md
  python -m benchmarks.report --check             # exit 1 if RESULTS.md's tables are not up to date
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NORMS = {'pre': 'Pre-LN', 'post': 'Post-LN'}


def fmt(x, nd=3, sign=False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return '—'
    return f'{x:+.{nd}f}' if sign else f'{x:.{nd}f}'


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
    return '\n'.join(lines)


def delta(p: dict) -> str:
    """'Δ ± SE' over the pairs that trained; stalls are reported in their own column."""
    if p['delta_mean'] is None:
        return '—'
    se = f' ± {p["delta_se"]:.3f}' if p['delta_se'] is not None else ''
    return f'{p["delta_mean"]:+.3f}{se}'


def won(p: dict) -> str:
    return f'{p["wins"]}/{p["n"]}' if p['n'] else '—'


def stalls(p: dict) -> str:
    return f'{p["stalled_prores"]} / {p["stalled_baseline"]}'


def ci(p: dict) -> str:
    return f'[{p["ci95"][0]:+.3f}, {p["ci95"][1]:+.3f}]' if p.get('ci95') else '—'


def sign_p(p: dict) -> str:
    return f'{p["sign_test_p"]:.2f}' if p.get('sign_test_p') is not None else '—'


def verdict(p: dict, planned: int) -> str:
    """The verdict in words; a point still short of its planned seeds says so."""
    v = p['verdict'] if p['n'] else 'not run yet'
    if p['n'] and p['n_pairs'] < planned:
        v += f' ({p["n_pairs"]} of {planned} seeds so far)'
    return v


def ratio(p: dict) -> str:
    """The branch-to-stream ratio at initialisation: median over the point's seeds."""
    rs = sorted(r for r in p.get('init_ratio') or [] if r is not None)
    return f'{rs[len(rs) // 2]:.3f}' if rs else '—'


# --------------------------------------------------------------------------------------------- tables
def quality_answer(q: dict) -> str:
    """One row per measured factor point: initialisation, placement, W / L, and the paired statistics."""
    rows, planned = [], len(q['config']['seeds'])
    for init, by_norm in q['summary']['factor'].items():
        for norm, label in NORMS.items():
            for spl, p in sorted(by_norm[norm].items(), key=lambda kv: float(kv[0])):
                if p['n_pairs']:
                    rows.append(
                        [
                            f'`{init}`',
                            label,
                            spl,
                            ratio(p),
                            delta(p),
                            ci(p),
                            won(p),
                            sign_p(p),
                            stalls(p),
                            f'**{verdict(p, planned)}**',
                        ]
                    )
    return table(
        [
            'init',
            'norm',
            'W / L',
            'branch / stream at init',
            'Δ val loss (mean ± SE)',
            'bootstrap 95% CI',
            'seeds ahead',
            'sign test p',
            'stalled ProRes / baseline',
            'verdict',
        ],
        rows,
    )


def quality_spl_detail(q: dict) -> str:
    """Every seed of every factor point: the raw numbers behind the answer table."""
    c, rows = q['config'], []
    for init, by_norm in q['summary']['factor'].items():
        for norm, label in NORMS.items():
            for spl, p in sorted(by_norm[norm].items(), key=lambda kv: float(kv[0])):
                if not p['n_pairs']:
                    continue
                steps = int(round(float(spl) * c['layers'] / c['w_fraction']))
                rows.append(
                    [
                        f'`{init}`',
                        label,
                        spl,
                        str(steps),
                        fmt(p['baseline_mean']),
                        fmt(p['prores_mean']),
                        ', '.join(f'{d:+.3f}' for d in p['per_seed']) or '—',
                        f'{p["spikes_prores"]} / {p["spikes_baseline"]}',
                        str(p['diverged']),
                    ]
                )
    return table(
        [
            'init',
            'norm',
            'W / L',
            'steps',
            'baseline val loss',
            'ProRes val loss',
            'Δ per seed (seeds that trained)',
            'loss spikes ProRes / baseline',
            'diverged pairs',
        ],
        rows,
    )


def quality_depth(q: dict) -> str:
    """One row per depth setting (placement, initialisation, T = W / L) and number of layers."""
    rows, planned = [], len(q['config']['depth_seeds'])
    for entry in q['summary']['depth'].values():
        st = entry['setting']
        for d, p in entry['layers'].items():
            if p['n_pairs']:
                rows.append(
                    [
                        f'{NORMS[st["norm"]]}, `{st["init"]}`, T = {st["spl"]:g}',
                        d,
                        fmt(p['baseline_mean']),
                        fmt(p['prores_mean']),
                        delta(p),
                        ci(p),
                        won(p),
                        f'**{verdict(p, planned)}**',
                        stalls(p),
                    ]
                )
    return table(
        [
            'setting',
            'layers',
            'baseline val loss',
            'ProRes val loss',
            'Δ (mean ± SE)',
            'bootstrap 95% CI',
            'seeds ProRes ahead',
            'verdict',
            'stalled ProRes / baseline',
        ],
        rows,
    )


def quality_ablation(q: dict) -> str:
    rows = []
    for v, p in q['summary']['ablation'].items():
        if p['n_pairs']:
            rows.append([f'`{v}`', delta(p), ', '.join(f'{d:+.3f}' for d in p['per_seed']) or '—', won(p), stalls(p)])
    return table(
        ['schedule', 'Δ vs baseline (mean ± SE)', 'Δ per seed', 'seeds ahead', 'stalled ProRes / baseline'], rows
    )


def quality_status(q: dict) -> str:
    planned, done = len(q['planned']), len(q['runs'])
    hours = (float(q.get('elapsed_s') or 0) + float(q.get('elapsed_s_previous') or 0)) / 3600
    c = q['config']
    todo = [k for k in q['planned'] if k not in q['runs']]
    running = f' Next to run: `{todo[0]}` and after it {len(todo) - 1} more.' if todo else ''
    cos = sorted(r['position_cosine'][-1] for r in q['runs'].values() if r.get('position_cosine') and not r['stalled'])
    cosine = (
        f' Trained models end at a median position cosine of {cos[len(cos) // 2]:.2f} at their last layer '
        f'({cos[0]:.2f}–{cos[-1]:.2f} over {len(cos)} runs; 1 = collapse).'
        if cos
        else ''
    )
    return (
        f'Status: **{q["status"]}**, {done} of {planned} runs measured ({hours:.1f} h of wall time with '
        f'{q["jobs"]} jobs on {q["machine"]["cpu_count"]} cores, torch {q["machine"]["torch"]}).{running} Unigram '
        f'level of the evaluated validation bytes: {c["unigram_level"]:.3f} nats; a run within '
        f'{c["stall_margin"]} of it counts as stalled.{cosine}'
    )


def overhead_table(r: dict) -> str:
    rows = []
    for name, m in r['models'].items():
        tm, s = m['timing'], m['summary']
        w, a = tm['prores_warmup'], tm['prores_done']
        comp = m.get('compile') or {}
        rows.append(
            [
                f'{name} ({m["params"] / 1e6:.2f}M)',
                f'{tm["baseline"]["median_step_cpu_s"] * 1e3:.0f}',
                f'**{w["ratio_median"]:.3f}** [{w["ratio_q25"]:.3f}, {w["ratio_q75"]:.3f}]',
                f'**{a["ratio_median"]:.3f}** [{a["ratio_q25"]:.3f}, {a["ratio_q75"]:.3f}]',
                f'{s["peak_memory_ratio"]:.4f} / {s["peak_memory_ratio_after"]:.4f}',
                f'{comp.get("recompiles_from_alpha_updates", "—")} / {comp.get("recompiles_at_removal", "—")}',
            ]
        )
    return table(
        [
            'model',
            'baseline step, CPU ms',
            'step-time ratio during warmup, median [IQR]',
            'after warmup, median [IQR]',
            'peak memory ratio during / after',
            'recompiles from α updates / at removal',
        ],
        rows,
    )


def overhead_mechanisms(r: dict) -> str:
    m = r.get('mechanisms')
    if not m:
        return '(not measured in this overhead.json: rerun `python -m benchmarks.overhead`)'
    b, t, sh = m['bytes'], m['timing'], m['bytes_shape']
    rows = []
    for mech, key, label in (
        ('hook', 'prores_hook', "output hook (`mechanism='hook'`)"),
        ('gemm', 'prores_gemm', 'α in the GEMMs (default)'),
    ):
        rows.append(
            [
                label,
                f'{b["float32"][f"{mech}_extra_bytes"] / 1e9:.6g} GB',
                f'{b["bfloat16"][f"{mech}_extra_bytes"] / 1e9:.6g} GB',
                f'{t[key]["ratio_median"]:.3f} [{t[key]["ratio_q25"]:.3f}, {t[key]["ratio_q75"]:.3f}]',
            ]
        )
    head = f'extra bytes per training step, {sh["layers"]} layers × {sh["d_model"]}, {sh["batch"]}×{sh["seq"]} tokens'
    td = m['timing_dims']
    return table(
        [
            'mechanism',
            f'{head}, fp32',
            'same, bf16',
            f'CPU step-time ratio, eager, {td["layers"]} layers × {td["d_model"]}, {td["batch"]}×{td["seq"]} tokens',
        ],
        rows,
    )


def sharded_memory(r: dict) -> str:
    c = r['config']
    rows = []
    for stack, label in (('fsdp2', 'FSDP2 (`fully_shard` per layer)'), ('zero3', 'DeepSpeed ZeRO-3')):
        s = r['stacks'][stack]
        off = max(rank['off']['peak_above_start_bytes'] for rank in s['per_rank'])
        ratio = s['max_ratio_vs_off']
        rows.append(
            [
                label,
                f'{off / 1e6:.2f} MB',
                f'**{ratio["hook"]:.4f}**',
                f'**{ratio["gemm"]:.4f}**',
                f'{ratio["weight_copy"]:.4f}',
            ]
        )
    return table(
        [
            f'2 CPU processes, {c["layers"]} layers × {c["d_model"]}, {c["batch"]}×{c["seq"]} tokens per rank',
            'step peak above start, ProRes off',
            'ratio: output hook',
            'ratio: α in the GEMMs (default)',
            'ratio: control, scaled weight copy',
        ],
        rows,
    )


def gpu_mechanisms(r: dict) -> str:
    """Step-time ratios of the two mechanisms on the GPU, per model and phase, with the spread over repeats."""
    rows = []
    for name, g in r.items():
        for phase in ('eager', 'compiled'):
            ph = g.get(phase)
            if not ph or 'step_time_ratio' not in ph:
                continue
            spread = ph['step_time_ratio_per_repeat']

            def cell(v, ph=ph, spread=spread):
                reps = ', '.join(f'{x:.3f}' for x in spread[v])
                return f'**{ph["step_time_ratio"][v]:.4f}** ({reps})'

            graphs = ph.get('graphs_compiled_during_timed_steps')
            rows.append(
                [
                    name,
                    phase,
                    f'{ph["off"]["median_step_s"] * 1e3:.1f}',
                    cell('gemm'),
                    cell('hook'),
                    f'{ph["peak_mem_ratio"]["gemm"]:.4f}',
                    '—' if graphs is None else str(graphs),
                ]
            )
    return table(
        [
            'model (H200, bf16)',
            'mode',
            'ProRes off, ms/step',
            'α in the GEMMs / off: median (per repeat)',
            'output hook / off: median (per repeat)',
            'peak memory, GEMM / off',
            'recompiles from α updates',
        ],
        rows,
    )


def gpu_hook_check(r: dict) -> str:
    """ProRes on (output hook on every branch) against off, per file: eager and compiled step-time ratios."""
    rows = []
    for name, g in r.items():
        c = g['config']
        rows.append(
            [
                f'`{name}`',
                f'{c["seq_len"]} × {c["batch"]}',
                c['compile'],
                str(g['model']['prores_hooks']),
                f'{g["eager"]["step_time_ratio_on_off"]:.4f}',
                f'{g["compiled"]["step_time_ratio_on_off"]:.4f}',
                str(g['compiled']['on']['timed_steps']),
                f'{g["eager"]["peak_mem_ratio_on_off"]:.4f}',
            ]
        )
    return table(
        [
            'file (H200, bf16, 369M reference decoder)',
            'seq × batch',
            'compiled',
            'hooked branches',
            'step-time ratio on / off, eager',
            'on / off, compiled',
            'compiled steps timed',
            'peak memory on / off, eager',
        ],
        rows,
    )


def gpu_quality(r: dict) -> str:
    c, rows = r['config'], []
    for spl, s in r['summary'].items():
        rows.append(
            [
                f'{c["layers"]} × {c["d_model"]}, seq {c["seq"]}, batch {c["batch"]}',
                spl,
                f'{r["runs"][next(iter(r["runs"]))]["steps"]}',
                ', '.join(f'{b:.3f}' for b in s['baseline']),
                ', '.join(f'{d:+.3f}' for d in s['per_seed']),
                delta(s),
                ci(s),
                f'{s["wins"]}/{s["n"]}',
                f'**{s["verdict"]}**',
            ]
        )
    return table(
        [
            'model',
            'W / L',
            'steps',
            'baseline val loss per seed',
            'Δ per seed',
            'Δ (mean ± SE)',
            'bootstrap 95% CI',
            'seeds ahead',
            'verdict',
        ],
        rows,
    )


def arch_bytes(r: dict) -> str:
    sh = r['shape']
    rows = [
        [
            name,
            f'{a["branches_in_gemm"]} / {a["branches"]}',
            f'{a["default_extra_bytes"]:+,d}',
            f'{a["hook_extra_bytes"]:+,d}',
            f'**{a["ratio"]:+.4f}**',
        ]
        for name, a in r['architectures'].items()
    ]
    return table(
        [
            f'transformers {r["transformers"]}, {sh["layers"]} layers × {sh["hidden"]}, {sh["batch"]}×{sh["seq"]} tokens, fp32',
            'branches with α in a GEMM',
            'extra bytes per step: default',
            'extra bytes per step: hook',
            'default / hook',
        ],
        rows,
    )


GENERATORS = {
    'quality-status': ('quality', quality_status),
    'quality-answer': ('quality', quality_answer),
    'quality-spl': ('quality', quality_spl_detail),
    'quality-depth': ('quality', quality_depth),
    'quality-ablation': ('quality', quality_ablation),
    'overhead': ('overhead', overhead_table),
    'overhead-mechanisms': ('overhead', overhead_mechanisms),
    'sharded-memory': ('sharded_memory', sharded_memory),
    'gpu-mechanisms': ('gpu_mechanisms', gpu_mechanisms),
    'gpu-hook-check': ('gpu_hook_check', gpu_hook_check),
    'gpu-quality': ('gpu_quality', gpu_quality),
    'arch-bytes': ('arch_bytes', arch_bytes),
}
# the GPU measurements committed from the occasional GPU machine (benchmarks/gpu_session.sh)
GPU_MECHANISM_FILES = {
    '369M reference decoder (24 × 1024, seq 1024, batch 16)': 'gpu_check_h200_mechanisms_ref.json',
    "transformers' GPT-2 (24 × 1024, Conv1D + dropout branch ends)": 'gpu_check_h200_mechanisms_gpt2.json',
}

# the output-hook-only checks of the same decoder, one compile set-up each (benchmarks/gpu_check.sh)
GPU_HOOK_CHECK_FILES = (
    'gpu_check_h200_blocks_seq1024.json',
    'gpu_check_h200_blocks_seq2048.json',
    'gpu_check_h200_model_seq1024.json',
)


def render(text: str, sources: dict[str, dict]) -> str:
    """Replace every generated block of `text` whose source is available."""

    def fill(m):
        name = m.group(1)
        if name not in GENERATORS:
            raise ValueError(
                f'RESULTS.md has a generated block {name!r} that report.py does not know: one of {sorted(GENERATORS)}'
            )
        source, fn = GENERATORS[name]
        if sources.get(source) is None:
            return m.group(0)
        return f'<!-- BEGIN generated:{name} -->\n{fn(sources[source])}\n<!-- END generated:{name} -->'

    return re.sub(r'<!-- BEGIN generated:([\w-]+) -->.*?<!-- END generated:\1 -->', fill, text, flags=re.S)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--overhead', default=str(HERE / 'results' / 'overhead.json'))
    p.add_argument('--quality', default=str(HERE / 'results' / 'quality.json'))
    p.add_argument('--sharded-memory', default=str(HERE / 'results' / 'sharded_memory.json'))
    p.add_argument('--gpu-quality', default=str(HERE / 'results' / 'gpu_quality_h200_wl100.json'))
    p.add_argument('--out', default=str(HERE / 'RESULTS.md'), help='the Markdown file whose tables are filled in')
    p.add_argument('--check', action='store_true', help='exit 1 if the tables are not up to date')
    args = p.parse_args(argv)
    named = (
        ('overhead', args.overhead),
        ('quality', args.quality),
        ('sharded_memory', args.sharded_memory),
        ('gpu_quality', args.gpu_quality),
        ('arch_bytes', HERE / 'results' / 'arch_bytes.json'),
    )
    sources = {k: json.loads(Path(v).read_text()) if Path(v).is_file() else None for k, v in named}
    gpu = {name: HERE / 'results' / f for name, f in GPU_MECHANISM_FILES.items()}
    sources['gpu_mechanisms'] = (
        {name: json.loads(path.read_text()) for name, path in gpu.items()}
        if all(p.is_file() for p in gpu.values())
        else None
    )
    hook_files = [HERE / 'results' / f for f in GPU_HOOK_CHECK_FILES]
    sources['gpu_hook_check'] = (
        {f'results/{f.name}': json.loads(f.read_text()) for f in hook_files}
        if all(f.is_file() for f in hook_files)
        else None
    )
    out = Path(args.out)
    old = out.read_text()
    new = render(old, sources)
    if args.check:
        if new != old:
            print(f'{out} is out of date: run python -m benchmarks.report', file=sys.stderr)
            sys.exit(1)
        return new
    out.write_text(new)
    print(f'wrote {out}')
    return new


if __name__ == '__main__':
    main()
