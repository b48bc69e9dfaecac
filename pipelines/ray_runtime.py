"""Ray at the driver: connect once per process (the cluster in RAY_ADDRESS, or a local one on
loopback), read what the cluster has, and set what Ray Train reads from the driver."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import ray
import ray.data

from components.errors import TaskatlasError
from components.settings import read_settings


def ensure_ray() -> None:
    # Per-operator Ray Data bars from every worker drown the Train/Tune progress output.
    ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return
    settings = read_settings()
    # Quiet unless -v: Ray's start-up notices (a local instance started, token auth on) and Tune's
    # experiment tables say nothing a user acts on. Tune's legacy reporter prints nothing at
    # verbose 0, where its new one still prints a table per search.
    quiet = {} if settings.verbose else {"logging_level": logging.ERROR}
    if not settings.verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if settings.ray_address:
        context = ray.init(address=settings.ray_address, log_to_driver=settings.verbose, **quiet)
    else:
        context = ray.init(
            address="local",
            num_cpus=settings.ray_num_cpus,
            include_dashboard=settings.ray_dashboard,  # on loopback, behind Ray's token auth
            log_to_driver=settings.verbose,
            _node_ip_address="127.0.0.1",
            **quiet,
        )
    if not settings.verbose:  # workers' logs (Tune, Train, readouts) stay in Ray's log folder
        logs = Path(context.address_info["session_dir"]) / "logs"
        print(f"Ray, Tune and Train logs: {logs} (taskatlas -v shows them live)", file=sys.stderr, flush=True)


def set_train_report_poll(seconds: float) -> None:
    """How often Ray Train's controller polls its workers for reports (`train.report_poll_s`).

    Ray Train reads this only from the driver's environment, when `fit()` starts the controller.
    """
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(seconds)


def cluster_gpus() -> int:
    """GPUs of the cluster this process is connected to (0 when it is not connected)."""
    if not ray.is_initialized():
        return 0
    return int(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> int:
    return int(ray.cluster_resources().get("CPU", 0))


def cluster_nodes() -> int:
    """Alive nodes of the cluster this process is connected to (1 when it is not connected)."""
    if not ray.is_initialized():
        return 1
    return sum(1 for node in ray.nodes() if node["Alive"])


def fit_refusal(request: Mapping[str, float], nodes: Sequence[Mapping[str, float]], what: str) -> str | None:
    """Why no node could ever run one `request` (resource -> amount; 0 asks for none), or None.
    Ray would wait for such a node for ever, logging a warning a minute; we say so instead."""
    wanted = {k: v for k, v in request.items() if v > 0}
    if any(all(node.get(k, 0.0) >= v for k, v in wanted.items()) for node in nodes):
        return None
    asked = ", ".join(f"{v:g} {k}" for k, v in sorted(wanted.items()))
    largest = max(nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)), default={})
    has = f"{largest.get('CPU', 0.0):g} CPU, {largest.get('GPU', 0.0):g} GPU"
    return (
        f"{what} asks for {asked} on one node, and no node of this Ray cluster has that (the largest: {has})"
    )


def require_fits(request: Mapping[str, float], what: str) -> None:
    """`fit_refusal` on the cluster this process is connected to: an error on a local cluster,
    which cannot grow; a warning on one joined through RAY_ADDRESS, whose autoscaler may add a
    node that fits."""
    if not ray.is_initialized():
        return
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    if (why := fit_refusal(request, nodes, what)) is None:
        return
    if read_settings().ray_address is None:
        raise TaskatlasError(f"{why}: lower it (--set) or run on a cluster that has one")
    print(f"warning: {why}; waiting for the autoscaler to add one", file=sys.stderr, flush=True)
