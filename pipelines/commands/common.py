"""What every command shares: the config and lock arguments, and the MLflow UI command line.

Command modules import only argparse and this at load time, and the heavy libraries (torch, Ray,
MLflow) inside the function that runs the command, so `taskatlas --help` and `taskatlas solve`
answer at once.
"""

from __future__ import annotations

import argparse
import shlex


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="YAML config (default: built-in defaults)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. --set train.epochs=3 (repeatable)",
    )


def add_lock_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait-for-lock",
        action="store_true",
        help="if another study is working on the storage root, wait for it instead of exiting",
    )


def mlflow_ui_command(tracking_uri: str) -> str:
    """The command that opens the MLflow UI on this store, safe to paste into a shell."""
    return f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)}"
