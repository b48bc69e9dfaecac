"""A tracking server that does not answer, and a damaged SQLite store (issue 27, part 3): real
sockets, a real `mlflow server` killed by its process group, the real CLI.

A silent server stops a run after `tracking.retry_s` in one line, exit 2, no traceback; the lock
is released, finished work stays on disk, and failure handlers make no second round of requests.
The rerun, with the server back, logs the readouts the dead one never got.

    .venv/bin/python -m pytest tests/test_tracking_down.py -q            # seconds
    .venv/bin/python -m pytest tests/test_tracking_down.py -q -m slow    # the killed server, ~3 min
"""

import contextlib
import pickle
import socket
import sqlite3
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from components.study_lock import STUDY_LOCK, LocalLockStore
from pipelines.stage2.readout_runs import CANDIDATE_KEY_TAG, READOUT_KEY_TAG
from pipelines.tracking.logger import RunLogger
from pipelines.tracking.retry import TrackingUnavailable, request_timeout_s
from pipelines.tracking.runs import Tracker
from tests.services import cli_process, free_port, start_mlflow_server
from tests.study import write_study


def _one_error_line(stderr: str) -> str:
    """The run's one error line; nothing like a traceback around it."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("taskatlas: error:")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def test_a_server_that_refuses_or_never_answers_stops_the_tracker_within_its_budget():
    refused = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable) as err:
        Tracker(refused, "down", retry_s=1.5)
    took = time.monotonic() - start
    assert 1.5 <= took < 4, took  # retried for the budget, then at once
    message = str(err.value)
    assert "\n" not in message and refused in message and "did not answer for 2 s" in message
    assert "finished work is on disk" in message and "next run logs what is missing" in message

    with socket.socket() as silent:  # takes connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(0)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(TrackingUnavailable):
            Tracker(url, "down", retry_s=1)
        took = time.monotonic() - start
    assert took < 1 + request_timeout_s(1) + 2, took  # the budget, plus one request's wait at most


def test_a_workers_logger_gives_up_once_then_logs_nothing_and_training_goes_on():
    logger = RunLogger(f"http://127.0.0.1:{free_port()}", "0" * 32, retry_s=1)
    start = time.monotonic()
    logger.log_metrics({"train_loss": 1.0}, step=0)  # no exception: the weights on disk are the work
    assert 1 <= time.monotonic() - start < 3
    assert logger.server_down
    start = time.monotonic()
    logger.log_metrics({"train_loss": 0.5}, step=1)
    logger.set_tags({"world_size": "1"})
    assert logger.logged_steps("train_loss") == set()
    with logger.system_metrics(interval_s=0.1):
        pass
    assert time.monotonic() - start < 0.1  # no request: no second round
    assert not pickle.loads(pickle.dumps(logger)).server_down  # a new process starts afresh


def _damaged_store(root: Path) -> Path:
    """An SQLite database cut to half its size (a full disk, a killed copy)."""
    db = root / "mlflow.db"
    root.mkdir(parents=True)
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        con.execute("create table runs (id integer primary key, body blob)")
        con.executemany("insert into runs (body) values (?)", [(bytes(1000),)] * 200)
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2])
    return db


def test_a_damaged_sqlite_store_is_refused_in_one_line_naming_it_and_what_to_do(tmp_path):
    root = tmp_path / "runs"
    db = _damaged_store(root)
    config = write_study(tmp_path / "tiny.yaml", root)
    start = time.monotonic()
    driver = cli_process("run", "-c", str(config))
    _, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 2, stderr[-3000:]
    line = _one_error_line(stderr)
    assert str(db) in line and "damaged" in line and "move it aside" in line, line
    assert "outputs under the storage root are kept" in line
    assert time.monotonic() - start < 30  # before Ray starts
    assert LocalLockStore(root / STUDY_LOCK).read() is None

    db.write_bytes(b"not a database at all" * 10)  # garbage rather than cut short
    with pytest.raises(Exception, match="not an SQLite database"):
        Tracker(f"sqlite:///{db}", "tiny")


def _readout_files(root: Path) -> list[Path]:
    return sorted((root / "readouts").glob("*/*.parquet")) if (root / "readouts").exists() else []


def _logged_readouts(url: str) -> list[str]:
    """The readout keys of the replicates logged (FINISHED) on their candidates' runs."""
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("tiny/readouts")
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], f"tags.{CANDIDATE_KEY_TAG} LIKE '%'")
    return [
        key
        for r in runs
        for tag, key in r.data.tags.items()
        if tag.startswith(f"{READOUT_KEY_TAG}.r") and f"test_loss/r{tag.rsplit('.r', 1)[1]}" in r.data.metrics
    ]


