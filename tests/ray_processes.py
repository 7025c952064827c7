"""Ray processes a test starts with `ray start --block`, told apart by a HOME of their own."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path


def processes_with_home(home: Path) -> set[int]:
    """Processes whose environment has HOME=home: with a HOME made for one test, exactly
    the processes of the cluster that test started (its workers and job drivers included)."""
    marker = f"HOME={home}".encode()
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            pids.add(int(proc.name))
    return pids


def stop_ray_processes(head: subprocess.Popen, home: Path) -> None:
    """Stop a `ray start --block` process (a head or a node; its own session), then
    whatever of its processes outlived it."""
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
    # Ray's workers and job drivers sit in their own process groups; they exit once their
    # raylet is gone. Give them a moment, then end the stragglers, one by one.
    deadline = time.monotonic() + 30
    while processes_with_home(home) and time.monotonic() < deadline:
        time.sleep(1)
    for pid in processes_with_home(home):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
