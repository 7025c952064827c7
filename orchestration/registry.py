"""The MLflow model registry: how a model is logged (a pyfunc whose weights are a plain state
dict, rebuilt through `JointAttentionNet(ModelConfig)`: `orchestration.mlflow_model`),
loaded, described and promoted to the `champion` alias.
"""

from __future__ import annotations

import base64
import json
import tempfile
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array, Object, Property

import model as model_package
from data_shards.synth import write_video
from model import JointAttentionNet, ModelConfig
from orchestration import mlflow_model
from orchestration.config import JlstmConfig
from orchestration.metrics import VAL_VIDEOS_SCORED, VIDEO_TOP1_PROB, VIDEO_TOP1_VOTE
from orchestration.mlflow_model import (
    CLIP_STRIDE_KEY,
    DEFAULT_TOP_K,
    FORMAT_KEY,
    FRAME_INTERVAL_KEY,
    MODEL_FORMAT,
    LoadedModel,
    load_from_files,
)

CHAMPION_ALIAS = "champion"
SPLIT_TAG = "split"
SCORE_TAG = "video_top1"
TEST_VIDEOS_TAG = "test_videos"  # how many test videos the score covers
DATASET_TAG = "dataset_digest"  # data_shards.datasets.dataset_digest of the run's manifest
# The version's model format (`mlflow_model.MODEL_FORMAT`); a version without it is format 1.
FORMAT_TAG = FORMAT_KEY
# Packages the pyfunc needs at load time; pinned so the environment is reproducible, and
# listed instead of inferred because inference loads the model in a subprocess (slow).
_REQUIREMENTS = ("torch", "torchvision", "mlflow", "numpy", "pandas", "pydantic")
# The module the pyfunc decodes videos with (`model.video`); its distribution is whichever
# installed one provides it (decord, or a fork such as decord2), at its installed version.
_DECODER_MODULE = "decord"
# What a flow model's pyfunc computes its optical flow with (OpenCV's DIS, `model.flow`).
_FLOW_PACKAGE = "opencv-python-headless"


def registered_model_name(dataset: str) -> str:
    """The registry name of a dataset's models: `jlstm-<dataset>`."""
    return f"jlstm-{dataset}"


def model_signature() -> ModelSignature:
    """Videos in (`video_b64`: the file's bytes in base64, or `video`: a path under the
    server's `JLSTM_VIDEO_ROOT`), one prediction row out; `top_k` a parameter."""
    ranked = Array(Object([Property("label", DataType.string), Property("score", DataType.double)]))
    return ModelSignature(
        inputs=Schema([
            ColSpec(DataType.string, "video_b64", required=False),
            ColSpec(DataType.string, "video", required=False),
        ]),
        outputs=Schema([
            ColSpec(DataType.string, "label"),
            ColSpec(DataType.double, "score"),
            ColSpec(ranked, "top_k"),
            ColSpec(DataType.long, "num_clips"),
            ColSpec(DataType.string, "error"),
        ]),
        params=ParamSchema([ParamSpec("top_k", DataType.long, DEFAULT_TOP_K)]),
    )


def example_video(path: Path, frames: int = 12, size: int = 32) -> Path:
    """A tiny real video (a square moving east on grey, MPEG-4 in AVI, about 4 KB): the
    logged model's input example, stored with every model, so it stays small."""
    clip = np.full((frames, size, size, 3), 96, dtype=np.uint8)
    for t in range(frames):
        left = (2 * t) % (size - 8)
        clip[t, 12:20, left : left + 8] = (230, 60, 40)
    return write_video(path, clip, bit_rate=100_000)


def input_example(tmp: Path) -> pd.DataFrame:
    """One row: `example_video` as `video_b64`."""
    data = example_video(tmp / "example.avi").read_bytes()
    return pd.DataFrame({"video_b64": [base64.b64encode(data).decode("ascii")]})


