"""Every metric a run reports, by name, in one place; what is printed and plotted of them.

A training epoch reports, from all workers (`worker`): the loss terms, the training
clips' top-1, throughput and failed clips, its world size, steps and global batch; from
the evaluation (rank 0, over every worker's shard of the test clips): the paper's figures
with the `val_` prefix
(`evaluate.EvalReport.metrics`: clip and video top-1, top-5 and mean-class accuracy, by
vote and by prob), failed clips, videos scored, and on synthetic data the attention on
the moving square. `epoch_metrics` puts one epoch's together. Ray Train's controller
forwards them to MLflow at step = epoch (`epoch_logger.EpochLoggerCallback`); the parent of
several splits logs their averages as `avg_<name>`.

Imports nothing: the command line and the plots read names from here without loading
Ray, torch or MLflow.
"""

from __future__ import annotations

from typing import Any

EVAL_PREFIX = "val_"  # evaluation metrics in a training run (`jlstm eval` drops it)
LOSS_TERMS = ("total", "lstm", "supervision", "attention_reg")  # loss_<term>

EPOCH = "epoch"
LR = "lr"
TRAIN_CLIP_TOP1 = "train_clip_top1"
TRAIN_CLIPS_PER_S = "train_clips_per_s"
# The share of the training workers' epoch time spent waiting for their next batch: above a
# few percent the data, not the step, sets the pace.
TRAIN_DATA_WAIT_SHARE = "train_data_wait_share"
TRAIN_BAD_CLIPS = "train_bad_clips"
TRAIN_BAD_FRACTION = "train_bad_clip_fraction"
# The epoch's shape, logged so a resize of an elastic run shows (`orchestration.batching`):
# the workers that trained it, its optimizer steps and the clips a step (the same at every
# world size).
WORLD_SIZE = "world_size"
TRAIN_STEPS = "train_steps"
TRAIN_GLOBAL_BATCH = "train_global_batch"
# Steps of the epoch that ran as a CUDA graph replay (`graphed_step`): all of them once the
# graph is captured, 0 on an eager step.
TRAIN_GRAPH_REPLAYS = "train_graph_replays"

# The paper's figure (MODEL_SPEC "prediction": a video's label is the vote of its clips):
# what the champion, sweeps and the paper's tables compare.
VIDEO_TOP1_VOTE = "val_video_top1_vote"
VIDEO_TOP1_PROB = "val_video_top1_prob"
BEST_VIDEO_TOP1_VOTE = "best_" + VIDEO_TOP1_VOTE  # the best epoch so far
VIDEO_MEAN_CLASS_VOTE = "val_video_mean_class_vote"
VAL_BAD_CLIPS = "val_bad_clips"
VAL_VIDEOS_SCORED = "val_videos_scored"
VAL_VIDEOS_UNSCORED = "val_videos_unscored"
VAL_WORKER_CLIPS_MIN = "val_worker_clips_min"  # fewest test clips one worker scored
VAL_SECONDS = "val_seconds"
ATTENTION_ON_TARGET = "val_attention_on_target"  # mean over branches; _<tap> per branch

# `jlstm train` prints these per split.
SUMMARY = ("val_clip_top1_vote", VIDEO_TOP1_VOTE, VIDEO_TOP1_PROB, "val_video_top5_prob",
           VIDEO_MEAN_CLASS_VOTE)
# The run's plots/loss_curves.png: every loss term, and the accuracies a user reads (the
# rest are in MLflow's metric charts).
PLOTTED_LOSSES = tuple(f"loss_{term}" for term in LOSS_TERMS)
PLOTTED_ACCURACIES = (VIDEO_TOP1_VOTE, VIDEO_TOP1_PROB, VIDEO_MEAN_CLASS_VOTE, TRAIN_CLIP_TOP1)


def loss_metric(term: str) -> str:
    return f"loss_{term}"


def eval_metric(name: str) -> str:
    """The name of evaluation figure `name` (`video_top1_vote`, ...) in a training run."""
    return EVAL_PREFIX + name


def epoch_metrics(
    epoch: int,
    lr: float,
    train: dict[str, float],
    evaluation: dict[str, float] | None,
    best: float,
) -> tuple[dict[str, Any], float]:
    """One epoch's report: its number and learning rate, the training figures, the
    evaluation's (when it ran) and the best video top-1 so far; and that best."""
    metrics: dict[str, Any] = {**train, EPOCH: epoch, LR: lr}
    if evaluation:
        metrics |= evaluation
    if VIDEO_TOP1_VOTE in metrics:
        best = max(best, metrics[VIDEO_TOP1_VOTE])
        metrics[BEST_VIDEO_TOP1_VOTE] = best
    return metrics, best
