"""Stage II: transfer readouts on frozen, cached encoders, as a parallel, resumable Ray fan-out.

    taskatlas transfer -c configs/quickstart.yaml                  # laptop: one readout per core
    taskatlas transfer -c configs/taskonomy-gpu.yaml               # cluster: 4 readouts per GPU
    taskatlas transfer -c configs/quickstart.yaml --tasks normal,reshading,edge_texture \\
        --set transfer.orders=[] --set transfer.beams=[] --set transfer.epochs=2    # smoke

Steps, all driven from here (the plain parts live in `components.transfer`), each in its module:
1. Feature cache (`pipelines.feature_cache`): every encoder's features of the transfer and test
   images, written to storage by the encoding workers themselves, reused by every run.
2. Fan-out (`pipelines.fanout`): every readout one Ray task that writes its own loss file,
   `<root>/readouts/<target>/<sources>.<readout key>.parquet`, so a killed driver loses only the
   readouts in flight and a rerun skips the rest. The readout key hashes only what determines
   that readout (`Stage2.readout_keys`), so another study (a task added or removed) reuses it.
3. Here: per target, one Ray task joins its readouts into `losses/<target>.parquet` (what Stage
   III reads, a target at a time: no process holds the whole study's losses); the driver writes
   `summary.parquet` and, only if no readout failed, the step's marker (otherwise `failed.json`,
   and a rerun retries just those). The step is `<root>/stage2/<key>/` (`pipelines.steps`).

Why Ray tasks rather than a Tune grid: higher-order readouts exist only once their target's
first-order results are in (a dynamic graph a static grid cannot express), resume comes from the
stored readout files (no experiment state to restore for thousands of trials), and a task costs
far less to schedule than a trial actor.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import ray

from components.config import config_hash, to_dict
from components.data.shards import ShardStore
from components.errors import ConfigError
from components.storage import Location, location
from components.tasks import TaskKind, channels_for
from components.tracking import Tracker
from components.transfer import (
    FeatureSource,
    Pairing,
    Readout,
    ReadoutKind,
    ReadoutSettings,
    TransferPlan,
    build_readout,
    plan_transfers,
    prune_for_budget,
    prune_plan,
    readout_seed,
)
from components.transfer.estimate import Estimate, EstimateJob, pruning_report, run_estimates
from components.transfer.jobs import (
    ReadoutJob,
    ReadoutOutcome,
    calibrate_readout,
    readout_path,
    stored_outcome,
    write_target_losses,
)
from pipelines.config import PipelineConfig, TransferConfig
from pipelines.fanout import FanOut
from pipelines.feature_cache import FeatureCache, feature_sources
from pipelines.ray_runtime import cluster_cpus, cluster_gpus
from pipelines.stage1 import TaskResult
from pipelines.steps import Step, log_stored_artifact

# Which readouts, not how one trains: not in a readout's key. `pairing` and `seed` reach it as the
# readout's own seed (`ReadoutKeys`), so raising `replicates` reuses every replicate already stored.
_PLAN_FIELDS = ("orders", "beams", "targets", "baselines", "prune", "replicates", "widen_beams", "pairing")
_RUNTIME_FIELDS = (  # TransferConfig fields that do not change a result: not in the stage key
    "encode_batch_size",
    "stack",
    "stack_memory_gb",
    "cpus_per_readout",
    "gpus_per_readout",
    "use_gpu",
    "max_retries",
    "fail_readouts",
)
_REMOTE_CALIBRATE = ray.remote(calibrate_readout)
_REMOTE_ESTIMATES = ray.remote(run_estimates)
_REMOTE_TARGET_LOSSES = ray.remote(write_target_losses)
AUTO_STACK = 16  # `transfer.stack: 0` where stacking pays (docs/benchmarks.md)
READOUT_RUNS = "readout_runs.json"  # readout name -> MLflow run id, in the step folder
LOSSES = "losses"  # the step's folder of per-target loss tables, `<target>.parquet`
PRUNING = "pruning.json"  # beside transfer_losses.parquet when transfer.prune is on


# ---------------------------------------------------------------- driver side


@dataclass(frozen=True)
class Stage2Result:
    key: str
    out_dir: str  # the step folder's URI
    losses_dir: str  # its per-target loss tables, `<target>.parquet`
    summary_path: str
    run_id: str
    counts: dict[str, int]  # readouts per order / baseline in the final table
    failed: tuple[str, ...] = ()  # readout names that failed after their retries
    ran: int = 0  # readouts trained by this run (the rest were stored)

    @property
    def losses(self) -> Location:
        return location(self.losses_dir)

    def summary(self) -> pa.Table:
        """One row per readout replicate: target, sources, order, replicate, kind, mean/val loss, seconds."""
        return location(self.summary_path).read_parquet()

    def all_losses(self) -> pa.Table:
        """Every target's losses in one table: for small studies, the CLI and tests (Stage III
        reads one target at a time)."""
        return pa.concat_tables([f.read_parquet() for f in sorted(self.losses.files(), key=str)])

    @property
    def readout_runs(self) -> dict[str, str]:
        """Readout name (`a+b->t`) -> its MLflow run id (Stage III adds its affinity there)."""
        path = location(self.out_dir) / READOUT_RUNS
        return path.read_json() if path.exists() else {}


@dataclass(frozen=True)
class ReadoutKeys:
    """Each readout's own key and file. The key hashes what determines the readout and nothing
    else: the readout settings, model and data (`common`), the target's definition, and its
    sources' feature keys (for `self`, the target's Stage I network). So any study that needs
    the same readout finds it stored, whatever other tasks it has."""

    root: Location  # the storage root
    common: str
    features: Mapping[str, str]  # source (task, `random`, `pixels`) -> feature key
    networks: Mapping[str, str]  # task -> its Stage I key
    targets: Mapping[str, str]  # task -> hash of its definition and output channels
    seed: int = 0  # transfer.seed (also in `common`)
    pairing: Pairing = Pairing.PAIRED
    scratch_epochs: int = 0  # transfer.scratch_epochs: in the keys of `scratch` baselines only

    def key(self, r: Readout) -> str:
        if r.kind is ReadoutKind.SELF:  # the target's network, scored: no readout setting applies
            return config_hash("self-v2", r.name, self.targets[r.target], self.networks[r.target])
        if r.kind is ReadoutKind.SCRATCH:  # no features: the raw images, and its own epochs
            parts = [self.common, r.name, self.targets[r.target], {"scratch_epochs": self.scratch_epochs}]
            if (seed := self.seed_of(r)) != self.seed:
                parts.append({"seed": seed})
            return config_hash(*parts)
        names = r.sources if r.kind is ReadoutKind.TRANSFER else (r.kind.value,)
        parts = [self.common, r.name, self.targets[r.target], [self.features[n] for n in names]]
        if (seed := self.seed_of(r)) != self.seed:  # replicate 0, paired: the key it always had
            parts.append({"seed": seed})
        return config_hash(*parts)

    def seed_of(self, r: Readout) -> int:
        return readout_seed(self.seed, r, self.pairing)

    def path(self, r: Readout) -> Location:
        return readout_path(self.root, r, self.key(r))


@dataclass
class Stage2:
    """Stage II for one pipeline invocation. `encode_log` is a test seam counting encoder calls."""

    config: PipelineConfig
    store: ShardStore
    tracker: Tracker
    parent_run_id: str
    encode_log: Path | None = None
    _stack_sizes: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    @property
    def transfer(self) -> TransferConfig:
        return self.config.transfer

    @property
    def use_gpu(self) -> bool:
        return self.transfer.use_gpu if self.transfer.use_gpu is not None else cluster_gpus() > 0

    @property
    def settings(self) -> ReadoutSettings:
        """Replicate 0's settings; replicate r trains with `ReadoutKeys.seed_of` as its seed."""
        t = self.transfer
        return ReadoutSettings(
            t.epochs, t.lr, t.weight_decay, t.batch_size, t.width, t.seed, t.val_fraction, t.seed
        )

    @property
    def slots(self) -> int:
        """Readouts that run at once on this cluster."""
        by_cpu = int(cluster_cpus() // self.transfer.cpus_per_readout)
        if not self.use_gpu:
            return max(by_cpu, 1)
        return max(min(by_cpu, int(cluster_gpus() / self.transfer.gpus_per_readout + 1e-9)), 1)

    # -- plan
    def plan(self, sources: list[str]) -> TransferPlan:
        """Every configured task is a source; targets are `transfer.targets` or the non-source-only."""
        t = self.transfer
        if missing := [x for x in t.targets if x not in sources]:
            raise ConfigError(f"transfer.targets: {missing[0]!r} is not among the tasks {sources}")
        targets = list(t.targets) or [s for s in sources if not self.config.task(s).source_only]
        return plan_transfers(targets, sources, t.orders, t.beams, t.baselines, t.replicates, t.widen_beams)

    def estimate(self, plan: TransferPlan) -> tuple[float, int]:
        """(seconds per readout, parallel slots), from one short readout timed on a worker."""
        target = next(
            (t for t in plan.targets if self.config.task(t).kind is TaskKind.PIXEL), plan.targets[0]
        )
        job = self._job(Readout(target, (plan.sources[0],)), ("",), "")
        counts = self.store.manifest.counts
        n = min(counts["transfer"], 64) or 8
        seconds = ray.get(
            _REMOTE_CALIBRATE.options(**self._resources()).remote(job, n, counts["transfer"], counts["test"])
        )
        return float(seconds), self.slots

    def key(self, results: Mapping[str, TaskResult]) -> str:
        science = {k: v for k, v in to_dict(self.transfer).items() if k not in _RUNTIME_FIELDS}
        if not self.transfer.prune.enabled:  # pruning off: the key studies had before it existed
            science.pop("prune")
        if ReadoutKind.SCRATCH not in self.transfer.baselines:  # likewise, without a scratch baseline
            science.pop("scratch_epochs")
        encoders = {name: r.key for name, r in results.items()}
        return config_hash(
            "stage2", science, self.config.model, self.config.data.size, encoders, self.store.data_version
        )

    def readout_keys(self, results: Mapping[str, TaskResult]) -> ReadoutKeys:
        """How to key each readout of a study on these networks (see `ReadoutKeys`)."""
        t = self.transfer
        science = {
            k: v
            for k, v in to_dict(t).items()
            if k not in (*_RUNTIME_FIELDS, *_PLAN_FIELDS, "scratch_epochs")
        }
        common = config_hash(
            "readout-v1", science, self.config.model, self.config.data.size, self.store.data_version
        )
        features = {name: s.key for name, s in self.feature_sources(results).items()}
        networks = {name: r.key for name, r in results.items()}
        return ReadoutKeys(
            self.config.root,
            common,
            features,
            networks,
            self._target_keys(),
            t.seed,
            t.pairing,
            t.scratch_epochs,
        )

    def _target_keys(self) -> dict[str, str]:
        """Per task: its definition and output channels, which shape every readout into it."""
        catalog = self.config.catalog
        return {name: config_hash(catalog[name], channels_for(catalog[name], self.store)) for name in catalog}

    def preview(self, results: Mapping[str, TaskResult]) -> list[tuple[str, str]]:
        """(readout, "run" | "reuse") for `--dry-run`, from the networks trained so far: exact for
        first order and baselines, and for the higher orders of targets whose first-order readouts
        are all stored; other targets' higher orders are one line "up to N", as their beams come
        from first-order results still to be trained. A readout of an untrained network runs."""
        plan = self.plan(list(self.config.tasks))
        keys = self.readout_keys(results)

        def stored(r: Readout) -> ReadoutOutcome | None:
            try:
                return stored_outcome(keys.path(r), r)
            except KeyError:  # a source or the target has no trained network yet
                return None

        def status(readouts) -> list[tuple[str, str]]:
            return [(x.name, "reuse" if stored(x) else "run") for r in readouts for x in plan.replicas(r)]

        out = status((*plan.first_order, *plan.baselines))
        for target in plan.targets:
            first = {x: stored(x) for r in plan.first_order_of(target) for x in plan.replicas(r)}
            if all(first.values()):
                losses: dict[str, list[float]] = {}
                for x, o in first.items():
                    losses.setdefault(x.sources[0], []).append(o.val_loss)
                out += status(plan.higher_order(target, losses))
            elif n := sum(plan.higher_order_count(target, k) for k in plan.orders):
                out.append((f"{target}: up to {n} higher-order (beam after first order)", "run"))
        return out

    def step(self, key: str) -> Step:
        return Step(self.config.root, "stage2", key)

    def is_complete(self, key: str) -> bool:
        """The marker is written only when every readout of the plan succeeded."""
        return self.step(key).complete

    @property
    def features(self) -> FeatureCache:
        return FeatureCache(self.config, self.store, self.use_gpu, self.encode_log)

    def feature_sources(self, results: Mapping[str, TaskResult]) -> dict[str, FeatureSource]:
        return feature_sources(self.config, results)

    # -- run
    def run(self, results: Mapping[str, TaskResult], plan: TransferPlan | None = None) -> Stage2Result:
        plan = plan or self.plan(list(results))
        key = self.key(results)
        step = self.step(key)
        if step.complete:
            return Stage2Result(**{**step.info(), "ran": 0})
        keys = self.readout_keys(results)
        # A dead driver's unfinished run of this stage (marked KILLED at start) is continued, so one
        # run holds every readout of the stage; a new run gets the params.
        run_id = self.tracker.resume_or_start_run(
            "transfer",
            self.parent_run_id,
            {"stage": "transfer", "key": key},
            match="key",
            params={"key": key, "transfer": to_dict(self.transfer), "counts": plan.counts()},
        )
        self.tracker.describe(run_id, STAGE_NOTE)
        start = time.perf_counter()
        try:
            dirs = self.features.ensure(results, plan)
            estimates: dict[tuple[str, str], Estimate] = {}
            if self.transfer.prune.enabled:
                estimates = self._estimates(step.location, plan, dirs)
                plan = self._pruned(plan, estimates)
            fan = FanOut(self, plan, keys, key, dirs, run_id, results)
            fan.run()
            if self.transfer.prune.enabled:
                self._write_pruning(step.location, run_id, plan, estimates, fan)
            result = self._finish(step, run_id, plan, fan, time.perf_counter() - start)
        except BaseException:
            self.tracker.end_run(run_id, failed=True)
            raise
        self.tracker.end_run(run_id, failed=bool(result.failed))
        return result

    def _job(self, r: Readout, dirs: tuple[str, ...], path: str, checkpoint: str = "") -> ReadoutJob:
        t, task = self.transfer, self.config.task(r.target)
        seed = readout_seed(t.seed, r, t.pairing)
        return ReadoutJob(
            readout=r,
            task=task,
            feature_dirs=dirs,
            data_root=self.store.root.uri,
            model=self.config.model,
            image_size=self.config.data.size,
            channels=channels_for(task, self.store),
            settings=replace(
                self.settings,
                seed=seed,
                **({"epochs": t.scratch_epochs} if r.kind is ReadoutKind.SCRATCH else {}),
            ),
            path=path,
            use_gpu=self.use_gpu,
            threads=max(1, int(t.cpus_per_readout)),
            fail=r.first.name in t.fail_readouts,  # every replicate of it
            checkpoint=checkpoint,
        )

    def stack_size(self, target: str) -> int:
        """Readouts per stack into `target`: `transfer.stack` (0: 16, or 1 for a pixel target on
        CPUs), fewer where one member's rough footprint (parameters, gradients and AdamW's two
        moments; the decoder's activations kept for backward, about 16 floats per output value of
        a batch) times the stack would pass `transfer.stack_memory_gb`."""
        if target not in self._stack_sizes:
            t, task, size = self.transfer, self.config.task(target), self.config.data.size
            limit = t.stack or (1 if task.kind is TaskKind.PIXEL and not self.use_gpu else AUTO_STACK)
            channels = channels_for(task, self.store)
            rep = self.config.model.representation_channels
            net = build_readout(task, rep, self.config.model, size, t.width, channels)
            params = sum(p.numel() for p in net.parameters())
            member = 4 * (4 * params + 16 * t.batch_size * math.prod(task.output_shape(size, channels)))
            self._stack_sizes[target] = max(1, min(limit, int(t.stack_memory_gb * 2**30 // member)))
        return self._stack_sizes[target]

    def _resources(self) -> dict:
        t = self.transfer
        return {"num_cpus": t.cpus_per_readout, "num_gpus": t.gpus_per_readout if self.use_gpu else 0}

    # -- pruning (design.md section 11)
    def _estimates(
        self, out: Location, plan: TransferPlan, dirs: Mapping[tuple[str, str], str]
    ) -> dict[tuple[str, str], Estimate]:
        """(target, source) -> estimate for every planned first-order readout: one Ray task per
        target. Stored in the stage folder, so a resumed run prunes exactly as the first did."""
        stored = out / "estimates.json"
        if stored.exists():
            rows = stored.read_json()
            return {(r["target"], r["source"]): Estimate(**r) for r in rows}
        p = self.transfer.prune
        refs = []
        for target in plan.targets:
            task, view = self.config.task(target), self.config.task(target).input.value
            job = EstimateJob(
                target=task,
                feature_dirs=tuple(
                    (r.sources[0], dirs[r.sources[0], view]) for r in plan.first_order_of(target)
                ),
                data_root=self.store.root.uri,
                kind=p.estimator,
                settings=self.settings,
                model=self.config.model,
                image_size=self.config.data.size,
                channels=channels_for(task, self.store),
                short_epochs=p.short_epochs,
                use_gpu=self.use_gpu,
                threads=max(1, int(self.transfer.cpus_per_readout)),
            )
            refs.append(_REMOTE_ESTIMATES.options(**self._resources()).remote(job))
        estimates = [e for batch in ray.get(refs) for e in batch]
        stored.write_json([asdict(e) for e in estimates])
        return {(e.target, e.source): e for e in estimates}

    def _pruned(self, plan: TransferPlan, estimates: Mapping[tuple[str, str], Estimate]) -> TransferPlan:
        """Top-K sources per target by estimate (K from the budget in budget mode), the shared
        sources, an audit sample of the rest, every baseline."""
        p = self.transfer.prune
        scores = {k: e.score for k, e in estimates.items()}
        if not p.compute_fraction:
            return prune_plan(plan, scores, p.top_k, p.audit_fraction, self.transfer.seed, p.shared)
        seconds, _ = self.estimate(plan)
        spent = sum(e.seconds for e in estimates.values())
        pruned, cost = prune_for_budget(
            plan, scores, p.compute_fraction, seconds, spent, p.audit_fraction, self.transfer.seed, p.shared
        )
        if cost > p.compute_fraction:  # K never goes below 1: say so rather than overspend quietly
            print(
                f"transfer.prune.compute_fraction: {p.compute_fraction} cannot be met; the smallest "
                f"pruned plan (top_k {pruned.top_k}, shared {p.shared}, audit_fraction {p.audit_fraction}, "
                f"baselines never pruned) costs {cost:.2f} of the full plan",
                file=sys.stderr,
                flush=True,
            )
        return pruned

    def _write_pruning(
        self,
        out: Location,
        run_id: str,
        plan: TransferPlan,
        estimates: Mapping[tuple[str, str], Estimate],
        fan: FanOut,
    ) -> None:
        """`pruning.json`: what was pruned and audited, and how well the estimate ranked the
        first-order readouts that were trained (each target's top K and its audit sample)."""
        report = pruning_report(plan, estimates, {r: o.mean_loss for r, o in fan.outcomes.items()})
        report |= {
            "estimator": self.transfer.prune.estimator.value,
            "audit_fraction": self.transfer.prune.audit_fraction,
        }
        (out / PRUNING).write_json(report)
        log_stored_artifact(self.tracker, run_id, out / PRUNING)
        metrics = {"pruned": len(plan.pruned), "estimate_seconds": report["estimate_seconds"]}
        if report["spearman"] is not None:
            metrics["estimate_spearman"] = report["spearman"]
        self.tracker.log_metrics(run_id, metrics)

    # -- output
    def _finish(
        self, step: Step, run_id: str, plan: TransferPlan, fan: FanOut, seconds: float
    ) -> Stage2Result:
        out = step.location
        readouts = sorted(fan.outcomes)
        self._write_target_losses(out / LOSSES, readouts, fan.keys)
        summary = pa.table(
            {
                "target": [r.target for r in readouts],
                "sources": [list(r.sources) for r in readouts],
                "order": pa.array([r.order for r in readouts], pa.int32()),
                "replicate": pa.array([r.replicate for r in readouts], pa.int32()),
                "kind": [r.kind.value for r in readouts],
                "mean_loss": [fan.outcomes[r].mean_loss for r in readouts],
                "val_loss": [fan.outcomes[r].val_loss for r in readouts],
                "seconds": [fan.outcomes[r].seconds for r in readouts],
            }
        )
        readable = summary.set_column(1, "sources", pc.binary_join(summary["sources"], "+"))
        with step.scratch() as scratch:
            pacsv.write_csv(readable, scratch / "summary.csv")  # the MLflow UI cannot show Parquet
            self.tracker.log_artifact(run_id, scratch / "summary.csv")
        (out / "summary.parquet").write_parquet(summary)
        log_stored_artifact(self.tracker, run_id, out / "summary.parquet")
        counts = {"order 1": 0} | {f"order {k}": 0 for k in plan.orders}
        for r in readouts:
            name = f"order {r.order}" if r.kind is ReadoutKind.TRANSFER else r.kind.value
            counts[name] = counts.get(name, 0) + 1
        failed = tuple(sorted(r.name for r in fan.failed))
        self.tracker.log_metrics(
            run_id,
            {
                "readouts": len(readouts),
                "readouts_run": fan.ran,
                "failed": len(failed),
                "wall_seconds": seconds,
            },
        )
        if failed:
            self.tracker.log_dict(run_id, {r.name: err for r, err in fan.failed.items()}, "failed.json")
        result = Stage2Result(
            key=step.key,
            out_dir=out.uri,
            losses_dir=(out / LOSSES).uri,
            summary_path=(out / "summary.parquet").uri,
            run_id=run_id,
            counts=counts,
            failed=failed,
            ran=fan.ran,
        )
        if failed:  # incomplete: no marker, so a rerun retries the failed readouts
            (out / "failed.json").write_json({r.name: err for r, err in fan.failed.items()})
        else:
            (out / "failed.json").unlink(missing_ok=True)
            runs = {r.name: fan.runs[fan.keys.key(r)][0] for r in readouts if fan.keys.key(r) in fan.runs}
            (out / READOUT_RUNS).write_json(runs)
            step.finish({k: v for k, v in asdict(result).items() if k not in ("ran", "failed")})
        return result

    def _write_target_losses(self, folder: Location, readouts: list[Readout], keys: ReadoutKeys) -> None:
        """`<target>.parquet` per target, each joined by a Ray task from its readout files."""
        by_target: dict[str, list[str]] = {}
        for r in readouts:
            by_target.setdefault(r.target, []).append(keys.path(r).uri)
        refs = [
            _REMOTE_TARGET_LOSSES.options(num_cpus=1).remote(files, (folder / f"{target}.parquet").uri)
            for target, files in sorted(by_target.items())
        ]
        ray.get(refs)


STAGE_NOTE = """Every readout into a target, as a nested run named `target <- sources`: a small
network trained on the frozen features of its sources (the `transfer` split less a validation
part), scored per test image; lower loss is better. Baselines: `self` is the target's own fully
supervised network (the bar a transfer tries to reach), `pixels` a readout on the raw image (no
encoder), `random` a readout on a frozen random-init encoder (what architecture alone gives).
After Stage III each readout run also has `affinity`, `quality` (win rate against `self`) and
`gain` (win rate against `pixels`)."""