def _pip_requirements(model_cfg: ModelConfig) -> list[str]:
    """`pkg==version` of the installed packages the pyfunc imports (local tags dropped), the
    video decoder's distribution included, and OpenCV for a model that reads optical flow
    (`model.flow` computes it inside the shipped pipeline)."""
    decoder = packages_distributions().get(_DECODER_MODULE, [_DECODER_MODULE])[0]
    flow = (_FLOW_PACKAGE,) if model_cfg.reads_flow else ()
    pins = []
    for package in (*_REQUIREMENTS, decoder, *flow):
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
    clip_stride: int | None = None,
    name: str = "model",
) -> ModelInfo:
    """Log the network to the active run as a pyfunc model; register it when a name is given.

    Decision: a state dict + JSON config, rebuilt by code and loaded with
    `torch.load(weights_only=True)`, because a pickled model would execute arbitrary code on
    load and `pt2` (torch.export) needs an example input and ties the model to one export.
    The model's clip grid goes into the MLmodel metadata (and the pyfunc's `model_config`):
    the training clips' `frame_interval` and `clip_stride`, the evaluation's
    `data.eval_stride` (None: `clip_len`), so the served model, `jlstm predict` and `jlstm
    eval` score a video's clips alike (`model.video`); with them `format_version`
    (`MODEL_FORMAT`).

    MLflow runs the input example through the loaded model once to check that it serves
    (one clip of `clip_len` frames at `frame_size`: a second on a CPU at the demo's size).
    """
    if len(class_names) != model_cfg.num_classes:
        raise ValueError(
            f"{len(class_names)} class names for a model of {model_cfg.num_classes} classes"
        )
    pipeline = {
        FRAME_INTERVAL_KEY: int(frame_interval),
        CLIP_STRIDE_KEY: int(clip_stride or model_cfg.clip_len),
        FORMAT_KEY: MODEL_FORMAT,
    }
    module = getattr(net, "module", net)  # unwrap DistributedDataParallel
    state = {key: value.detach().cpu() for key, value in module.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        files = {key: Path(tmp) / file for key, file in mlflow_model.ARTIFACT_FILES.items()}
        torch.save(state, files["weights"])
        files["model_config"].write_text(json.dumps(model_cfg.model_dump(mode="json"), indent=2))
        files["class_names"].write_text(json.dumps(list(class_names)))
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(Path(mlflow_model.__file__).resolve()),
            artifacts={key: str(path) for key, path in files.items()},
            # The `model` package travels with the artifact, so it loads outside this repo.
            code_paths=[str(Path(model_package.__file__).resolve().parent)],
            signature=model_signature(),
            input_example=input_example(Path(tmp)),
            pip_requirements=_pip_requirements(model_cfg),
            registered_model_name=registered_model_name,
            # Two copies: one shared dict would be written as a YAML anchor and alias.
            metadata=dict(pipeline),
            model_config=dict(pipeline),
        )


