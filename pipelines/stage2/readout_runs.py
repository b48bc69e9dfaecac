"""Stage II's readouts in MLflow: a run per target, a run per candidate, logged in batches.

A study of Taskonomy's size trains about 9,000 readouts (3,000 candidates x 3 replicates). One run
each buried the study: MLflow's UI lists 100 runs a page, newest first, so the stage runs sat
behind pages of readouts. So a candidate (`target <- sources`, or a baseline) is one run, its
replicates' figures its own metrics (`test_loss/r0`, `val_loss/r0`, `seconds/r0`, `train_loss/r0`
by epoch), kept in the study's readouts experiment (`Tracker.companion("readouts")`); its parent
is its target's run `transfer/<target>`, a child of the `transfer` stage run in the study's
experiment. A later replicate (another racing round, a rerun) is added to its candidate's run.

The fan-out hands every readout replicate that finished (or failed for good) to a `ReadoutRunLog`,
which buffers them and logs them with `Tracker.log_finished_runs` (several candidates at a time,
three requests each) every `batch` replicates or `seconds`, and at close:

    with ReadoutRunLog(tracker, parent_run_id=stage_run, stage_key=key) as runs:
        runs.add(outcome, readout_key, candidate_key)                 # a replicate that returned
        runs.add_failure(readout, readout_key, candidate_key, error)  # one that failed for good

MLflow, not a side file, says what is logged (`known_readout_runs`): a replicate is logged once
its candidate's run holds its `test_loss/r<k>` (or its `error.r<k>`); a candidate's run is found
again by its key (replicate 0's readout key), so a rerun, or another study that trains the same
readouts, adds to it instead of making a second.

    .venv/bin/python -m pytest tests/test_readout_runs.py            # SQLite; -m slow: PostgreSQL server
    .venv/bin/python benchmarks/tracking_scale.py                   # 9,000 readouts, PostgreSQL server
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from components.transfer import Readout
from components.transfer.readout_files import ReadoutOutcome
from pipelines.tracking.entities import DatasetRef, FinalStatus, FinishedRun
from pipelines.tracking.runs import Tracker

CANDIDATE_KEY_TAG = "candidate_key"  # replicate 0's readout key: what finds a candidate's run again
READOUT_KEY_TAG = "readout_key"  # `readout_key.r<k>`: replicate k's readout key, on its candidate's run
TARGET_STAGE = "transfer_target"  # the `stage` tag of a `transfer/<target>` run


def readout_run_name(r: Readout) -> str:
    """Target first, so the useful part shows in MLflow's run table: `normal <- depth_euclidean`.
    One name for every replicate: they share the candidate's run."""
    return f"{r.target} <- {'+'.join(r.sources)}"


def replicate_metric(name: str, replicate: int) -> str:
    """`test_loss/r2`: replicate 2's figure on its candidate's run (MLflow groups `test_loss/*`)."""
    return f"{name}/r{replicate}"


@dataclass(frozen=True)
class Replicate:
    """One finished (or failed) readout replicate, waiting to be logged on its candidate's run."""

    outcome: ReadoutOutcome
    readout_key: str
    candidate_key: str
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.error is None


@dataclass
class KnownRuns:
    """What the readouts experiment holds: each candidate's run, and each replicate's status there."""

    candidates: dict[str, str] = field(default_factory=dict)  # candidate key -> run id
    replicates: dict[str, tuple[str, str]] = field(default_factory=dict)  # readout key -> (run id, status)


def known_readout_runs(tracker: Tracker) -> KnownRuns:
    """The candidate runs in the tracker's readouts experiment and the replicates they hold: a
    replicate is FINISHED where its `test_loss/r<k>` is logged, FAILED where only its error is,
    else not logged (a run a killed driver left half-written). Where a candidate has several runs,
    the one holding most finished replicates wins, then the newest."""
    known, best, token = KnownRuns(), {}, None
    while True:
        page = tracker.client.search_runs(
            [tracker.companion("readouts")],
            f"tags.{CANDIDATE_KEY_TAG} LIKE '%'",
            max_results=1000,
            order_by=["attributes.start_time DESC"],
            page_token=token,
        )
        for run in page:
            tags, metrics = run.data.tags, run.data.metrics
            held = {}
            for tag, key in tags.items():
                if not tag.startswith(READOUT_KEY_TAG + ".r"):
                    continue
                k = tag.removeprefix(READOUT_KEY_TAG + ".r")
                if replicate_metric("test_loss", int(k)) in metrics:
                    held[key] = FinalStatus.FINISHED.value
                elif f"error.r{k}" in tags:
                    held[key] = FinalStatus.FAILED.value
            candidate = tags[CANDIDATE_KEY_TAG]
            score = sum(s == FinalStatus.FINISHED.value for s in held.values())
            if candidate in best and best[candidate] >= score:
                continue  # an older or emptier duplicate
            best[candidate] = score
            known.candidates[candidate] = run.info.run_id
            known.replicates |= {key: (run.info.run_id, status) for key, status in held.items()}
        if not (token := page.token):
            return known


