"""Shared fixtures: small datasets made once per session, one local Ray per session."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported: stay on loopback
os.environ.setdefault("TASKATLAS_RAY_DASHBOARD", "0")  # pipelines run as subprocesses start faster
if "TASKATLAS_CACHE" not in os.environ:  # the local feature cache: this session's own, not ~/.cache
    import tempfile

    os.environ["TASKATLAS_CACHE"] = tempfile.mkdtemp(prefix="taskatlas-test-cache-")

import pytest
import torch

from components.data.scenes import SceneConfig
from components.data.synthetic import DatasetConfig, generate_dataset


def pytest_report_header(config):
    """Which CPU kernels the numerics ran on: `make test-all` runs the `numerics` tests twice."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "the host's best")
    return f"CPU kernels: ATen {torch.backends.cpu.get_cpu_capability()}, oneDNN {isa}"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


TINY = DatasetConfig(
    n_train=40, n_transfer=16, n_test=16, seed=7, rows_per_shard=16, scene=SceneConfig(size=32)
)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A 72-image, 32x32 synthetic dataset (several shards per split). Treat as read-only."""
    root = tmp_path_factory.mktemp("tiny") / "data"
    generate_dataset(root, TINY)
    return root


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session, kept on loopback, without the dashboard."""
    import ray

    ray.init(
        address="local",  # a new instance of our own, never another process's cluster
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=512 * 1024**2,
        _node_ip_address="127.0.0.1",
    )
    yield ray
    ray.shutdown()


# Every process this test session starts (local Ray clusters, `ray start --head`, drivers run as
# subprocesses, `mlflow server`) inherits this marker, so the session can find and end what a
# killed or failed test left behind, and nothing else: no Ray process outlives `make test`.
SESSION_MARKER = f"TASKATLAS_TEST_SESSION={os.getpid()}"
os.environ["TASKATLAS_TEST_SESSION"] = str(os.getpid())


def pids_carrying(needle: str, cwd_prefix: str | None = None) -> set[int]:
    """Live processes, other than this one, whose environment or command line contains `needle`
    or whose working directory starts with `cwd_prefix` (Linux /proc; zombies have finished)."""
    from pathlib import Path

    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            blob = (proc / "environ").read_bytes() + (proc / "cmdline").read_bytes()
            if needle.encode() in blob or (cwd_prefix and os.readlink(proc / "cwd").startswith(cwd_prefix)):
                pids.add(int(proc.name))
        except OSError:  # gone, or not ours to read
            continue
    return pids


def pytest_sessionfinish(session, exitstatus):
    import signal
    import time

    if not os.path.isdir("/proc"):
        return
    deadline = time.monotonic() + 15  # Ray ends a dead driver's workers by itself; give it time
    while (left := pids_carrying(SESSION_MARKER + "\0")) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    if left:
        print(f"\nended {len(left)} process(es) the tests left behind: {sorted(left)}")


# ---------------------------------------------------------------- real services on loopback (tests/services.py)


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL 15 cluster on 127.0.0.1 (trust auth) for the session; skipped without initdb.
    `postgres.create_database(name)` returns a `postgresql+psycopg2://` URL."""
    from tests.services import PostgresUnavailable, require_postgres, start_postgres

    try:
        require_postgres()
    except PostgresUnavailable as err:
        pytest.skip(str(err))
    with start_postgres() as pg:
        yield pg


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 with a bucket: `.endpoint_url`, `.bucket`. Sets no variable;
    `tests.services.s3_env(s3_server)` gives the AWS_* ones for a subprocess or monkeypatch."""
    from tests.services import start_s3_server

    with start_s3_server() as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_pg_server(postgres, s3_server, tmp_path_factory):
    """`mlflow server` (one worker) on 127.0.0.1 backed by the session's PostgreSQL (a database of
    its own), proxying artifacts to `s3://<bucket>/mlartifacts` on the session's S3 server:
    `.url` is the tracking URI, `.backend_store_uri` the database."""
    from tests.services import s3_env, start_mlflow_server

    database = postgres.create_database("mlflow")
    artifacts = f"s3://{s3_server.bucket}/mlartifacts"
    folder = tmp_path_factory.mktemp("mlflow-pg-server")
    with start_mlflow_server(folder, database, artifacts, env=s3_env(s3_server)) as server:
        yield server


def assert_same_table(got, want) -> None:
    """Same columns and values, NaN equal to NaN (gain without pixels, p_best of self; a Parquet
    round trip renames list items, so the schemas may differ in those names)."""
    import numpy as np
    import pyarrow as pa

    assert got.column_names == want.column_names
    for name in want.column_names:
        if pa.types.is_floating(want[name].type):
            np.testing.assert_array_equal(got[name].to_numpy(), want[name].to_numpy())
        else:
            assert got[name].to_pylist() == want[name].to_pylist(), name


def affinity_with_intervals(losses, n: int, seed: int, *, paired: bool = True):
    """The whole loss table's affinity table with its intervals, `p_best` and baseline shares over
    n resamples (what Stage III computes one target at a time)."""
    from components.affinity import cube_affinity
    from components.loss_cube import loss_cube

    return cube_affinity(loss_cube(losses), n, seed, paired=paired).table


def bootstrap_affinities(cube, n: int, seed: int, *, paired: bool = True):
    """(n, T, n_cand) affinities of n resamples, 0 outside `candidate_mask(cube)`: the resamples
    of `cube_affinity` laid out over the cube's (target, candidate) grid."""
    import numpy as np

    from components.affinity import cube_affinity
    from components.bootstrap import candidate_mask

    samples = np.zeros((n, *cube.candidates.shape))
    t, c = np.nonzero(candidate_mask(cube))  # the rows of the cube's affinity table, in order
    samples[:, t, c] = cube_affinity(cube, n, seed, paired=paired).samples
    return samples
