"""MLflow tracking: the store runs go to, and one run's lifecycle (found by its run name,
started or resumed, ended FINISHED or FAILED: `tracked_run`; the config it may resume with;
its params and inputs). The registry is `orchestration.registry`; per-epoch metrics go
through `orchestration.epoch_logger`.

The default store is SQLite under `./runs/` with artifacts beside it; `MLFLOW_TRACKING_URI`
selects a server instead.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from data_shards.run_data import RunData
from model import ModelConfig
from orchestration.config import PATH_KEYS, JlstmConfig, absolute_path, config_to_yaml
from orchestration.errors import ConfigError, TrackingUnavailable

DEFAULT_TRACKING_DIR = "runs"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set, else the SQLite store `./runs/mlflow.db` (created)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    base = Path(DEFAULT_TRACKING_DIR).resolve()
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{base / DB_FILE}"


def check_tracking_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast when an http(s) tracking server does not answer; other URIs pass as is.

    One GET of `<uri>/health` with a hard timeout. MLflow's own client retries a dead server
    for minutes, so it is not used here. Any HTTP answer below 500 counts as reachable (a
    proxy or auth layer may refuse /health, yet the server is there).

    Raises:
        TrackingUnavailable: no connection, a timeout, or a 5xx answer.
    """
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            return
    except urllib.error.HTTPError as err:
        if err.code < 500:
            return
        reason = f"GET {url} answered HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        reason = f"GET {url} failed: {getattr(err, 'reason', err)}"
    raise TrackingUnavailable(
        f"MLflow tracking server at {uri} is not reachable: {reason}. Set MLFLOW_TRACKING_URI "
        "to a running server or unset it to use the local SQLite store"
    )


