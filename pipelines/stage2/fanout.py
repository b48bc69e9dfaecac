"""Stage II's fan-out: readouts go out as stacks, one Ray task each; a `ray.wait` loop submits,
collects and logs them, and releases a target's higher orders as soon as its first-order
readouts (every replicate) are in.

A stack is up to `transfer.stack` readouts into one target trained as one model (design.md
section 13): a target's first-order sources x replicates with its `random` baseline, its `pixels`
replicates, or one higher order's source sets x replicates (`scratch`, a whole network, goes alone). Each stack runs with declared
resources (`cpus_per_readout`, and `gpus_per_readout` of a GPU on GPU clusters), retried
`max_retries` times, and writes each member's loss file itself, so a killed driver loses only
the members in flight, and a retried or resumed stack skips the members already written. A member
that still fails after its retries is reported by name; the others go on. `self` (scored, not
trained) is a task of its own. Each readout replicate reads its network replicate's features,
and `self` replicate r its target's network replicate (`ReadoutKeys.network_of`). The driver
logs each finished readout on its candidate's MLflow run, in batches (`pipelines.stage2.readout_runs`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace

import ray

from components.disk_space import no_space_text
from components.errors import OutOfSpace
from components.transfer import Readout, ReadoutKind, TransferPlan
from components.transfer.jobs import StackJob, StackOutcome, run_readout, run_stack
from components.transfer.readout_files import ReadoutOutcome, stored_outcome
from pipelines.progress import progress_bar
from pipelines.stage2.plan import ReadoutKeys, Stage2Plan
from pipelines.stage2.readout_runs import ReadoutRunLog

_REMOTE_READOUT = ray.remote(run_readout)
_REMOTE_STACK = ray.remote(run_stack)


class FanOut:
    """The `ray.wait` loop: submits stacks, collects, logs, and releases higher orders per target.

    `jobs` makes each readout's job, its stack sizes and its resources; `dirs` are the feature
    folders ((source, view) -> URI) and `networks` the Stage I weights (task -> URI) that `self`
    scores, one mapping per network replicate (`ReadoutKeys.network_of` picks one); `log` records
    each finished readout in MLflow."""

    def __init__(
        self,
        jobs: Stage2Plan,
        plan: TransferPlan,
        keys: ReadoutKeys,
        dirs: Sequence[Mapping[tuple[str, str], str]],
        networks: Sequence[Mapping[str, str]],
        log: ReadoutRunLog,
    ):
        self.jobs, self.plan, self.keys, self.dirs, self.networks, self.log = (
            jobs,
            plan,
            keys,
            dirs,
            networks,
            log,
        )
        self.outcomes: dict[Readout, ReadoutOutcome] = {}
        self.failed: dict[Readout, str] = {}
        self.pending: dict[ray.ObjectRef, tuple[Readout, ...]] = {}
        self.first_left = {t: len(plan.first_order_of(t)) * plan.replicates for t in plan.targets}
        self.ran = 0
        self.listed: dict[str, set[str]] = {}

    @property
    def runs(self) -> dict[str, tuple[str, str]]:
        """Readout key -> (MLflow run id, status), as logged so far."""
        return self.log.known

    def run(self) -> None:
        """Every readout of the plan, each target's higher orders once its first order is in."""
        total = sum(self.plan.counts().values())  # stored readouts tick it at once
        with progress_bar(total, "readouts", unit="readout") as update, self.log:
            self.update: Callable[[int], None] = update
            for target in self.plan.targets:
                mine = [r for r in self.plan.baselines if r.target == target]
                self._submit([*self.plan.first_order_of(target), *mine])
            self._collect()

    def run_replicas(self, replicas: Sequence[Readout], label: str) -> None:
        """These readout replicates, as they are (a racing round: no higher orders released)."""
        self.first_left = {}
        with progress_bar(len(replicas), label, unit="readout") as update, self.log:
            self.update = update
            self._submit_replicas(replicas)
            self._collect()

    def _collect(self) -> None:
        """Until nothing is pending: each finished stack's members done, or failed."""
        while self.pending:
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=self.log.seconds)
            if not ready:  # nothing finished for a while: log what waits in the buffer
                self.log.flush_if_due()
                continue
            members = self.pending.pop(ready[0])
            try:
                outcome: StackOutcome | ReadoutOutcome = ray.get(ready[0])
            except ray.exceptions.RayError as err:
                _stop_if_disk_full(members, str(err))
                self._lost(members, str(err).strip().splitlines()[-1][:500])
                continue
            if isinstance(outcome, ReadoutOutcome):
                outcome = StackOutcome((outcome,))
            for o in outcome.outcomes:
                self._done(o, ran=True)
            for r, error in outcome.failed:
                _stop_if_disk_full((r,), error)
                self._fail(r, error)

    def _submit(self, readouts: Iterable[Readout]) -> None:
        """Every replicate of `readouts`, less those stored, as stacks (and `self` on its own)."""
        self._submit_replicas([x for r in readouts for x in self.plan.replicas(r)])

    def _submit_replicas(self, replicas: Iterable[Readout]) -> None:
        groups: dict[tuple, list[Readout]] = {}
        for x in replicas:
            stored = stored_outcome(self.keys.path(x), x, self._stored_names(x.target))
            if stored is not None:
                self._done(stored, ran=False)
            elif x.kind is ReadoutKind.SELF:  # the target's own network, scored like a readout
                weights = self.networks[self.keys.network_of(x)][x.target]
                job = self.jobs.job(x, (), self.keys.path(x).uri, weights)
                self._remote(_REMOTE_READOUT, f"readout {x.name}", job, (x,))
            elif x.kind is ReadoutKind.SCRATCH:  # a whole network on raw images: not stackable
                self._remote(
                    _REMOTE_READOUT,
                    f"readout {x.name}",
                    self.jobs.job(x, (), self.keys.path(x).uri),
                    (x,),
                )
            else:  # one input width per stack: first order with `random`, `pixels`, each higher order
                width = (x.kind is ReadoutKind.PIXELS, x.order)
                groups.setdefault((x.target, width), []).append(x)
        for (target, _), members in groups.items():
            size = self.jobs.stack_size(target)
            for i in range(0, len(members), size):
                chunk = tuple(members[i : i + size])
                job = StackJob(tuple(self._readout_job(x) for x in chunk))
                self._remote(_REMOTE_STACK, f"stack {job.name}", job, chunk)

    def _readout_job(self, x: Readout):
        names = x.sources if x.kind is ReadoutKind.TRANSFER else (x.kind.value,)
        view = self.jobs.config.task(x.target).input.value
        dirs = self.dirs[self.keys.network_of(x)]  # `pixels` and `random`: the same in each
        return self.jobs.job(x, tuple(dirs[(n, view)] for n in names), self.keys.path(x).uri)

    def _remote(self, function, name: str, job, members: tuple[Readout, ...]) -> None:
        options = {
            **self.jobs.resources,
            "max_retries": self.jobs.transfer.max_retries,
            "retry_exceptions": True,
        }
        self.pending[function.options(name=name, **options).remote(job)] = members

    def _stored_names(self, target: str) -> set[str]:
        """The readout files stored for a target: one listing, not a request per readout."""
        if target not in self.listed:
            self.listed[target] = {f.name for f in (self.keys.root / "readouts" / target).files()}
        return self.listed[target]

    def _lost(self, members: tuple[Readout, ...], error: str) -> None:
        """A stack failed after its retries: its members that were written are done, the rest failed."""
        for r in members:
            stored = stored_outcome(self.keys.path(r), r)
            self._done(stored, ran=True) if stored is not None else self._fail(r, error)

    def _fail(self, r: Readout, error: str) -> None:
        self.failed[r] = error
        self.log.add_failure(r, self.keys.key(r), self._candidate(r), error)
        self.update(1)
        self._settle(r)

    def _done(self, outcome: ReadoutOutcome, ran: bool) -> None:
        r = outcome.readout
        self.outcomes[r] = outcome
        self.ran += ran and r.kind is not ReadoutKind.SELF  # `self` is scored, not trained
        self.log.add(outcome, self.keys.key(r), self._candidate(r))  # buffered: logged in batches
        self.update(1)
        self._settle(r)

    def _candidate(self, r: Readout) -> str:
        """What finds the run every replicate of `r` is logged on: replicate 0's key."""
        return self.keys.key(replace(r, replicate=0))

    def _settle(self, r: Readout) -> None:
        """A first-order readout replicate is in (or failed): release its target's higher orders
        (every replicate) when all are, the beams chosen on the replicates' mean validation loss."""
        if r.kind is not ReadoutKind.TRANSFER or r.order != 1 or r.target not in self.first_left:
            return
        self.first_left[r.target] -= 1
        if self.first_left[r.target]:
            return
        self._submit(self.plan.higher_order(r.target, validation_losses(self.plan, r.target, self.outcomes)))


def _stop_if_disk_full(members: tuple[Readout, ...], error: str) -> None:
    """A readout that found the disk full: the stage stops (its retries, and the others, would
    find it full too), in one `OutOfSpace` naming what was written."""
    if (writing := no_space_text(error)) is not None:
        names = ", ".join(r.name for r in members[:3]) + (" ..." if len(members) > 3 else "")
        raise OutOfSpace(f"no space left on device in readout {names}", writing or f"readout {names}")


def validation_losses(
    plan: TransferPlan, target: str, outcomes: Mapping[Readout, ReadoutOutcome]
) -> dict[str, list[float]]:
    """Source -> its first-order readout's validation loss per replicate (those that finished):
    what a target's beams are chosen on. Never the test losses the win rates are computed on."""
    losses: dict[str, list[float]] = {}
    for first in plan.first_order_of(target):
        for x in plan.replicas(first):
            if x in outcomes:
                losses.setdefault(x.sources[0], []).append(outcomes[x].val_loss)
    return losses
