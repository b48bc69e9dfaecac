"""The worker side of tracking: a `RunLogger` appends metrics to one run, made by the driver or at
the worker's first batch, and samples its machine while it trains."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from mlflow.entities import (
    Metric,
    RunTag,
)
from mlflow.tracking import MlflowClient

from components.storage import location
from pipelines.compat import logging_step
from pipelines.tracking.entities import RunToStart
from pipelines.tracking.retry import (
    DEFAULT_RETRY_S,
    BudgetedClient,
    RetryBudget,
    TrackingUnavailable,
    unanswered,
    use_retry_budget,
)
from pipelines.tracking.store import (
    is_server,
)

SYSTEM_METRICS_INTERVAL_S = 1.0  # how often a train run samples its machine's CPU, memory and GPU: a fit of
# a few seconds (the quickstart's) gets several samples, not one


@dataclass(frozen=True)
class RunLogger:
    """Picklable handle that appends metrics to one existing run (what a rank-0 worker gets)."""

    tracking_uri: str
    run_id: str
    retry_s: float = DEFAULT_RETRY_S  # `tracking.retry_s`: this process's budget (`RetryBudget`)

    @functools.cached_property
    def _client(self) -> BudgetedClient:
        """Made in the process that logs (a Ray worker), never pickled: `__getstate__`."""
        if is_server(self.tracking_uri):
            use_retry_budget(self.retry_s)
        return BudgetedClient(MlflowClient(self.tracking_uri), RetryBudget(self.tracking_uri, self.retry_s))

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_client"}

    @classmethod
    def start(cls, tracking_uri: str, run: RunToStart, retry_s: float = DEFAULT_RETRY_S) -> RunLogger:
        """The logger of the run `run` describes, made now, as its work begins, unless an earlier
        attempt made it (its `id_file`). A server silent for `retry_s`: a logger that logs nothing
        (`server_down`), and the driver makes the run when the work is over (`Tracker.start_planned`)."""
        ids = location(run.id_file)
        if ids.exists():
            return cls(tracking_uri, ids.read_json()["run_id"], retry_s)
        logger = cls(tracking_uri, "", retry_s)
        with contextlib.suppress(TrackingUnavailable):
            return cls(tracking_uri, run.create(logger._client, time.time()), retry_s)
        return logger

    @property
    def server_down(self) -> bool:
        """The budget is spent: the worker's later logging is skipped (`log_metrics`, `set_tags`),
        its training goes on, and the driver stops the run at its next tracking call."""
        return "_client" in self.__dict__ and self._client._budget.spent

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """The run's metrics only: its logged model gets the final epoch's when it is registered
        (`Tracker.register_weights`), so the model shows one value per key, not every epoch's.
        Nothing once the server is down (`server_down`): the weights on disk are the work."""
        now = int(time.time() * 1000)
        self._log([Metric(k, float(v), now, step) for k, v in metrics.items()], [])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._log([], [RunTag(k, str(v)) for k, v in tags.items()])

    def _log(self, metrics: list[Metric], tags: list[RunTag]) -> None:
        if self.server_down:
            return
        with contextlib.suppress(TrackingUnavailable):
            self._client.log_batch(self.run_id, metrics=metrics, tags=tags, synchronous=True)

    @contextlib.contextmanager
    def system_metrics(self, interval_s: float = SYSTEM_METRICS_INTERVAL_S) -> Iterator[None]:
        """MLflow's system metrics of this machine (`system/cpu_utilization_percentage`, memory,
        disk, network; GPUs too with nvidia-ml-py) on the run every `interval_s` while the block
        runs, and at least once; nothing where psutil is not installed (MLflow measures with it), or
        once the server is down (then what was not sent is lost: the block's work goes on)."""
        if importlib.util.find_spec("psutil") is None or self.server_down:
            yield
            return
        import psutil
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # psutil's CPU reading is the use since its previous call, and 0.0 on the first: call it
        # now, so that a block shorter than one interval does not read as an idle CPU.
        psutil.cpu_percent()
        monitor = SystemMetricsMonitor(
            self.run_id, sampling_interval=interval_s, resume_logging=True, tracking_uri=self.tracking_uri
        )
        first = logging_step(monitor)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()  # its own thread's failures are warnings
            if logging_step(monitor) == first and not self.server_down:  # shorter than one interval
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                try:
                    monitor.mlflow_logger.flush()
                except Exception as err:
                    if not unanswered(err):
                        raise

    def logged_steps(self, key: str) -> set[int]:
        """Steps at which the run already has metric `key` (what an earlier attempt logged)."""
        if self.server_down:
            return set()
        with contextlib.suppress(TrackingUnavailable):
            return {m.step for m in self._client.get_metric_history(self.run_id, key)}
        return set()
