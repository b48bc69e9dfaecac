"""Stage II's fan-out: every readout is one Ray task; a `ray.wait` loop submits, collects and
logs them, and releases a target's higher orders as soon as its first-order readouts are in.

Each readout runs with declared resources (`cpus_per_readout`, and `gpus_per_readout` of a GPU on
GPU clusters), retried `max_retries` times, and writes its own loss file to storage, so a killed
driver loses only the readouts in flight. A readout that still fails after its retries is
reported by name; the others go on. The driver logs each finished readout as a nested MLflow run,
in batches (`pipelines.readout_runs`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import ray

from components.transfer import Readout, ReadoutKind, TransferPlan
from components.transfer.jobs import ReadoutOutcome, run_readout, stored_outcome
from pipelines.progress import progress_bar
from pipelines.readout_runs import ReadoutRunLog
from pipelines.stage1 import TaskResult

if TYPE_CHECKING:
    from pipelines.stage2 import ReadoutKeys, Stage2

_REMOTE_READOUT = ray.remote(run_readout)


class FanOut:
    """The `ray.wait` loop: submits, collects, logs, and releases higher orders per target."""

    def __init__(
        self,
        stage: Stage2,
        plan: TransferPlan,
        keys: ReadoutKeys,
        stage_key: str,
        dirs: Mapping[tuple[str, str], str],
        run_id: str,
        results: Mapping[str, TaskResult],
    ):
        self.stage, self.plan, self.keys, self.dirs, self.run_id = stage, plan, keys, dirs, run_id
        self.results = results
        self.outcomes: dict[Readout, ReadoutOutcome] = {}
        self.failed: dict[Readout, str] = {}
        self.pending: dict[ray.ObjectRef, Readout] = {}
        self.first_left = {t: len(plan.first_order_of(t)) for t in plan.targets}
        self.ran = 0
        self.key = stage_key
        self.listed: dict[str, set[str]] = {}
        self.log = ReadoutRunLog(stage.tracker, run_id, stage_key)

    @property
    def runs(self) -> dict[str, tuple[str, str]]:
        """Readout key -> (MLflow run id, status), as logged so far."""
        return self.log.known

    def run(self) -> None:
        total = sum(self.plan.counts().values())  # stored readouts tick it at once
        with progress_bar(total, "readouts", unit="readout") as update, self.log:
            self.update: Callable[[int], None] = update
            for r in (*self.plan.first_order, *self.plan.baselines):
                self._start(r)
            while self.pending:
                ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=self.log.seconds)
                if not ready:  # nothing finished for a while: log what waits in the buffer
                    self.log.flush_if_due()
                    continue
                r = self.pending.pop(ready[0])
                try:
                    self._done(ray.get(ready[0]), ran=True)
                except ray.exceptions.RayError as err:
                    self.failed[r] = str(err).strip().splitlines()[-1][:500]
                    self.log.add_failure(r, self.keys.key(r), self.failed[r])
                    self.update(1)
                    self._settle(r)

    def _start(self, r: Readout) -> None:
        path = self.keys.path(r)
        stored = stored_outcome(path, r, self._stored_names(r.target))
        if stored is not None:
            self._done(stored, ran=False)
            return
        if r.kind is ReadoutKind.SELF:  # the target's own network, scored like a readout
            job = self.stage._job(r, (), path.uri, checkpoint=self.results[r.target].model_path)
        else:
            names = r.sources if r.kind is ReadoutKind.TRANSFER else (r.kind.value,)
            view = self.stage.config.task(r.target).input.value
            job = self.stage._job(r, tuple(self.dirs[(n, view)] for n in names), path.uri)
        options = {
            **self.stage._resources(),
            "max_retries": self.stage.transfer.max_retries,
            "retry_exceptions": True,
        }
        ref = _REMOTE_READOUT.options(name=f"readout {r.name}", **options).remote(job)
        self.pending[ref] = r

    def _stored_names(self, target: str) -> set[str]:
        """The readout files stored for a target: one listing, not a request per readout."""
        if target not in self.listed:
            self.listed[target] = {f.name for f in (self.keys.root / "readouts" / target).files()}
        return self.listed[target]

    def _done(self, outcome: ReadoutOutcome, ran: bool) -> None:
        r = outcome.readout
        self.outcomes[r] = outcome
        self.ran += ran and r.kind is not ReadoutKind.SELF  # `self` is scored, not trained
        self.log.add(outcome, self.keys.key(r))  # buffered: logged in batches
        self.update(1)
        self._settle(r)

    def _settle(self, r: Readout) -> None:
        """A first-order readout is in (or failed): release its target's higher orders when all are."""
        if r.kind is not ReadoutKind.TRANSFER or r.order != 1:
            return
        self.first_left[r.target] -= 1
        if self.first_left[r.target]:
            return
        losses = {  # validation losses: beams are never chosen on the test images
            x.sources[0]: self.outcomes[x].val_loss
            for x in self.plan.first_order_of(r.target)
            if x in self.outcomes
        }
        for x in self.plan.higher_order(r.target, losses):
            self._start(x)
