"""The training checkpoint: one typed state (`TrainState`) and the one owner of the
checkpoint folder (`Checkpointer`: its layout, how many Ray Train keeps, save and restore).

A checkpoint folder holds `state.pt` (the `TrainState`), `eval/` (the epoch's evaluation
report: metrics, per-class CSV, confusion matrix) and `bad_clips.csv` (every clip that
failed that epoch, when any did). Nothing else writes or names these files.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import ray.train
import torch

from orchestration.evaluate import EvalReport
from orchestration.step import BadClip

CHECKPOINT_FILE = "state.pt"
EVAL_DIR = "eval"  # the epoch's evaluation report (metrics, per-class CSV, confusion matrix)
BAD_CLIPS_FILE = "bad_clips.csv"  # subset, video_id, clip_start, error of every failed clip


@dataclass
class TrainState:
    """What one epoch's checkpoint holds: enough to continue the run, or to log its model.

    Saved with `torch.save` as a plain dict of tensors and builtins, so it loads with
    `torch.load(weights_only=True)` (no pickled code runs on load).
    """

    model: dict[str, torch.Tensor]  # the net's state dict
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    epoch: int  # epochs done (random draws are seeded per epoch: `worker.seed_epoch`)
    best_metric: float  # best video top-1 by vote so far (metrics.VIDEO_TOP1_VOTE)
    history: list[dict[str, float]]  # every epoch's reported metrics, in order
    model_config: dict[str, Any]  # ModelConfig as JSON
    class_names: list[str]

    def save(self, directory: Path) -> None:
        """`directory/state.pt`; the tensors are not copied."""
        torch.save({f.name: getattr(self, f.name) for f in fields(self)},
                   directory / CHECKPOINT_FILE)

    @classmethod
    def load(cls, directory: Path) -> TrainState:
        """The state in `directory`, on the CPU (the optimizer moves its part to the
        parameters' device when it is loaded into one)."""
        raw = torch.load(directory / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        # Only the fields this version knows: a checkpoint of an earlier one also held
        # every worker's RNG state, which epochs no longer carry.
        return cls(**{f.name: raw[f.name] for f in fields(cls)})

    @staticmethod
    def is_in(directory: Path) -> bool:
        """Whether `directory` holds a saved state."""
        return (directory / CHECKPOINT_FILE).is_file()


class Checkpointer:
    """Saves and restores a run's checkpoints through Ray Train, and says how many it keeps.

    `save` is called by every worker once per epoch (Ray Train's `report` is collective);
    only the worker given a state writes a checkpoint (rank 0), the others report metrics
    alone. `restore` gives the state of the checkpoint Ray Train resumes from, if any.
    """

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep  # checkpoints Ray Train keeps (the latest ones)

    def ray_config(self) -> ray.train.CheckpointConfig:
        """The retention, for `RunConfig(checkpoint_config=...)`."""
        return ray.train.CheckpointConfig(num_to_keep=self.keep)

    def restore(self) -> TrainState | None:
        """The state of the checkpoint this run resumes from (Ray Train's latest), or None."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as ckpt_dir:
            return TrainState.load(Path(ckpt_dir))

    def save(
        self,
        metrics: dict[str, Any],
        state: TrainState | None = None,
        report: EvalReport | None = None,
        failures: dict[str, list[BadClip]] | None = None,
    ) -> None:
        """Report `metrics` to Ray Train, with a checkpoint of `state`, the evaluation
        `report` and the failed clips (subset -> clips) when given, else metrics alone.
        With `state=None` and a report, the checkpoint is the report alone (`jlstm eval`)."""
        if state is None and report is None and failures is None:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            if state is not None:
                state.save(folder)
            if report is not None:
                report.write(folder / EVAL_DIR)
            write_bad_clips(folder, failures or {})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def write_bad_clips(directory: Path, failures: dict[str, list[BadClip]]) -> None:
    """`BAD_CLIPS_FILE` in `directory` when any clip failed: one row per failed clip."""
    rows = [{"subset": subset, **asdict(f)} for subset, fs in failures.items() for f in fs]
    if rows:
        pacsv.write_csv(pa.Table.from_pylist(rows), directory / BAD_CLIPS_FILE)


def bad_clips(checkpoint: ray.train.Checkpoint | None) -> list[dict[str, Any]]:
    """The failed clips listed in `checkpoint` (subset, video_id, clip_start, error)."""
    if checkpoint is None:
        return []
    with checkpoint.as_directory() as ckpt_dir:
        path = Path(ckpt_dir) / BAD_CLIPS_FILE
        return pacsv.read_csv(path).to_pylist() if path.is_file() else []
