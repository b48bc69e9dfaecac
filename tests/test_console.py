"""What a user sees: `taskatlas run` prints one bar per stage, then the answer; Ray, Tune, Train
and MLflow keep their notices to Ray's log folder (`-v` shows them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.study import write_study

ROOT = Path(__file__).resolve().parents[1]
BARS = (
    "rendering scenes",
    "search trials",
    "networks",
    "readouts",
    "affinity (bootstrap)",
    "taxonomy stability",
)
TUNE = {"enabled": True, "num_samples": 2, "max_epochs": 1, "grace_period": 1, "max_train_images": 40}


@pytest.mark.slow  # a whole tiny study in a fresh process: about a minute (CI runs it)
def test_a_run_prints_a_bar_per_stage_then_the_answer_and_no_library_notices(tmp_path):
    config = write_study(tmp_path / "tiny.yaml", tmp_path / "runs", tune=TUNE, analysis={"bootstrap": 20})
    env = {**os.environ, "TASKATLAS_RAY_DASHBOARD": "0"}
    env.pop("TASKATLAS_VERBOSE", None)
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", "-c", str(config)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    noise = [line for line in lines if any(w in line for w in (" INFO ", "WARNING", "Configuration for"))]
    assert not noise, noise
    assert all(any(line.startswith(f"{bar}:") for line in lines) for bar in BARS)
    assert len(lines) <= 2 * 40  # two screens, bars included
    answer = done.stdout.splitlines()
    assert any(line.startswith("taxonomy (budget 1") for line in answer)
    assert answer[-2].startswith("MLflow UI:") and answer[-1].startswith("MLflow run:")  # its run id


def test_the_readouts_line_adds_up_and_tells_self_apart():
    from pipelines.commands.run import readouts_line

    counts = {"order 1": 48, "order 2": 36, "random": 12, "pixels": 12, "self": 4}
    line = readouts_line(100, 8, counts)
    assert line == (
        "readouts: 100 trained, 8 reused (order 1 48, order 2 36, random 12, pixels 12); "
        "self 4, scored with each target's own network"
    )
    assert readouts_line(3, 0, {"order 1": 3}) == "readouts: 3 trained, 0 reused (order 1 3)"


def test_verbose_is_passed_along_not_written_to_the_environment(tmp_path, monkeypatch, capsys):
    """Regression: `-v` set TASKATLAS_VERBOSE for the whole process (and everything it started) so
    that the settings could read it back; it is now an argument of the calls that use it."""
    from pipelines.cli import main

    monkeypatch.delenv("TASKATLAS_VERBOSE", raising=False)
    config = write_study(tmp_path / "tiny.yaml", tmp_path / "runs")
    assert main(["-v", "run", "-c", str(config), "--dry-run"]) == 0
    assert "TASKATLAS_VERBOSE" not in os.environ
    assert "run      data" in capsys.readouterr().out
