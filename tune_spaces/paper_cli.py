"""`jlstm reproduce` and `jlstm report`: the paper's tables, run and set beside ours."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from orchestration.cli import add_overrides_arg
from tune_spaces.paper import DATASETS, TABLES


def _names(
    flag: str, allowed: tuple[str, ...] | None = None
) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: a comma-separated list, each name in `allowed` when given."""
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(part.strip() for part in text.split(",") if part.strip())
        if not names:
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: expected a comma-separated list")
        bad = [n for n in names if allowed is not None and n not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(
                f"{flag} {text!r}: {', '.join(bad)} not one of {', '.join(allowed or ())}"
            )
        return names

    return parse


def _splits(text: str) -> tuple[int, ...]:
    names = _names("--splits", ("1", "2", "3"))(text)
    return tuple(sorted({int(n) for n in names}))


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from tune_spaces.reproduce import reproduce

    result = reproduce(
        args.table, datasets=args.datasets, splits=args.splits, variants=args.variants,
        synthetic=args.synthetic, workdir=args.workdir, experiment=args.experiment,
        overrides=args.overrides,
    )
    print(f"experiment {result.experiment}, parent run {result.parent_run_id}: "
          f"{len(result.scheduled)} runs scheduled ({result.concurrent_runs} at once), "
          f"{len(result.skipped)} already finished")
    for name in result.skipped:
        print(f"  finished before, not rerun: {name}")
    if result.report is not None:
        print(result.report.markdown)
    if result.failed:
        print(f"jlstm: {len(result.failed)} runs failed ({', '.join(result.failed)}); "
              "run the same command again to resume them", file=sys.stderr)
        return 1
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from tune_spaces.paper_report import build_report, log_report
    from tune_spaces.reproduce import DEFAULT_EXPERIMENT, SYNTHETIC_EXPERIMENT

    experiment = args.experiment or (SYNTHETIC_EXPERIMENT if args.synthetic
                                     else DEFAULT_EXPERIMENT)
    tables = [args.table] if args.table else None
    report = build_report(experiment, tables)
    if report.parent_run_id is None:
        print(f"experiment {experiment}: no `jlstm reproduce` run yet; every row is not run")
    else:
        print(f"experiment {experiment}, parent run {report.parent_run_id}")
    print(report.markdown)
    log_report(report, tables)
    return 0


def add_paper_commands(commands: Any) -> None:
    """Register `reproduce` and `report` on the CLI's subparsers."""
    tables = sorted(TABLES)
    reproduce = commands.add_parser(
        "reproduce", help="train every run behind a paper table (Ray Tune schedules them)"
    )
    reproduce.add_argument("--table", type=int, required=True, choices=tables)
    reproduce.add_argument("--datasets", type=_names("--datasets", DATASETS),
                           help="e.g. ucf101,hmdb51 (default: the table's)")
    reproduce.add_argument("--splits", type=_splits, help="e.g. 1,2 (default: the table's)")
    reproduce.add_argument("--variants", type=_names("--variants"),
                           help="only these rows' variants, e.g. late_fusion,early_fusion")
    reproduce.add_argument(
        "--synthetic", action="store_true",
        help="tiny sizes on generated videos (configs/paper/synthetic.yaml), to see the flow",
    )
    reproduce.add_argument("--workdir", default="runs/reproduce-synthetic",
                           help="with --synthetic: where the videos and caches go")
    reproduce.add_argument("--experiment", help="MLflow experiment (default: jlstm-reproduce, "
                           "or jlstm-reproduce-synthetic)")
    add_overrides_arg(
        reproduce, "override a key of every run's config, e.g. --set train.epochs=2"
    )
    reproduce.set_defaults(func=_cmd_reproduce)

    report = commands.add_parser(
        "report", help="the paper's tables beside ours, from MLflow (printed and logged)"
    )
    report.add_argument("--experiment", help="default: jlstm-reproduce")
    report.add_argument("--synthetic", action="store_true",
                        help="the --synthetic reproduce's experiment")
    report.add_argument("--table", type=int, choices=tables, help="one table (default: all)")
    report.set_defaults(func=_cmd_report)
