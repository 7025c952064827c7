"""MLflow tracking and registry: where runs go, one run's lifecycle (found by run name,
inputs, per-epoch metrics from the Train controller), how the model is logged, loaded
and promoted.

The default store is SQLite under `./runs/` with artifacts beside it; `MLFLOW_TRACKING_URI`
selects a server instead. The model is a pyfunc "models from code" whose weights are a plain
state dict, rebuilt through `JointAttentionNet(ModelConfig)` (see `orchestration.mlflow_model`).
"""

from __future__ import annotations

import dataclasses
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
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import ray.train
import torch
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

import model as model_package
from data_shards.run_data import RunData
from model import ModelConfig
from orchestration import mlflow_model
from orchestration.checkpoint import BAD_CLIPS_FILE
from orchestration.config import PATH_KEYS, JlstmConfig, absolute_path, config_to_yaml
from orchestration.errors import ConfigError, TrackingUnavailable
from orchestration.metrics import TRAIN_BAD_CLIPS, VAL_BAD_CLIPS
from orchestration.mlflow_model import LoadedModel, load_from_files

if TYPE_CHECKING:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

DEFAULT_TRACKING_DIR = "runs"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
CHAMPION_ALIAS = "champion"
SPLIT_TAG = "split"
SCORE_TAG = "video_top1"
TEST_VIDEOS_TAG = "test_videos"  # how many test videos the score covers
DATASET_TAG = "dataset_digest"  # data_shards.datasets.dataset_digest of the run's manifest
FRAME_INTERVAL_KEY = "frame_interval"  # in the MLmodel metadata
# Packages the pyfunc needs at load time; pinned so the environment is reproducible, and
# listed instead of inferred because inference loads the model in a subprocess (slow).
_REQUIREMENTS = ("torch", "torchvision", "mlflow", "numpy", "pydantic")


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


def start_system_metrics(
    run_id: str, uri: str, node: str, interval_s: float
) -> SystemMetricsMonitor:
    """MLflow's system metrics monitor (CPU, memory, disk, network, and GPU through NVML)
    for this node, logged to `run_id` as `system/<node>/...` from a background thread.

    MLflow starts one only inside `mlflow.start_run(log_system_metrics=True)` in the
    process that owns the run; the training nodes are other processes, so the monitor
    class that call uses is started directly.
    """
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=interval_s, resume_logging=True, node_id=node,
        tracking_uri=uri,
    )
    monitor.start()
    return monitor


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


def registered_model_name(dataset: str) -> str:
    """The registry name of a dataset's models: `jlstm-<dataset>`."""
    return f"jlstm-{dataset}"


def model_signature(model_cfg: ModelConfig) -> ModelSignature:
    """uint8 frames [-1, T, S, S, 3] in, float32 class probabilities [-1, C] out."""
    t, s = model_cfg.clip_len, model_cfg.frame_size
    frames = TensorSpec(np.dtype(np.uint8), (-1, t, s, s, 3))
    probabilities = TensorSpec(np.dtype(np.float32), (-1, model_cfg.num_classes))
    return ModelSignature(inputs=Schema([frames]), outputs=Schema([probabilities]))