def target_runs(tracker: Tracker, stage_key: str) -> dict[str, str]:
    """Target -> its `transfer/<target>` run of the Stage II step `stage_key` (a rerun adds to it)."""
    query = f"tags.stage = '{TARGET_STAGE}' and tags.key = '{stage_key}'"
    runs = tracker.client.search_runs(
        [tracker.experiment_id], query, max_results=1000, order_by=["attributes.start_time ASC"]
    )
    return {run.data.tags["target"]: run.info.run_id for run in runs}


def candidate_run(
    replicates: Sequence[Replicate],
    stage_key: str,
    parent_run_id: str,
    finished_before: int = 0,
    run_id: str | None = None,
    dataset: DatasetRef | None = None,
) -> FinishedRun:
    """The run of one candidate, or what `replicates` add to it (`run_id`: its run, made earlier;
    `finished_before`: replicates it already holds). Per replicate k: `test_loss/rk`,
    `seconds/rk`, `val_loss/rk` (unless NaN), `train_loss/rk` per epoch, and its readout key as
    the tag `readout_key.rk`; a failed one its `error.rk` instead of metrics (kept if a retry
    finishes it: its metrics then say it did). `replicates` counts the finished ones. FINISHED if
    any replicate finished, else FAILED. Times span its replicates' work (when the Ray work ran)."""
    now, first = time.time(), replicates[0]
    r = first.outcome.readout
    tags = {
        "stage": "transfer",
        "key": stage_key,
        CANDIDATE_KEY_TAG: first.candidate_key,
        "readout": readout_run_name(r),  # as the run is named: target first
        "target": r.target,
        "sources": "+".join(r.sources),
        "kind": r.kind.value,
    }
    rows: list[tuple[str, float, int]] = []
    for rep in replicates:
        o, k = rep.outcome, rep.outcome.readout.replicate
        tags[f"{READOUT_KEY_TAG}.r{k}"] = rep.readout_key
        if not rep.finished:
            tags[f"error.r{k}"] = rep.error
            continue
        last = max(len(o.train_losses) - 1, 0)  # steps are 0-based epochs; scores are the last's
        rows += [(replicate_metric("test_loss", k), o.mean_loss, last)]
        rows += [(replicate_metric("seconds", k), o.seconds, last)]
        rows += [(replicate_metric("val_loss", k), o.val_loss, last)] if o.val_loss == o.val_loss else []
        rows += [(replicate_metric("train_loss", k), v, i) for i, v in enumerate(o.train_losses)]
    finished = finished_before + sum(rep.finished for rep in replicates)
    rows.append(("replicates", finished, finished))  # stepped by itself: the latest is the largest
    params = {"target": r.target, "sources": "+".join(r.sources), "order": str(r.order), "kind": r.kind.value}
    status = FinalStatus.FINISHED if finished else FinalStatus.FAILED
    return FinishedRun(
        readout_run_name(r),
        tags,
        params,
        tuple(rows),
        start_time=min(rep.outcome.started or now for rep in replicates),
        end_time=max(rep.outcome.finished or now for rep in replicates),
        status=status,
        run_id=run_id,
        inputs=(dataset.input("transfer"),) if dataset is not None and run_id is None else (),
        parent_run_id=parent_run_id,
    )


