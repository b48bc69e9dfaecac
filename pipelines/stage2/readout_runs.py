"""Stage II's readout runs in MLflow: one nested run per readout, logged in batches.

The fan-out hands every readout that finished (or failed for good) to a `ReadoutRunLog`, which
buffers them and logs them with `Tracker.log_finished_runs` (several runs at a time, three
requests each, a fourth for the dataset input) every `batch` readouts or `seconds`, and at close. Thousands of readouts cost
seconds of tracking, not minutes of one request after another in the driver:

    with ReadoutRunLog(tracker, parent_run_id=stage_run, stage_key=key) as runs:
        runs.add(outcome, readout_key)                 # a readout that returned
        runs.add_failure(readout, readout_key, error)  # one that failed after its retries

MLflow, not a side file, says what is logged (`known_readout_runs`): a readout whose run is
FINISHED is not logged again (a rerun, or a readout another study logged); a run a killed driver
left RUNNING (or KILLED, FAILED) is completed instead of duplicated.

    .venv/bin/python -m pytest tests/test_readout_runs.py            # SQLite; -m slow: PostgreSQL server
    .venv/bin/python benchmarks/tracking_scale.py                   # 3,000 readout runs, PostgreSQL server
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Mapping

from components.transfer import Readout
from components.transfer.readout_files import ReadoutOutcome
from pipelines.tracking.entities import DatasetRef, FinalStatus, FinishedRun
from pipelines.tracking.runs import Tracker

READOUT_KEY_TAG = "readout_key"  # the readout's key: what finds its run again


def readout_run_name(r: Readout) -> str:
    """Target first, so the useful part shows in MLflow's run table: `normal <- depth_euclidean`."""
    return f"{r.target} <- {'+'.join(r.sources)}" + (f" #{r.replicate}" if r.replicate else "")


def known_readout_runs(tracker: Tracker) -> dict[str, tuple[str, str]]:
    """Readout runs already in the tracker's experiment: readout key -> (run id, status).

    Where a key has several runs, a FINISHED one wins, else the newest."""
    runs: dict[str, tuple[str, str]] = {}
    token = None
    while True:
        page = tracker.client.search_runs(
            [tracker.experiment_id],
            f"tags.{READOUT_KEY_TAG} LIKE '%'",
            max_results=1000,
            order_by=["attributes.start_time DESC"],
            page_token=token,
        )
        for run in page:
            key = run.data.tags[READOUT_KEY_TAG]
            if key not in runs or (run.info.status == "FINISHED" and runs[key][1] != "FINISHED"):
                runs[key] = (run.info.run_id, run.info.status)
        if not (token := page.token):
            return runs


def readout_run(
    outcome: ReadoutOutcome,
    readout_key: str,
    stage_key: str,
    error: str | None = None,
    dataset: DatasetRef | None = None,
) -> FinishedRun:
    """The run of one readout: FINISHED with its params and metrics (test_loss, seconds, val_loss
    unless NaN at the last epoch; train_loss per epoch), or, given an `error`, FAILED with the
    error as a tag and no metrics. Times are the outcome's (when the Ray work ran), else now.
    `dataset`: the study's, its input (the readout trains on its `transfer` split)."""
    r, now = outcome.readout, time.time()
    tags = {
        "stage": "transfer",
        "key": stage_key,
        READOUT_KEY_TAG: readout_key,
        "readout": readout_run_name(r),  # as the run is named: target first
        "target": r.target,
        "sources": "+".join(r.sources),
        "kind": r.kind.value,
        "replicate": str(r.replicate),
    }
    when = {"start_time": outcome.started or now, "end_time": outcome.finished or now}
    inputs = (dataset.input("transfer"),) if dataset is not None else ()
    if error is not None:
        return FinishedRun(
            readout_run_name(r), tags | {"error": error}, status=FinalStatus.FAILED, inputs=inputs, **when
        )
    o = outcome
    last = max(len(o.train_losses) - 1, 0)  # steps are 0-based epochs; scores are the last's
    rows = [("test_loss", o.mean_loss, last), ("seconds", o.seconds, last)]
    rows += [("val_loss", o.val_loss, last)] if o.val_loss == o.val_loss else []  # not NaN
    rows += [("train_loss", v, i) for i, v in enumerate(o.train_losses)]
    params = {
        "target": r.target,
        "sources": "+".join(r.sources),
        "order": str(r.order),
        "kind": r.kind.value,
        "replicate": str(r.replicate),
    }
    return FinishedRun(readout_run_name(r), tags, params, tuple(rows), inputs=inputs, **when)


