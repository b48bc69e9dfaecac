"""A study on a cluster's own services (issue 11): storage root on an S3-protocol server, MLflow
as a server on PostgreSQL with artifacts in the bucket, Ray with two nodes. All real, on loopback:
moto's S3 server, PostgreSQL 15 behind `mlflow server` (the session fixtures of tests/conftest.py),
`ray.cluster_utils.Cluster`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from components.errors import ConfigError
from pipelines.config import load_pipeline_config
from pipelines.invocation import check_tracking_store, preflight

ROOT = Path(__file__).resolve().parents[1]

DRIVER = textwrap.dedent(
    """
    import json, os, sys
    import pipelines  # keeps Ray on loopback (before Ray is imported)
    import ray
    from ray.cluster_utils import Cluster

    # One CPU per node and two one-CPU training workers: the work must span both nodes.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address
    from pipelines.cli import main
    try:
        for _ in range(2):  # the second run must reuse every step from the bucket
            assert main(["run", "-c", sys.argv[1], "--json"]) == 0
        print("NODES", len([n for n in ray.nodes() if n["Alive"]]))
    finally:
        ray.shutdown()
        cluster.shutdown()
    """
)


def _config(folder: Path, storage_root: str, tracking_uri: str = "") -> Path:
    path = folder / "study.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            name: on-object-storage
            storage_root: {storage_root}
            tracking_uri: "{tracking_uri}"
            tasks: [normal, reshading, edge_texture]
            data: {{n_train: 24, n_transfer: 12, n_test: 12, size: 16, rows_per_shard: 12}}
            model: {{encoder: small, width: 8, downsample: 4}}
            train: {{epochs: 1, num_workers: 2, cpus_per_worker: 1}}
            tune: {{enabled: false}}
            transfer: {{orders: [2], beams: [2], epochs: 1, width: 16, replicates: 1}}
            taxonomy: {{budget: 1, max_order: 2}}
            analysis: {{bootstrap: 20}}
            """
        )
    )
    return path


def test_a_study_on_object_storage_without_a_tracking_server_is_refused_in_one_line(tmp_path):
    cfg = load_pipeline_config(_config(tmp_path, "s3://some-bucket/study"))
    with pytest.raises(ConfigError) as err:
        preflight(cfg)
    message = str(err.value)
    assert message.startswith("tracking_uri (default: SQLite under the storage root) is a local store")
    assert "storage_root s3://some-bucket/study is remote" in message
    assert "mlflow server --backend-store-uri postgresql" in message and "\n" not in message


def test_a_sqlite_store_is_refused_for_a_root_shared_by_several_nodes(tmp_path):
    cfg = load_pipeline_config(_config(tmp_path, str(tmp_path / "runs")))
    check_tracking_store(cfg, shared=False)  # one machine: SQLite is fine
    with pytest.raises(ConfigError, match=r"^tracking_uri sqlite:///.* is shared by the nodes of a cluster"):
        check_tracking_store(cfg, shared=True)


# Slow (make test-all): the S3 store, shards and lock on moto are in test_storage; two nodes in test_multinode.
@pytest.mark.slow
@pytest.mark.cluster
def test_a_study_runs_on_s3_and_a_postgres_mlflow_server_over_two_nodes_and_reruns_from_the_bucket(
    tmp_path, s3_server, mlflow_pg_server
):
    from tests.services import s3_env

    env = s3_env(s3_server)
    workdir = tmp_path / "work"  # the driver's only local folder: it must stay empty
    workdir.mkdir()
    cache = tmp_path / "cache"
    config = _config(tmp_path, f"s3://{s3_server.bucket}/study", mlflow_pg_server.url)
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(config)],
        cwd=workdir,
        env=os.environ | env | {"TASKATLAS_CACHE": str(cache), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    first, second = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert "NODES 2" in proc.stdout

    assert sorted(first["networks_trained"]) == ["edge_texture", "normal", "reshading"]
    assert first["readouts_ran"] > 0 and first["taxonomy"]["roots"]
    assert second["networks_trained"] == [] and second["readouts_ran"] == 0  # all from the bucket
    assert second["taxonomy"] == first["taxonomy"]

    keys = _keys(s3_server)
    steps = {k.split("/")[1] for k in keys if k.startswith("study/")}
    assert {"data", "stage1", "stage2", "features", "readouts", "affinity", "taxonomy", "ray"} <= steps
    assert any(k.startswith("mlartifacts/") for k in keys)  # MLflow's artifacts, proxied
    assert list(workdir.iterdir()) == []  # nothing written locally but the cache
    cached = [p for p in cache.rglob("*") if p.is_file()]  # features, each with its record
    entries = {p for p in cached if p.suffix == ".npy"}
    assert entries and set(cached) == entries | {p.with_name(p.name + ".json") for p in entries}

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_pg_server.url)
    experiment = client.get_experiment_by_name("on-object-storage")
    parents = client.search_runs([experiment.experiment_id], "tags.command = 'run'")
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in parents)
    readouts_experiment = client.get_experiment_by_name("on-object-storage/readouts")
    readouts = client.search_runs([readouts_experiment.experiment_id], "tags.candidate_key LIKE '%'")
    # each replicate logged once, on its candidate's run; `self` scored too
    assert sum(r.data.metrics["replicates"] for r in readouts) == first["readouts_ran"] + 3


def _keys(server) -> list[str]:
    from tests.services import s3_client

    client = s3_client(server)
    keys, token = [], None
    while True:
        page = client.list_objects_v2(Bucket=server.bucket, **({"ContinuationToken": token} if token else {}))
        keys += [o["Key"] for o in page.get("Contents", [])]
        if not (token := page.get("NextContinuationToken")):
            return keys
