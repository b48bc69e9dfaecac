"""The `taskatlas` command line.

taskatlas run -c configs/quickstart.yaml   # the main job on the embedded default (`make demo`)
taskatlas data generate --out DIR          # synthetic scenes -> Parquet shards
taskatlas submit --address http://HEAD:8265 -c CONFIG --wait
taskatlas position -c CONFIG --task NEW.yaml --images DIR   # a new task against a finished study
taskatlas --help                           # every command
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from components.disk_space import no_space
from components.errors import OutOfSpace, TaskatlasError, Terminated, terminate_as_interrupt
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
    if not args.verbose:  # MLflow's store migrations and the like: notices, not news (read when mlflow loads)
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        # MLflow logs each SQLite error (a full disk: dozens) before raising it: the error says it
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    terminate_as_interrupt()
    try:
        return args.func(args) or 0
    except Terminated:
        print(
            "taskatlas: terminated (SIGTERM); finished steps are kept: rerun the command to go on",
            file=sys.stderr,
        )
        return Terminated.exit_code
    except TaskatlasError as err:
        print(f"taskatlas: error: {err}", file=sys.stderr)
        return err.exit_code
    except Exception as err:  # a full disk where no study lock names the storage root
        if (writing := no_space(err)) is None:
            raise
        print(f"taskatlas: error: no space left on device writing {writing or 'files'}", file=sys.stderr)
        return OutOfSpace.exit_code


if __name__ == "__main__":
    sys.exit(main())
