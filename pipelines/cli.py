"""The `taskatlas` command line.

taskatlas run -c configs/quickstart.yaml   # the main job on the embedded default (`make demo`)
taskatlas data generate --out DIR          # synthetic scenes -> Parquet shards
taskatlas submit --address http://HEAD:8265 -c CONFIG --wait
taskatlas position -c CONFIG --task NEW.yaml --images DIR   # a new task against a finished study
taskatlas --help                           # every command
"""

from __future__ import annotations

import argparse
import os
import sys

from components.errors import TaskatlasError
from pipelines.commands import analysis as analysis_commands
from pipelines.commands import data as data_commands
from pipelines.commands import position as position_commands
from pipelines.commands import run as run_commands
from pipelines.commands import submit as submit_commands
from pipelines.commands import train as train_commands
from pipelines.commands import transfer as transfer_commands

COMMAND_MODULES = (
    run_commands,
    position_commands,
    submit_commands,
    data_commands,
    train_commands,
    transfer_commands,
    analysis_commands,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskatlas", description="Taskonomy-style task transfer study.")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="Ray, Tune and Train logs live (default: to Ray's log folder)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:  # what `settings` reads, inherited by the Ray workers and jobs this starts
        os.environ["TASKATLAS_VERBOSE"] = "1"
    else:  # MLflow's store migrations and the like: notices, not news (read when mlflow loads)
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    try:
        return args.func(args) or 0
    except TaskatlasError as err:
        print(f"taskatlas: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
