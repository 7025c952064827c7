"""`jlstm tune`: run or resume a Ray Tune sweep described by a sweep YAML."""

from __future__ import annotations

import argparse
from typing import Any


def _cmd_tune(args: argparse.Namespace) -> int:
    from tune_spaces.spaces import load_sweep
    from tune_spaces.sweep import print_sweep, run_sweep

    sweep, base_raw = load_sweep(args.config, args.overrides)
    result = run_sweep(sweep, base_raw, resume=args.resume)
    print_sweep(result)
    # 130: the conventional status of a run stopped by Ctrl+C.
    return 130 if result.interrupted else 0


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
    tune.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a sweep key (num_samples=8) or a run config key (train.epochs=3)",
    )
    tune.set_defaults(func=_cmd_tune)
