"""The training checkpoint: one typed structure, written and read here and nowhere else."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FILE = "state.pt"


@dataclass
class TrainState:
    """What one epoch's checkpoint holds: enough to continue the run, or to log its model.

    Saved with `torch.save` as a plain dict of tensors and builtins, so it loads with
    `torch.load(weights_only=True)` (no pickled code runs on load).
    """

    model: dict[str, torch.Tensor]  # the net's state dict
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    epoch: int  # epochs done
    rng: list[dict[str, Any]]  # every worker's RNG state, in rank order
    best_metric: float  # best val_video_top1_vote so far
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
        return cls(**raw)

    @staticmethod
    def is_in(directory: Path) -> bool:
        """Whether `directory` holds a saved state."""
        return (directory / CHECKPOINT_FILE).is_file()
