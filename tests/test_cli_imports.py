"""The CLI imports only what a command needs: `--help` and `solve` never load torch, Ray or MLflow
(the reason `taskatlas --help` used to take 5 s). Checked by module, not by timing."""

import json
import subprocess
import sys
from pathlib import Path

from components.taxonomy import Transform
from pipelines.commands.analysis import TRANSFORMS

ROOT = Path(__file__).resolve().parents[1]
TASKONOMY_16K = ROOT / "tests" / "data" / "taskonomy" / "affinities_16k.csv"  # see its README.md
HEAVY = ("torch", "ray", "mlflow", "matplotlib")

PROBE = """
import json, sys
from pipelines.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)), file=sys.stderr)
"""


def heavy_modules_loaded(*argv: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv], cwd=ROOT, capture_output=True, text=True
    )
    return json.loads(out.stderr.strip().splitlines()[-1])


def test_help_loads_no_heavy_library():
    assert heavy_modules_loaded("--help") == []
    assert heavy_modules_loaded("run", "--help") == []


def test_solve_loads_no_heavy_library():
    args = ["solve", "--affinities", str(TASKONOMY_16K), "--budget", "8", "--max-order", "4"]
    assert heavy_modules_loaded(*args) == []


def test_the_cli_offers_every_transform():
    assert tuple(t.value for t in Transform) == TRANSFORMS
