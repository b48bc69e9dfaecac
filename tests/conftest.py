"""Shared fixtures: small datasets made once per session, one local Ray per session."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported: stay on loopback

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