def load_model(uri: str, device: str | torch.device = "cpu") -> LoadedModel:
    """Download a logged model (`models:/name@alias`, `models:/name/version`, `runs:/...`)
    and rebuild the network from its artifacts, in eval mode on `device`, with the clip grid
    its metadata names."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        mlmodel = mlflow.models.Model.load(local)
        conf = mlmodel.flavors["python_function"]
        artifacts = {key: local / entry["path"] for key, entry in conf["artifacts"].items()}
        return load_from_files(
            artifacts["weights"], artifacts["model_config"], artifacts["class_names"], device,
            pipeline=mlmodel.metadata,
        )


def format_of(version: ModelVersion) -> int:
    """A version's model format (`FORMAT_TAG`); versions registered before it was tagged are
    format 1 (clips in, probabilities out)."""
    return int(version.tags.get(FORMAT_TAG, "1"))


def _beats(challenger: ModelVersion, holder: ModelVersion) -> bool:
    """Whether `challenger` may take `champion` from `holder`: the same split and dataset
    digest (the same test set), no fewer test videos scored, and a higher video top-1, or an
    equal one from a newer model format (so an older champion that cannot take videos goes to
    the next run that scores as well). A holder without a score tag compares as NaN, so it is
    kept. (score, format) ordered lexicographically: no two versions beat each other."""
    tags, held = challenger.tags, holder.tags
    if any(tags.get(t) != held.get(t) for t in (SPLIT_TAG, DATASET_TAG)):
        return False
    if int(tags.get(TEST_VIDEOS_TAG, "0")) < int(held.get(TEST_VIDEOS_TAG, "0")):
        return False
    score, held_score = float(tags.get(SCORE_TAG, "nan")), float(held.get(SCORE_TAG, "nan"))
    if score == held_score:
        return format_of(challenger) > format_of(holder)
    return score > held_score


def promote_if_better(
    registered_name: str,
    version: str | int,
    *,
    split: int,
    video_top1: float,
    test_videos: int,
    dataset_digest: str,
    model_format: int = MODEL_FORMAT,
) -> bool:
    """Tag a version with its split, dataset digest, video top-1, the number of test videos
    scored and its model format (that of the code that logged it: this one's by default),
    then let `champion` climb to the best version; returns whether the alias moved to this
    version.

    The alias only moves to a version that beats its holder (`_beats`): a champion on
    another split or dataset digest stays, and a version scored on fewer test videos (some
    failed to decode) never replaces one scored on more. A version of a newer format takes
    the alias from one of an older format at an equal score. MLflow has no compare-and-set, so
    two runs promoting at once could each act on a stale read; every promoter therefore
    re-reads after it moves the alias and moves it again until no tagged version beats the
    holder. All versions are tagged before any promoter compares, so whichever writes the
    alias last sees every tag and leaves the best version as champion.
    """
    client = MlflowClient()
    version = str(version)
    tags = {SPLIT_TAG: str(split), SCORE_TAG: repr(float(video_top1)),
            TEST_VIDEOS_TAG: str(test_videos), DATASET_TAG: dataset_digest,
            FORMAT_TAG: str(model_format)}
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
        best = max(challengers, key=lambda v: (float(v.tags[SCORE_TAG]), format_of(v)))
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
    name: str, version: str, cfg: JlstmConfig, final: dict[str, float], digest: str
) -> None:
    """What a user browsing the registry reads: the model's and the version's description
    (variant, dataset, split, digest, test figures, the champion rule, the predict and serve
    lines)."""
    client = MlflowClient()
    uri = f"models:/{name}@{CHAMPION_ALIAS}"
    predict = f"jlstm predict VIDEO --model {uri}"
    serve = f"mlflow models serve -m {uri} --env-manager local"
    client.update_registered_model(name, description=(
        f"jlstm: {cfg.data.dataset} action recognition (Wu et al. 2016, joint attention on "
        f"multi-level deep features). The alias @{CHAMPION_ALIAS} holds the best version on "
        f"the same split and dataset digest, scored on no fewer test videos: a higher video "
        f"top-1 (by vote) takes it, and so does an equal one of a newer model format "
        f"(version tag `{FORMAT_TAG}`; untagged versions are format 1, which took decoded "
        f"clips; format {MODEL_FORMAT} takes videos), so an older champion is replaced by "
        f"the next run that scores as well. Predict: `{predict}`. Serve: `{serve}`, then "
        f"POST {{\"dataframe_records\": [{{\"video_b64\": \"<the file, base64>\"}}]}} "
        f"to /invocations: one row of label, score, top_k, num_clips, error per video."
    ))
    client.update_model_version(name, version, description=(
        f"variant {cfg.variant}, dataset {cfg.data.dataset} split {cfg.data.split} "
        f"(dataset digest {digest}); test video top-1 {final[VIDEO_TOP1_VOTE]:.1%} by "
        f"vote, {final.get(VIDEO_TOP1_PROB, float('nan')):.1%} by prob, over "
        f"{int(final[VAL_VIDEOS_SCORED])} test videos; run {cfg.resolved_run_name()}. "
        f"Predict: `{predict}`"
    ))


def log_run_model(
    run_id: str, net: JointAttentionNet, cfg: JlstmConfig, class_names: list[str],
    final: dict[str, float], dataset_digest: str,
) -> tuple[str | None, bool]:
    """A finished run's model logged to its MLflow run `run_id`; with
    `tracking.register_model`, registered (`tracking.registered_model`, else
    `jlstm-<dataset>`), tagged and described, and `champion` moved when it beats the holder
    (`promote_if_better`). Returns (the version or None, whether it is champion now)."""
    registered = None
    if cfg.tracking.register_model:
        registered = cfg.tracking.registered_model or registered_model_name(cfg.data.dataset)
    with mlflow.start_run(run_id=run_id):  # the pyfunc is logged to the active run
        info = log_model(
            net, net.cfg, class_names, registered_model_name=registered,
            frame_interval=cfg.data.frame_interval,
            clip_stride=cfg.data.eval_stride_for(net.cfg.clip_len),
        )
    if not registered:
        return None, False
    version = str(info.registered_model_version)
    promoted = promote_if_better(
        registered, version, split=cfg.data.split, video_top1=final[VIDEO_TOP1_VOTE],
        test_videos=int(final[VAL_VIDEOS_SCORED]), dataset_digest=dataset_digest,
    )
    describe_version(registered, version, cfg, final, dataset_digest)
    return version, promoted


def resolve_version(model_uri: str) -> str:
    """What identifies a model's weights: `name/version` for a registered model (an alias
    or stage resolved now), else the URI itself (runs:/..., a logged model's id).

    Raises:
        MlflowException: the store has no such model, version or alias.
    """
    if not model_uri.startswith("models:/"):
        return model_uri
    ref = model_uri.removeprefix("models:/").rstrip("/")
    client = MlflowClient()
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return f"{name}/{client.get_model_version_by_alias(name, alias).version}"
    if "/" not in ref:
        return model_uri
    name, which = ref.rsplit("/", 1)
    if which.isdigit():
        return f"{name}/{client.get_model_version(name, which).version}"
    latest = client.get_latest_versions(name, stages=[which])
    return f"{name}/{latest[0].version}" if latest else model_uri