def _pip_requirements() -> list[str]:
    """`pkg==version` of the installed packages the pyfunc imports (local tags dropped)."""
    pins = []
    for package in _REQUIREMENTS:
        try:
            pins.append(f"{package}=={version(package).split('+', 1)[0]}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def log_model(
    net: torch.nn.Module,
    model_cfg: ModelConfig,
    class_names: list[str],
    *,
    registered_model_name: str | None,
    frame_interval: int = 1,
    name: str = "model",
) -> ModelInfo:
    """Log the network to the active run as a pyfunc model; register it when a name is given.

    Decision: a state dict + JSON config, rebuilt by code and loaded with
    `torch.load(weights_only=True)`, because a pickled model would execute arbitrary code on
    load and `pt2` (torch.export) needs an example input and ties the model to one export.
    The training clips' `frame_interval` goes into the MLmodel metadata, so `predict` samples
    a video's clips the way the model saw them.
    """
    if len(class_names) != model_cfg.num_classes:
        raise ValueError(
            f"{len(class_names)} class names for a model of {model_cfg.num_classes} classes"
        )
    module = getattr(net, "module", net)  # unwrap DistributedDataParallel
    state = {key: value.detach().cpu() for key, value in module.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        files = {key: Path(tmp) / file for key, file in mlflow_model.ARTIFACT_FILES.items()}
        torch.save(state, files["weights"])
        files["model_config"].write_text(json.dumps(model_cfg.model_dump(mode="json"), indent=2))
        files["class_names"].write_text(json.dumps(list(class_names)))
        with warnings.catch_warnings():
            # The explicit TensorSpec signature makes an input example unnecessary; one at
            # the paper's size (30 x 384 x 384 x 3 uint8) would add 13 MB to every model.
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            return mlflow.pyfunc.log_model(
                name=name,
                python_model=str(Path(mlflow_model.__file__).resolve()),
                artifacts={key: str(path) for key, path in files.items()},
                # The `model` package travels with the artifact, so it loads outside this repo.
                code_paths=[str(Path(model_package.__file__).resolve().parent)],
                signature=model_signature(model_cfg),
                pip_requirements=_pip_requirements(),
                registered_model_name=registered_model_name,
                metadata={FRAME_INTERVAL_KEY: frame_interval},
            )


def load_model(uri: str, device: str | torch.device = "cpu") -> LoadedModel:
    """Download a logged model (`models:/name@alias`, `models:/name/version`, `runs:/...`)
    and rebuild the network from its artifacts, in eval mode on `device`."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        mlmodel = mlflow.models.Model.load(local)
        conf = mlmodel.flavors["python_function"]
        artifacts = {key: local / entry["path"] for key, entry in conf["artifacts"].items()}
        loaded = load_from_files(
            artifacts["weights"], artifacts["model_config"], artifacts["class_names"], device
        )
    frame_interval = int((mlmodel.metadata or {}).get(FRAME_INTERVAL_KEY, 1))
    return dataclasses.replace(loaded, frame_interval=frame_interval)


def _beats(challenger: ModelVersion, holder: ModelVersion) -> bool:
    """Whether `challenger` may take `champion` from `holder`: the same split and dataset
    digest (the same test set), no fewer test videos scored, and a strictly higher video
    top-1. A holder without a score tag compares as NaN, so it is kept."""
    tags, held = challenger.tags, holder.tags
    if any(tags.get(t) != held.get(t) for t in (SPLIT_TAG, DATASET_TAG)):
        return False
    if int(tags.get(TEST_VIDEOS_TAG, "0")) < int(held.get(TEST_VIDEOS_TAG, "0")):
        return False
    return float(tags.get(SCORE_TAG, "nan")) > float(held.get(SCORE_TAG, "nan"))


def promote_if_better(
    registered_name: str,
    version: str | int,
    *,
    split: int,
    video_top1: float,
    test_videos: int,
    dataset_digest: str,
) -> bool:
    """Tag a version with its split, dataset digest, video top-1 and the number of test
    videos scored, then let `champion` climb to the best version; returns whether the alias
    moved to this version.

    The alias only moves to a version that beats its holder (`_beats`): a champion on
    another split or dataset digest stays, and a version scored on fewer test videos (some
    failed to decode) never replaces one scored on more. MLflow has no compare-and-set, so
    two runs promoting at once could each act on a stale read; every promoter therefore
    re-reads after it moves the alias and moves it again until no tagged version beats the
    holder. All versions are tagged before any promoter compares, so whichever writes the
    alias last sees every tag and leaves the best version as champion.
    """
    client = MlflowClient()
    version = str(version)
    tags = {SPLIT_TAG: str(split), SCORE_TAG: repr(float(video_top1)),
            TEST_VIDEOS_TAG: str(test_videos), DATASET_TAG: dataset_digest}
    for key, value in tags.items():
        client.set_model_version_tag(registered_name, version, key, value)
    def holder() -> str | None:  # the alias's version, as a string whatever the store gives
        held = client.get_registered_model(registered_name).aliases.get(CHAMPION_ALIAS)
        return None if held is None else str(held)

    first_holder = holder()
    while True:
        versions = {
            str(v.version): v
            for v in client.search_model_versions(f"name = '{registered_name}'")
        }
        current = holder()
        if current not in versions:  # no champion yet (or its version was deleted)
            _set_champion(client, registered_name, version)
            continue
        challengers = [v for v in versions.values() if _beats(v, versions[current])]
        if not challengers:
            return current == version != first_holder
        best = max(challengers, key=lambda v: float(v.tags[SCORE_TAG]))
        _set_champion(client, registered_name, str(best.version))


def _set_champion(client: MlflowClient, registered_name: str, version: str) -> None:
    """Point `champion` at `version`. Another promoter writing the alias at the same moment
    can make the store refuse this write (a unique-key conflict): the caller re-reads and
    decides again, so the refusal is not an error."""
    try:
        client.set_registered_model_alias(registered_name, CHAMPION_ALIAS, version)
    except MlflowException as err:
        if "UNIQUE" not in str(err).upper() and "duplicate key" not in str(err):
            raise


# One run's lifecycle: found or created by its run name, inputs, per-epoch metrics.
RUN_NAME_TAG = "jlstm.run_name"
# Set once a run's final model is logged: re-running a finished run name logs nothing twice.
FINISHED_TAG = "jlstm.finished_epoch"
VERSION_TAG = "jlstm.model_version"


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
    client = MlflowClient()
    run_id = find_run(cfg, experiment_id)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        return run_id
    name = cfg.resolved_run_name()
    tags = {
        RUN_NAME_TAG: name,
        "dataset": cfg.data.dataset,
        "split": str(cfg.data.split),
        "variant": cfg.variant,
    }
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id


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
    when the block raises (then the error goes on) or calls `fail()`."""
    if run_id is None:
        if cfg is None or experiment_id is None:
            raise ValueError("tracked_run needs cfg and experiment_id, or run_id")
        run_id = start_run(cfg, experiment_id, parent_run_id)
    run = TrackedRun(run_id)
    try:
        yield run
    except BaseException:
        end_run(run_id, "FAILED")
        raise
    end_run(run_id, run.status)


def end_run(run_id: str, status: str) -> None:
    """Mark a run FINISHED or FAILED; best effort (the server may be the thing that failed)."""
    try:
        MlflowClient().set_terminated(run_id, status)
    except Exception as err:  # ending the run must not hide the error that ended it
        warnings.warn(f"could not mark MLflow run {run_id} {status}: {err}", stacklevel=2)


class MlflowEpochLogger(ray.train.UserCallback):
    """Logs each reported epoch to MLflow from the Train controller, so workers never wait.

    A tracking server that does not answer does not stop training: the epoch's metrics are
    in the checkpoint's history (`TrainState.history`), and `log_missing_epochs` sends
    whatever is missing when the run finishes or is re-run. MLflow's client would retry a
    dead server for minutes inside the controller, so the controller process retries less.
    """

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
        os.environ.update(CONTROLLER_HTTP_RETRIES)
        epoch = int(metrics[0].get("epoch", 0))
        try:
            log_epoch(self.tracking_uri, self.run_id, metrics[0])
            failed = metrics[0].get(TRAIN_BAD_CLIPS, 0) + metrics[0].get(VAL_BAD_CLIPS, 0)
            if failed and checkpoint is not None:
                self.log_bad_clips(checkpoint, epoch)
        except Exception as err:  # any client or connection error
            warnings.warn(
                f"MLflow did not take epoch {epoch} ({type(err).__name__}: {err}); it is kept "
                "in the checkpoint and sent when the run finishes or is re-run",
                stacklevel=2,
            )

    def log_bad_clips(self, checkpoint: ray.train.Checkpoint, epoch: int) -> None:
        """The epoch's failed clips as artifact `bad_clips/epoch_<NNN>.csv`."""
        with checkpoint.as_directory() as ckpt_dir, tempfile.TemporaryDirectory() as tmp:
            named = Path(tmp) / f"epoch_{epoch:03d}.csv"
            named.write_bytes((Path(ckpt_dir) / BAD_CLIPS_FILE).read_bytes())
            MlflowClient(self.tracking_uri).log_artifact(self.run_id, str(named), "bad_clips")


# MLflow's defaults (7 retries, 120 s timeout) would hold the Train controller for minutes.
CONTROLLER_HTTP_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


def log_epoch(tracking_uri: str, run_id: str, metrics: dict[str, Any]) -> None:
    """The numeric metrics of one epoch's report, at step = its epoch, in one request."""
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    step = int(numeric.get("epoch", 0))
    now_ms = int(time.time() * 1000)
    MlflowClient(tracking_uri).log_batch(
        run_id, metrics=[mlflow.entities.Metric(k, v, now_ms, step) for k, v in numeric.items()]
    )


def log_missing_epochs(run_id: str, history: list[dict[str, float]]) -> int:
    """Send the epochs of `history` MLflow does not have yet (after a tracking outage, or
    for a run re-run after it); returns how many. Each epoch is one atomic request, and
    one found logged is never sent again, so every epoch is logged exactly once."""
    client = MlflowClient()
    logged = {m.step for m in client.get_metric_history(run_id, "epoch")}
    missing = [epoch for epoch in history if int(epoch["epoch"]) not in logged]
    for epoch in missing:
        log_epoch(mlflow.get_tracking_uri(), run_id, epoch)
    return len(missing)


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
    new = [mlflow.entities.Param(k, v) for k, v in params.items() if k not in existing]
    # Batched: a server behind a login checks the password on every request (~1 s each
    # under load), and a run has about 75 params.
    for start in range(0, len(new), PARAMS_PER_REQUEST):
        client.log_batch(run_id, params=new[start : start + PARAMS_PER_REQUEST])
    return digest


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
