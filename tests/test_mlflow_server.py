"""The tracker against a real `mlflow server` over HTTP, as on a cluster (design.md section 7).

The server proxies artifacts (`--artifacts-destination`, served by default): the client uploads them
over HTTP instead of writing the server's folder itself, which is what a cluster worker must do.
(`--default-artifact-root <local folder>` would hand clients that folder's path to write directly.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

from components.tracking import Tracker

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    db, artifacts = tmp / "m.db", tmp / "art"
    args = [
        str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", str(artifacts), "--workers", "1",
    ]  # fmt: skip
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner: starts in ~8 s
    log = (tmp / "server.log").open("w")
    server = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_health(server, url, tmp / "server.log")
        yield url, db, artifacts
    finally:
        _end_group(server)
        log.close()


def _wait_for_health(server: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"mlflow server did not answer /health:\n{log.read_text()[-3000:]}")


def _end_group(server: subprocess.Popen) -> None:
    """The server and its uvicorn worker share the process group we gave it: end the group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(15)
    with contextlib.suppress(ProcessLookupError):  # whatever ignored SIGTERM
        os.killpg(server.pid, signal.SIGKILL)
    server.wait(10)


def test_tracker_logs_params_metrics_and_artifacts_over_http(mlflow_server, tmp_path):
    url, db, artifacts = mlflow_server
    tracker = Tracker(url, "test-exp")
    parent = tracker.start_run("pipeline")
    run_id = tracker.start_run("train/normal", parent_run_id=parent, tags={"config_hash": "abc"})
    tracker.log_params(run_id, {"train": {"lr": 0.001, "batch_sizes": [16, 32]}, "task": "normal"})
    tracker.log_history(run_id, [("loss", 1.0 / (step + 1), step) for step in range(5)] + [("acc", 0.5, 4)])
    (tmp_path / "notes.txt").write_text("hello from the driver")
    tracker.log_artifact(run_id, tmp_path / "notes.txt", "reports")
    tracker.write_json_artifact(run_id, {"roots": ["normal"]}, "taxonomy.json")
    tracker.end_run(run_id)

    # Read back through the server.
    run = tracker.client.get_run(run_id)
    assert run.data.params == {"train.lr": "0.001", "train.batch_sizes": "[16, 32]", "task": "normal"}
    assert run.data.tags["config_hash"] == "abc" and run.data.tags["mlflow.parentRunId"] == parent
    assert run.info.status == "FINISHED"
    history = tracker.client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (s, 1.0 / (s + 1)) for s in range(5)
    ]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied: uploaded over HTTP
    assert {a.path for a in tracker.client.list_artifacts(run_id)} == {"reports", "taxonomy.json"}
    local = Path(tracker.client.download_artifacts(run_id, "reports/notes.txt", str(tmp_path / "dl")))
    assert local.read_text() == "hello from the driver"
    assert tracker.find_run("train/normal", parent_run_id=parent) == run_id

    # And it landed in the server's own stores: the SQLite file and the artifact folder.
    direct = MlflowClient(f"sqlite:///{db}")
    stored = direct.get_run(run_id)
    assert stored.data.params["train.lr"] == "0.001"
    assert stored.data.metrics == {"loss": pytest.approx(0.2), "acc": 0.5}
    assert direct.get_experiment_by_name("test-exp").experiment_id == tracker.experiment_id
    assert [p.read_text() for p in artifacts.rglob("notes.txt")] == ["hello from the driver"]
