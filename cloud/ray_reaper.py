"""Leaves no Ray process behind when `fedge cloud serve` dies without cleaning up (SIGKILL, OOM).

`ray.init()` starts the GCS, the raylet and the workers as descendants of the serving process, and
they outlive it when it is killed outright: nothing runs its `ray.shutdown()`. A reaper process
(its own session, so a signal to the server's process group does not take it along) watches the
server's pid, remembers every descendant it has seen (pid and start time, so a reused pid is never
hit), and when the server is gone terminates those still alive, then kills what ignores SIGTERM.

    python -m fedge.cloud.ray_reaper <server pid>
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

from fedge.processes import stop_processes

POLL_S = 0.5


def start_reaper(parent_pid: int | None = None) -> subprocess.Popen:
    """Start the reaper for `parent_pid` (default: this process)."""
    pid = os.getpid() if parent_pid is None else parent_pid
    return subprocess.Popen([sys.executable, "-m", "fedge.cloud.ray_reaper", str(pid)], start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _descendants(root: psutil.Process) -> dict[int, float]:
    seen = {}
    try:
        family = root.children(recursive=True)
    except psutil.Error:
        return seen
    for proc in family:
        try:
            seen[proc.pid] = proc.create_time()
        except psutil.Error:
            pass
    return seen


def _still_ours(tracked: dict[int, float]) -> list[psutil.Process]:
    """Tracked processes still alive with the same start time, and whatever they started since."""
    procs: dict[int, psutil.Process] = {}
    for pid, started in tracked.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() != started or pid == os.getpid():
                continue
            procs[pid] = proc
            for child in proc.children(recursive=True):
                if child.pid != os.getpid():
                    procs[child.pid] = child
        except psutil.Error:
            pass
    return list(procs.values())


def reap(tracked: dict[int, float], grace_s: float = 5.0) -> int:
    """SIGTERM the tracked processes, SIGKILL what is left after `grace_s`; returns how many were alive."""
    procs = _still_ours(tracked)
    stop_processes(procs, grace_s)
    stop_processes(_still_ours(tracked), 0.0, hard=True)  # whatever they started meanwhile
    return len(procs)


def watch(parent_pid: int) -> int:
    try:
        parent = psutil.Process(parent_pid)
        parent_started = parent.create_time()
    except psutil.Error:
        return 0
    tracked: dict[int, float] = {}
    while True:
        try:
            alive = parent.is_running() and parent.create_time() == parent_started \
                and parent.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            alive = False
        if not alive:
            return reap(tracked)
        tracked.update(_descendants(parent))
        tracked.pop(os.getpid(), None)
        time.sleep(POLL_S)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
