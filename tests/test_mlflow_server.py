"""The tracker against a real `mlflow server` over HTTP, as on a cluster (design.md section 7), and
the rule that refuses a local tracking store for a study on object storage or across nodes.

The server proxies artifacts (`--artifacts-destination`, served by default): the client uploads them
over HTTP instead of writing the server's folder itself, which is what a cluster worker must do.
(`--default-artifact-root <local folder>` would hand clients that folder's path to write directly.)
On a cluster the server stores runs in PostgreSQL and artifacts in a bucket: the `mlflow_pg_server`
fixture (tests/conftest.py) is that, on loopback, with moto as the bucket.

    .venv/bin/python -m pytest tests/test_mlflow_server.py
"""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
from mlflow.tracking import MlflowClient

from pipelines.tracking.runs import Tracker
from pipelines.tracking.store import remote_storage_refusal
from tests.services import s3_env, start_mlflow_server


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A SQLite-backed server proxying artifacts to a folder: the single-machine set-up."""
    tmp = tmp_path_factory.mktemp("mlflow-server")
    db, artifacts = tmp / "m.db", tmp / "art"
    with start_mlflow_server(tmp, f"sqlite:///{db}", artifacts) as server:
        yield server.url, db, artifacts


@pytest.mark.timeout(180)
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


@pytest.mark.timeout(240)
def test_postgres_backed_server_stores_runs_in_postgres_and_artifacts_in_the_bucket(
    mlflow_pg_server, s3_server, tmp_path
):
    tracker = Tracker(mlflow_pg_server.url, "pg-exp")
    parent = tracker.start_run("pipeline")
    run_id = tracker.start_run("train/depth", parent_run_id=parent, tags={"config_hash": "def"})
    tracker.log_params(run_id, {"train": {"lr": 0.01}})
    tracker.log_history(run_id, [("loss", 0.5, 0), ("loss", 0.25, 1)])
    (tmp_path / "notes.txt").write_text("to the bucket")
    tracker.log_artifact(run_id, tmp_path / "notes.txt", "reports")
    tracker.end_run(run_id)

    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied: the client never sees S3
    local = Path(tracker.client.download_artifacts(run_id, "reports/notes.txt", str(tmp_path / "dl")))
    assert local.read_text() == "to the bucket"

    # The run is in PostgreSQL, read without the server...
    assert mlflow_pg_server.backend_store_uri.startswith("postgresql")
    direct = MlflowClient(mlflow_pg_server.backend_store_uri).get_run(run_id)
    assert direct.data.params == {"train.lr": "0.01"} and direct.data.metrics == {"loss": 0.25}
    # ... and the artifact is an object in the bucket, under the server's destination.
    env = s3_env(s3_server)
    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_server.bucket)["Contents"]]
    assert f"mlartifacts/{tracker.experiment_id}/{run_id}/artifacts/reports/notes.txt" in keys


# ---------------------------------------------------------------- which tracking store a study may use


@pytest.mark.parametrize(
    "tracking", ["sqlite:////data/mlflow.db", "/data/mlruns", "file:///data/mlruns", "mlruns"]
)
@pytest.mark.parametrize(
    "storage", ["s3://bucket/studies/a", "gs://bucket/a", "abfss://c@acct.dfs.core.windows.net/a"]
)
def test_a_local_store_is_refused_for_remote_storage(tracking, storage):
    message = remote_storage_refusal(tracking, storage, shared=False)
    assert message is not None and "\n" not in message
    assert tracking in message and storage in message
    assert "mlflow server --backend-store-uri postgresql" in message
    assert "--artifacts-destination s3://" in message and "tracking_uri: http://" in message
    # The server it shows asks for a password and does not listen on every interface (issue 27).
    assert "--app-name basic-auth" in message and "--host 0.0.0.0" not in message


@pytest.mark.parametrize("storage", ["/mnt/taskatlas", "file:///mnt/taskatlas", "taskatlas-runs"])
def test_a_local_store_is_refused_for_storage_shared_by_nodes(storage):
    message = remote_storage_refusal("sqlite:////mnt/taskatlas/mlflow.db", storage, shared=True)
    assert message is not None and "shared by the nodes" in message


@pytest.mark.parametrize(
    ("tracking", "storage", "shared"),
    [
        ("sqlite:////tmp/runs/mlflow.db", "/tmp/runs", False),  # one machine: SQLite is fine
        ("sqlite:///runs/mlflow.db", "file:///tmp/runs", False),
        ("http://mlflow.internal:5000", "s3://bucket/a", True),  # a server: anything goes
        ("https://mlflow.example.org", "/mnt/shared", True),
        ("postgresql+psycopg2://u@db/mlflow", "s3://bucket/a", False),  # a database, not a file
    ],
)
def test_a_server_or_a_single_machine_is_accepted(tracking, storage, shared):
    assert remote_storage_refusal(tracking, storage, shared) is None
