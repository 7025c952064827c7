"""deploy/ and the image: the definitions parse, carry the security settings, and the tracking
server boots the way deploy/tracking defines it, on a real PostgreSQL, behind a login; a
training run logs and registers through that login, and a READ user cannot move @champion."""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow_server import free_port, stop_server, wait_healthy
from tiny_run import tiny_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
KUBERAY = DEPLOY / "kuberay"
TRACKING = DEPLOY / "tracking"
# The one image every cluster definition runs (built from ./Dockerfile, see deploy/README.md).
IMAGE = "registry.example.com/jlstm:0.1.0"
# The cluster-YAML test calls Ray's internal config helpers (prepare_config, validate_config):
# they are not a public API, so it is pinned to the Ray it was written against. On a Ray
# upgrade, re-check those helpers and the launcher schema, then move this pin with the image's.
RAY_VERSION_TESTED = "2.60.0"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
SERVER_STARTUP_TIMEOUT_S = 300.0
# Each login check is a deliberate PBKDF2 hash: seconds per request on a loaded machine.
REQUEST_TIMEOUT_S = 120.0


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", (REPO / "Dockerfile").read_text(), re.M)
    assert match, f"Dockerfile has no ARG {name}=..."
    return match.group(1)


# --- the image ---------------------------------------------------------------------------


def test_image_is_rays_gpu_image_for_the_pinned_versions() -> None:
    import ray

    dockerfile = (REPO / "Dockerfile").read_text()
    assert "FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-gpu" in dockerfile
    assert _dockerfile_arg("RAY_VERSION") == ray.__version__
    assert _dockerfile_arg("PYTHON_TAG") == f"py{sys.version_info.major}{sys.version_info.minor}"


def test_image_installs_from_pyproject_and_the_makefile_pins_only() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    # The Dockerfile reads TORCH_PINS with this sed expression; it must find the Makefile's.
    assert "sed -n 's/^TORCH_PINS := //p' Makefile" in dockerfile
    pins = re.search(r"^TORCH_PINS := (.+)$", (REPO / "Makefile").read_text(), re.M)
    assert pins and pins.group(1).split() == ["torch==2.14.1", "torchvision==0.29.1"]
    # No package is named a second time: none of pyproject's dependencies, and no `==` pin.
    with (REPO / "pyproject.toml").open("rb") as f:
        import tomllib

        deps = tomllib.load(f)["project"]["dependencies"]
    names = {re.split(r"[<>=\[;! ]", dep, maxsplit=1)[0].lower() for dep in deps}
    run_lines = " ".join(line for line in dockerfile.splitlines() if not line.startswith("#"))
    for name in names - {"ray"}:  # ray: only the base image's own version, read from it
        assert not re.search(rf"\b{re.escape(name)}\b", run_lines), name
    assert "==" not in run_lines.replace('f"ray=={ray.__version__}"', "")
    assert "pip install --no-cache-dir --constraint /tmp/ray-constraint.txt . " in dockerfile


def test_dockerignore_admits_only_sources() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "an allow-list: everything is excluded first"
    admitted = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert {"pyproject.toml", "README.md", "Makefile", "configs"} <= admitted
    assert not admitted & {"deploy", "tests", ".venv", "runs", "data", ".git"}


# --- the Ray cluster launcher ------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_config() -> dict[str, Any]:
    """deploy/ray-cluster.yaml after Ray's own preparation and schema validation."""
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    assert ray.__version__ == RAY_VERSION_TESTED, (
        f"this test relies on Ray {RAY_VERSION_TESTED}'s internal launcher helpers; "
        f"Ray is {ray.__version__}: re-check them and move RAY_VERSION_TESTED"
    )
    config = prepare_config(_load(DEPLOY / "ray-cluster.yaml"))
    validate_config(config)  # the launcher's JSON schema and its own consistency checks
    return config


def test_cluster_runs_the_image_with_token_auth(cluster_config: dict[str, Any]) -> None:
    docker = cluster_config["docker"]
    assert docker["image"] == IMAGE
    assert "--env RAY_AUTH_MODE=token" in docker["run_options"]
    start = cluster_config["head_start_ray_commands"] + cluster_config["worker_start_ray_commands"]
    ray_starts = [cmd for cmd in start if "ray start" in cmd]
    assert len(ray_starts) == 2
    assert all("RAY_AUTH_MODE=token" in cmd for cmd in ray_starts)
    # The token ships from the laptop's default path to the nodes' default path.
    assert cluster_config["file_mounts"]["~/.ray"] == "~/.ray"
    # Nothing installs packages on the nodes: the image has them.
    assert not any(
        "pip" in cmd
        for key in ("setup_commands", "head_setup_commands", "worker_setup_commands")
        for cmd in cluster_config[key]
    )


