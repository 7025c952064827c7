"""A real `mlflow models serve` of a registered model on loopback, and `curl` requests to it."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlflow_server import free_port, stop_server, wait_http

# Loading torch, mlflow and the model in a fresh process: ~15 s on 2 busy cores.
STARTUP_TIMEOUT_S = 120.0
VENV_BIN = Path(sys.executable).parent


def wait_ping(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Poll `<url>/ping` (200 once the model is loaded); fail early if the server exited."""
    wait_http(f"{url}/ping", proc, log, timeout_s)


@contextlib.contextmanager
def serving_model(
    model_uri: str, tracking_uri: str, workdir: Path, env: dict[str, str] | None = None
) -> Iterator[str]:
    """`mlflow models serve -m <model_uri> --env-manager local` on a free loopback port, run
    from `workdir` with the venv's bin first on PATH (MLflow execs `uvicorn` by name) and
    not activated otherwise; yield `http://127.0.0.1:<port>`, stop it and its uvicorn on
    exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        str(VENV_BIN / "mlflow"), "models", "serve", "-m", model_uri,
        "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
    ]
    server_env = {
        **{k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"},
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        **(env or {}),
    }
    log = workdir / "model-server.log"
    with log.open("w") as log_file:
        proc = subprocess.Popen(
            command, cwd=workdir, env=server_env, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,  # the server and its uvicorn: one group to stop
        )
    try:
        wait_ping(url, proc, log, STARTUP_TIMEOUT_S)
        yield url
    finally:
        stop_server(proc)


def curl_invocations(
    url: str, rows: list[dict[str, str]], workdir: Path, params: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """POST `rows` as `dataframe_records` to `<url>/invocations` with curl; the prediction
    rows the server answers."""
    body = workdir / "request.json"
    request: dict[str, Any] = {"dataframe_records": rows}
    if params:
        request["params"] = params
    body.write_text(json.dumps(request))
    out = subprocess.run(
        ["curl", "--silent", "--show-error", "--fail-with-body", "--max-time", "120",
         "-H", "Content-Type: application/json", "--data-binary", f"@{body}",
         f"{url}/invocations"],
        capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    return json.loads(out.stdout)["predictions"]


def video_b64(path: Path) -> str:
    """A video file's bytes in base64, as the served model takes them."""
    return base64.b64encode(path.read_bytes()).decode("ascii")