def connect() -> str:
    """Point MLflow at `tracking_uri()` after checking it answers; returns the URI.

    Set explicitly because MLflow's own default store is `./mlflow.db` of the current
    directory, not this project's `runs/`.
    """
    uri = tracking_uri()
    check_tracking_reachable(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def use(uri: str) -> str:
    """Point MLflow at `uri` as given; returns it. A Tune trial's actor takes the driver's
    URI this way: it does not see the driver's environment."""
    mlflow.set_tracking_uri(uri)
    return uri


def current_uri() -> str:
    """The URI MLflow logs to in this process (`connect` or `use` set it)."""
    return mlflow.get_tracking_uri()


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` URI (None for in-memory or other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0]).resolve()


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a SQLite store go beside its database; servers choose their own.

    Without this, a SQLite store would put artifacts under `./mlruns` of whatever the
    current directory is.
    """
    db = _sqlite_path(uri)
    if db is None:
        return None
    safe_name = re.sub(r"[^A-Za-z0-9_.-]", "_", experiment)
    return (db.parent / ARTIFACTS_DIR / safe_name).as_uri()


def get_or_create_experiment(name: str) -> str:
    """The id of experiment `name` in the current tracking store, created when missing."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = _artifact_location(mlflow.get_tracking_uri(), name)
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except MlflowException as err:
        # Another process (e.g. a parallel sweep trial) created it first.
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return mlflow.get_experiment_by_name(name).experiment_id


def flatten_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> flat MLflow params: `{"model.hidden_size": "1024"}`; lists as JSON."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, prefix=f"{name}."))
        elif isinstance(value, list | tuple):
            flat[name] = json.dumps(list(value), default=str)
        else:
            flat[name] = str(value)
    return flat


# One run's lifecycle: found or created by its run name, inputs, per-epoch metrics.
RUN_NAME_TAG = "jlstm.run_name"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests a run under its parent
# Set once a run's final model is logged: re-running a finished run name logs nothing twice.
FINISHED_TAG = "jlstm.finished_epoch"
VERSION_TAG = "jlstm.model_version"
EVALUATED_MODEL_TAG = "jlstm.evaluated_model"  # on `jlstm eval`'s runs: the model's URI
EVALUATED_RUN_TAG = "jlstm.evaluated_run"  # and the run that trained it
EVAL_EXPERIMENT = "jlstm-eval"  # for a model with no training run in this store


def find_run(cfg: JlstmConfig, experiment_id: str) -> str | None:
    """The id of the MLflow run of this run name, if one exists."""
    found = MlflowClient().search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{cfg.resolved_run_name()}'",
        max_results=1,
    )
    return found[0].info.run_id if found else None


def start_run(cfg: JlstmConfig, experiment_id: str, parent_run_id: str | None) -> str:
    """The MLflow run of this run name: resumed when it exists (RUNNING again), so a re-run
    continues it; else created."""
    run_id = find_run(cfg, experiment_id)
    if run_id is not None:
        resume_run(run_id)
        return run_id
    name = cfg.resolved_run_name()
    tags = {
        RUN_NAME_TAG: name,
        "dataset": cfg.data.dataset,
        "split": str(cfg.data.split),
        "variant": cfg.variant,
    }
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    return create_run(experiment_id, name, tags)


# Keys a resumed run may change: where and how it runs and is tracked, not what it learns.
RESUMABLE_PREFIXES = ("cluster.", "tracking.", "run_name")
PARAMS_PER_REQUEST = 100  # MLflow's limit for one log_batch


def check_same_config(cfg: JlstmConfig, run_id: str) -> None:
    """Refuse to resume run `run_id` with a config that differs from the one it logged.

    MLflow params cannot change, and a checkpoint trained under other settings would be
    continued as if nothing changed. ConfigError lists the differing keys.
    """
    details = config_differences(cfg, run_id)
    if details:
        raise ConfigError(
            f"run {cfg.resolved_run_name()!r} exists with another config ({details}): "
            "re-run with its config to resume it, or add --new-run to start a new run"
        )


def config_differences(cfg: JlstmConfig, run_id: str) -> str:
    """The keys (what the run learns, not where it runs) on which `cfg` differs from the
    config run `run_id` logged, as `key: run has X, config has Y; ...`; empty when none."""
    logged = MlflowClient().get_run(run_id).data.params
    # A run logged before paths were made absolute at load time holds them relative to
    # where it was started: they are compared resolved, as the config's own are.
    for key in (f"{section}.{name}" for section, name in PATH_KEYS):
        if logged.get(key) not in (None, "None", ""):
            logged = {**logged, key: absolute_path(logged[key])}
    wanted = flatten_params(cfg.model_dump(mode="json"))
    differ = sorted(
        key for key, value in wanted.items()
        if key in logged and logged[key] != value and not key.startswith(RESUMABLE_PREFIXES)
    )
    return "; ".join(f"{k}: run has {logged[k]}, config has {wanted[k]}" for k in differ)


@dataclass
class TrackedRun:
    """An MLflow run inside `tracked_run`: its id, and how it ends if nothing raises."""

    run_id: str
    status: str = "FINISHED"

    def fail(self) -> None:
        """End FAILED even though no exception left the block (some of its work failed)."""
        self.status = "FAILED"

    def interrupt(self) -> None:
        """End KILLED: the user stopped the work, which a later call resumes."""
        self.status = "KILLED"


@contextmanager
def tracked_run(
    cfg: JlstmConfig | None = None,
    experiment_id: str | None = None,
    parent_run_id: str | None = None,
    *,
    run_id: str | None = None,
) -> Iterator[TrackedRun]:
    """The one lifecycle of an MLflow run: start or resume the run of `cfg` in
    `experiment_id` (`start_run`), or take the started `run_id`; end it FINISHED, or FAILED
    when the block raises (then the error goes on) or calls `fail()`, or KILLED when it
    calls `interrupt()`."""
    if run_id is None:
        if cfg is None or experiment_id is None:
            raise ValueError("tracked_run needs cfg and experiment_id, or run_id")
        run_id = start_run(cfg, experiment_id, parent_run_id)
    else:  # a parent taken up again (a resumed sweep, a second reproduce call)
        resume_run(run_id)
    run = TrackedRun(run_id)
    try:
        yield run
    except BaseException:
        end_run(run_id, "FAILED")
        raise
    end_run(run_id, run.status)


# The store's runs as the rest of the package reads and writes them: every MLflow call outside
# this module, `orchestration.registry` and `orchestration.epoch_logger` goes through these.


def get_run(run_id: str) -> mlflow.entities.Run:
    """Run `run_id` as the store has it (info, params, metrics' latest values, tags)."""
    return MlflowClient().get_run(run_id)


def experiment_id_of(name: str) -> str | None:
    """The id of experiment `name`, or None when the store has none of that name."""
    found = mlflow.get_experiment_by_name(name)
    return found.experiment_id if found else None


def search_runs(
    experiment_id: str,
    *,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    status: str | None = None,
    newest_first: bool = False,
    max_results: int = 10000,
) -> list[mlflow.entities.Run]:
    """The runs of `experiment_id` with every tag of `tags`, the parent `parent_run_id` and
    the status `status` (each when given), oldest first unless `newest_first`."""
    terms = [f"tags.`{key}` = '{value}'" for key, value in (tags or {}).items()]
    if parent_run_id:
        terms.append(f"tags.`{PARENT_TAG}` = '{parent_run_id}'")
    if status:
        terms.append(f"attributes.status = '{status}'")
    order = "DESC" if newest_first else "ASC"
    return MlflowClient().search_runs(
        [experiment_id], filter_string=" and ".join(terms),
        order_by=[f"attributes.start_time {order}"], max_results=max_results,
    )


def create_run(
    experiment_id: str, name: str, tags: dict[str, str], params: dict[str, str] | None = None
) -> str:
    """A new run (RUNNING) named `name` with `tags` and `params`; returns its id."""
    run_id = MlflowClient().create_run(experiment_id, run_name=name, tags=tags).info.run_id
    _log_params(run_id, params or {})
    return run_id


def resume_run(run_id: str) -> None:
    """Mark an existing run RUNNING again (a re-run, a resumed sweep takes it up)."""
    MlflowClient().update_run(run_id, status="RUNNING")


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    """Set every tag of `tags` on run `run_id` (one request)."""
    MlflowClient().log_batch(
        run_id, tags=[mlflow.entities.RunTag(k, str(v)) for k, v in tags.items()]
    )


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log `metrics` at `step` on run `run_id` (one request)."""
    now = int(time.time() * 1000)
    MlflowClient().log_batch(
        run_id, metrics=[mlflow.entities.Metric(k, float(v), now, step)
                         for k, v in sorted(metrics.items())],
    )


def log_artifacts(run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
    """Upload files (or whole folders' contents) to run `run_id`, under `artifact_path`."""
    client = MlflowClient()
    for path in paths:
        if Path(path).is_dir():
            client.log_artifacts(run_id, str(path), artifact_path)
        else:
            client.log_artifact(run_id, str(path), artifact_path)


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """Every (step, value) run `run_id` logged for metric `key`."""
    return [(m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key)]


def log_evaluation(
    model_uri: str, metrics: dict[str, float], report_dir: str | Path
) -> str:
    """`jlstm eval`'s own MLflow run, in the experiment of the run that trained the model
    (so it lists beside it), named `eval-<model>`, tagged with the model's URI and that run:
    the metrics, and the report files under `evaluation/` (video_predictions.parquet among
    them, as a training run logs its own). Returns its id."""
    client = MlflowClient()
    trained_by = mlflow.models.get_model_info(model_uri).run_id or ""
    experiment_id = (
        client.get_run(trained_by).info.experiment_id if trained_by
        else get_or_create_experiment(EVAL_EXPERIMENT)
    )
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", model_uri.removeprefix("models:/")).strip("-")
    run_id = client.create_run(
        experiment_id, run_name=f"eval-{name}",
        tags={EVALUATED_MODEL_TAG: model_uri, EVALUATED_RUN_TAG: trained_by},
    ).info.run_id
    with tracked_run(run_id=run_id):
        log_metrics(run_id, metrics)
        log_artifacts(run_id, [Path(report_dir)], "evaluation")
    return run_id


def end_run(run_id: str, status: str) -> None:
    """Mark a run FINISHED, FAILED or KILLED; best effort (the server may be the thing that
    failed)."""
    try:
        MlflowClient().set_terminated(run_id, status)
    except Exception as err:  # ending the run must not hide the error that ended it
        warnings.warn(f"could not mark MLflow run {run_id} {status}: {err}", stacklevel=2)


def log_run_inputs(
    cfg: JlstmConfig, run_id: str, model_cfg: ModelConfig, data: RunData
) -> str:
    """Params (the flattened config), the config YAML, the quarantine table, and the
    manifest as the run's MLflow dataset input; returns the dataset digest."""
    digest = log_dataset(cfg, run_id, data.digest)
    client = MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "config.yaml"
        config_path.write_text(config_to_yaml(cfg))
        client.log_artifact(run_id, str(config_path))
        quarantine = Path(tmp) / "quarantine.csv"
        data.quarantine.to_pandas().to_csv(quarantine, index=False)
        client.log_artifact(run_id, str(quarantine))
    existing = client.get_run(run_id).data.params
    params = flatten_params(cfg.model_dump(mode="json"))
    params |= flatten_params(model_cfg.model_dump(mode="json"), prefix="resolved_model.")
    _log_params(run_id, {k: v for k, v in params.items() if k not in existing})
    return digest


def _log_params(run_id: str, params: dict[str, str]) -> None:
    """`params` on run `run_id`, batched: a server behind a login checks the password on
    every request (~1 s each under load), and a run has about 75 params."""
    entries = [mlflow.entities.Param(k, v) for k, v in params.items()]
    for start in range(0, len(entries), PARAMS_PER_REQUEST):
        MlflowClient().log_batch(run_id, params=entries[start : start + PARAMS_PER_REQUEST])


def log_dataset(cfg: JlstmConfig, run_id: str, digest: str) -> str:
    """The run's manifest as an MLflow dataset input (name, `digest`, source); returns the
    digest. Only metadata is logged: the manifest file stays where it is."""
    path = cfg.data.manifest_path().resolve()
    dataset = MetaDataset(
        resolve_dataset_source(path.as_uri()),
        name=f"{cfg.data.dataset}-split{cfg.data.split}",
        digest=digest,
    )
    context = InputTag(key=MLFLOW_DATASET_CONTEXT, value="train+test")
    logged = {d.dataset.digest for d in MlflowClient().get_run(run_id).inputs.dataset_inputs}
    if digest not in logged:  # a resumed run logs its dataset once
        inputs = [DatasetInput(dataset._to_mlflow_entity(), tags=[context])]
        try:
            MlflowClient().log_inputs(run_id, inputs)
        except MlflowException as err:
            # Runs of one split starting side by side (a sweep, `jlstm reproduce`) insert
            # the experiment's dataset row at once; the store refuses all but one. The row
            # exists now, and a second call links this run to it.
            if "UNIQUE" not in str(err).upper() and "duplicate key" not in str(err):
                raise
            MlflowClient().log_inputs(run_id, inputs)
    return digest
