"""What every CPU benchmark records beside its numbers: the machine, and an atomic JSON write.

Kept free of Composer and of prores_algo so any benchmark can import it cheaply; torch is imported
only when the machine is described.
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
    return {'platform': platform.platform(), 'processor': platform.processor() or platform.machine(),
            'python': platform.python_version(), 'cpu_count': os.cpu_count(), 'torch': torch.__version__,
            'torch_threads': torch.get_num_threads(), 'loadavg_at_start': load}


def write_json(path: Path, obj: dict, indent: int = 1) -> None:
    """Write via a temp file and rename, so a killed benchmark never leaves half a results file behind."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + '.tmp')
    tmp.write_text(json.dumps(obj, indent=indent) + '\n')
    os.replace(tmp, path)