def test_head_autoscales_and_keeps_the_dashboard_on_loopback(
    cluster_config: dict[str, Any],
) -> None:
    (head_start,) = [c for c in cluster_config["head_start_ray_commands"] if "ray start" in c]
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in json.dumps(cluster_config["head_start_ray_commands"])


def test_cluster_has_gpu_and_cpu_workers(cluster_config: dict[str, Any]) -> None:
    types = cluster_config["available_node_types"]
    workers = {name: t for name, t in types.items() if name != cluster_config["head_node_type"]}
    gpu = [n for n, t in workers.items() if t["node_config"]["InstanceType"].startswith(("g", "p"))]
    cpu = [n for n in workers if n not in gpu]
    assert gpu and cpu, workers
    for node_type in types.values():
        node_config = node_type["node_config"]
        assert node_config["ImageId"].startswith("resolve:ssm:/aws/service/deeplearning/")
        # Checkpoints go to S3: every node has an instance profile for it, no keys.
        assert node_config["IamInstanceProfile"]["Name"]
    assert all(t["max_workers"] > 0 for t in workers.values())


def test_launcher_has_a_spot_gpu_group_beside_the_on_demand_one(
    cluster_config: dict[str, Any],
) -> None:
    types = cluster_config["available_node_types"]
    gpu = {n: t for n, t in types.items() if t["node_config"]["InstanceType"].startswith("g")}
    spot = [n for n, t in gpu.items()
            if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    assert spot and len(spot) < len(gpu), gpu  # spot beside on-demand
    assert cluster_config["max_workers"] >= sum(t["max_workers"] for n, t in types.items()
                                                if n != cluster_config["head_node_type"])


# --- KubeRay -----------------------------------------------------------------------------


def _manifests() -> list[tuple[Path, dict[str, Any]]]:
    docs = [
        (path, doc)
        for path in sorted(KUBERAY.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
    ]
    assert docs
    return docs


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _pod_specs(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


def test_manifests_are_a_rayjob_a_raycluster_and_the_data_claim() -> None:
    kinds = sorted(doc["kind"] for _, doc in _manifests())
    assert kinds == ["PersistentVolumeClaim", "RayCluster", "RayJob"]
    for _, doc in _manifests():
        assert doc["apiVersion"] in ("ray.io/v1", "v1")
        assert doc["metadata"]["name"] and doc["metadata"]["namespace"] == "jlstm"


def test_rayjob_is_bounded_and_cleans_up() -> None:
    (job,) = [doc for _, doc in _manifests() if doc["kind"] == "RayJob"]
    spec = job["spec"]
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["backoffLimit"] >= 0
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    # Checkpoints on object storage, the training over all three splits.
    assert "--set cluster.storage_path=s3://" in spec["entrypoint"]
    assert "--splits 1,2,3" in spec["entrypoint"]


def test_ray_clusters_have_token_auth_the_image_data_and_mlflow_secret() -> None:
    import ray

    (claim,) = [doc for _, doc in _manifests() if doc["kind"] == "PersistentVolumeClaim"]
    clusters = [_cluster_spec(doc) for _, doc in _manifests() if doc["kind"] != claim["kind"]]
    assert len(clusters) == 2
    for cluster in clusters:
        assert cluster["authOptions"] == {"mode": "token"}
        assert cluster["rayVersion"] == ray.__version__  # KubeRay needs >= 2.52 for tokens
        for pod in _pod_specs(cluster):
            claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
            assert claims == {claim["metadata"]["name"]}
            for container in pod["containers"]:
                assert container["image"] == IMAGE
                assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
                env = {e["name"]: e for e in container["env"]}
                for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                    assert "value" not in env[name], f"{name} must come from a Secret"
                    assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "jlstm-mlflow"


def test_manifest_env_holds_no_literal_secret() -> None:
    for path, doc in _manifests():
        if doc["kind"] == "PersistentVolumeClaim":
            continue
        for pod in _pod_specs(_cluster_spec(doc)):
            for container in pod["containers"]:
                for env in container.get("env", []):
                    if re.search(r"PASSWORD|TOKEN|SECRET|KEY", env["name"]):
                        assert "valueFrom" in env, f"{path.name}: {env['name']} inline"
        assert doc["kind"] != "Secret", f"{path.name}: Secrets are made with kubectl, not here"


# --- no secret in any deploy file --------------------------------------------------------

# `NAME: value` / `NAME=value` where NAME mentions a secret and the value is a literal rather
# than a reference ($VAR, ${VAR}, <placeholder>) or empty.
_SECRET_ASSIGNMENT = re.compile(
    r"(?<![{\w])(?P<key>\w*(?:password|passwd|secret|token)\w*)"
    r"[ \t]*[=:][ \t]*[\"']?(?P<value>[^\s\"'}]*)",
    re.I,
)
_URI_WITH_PASSWORD = re.compile(r"\w+://[^/\s:@]+:[^/\s@]+@")
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


def _committed_deploy_files() -> list[Path]:
    files = [REPO / "Dockerfile", REPO / ".dockerignore"]
    files += [p for p in DEPLOY.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    # A filled-in deploy/tracking/.env is the user's and git ignores it; everything else counts.
    ignored = subprocess.run(
        ["git", "check-ignore", "--stdin"], input="\n".join(map(str, files)),
        capture_output=True, text=True, cwd=REPO,
    ).stdout.split()
    return [p for p in files if str(p) not in ignored]


def test_filled_in_secrets_file_is_ignored_by_git() -> None:
    out = subprocess.run(
        ["git", "check-ignore", "-q", "deploy/tracking/.env"], cwd=REPO, check=False
    )
    assert out.returncode == 0


@pytest.mark.parametrize("path", _committed_deploy_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_secret_value_in_deploy_files(path: Path) -> None:
    text = path.read_text()
    # Comment lines are prose ("the cluster's Ray token: `ray get-auth-token`"), not settings;
    # in Markdown only the indented command blocks are.
    lines = text.splitlines()
    if path.suffix == ".md":
        lines = [line for line in lines if line.startswith("    ")]
    settings = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    for match in _SECRET_ASSIGNMENT.finditer(settings):
        value = match.group("value")
        assert not value or value[0] in "$<{?%" or value.lower() in {"token", "disabled"}, (
            f"{path.name}: {match.group(0)!r}"
        )
    assert not _URI_WITH_PASSWORD.search(text), path.name
    assert not _AWS_KEY_ID.search(text), path.name


# --- the tracking server, statically ------------------------------------------------------


def test_tracking_server_definition_is_locked_down() -> None:
    serve = (TRACKING / "serve.sh").read_text()
    command = serve[serve.index("exec mlflow server") :]
    assert "--app-name basic-auth" in command
    assert '--allowed-hosts "$MLFLOW_ALLOWED_HOSTS"' in command
    assert "--serve-artifacts" in command and "--artifacts-destination" in command
    assert "--backend-store-uri" not in command  # mlflow reads MLFLOW_BACKEND_STORE_URI itself
    assert '--host "${MLFLOW_HOST:-127.0.0.1}"' in command

    import configparser

    ini = configparser.ConfigParser()
    ini.read(TRACKING / "basic_auth.ini")
    assert ini["mlflow"]["default_permission"] == "READ"  # not EDIT: others' runs are read-only
    assert "admin_password" not in ini["mlflow"]  # from MLFLOW_AUTH_ADMIN_PASSWORD
    assert ini["mlflow"]["database_uri"].startswith("postgresql+psycopg:///")


def test_compose_starts_postgres_and_mlflow_with_secrets_from_env_file() -> None:
    compose = _load(TRACKING / "compose.yaml")
    postgres, mlflow = compose["services"]["postgres"], compose["services"]["mlflow"]
    assert "ports" not in postgres, "PostgreSQL is reached on compose's network only"
    assert postgres["environment"]["POSTGRES_PASSWORD"].startswith("${PGPASSWORD:?")
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert mlflow["env_file"] == [".env"]
    env = mlflow["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg:///")
    assert "mlflow.internal:5000" in env["MLFLOW_ALLOWED_HOSTS"].split(",")
    assert mlflow["ports"] == ["${MLFLOW_PUBLISH:-127.0.0.1}:5000:5000"]
    # What .env must provide is exactly what the example lists.
    example = (TRACKING / ".env.example").read_text()
    for name in ("PGPASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert re.search(rf"^{name}=$", example, re.M), name


def test_cluster_definitions_name_the_tracking_servers_allowed_host() -> None:
    allowed = _load(TRACKING / "compose.yaml")["services"]["mlflow"]["environment"][
        "MLFLOW_ALLOWED_HOSTS"
    ].split(",")
    uris = [_load(DEPLOY / "runtime_env.yaml")["env_vars"]["MLFLOW_TRACKING_URI"]]
    for _, doc in _manifests():
        if doc["kind"] != "PersistentVolumeClaim":
            for pod in _pod_specs(_cluster_spec(doc)):
                for container in pod["containers"]:
                    env = {e["name"]: e.get("value") for e in container["env"]}
                    uris.append(env["MLFLOW_TRACKING_URI"])
    for uri in uris:
        assert uri.removeprefix("http://") in allowed, uri


# --- the tracking server, running: real PostgreSQL, basic-auth, loopback only ---------------


def _as_unprivileged() -> dict[str, Any]:
    """PostgreSQL refuses to run as root (the tests do): run its binaries as nobody then."""
    return {"user": "nobody", "group": "nogroup"} if os.geteuid() == 0 else {}


def _run(command: list[Any], **kwargs: Any) -> None:
    """Run a PostgreSQL tool; on failure, show what it said."""
    out = subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)
    assert out.returncode == 0, f"{command[0]} failed:\n{out.stdout}\n{out.stderr}"


@pytest.fixture(scope="module")
def postgres() -> Iterator[dict[str, str]]:
    """A throwaway PostgreSQL 15 on 127.0.0.1 (and a socket in its own folder), with the
    databases deploy/tracking expects; yields the libpq environment that reaches it."""
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"PostgreSQL 15 binaries not found in {PG_BIN} (Debian: postgresql-15)")
    # Not under pytest's root-only tmp folder: the unprivileged server must reach its files.
    root = Path(tempfile.mkdtemp(prefix="jlstm-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    password = secrets.token_urlsafe(18)
    pwfile = root / "pwfile"
    pwfile.write_text(password)
    run_as = _as_unprivileged()
    if run_as:
        for path in (root, sock, pwfile):
            shutil.chown(path, **run_as)
    port = free_port()
    _run(
        [PG_BIN / "initdb", "-D", data, "-U", "mlflow", f"--pwfile={pwfile}",
         "--auth=scram-sha-256", "--encoding=UTF8"],
        cwd=root, **run_as,
    )
    pwfile.unlink()
    # Loopback TCP and a socket in our own folder: nothing beyond this machine can connect.
    _run(
        [PG_BIN / "pg_ctl", "-D", data, "-l", root / "postgres.log", "-w", "-t", "60", "start",
         "-o", f"-h 127.0.0.1 -p {port} -k {sock}"],
        cwd=root, **run_as,
    )
    env = {"PGHOST": "127.0.0.1", "PGPORT": str(port), "PGUSER": "mlflow", "PGPASSWORD": password}
    try:
        psql_env = os.environ | env
        _run([PG_BIN / "createdb", "mlflow"], env=psql_env)
        # The same script the postgres image runs on a fresh volume (compose.yaml).
        _run(
            [PG_BIN / "psql", "-v", "ON_ERROR_STOP=1", "-q", "-d", "mlflow",
             "-f", TRACKING / "initdb.sql"],
            env=psql_env,
        )
        yield env
    finally:
        subprocess.run(
            [PG_BIN / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop"],
            check=False, capture_output=True, cwd=root, **run_as,
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def tracking_server(
    postgres: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """deploy/tracking/serve.sh on loopback, everything from the environment as compose gives
    it; yields the URI and the admin's password."""
    tmp = tmp_path_factory.mktemp("tracking")
    port = free_port()
    admin_password = secrets.token_urlsafe(18)
    env = os.environ | postgres | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_BACKEND_STORE_URI": "postgresql+psycopg:///mlflow",
        "MLFLOW_ARTIFACTS_DESTINATION": str(tmp / "artifacts"),
        "MLFLOW_ALLOWED_HOSTS": f"127.0.0.1:{port}",
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        "MLFLOW_HOST": "127.0.0.1",
        "MLFLOW_PORT": str(port),
        "MLFLOW_WORKERS": "1",  # a 2-core machine
    }
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(key, None)
    log = tmp / "server.log"
    with log.open("w") as log_file:
        proc = subprocess.Popen(
            ["bash", TRACKING / "serve.sh"], env=env, cwd=tmp,
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        # Longer than other servers' wait: the first start migrates two PostgreSQL schemas.
        wait_healthy(uri, proc, log, SERVER_STARTUP_TIMEOUT_S)
        yield {
            "uri": uri, "admin_password": admin_password, "log": str(log),
            "artifacts": env["MLFLOW_ARTIFACTS_DESTINATION"],
        }
    finally:
        stop_server(proc)


def _request(
    url: str, auth: tuple[str, str] | None = None, body: dict | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    if body is not None:
        request.data = json.dumps(body).encode()
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


SEARCH = "/api/2.0/mlflow/experiments/search?max_results=5"


@pytest.mark.slow
def test_tracking_server_refuses_requests_without_a_valid_login(
    tracking_server: dict[str, str],
) -> None:
    uri, password = tracking_server["uri"], tracking_server["admin_password"]
    assert _request(uri + SEARCH)[0] == 401
    assert _request(uri + SEARCH, auth=("admin", password + "x"))[0] == 401
    assert _request(uri + SEARCH, auth=("nobody", password))[0] == 401
    status, body = _request(uri + SEARCH, auth=("admin", password))
    assert status == 200, body
    # --allowed-hosts: a Host header the deployment does not name is refused.
    status, _ = _request(uri + SEARCH, auth=("admin", password), headers={"Host": "evil.test"})
    assert status == 403


@pytest.mark.slow
def test_tracking_server_stores_in_postgres_and_other_users_only_read(
    tracking_server: dict[str, str], postgres: dict[str, str]
) -> None:
    uri, admin = tracking_server["uri"], ("admin", tracking_server["admin_password"])
    status, body = _request(
        uri + "/api/2.0/mlflow/experiments/create", auth=admin, body={"name": "deploy-test"}
    )
    assert status == 200, body
    experiment_id = json.loads(body)["experiment_id"]

    reader = ("reader", secrets.token_urlsafe(18))
    status, body = _request(
        uri + "/api/2.0/mlflow/users/create", auth=admin,
        body={"username": reader[0], "password": reader[1]},
    )
    assert status == 200, body
    get = f"/api/2.0/mlflow/experiments/get?experiment_id={experiment_id}"
    assert _request(uri + get, auth=reader)[0] == 200  # default_permission READ
    status, _ = _request(
        uri + "/api/2.0/mlflow/experiments/set-experiment-tag", auth=reader,
        body={"experiment_id": experiment_id, "key": "k", "value": "v"},
    )
    assert status == 403, "READ must not write"

    # Both the tracking store and the auth app's users live in PostgreSQL.
    import psycopg

    with psycopg.connect(dbname="mlflow", **_libpq(postgres)) as conn, conn.cursor() as cur:
        cur.execute("SELECT name FROM experiments WHERE experiment_id = %s", (experiment_id,))
        assert cur.fetchone() == ("deploy-test",)
    with psycopg.connect(dbname="mlflow_auth", **_libpq(postgres)) as conn, conn.cursor() as cur:
        # Other tests of this module add their own users: look at this test's two only.
        cur.execute(
            "SELECT username, is_admin FROM users WHERE username IN ('admin', 'reader') "
            "ORDER BY username"
        )
        assert cur.fetchall() == [("admin", True), ("reader", False)]


def _libpq(env: dict[str, str]) -> dict[str, str]:
    return {
        "host": env["PGHOST"], "port": env["PGPORT"],
        "user": env["PGUSER"], "password": env["PGPASSWORD"],
    }


# --- a training run against that server, and who may change the registry ---------------------

TRAINER = "jlstm-trainer"  # the account deploy/README.md step 3 creates for training jobs
RUN_NAME = "deploy-train"
MODEL_NAME = "jlstm-ucf101"  # registry.registered_model_name("ucf101"), the tiny config's dataset
FRAME_INTERVAL = 3  # the tiny config's data.frame_interval, carried in the logged model
# Measured on the shared 2-core machine: 8 min at load 6, 15 min at load 45. Most of it is
# MLflow requests: each one checks the password's scrypt hash again, and the run logs its ~75
# params one request each.
TRAIN_TIMEOUT_S = 1500
SERVER_TEST_TIMEOUT_S = TRAIN_TIMEOUT_S + SERVER_STARTUP_TIMEOUT_S + 120


def _pg_rows(postgres: dict[str, str], dbname: str, query: str, *args: Any) -> list[tuple]:
    import psycopg

    with psycopg.connect(dbname=dbname, **_libpq(postgres)) as conn, conn.cursor() as cur:
        cur.execute(query, args)
        return cur.fetchall()


@pytest.fixture(scope="module")
def trained_on_server(
    tracking_server: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """`jlstm train` (tiny config, 1 epoch) in a subprocess as the trainer account, its
    credentials in the environment only; returns the trainer's password and the CLI's output."""
    from data_shards.synth import synthesize_dataset

    uri, admin = tracking_server["uri"], ("admin", tracking_server["admin_password"])
    trainer_password = secrets.token_urlsafe(18)
    status, body = _request(
        uri + "/api/2.0/mlflow/users/create", auth=admin,
        body={"username": TRAINER, "password": trainer_password},
    )
    assert status == 200, body

    tmp = tmp_path_factory.mktemp("train")
    dataset = synthesize_dataset(
        tmp / "videos", layout="ucf101", classes=2, videos_per_class=6, seed=3,
        frame_size=64, num_frames=16,
    )
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(
        dataset, tmp / "ray", RUN_NAME, train={"epochs": 1}, cluster={"num_workers": 1},
    )))
    home = tmp / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))} | {
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_TRACKING_USERNAME": TRAINER,
        "MLFLOW_TRACKING_PASSWORD": trainer_password,
        # An empty HOME: no ~/.mlflow/credentials of this machine can be what logs in, and the
        # local Ray the CLI starts keeps its token out of the real ~/.ray.
        "HOME": str(home),
    }
    # No RAY_ADDRESS: the CLI starts its own local Ray, as on a laptop. Its Train workers are
    # that Ray's children and inherit the login, which their system-metrics monitor needs.
    out = subprocess.run(
        [sys.executable, "-m", "jlstm", "train", "--config", str(config)],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S,
    )
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-5000:])
    return {"trainer_password": trainer_password, "stdout": out.stdout}


@pytest.mark.slow
@pytest.mark.timeout(SERVER_TEST_TIMEOUT_S)
def test_training_with_a_login_stores_run_model_and_champion_in_postgres(
    trained_on_server: dict[str, str], tracking_server: dict[str, str],
    postgres: dict[str, str],
) -> None:
    assert "now champion" in trained_on_server["stdout"], trained_on_server["stdout"]
    rows = _pg_rows(
        postgres, "mlflow",
        "SELECT r.run_uuid, r.status FROM runs r JOIN experiments e USING (experiment_id) "
        "WHERE r.name = %s AND e.name = 'test-train'", RUN_NAME,
    )
    assert len(rows) == 1 and rows[0][1] == "FINISHED", rows
    run_id = rows[0][0]
    params = dict(_pg_rows(
        postgres, "mlflow", "SELECT key, value FROM params WHERE run_uuid = %s", run_id
    ))
    assert params["train.epochs"] == "1" and params["data.dataset"] == "ucf101", params
    metrics = _pg_rows(
        postgres, "mlflow",
        "SELECT key, step FROM metrics WHERE run_uuid = %s AND key IN ('epoch', 'loss_total')",
        run_id,
    )
    assert sorted(metrics) == [("epoch", 1), ("loss_total", 1)]
    # The Train worker's system-metrics monitor logged through the same login (a worker
    # without it would be refused, and no system/ metric would be stored).
    (system,) = _pg_rows(
        postgres, "mlflow",
        "SELECT count(*) FROM metrics WHERE run_uuid = %s AND key LIKE 'system/node0/%%'",
        run_id,
    )
    assert system[0] > 0, "no system metrics from the training worker"

    # The registry: version 1 from this run, READY, and the champion alias on it.
    assert _pg_rows(
        postgres, "mlflow",
        "SELECT version, run_id, status FROM model_versions WHERE name = %s", MODEL_NAME,
    ) == [(1, run_id, "READY")]
    assert _pg_rows(
        postgres, "mlflow",
        "SELECT alias, version FROM registered_model_aliases WHERE name = %s", MODEL_NAME,
    ) == [("champion", 1)]
    # The model's files went through the server to its artifact destination (the clients
    # hold no storage credentials).
    assert list(Path(tracking_server["artifacts"]).rglob("state_dict.pt"))

    # The auth app (also in PostgreSQL) made the trainer, not the admin, the model's owner:
    # the one non-admin account that may move @champion (deploy/README.md, security model).
    owners = _pg_rows(
        postgres, "mlflow_auth",
        "SELECT u.username, p.resource_type FROM users u "
        "JOIN user_role_assignments a ON a.user_id = u.id "
        "JOIN role_permissions p ON p.role_id = a.role_id "
        "WHERE p.resource_pattern = %s AND p.permission = 'MANAGE'",
        MODEL_NAME,
    )
    assert owners == [(TRAINER, "registered_model")]


@pytest.mark.slow
@pytest.mark.timeout(SERVER_TEST_TIMEOUT_S)
def test_a_read_user_loads_the_champion_but_cannot_move_it(
    trained_on_server: dict[str, str], tracking_server: dict[str, str],
    postgres: dict[str, str], monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest,
) -> None:
    import mlflow
    import mlflow.server
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from orchestration import registry

    uri = tracking_server["uri"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # An earlier test's `tracking.connect()` may have set MLflow's process-wide URI, which
    # wins over the environment: point it here for this test, and back afterwards.
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    request.addfinalizer(lambda: mlflow.set_tracking_uri(previous))

    def log_in(username: str, password: str) -> None:
        # MLflow reads the login from the environment on every request.
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", username)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)

    reader = ("champion-reader", secrets.token_urlsafe(18))
    log_in("admin", tracking_server["admin_password"])
    auth = mlflow.server.get_app_client("basic-auth", tracking_uri=uri)
    auth.create_user(*reader)
    auth.grant_user_permission(reader[0], "registered_model", MODEL_NAME, "READ")
    granted = auth.get_user_permission(reader[0], "registered_model", MODEL_NAME)
    assert granted.permission == "READ"

    log_in(*reader)
    loaded = registry.load_model(f"models:/{MODEL_NAME}@champion")
    assert len(loaded.class_names) == 2 and loaded.frame_interval == FRAME_INTERVAL
    assert loaded.model_cfg.frame_size == 64

    client = MlflowClient(uri)
    for move in (
        lambda: client.set_registered_model_alias(MODEL_NAME, "champion", "1"),
        lambda: client.delete_registered_model_alias(MODEL_NAME, "champion"),
    ):
        with pytest.raises(MlflowException) as refused:
            move()
        assert refused.value.error_code == "PERMISSION_DENIED", refused.value
        assert refused.value.get_http_status_code() == 403
    assert _pg_rows(
        postgres, "mlflow",
        "SELECT alias, version FROM registered_model_aliases WHERE name = %s", MODEL_NAME,
    ) == [("champion", 1)]

    # The same request from the model's owner goes through: the refusal above is the
    # permission, not a malformed call.
    log_in(TRAINER, trained_on_server["trainer_password"])
    client.set_registered_model_alias(MODEL_NAME, "champion", "1")


def test_rayjob_is_elastic_over_a_spot_group_with_an_on_demand_floor() -> None:
    """The RayJob trains on 4 GPUs when its spot group has them and on the on-demand ones
    when it has none: its --set values plan as an elastic run whose floor the on-demand
    group holds and whose top both groups hold."""
    from orchestration.config import load_config

    (job,) = [doc for _, doc in _manifests() if doc["kind"] == "RayJob"]
    entry = job["spec"]["entrypoint"].split()
    overrides = [entry[i + 1] for i, word in enumerate(entry) if word == "--set"]
    cfg = load_config(REPO / "configs" / "ucf101_late_fusion.yaml", overrides)
    assert cfg.cluster.elastic
    groups = {g["groupName"]: g for g in _cluster_spec(job)["workerGroupSpecs"]}
    spot = [g for g in groups.values()
            if "cloud.google.com/gke-spot" in g["template"]["spec"].get("nodeSelector", {})]
    assert len(spot) == 1
    on_demand = groups["gpu"]
    assert on_demand["maxReplicas"] >= cfg.cluster.fewest_workers
    assert on_demand["maxReplicas"] + spot[0]["maxReplicas"] >= cfg.cluster.num_workers
    (cluster,) = [doc for _, doc in _manifests() if doc["kind"] == "RayCluster"]
    assert any("nodeSelector" in g["template"]["spec"] for g in cluster["spec"]["workerGroupSpecs"])