class ReadoutRunLog:
    """The readout runs of one Stage II invocation, buffered and logged in batches.

    `add` and `add_failure` buffer a replicate (nothing if it is logged already) and log the
    buffer once it holds `batch` replicates or its oldest waited `seconds`; `flush` logs it now,
    `close` (or leaving a `with` block) too, and ends the target runs it touched. If logging
    fails, the error is raised and the replicates stay buffered; the next flush first asks MLflow
    which of them the failed attempt logged."""

    def __init__(
        self,
        tracker: Tracker,
        parent_run_id: str,
        stage_key: str,
        batch: int = 100,
        seconds: float = 10.0,
        known: KnownRuns | None = None,
        clock: Callable[[], float] = time.monotonic,
        dataset: DatasetRef | None = None,
    ):
        self.tracker, self.parent_run_id, self.stage_key = tracker, parent_run_id, stage_key
        self.dataset = dataset  # every candidate run's input
        self.batch, self.seconds, self._clock = batch, seconds, clock
        self._known = known if known is not None else known_readout_runs(tracker)
        self.targets = target_runs(tracker, stage_key)  # target -> its `transfer/<target>` run
        self._ends: dict[str, float] = {}  # target -> when its latest logged replicate finished
        self._pending: dict[str, Replicate] = {}  # readout key -> replicate, in arrival order
        self._oldest = 0.0  # clock reading when the oldest buffered replicate arrived
        self._stale = False  # a flush failed: `known` may miss what it logged

    @property
    def known(self) -> Mapping[str, tuple[str, str]]:
        """Readout key -> (its candidate's run id, the replicate's status), as logged so far."""
        return self._known.replicates

    def logged(self, readout_key: str) -> bool:
        """Whether the replicate's figures are on its candidate's run."""
        return self.known.get(readout_key, ("", ""))[1] == FinalStatus.FINISHED.value

    @property
    def pending(self) -> int:
        """Replicates buffered, not yet logged."""
        return len(self._pending)

    def add(self, outcome: ReadoutOutcome, readout_key: str, candidate_key: str) -> None:
        """Buffer a replicate that returned."""
        self._add(Replicate(outcome, readout_key, candidate_key))

    def add_failure(self, readout: Readout, readout_key: str, candidate_key: str, error: str) -> None:
        """Buffer a replicate that failed after its retries (its error tagged on the run)."""
        now = time.time()
        placeholder = ReadoutOutcome(readout, float("nan"), 0.0, started=now, finished=now)
        self._add(Replicate(placeholder, readout_key, candidate_key, error))

    def _add(self, rep: Replicate) -> None:
        if self.logged(rep.readout_key):
            return
        if not self._pending:
            self._oldest = self._clock()
        self._pending[rep.readout_key] = rep
        self.flush_if_due()

    def flush_if_due(self) -> bool:
        """Log the buffer if it is full or its oldest replicate waited long enough; whether it
        did. (`add` calls it; a caller that waits for work with a timeout may call it too.)"""
        if self._pending and (
            len(self._pending) >= self.batch or self._clock() - self._oldest >= self.seconds
        ):
            self.flush()
            return True
        return False

    def flush(self) -> None:
        """Log every buffered replicate now: on its candidate's run, made if it has none."""
        if not self._pending:
            return
        if self._stale:
            self._known = known_readout_runs(self.tracker)
            self._pending = {k: r for k, r in self._pending.items() if not self.logged(k)}
            self._stale = False
        by_candidate: dict[str, list[Replicate]] = {}
        for rep in self._pending.values():
            by_candidate.setdefault(rep.candidate_key, []).append(rep)
        held = Counter(
            run_id for run_id, status in self.known.values() if status == FinalStatus.FINISHED.value
        )
        runs = [self._run_of(candidate, reps, held) for candidate, reps in by_candidate.items()]
        try:
            run_ids = self.tracker.batches.log_finished_runs(
                None, runs, experiment_id=self.tracker.companion("readouts")
            )
        except Exception:
            self._stale = True
            raise
        for (candidate, reps), run, run_id in zip(by_candidate.items(), runs, run_ids, strict=True):
            self._known.candidates[candidate] = run_id
            for rep in reps:
                status = FinalStatus.FINISHED if rep.finished else FinalStatus.FAILED
                self._known.replicates[rep.readout_key] = (run_id, status.value)
            target = reps[0].outcome.readout.target
            self._ends[target] = max(self._ends.get(target, 0.0), run.end_time)
        self._pending.clear()

    def _run_of(self, candidate: str, reps: list[Replicate], held: Mapping[str, int]) -> FinishedRun:
        """`reps` as a run: added to the candidate's run if it has one (`held`: finished replicates
        per run id)."""
        run_id = self._known.candidates.get(candidate)
        started = min(r.outcome.started or time.time() for r in reps)
        parent = self._target_run(reps[0].outcome.readout.target, started)
        finished = held.get(run_id, 0) if run_id else 0
        return candidate_run(reps, self.stage_key, parent, finished, run_id, self.dataset)

    def _target_run(self, target: str, started: float) -> str:
        """The target's `transfer/<target>` run under the stage run, made when its first readout
        is logged (started when that readout's work began)."""
        if target not in self.targets:
            tags = {"stage": TARGET_STAGE, "key": self.stage_key, "target": target}
            self.targets[target] = self.tracker.start_run(
                f"transfer/{target}", self.parent_run_id, tags, start_time=started or None
            )
        return self.targets[target]

    def close(self) -> None:
        """Log what is buffered; end the target runs this log added to, at their last readout."""
        self.flush()
        for target, end in sorted(self._ends.items()):
            self.tracker.end_run(self.targets[target], end_time=end)
        self._ends.clear()

    def __enter__(self) -> ReadoutRunLog:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        with contextlib.suppress(Exception):  # log what finished, but let the first error surface
            self.close()