@pytest.mark.slow
def test_a_server_killed_mid_run_stops_it_in_one_line_and_the_rerun_logs_what_was_missing(tmp_path):
    root = tmp_path / "runs"
    config = write_study(
        tmp_path / "tiny.yaml",
        root,
        tasks=["normal", "reshading"],
        train={"epochs": 1, "num_workers": 1},
        transfer={"orders": [], "beams": [], "epochs": 20, "width": 16, "replicates": 1},
        tracking={"retry_s": 3},
    )
    backend, artifacts = f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "artifacts"
    with start_mlflow_server(tmp_path, backend, artifacts) as server:
        uri = ["--set", f"tracking_uri={server.url}"]
        _, stderr = (trained := cli_process("train", "-c", str(config), *uri)).communicate(timeout=600)
        assert trained.returncode == 0, stderr[-3000:]
        driver = cli_process("transfer", "-c", str(config), *uri)
        deadline = time.monotonic() + 300
        while not _readout_files(root):  # the first readout is on disk, its run still buffered
            assert driver.poll() is None, driver.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no readout was ever written"
            time.sleep(0.1)
    killed = time.monotonic()  # leaving the block ended the server's process group
    _, stderr = driver.communicate(timeout=300)
    took = time.monotonic() - killed
    print(f"the run stopped {took:.1f} s after the server was killed")
    assert driver.returncode == 2, stderr[-3000:]
    line = _one_error_line(stderr)
    assert server.url in line and "did not answer for 3 s" in line, line
    # The readouts left (20 epochs each), at most one 10 s log batch, the 3 s budget, Ray's exit;
    # no second round in the failure handlers (MLflow's own retries took 4 minutes a request).
    assert took < 90, took
    assert LocalLockStore(root / STUDY_LOCK).read() is None  # released
    on_disk = _readout_files(root)
    assert len(on_disk) >= 1

    with start_mlflow_server(tmp_path, backend, artifacts) as server:  # back, at a new address
        assert len(_logged_readouts(server.url)) < len(on_disk)  # the dead run's are missing
        rerun = cli_process("transfer", "-c", str(config), "--set", f"tracking_uri={server.url}")
        _, stderr = rerun.communicate(timeout=600)
        assert rerun.returncode == 0, stderr[-3000:]
        keys = _logged_readouts(server.url)
        assert len(keys) == len(set(keys)) == len(_readout_files(root))  # each once, none missing
        client = MlflowClient(server.url)
        experiment = client.get_experiment_by_name("tiny")
        left = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
        assert not left, [r.info.run_name for r in left]


def test_tracking_retry_s_is_validated_at_load(tmp_path):
    from components.errors import ConfigError
    from pipelines.config import load_pipeline_config

    config = write_study(tmp_path / "tiny.yaml", tmp_path / "runs")
    assert load_pipeline_config(config).tracking.retry_s == 60
    with pytest.raises(ConfigError, match=r"^tracking\.retry_s must be >= 0, got -1(\.0)?$"):
        load_pipeline_config(config, ["tracking.retry_s=-1"])
