"""`jlstm`: the command line. Each layer registers its own commands; errors a user can fix
end here as one line and an exit code, never a traceback.

Exit codes: 0 done, 2 config error, a missing file or a split file that cannot be read (or
`jlstm plan`: does not fit), 3 tracking server unreachable, 4 data error (too many bad
videos or clips, videos missing under data.root, a cache build where every video failed, a
stale cache), 5 the run name is being trained by another process, 6 a Ray cluster that
cannot be joined, 130 a sweep stopped by Ctrl+C; `jlstm reproduce` 1 when some of its runs
failed (the next call resumes them).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from data_shards.cli import add_data_commands
from data_shards.errors import BadDataError, ClusterUnavailable, SplitFileError, StaleCacheError
from orchestration.cli import add_run_commands
from orchestration.errors import ConfigError, RunInUse, TrackingUnavailable
from tune_spaces.cli import add_tune_command
from tune_spaces.paper_cli import add_paper_commands

# Errors a user can fix, first match wins: (their types, what the line says first, exit code).
USER_ERRORS: tuple[tuple[tuple[type[Exception], ...], str, int], ...] = (
    ((ConfigError,), "config error: ", 2),
    ((FileNotFoundError,), "", 2),
    ((SplitFileError,), "split file error: ", 2),
    ((TrackingUnavailable,), "", 3),
    ((BadDataError, StaleCacheError), "data error: ", 4),
    ((RunInUse,), "", 5),
    ((ClusterUnavailable,), "", 6),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jlstm",
        description="Train and evaluate the joint-attention LSTM (Wu et al. 2016) with Ray "
        "and MLflow.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="index videos, synthesize a dataset, cache features")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    add_data_commands(data_commands)
    add_run_commands(commands, data_commands)
    add_tune_command(commands)
    add_paper_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except tuple(kind for kinds, _, _ in USER_ERRORS for kind in kinds) as err:
        prefix, code = next((p, c) for kinds, p, c in USER_ERRORS if isinstance(err, kinds))
        print(f"jlstm: {prefix}{err}", file=sys.stderr)
        return code
