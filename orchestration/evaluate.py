"""Evaluation the way the paper reports it (MODEL_SPEC section 5).

Every test clip is scored twice, with the paper's `vote` rule and the `prob` rule; a video's
prediction averages the clip scores of all its test clips. Reported: clip and video top-1,
top-5 and mean-class accuracy for both rules, a per-class table, a video-level confusion
matrix and every test video's prediction (`video_predictions.parquet`: the rows `jlstm
predict` writes, by the model's own clip rule, plus the true label). Pure numpy/pyarrow:
the caller turns network outputs into `ClipPredictions`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from model.video import video_scores
from orchestration.plots import plot_confusion_matrix

MODES = ("vote", "prob")
# The confusion matrix uses the paper's clip rule (`vote`), aggregated to videos.
CONFUSION_MODE = "vote"
VIDEO_PREDICTIONS_FILE = "video_predictions.parquet"
# One video's prediction: the served model's row (`mlflow_model.OUTPUT_COLUMNS`) with the
# video's name first; `jlstm predict` writes these, and evaluation with `true_label`.
PREDICTION_FIELDS = (
    pa.field("video", pa.string()),
    pa.field("label", pa.string()),
    pa.field("score", pa.float64()),
    pa.field("top_k", pa.list_(pa.struct([("label", pa.string()), ("score", pa.float64())]))),
    pa.field("num_clips", pa.int64()),
    pa.field("error", pa.string()),
)
VIDEO_PREDICTIONS_SCHEMA = pa.schema([*PREDICTION_FIELDS, pa.field("true_label", pa.string())])


@dataclass(frozen=True)
class ClipPredictions:
    """Clip-level scores of N test clips over C classes.

    Attributes:
        video_id: [N] the video each clip comes from (any hashable numpy dtype).
        label: [N] int true class of the clip's video.
        scores_vote: [N, C] `vote` scores (fraction of the last L2 steps voting for a class).
        scores_prob: [N, C] `prob` scores (mean softmax over the last L2 steps).
    """

    video_id: np.ndarray
    label: np.ndarray
    scores_vote: np.ndarray
    scores_prob: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.video_id)
        if self.label.shape != (n,):
            raise ValueError(f"label must have shape ({n},), got {self.label.shape}")
        for name in ("scores_vote", "scores_prob"):
            scores = getattr(self, name)
            if scores.ndim != 2 or scores.shape[0] != n:
                raise ValueError(f"{name} must have shape ({n}, C), got {scores.shape}")
        if self.scores_vote.shape != self.scores_prob.shape:
            raise ValueError(
                f"scores_vote {self.scores_vote.shape} and scores_prob "
                f"{self.scores_prob.shape} differ in shape"
            )

    @property
    def num_classes(self) -> int:
        """C, the width of the score matrices."""
        return self.scores_vote.shape[1]

    def scores(self, mode: str) -> np.ndarray:
        """The [N, C] scores of one prediction rule (`vote` or `prob`)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        return self.scores_vote if mode == "vote" else self.scores_prob

    @classmethod
    def empty(cls, num_classes: int) -> ClipPredictions:
        """No clips, C classes: what a worker with an empty test shard contributes."""
        scores = np.zeros((0, num_classes), dtype=np.float32)
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), scores, scores.copy())

    def sorted(self) -> ClipPredictions:
        """The same clips ordered by video id (stable: a video's clips keep their order)."""
        order = np.argsort(self.video_id, kind="stable")
        return ClipPredictions(
            self.video_id[order], self.label[order],
            self.scores_vote[order], self.scores_prob[order],
        )

    @classmethod
    def concat(cls, parts: Sequence[ClipPredictions]) -> ClipPredictions:
        """Join the predictions of several batches (or workers) in order."""
        if not parts:
            raise ValueError("concat needs at least one ClipPredictions")
        return cls(
            video_id=np.concatenate([p.video_id for p in parts]),
            label=np.concatenate([p.label for p in parts]),
            scores_vote=np.concatenate([p.scores_vote for p in parts]),
            scores_prob=np.concatenate([p.scores_prob for p in parts]),
        )


