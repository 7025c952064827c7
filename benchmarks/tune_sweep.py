"""Trials per hour of the demo sweep on this machine, and ASHA's saving in trial-epochs.

Runs `configs/tune_demo.yaml` (optionally shrunk with `--set`) on local Ray, after writing
the demo's synthetic videos when they are missing (the sweep itself indexes them and builds
the feature cache). The saving is the trial-epochs ASHA did not run: every trial would
otherwise have trained all `train.epochs`.

    python benchmarks/tune_sweep.py --out benchmarks/results/tune_sweep.json
    python benchmarks/tune_sweep.py --set num_samples=4 --set train.epochs=2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from data_shards.cluster import init_ray
from data_shards.synth import synthesize_dataset
from orchestration.demo import DEMO_CLASSES, DEMO_VIDEOS_PER_CLASS
from tune_spaces.cli import print_sweep
from tune_spaces.spaces import load_sweep
from tune_spaces.sweep import run_sweep

DEMO_SWEEP = Path(__file__).resolve().parent.parent / "configs" / "tune_demo.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tune_sweep.json"))
    parser.add_argument("--config", type=Path, default=DEMO_SWEEP)
    parser.add_argument("--classes", type=int, default=DEMO_CLASSES)
    parser.add_argument("--videos-per-class", type=int, default=DEMO_VIDEOS_PER_CLASS)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="sweep or run config override")
    args = parser.parse_args()

    # A fresh experiment name per run: a sweep of the same name would have to be resumed.
    name = f"tune-demo-bench-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep, base_raw = load_sweep(args.config, [f"name={name}", *args.overrides])
    root = Path(base_raw["data"]["root"])
    if not any(root.glob("UCF-101/*")):
        synthesize_dataset(
            root, layout="ucf101", classes=args.classes,
            videos_per_class=args.videos_per_class, seed=base_raw["data"].get("seed", 0),
            frame_size=base_raw["model"]["frame_size"] * 4 // 3,
        )
    init_ray()
    started = time.perf_counter()
    result = run_sweep(sweep, base_raw)
    wall_s = time.perf_counter() - started
    print_sweep(result)

    trials = len(result.trials)
    saved = result.trial_epochs_full - result.trial_epochs_run
    report = {
        "benchmark": "tune_sweep",
        "config": str(args.config),
        "overrides": args.overrides,
        "num_samples": sweep.num_samples,
        "epochs_per_trial": base_raw["train"]["epochs"],
        "asha": sweep.asha.model_dump() if sweep.asha else None,
        "trials": trials,
        # Includes indexing / cache checks on the driver and the final registration.
        "wall_s": round(wall_s, 1),
        "trials_per_hour": round(trials / (wall_s / 3600), 2),
        "trial_epochs_run": result.trial_epochs_run,
        "trial_epochs_without_asha": result.trial_epochs_full,
        "trial_epochs_saved": saved,
        "asha_saving_fraction": round(saved / max(result.trial_epochs_full, 1), 3),
        "stopped_early": int(result.trials["stopped_early"].sum()),
        "best_metric": {result.metric: result.best_metric},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
