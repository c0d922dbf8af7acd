"""Keeps benchmarks/gpu_check.py runnable: its --smoke mode on CPU (tiny model, 3 steps, no compile),
plus the recompile-counting path with the cheap `eager` compile backend."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path, *extra):
    env = {**os.environ, 'OUT': str(tmp_path), 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}
    proc = subprocess.run(
        [sys.executable, '-m', 'benchmarks.gpu_check', '--smoke', *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp_path / 'gpu_check.json').read_text()), proc.stdout


def test_gpu_check_smoke(tmp_path):
    res, stdout = _run(tmp_path)
    assert res['status'] == 'ok'
    assert not res['env']['composer_imported']  # the check must run where Composer is absent
    eager = res['eager']
    for name in ('off', 'hook', 'gemm'):  # ProRes off, and on with each mechanism
        assert eager[name]['timed_steps'] == 3 and eager[name]['tokens_per_s'] > 0
    assert set(eager['step_time_ratio']) == {'hook', 'gemm'} and all(r > 0 for r in eager['step_time_ratio'].values())
    assert res['deepspeed']['status'] == 'skipped'
    assert 'gemm/off step-time ratio' in stdout and 'hook/off step-time ratio' in stdout


def test_gpu_check_counts_no_recompile_on_alpha_update(tmp_path):
    res, _ = _run(tmp_path, '--compile', 'blocks', '--backend', 'eager')
    comp = res['compiled']
    assert comp['compile']['gemm']['graphs'] == 1  # both blocks share one graph, ProRes included
    # the hook model's blocks trace to the same graph as the gemm model's (linear(x) * α_buffer): dynamo may
    # reuse it, so 0 or 1 new graphs
    assert comp['compile']['hook']['graphs'] <= 1
    assert comp['graphs_compiled_during_timed_steps'] == 0  # α changed at every one of those steps
