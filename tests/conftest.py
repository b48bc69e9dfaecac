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
