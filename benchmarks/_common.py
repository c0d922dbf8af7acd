"""What the CPU benchmarks share: the machine description, an atomic JSON write, and the step-peak
memory measurement (the allocator's profiler events replayed in time order).

Kept free of Composer and of prores_algo so any benchmark can import it cheaply; torch is imported
only inside the functions that need it.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository


def machine_info() -> dict:
    """Platform, CPU count, torch version and threads, and the load average when the run started
    (the ratios are measured against a baseline in the same run, but a loaded machine widens them)."""
    import torch

    try:
        load = os.getloadavg()
    except OSError:  # pragma: no cover  (not on every platform)
        load = None
    return {
        'platform': platform.platform(),
        'processor': platform.processor() or platform.machine(),
        'python': platform.python_version(),
        'cpu_count': os.cpu_count(),
        'torch': torch.__version__,
        'torch_threads': torch.get_num_threads(),
        'loadavg_at_start': load,
    }


def write_json(path: Path, obj: dict, indent: int = 1) -> None:
    """Write via a temp file and rename, so a killed benchmark never leaves half a results file behind."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + '.tmp')
    tmp.write_text(json.dumps(obj, indent=indent) + '\n')
    os.replace(tmp, path)


def peak_bytes_above_start(fn, *args) -> tuple[int, int]:
    """Run `fn(*args)` under the profiler and replay the CPU allocator's `[memory]` events (bytes, time) in
    time order: the largest sum reached is the peak of live tensor bytes above what was live at the start.
    Unlike RSS this does not depend on the C library's caching of freed memory. Returns (peak, events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*args)
    events = sorted(
        (e.start_ns(), i, e.nbytes())
        for i, e in enumerate(prof.profiler.kineto_results.events())
        if e.name() == '[memory]'
    )
    live = peak = 0
    for _, _, n in events:
        live += n
        peak = max(peak, live)
    return peak, len(events)
