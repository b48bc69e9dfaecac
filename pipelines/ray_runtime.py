"""Ray at the driver: connect once per process (the cluster in RAY_ADDRESS, or a local one on
loopback), read what the cluster has, and set what Ray Train reads from the driver."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import ray
import ray.data

from components.errors import TaskatlasError, terminate_as_interrupt
from components.settings import read_settings


def ensure_ray(verbose: bool = False) -> None:
    """A local Ray, or the cluster at RAY_ADDRESS; quiet unless `verbose` (`taskatlas -v`, or
    TASKATLAS_VERBOSE=1 in the environment)."""
    # Per-operator Ray Data bars from every worker drown the Train/Tune progress output.
    ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return
    settings = read_settings()
    verbose = verbose or settings.verbose
    # Quiet unless -v: Ray's start-up notices (a local instance started, token auth on) and Tune's
    # experiment tables say nothing a user acts on. Tune's legacy reporter prints nothing at
    # verbose 0, where its new one still prints a table per search.
    quiet = {} if verbose else {"logging_level": logging.ERROR}
    if not verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if settings.ray_address:
        context = ray.init(address=settings.ray_address, log_to_driver=verbose, **quiet)
    else:
        context = ray.init(
            address="local",
            num_cpus=settings.ray_num_cpus,
            include_dashboard=settings.ray_dashboard,  # on loopback, behind Ray's token auth
            log_to_driver=verbose,
            _node_ip_address="127.0.0.1",
            **quiet,
        )
    if threading.current_thread() is threading.main_thread():
        terminate_as_interrupt()  # ray.init put Ray's SIGTERM handler (sys.exit) in place of ours
    if not verbose:  # workers' logs (Tune, Train, readouts) stay in Ray's log folder
        logs = Path(context.address_info["session_dir"]) / "logs"
        print(f"Ray, Tune and Train logs: {logs} (taskatlas -v shows them live)", file=sys.stderr, flush=True)


def set_train_report_poll(seconds: float) -> None:
    """How often Ray Train's controller polls its workers for reports (`train.report_poll_s`).

    Ray Train reads this only from the driver's environment, when `fit()` starts the controller.
    """
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(seconds)


_TUNE_NO_SIGINT = "TUNE_DISABLE_SIGINT_HANDLER"  # Ray Tune's documented switch, read per `fit()`


@contextmanager
def interrupts_kept() -> Iterator[None]:
    """Around a Ray Tune or Ray Train `fit()`: an interrupt (Ctrl+C, or a lost study lock, which
    interrupts the main thread) stays an interrupt, during the fit and after it.

    Both install SIGINT handlers and never restore them. Tune's ends a search "gracefully",
    returning its trials so far as if the search were done; Train's aborts the run and calls
    `sys.exit(0)` (surfacing as SystemExit 0 or 1), and left installed after the fit it swallows
    the next two interrupts and exits on the third. Here Tune's handler is switched off, a
    SystemExit out of a fit (only Train's handler raises one) becomes the KeyboardInterrupt it
    stands for, and both handlers are put back as they were."""
    main = threading.current_thread() is threading.main_thread()
    handlers = (
        {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)} if main else {}
    )
    before = os.environ.pop(_TUNE_NO_SIGINT, None)  # put back after: not a setting of ours
    os.environ[_TUNE_NO_SIGINT] = "1"
    try:
        yield
    except SystemExit:
        raise KeyboardInterrupt from None
    finally:
        if before is None:
            os.environ.pop(_TUNE_NO_SIGINT, None)
        else:
            os.environ[_TUNE_NO_SIGINT] = before
        for number, handler in handlers.items():
            if handler is not None:  # None: set outside Python, nothing to put back
                signal.signal(number, handler)


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
