"""Stage II: transfer readouts on frozen, cached encoders, as a parallel, resumable Ray fan-out.

    taskatlas transfer -c configs/quickstart.yaml                  # laptop: one readout per core
    taskatlas transfer -c configs/taskonomy-gpu.yaml               # cluster: 4 readouts per GPU
    taskatlas transfer -c configs/quickstart.yaml --tasks normal,reshading,edge_texture \\
        --set transfer.orders=[] --set transfer.beams=[] --set transfer.epochs=2    # smoke

Plan, run, record, each in its module:
1. Plan (`pipelines.stage2.plan`): the readouts, each one's key and file, its job. The readout
   key hashes only what determines that readout, so another study (a task added or removed)
   reuses it.
2. Run, from here: the feature cache (`pipelines.stage2.features`: every encoder's features of the
   transfer and test images, written by the encoding workers themselves, reused by every run),
   pruning if asked (`pipelines.stage2.pruning`), the fan-out (`pipelines.stage2.fanout`: stacks of
   readouts as Ray tasks, each member writing `<root>/readouts/<target>/<sources>.<key>.parquet`,
   so a killed driver loses only what was in flight), then one Ray task per target joining its
   readouts into `losses/<target>.parquet` (what Stage III reads, a target at a time).
3. Record (`pipelines.stage2.record`): the summary, MLflow, and the step's marker, only if no
   readout failed. The step is `<root>/stage2/<key>/` (`pipelines.steps`).

Why Ray tasks rather than a Tune grid: higher-order readouts exist only once their target's
first-order results are in (a dynamic graph a static grid cannot express), resume comes from the
stored readout files (no experiment state to restore for thousands of trials), and a task costs
far less to schedule than a trial actor.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import ray

from components.config import to_dict
from components.data.shards import ShardStore
from components.racing import FLAGS, contested, next_round
from components.storage import Location
from components.tasks import TaskKind
from components.transfer import Readout, TransferPlan
from components.transfer.jobs import calibrate_readout
from components.transfer.readout_files import write_target_losses
from pipelines.analysis.run import study_affinity
from pipelines.config import PipelineConfig
from pipelines.invocation import dataset_ref
from pipelines.ray_runtime import cluster_cpus, cluster_gpus, require_fits
from pipelines.results import Stage2Result, TaskResult
from pipelines.stage2.fanout import FanOut
from pipelines.stage2.features import FeatureCache
from pipelines.stage2.plan import ReadoutKeys, Stage2Plan, feature_sources, network_results
from pipelines.stage2.pruning import estimates, pruned
from pipelines.stage2.readout_runs import ReadoutRunLog
from pipelines.stage2.record import LOSSES, STAGE_NOTE, record_pruning, record_stage
from pipelines.steps import Fence, Step
from pipelines.tracking.runs import Tracker

_REMOTE_CALIBRATE = ray.remote(calibrate_readout)
_REMOTE_TARGET_LOSSES = ray.remote(write_target_losses)


@dataclass
class Stage2:
    """Stage II for one pipeline invocation. Test seams: `encode_log` counts encoder calls,
    `fail_readouts` names readouts (`a->t`) whose every attempt raises."""

    config: PipelineConfig
    store: ShardStore
    tracker: Tracker
    parent_run_id: str
    fence: Fence  # the study lock's check, before each step's marker (`Invocation.fence`)
    encode_log: Path | None = None
    fail_readouts: tuple[str, ...] = ()

    @functools.cached_property
    def jobs(self) -> Stage2Plan:
        """The plan on this cluster: `transfer.use_gpu` unset asks Ray for GPUs, once, on first use
        (not when the stage is built: a study whose Stage II is complete never asks)."""
        use_gpu = self.config.transfer.use_gpu
        return Stage2Plan(
            self.config, self.store, cluster_gpus() > 0 if use_gpu is None else use_gpu, self.fail_readouts
        )

    @property
    def slots(self) -> int:
        """Readouts that run at once on this cluster."""
        t = self.config.transfer
        by_cpu = int(cluster_cpus() // t.cpus_per_readout)
        if not self.jobs.use_gpu:
            return max(by_cpu, 1)
        return max(min(by_cpu, int(cluster_gpus() / t.gpus_per_readout + 1e-9)), 1)

    @property
    def features(self) -> FeatureCache:
        return FeatureCache(self.config, self.store, self.jobs.use_gpu, self.encode_log)

    def estimate(self, plan: TransferPlan) -> tuple[float, int]:
        """(seconds per readout, parallel slots), from one short readout timed on a worker."""
        target = next(
            (t for t in plan.targets if self.config.task(t).kind is TaskKind.PIXEL), plan.targets[0]
        )
        job = self.jobs.job(Readout(target, (plan.sources[0],)), ("",), "")
        counts = self.store.manifest.counts
        n = min(counts["transfer"], 64) or 8
        remote = _REMOTE_CALIBRATE.options(**self.jobs.resources)
        seconds = ray.get(remote.remote(job, n, counts["transfer"], counts["test"]))
        return float(seconds), self.slots

    def run(self, results: Mapping[str, TaskResult], plan: TransferPlan | None = None) -> Stage2Result:
        plan = plan or self.jobs.plan(list(results))
        key = self.jobs.key(results)
        step = self.jobs.step(key)
        if step.complete:
            return Stage2Result(**{**step.info(), "ran": 0})
        keys = self.jobs.readout_keys(results)
        # A dead driver's unfinished run of this stage (marked KILLED at start) is continued, so one
        # run holds every readout of the stage; a new run gets the params.
        run_id = self.tracker.resume_or_start_run(
            "transfer",
            self.parent_run_id,
            {"stage": "transfer", "key": key},
            match="key",
            params={"key": key, "transfer": to_dict(self.config.transfer), "counts": plan.counts()},
        )
        self.tracker.describe(run_id, STAGE_NOTE)
        start = time.perf_counter()
        try:
            plan, fan = self._run(results, plan, keys, step, run_id)
            result = record_stage(
                self.tracker, step, run_id, plan, fan, time.perf_counter() - start, self.fence
            )
        except BaseException:
            self.tracker.end_run(run_id, failed=True)
            raise
        self.tracker.end_run(run_id, failed=bool(result.failed))
        return result

    def _run(
        self,
        results: Mapping[str, TaskResult],
        plan: TransferPlan,
        keys: ReadoutKeys,
        step: Step,
        run_id: str,
    ) -> tuple[TransferPlan, FanOut]:
        """Features (of every network replicate), pruning if asked, the fan-out, the per-target
        loss tables: the plan as run (pruned, if asked) and the finished fan-out. Pruning
        estimates read network replicate 0."""
        out = step.location
        asked = self.jobs.resources
        require_fits(
            {"CPU": asked["num_cpus"], "GPU": asked["num_gpus"]},
            "a readout (transfer.cpus_per_readout, transfer.gpus_per_readout)",
        )
        replicates = [network_results(results, n) for n in range(keys.network_replicates)]
        sources = [feature_sources(self.config, rs, n) for n, rs in enumerate(replicates)]
        dirs = self.features.ensure_replicates(sources, plan)
        prune = self.config.transfer.prune
        if prune.enabled:
            found = estimates(self.jobs, out, plan, dirs[0])
            plan = pruned(self.jobs, plan, found, lambda: self.estimate(plan)[0])
        log = ReadoutRunLog(self.tracker, run_id, step.key, dataset=dataset_ref(self.config, self.store))
        networks = [{name: r.model_path for name, r in rs.items()} for rs in replicates]
        race = self.config.transfer.race.enabled and plan.replicates > 1
        fan = FanOut(self.jobs, replace(plan, replicates=1) if race else plan, keys, dirs, networks, log)
        fan.run()
        for k in range(1, plan.replicates if race else 1):  # racing: replicate k where still open
            self._write_target_losses(out / LOSSES, sorted(fan.outcomes), keys)
            if not (more := self._race_round(plan, fan, out / LOSSES, k)):
                break  # the tables just written are the final ones
            fan.run_replicas(more, f"readouts (race round {k})")
        else:  # no racing, or its last round trained: the tables of every readout
            self._write_target_losses(out / LOSSES, sorted(fan.outcomes), keys)
        if prune.enabled:
            about = {"estimator": prune.estimator.value, "audit_fraction": prune.audit_fraction}
            record_pruning(self.tracker, out, run_id, plan, found, fan, about)
        return plan, fan

    def _race_round(self, plan: TransferPlan, fan: FanOut, losses: Location, k: int) -> list[Readout]:
        """Replicate k of each readout still in its target's race (`components.racing`), from the
        multi-bootstrap of the losses so far (Stage III's settings: resamples, seed, test subset).
        Only a readout that raced every earlier round goes on (successive elimination), so each
        has replicates 0..R_c - 1, as the multi-bootstrap reads them."""
        race = self.config.transfer.race
        rows = study_affinity(self.config, losses, require_self=False)  # a positioned task has no `self`
        counts: dict[tuple[str, tuple[str, ...]], int] = {}
        for r in fan.outcomes:
            counts[r.target, r.sources] = counts.get((r.target, r.sources), 0) + 1
        shares = rows.table.select(["target", "sources", "affinity", "p_best", *FLAGS]).to_pylist()
        still = contested(shares, counts, race.p_best, race.settled, race.top, race.flags)
        first = {(r.target, r.sources): replace(r, replicate=0) for r in fan.outcomes if r.replicate == 0}
        most = {c: len(plan.replicas(r)) for c, r in first.items()}
        return [replace(first[c], replicate=k) for c in next_round(counts, still, k, most)]

    def _write_target_losses(self, folder: Location, readouts: list[Readout], keys: ReadoutKeys) -> None:
        """`<target>.parquet` per target, each joined by a Ray task from its readout files."""
        by_target: dict[str, list[str]] = {}
        for r in readouts:
            by_target.setdefault(r.target, []).append(keys.path(r).uri)
        remote = _REMOTE_TARGET_LOSSES.options(num_cpus=1)
        ray.get(
            [remote.remote(files, (folder / f"{t}.parquet").uri) for t, files in sorted(by_target.items())]
        )
