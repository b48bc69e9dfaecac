"""The one place that reaches into third-party private modules (tests/test_dependencies.py allows
a private import here and nowhere else). Each use says what it needs and why no public API does;
the pinned ranges in pyproject.toml keep them stable, and a version bump re-checks them here.
Importing this module imports nothing heavy: each private module is imported when first used.

    from pipelines.compat import process_tracking_uri                      # pipelines/tracking/models.py
    from pipelines.compat import tracking_store                            # pipelines/tracking/runs.py
    from pipelines.compat import logging_step                              # pipelines/tracking/logger.py
    from pipelines.compat import RayTorchBackend, setup_torch_process_group  # stage1/loopback.py
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

_PROCESS_URI_LOCK = threading.Lock()


@contextlib.contextmanager
def process_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to `uri` for the block, then put back as it was (unset
    included). The public `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI to the
    environment (every subprocess started meanwhile inherits it) and resets the tracer provider,
    and `mlflow.get_tracking_uri` cannot tell "unset" from the default, so neither can restore."""
    from mlflow.tracking._tracking_service import utils

    with _PROCESS_URI_LOCK:
        before = utils._tracking_uri
        utils._tracking_uri = uri
        try:
            yield
        finally:
            utils._tracking_uri = before


def tracking_store(client: Any) -> Any:
    """An `MlflowClient`'s tracking store: its `update_run_info` ends a run in one request, where
    the public `set_terminated` also fetches the whole run and prints its URL (a second request per
    run, thousands of readout runs at a time)."""
    return client._tracking_client.store


def logging_step(monitor: Any) -> int:
    """How many samples a `SystemMetricsMonitor` has logged: none yet, when the block it watched
    was shorter than one interval, and then one is taken by hand (MLflow has no public count)."""
    return monitor._logging_step


def __getattr__(name: str) -> Any:
    """Ray Train's torch.distributed set-up, for pipelines/stage1/loopback.py: its backend (which
    that module subclasses to keep the rendezvous on loopback) and the two steps the backend runs
    on each worker. Ray makes only `TorchConfig` public; these are private to
    ray.train.torch.config (Ray is pinned to one minor release)."""
    if name == "RayTorchBackend":
        from ray.train.torch.config import _TorchBackend

        return _TorchBackend
    if name == "set_torch_distributed_env_vars":
        from ray.train.torch.config import _set_torch_distributed_env_vars

        return _set_torch_distributed_env_vars
    if name == "setup_torch_process_group":
        from ray.train.torch.config import _setup_torch_process_group

        return _setup_torch_process_group
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
