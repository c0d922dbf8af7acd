"""Process handling the kill / restart tests share: start a run in its own session, wait for it, SIGKILL
its whole process group at a chosen point, unlink the shared memory the killed processes had mapped,
and the `reaper` fixture that kills what a failed test leaves running."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

__all__ = ['start_in_session', 'finish', 'shm_mapped', 'kill_group_when', 'unlink_shm', 'reaper']


def start_in_session(cmd, log: Path, env: dict, cwd: Path) -> subprocess.Popen:
    # A new session: the launcher and every rank share one process group we can kill at once.
    return subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=open(log, 'w'), stderr=subprocess.STDOUT, start_new_session=True
    )


def finish(proc: subprocess.Popen, log: Path, timeout: float = 420) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert rc == 0, f'exit {rc}\n{log.read_text()[-6000:]}'


def shm_mapped(procs) -> set[str]:
    paths = set()
    for p in procs:
        try:
            paths |= {m.path for m in p.memory_maps(grouped=True) if m.path.startswith('/dev/shm/')}
            paths |= {f.path for f in p.open_files() if f.path.startswith('/dev/shm/')}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return paths


def kill_group_when(proc: subprocess.Popen, ready, log: Path, timeout: float = 300) -> dict:
    """Poll until `ready()`; then SIGKILL the whole process group. Returns what was killed."""
    t0 = time.time()
    while not ready():
        assert proc.poll() is None, (
            f'the run ended (rc {proc.returncode}) before it could be killed:\n' + log.read_text()[-4000:]
        )
        assert time.time() - t0 < timeout, 'timed out waiting for the kill point'
        time.sleep(0.01)
    assert proc.poll() is None, 'the run ended before it could be killed'
    members = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    shm = shm_mapped(members)
    # The launcher's group, and the groups of ranks a launcher put in sessions of their own (torchrun
    # starts every worker with start_new_session=True; the composer launcher keeps them in its group).
    groups = {proc.pid}
    for p in members:
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(p.pid))
    for g in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(g, signal.SIGKILL)
    proc.wait(timeout=60)
    gone, alive = psutil.wait_procs(members, timeout=10)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f'processes survived the kill: {alive}'
    return {'killed': len(members), 'groups': len(groups), 'shm': shm}


def unlink_shm(paths) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


@pytest.fixture
def reaper():
    """Runs a test leaves behind when it fails are killed, every process of them."""
    procs = []
    yield procs.append
    for proc in procs:
        if proc.poll() is None:
            kill_group_when(proc, lambda: True, Path(os.devnull))
