"""Out of disk (issue 27 item 2), on a real small disk (a tmpfs; skipped where it cannot be
mounted): a full disk ends a run in one line naming the storage root and what was being written,
its MLflow runs are marked FAILED even with the store on that disk, and a rerun after space is
freed resumes, Ray Train's own damaged state included."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from components.disk_space import RESERVE, no_space
from components.errors import OutOfSpace
from components.storage import location
from pipelines.config import load_pipeline_config
from pipelines.stage1.train_state import SNAPSHOT, repair_train_state, train_state_damage
from tests.disk import fill, resize, small_disk
from tests.study import write_study

REPO = Path(__file__).resolve().parents[1]


def _statuses(root: Path) -> dict[str, str]:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return {r.info.run_name: r.info.status for r in runs}  # the newest run of each name


def test_a_full_disk_is_found_in_an_errors_chain_with_what_was_being_written(tmp_path):
    with small_disk(tmp_path / "disk", "1m") as disk:
        fill(disk)
        with pytest.raises(OSError) as full:
            location(disk / "model.pt").write_bytes(bytes(100_000))  # how steps write
    assert full.value.errno == errno.ENOSPC
    assert no_space(full.value) == str(disk / "model.pt")
    try:  # the way a failure handler's own error hides the first one
        try:
            raise full.value
        except OSError as err:
            raise RuntimeError("could not mark the run FAILED") from err
    except RuntimeError as wrapped:
        assert no_space(wrapped) == str(disk / "model.pt")
    # A Ray worker's error reaches the driver as text (RayTaskError, WorkerGroupError).
    remote = RuntimeError("Training failed:\nOSError: [Errno 28] No space left on device: '/r/ckpt/state.pt'")
    assert no_space(remote) == "/r/ckpt/state.pt"
    assert no_space(OutOfSpace("x", writing="the checkpoints of normal")) == "the checkpoints of normal"
    assert no_space(ValueError("bad value")) is None
    assert no_space(OSError(errno.EACCES, "Permission denied")) is None


def test_runs_are_marked_failed_on_the_full_disk_holding_their_store(tmp_path):
    """The driver's runs (the parent, and a network run whose own failure handler could not
    write either) end FAILED in the space the study lock set aside; the command ends in one
    `OutOfSpace` naming the storage root and the file."""
    from pipelines.invocation import invocation, study_lock

    with small_disk(tmp_path / "disk", "4m") as root:
        cfg = load_pipeline_config(write_study(tmp_path / "tiny.yaml", root, tasks=["normal", "reshading"]))
        weights = root / "stage1" / "normal" / "model.pt"
        with pytest.raises(OutOfSpace) as full, study_lock(cfg, "train") as fence:
            assert (root / RESERVE).stat().st_size > 0
            with invocation(cfg, "train", fence) as inv:
                inv.tracker.start_run("train/normal", inv.run_id)
                fill(root)
                weights.parent.mkdir(parents=True)
                location(weights).write_bytes(bytes(100_000))
        line = str(full.value)
        assert "\n" not in line and f"storage root {root}" in line and str(weights) in line
        assert "rerun" in line
        statuses = _statuses(root)
        assert statuses.pop("train/normal") == "FAILED"
        assert list(statuses.values()) == ["FAILED"]  # the parent
        assert not (root / RESERVE).exists() and not (root / "study.lock").exists()


def test_damaged_ray_train_state_is_found_and_removed_in_one_line(tmp_path, capsys):
    """What makes Ray Train refuse to start (CheckpointManagerInitializationError) or fail every
    restart: an empty or cut snapshot, a checkpoint it lists gone, a cut latest checkpoint."""
    import ray

    run = location(tmp_path / "ray" / "train-normal-abc")
    ckpt = tmp_path / "ray" / "train-normal-abc" / "checkpoint_1"
    ckpt.mkdir(parents=True)
    torch.save({"epoch": 0}, ckpt / "state.pt")
    result = {"version": 0, "checkpoint_dir_name": "checkpoint_1", "metrics": {}}
    snapshot = {
        "ray_version": ray.__version__,
        "checkpoint_results": [result],
        "latest_checkpoint_result": result,
    }
    (run / SNAPSHOT).write_text(json.dumps(snapshot))
    assert train_state_damage(run) == ""  # whole: Ray Train resumes it
    assert train_state_damage(location(tmp_path / "ray" / "none")) == ""  # nothing to resume

    whole = (ckpt / "state.pt").read_bytes()
    (ckpt / "state.pt").write_bytes(whole[: len(whole) // 2])
    assert "its latest checkpoint, cannot be read" in train_state_damage(run)
    (ckpt / "state.pt").write_bytes(whole)
    (run / SNAPSHOT).write_text(json.dumps(snapshot | {"ray_version": "0.1"}))
    assert "written by Ray 0.1" in train_state_damage(run)
    (run / SNAPSHOT).write_text(
        json.dumps(snapshot | {"checkpoint_results": [result | {"checkpoint_dir_name": "gone"}]})
    )
    assert "is missing" in train_state_damage(run)

    (run / SNAPSHOT).write_bytes(b"")  # what a full disk leaves
    assert repair_train_state(run, "normal")
    [line] = capsys.readouterr().err.splitlines()
    assert SNAPSHOT in line and "cannot be read" in line and "removed Ray Train's state of normal" in line
    assert not run.exists()
    assert not repair_train_state(run, "normal")  # nothing left to repair


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args, "-c", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _error_lines(stderr: str) -> list[str]:
    """stderr less the Ray log folder's line and the progress bars."""
    return [
        line
        for line in stderr.splitlines()
        if line.strip() and not line.startswith("Ray, Tune and Train logs:") and "%|" not in line
    ]


@pytest.mark.slow  # two real runs of Stage I on a 3 MB disk: about 2 minutes
def test_a_run_on_a_full_disk_fails_in_one_line_and_its_rerun_resumes_after_space_is_freed(tmp_path):
    with small_disk(tmp_path / "disk", "3m") as root:
        config = write_study(
            tmp_path / "tiny.yaml", root, tasks=["normal", "reshading"], train={"epochs": 3, "num_workers": 1}
        )
        failed = _cli(config, "train")
        lines = _error_lines(failed.stderr)
        assert failed.returncode == 1, failed.stderr[-3000:]
        assert len(lines) == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
        assert lines[0].startswith("taskatlas: error: no space left on device writing ")
        assert f"(storage root {root})" in lines[0]
        assert "RUNNING" not in _statuses(root).values()

        resize(root, "200m")
        unfinished = [
            t for t in ("normal", "reshading") if not list((root / "stage1" / t).rglob("done.json"))
        ]
        assert unfinished  # the disk filled before the end of Stage I
        for run in (root / "ray").glob("train-*"):  # the damage a full disk can leave Ray Train
            (run / SNAPSHOT).write_bytes(b"")
        damaged = [t for t in unfinished if list((root / "ray").glob(f"train-{t}-*"))]
        assert damaged  # Ray Train had started on a network it could not finish
        rerun = _cli(config, "train")
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        for task in damaged:  # its Ray Train state, removed in one line; its network trained
            assert f"removed Ray Train's state of {task} " in rerun.stderr, rerun.stderr[-3000:]
        statuses = _statuses(root)
        assert statuses["train/normal"] == statuses["train/reshading"] == "FINISHED"
        assert "RUNNING" not in statuses.values()