@dataclass(frozen=True)
class VideoScores:
    """Scores aggregated per video: each row is the mean of its clips' score rows."""

    video_id: np.ndarray
    label: np.ndarray
    scores_vote: np.ndarray
    scores_prob: np.ndarray

    def scores(self, mode: str) -> np.ndarray:
        """The [V, C] scores of one prediction rule."""
        return self.scores_vote if mode == "vote" else self.scores_prob


@dataclass(frozen=True)
class EvalReport:
    """Everything one evaluation produces.

    Attributes:
        metrics: flat `{clip,video}_{top1,top5,mean_class}_{vote,prob}` accuracies in [0, 1].
        confusion: [C, C] int video counts, rows = true class, columns = predicted
            (`vote` rule, the paper's).
        per_class: one row per class: class_name, label, videos, video_top1_vote,
            video_top1_prob, clips, clip_top1_vote (accuracies null for classes without data).
        class_names: the C class names, index = label.
        videos: every test video's prediction (`VIDEO_PREDICTIONS_SCHEMA`), or None.
    """

    metrics: dict[str, float]
    confusion: np.ndarray
    per_class: pa.Table
    class_names: list[str]
    videos: pa.Table | None = None

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write metrics.json, per_class_accuracy.csv, confusion_matrix.png and (with
        `videos`) video_predictions.parquet into out_dir."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "metrics": out / "metrics.json",
            "per_class_accuracy": out / "per_class_accuracy.csv",
            "confusion_matrix": out / "confusion_matrix.png",
        }
        paths["metrics"].write_text(json.dumps(self.metrics, indent=2, sort_keys=True) + "\n")
        pacsv.write_csv(self.per_class, paths["per_class_accuracy"])
        plot_confusion_matrix(self.confusion, self.class_names, paths["confusion_matrix"])
        if self.videos is not None:
            paths["video_predictions"] = out / VIDEO_PREDICTIONS_FILE
            pq.write_table(self.videos, paths["video_predictions"])
        return paths


def top_k_correct(scores: np.ndarray, label: np.ndarray, k: int) -> np.ndarray:
    """[N] bool: is the true label among the k highest scores (k capped at C)?

    Ties rank the lower class index first, so k=1 agrees with `argmax` (which matters for
    `vote`, where ties between classes are common).
    """
    k = min(k, scores.shape[1])
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return (ranked == label[:, None]).any(axis=1)


def mean_class_accuracy(correct: np.ndarray, label: np.ndarray) -> float:
    """Top-1 accuracy averaged over the classes that have at least one sample."""
    classes = np.unique(label)
    return float(np.mean([correct[label == c].mean() for c in classes]))


def aggregate_videos(preds: ClipPredictions) -> VideoScores:
    """Every video's scores from its clips' (MODEL_SPEC: video prediction), by the model's
    video rule (`model.video.video_scores`: what `jlstm predict` and the served model do)."""
    video_id, scores_vote = video_scores(preds.video_id, preds.scores_vote)
    _, scores_prob = video_scores(preds.video_id, preds.scores_prob)
    _, inverse = np.unique(preds.video_id, return_inverse=True)
    label = np.zeros(len(video_id), dtype=np.int64)
    label[inverse] = preds.label
    # A video has one label; a mismatch means the clip table was built wrongly.
    if not np.array_equal(label[inverse], preds.label):
        raise ValueError("clips of the same video carry different labels")
    return VideoScores(
        video_id=video_id, label=label, scores_vote=scores_vote, scores_prob=scores_prob
    )


def accuracy_metrics(scores: np.ndarray, label: np.ndarray, prefix: str) -> dict[str, float]:
    """`{prefix}_top1`, `_top5` and `_mean_class` accuracies of one score matrix."""
    top1 = top_k_correct(scores, label, 1)
    return {
        f"{prefix}_top1": float(top1.mean()),
        f"{prefix}_top5": float(top_k_correct(scores, label, 5).mean()),
        f"{prefix}_mean_class": mean_class_accuracy(top1, label),
    }