class ReadoutRunLog:
    """The readout runs of one Stage II invocation, buffered and logged in batches.

    `add` and `add_failure` buffer a run (nothing if the readout's run is FINISHED already) and
    log the buffer once it holds `batch` runs or its oldest waited `seconds`; `flush` logs it now,
    `close` (or leaving a `with` block) too. If logging fails, the error is raised and the runs
    stay buffered; the next flush first asks MLflow which of them the failed attempt created."""

    def __init__(
        self,
        tracker: Tracker,
        parent_run_id: str,
        stage_key: str,
        batch: int = 100,
        seconds: float = 10.0,
        known: Mapping[str, tuple[str, str]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        dataset: DatasetRef | None = None,
    ):
        self.tracker, self.parent_run_id, self.stage_key = tracker, parent_run_id, stage_key
        self.dataset = dataset  # every run's input
        self.batch, self.seconds, self._clock = batch, seconds, clock
        # readout key -> (run id, status): what MLflow holds, updated as batches are logged
        self.known = dict(known) if known is not None else known_readout_runs(tracker)
        self._pending: dict[str, FinishedRun] = {}  # readout key -> its run, in arrival order
        self._oldest = 0.0  # clock reading when the oldest buffered run arrived
        self._stale = False  # a flush failed: `known` may miss runs it created

    def logged(self, readout_key: str) -> bool:
        """Whether the readout's run is FINISHED in MLflow."""
        return self.known.get(readout_key, ("", ""))[1] == FinalStatus.FINISHED.value

    @property
    def pending(self) -> int:
        """Runs buffered, not yet logged."""
        return len(self._pending)

    def add(self, outcome: ReadoutOutcome, readout_key: str) -> None:
        """Buffer the run of a readout that returned (a FINISHED run)."""
        self._add(readout_run(outcome, readout_key, self.stage_key, dataset=self.dataset))

    def add_failure(self, readout: Readout, readout_key: str, error: str) -> None:
        """Buffer the run of a readout that failed after its retries (a FAILED run, `error` tagged)."""
        now = time.time()
        placeholder = ReadoutOutcome(readout, float("nan"), 0.0, started=now, finished=now)
        self._add(readout_run(placeholder, readout_key, self.stage_key, error, self.dataset))

    def _add(self, run: FinishedRun) -> None:
        key = run.tags[READOUT_KEY_TAG]
        if self.logged(key):
            return
        if not self._pending:
            self._oldest = self._clock()
        self._pending[key] = run
        self.flush_if_due()

    def flush_if_due(self) -> bool:
        """Log the buffer if it is full or its oldest run waited long enough; whether it did.
        (`add` calls it; a caller that waits for work with a timeout may call it too.)"""
        if self._pending and (
            len(self._pending) >= self.batch or self._clock() - self._oldest >= self.seconds
        ):
            self.flush()
            return True
        return False

    def flush(self) -> None:
        """Log every buffered run now: a new run each, or the unfinished run MLflow has for it."""
        if not self._pending:
            return
        if self._stale:
            self.known = known_readout_runs(self.tracker)
            self._pending = {k: r for k, r in self._pending.items() if not self.logged(k)}
            self._stale = False
        keys = list(self._pending)
        runs = [dataclasses.replace(self._pending[k], run_id=self.known.get(k, (None, ""))[0]) for k in keys]
        try:
            run_ids = self.tracker.batches.log_finished_runs(self.parent_run_id, runs)
        except Exception:
            self._stale = True
            raise
        for key, run, run_id in zip(keys, runs, run_ids, strict=True):
            self.known[key] = (run_id, run.status.value)
        self._pending.clear()

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> ReadoutRunLog:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.flush()
            return
        with contextlib.suppress(Exception):  # log what finished, but let the first error surface
            self.flush()
