"""A real `mlflow server` process on loopback, for tests that must talk to a tracking server."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

STARTUP_TIMEOUT_S = 90.0  # first start migrates a fresh SQLite schema: ~10 s on 2 cores


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Poll `url` until the server answers; fail early, with its log, if the process died.
    Shared by the tracking server (`/health`) and `mlflow models serve` (`/ping`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:  # URLError, HTTPError, refused: not up yet
            time.sleep(0.3)
    raise RuntimeError(f"server not up at {url} after {timeout_s} s:\n{log.read_text()}")


def wait_healthy(
    uri: str, proc: subprocess.Popen, log: Path, timeout_s: float = STARTUP_TIMEOUT_S
) -> None:
    """Poll `<uri>/health` (the one path a login does not guard) until the server answers."""
    wait_http(f"{uri}/health", proc, log, timeout_s)


@contextlib.contextmanager
def running_mlflow_server(tmp_dir: str | Path, port: int | None = None) -> Iterator[str]:
    """Start `mlflow server` (SQLite backend, proxied artifacts under tmp_dir) on `port` (a
    free loopback port by default); yield its `http://127.0.0.1:<port>` URI; stop it on
    exit. The same tmp_dir and port start the same server again (an outage's end)."""
    tmp = Path(tmp_dir)
    tmp.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    uri = f"http://127.0.0.1:{port}"
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    command = [
        str(mlflow_cli),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",  # the default 4 workers would crowd a 2-core machine
        "--backend-store-uri",
        f"sqlite:///{(tmp / 'server.db').resolve()}",
        "--artifacts-destination",
        str((tmp / "server-artifacts").resolve()),
    ]
    log = tmp / "mlflow-server.log"
    with log.open("w") as log_file:
        proc = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_healthy(uri, proc, log)
        yield uri
    finally:
        stop_server(proc)


def stop_server(proc: subprocess.Popen) -> None:
    """Stop the server and its uvicorn worker: they share the session started for them."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