def confusion_matrix(label: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """[C, C] int64 counts; rows = true class, columns = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (label, predicted), 1)
    return cm


def _per_class_accuracy(
    correct: np.ndarray, label: np.ndarray, num_classes: int
) -> list[float | None]:
    """Top-1 accuracy per class; None where a class has no samples."""
    return [
        float(correct[label == c].mean()) if (label == c).any() else None
        for c in range(num_classes)
    ]


def per_class_table(
    preds: ClipPredictions, videos: VideoScores, class_names: list[str]
) -> pa.Table:
    """One row per class with video and clip counts and top-1 accuracies."""
    c = len(class_names)
    return pa.table(
        {
            "class_name": pa.array(class_names, pa.string()),
            "label": pa.array(range(c), pa.int64()),
            "videos": pa.array(np.bincount(videos.label, minlength=c), pa.int64()),
            "video_top1_vote": pa.array(
                _per_class_accuracy(
                    top_k_correct(videos.scores_vote, videos.label, 1), videos.label, c
                ),
                pa.float64(),
            ),
            "video_top1_prob": pa.array(
                _per_class_accuracy(
                    top_k_correct(videos.scores_prob, videos.label, 1), videos.label, c
                ),
                pa.float64(),
            ),
            "clips": pa.array(np.bincount(preds.label, minlength=c), pa.int64()),
            "clip_top1_vote": pa.array(
                _per_class_accuracy(
                    top_k_correct(preds.scores_vote, preds.label, 1), preds.label, c
                ),
                pa.float64(),
            ),
        }
    )


def evaluate(preds: ClipPredictions, class_names: list[str]) -> EvalReport:
    """Clip and video metrics for both prediction rules, per-class table, confusion matrix."""
    if len(preds.video_id) == 0:
        raise ValueError("no test clips to evaluate")
    if preds.num_classes != len(class_names):
        raise ValueError(
            f"scores have {preds.num_classes} classes but {len(class_names)} class names given"
        )
    videos = aggregate_videos(preds)
    metrics: dict[str, float] = {}
    for mode in MODES:
        for level, scores, label in (
            ("clip", preds.scores(mode), preds.label),
            ("video", videos.scores(mode), videos.label),
        ):
            for name, value in accuracy_metrics(scores, label, level).items():
                metrics[f"{name}_{mode}"] = value
    predicted = np.argmax(videos.scores(CONFUSION_MODE), axis=1)
    return EvalReport(
        metrics=metrics,
        confusion=confusion_matrix(videos.label, predicted, len(class_names)),
        per_class=per_class_table(preds, videos, list(class_names)),
        class_names=list(class_names),
    )


def test_videos_of(manifest: pa.Table) -> dict[int, tuple[str, int]]:
    """video_id -> (video_path, label) of the manifest rows `manifest` (the test subset):
    what evaluation names its video predictions with."""
    return {
        int(v): (str(p), int(label)) for v, p, label in zip(
            manifest["video_id"].to_pylist(), manifest["video_path"].to_pylist(),
            manifest["label"].to_pylist(), strict=True,
        )
    }


def attention_on_target(attention: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """How much more of the attention falls on the target than uniform attention puts there.

    The attention mass on the target's locations divided by their share of the grid
    (1.0 = uniform, K*K / n for attention entirely on n target locations), averaged over
    the steps of each clip.

    Args:
        attention: ``[N, nb, T, K*K]`` each branch's attention (rows sum to 1).
        inside: ``[N, T, K*K]`` bool, the locations the target overlaps at each step.

    Returns:
        ``[N, nb]``.
    """
    inside = inside.astype(np.float64)
    share = inside.mean(axis=-1)  # [N, T]
    if (share == 0).any():
        raise ValueError("every step needs a target location: a box is missing")
    mass = (attention * inside[:, None]).sum(axis=-1)  # [N, nb, T]
    return (mass / share[:, None]).mean(axis=-1)
