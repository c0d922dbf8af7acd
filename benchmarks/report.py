"""Render benchmarks/RESULTS.md from benchmarks/results/{overhead,quality}.json.

Only measured numbers go into the tables; the paper's numbers (DESIGN.md section 2) appear in columns
labelled "paper". The prose around the tables is conditioned on the measured outcome.

  python benchmarks/report.py [--overhead PATH] [--quality PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'benchmarks' / 'results'

# The paper's C4 test perplexities (DESIGN.md section 2): norm -> size -> (without, with ProRes)
PAPER_MAIN = {
    'pre': {'130M': (14.67, 14.30), '350M': (12.36, 11.74), '1.3B': (10.32, 9.86)},
    'post': {'130M': (14.84, 14.72), '350M': (12.74, 11.92), '1.3B': (11.62, 10.53)},
}
# schedule ablation, 350M / 24 layers, (Pre-LN, Post-LN) perplexity; None = diverged
PAPER_ABLATION = {
    'baseline': (15.21, 16.83), 'linear': (14.41, 15.15), 'linear (W=24k)': (14.43, 15.12),
    'linear_square': (14.46, 14.84), 'equal': (15.06, None), 'reverse': (15.57, None), 'stagewise_0': (19.51, None),
    'fix_sqrt_l': (14.98, 16.21),
}
NORM_NAME = {'pre': 'Pre-LN', 'post': 'Post-LN'}


# ------------------------------------------------------------------------------------------ helpers
def fmt(x, nd=3):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return 'n/a'
    return f'{x:.{nd}f}'


def pm(s, nd=3):
    if not s or s.get('mean') is None:
        return 'n/a'
    if s.get('n', 0) > 1:
        return f"{s['mean']:.{nd}f} ± {s['std']:.{nd}f}"
    return f"{s['mean']:.{nd}f}"


def signed(s, nd=3):
    if not s or s.get('mean') is None:
        return 'n/a'
    txt = f"{s['mean']:+.{nd}f}"
    if s.get('n', 0) > 1:
        txt += f" ± {s['std']:.{nd}f}"
    return txt


def wins(delta: dict | None) -> str:
    """'k/n': in k of the n paired seeds ProRes had the lower validation loss ('—' without a comparison)."""
    return f"{delta['wins']}/{delta['n']}" if delta and delta.get('n') else '—'


def vs_baseline(row: dict) -> list[str]:
    """The paired Δ and wins cells of a variant row; the baseline row compares with nothing."""
    return [signed(row['delta']), wins(row['delta'])] if 'delta' in row else ['—', '—']


def pct(a, b):
    """Relative change from a to b in percent."""
    if a is None or b is None:
        return None
    return 100.0 * (b - a) / a


def verdict(delta: dict) -> str:
    """'better' / 'worse' / 'unclear' for ProRes − baseline validation-loss differences over paired seeds.

    Better (worse) when every seed agrees on the sign and, with >= 3 seeds, the mean is more than two
    standard errors from 0; with 1-2 seeds, when every seed agrees and |mean| > 0.01 nats.
    """
    if not delta or not delta.get('n'):
        return 'missing'
    n, mean, std = delta['n'], delta['mean'], delta['std'] or 0.0
    same_sign = all(x < 0 for x in delta['per_seed']) or all(x > 0 for x in delta['per_seed'])
    if n >= 3:
        clear = same_sign and abs(mean) > 2 * std / math.sqrt(n)
    else:
        clear = same_sign and abs(mean) > 0.01
    if not clear:
        return 'unclear'
    return 'better' if mean < 0 else 'worse'


WORD = {'better': 'ProRes is better', 'worse': 'ProRes is worse', 'unclear': 'no clear difference',
        'missing': 'not measured'}


def table(header: list[str], rows: list[list[str]]) -> str:
    out = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
    out += ['| ' + ' | '.join(str(c) for c in r) + ' |' for r in rows]
    return '\n'.join(out)


def machine_lines(m: dict, label: str) -> list[str]:
    load = m.get('loadavg_at_start')
    load_end = m.get('loadavg_at_end')
    s = (f"- {label}: {m.get('platform')}, processor `{m.get('processor')}`, os.cpu_count() = {m.get('cpu_count')}, "
         f"Python {m.get('python')}, torch {m.get('torch')}, torch threads {m.get('torch_threads')}")
    if load:
        s += f"; load average at start {load[0]:.1f}" + (f", at end {load_end[0]:.1f}" if load_end else '')
        s += ' (the machine was shared with other jobs)'
    return [s]


def _q_elapsed(q: dict) -> float:
    """Wall time of the quality benchmark, summed over an interrupted run and its --resume continuations."""
    return float(q.get('elapsed_s') or 0) + float(q.get('elapsed_s_previous') or 0)


def _num_params(spec: dict) -> int:
    sys.path.insert(0, str(ROOT / 'benchmarks'))
    sys.path.insert(0, str(ROOT))
    from quality import num_params
    return num_params(spec)


def curve_gaps(q: dict, norm: str, exp: str = 'main', variant: str = 'linear') -> dict | None:
    """Mean over seeds of the training-loss gap (ProRes − baseline, moving average) at W/2, W and the end."""
    c, runs = q['config'], q['runs']
    keys = [k for k in q['experiments'].get(exp, []) if k in runs and runs[k]['spec']['norm'] == norm
            and runs[k]['spec']['layers'] == c['layers']]
    base = {runs[k]['spec']['seed']: runs[k]['curve'] for k in keys if runs[k]['spec']['variant'] == 'baseline'}
    pro = {runs[k]['spec']['seed']: runs[k]['curve'] for k in keys if runs[k]['spec']['variant'] == variant}
    seeds = [sd for sd in pro if sd in base and base[sd] and pro[sd]]
    if not seeds:
        return None
    steps = c['steps']
    w = max(3, steps // 20)
    W = int(float(c['prores_t_warmup'].removesuffix('dur')) * steps)

    def avg(curve, t):
        seg = [v for v in curve[max(0, t - w + 1):t + 1] if math.isfinite(v)]
        return sum(seg) / len(seg) if seg else float('nan')

    out = {'window': w, 'seeds': len(seeds)}
    for name, t in (('half_W', max(0, W // 2)), ('W', min(W, steps - 1)), ('end', steps - 1)):
        out[name] = sum(avg(pro[sd], t) - avg(base[sd], t) for sd in seeds) / len(seeds)
        out[name + '_step'] = t
    return out


# ----------------------------------------------------------------------------------------- overhead
def overhead_section(r: dict) -> list[str]:
    c = r['config']
    t = r['targets']
    L = [f"## 1. Overhead (`{r['command']}`, mode {r['mode']}, {r['wall_s']:.0f} s)", '']
    L.append(f"Models: {c['layers']} layers, d_model {c['d_model']}, {c['heads']} heads, sequence {c['seq']}, batch "
             f"{c['batch']}, fp32 on CPU; a full training step is zero_grad + forward + cross-entropy + backward + "
             f"AdamW step. `baseline` has no ProRes, `during warmup` calls `controller.set_step(t)` every step "
             f"(inside the timed region) with every α strictly between 0 and 1 and changing each step, `after "
             f"warmup` had ProRes applied and then removed at t = W. All three run the same model instance and "
             f"optimizer: ProRes is attached before and removed after each of its turns, untimed (two separate "
             f"but identical deep copies of a model differed by about ±2% in step time here, from where their "
             f"tensors happened to sit in memory). {c['rounds']} interleaved rounds (shuffled order, "
             f"{c['steps_per_round']} step(s) per variant per round, {c['warmup_steps']} untimed warm-up steps "
             f"each); the ratio is formed within each round and the median over rounds is reported.")
    L.append('')
    rows = []
    for name, m in r['models'].items():
        tm, s = m['timing'], m['summary']
        w, a = tm['prores_warmup'], tm['prores_done']
        comp = m.get('compile')
        rows.append([
            f"{name} ({m['params'] / 1e6:.2f}M)",
            f"{tm['baseline']['median_step_cpu_s'] * 1e3:.0f} / {tm['baseline']['median_step_s'] * 1e3:.0f}",
            f"**{w['ratio_median']:.3f}** [{w['ratio_q25']:.3f}, {w['ratio_q75']:.3f}]",
            f"{w['cpu_q25_ratio']:.3f} / {w['wall_ratio_median']:.3f}",
            f"{s['predicted_step_ratio_warmup']:.4f}",
            f"**{a['ratio_median']:.3f}** [{a['ratio_q25']:.3f}, {a['ratio_q75']:.3f}]",
            f"{a['cpu_q25_ratio']:.3f} / {a['wall_ratio_median']:.3f}",
            f"**{s['peak_memory_ratio']:.4f}** / {s['peak_memory_ratio_after']:.4f}",
            f"{s['saved_activation_ratio']:.5f}",
            (f"**{comp['recompiles_from_alpha_updates']}** / **{comp['recompiles_at_removal']}** / "
             f"{comp['recompiles_after_removal']} ({comp['layers']} layers, {comp['compile_steps']} steps)"
             if comp else 'n/a'),
        ])
    L.append(table(['model', 'baseline step CPU / wall (ms)', 'during warmup: CPU-time ratio, median [IQR]',
                    'during: q25 CPU ratio / wall ratio', 'during: micro-benchmark prediction',
                    'after warmup: CPU-time ratio, median [IQR]', 'after: q25 CPU ratio / wall ratio',
                    'peak memory ratio during / after', 'saved-activation ratio',
                    'recompiles from α updates / at removal / after'], rows))
    L.append('')
    L.append(f"Targets: step time ≤ {t['step_time_ratio_warmup']} during warmup and ≤ {t['step_time_ratio_after']} after, "
             f"peak memory ≤ {t['peak_memory_ratio']}, 0 recompilations from α updates and exactly 1 at removal.")
    L.append('')
    # verdicts
    lines = []
    for name, m in r['models'].items():
        s = m['summary']
        micro = m['hook_microbench']
        ok_w = s['step_time_ratio_warmup'] <= t['step_time_ratio_warmup']
        ok_a = s['step_time_ratio_after'] <= t['step_time_ratio_after']
        ok_m = s['peak_memory_ratio'] <= t['peak_memory_ratio']
        ok_c = (s.get('recompiles_from_alpha_updates') == 0 and s.get('recompiles_at_removal') == 1)
        iqr_w = m['timing']['prores_warmup']['ratio_q75'] - m['timing']['prores_warmup']['ratio_q25']
        txt = (f"- **{name}**: during warmup the median step-time ratio is {s['step_time_ratio_warmup']:.3f} "
               f"({'meets' if ok_w else 'misses'} ≤ {t['step_time_ratio_warmup']}), after warmup "
               f"{s['step_time_ratio_after']:.3f} ({'meets' if ok_a else 'misses'} ≤ {t['step_time_ratio_after']}); "
               f"peak memory {s['peak_memory_ratio']:.4f} ({'meets' if ok_m else 'misses'} the target); recompilations "
               f"{'as expected' if ok_c else 'NOT as expected'}. The isolated hook costs "
               f"{micro['extra_per_branch_s'] * 1e6:.0f} µs of CPU per branch (forward + backward, "
               f"{micro['reps']} repetitions), i.e. {micro['branches']} branches × that / the baseline step = a "
               f"predicted ratio of {micro['predicted_step_ratio']:.4f}.")
        if not (ok_w and ok_a) and iqr_w > 0.02:
            txt += (f" The interquartile range of the per-round ratios ({iqr_w:.3f} wide during warmup) is larger "
                    f"than the effect being measured: the end-to-end ratios here are dominated by other jobs on the "
                    f"shared cores, and the micro-benchmark prediction is the more reliable estimate of the cost.")
        if m.get('identical_after_removal'):
            txt += (' After removal the model has no hooks and no α buffers left and its logits are bitwise equal to '
                    "the baseline's, so the after-warmup step *is* the baseline step; its ratio only measures noise.")
        lines.append(txt)
    L += lines
    L.append('')
    L.append('How each number is measured:')
    L.append('- **Step time**: `time.process_time()` (CPU time of this process) around each step is the headline, '
             'because on shared cores the wall time also counts the time spent waiting for a core; the wall-time '
             'ratio and the ratio of the lower quartiles of the CPU times (interference only adds time) are shown '
             'beside it. Torch runs with 1 intra-op thread: with 2 threads on 2 busy cores, OpenMP threads '
             'waiting for each other made steps up to 10x slower and erratic.')
    L.append("- **Peak memory**: CPU has no `max_memory_allocated`; we replay the CPU allocator's own allocation and "
             'free events (`torch.profiler` with `profile_memory=True`) over one full training step in time order, '
             'take the high-water mark of live bytes and add the bytes live at the start of the step (parameters, '
             'AdamW state). This is exact for tensor memory, does not depend on glibc caching freed memory (RSS '
             'does), and also sees transient tensors (the `output * α` product, backward temporaries), which summing '
             'the activations saved for backward would not. The saved-activation bytes '
             '(`torch.autograd.graph.saved_tensors_hooks`, unique storages) are shown as a cross-check: ProRes saves '
             'only its 0-dim α per branch (the multiply needs α, not the branch output, for the gradient).')
    L.append('- **Recompilations**: `torch.compile(model, backend=CompileCounter())` (eager execution, counts the '
             'frames dynamo compiles), trained with ProRes for the number of steps shown, t_warmup at the middle. '
             'The guard that fails at removal is recorded: ' +
             '; '.join(f"{n}: `{m['compile']['guard_failure_reasons'][0]}`" for n, m in r['models'].items()
                       if m.get('compile') and m['compile']['guard_failure_reasons']) + '.')
    L.append('')
    return L


# ------------------------------------------------------------------------------------------ quality
def quality_section(q: dict) -> list[str]:
    c, s, runs = q['config'], q['summary'], q['runs']
    done = len(runs)
    L = [f"## 2. Quality (`{q['command']}`, mode {q['mode']}, {_q_elapsed(q) / 60:.0f} min, status "
         f"{q['status']}: {done} runs" + (f", {len(q['skipped'])} skipped by the time budget" if q['skipped'] else '')
         + ')', '']
    if q.get('resumed'):
        L.append(f"(The run was interrupted and continued with `--resume` {q['resumed']} time(s): finished runs were "
                 f"kept, the time budget covers the total.)")
        L.append('')
    d = c['data']
    L.append(f"Setup: byte-level LM on the Python {d.get('python', '')} standard library sources (first "
             f"{d['max_tokens'] / 1e6:.0f}M bytes; {d['train_tokens'] / 1e6:.2f}M training tokens, validation = "
             f"{d['val_documents']} held-out files), sequence {c['seq_len']}, batch {c['batch']}, "
             f"**{c['steps']} steps per run** ({c['steps'] * c['batch'] * c['seq_len'] / 1e6:.2f}M tokens), reference "
             f"decoder (RMSNorm, SwiGLU, RoPE) d_model {c['d_model']}, {c['heads']} heads. AdamW (0.9, 0.95), weight "
             f"decay 0.1, clip 1.0, WSD schedule (linear decay over the last 10%). Pre-LN: LR {c['lr']['pre']:g}, "
             f"LR warmup {c['lr_warmup']['pre']}; Post-LN: LR {c['lr']['post']:g}, LR warmup "
             f"{c['lr_warmup']['post']} (the paper's half LR and 10% warmup). ProRes t_warmup {c['prores_t_warmup']} "
             f"(W = {float(c['prores_t_warmup'].removesuffix('dur')) * c['steps']:g} steps). Baseline and ProRes "
             f"with the same seed share initialisation and data order, so differences are paired by seed. "
             f"Validation: the first {c['eval_batches']} × 32 validation sequences, the same for every run. Loss "
             f"spikes: OLMo's definition, a training loss ≥ 7 standard deviations above the mean of the previous "
             f"window (max(20, steps // 20) steps). Loss is in nats per byte.")
    L.append('')
    # main table
    L.append(f"### 2.1 Main table ({c['layers']} layers, seeds {c['seeds']})")
    L.append('')
    rows = []
    for norm in ('pre', 'post'):
        m = s['main'].get(norm)
        if not m or m['baseline']['val_loss']['mean'] is None:
            continue
        b, p = m['baseline'], m['linear']
        ppl_change = pct(b['val_ppl']['mean'], p['val_ppl']['mean'])
        paper = ', '.join(f"{sz} {pct(*PAPER_MAIN[norm][sz]):+.1f}%" for sz in PAPER_MAIN[norm])
        rows.append([NORM_NAME[norm], pm(b['val_loss']), pm(p['val_loss']), signed(m['delta']),
                     wins(m['delta']), pm(b['val_ppl'], 3), pm(p['val_ppl'], 3),
                     f"{ppl_change:+.2f}%" if ppl_change is not None else 'n/a', paper,
                     f"{b['spikes_total']} / {p['spikes_total']}", f"{b['diverged']} / {p['diverged']}",
                     f"{pm(b['wall_s'], 0)} / {pm(p['wall_s'], 0)}"])
    L.append(table(['norm', 'baseline val loss', 'ProRes (linear) val loss', 'Δ loss, paired (ProRes − base)',
                    'seeds ProRes wins', 'baseline ppl', 'ProRes ppl', 'ppl change', 'paper ppl change (C4)',
                    'loss spikes base / ProRes', 'diverged base / ProRes', 'wall s base / ProRes'], rows))
    L.append('')
    for norm in ('pre', 'post'):
        g = curve_gaps(q, norm)
        if g:
            L.append(f"- {NORM_NAME[norm]} training-loss gap ProRes − baseline (moving average over {g['window']} "
                     f"steps, mean of {g['seeds']} seeds): {g['half_W']:+.3f} at step {g['half_W_step']} (W/2), "
                     f"{g['W']:+.3f} at step {g['W_step']} (W), {g['end']:+.3f} at the last step.")
    L.append('')
    # depth
    if s.get('depth'):
        L.append('### 2.2 Depth sweep (Pre-LN, width 64)')
        L.append('')
        rows = []
        for dpt in sorted(s['depth'], key=int):
            m = s['depth'][dpt]
            rows.append([dpt, pm(m['baseline']['val_loss']), pm(m['linear']['val_loss']), signed(m['delta']), wins(m['delta']),
                         f"{m['baseline']['spikes_total']} / {m['linear']['spikes_total']}",
                         f"{pm(m['baseline']['wall_s'], 0)} / {pm(m['linear']['wall_s'], 0)}"])
        L.append(table(['layers', 'baseline val loss', 'ProRes val loss', 'Δ (paired)', 'seeds ProRes wins',
                        'spikes base / ProRes', 'wall s base / ProRes'], rows))
        L.append('')
    # ablation
    if s.get('ablation'):
        L.append(f"### 2.3 Schedule ablation (Post-LN, {c['layers']} layers)")
        L.append('')
        rows = []
        for v, m in s['ablation'].items():
            paper = PAPER_ABLATION.get(v.split('+')[0] if '+' not in v else '__none__')
            paper_txt = 'n/a' if paper is None else ('diverged' if paper[1] is None else f'{paper[1]:.2f}')
            rows.append([f'`{v}`', pm(m['val_loss']), *vs_baseline(m), pm(m['val_ppl']), m['spikes_total'],
                         m['diverged'], paper_txt])
        L.append(table(['schedule', 'val loss', 'Δ vs baseline (paired)', 'seeds better than baseline', 'val ppl',
                        'loss spikes', 'diverged runs', 'paper Post-LN ppl (350M)'], rows))
        L.append('')
        L.append(f"`linear+lr_delay`: `lr_warmup_delay={c['lr_warmup_delay']}`, the LR warmup starts "
                 f"{float(c['lr_warmup_delay'].removesuffix('dur')) * c['steps']:g} steps late (LR 0 until then).")
        L.append('')
    if s.get('warmup_length'):
        L.append(f"### 2.4 ProRes t_warmup length ({c['layers']} layers)")
        L.append('')
        rows = []
        for norm, vs in s['warmup_length'].items():
            for v, m in vs.items():
                label = v if '@' in v else (f"{v}@{c['prores_t_warmup']}" if v != 'baseline' else v)
                rows.append([NORM_NAME[norm], f'`{label}`', pm(m['val_loss']), *vs_baseline(m), m['spikes_total']])
        L.append(table(['norm', 'variant', 'val loss', 'Δ vs baseline (paired)', 'seeds better', 'spikes'], rows))
        L.append('')
    figs = q.get('figures', []) or sorted(  # a partial run: the PNGs quality.py --plots-only drew
        p.name for p in RESULTS.glob('*.png') if p.name.startswith(('quality_', 'alpha_')))
    if figs:
        L.append('### Figures')
        L.append('')
        cap = {'quality_loss_curves.png': 'Training loss, baseline vs ProRes (thin: seeds, thick: mean).',
               'quality_depth.png': 'Final validation loss vs depth (Pre-LN).',
               'quality_ablation.png': 'Post-LN schedule ablation.',
               'alpha_heatmap.png': "α(l, t) of the 'linear' schedule, 24 layers, as used in these runs."}
        for f in figs:
            L.append(f"![{cap.get(f, f)}](results/{f})")
            L.append('')
            L.append(f"*{cap.get(f, f)}*")
            L.append('')
    chk = q.get('alpha_log_check')
    if chk:
        L.append(f"The α values logged by the Composer algorithm during the ProRes runs ({chk['values_checked']} "
                 f"values) match the schedule formulas to {chk['max_abs_diff']:.1e}.")
        L.append('')
    if q['skipped']:
        L.append('Skipped by the time budget: ' + ', '.join(f'`{k}`' for k in q['skipped']) + '.')
        L.append('')
    errors = {k: r['error'] for k, r in runs.items() if 'error' in r}
    if errors:
        L.append('Runs that raised: ' + '; '.join(f'`{k}`: {v}' for k, v in errors.items()))
        L.append('')
    return L


def _diag_W(d: dict) -> int:
    tw = next((r['spec']['prores_t_warmup'] for r in d['runs'].values() if r['spec'].get('prores_t_warmup')), '0.25dur')
    steps = next(iter(d['runs'].values()))['spec']['steps']
    return int(float(tw.removesuffix('dur')) * steps)


def _probe_at(rows, step):
    return min(rows, key=lambda r: abs(r['step'] - step))


def diagnostics_section(d: dict, q: dict | None) -> list[str]:
    runs = d['runs']
    if not runs:
        return []
    any_run = next(iter(runs.values()))
    steps, L = any_run['spec']['steps'], any_run['spec']['layers']
    ref = d.get('reference_levels', {})
    out = [f"### 2.5 Diagnostics: Post-LN, {L} layers, seed 0 (`{d['command']}`)", '']
    present = [k for k in runs if q and k in q['runs']]
    same = [k for k in present if q['runs'][k]['val_loss'] == runs[k]['val_loss']]
    if present and len(same) == len(present):
        how = ('the same runs as the seed-0 rows above (' + ', '.join(f'`{k}`' for k in same) + ': validation losses '
               'identical to the last digit)')
    else:
        how = 'runs configured like the seed-0 rows above'
    out.append(f"{how[0].upper() + how[1:]}, with a probe that, every few steps, records per layer the size of each branch as it enters the residual add relative to the "
               f"residual (‖α·F(x)‖ / ‖x‖, after ProRes' scaling) and the gradient norm of the layer's parameters. "
               f"Reference levels on the same validation subset: a unigram byte model (no context at all) scores "
               f"{ref.get('unigram', float('nan')):.3f}, a bigram model (current byte only) "
               f"{ref.get('bigram', float('nan')):.3f}.")
    out.append('')
    rows = []
    W_ = _diag_W(d)
    marks = [('W/2', W_ // 2), ('W', W_), ('2W', 2 * W_), ('end', steps - 1)]
    for key, r in runs.items():
        pr = r['probe']
        for i, (name, t) in enumerate(marks):
            row = _probe_at(pr, t)
            up = row['attn'][L // 2:] + row['mlp'][L // 2:]
            w = (row.get('w_attn', [])[L // 2:] + row.get('w_mlp', [])[L // 2:])
            rows.append([f"`{r['spec']['variant']}`" if i == 0 else '', fmt(r['val_loss']) if i == 0 else '',
                         f"{row['step']} ({name})", f"{sum(up) / len(up):.2f}",
                         f"{sum(w) / len(w):.2f}" if w else 'n/a', f"{row['grad'][0]:.1e}", f"{row['grad'][-1]:.1e}"])
    out.append(table(['variant', 'val loss', 'step', '‖α·F‖ / ‖residual‖, mean of layers '
                      f'{L // 2 + 1}-{L}', 'branch weight norm (o_proj, down_proj), same layers',
                      'grad norm, layer 1', f'grad norm, layer {L}'], rows))
    out.append('')
    if 'quality_postln_diagnostics.png' in d.get('figures', []):
        out.append('![Post-LN diagnostics](results/quality_postln_diagnostics.png)')
        out.append('')
        out.append('*Post-LN diagnostics: branch-to-residual ratio, gradient norms of the first and last layer over '
                   'training, and gradient norm by layer at the end.*')
        out.append('')
    return out


def diagnostics_discussion(d: dict | None, q: dict | None = None) -> list[str]:
    """Conditioned on the probe: does ProRes 'linear' leave Post-LN with vanished lower-layer gradients?"""
    if not d:
        return []
    runs = {r['spec']['variant']: r for r in d['runs'].values()}
    b, lin = runs.get('baseline'), runs.get('linear')
    if not b or not lin:
        return []
    ref = d.get('reference_levels', {})
    steps = b['spec']['steps']
    W = _diag_W(d)
    L = b['spec']['layers']
    end_b, end_l = b['probe'][-1], lin['probe'][-1]
    at_b, at_l = _probe_at(b['probe'], W), _probe_at(lin['probe'], W)

    def upper(row):
        up = row['attn'][L // 2:] + row['mlp'][L // 2:]
        return sum(up) / len(up)

    stalled = ref and lin['val_loss'] > ref.get('bigram', 0) and abs(lin['val_loss'] - ref['unigram']) < 0.15
    vanished = end_l['grad'][0] < 1e-3 * end_b['grad'][0]
    bigger = upper(at_l) > 1.3 * upper(at_b)
    out = ['**What the Post-LN diagnostics show.**']
    facts = []
    if stalled:
        facts.append(f"ProRes `linear` ends at a validation loss of {lin['val_loss']:.3f}, the level of a unigram model "
                     f"({ref['unigram']:.3f}) and worse than a bigram model ({ref['bigram']:.3f}): the network's "
                     f"prediction no longer depends on its input")
    if bigger:
        facts.append(f"at t = W the upper layers' branches are {upper(at_l):.2f} of the residual they are added to, "
                     f"against {upper(at_b):.2f} in the baseline")
    if vanished:
        facts.append(f"at the end the first layer's gradient norm is {end_l['grad'][0]:.1e} against "
                     f"{end_b['grad'][0]:.1e} in the baseline (layer {L}: {end_l['grad'][-1]:.1e} vs "
                     f"{end_b['grad'][-1]:.1e}), so the lower layers stop learning")
    if facts:
        out.append('; '.join(facts) + '.')
    if 'cos' in end_l and 'cos' in end_b:
        out.append(f"The mean cosine similarity between the hidden states of different positions after layer {L} is "
                   f"{end_l['cos'][-1]:.3f} with ProRes against {end_b['cos'][-1]:.3f} in the baseline at the end "
                   f"(after layer {L // 3}: {end_l['cos'][L // 3 - 1]:.3f} vs {end_b['cos'][L // 3 - 1]:.3f}); "
                   f"1.0 means every position carries the same vector (rank collapse).")
    if stalled and vanished:
        def wn(row):
            w = row.get('w_attn', [])[L // 2:] + row.get('w_mlp', [])[L // 2:]
            return sum(w) / len(w) if w else None
        wl_, wb_ = wn(at_l), wn(at_b)
        if wl_ is not None and wb_ is not None and abs(wl_ / wb_ - 1) < 0.1:
            out.append("We first suspected weight growth: while α < 1 a branch's gradient is scaled by α, but AdamW's "
                       "step does not depend on the gradient's scale, so the branch weights could grow to make up for "
                       "a small α and be oversized once α reaches 1. The probe rules that out: at t = W the upper "
                       f"layers' branch-final weights have norm {wl_:.2f} against {wb_:.2f} in the baseline. The "
                       "branches are large relative to the residual because of what they are fed, not their weights.")
            dip = min(b['probe'], key=lambda row: row['grad'][0])
            if dip['grad'][0] < 1e-2 * end_b['grad'][0]:
                out.append(f"The baseline passes through the same state: its layer-1 gradient norm dips to "
                           f"{dip['grad'][0]:.1e} at step {dip['step']} (the LR warmup ends at step "
                           f"{float(b['spec']['lr_warmup'].removesuffix('dur')) * steps:g}) and its upper-layer branch ratio to {upper(dip):.2f}" +
                           (f", with a cosine between positions of {dip['cos'][-1]:.3f} after layer {L}"
                            if 'cos' in dip else '') +
                           ", and leaves it within tens of steps; ProRes `linear` does not leave it.")
            out.append("Our reading is a self-reinforcing state: once positions look alike, attention's average over "
                       "positions no longer cancels anything, the branches stay large next to the residual, and "
                       f"Post-LN's {2 * L} normalisations of (x + F(x)) shrink the gradient that reaches the lower "
                       "layers, so nothing restores the difference between positions. Why ProRes `linear` cannot "
                       "leave it while the baseline can is not settled by these probes; what they do settle is that "
                       "the difference at t = W is in the activations, not in the weights.")
        else:
            wts = (f" (measured: at t = W the upper layers' branch weights have norm {wl_:.2f} against {wb_:.2f} in "
                   "the baseline)") if wl_ is not None and wb_ is not None else ''
            out.append("Our reading: while α < 1 the gradient reaching a branch's weights is scaled by α, but AdamW's "
                       "step size does not depend on the gradient's scale, so at full learning rate the branch weights "
                       f"keep growing while the model makes up for a small α with larger weights{wts}. Once α reaches "
                       "1 those branches are large next to the residual; Post-LN divides the residual by the norm of "
                       f"(x + F(x)) at every one of the {2 * L} sub-layers, so the gradient that reaches the lower "
                       "layers collapses. The baseline goes through a similar phase but less far, and recovers.")
        ok = []
        s = (q or {}).get('summary', {})
        ab = s.get('ablation', {})
        for v in ('stagewise_0', 'staggered'):
            m = ab.get(v, {}).get('val_loss', {})
            if m.get('mean') is not None and m['mean'] < ref.get('bigram', 0):
                ok.append(f"`{v}` ({pm(m)})")
        if ok:
            out.append(f"The schedules that keep a layer's α at exactly 0 until its turn (the layer is then exactly "
                       f"x ↦ Norm(x), with no gradient to its branch) do not stall: {', '.join(ok)}.")
        wl = s.get('warmup_length', {}).get('post', {})
        short = [(v, m) for v, m in wl.items() if '@' in v and m['val_loss']['mean'] is not None]
        for v, m in short:
            if m['val_loss']['mean'] < ref.get('bigram', 0):
                out.append(f"Nor does `{v}` ({pm(m['val_loss'])}), whose α ramp ends with the {b['spec']['lr_warmup']} "
                           "LR warmup, while the LR is still small; with t_warmup = "
                           f"{b['spec'].get('prores_t_warmup') or lin['spec']['prores_t_warmup']} the deep layers' α is "
                           "still small for many steps at the peak LR.")
            else:
                out.append(f"`{v}` stalls too ({pm(m['val_loss'])}).")
        out.append(f"In the paper's setting every layer ramps over ≥ 1000 steps (here {W / L:.1f} steps per layer) and "
                   "the model is far wider; §2.6 moves this miniature towards that regime one factor at a time. This is a property of the method at this scale, not an implementation error: α is "
                   "exactly the schedule (§2) and the surgery is exact (the conformance tests; the after-removal check "
                   "in §1).")
    out.append('')
    return out


def is_stalled(loss, bigram) -> bool:
    """A run that ended above the bigram level (or not finite) did not learn beyond the unigram/bigram
    statistics: the collapse of section 2.5."""
    return loss is None or not math.isfinite(loss) or (bigram is not None and loss > bigram)


def stall_aware_aggregate(inv: dict, bigram: float | None) -> list[dict]:
    """investigate.py's per-(factor, norm) aggregate, with the paired Δ taken over the seeds in which both
    runs trained, and the number of seeds in which ProRes stalled beside it: one stalled seed moves a
    mean by +1.8 nats and would hide what the other seeds show. `delta_mean_all` keeps the mean over
    every seed, stalls counted (a stalled ProRes run is a loss)."""
    out = []
    for a in inv.get('aggregate') or _aggregate(inv['summary']):
        rs = [r for r in inv['summary'] if r['factor'] == a['factor'] and r['norm'] == a['norm']]
        ok = [r['delta'] for r in rs
              if not is_stalled(r['baseline_val_loss'], bigram) and not is_stalled(r['linear_val_loss'], bigram)]
        out.append({**a, 'delta_mean_all': a['delta_mean'], 'seeds_run': len(rs), 'n': len(ok),
                    'wins': sum(x < 0 for x in ok),
                    'delta_mean': statistics.fmean(ok) if ok else math.nan,
                    'delta_std': statistics.stdev(ok) if len(ok) > 1 else 0.0,
                    'prores_stalled': sum(is_stalled(r['linear_val_loss'], bigram) for r in rs),
                    'baseline_stalled': sum(is_stalled(r['baseline_val_loss'], bigram) for r in rs),
                    'stalled_deltas': [r['delta'] for r in rs if is_stalled(r['linear_val_loss'], bigram)]})
    return out


def _aggregate(rows):  # a partial investigation.json from before every write carried `aggregate`
    from investigate import aggregate
    return aggregate(rows)


def delta_text(a: dict) -> str:
    """'Δ mean ± std over n seeds, ProRes lower in k', with the seeds in which ProRes stalled named apart."""
    stalls = (f"ProRes stalled in {a['prores_stalled']} of {a['seeds_run']} seeds (Δ "
              + ', '.join(f'{x:+.3f}' for x in a['stalled_deltas']) + ')') if a['prores_stalled'] else ''
    if a['n'] == 0:
        return stalls
    if a['n'] > 1:
        txt = (f"Δ {a['delta_mean']:+.3f} ± {a['delta_std']:.3f} over {a['n']} seeds"
               + (' that trained' if a['prores_stalled'] else '') + f", ProRes lower in {a['wins']}")
    else:
        txt = f"Δ {a['delta_mean']:+.3f}"
    return f'{stalls}; {txt}' if stalls else txt


def investigation_section(inv: dict, d: dict | None) -> list[str]:
    """benchmarks/investigate.py: baseline vs ProRes `linear` again, one setting changed at a time."""
    rows = inv.get('summary') or []
    if not rows:
        return []
    ref = (d or {}).get('reference_levels') or {}
    bigram = ref.get('bigram')
    minutes = (inv.get('elapsed_s', 0) + inv.get('elapsed_s_previous', 0)) / 60
    out = [f"### 2.6 One factor at a time (`{inv['command']}`, {minutes:.0f} min with "
           f"{inv.get('jobs', 1)} runs in parallel)", '']
    out.append("Each row reruns the main-table comparison (baseline vs ProRes `linear`, t_warmup 0.25dur, paired "
               "seed) with one setting moved towards the paper's regime or towards stability; `reference` is the "
               "main table's configuration (its runs are reused from §2.1). *Steps per layer* is ProRes's warmup "
               "length divided by the depth: the paper's T is 500-1000."
               + (f" *Stalled*: validation loss above the bigram level {bigram:.3f} (§2.5)." if bigram else ''))
    out.append('')

    def state(x):
        if x is None or not math.isfinite(x):
            return 'diverged'
        return 'stalled' if bigram is not None and x > bigram else 'trains'

    trows = []
    for r in rows:
        ch = ', '.join(f'{k} {v:g}' if isinstance(v, float) else f'{k} {v}' for k, v in r['change'].items()) or '—'
        trows.append([NORM_NAME[r['norm']], r['factor'], ch, str(r['seed']), f"{r['steps']}", f"{r['layers']}×{r['d_model']}",
                      f"{r['lr']:g}", f"{r['steps_per_layer']:.1f}", fmt(r['baseline_val_loss']),
                      fmt(r['linear_val_loss']), f"{r['delta']:+.3f}",
                      f"{state(r['baseline_val_loss'])} / {state(r['linear_val_loss'])}", f"{r['wall_s']:.0f}"])
    out.append(table(['norm', 'factor', 'change', 'seed', 'steps', 'layers × width', 'LR', 'steps per layer',
                      'baseline val loss', 'ProRes val loss', 'Δ (ProRes − base)', 'base / ProRes', 'wall s (both; runs share the cores)'],
                     trows))
    out.append('')
    if 'quality_investigation.png' in inv.get('figures', []):
        out.append('![one factor at a time](results/quality_investigation.png)')
        out.append('')
    # prose conditioned on the rows: per factor over seeds, the seeds in which ProRes stalled apart
    agg = stall_aware_aggregate(inv, bigram)
    post = [a for a in agg if a['norm'] == 'post']
    pre = [a for a in agg if a['norm'] == 'pre']
    facts = []
    if post and bigram is not None:
        ok = [a for a in post if a['prores_stalled'] == 0]
        some = [a for a in post if 0 < a['prores_stalled'] < a['seeds_run']]
        bad = [a for a in post if a['prores_stalled'] == a['seeds_run']]
        if ok:
            facts.append("Post-LN + ProRes trains (no stall) with: " + ', '.join(f"`{a['factor']}` ({delta_text(a)})"
                                                                            for a in ok))
        if some:
            facts.append("it stalls in some seeds only with: " + ', '.join(f"`{a['factor']}` ({delta_text(a)})"
                                                                           for a in some))
        if bad:
            facts.append(("it still stalls with: " if ok or some else "Post-LN + ProRes stalls in every row: ")
                         + ', '.join(f"`{a['factor']}` ({a['linear_mean']:.3f})" for a in bad))
    better = [a for a in agg if a['n'] and a['delta_mean'] < 0]
    if better:
        facts.append("ProRes is ahead of its baseline on average (over the seeds that trained) in: " + ', '.join(
            f"{NORM_NAME[a['norm']]} `{a['factor']}` ({delta_text(a)})" for a in better))
    else:
        facts.append('ProRes beats its baseline in none of the rows')
    refpre = next((a for a in pre if a['factor'] == 'reference'), None)
    for a in pre:
        if a is not refpre and refpre is not None:
            facts.append(f"Pre-LN `{a['factor']}` moves Δ from {refpre['delta_mean']:+.3f} (reference, "
                         f"{refpre['n']} seed{'s' if refpre['n'] > 1 else ''}) to {a['delta_mean']:+.3f}")
    if facts:
        out.append('Measured: ' + '; '.join(facts) + '.')
        out.append('')
    longer = {a['norm']: a for a in agg if a['factor'].endswith('x steps')}
    refs = {a['norm']: a for a in agg if a['factor'] == 'reference'}
    # the reference rows lose with their stalls counted: a stalled ProRes run is a loss
    if longer and all(a['n'] and a['delta_mean'] < 0 for a in longer.values()) and \
            all(refs.get(n, {}).get('delta_mean_all', -1) > 0 for n in longer):
        gain = sorted(longer.values(), key=lambda a: a['delta_mean'])
        out.append(f"**So the sign of the comparison follows the horizon.** At {refs[gain[0]['norm']]['steps_per_layer']:.1f} "
                   f"steps of α warmup per layer ProRes loses for {' and '.join(NORM_NAME[n] for n in refs)}; at "
                   f"{gain[0]['steps_per_layer']:.1f} steps per layer (the `{gain[0]['factor']}` rows: same fractions of a longer run) it is ahead for "
                   f"{' and '.join(NORM_NAME[a['norm']] for a in gain)}"
                   + (f", {NORM_NAME[gain[0]['norm']]} by more ({gain[0]['delta_mean']:+.3f} vs "
                      f"{gain[-1]['delta_mean']:+.3f})" if len(gain) > 1 and gain[-1]['delta_mean'] - gain[0]['delta_mean']
                      > max(a['delta_std'] for a in gain) else '')
                   + " — the paper's direction" + (", including Post-LN gaining most" if gain[0]['norm'] == 'post'
                                                    and len(gain) > 1 else '') + ". "
                   + ("Seeds: " + '; '.join(f"{NORM_NAME[a['norm']]} ProRes lower in {a['wins']} of {a['n']}"
                                            + (f" that trained (it stalled in {a['prores_stalled']} more)"
                                               if a['prores_stalled'] else '')
                                            for a in gain) + '.' if any(a['n'] > 1 for a in gain) else
                      'One seed each: treat it as a direction, not a measurement of the size.')
                   + (' The effects are small next to the spread over seeds (|mean Δ| < 2 standard errors for '
                      + ', '.join(NORM_NAME[a['norm']] for a in gain if a['n'] > 1
                                  and abs(a['delta_mean']) < 2 * a['delta_std'] / math.sqrt(a['n']))
                      + '): a direction, not a measured size.'
                      if any(a['n'] > 1 and abs(a['delta_mean']) < 2 * a['delta_std'] / math.sqrt(a['n'])
                             for a in gain) else ''))
        same_spl = [a for a in agg if a['factor'] not in ('reference',) and not a['factor'].endswith('x steps')
                    and abs(a['steps_per_layer'] - gain[0]['steps_per_layer']) < 1e-9 and a['delta_mean'] > 0]
        for a in same_spl:
            out.append(f"`{a['factor']}` ({NORM_NAME[a['norm']]}) has the same {a['steps_per_layer']:.1f} steps per "
                       f"layer in the short run and ProRes, though it no longer stalls, is still behind (Δ "
                       f"{a['delta_mean']:+.3f}): escaping the stall (more steps per layer, or a lower LR) is not "
                       "enough, the length of the run decides whether ProRes pays off.")
        for a in gain:
            if a['prores_stalled']:
                out.append(f"**But the longer run does not remove the {NORM_NAME[a['norm']]} stall:** ProRes stalled "
                           f"in {a['prores_stalled']} of {a['seeds_run']} seeds at {a['steps_per_layer']:.1f} steps "
                           f"per layer (its baseline in {a['baseline_stalled']}). Counting those runs, ProRes is "
                           f"behind on average (Δ {a['delta_mean_all']:+.3f}); a real run "
                           "would need the stall detected and restarted, or a schedule that avoids it (§2.3).")
        out.append('')
    return out


def discussion(q: dict, d: dict | None = None, inv: dict | None = None) -> list[str]:
    """The comparison with the paper, conditioned on what was measured."""
    c, s = q['config'], q['summary']
    L = ['## 3. Comparison with the paper', '']
    ref = (d or {}).get('reference_levels')
    base_post = s.get('main', {}).get('post', {}).get('baseline', {}).get('val_loss', {}).get('mean')
    if ref:
        stall_what = (f"validation loss worse than a bigram byte model, {ref['bigram']:.2f}, i.e. at about the "
                      f"unigram level {ref['unigram']:.2f}: the output ignores the context")
    else:
        stall_what = 'validation loss more than 0.5 above the baseline'

    def is_stalled(x):
        if x is None:
            return False
        if ref:
            return x > ref['bigram']
        return base_post is not None and x > base_post + 0.5

    tokens = c['steps'] * c['batch'] * c['seq_len']
    paper_tokens = 100_000 * 512 * 1024
    n_params = next((r.get('params') or _num_params(r['spec']) for r in q['runs'].values()
                     if r['spec']['layers'] == c['layers']), float('nan'))
    main = s.get('main', {})
    vpre = verdict(main.get('pre', {}).get('delta'))
    vpost = verdict(main.get('post', {}).get('delta'))
    dpre = main.get('pre', {}).get('delta', {})
    dpost = main.get('post', {}).get('delta', {})
    L.append(f"**Scale.** Each run here sees {tokens / 1e6:.2f}M tokens ({c['steps']} steps); the paper's runs see "
             f"{paper_tokens / 1e9:.0f}B (100k steps of 512 × 1024), about {paper_tokens / tokens:,.0f}× more, with "
             f"models of 130M-1.3B parameters instead of {n_params / 1e6:.2f}M. "
             f"ProRes's W here is {float(c['prores_t_warmup'].removesuffix('dur')) * c['steps']:g} steps, i.e. "
             f"{float(c['prores_t_warmup'].removesuffix('dur')) * c['steps'] / c['layers']:.1f} steps per layer "
             f"against the paper's 1000. The miniature can therefore test the mechanism and the direction of the "
             f"early-training effects, not reproduce the size of end-of-training gains.")
    L.append('')

    def desc(v, d, norm):
        if v == 'missing':
            return f'{NORM_NAME[norm]}: not measured.'
        return (f"{NORM_NAME[norm]}: {WORD[v]} (Δ val loss {signed(d)} nats/byte over {d['n']} paired seeds, ProRes "
                f"lower in {d['wins']} of {d['n']}).")

    L.append('**Main table.** ' + desc(vpre, dpre, 'pre') + ' ' + desc(vpost, dpost, 'post') +
             ' The paper reports ProRes better for both at every size (perplexity −0.8% to −9.4%), with the larger '
             'gains for Post-LN at 350M and 1.3B.')
    agree = []
    if vpre == 'better':
        agree.append('Pre-LN agrees with the paper in direction')
    if vpost == 'better':
        agree.append('Post-LN agrees with the paper in direction')
    if agree:
        L.append(' and '.join(agree) + '.')
    if vpre in ('worse', 'unclear') or vpost in ('worse', 'unclear'):
        L.append('')
        L.append("Where the miniature does not show the paper's gain, the likely reasons, and what we checked:")
        main_keys = q['experiments'].get('main', [])
        stalled_runs = {n: [k for k in main_keys if k in q['runs'] and q['runs'][k]['spec']['norm'] == n
                            and q['runs'][k]['spec']['variant'] != 'baseline' and is_stalled(q['runs'][k]['val_loss'])]
                        for n in ('pre', 'post')}
        n_pro = {n: len([k for k in main_keys if k in q['runs'] and q['runs'][k]['spec']['norm'] == n
                         and q['runs'][k]['spec']['variant'] != 'baseline']) for n in ('pre', 'post')}
        for n in ('pre', 'post'):
            base_stalled = [k for k in main_keys if k in q['runs'] and q['runs'][k]['spec']['variant'] == 'baseline'
                            and q['runs'][k]['spec']['norm'] == n and is_stalled(q['runs'][k]['val_loss'])]
            if stalled_runs[n]:
                L.append(f"- *{NORM_NAME[n]}: a stall, not a slow start.* {len(stalled_runs[n])} of {n_pro[n]} ProRes "
                         f"runs stalled ({stall_what}); "
                         + (f"{len(base_stalled)} baseline runs did too. " if base_stalled else
                            'no baseline run did. ') + ('§2.5 shows what happens inside.' if d else ''))
        slow = [n for n in ('pre', 'post') if not stalled_runs[n] and verdict(main.get(n, {}).get('delta')) != 'better']
        gaps = {n: curve_gaps(q, n) for n in slow}
        gap_txt = '; '.join(f"{NORM_NAME[n]} {g['W']:+.3f} at W and {g['end']:+.3f} at the end" for n, g in gaps.items()
                            if g)
        if gap_txt:
            L.append(f"- *Horizon ({', '.join(NORM_NAME[n] for n in slow)}).* While α < 1 the deep layers contribute "
                     f"little, so for the first part of the run the network trains as a shallower one. Measured "
                     f"training-loss gap (ProRes − baseline): {gap_txt}. The paper's gains are measured after 100k "
                     f"steps, where {float(c['prores_t_warmup'].removesuffix('dur')):.0%} of training spent warming up "
                     f"is amortised; in a {c['steps']}-step run the remaining "
                     f"{1 - float(c['prores_t_warmup'].removesuffix('dur')):.0%} may be too short to catch up (a gap "
                     f"that shrinks from W to the end points that way; one that does not, against it).")
        longer = [a for a in (stall_aware_aggregate(inv, (ref or {}).get('bigram')) if inv and inv.get('summary')
                              else []) if a['factor'].endswith('x steps')]
        if longer:
            parts = [f"{NORM_NAME[a['norm']]} {delta_text(a)}" for a in longer]
            L.append(f"- *Horizon, measured (§2.6).* With `{longer[0]['factor']}` ({longer[0]['steps_per_layer']:.1f} "
                     f"steps of α warmup per layer instead of {float(c['prores_t_warmup'].removesuffix('dur')) * c['steps'] / c['layers']:.1f}): "
                     + '; '.join(parts) + '.')
        wl = s.get('warmup_length')
        if wl:
            parts = []
            for norm, vs in wl.items():
                for v, m in vs.items():
                    if '@' in v and m.get('delta', {}).get('n'):
                        lin = vs.get('linear', {}).get('delta', {})
                        parts.append(f"{NORM_NAME[norm]} `{v}` Δ {signed(m['delta'])} vs `linear@"
                                     f"{c['prores_t_warmup']}` Δ {signed(lin)}")
            if parts:
                L.append("- *ProRes warmup length (measured, §2.4).* " + '; '.join(parts) + '.')
        spikes_base = sum(main.get(n, {}).get('baseline', {}).get('spikes_total', 0) for n in ('pre', 'post'))
        spikes_pro = sum(main.get(n, {}).get('linear', {}).get('spikes_total', 0) for n in ('pre', 'post'))
        div_base = sum(main.get(n, {}).get('baseline', {}).get('diverged', 0) for n in ('pre', 'post'))
        if spikes_base <= 1 and div_base == 0:
            L.append(f"- *Little instability to cure.* The baselines had {spikes_base} loss spike(s) (ProRes: "
                     f"{spikes_pro}) and no divergence at this scale and LR, so the benefit the paper attributes to "
                     "ProRes, a stabler optimisation, has little to act on here.")
        else:
            L.append(f"- *Instability.* The baselines had {spikes_base} loss spikes and {div_base} divergences in the "
                     f"main table, ProRes {spikes_pro} spikes.")
        L.append("- *Implementation.* Checked independently of the outcome: α logged by the algorithm equals the "
                 "schedule formula for every step and layer (§2); the repository's conformance tests check "
                 "`x + α·F(x)` against a hand-written forward for every norm placement; after warmup the model is "
                 "bitwise the baseline (§1). Equal steps and paired seeds isolate ProRes as the only difference.")
    L.append('')
    depth = s.get('depth', {})
    if depth:
        ds = sorted(depth, key=int)
        deltas = [(int(d), depth[d]['delta']['mean']) for d in ds if depth[d]['delta'].get('n')]
        if len(deltas) >= 2:
            trend = deltas[-1][1] - deltas[0][1]
            txt = ', '.join(f'{d} layers {x:+.3f}' for d, x in deltas)
            if trend < 0:
                tr = ("the gap moves in ProRes's favour as depth grows, the paper's trend "
                      '("lead grows with depth")')
            else:
                tr = ("the gap does not move in ProRes's favour with depth, unlike the paper's "
                      '"lead grows with depth"; at a fixed W = 25% of the run, deeper models here also get fewer '
                      'steps per layer of warmup (the paper keeps 1000 steps per layer)')
            L.append(f"**Depth.** Paired Δ (ProRes − baseline) by depth: {txt}: {tr}. The paper (71M width, 12-120 "
                     f"layers) finds Pre-LN + ProRes best at every depth.")
            L.append('')
    ab = s.get('ablation', {})
    if ab:
        ranked = sorted(((m['val_loss']['mean'], v) for v, m in ab.items() if m['val_loss']['mean'] is not None))
        order = ' < '.join(f'`{v}` {x:.3f}' for x, v in ranked)
        div = [v for v, m in ab.items() if m['diverged']]
        stalled = [v for v, m in ab.items() if v != 'baseline' and is_stalled(m['val_loss']['mean'])]
        trained = [v for v, m in ab.items() if v not in stalled and v not in div and v != 'baseline'
                   and m['val_loss']['mean'] is not None]
        base_loss = ab.get('baseline', {}).get('val_loss', {}).get('mean')
        L.append(f"**Schedule ablation (Post-LN).** Validation loss, best first: {order}. In the paper (350M, Post-LN) "
                 "`linear_square` was best (14.84), `linear` next (15.15), and `equal`, `reverse` and `stagewise_0` "
                 "diverged.")
        if div:
            L.append(f"Here {', '.join(f'`{v}`' for v in div)} diverged (non-finite loss or worse than at "
                     "initialisation).")
        if stalled:
            L.append(f"Here nothing diverged, but {', '.join(f'`{v}`' for v in stalled)} stalled ({stall_what}); "
                     f"{', '.join(f'`{v}`' for v in trained) or 'no ProRes schedule'} trained normally"
                     + (f", and {', '.join(f'`{v}`' for v in trained if base_loss is not None and ab[v]['val_loss']['mean'] < base_loss) or 'none'} "
                        "beat the baseline" if trained else '') + '.')
            if 'stagewise_0' in trained:
                L.append("So the miniature splits the schedules differently from the paper: the ones that fail here "
                         "are those that give *every* layer a small non-zero α from the first step (`linear`, "
                         "`linear_square`, `equal`, `reverse`), whatever the order; `stagewise_0`, which the paper saw "
                         "diverge, keeps a layer's α at exactly 0 until its turn and trains. §2.5 shows the mechanism "
                         "for `linear`.")
        elif not div:
            L.append('Here no schedule diverged or stalled: at this size and LR the Post-LN baseline trains stably, so '
                     'the failure modes the paper reports cannot show; what remains is how much each schedule slows '
                     'early training.')
        if 'reverse' in ab and 'linear' in ab and ab['reverse']['val_loss']['mean'] is not None \
                and not (is_stalled(ab['reverse']['val_loss']['mean']) and is_stalled(ab['linear']['val_loss']['mean'])):
            better = ab['linear']['val_loss']['mean'] < ab['reverse']['val_loss']['mean']
            L.append(f"`linear` (shallow layers first) is {'better' if better else 'not better'} than `reverse` "
                     f"(deep layers first){', as in the paper' if better else ', unlike the paper'}.")
        if 'linear+lr_delay' in ab and 'linear' in ab and ab['linear+lr_delay']['val_loss']['mean'] is not None:
            dd = ab['linear+lr_delay']['val_loss']['mean'] - ab['linear']['val_loss']['mean']
            L.append(f"Delaying the LR warmup (`lr_warmup_delay`) changes the loss by {dd:+.3f} relative to `linear`"
                     + (' (both stalled)' if is_stalled(ab['linear+lr_delay']['val_loss']['mean'])
                        and is_stalled(ab['linear']['val_loss']['mean']) else '')
                     + '; the paper used no delay, and with a warmup from 0 the LR is 0 during the delay, so those '
                     'steps are lost for learning in a short run.')
        L.append('')
    return L


def render(overhead: dict | None, quality: dict | None, diagnostics: dict | None = None,
           investigation: dict | None = None) -> str:
    L = ['# ProRes benchmarks: measured results', '',
         f"Rendered by `python benchmarks/report.py` on {time.strftime('%Y-%m-%d %H:%M')} from "
         '`benchmarks/results/overhead.json` and `benchmarks/results/quality.json`. Every number in the tables was '
         'measured by the benchmarks in this folder, except the columns labelled *paper* (ProRes, arXiv 2603.05369, '
         'as summarised in DESIGN.md §2).', '']
    L.append('## Machine and commands')
    L.append('')
    L.append(f"- Report rendered on: {platform.platform()}, os.cpu_count() = {os.cpu_count()}")
    if overhead:
        L += machine_lines(overhead['machine'], 'overhead run')
    if quality:
        L += machine_lines(quality['machine'], 'quality run')
    L.append('')
    L.append('```')
    L.append('python benchmarks/overhead.py          # ' + (f"{overhead['wall_s'] / 60:.0f} min" if overhead else ''))
    L.append('python benchmarks/quality.py           # ' +
             (f"{_q_elapsed(quality) / 60:.0f} min" if quality else '') + ' (writes results incrementally; '
             '--resume continues an interrupted run)')
    if diagnostics:
        L.append('python benchmarks/quality.py --diagnose  # Post-LN probes (§2.5)')
    if investigation:
        L.append(f"python benchmarks/investigate.py       # one factor at a time (§2.6), "
                 f"{(investigation.get('elapsed_s', 0) + investigation.get('elapsed_s_previous', 0)) / 60:.0f} min")
    L.append('python benchmarks/report.py            # this file')
    L.append('# fast variants: --quick (overhead < 1 min, quality < 5 min); --smoke (tests/test_benchmarks.py)')
    L.append('```')
    L.append('')
    if overhead:
        if overhead.get('mode') != 'full':
            L.append(f"*Overhead results are from a `{overhead['mode']}` run.*")
            L.append('')
        L += overhead_section(overhead)
    else:
        L += ['## 1. Overhead', '', 'Not run yet: `python benchmarks/overhead.py`.', '']
    if quality:
        if quality.get('mode') != 'full':
            L.append(f"*Quality results are from a `{quality['mode']}` run: far too short to compare with the paper.*")
            L.append('')
        L += quality_section(quality)
        if diagnostics:
            L += diagnostics_section(diagnostics, quality)
        if investigation:
            L += investigation_section(investigation, diagnostics)
        L += discussion(quality, diagnostics, investigation)
        L += diagnostics_discussion(diagnostics, quality)
    else:
        L += ['## 2. Quality', '', 'Not run yet: `python benchmarks/quality.py`.', '']
    return '\n'.join(L).rstrip() + '\n'


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--overhead', default=str(RESULTS / 'overhead.json'))
    p.add_argument('--quality', default=str(RESULTS / 'quality.json'))
    p.add_argument('--diagnostics', default=None, help='default: diagnostics.json beside --quality')
    p.add_argument('--investigation', default=None, help='default: investigation.json beside --quality')
    p.add_argument('--out', default=str(ROOT / 'benchmarks' / 'RESULTS.md'))
    args = p.parse_args(argv)
    load = lambda path: json.loads(Path(path).read_text()) if Path(path).is_file() else None  # noqa: E731
    diag = args.diagnostics or str(Path(args.quality).parent / 'diagnostics.json')
    inv = args.investigation or str(Path(args.quality).parent / 'investigation.json')
    text = render(load(args.overhead), load(args.quality), load(diag), load(inv))
    Path(args.out).write_text(text)
    print(f'wrote {args.out}')
    return text


if __name__ == '__main__':
    sys.exit(0 if main() else 1)
