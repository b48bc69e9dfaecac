"""`taskatlas demo`: the main job on the embedded default (what `make demo` runs).

Until the stage pipelines land, the demo generates the default synthetic dataset under
./taskatlas-runs/data and prints its summary; rerunning it reuses the finished dataset.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from components.data.synthetic import DatasetConfig
from pipelines.commands.data import generate_and_report

DEFAULT_ROOT = Path("taskatlas-runs")


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="run the main job on the built-in synthetic dataset")
    demo.add_argument(
        "--root", type=Path, default=DEFAULT_ROOT, help="storage root (default ./taskatlas-runs)"
    )
    demo.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    out = args.root / "data" / "synthetic-default"
    generate_and_report(out, DatasetConfig())
    print(f"\ninspect it with: taskatlas data info {out}")
    return 0
