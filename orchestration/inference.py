"""Using a logged model: `jlstm eval` on every test clip, `jlstm predict` on one video (many:
`orchestration.batch_predict`), and loading a model for prediction with one-line errors."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import ray
import ray.train
import torch
from mlflow.exceptions import MlflowException
from ray.train.torch import TorchTrainer

from data_shards.clip_spec import ClipSpec
from data_shards.cluster import init_ray
from data_shards.datasets import build_datasets, clip_readers
from data_shards.errors import BadDataError
from data_shards.index import ensure_index
from data_shards.run_data import RunData, load_run_data
from model import ModelConfig
from model import video as model_video
from model.decode_process import DEFAULT_TIMEOUT_S, BoundedDecoder, one_line
from model.inputs.sources import normalize_sources
from orchestration import registry, tracking
from orchestration.checkpoint import BAD_CLIPS_FILE, EVAL_DIR
from orchestration.config import JlstmConfig
from orchestration.driver import SplitEvalDataConfig, check_test_clips_scored
from orchestration.errors import ConfigError
from orchestration.evaluate import test_videos_of
from orchestration.metrics import EVAL_PREFIX
from orchestration.mlflow_model import LoadedModel, with_frame_interval
from orchestration.plots import plot_attention_overlay
from orchestration.session import plan_run, run_storage
from orchestration.worker import SETUP_KEY, EvalSetup, eval_loop_per_worker


def evaluate_model(model_uri: str, cfg: JlstmConfig, out_dir: str | Path) -> dict[str, float]:
    """Score every test clip of `cfg.data` with the model at `model_uri` on the cluster's
    workers (`cluster.num_workers`, or as many as fit of an elastic range); write the
    report into `out_dir`; return the metrics."""
    tracking.connect()
    loaded = registry.load_model(model_uri)
    init_ray()
    ensure_index(cfg.data)
    run = load_run_data(cfg.data, lambda num_classes: ClipSpec.of(loaded.model_cfg))
    if run.class_names != loaded.class_names:
        raise ValueError(
            f"model {model_uri} was trained on classes {loaded.class_names[:5]}..., "
            f"but {run.manifest_path} lists {run.class_names[:5]}...: not the same dataset"
        )
    return evaluate_distributed(
        cfg, loaded.model_cfg, loaded.net.state_dict(), loaded.class_names, out_dir, run
    )


def evaluate_distributed(
    cfg: JlstmConfig,
    model_cfg: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    names: list[str],
    out_dir: str | Path,
    run: RunData | None = None,
) -> dict[str, float]:
    """Every test clip scored once, spread over the planned Ray Train workers (a fixed
    number: as many of an elastic `cluster.min_workers..num_workers` as fit now).

    The workers are placed by the resource planner like a training run's; rank 0 gathers
    the clip predictions and computes the metrics (`eval_loop_per_worker`). The report
    files land in `out_dir`. `run`: the data as read (and checked) once, else read here.
    """
    plan = plan_run(cfg)
    clip_spec = ClipSpec.of(model_cfg)
    run = run or load_run_data(cfg.data, lambda num_classes: clip_spec)
    val = build_datasets(
        cfg.data, clip_spec, eval_workers=plan.num_workers, run_data=run
    )["val"]
    test_videos = run.test_videos
    trainer = TorchTrainer(
        eval_loop_per_worker,
        train_loop_config={SETUP_KEY: EvalSetup(
            model_cfg, names, ray.put({k: v.cpu() for k, v in state_dict.items()}),
            max(1, cfg.train.batch_size // plan.num_workers),
            clip_readers(cfg.data, clip_spec, run.cache_key)["val"], test_videos,
            test_video_paths=test_videos_of(run.subset("test")),
        )},
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.num_workers,
            use_gpu=cfg.cluster.use_gpu,
            resources_per_worker=plan.worker_resources(),
        ),
        run_config=ray.train.RunConfig(
            name=f"eval-{uuid.uuid4().hex[:12]}",
            storage_path=run_storage(cfg),
        ),
        datasets={"val": val},
        dataset_config=SplitEvalDataConfig(),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"evaluation of {cfg.data.dataset} finished without a report")
    check_test_clips_scored(
        result.metrics, result.checkpoint,
        f"evaluation of {cfg.data.dataset} split {cfg.data.split}",
        f"{BAD_CLIPS_FILE} in {result.checkpoint.path}",
    )
    with result.checkpoint.as_directory() as ckpt_dir:
        shutil.copytree(Path(ckpt_dir) / EVAL_DIR, Path(out_dir), dirs_exist_ok=True)
    return {
        k.removeprefix(EVAL_PREFIX): float(v)
        for k, v in result.metrics.items()
        if isinstance(v, int | float)
    }


def load_for_prediction(model_uri: str, frame_interval: int | None = None) -> LoadedModel:
    """The model at `model_uri` (`frame_interval`: None keeps its own), checked for use:
    ConfigError in one line for a model MLflow does not have, or one without the files
    jlstm logs (weights, config, class names)."""
    tracking.connect()
    try:
        loaded = registry.load_model(model_uri)
    except MlflowException as err:
        raise ConfigError(f"--model {model_uri}: {one_line(err)}") from None
    except (KeyError, OSError) as err:  # an artifact the pyfunc needs is not there
        name = err.args[0] if isinstance(err, KeyError) else Path(str(err.filename)).name
        raise ConfigError(
            f"--model {model_uri} has no {name!r} (a model jlstm logs has weights, its "
            "config and its class names): it cannot name classes"
        ) from None
    names = loaded.class_names
    if not names or len(names) != loaded.model_cfg.num_classes:
        raise ConfigError(
            f"--model {model_uri} lists {len(names)} class names for "
            f"{loaded.model_cfg.num_classes} classes: it cannot name classes"
        )
    return with_frame_interval(loaded, frame_interval)


def predict_video(
    video: str | Path,
    model_uri: str,
    *,
    top_k: int = 5,
    attention_png: str | Path | None = None,
    frame_interval: int | None = None,
    decode_timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[tuple[str, float]]:
    """Top-k (class, score) of one video by the model's own pipeline (`model.video`: the
    clip grid its metadata names, its clip rule, clip scores averaged), which the served
    model and `jlstm eval` use too.

    `frame_interval` defaults to the one the model was trained with. A video that cannot be
    decoded, or not within `decode_timeout_s` a call, raises `BadDataError` naming it and
    the decoder's reason.
    """
    video = Path(video)
    if not video.exists() or video.is_dir():
        raise FileNotFoundError(f"video {str(video)!r} does not exist")
    loaded = load_for_prediction(model_uri, frame_interval)
    decoder = BoundedDecoder(decode_timeout_s)
    try:
        prediction = model_video.predict_video(loaded.net, video, loaded.grid, decoder)
    except model_video.VideoError as err:
        raise BadDataError(f"cannot decode {video}: {err}") from None
    finally:
        decoder.close()
    ranked = model_video.top_k(prediction.scores, loaded.class_names, top_k)
    if attention_png:
        clip = prediction.first_clip
        device = next(loaded.net.parameters()).device
        sources = {key: torch.as_tensor(value[None]).to(device)
                   for key, value in prediction.first_sources.items()}
        with torch.no_grad():
            out = loaded.net(normalize_sources(sources))
        plot_attention_overlay(
            clip, out.attention[0].cpu().numpy(), Path(attention_png),
            title=f"{video.name}: {ranked[0][0]}",
        )
    return ranked
