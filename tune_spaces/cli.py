"""`jlstm tune`: run or resume a Ray Tune sweep described by a sweep YAML; print its summary."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from orchestration.cli import add_overrides_arg

if TYPE_CHECKING:
    from tune_spaces.results import SweepResult


def _cmd_tune(args: argparse.Namespace) -> int:
    from tune_spaces.spaces import load_sweep
    from tune_spaces.sweep import run_sweep

    sweep, base_raw = load_sweep(args.config, args.overrides)
    result = run_sweep(sweep, base_raw, resume=args.resume)
    print_sweep(result)
    # 130: the conventional status of a run stopped by Ctrl+C.
    return 130 if result.interrupted else 0


def print_sweep(result: SweepResult) -> None:
    """CLI summary: best config and metric, ASHA's saving, and where to look."""
    if result.interrupted:
        print(f"sweep interrupted; continue it with --resume ({result.experiment_path})")
        return
    print(f"best trial {result.best_trial_id}: {result.metric} = {result.best_metric:.4f}")
    for key, value in (result.best_values or {}).items():
        print(f"  {key} = {value}")
    if result.best:
        status = "now champion" if result.best.promoted else "champion unchanged"
        print(f"  model version {result.best.model_version} ({status})")
    print(
        f"{len(result.trials)} trials, {result.trial_epochs_run} trial-epochs run of "
        f"{result.trial_epochs_full} without early stopping"
    )
    print(f"Ray Tune experiment: {result.experiment_path} (tune.Tuner.restore(path))")
    uri = result.tracking_uri
    hint = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else uri
    print(f"MLflow: parent run {result.parent_run_id}; browse with: {hint}")


def add_tune_command(commands: Any) -> None:
    """Register `tune` on the CLI's subparsers."""
    tune = commands.add_parser(
        "tune", help="Ray Tune sweep over lambda, zeta, fusion, branches (see configs/tune_*)"
    )
    tune.add_argument("--config", required=True, help="sweep YAML, e.g. configs/tune_demo.yaml")
    tune.add_argument(
        "--resume", action="store_true",
        help="continue an interrupted sweep (Tuner.restore); finished trials are not rerun",
    )
    add_overrides_arg(
        tune, "override a sweep key (num_samples=8) or a run config key (train.epochs=3)"
    )
    tune.set_defaults(func=_cmd_tune)
