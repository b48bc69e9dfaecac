"""Many runs logged at a time: readout runs by the thousand, each whole in a few requests, several
requests at once against a tracking server (one at a time on a local store). The tracker's
`batches`."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from pipelines.compat import tracking_store
from pipelines.tracking.entities import FinalStatus, FinishedRun
from pipelines.tracking.store import is_server


class RunHost(Protocol):
    """What a batch needs of the tracker (`pipelines.tracking.runs.Tracker`): its client and retry
    budget, its experiment, and the tags every run gets. Structural, so this module need not
    import the tracker that holds it."""

    tracking_uri: str
    experiment_id: str
    client: Any
    budget: Any
    source_tags: dict[str, str]
    run_tags: dict[str, str]


# Runs logged at once by `log_finished_runs`: requests in flight to a tracking server. The measured
# knee against a one-worker `mlflow server` on PostgreSQL (benchmarks/tracking_scale.py).
LOG_THREADS = 8


class RunBatches:
    def __init__(self, tracker: RunHost):
        self.tracker = tracker  # its client, budget, experiment and the tags every run gets

    def log_finished_runs(
        self,
        parent_run_id: str | None,
        runs: Sequence[FinishedRun],
        threads: int = LOG_THREADS,
        experiment_id: str | None = None,
    ) -> list[str]:
        """Log many runs whose work is over, each whole, and return their ids in order.

        A run costs three requests: created with its name, tags (the tracker's run tags and the
        parent too) and start time; its params and metrics in one batch; ended with its status and
        end time (a fourth when it has dataset `inputs`). Against a tracking server `threads` runs go at once; a local store (SQLite) takes
        them one at a time. If any run fails to log, the first error is raised once the others are
        done; a run it leaves RUNNING is found and completed by the next attempt (`run_id`).
        `experiment_id`: where new runs go, the tracker's experiment unless given."""
        experiment = experiment_id or self.tracker.experiment_id
        if not is_server(self.tracker.tracking_uri):
            threads = 1
        if threads <= 1 or len(runs) <= 1:
            return [self._log_finished(parent_run_id, run, experiment) for run in runs]
        ids: dict[int, str] = {}
        # The first run with a dataset input goes alone: MLflow records a dataset once per
        # experiment, and two first uses at once collide on its unique key.
        if (first := next((i for i, run in enumerate(runs) if run.inputs), None)) is not None:
            ids[first] = self._log_finished(parent_run_id, runs[first], experiment)
        with ThreadPoolExecutor(min(threads, len(runs)), thread_name_prefix="mlflow-log") as pool:
            futures = {
                i: pool.submit(self._log_finished, parent_run_id, run, experiment)
                for i, run in enumerate(runs)
                if i not in ids
            }
        ids |= {i: f.result() for i, f in futures.items()}
        return [ids[i] for i in range(len(runs))]

    def _log_finished(self, parent_run_id: str | None, run: FinishedRun, experiment_id: str) -> str:
        now = time.time()
        tags = {MLFLOW_RUN_NAME: run.name, **self.tracker.source_tags, **self.tracker.run_tags, **run.tags}
        if parent := run.parent_run_id or parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = parent
        tag_rows = [RunTag(k, str(v)) for k, v in tags.items()]
        run_id = run.run_id
        if run_id is None:
            start = int((run.start_time or now) * 1000)
            created = self.tracker.client.create_run(
                experiment_id, start_time=start, tags=tags, run_name=run.name
            )
            run_id = created.info.run_id
            tag_rows = []  # set with the run
        end = int((run.end_time or now) * 1000)
        metrics = [Metric(k, float(v), end, int(step)) for k, v, step in run.metrics]
        params = [Param(k, str(v)[:6000]) for k, v in run.params.items()]
        if metrics or params or tag_rows:
            self.tracker.client.log_batch(
                run_id, metrics=metrics, params=params, tags=tag_rows, synchronous=True
            )
        if run.inputs:
            self.tracker.client.log_inputs(run_id, list(run.inputs))
        self._end(run_id, run.status, end)
        return run_id

    def end_runs(
        self, run_ids: Sequence[str], status: FinalStatus, end_time: float = 0.0, threads: int = LOG_THREADS
    ) -> None:
        """End runs created earlier (one request each, `threads` at a time against a server);
        `end_time` in epoch seconds, 0 for now."""
        end = int((end_time or time.time()) * 1000)
        if not is_server(self.tracker.tracking_uri) or threads <= 1 or len(run_ids) <= 1:
            for run_id in run_ids:
                self._end(run_id, status, end)
            return
        with ThreadPoolExecutor(min(threads, len(run_ids)), thread_name_prefix="mlflow-end") as pool:
            futures = [pool.submit(self._end, run_id, status, end) for run_id in run_ids]
        for f in futures:
            f.result()

    def log_metrics_many(
        self, metrics: Mapping[str, Mapping[str, float]], threads: int = LOG_THREADS
    ) -> None:
        """One batch of metrics for each of many runs (run id -> metrics): `threads` requests at a
        time against a server, one at a time on a local store."""
        now = int(time.time() * 1000)

        def log(run_id: str) -> None:
            rows = [Metric(k, float(v), now, 0) for k, v in metrics[run_id].items()]
            self.tracker.client.log_batch(run_id, metrics=rows, synchronous=True)

        if not is_server(self.tracker.tracking_uri) or threads <= 1 or len(metrics) <= 1:
            for run_id in metrics:
                log(run_id)
            return
        with ThreadPoolExecutor(min(threads, len(metrics)), thread_name_prefix="mlflow-metrics") as pool:
            futures = [pool.submit(log, run_id) for run_id in metrics]
        for f in futures:
            f.result()

    def _end(self, run_id: str, status: FinalStatus, end_ms: int) -> None:
        """One UpdateRun request. `MlflowClient.set_terminated` would also fetch the whole run and
        print its URL (over HTTP), a second request per run; its store call is this one."""
        store = tracking_store(self.tracker.client.raw)
        self.tracker.budget.call(
            store.update_run_info, run_id, RunStatus.from_string(status.value), end_ms, None
        )
