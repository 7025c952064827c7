"""The tiny training run the end-to-end tests share: 2 DDP workers in well under a minute."""

from __future__ import annotations

from pathlib import Path
from typing import Any

EPOCHS = 3


def tiny_config(root: Path, storage: Path, run_name: str, **sections: dict[str, Any]) -> dict:
    """A config small enough to train 2 DDP workers on 2 CPUs in well under a minute."""
    raw: dict[str, Any] = {
        "variant": "late_fusion",
        "run_name": run_name,
        "model": {
            "frame_size": 64, "clip_len": 4, "last_steps": 2, "map_size": 8,
            "taps": ["conv4_3"], "channels": 16, "hidden_size": 32, "num_layers": 1,
            "supervision_hidden": 16, "attention_reg_weight": 10.0, "center_taps": True,
        },
        "data": {
            "dataset": "ucf101", "root": str(root), "train_stride": 2, "frame_interval": 3,
            "decode_cpus": 0.5,
        },
        "train": {"epochs": EPOCHS, "batch_size": 8, "lr": 0.01},
        "cluster": {"num_workers": 2, "storage_path": str(storage)},
        "tracking": {
            "experiment": "test-train", "attention_examples": 1, "system_metrics_interval_s": 2,
        },
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return raw
