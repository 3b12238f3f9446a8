"""Stopping a process and everything it started, by pid: the one place that does it.

A cloud (`fedge cloud serve`) starts Ray's GCS, raylet and workers as its descendants; stopping
only the cloud leaves them running. Every caller (tests, the phones simulation, the Ray reaper)
needs the same steps: signal the whole tree, give it a grace period, then SIGKILL what lingers and
wait for it, so no process survives the call.
"""

from __future__ import annotations

import signal

import psutil


def tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants ([] if it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_processes(procs: list[psutil.Process], grace_s: float = 15.0, hard: bool = False) -> list[psutil.Process]:
    """SIGTERM (SIGKILL when `hard`) each process, SIGKILL those alive after `grace_s`, wait for them.

    Returns the processes that were still alive after the grace period (now killed)."""
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL if hard else signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=0 if hard else grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)
    return alive


def stop_tree(pid: int, grace_s: float = 15.0, hard: bool = False) -> list[psutil.Process]:
    """Stop `pid` and every descendant it has now (see `stop_processes`)."""
    return stop_processes(tree(pid), grace_s, hard)
