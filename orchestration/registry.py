"""The MLflow model registry: how a model is logged (a pyfunc whose weights are a plain state
dict, rebuilt through `JointAttentionNet(ModelConfig)`: `orchestration.mlflow_model`),
loaded, described and promoted to the `champion` alias.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

import model as model_package
from model import ModelConfig
from orchestration import mlflow_model
from orchestration.config import JlstmConfig
from orchestration.metrics import VAL_VIDEOS_SCORED, VIDEO_TOP1_PROB, VIDEO_TOP1_VOTE
from orchestration.mlflow_model import LoadedModel, load_from_files

CHAMPION_ALIAS = "champion"
SPLIT_TAG = "split"
SCORE_TAG = "video_top1"
TEST_VIDEOS_TAG = "test_videos"  # how many test videos the score covers
DATASET_TAG = "dataset_digest"  # data_shards.datasets.dataset_digest of the run's manifest
FRAME_INTERVAL_KEY = "frame_interval"  # in the MLmodel metadata
# Packages the pyfunc needs at load time; pinned so the environment is reproducible, and
# listed instead of inferred because inference loads the model in a subprocess (slow).
_REQUIREMENTS = ("torch", "torchvision", "mlflow", "numpy", "pydantic")


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


def describe_version(
    client: MlflowClient, name: str, version: str, cfg: JlstmConfig, final: dict[str, float],
    digest: str,
) -> None:
    """What a user browsing the registry reads: the model's and the version's description
    (variant, dataset, split, digest, test figures, the predict line)."""
    predict = f"jlstm predict VIDEO --model models:/{name}@{CHAMPION_ALIAS}"
    client.update_registered_model(name, description=(
        f"jlstm: {cfg.data.dataset} action recognition (Wu et al. 2016, joint attention on "
        f"multi-level deep features); the alias @{CHAMPION_ALIAS} holds the best "
        f"version on the same split and dataset digest. Predict: `{predict}`"
    ))
    client.update_model_version(name, version, description=(
        f"variant {cfg.variant}, dataset {cfg.data.dataset} split {cfg.data.split} "
        f"(dataset digest {digest}); test video top-1 {final[VIDEO_TOP1_VOTE]:.1%} by "
        f"vote, {final.get(VIDEO_TOP1_PROB, float('nan')):.1%} by prob, over "
        f"{int(final[VAL_VIDEOS_SCORED])} test videos; run {cfg.resolved_run_name()}. "
        f"Predict: `{predict}`"
    ))
