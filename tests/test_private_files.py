"""Outputs under a storage root follow the user's umask; the MLflow store (`mlflow.db`: every
run's params and tags) and the log files are created readable by their owner only."""

from __future__ import annotations

import os
import stat

import pytest

from components.storage import location
from components.transfer.readout_files import attempts_path, note_attempt
from pipelines.steps import Step, unfenced
from pipelines.tracking.runs import Tracker
from pipelines.tracking.store import default_tracking_uri


@pytest.fixture
def umask_022():
    old = os.umask(0o022)  # the usual umask: others may read what is created
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_new_mlflow_store_is_its_owners_only(tmp_path, umask_022):
    Tracker(default_tracking_uri(tmp_path), "private")
    assert mode(tmp_path / "mlflow.db") == 0o600


def test_an_attempt_log_is_its_owners_only_and_outputs_follow_the_umask(tmp_path, umask_022):
    readout = tmp_path / "readouts" / "normal" / "reshading.k.parquet"
    note_attempt(str(readout), "start")
    assert mode(attempts_path(str(readout)).local_path) == 0o600
    step = Step(location(tmp_path), "stage1/normal", "k1")
    (step.location / "model.pt").write_bytes(b"weights")
    step.finish({"task": "normal"}, fence=unfenced)
    assert mode(step.location.local_path / "model.pt") == 0o644 and mode(step.marker.local_path) == 0o644
