"""Stage II: transfer readouts on frozen, cached encoders, as a parallel, resumable Ray fan-out.

    taskatlas transfer -c configs/quickstart.yaml                  # laptop: one readout per core
    taskatlas transfer -c configs/taskonomy-gpu.yaml               # cluster: 4 readouts per GPU
    taskatlas transfer -c configs/quickstart.yaml --tasks normal,reshading,edge_texture \\
        --set transfer.orders=[] --set transfer.beams=[] --set transfer.epochs=2    # smoke

Steps, all driven from here (the plain parts live in `components.transfer`):
1. Feature cache: one Ray Data pass per (split, input view) reads the images once and runs every
   encoder whose features are missing (a class UDF: each actor loads the encoders once). Stored as
   `<root>/features/<encoder hash>/<data version>/<view>/{transfer,test}.npy` (+ `.ids.npy`),
   rows sorted by image id, the folder renamed into place when complete; reused by every run.
2. Fan-out: every readout is one Ray task with declared resources (`cpus_per_readout`, and
   `gpus_per_readout` of a GPU on GPU clusters), retried `max_retries` times. A `ray.wait` loop
   submits a target's higher-order readouts as soon as its own first-order readouts are done.
   Each finished readout writes `<root>/readouts/<target>/<sources>.<readout key>.parquet`
   atomically itself, so a killed driver loses only readouts in flight and a rerun skips the
   rest. The readout key hashes only what determines that readout (`Stage2.readout_keys`), so
   another study (a task added or removed) reuses it. A readout that still fails after its
   retries is reported by name; the others go on.
3. The driver logs each finished readout as a nested MLflow run `transfer/<S>-><t>` (one create,
   one batch, one close), then writes `transfer_losses.parquet` and `summary.parquet`, logs
   them to the stage run `transfer`, and writes `result.json` last, only if no readout failed
   (otherwise `failed.json`, and a rerun retries just those).

Why Ray tasks rather than a Tune grid: higher-order readouts exist only once their target's
first-order results are in (a dynamic graph a static grid cannot express), resume comes from the
stored readout files (no experiment state to restore for thousands of trials), and a task costs
far less to schedule than a trial actor.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray
import ray.data

from components.config import config_hash, to_dict
from components.data.shards import ShardStore, file_sha256
from components.errors import ConfigError
from components.models import representation_shape
from components.tasks import InputTransform, TaskKind
from components.tracking import Tracker
from components.transfer import (
    FeatureKind,
    FeatureSource,
    Readout,
    ReadoutKind,
    ReadoutSettings,
    TransferPlan,
    feature_channels,
    plan_transfers,
    prune_plan,
    top_k_for_budget,
)
from components.transfer.estimate import Estimate, EstimateJob, pruning_report, run_estimates
from components.transfer.jobs import (
    LOSS_SCHEMA,
    FeatureEncoder,
    ReadoutJob,
    ReadoutOutcome,
    calibrate_readout,
    read_readout,
    readout_path,
    run_readout,
    stored_outcome,
)
from pipelines.config import PipelineConfig, TransferConfig
from pipelines.progress import progress_bar
from pipelines.ray_data import ray_dataset
from pipelines.ray_runtime import cluster_cpus, cluster_gpus
from pipelines.stage1 import TaskResult, channels_for

SPLITS = ("transfer", "test")
_PLAN_FIELDS = ("orders", "beams", "targets", "baselines", "prune")  # which readouts, not how one trains
_RUNTIME_FIELDS = (  # TransferConfig fields that do not change a result: not in the stage key
    "encode_batch_size",
    "cpus_per_readout",
    "gpus_per_readout",
    "use_gpu",
    "max_retries",
    "fail_readouts",
)
_REMOTE_READOUT = ray.remote(run_readout)
_REMOTE_CALIBRATE = ray.remote(calibrate_readout)
_REMOTE_ESTIMATES = ray.remote(run_estimates)
READOUT_RUNS = "readout_runs.json"  # readout name -> MLflow run id, beside result.json
PRUNING = "pruning.json"  # beside transfer_losses.parquet when transfer.prune is on


# ---------------------------------------------------------------- driver side


@dataclass(frozen=True)
class Stage2Result:
    key: str
    out_dir: str
    losses_path: str
    summary_path: str
    run_id: str
    counts: dict[str, int]  # readouts per order / baseline in the final table
    failed: tuple[str, ...] = ()  # readout names that failed after their retries
    ran: int = 0  # readouts trained by this run (the rest were stored)

    @property
    def readout_runs(self) -> dict[str, str]:
        """Readout name (`a+b->t`) -> its MLflow run id (Stage III adds its affinity there)."""
        path = Path(self.out_dir) / READOUT_RUNS
        return json.loads(path.read_text()) if path.exists() else {}


@dataclass(frozen=True)
class ReadoutKeys:
    """Each readout's own key and file. The key hashes what determines the readout and nothing
    else: the readout settings, model and data (`common`), the target's definition, and its
    sources' feature keys (for `self`, the target's Stage I network). So any study that needs
    the same readout finds it stored, whatever other tasks it has."""

    root: Path  # the storage root
    common: str
    features: Mapping[str, str]  # source (task, `random`, `pixels`) -> feature key
    networks: Mapping[str, str]  # task -> its Stage I key
    targets: Mapping[str, str]  # task -> hash of its definition and output channels

    def key(self, r: Readout) -> str:
        if r.kind is ReadoutKind.SELF:  # the target's network, scored: no readout setting applies
            return config_hash("self-v2", r.name, self.targets[r.target], self.networks[r.target])
        names = r.sources if r.kind is ReadoutKind.TRANSFER else (r.kind.value,)
        return config_hash(self.common, r.name, self.targets[r.target], [self.features[n] for n in names])

    def path(self, r: Readout) -> Path:
        return readout_path(self.root, r, self.key(r))


@dataclass
class Stage2:
    """Stage II for one pipeline invocation. `encode_log` is a test seam counting encoder calls."""

    config: PipelineConfig
    store: ShardStore
    tracker: Tracker
    parent_run_id: str
    encode_log: Path | None = None

    @property
    def transfer(self) -> TransferConfig:
        return self.config.transfer

    @property
    def use_gpu(self) -> bool:
        return self.transfer.use_gpu if self.transfer.use_gpu is not None else cluster_gpus() > 0

    @property
    def settings(self) -> ReadoutSettings:
        t = self.transfer
        return ReadoutSettings(t.epochs, t.lr, t.weight_decay, t.batch_size, t.width, t.seed, t.val_fraction)

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
        return plan_transfers(targets, sources, t.orders, t.beams, t.baselines)

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
        encoders = {name: r.key for name, r in results.items()}
        return config_hash(
            "stage2", science, self.config.model, self.config.data.size, encoders, self.store.data_version
        )

    def readout_keys(self, results: Mapping[str, TaskResult]) -> ReadoutKeys:
        """How to key each readout of a study on these networks (see `ReadoutKeys`)."""
        science = {
            k: v for k, v in to_dict(self.transfer).items() if k not in (*_RUNTIME_FIELDS, *_PLAN_FIELDS)
        }
        common = config_hash(
            "readout-v1", science, self.config.model, self.config.data.size, self.store.data_version
        )
        features = {name: s.key for name, s in self.feature_sources(results).items()}
        networks = {name: r.key for name, r in results.items()}
        return ReadoutKeys(self.config.root, common, features, networks, self._target_keys())

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

        out = [(r.name, "reuse" if stored(r) else "run") for r in (*plan.first_order, *plan.baselines)]
        for target in plan.targets:
            first = {r.sources[0]: stored(r) for r in plan.first_order_of(target)}
            if all(first.values()):
                beam = plan.higher_order(target, {s: o.val_loss for s, o in first.items()})
                out += [(r.name, "reuse" if stored(r) else "run") for r in beam]
            elif n := sum(plan.higher_order_count(target, k) for k in plan.orders):
                out.append((f"{target}: up to {n} higher-order (beam after first order)", "run"))
        return out

    def out_dir(self, key: str) -> Path:
        return self.config.root / "stage2" / key

    def is_complete(self, key: str) -> bool:
        """`result.json` is written only when every readout of the plan succeeded."""
        return (self.out_dir(key) / "result.json").exists()

    # -- run
    def run(self, results: Mapping[str, TaskResult], plan: TransferPlan | None = None) -> Stage2Result:
        plan = plan or self.plan(list(results))
        key = self.key(results)
        out = self.out_dir(key)
        if self.is_complete(key):
            return Stage2Result(**{**json.loads((out / "result.json").read_text()), "ran": 0})
        keys = self.readout_keys(results)
        out.mkdir(parents=True, exist_ok=True)
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
            dirs = self._feature_dirs(results, plan)
            estimates: dict[tuple[str, str], Estimate] = {}
            if self.transfer.prune.enabled:
                estimates = self._estimates(out, plan, dirs)
                plan = self._pruned(plan, estimates)
            fan = _FanOut(self, plan, keys, key, dirs, run_id, results)
            fan.run()
            if self.transfer.prune.enabled:
                self._write_pruning(out, run_id, plan, estimates, fan)
            result = self._finish(out, key, run_id, plan, fan, time.perf_counter() - start)
        except BaseException:
            self.tracker.end_run(run_id, failed=True)
            raise
        self.tracker.end_run(run_id, failed=bool(result.failed))
        return result

    def _job(self, r: Readout, dirs: tuple[str, ...], path: Path | str, checkpoint: str = "") -> ReadoutJob:
        t, task = self.transfer, self.config.task(r.target)
        return ReadoutJob(
            readout=r,
            task=task,
            feature_dirs=dirs,
            data_root=str(self.store.root),
            model=self.config.model,
            image_size=self.config.data.size,
            channels=channels_for(task, self.store),
            settings=self.settings,
            path=str(path),
            use_gpu=self.use_gpu,
            threads=max(1, int(t.cpus_per_readout)),
            fail=r.name in t.fail_readouts,
            checkpoint=checkpoint,
        )

    def _resources(self) -> dict:
        t = self.transfer
        return {"num_cpus": t.cpus_per_readout, "num_gpus": t.gpus_per_readout if self.use_gpu else 0}

    # -- pruning (design.md section 11)
    def _estimates(
        self, out: Path, plan: TransferPlan, dirs: Mapping[tuple[str, str], Path]
    ) -> dict[tuple[str, str], Estimate]:
        """(target, source) -> estimate for every planned first-order readout: one Ray task per
        target. Stored in the stage folder, so a resumed run prunes exactly as the first did."""
        stored = out / "estimates.json"
        if stored.exists():
            rows = json.loads(stored.read_text())
            return {(r["target"], r["source"]): Estimate(**r) for r in rows}
        p = self.transfer.prune
        refs = []
        for target in plan.targets:
            task, view = self.config.task(target), self.config.task(target).input.value
            job = EstimateJob(
                target=task,
                feature_dirs=tuple(
                    (r.sources[0], str(dirs[r.sources[0], view])) for r in plan.first_order_of(target)
                ),
                data_root=str(self.store.root),
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
        tmp = stored.with_suffix(".tmp")
        tmp.write_text(json.dumps([asdict(e) for e in estimates], indent=1))
        os.replace(tmp, stored)
        return {(e.target, e.source): e for e in estimates}

    def _pruned(self, plan: TransferPlan, estimates: Mapping[tuple[str, str], Estimate]) -> TransferPlan:
        """Top-K sources per target by estimate (K from the budget in budget mode), an audit sample
        of the rest, every baseline."""
        p = self.transfer.prune
        top_k = p.top_k
        if p.compute_fraction:
            seconds, _ = self.estimate(plan)
            spent = sum(e.seconds for e in estimates.values())
            top_k = top_k_for_budget(plan, p.compute_fraction, seconds, spent, p.audit_fraction)
        scores = {k: e.score for k, e in estimates.items()}
        return prune_plan(plan, scores, top_k, p.audit_fraction, self.transfer.seed)

    def _write_pruning(
        self,
        out: Path,
        run_id: str,
        plan: TransferPlan,
        estimates: Mapping[tuple[str, str], Estimate],
        fan: _FanOut,
    ) -> None:
        """`pruning.json`: what was pruned and audited, and how well the estimate ranked the
        first-order readouts that were trained (each target's top K and its audit sample)."""
        report = pruning_report(plan, estimates, {r: o.mean_loss for r, o in fan.outcomes.items()})
        report |= {
            "estimator": self.transfer.prune.estimator.value,
            "audit_fraction": self.transfer.prune.audit_fraction,
        }
        (out / PRUNING).write_text(json.dumps(report, indent=1))
        self.tracker.log_artifact(run_id, out / PRUNING)
        metrics = {"pruned": len(plan.pruned), "estimate_seconds": report["estimate_seconds"]}
        if report["spearman"] is not None:
            metrics["estimate_spearman"] = report["spearman"]
        self.tracker.log_metrics(run_id, metrics)

    # -- feature cache
    def feature_sources(self, results: Mapping[str, TaskResult]) -> dict[str, FeatureSource]:
        """Source name -> feature source: each task's encoder (keyed by its checkpoint's hash),
        `random` (keyed by architecture and seed) and `pixels` (keyed by the rearrangement)."""
        model, seed = self.config.model, self.transfer.seed
        out = {
            name: FeatureSource(name, FeatureKind.ENCODER, _checkpoint_key(r.model_path), r.model_path)
            for name, r in results.items()
        }
        out["random"] = FeatureSource("random", FeatureKind.RANDOM, f"random-{config_hash(model, seed)}")
        out["pixels"] = FeatureSource("pixels", FeatureKind.PIXELS, f"pixels-{model.downsample}")
        return out

    def _feature_dirs(
        self, results: Mapping[str, TaskResult], plan: TransferPlan
    ) -> dict[tuple[str, str], Path]:
        """(source name, view) -> its complete cache folder, encoding whatever is missing first."""
        sources = self.feature_sources(results)
        kinds = {r.kind for r in plan.baselines}
        names = [n for n in sources if n not in ("random", "pixels") or ReadoutKind(n) in kinds]
        views = sorted({self.config.task(t).input for t in plan.targets}, key=lambda v: v.value)
        dirs = {(n, v.value): self._cache_dir(sources[n], v) for n in names for v in views}
        missing = [
            (sources[n], InputTransform(v)) for (n, v), d in dirs.items() if not (d / "info.json").exists()
        ]
        if missing:
            self._encode(missing)
        return dirs

    def _cache_dir(self, source: FeatureSource, view: InputTransform) -> Path:
        return self.config.root / "features" / source.key / self.store.data_version / view.value

    def _encode(self, pairs: list[tuple[FeatureSource, InputTransform]]) -> None:
        """One Ray Data pass over both splits for every pair; each folder renamed into place when full."""
        model, size = self.config.model, self.config.data.size
        h, w = representation_shape(model, size)[1:]
        finals = [self._cache_dir(s, v) for s, v in pairs]
        tmps = [f.parent / f".{f.name}.{uuid.uuid4().hex}.tmp" for f in finals]
        ids = {split: np.sort(self.store.read(split, [])["image_id"].astype(str)) for split in SPLITS}
        arrays: dict[tuple[int, str], np.ndarray] = {}
        for i, ((source, _), tmp) in enumerate(zip(pairs, tmps, strict=True)):
            tmp.mkdir(parents=True, exist_ok=True)
            for split in SPLITS:
                np.save(tmp / f"{split}.ids.npy", ids[split])
                shape = (len(ids[split]), feature_channels(source.kind, model), h, w)
                arrays[i, split] = np.lib.format.open_memmap(tmp / f"{split}.npy", "w+", np.float16, shape)
        filled = {split: np.zeros(len(ids[split]), bool) for split in SPLITS}
        gpus = cluster_gpus() if self.use_gpu else 0
        data = ray_dataset(self.store, SPLITS[0], ["rgb"]).union(
            *(ray_dataset(self.store, s, ["rgb"]) for s in SPLITS[1:])
        )
        encoded = data.map_batches(
            FeatureEncoder,
            fn_constructor_kwargs={
                "pairs": pairs,
                "model": model,
                "random_seed": self.transfer.seed,
                "use_gpu": gpus > 0,
                "log": str(self.encode_log) if self.encode_log else None,
            },
            batch_size=self.transfer.encode_batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=gpus or max(1, min(cluster_cpus() - 1, 8))),
            num_cpus=1,
            num_gpus=1 if gpus else 0,
        )
        for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
            batch_ids = batch["image_id"].astype(str)
            for split in SPLITS:
                mine = np.isin(batch_ids, ids[split])
                rows = np.searchsorted(ids[split], batch_ids[mine])
                for i in range(len(pairs)):
                    arrays[i, split][rows] = batch[f"f{i}"][mine]
                filled[split][rows] = True
        if missed := {s: int((~f).sum()) for s, f in filled.items() if not f.all()}:
            raise RuntimeError(f"the feature pass missed images: {missed}")
        for array in arrays.values():
            array.flush()
        for (source, view), tmp, final in zip(pairs, tmps, finals, strict=True):
            (tmp / "info.json").write_text(json.dumps({**asdict(source), "view": view.value}, default=str))
            if (final / "info.json").exists():  # another run finished it first
                shutil.rmtree(tmp)
                continue
            shutil.rmtree(final, ignore_errors=True)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)

    # -- output
    def _finish(
        self, out: Path, key: str, run_id: str, plan: TransferPlan, fan: _FanOut, seconds: float
    ) -> Stage2Result:
        readouts = sorted(fan.outcomes)
        tables = [read_readout(fan.keys.path(r)) for r in readouts]
        losses = pa.concat_tables(tables) if tables else LOSS_SCHEMA.empty_table()
        summary = pa.table(
            {
                "target": [r.target for r in readouts],
                "sources": [list(r.sources) for r in readouts],
                "order": pa.array([r.order for r in readouts], pa.int32()),
                "kind": [r.kind.value for r in readouts],
                "mean_loss": [fan.outcomes[r].mean_loss for r in readouts],
                "val_loss": [fan.outcomes[r].val_loss for r in readouts],
                "seconds": [fan.outcomes[r].seconds for r in readouts],
            }
        )
        paths = {"losses_path": out / "transfer_losses.parquet", "summary_path": out / "summary.parquet"}
        for table, path in ((losses, paths["losses_path"]), (summary, paths["summary_path"])):
            tmp = path.with_suffix(".tmp")
            pq.write_table(table, tmp)
            os.replace(tmp, path)
            self.tracker.log_artifact(run_id, path)
        readable = summary.set_column(1, "sources", pc.binary_join(summary["sources"], "+"))
        pacsv.write_csv(readable, out / "summary.csv")  # for the MLflow UI, which cannot show Parquet
        self.tracker.log_artifact(run_id, out / "summary.csv")
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
            key=key,
            out_dir=str(out),
            losses_path=str(paths["losses_path"]),
            summary_path=str(paths["summary_path"]),
            run_id=run_id,
            counts=counts,
            failed=failed,
            ran=fan.ran,
        )
        if failed:  # incomplete: no result.json, so a rerun retries the failed readouts
            errors = {r.name: err for r, err in fan.failed.items()}
            (out / "failed.json").write_text(json.dumps(errors, indent=1, sort_keys=True))
        else:
            (out / "failed.json").unlink(missing_ok=True)
            runs = {r.name: fan.runs[fan.keys.key(r)][0] for r in readouts if fan.keys.key(r) in fan.runs}
            (out / READOUT_RUNS).write_text(json.dumps(runs, indent=1, sort_keys=True))
            done = {k: v for k, v in asdict(result).items() if k not in ("ran", "failed")}
            (out / "result.json").write_text(json.dumps(done, indent=1))
        return result


STAGE_NOTE = """Every readout into a target, as a nested run named `target <- sources`: a small
network trained on the frozen features of its sources (the `transfer` split less a validation
part), scored per test image; lower loss is better. Baselines: `self` is the target's own fully
supervised network (the bar a transfer tries to reach), `pixels` a readout on the raw image (no
encoder), `random` a readout on a frozen random-init encoder (what architecture alone gives).
After Stage III each readout run also has `affinity`, `quality` (win rate against `self`) and
`gain` (win rate against `pixels`)."""


def _checkpoint_key(path: str) -> str:
    """An encoder's feature key: its checkpoint's hash, read once per file version (a run asks
    for it for the readout keys and again for the feature cache; a ResNet-50 is ~100 MB)."""
    stat = os.stat(path)
    return _sha256_prefix(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=256)
def _sha256_prefix(path: str, mtime_ns: int, size: int) -> str:
    return file_sha256(Path(path))[:16]


def readout_run_name(r: Readout) -> str:
    """Target first, so the useful part shows in MLflow's run table: `normal <- depth_euclidean`."""
    return f"{r.target} <- {'+'.join(r.sources)}"


class _FanOut:
    """The `ray.wait` loop: submits, collects, logs, and releases higher orders per target."""

    def __init__(
        self,
        stage: Stage2,
        plan: TransferPlan,
        keys: ReadoutKeys,
        stage_key: str,
        dirs: Mapping[tuple[str, str], Path],
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
        self.runs = self._known_runs()

    def run(self) -> None:
        total = sum(self.plan.counts().values())  # stored readouts tick it at once
        with progress_bar(total, "readouts", unit="readout") as update:
            self.update: Callable[[int], None] = update
            for r in (*self.plan.first_order, *self.plan.baselines):
                self._start(r)
            while self.pending:
                ready, _ = ray.wait(list(self.pending), num_returns=1)
                r = self.pending.pop(ready[0])
                try:
                    self._done(ray.get(ready[0]), ran=True)
                except ray.exceptions.RayError as err:
                    self.failed[r] = str(err).strip().splitlines()[-1][:500]
                    self._log_failure(r, self.failed[r])
                    self.update(1)
                    self._settle(r)

    def _start(self, r: Readout) -> None:
        path = self.keys.path(r)
        stored = stored_outcome(path, r)
        if stored is not None:
            self._done(stored, ran=False)
            return
        if r.kind is ReadoutKind.SELF:  # the target's own network, scored like a readout
            job = self.stage._job(r, (), path, checkpoint=self.results[r.target].model_path)
        else:
            names = r.sources if r.kind is ReadoutKind.TRANSFER else (r.kind.value,)
            view = self.stage.config.task(r.target).input.value
            job = self.stage._job(r, tuple(str(self.dirs[(n, view)]) for n in names), path)
        options = {
            **self.stage._resources(),
            "max_retries": self.stage.transfer.max_retries,
            "retry_exceptions": True,
        }
        ref = _REMOTE_READOUT.options(name=f"readout {r.name}", **options).remote(job)
        self.pending[ref] = r

    def _done(self, outcome: ReadoutOutcome, ran: bool) -> None:
        r = outcome.readout
        self.outcomes[r] = outcome
        self.ran += ran and r.kind is not ReadoutKind.SELF  # `self` is scored, not trained
        self._log(outcome)
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

    def _known_runs(self) -> dict[str, tuple[str, str]]:
        """Readout runs already in MLflow: readout key -> (run id, status).

        The store, not a side file, says what is logged: a driver killed between creating a run
        and closing it leaves a run that the rerun finishes instead of duplicating, and a readout
        reused from another study keeps the run that study logged.
        """
        client, experiment = self.stage.tracker.client, [self.stage.tracker.experiment_id]
        runs, token = {}, None
        while True:
            page = client.search_runs(
                experiment, "tags.readout_key LIKE '%'", max_results=1000, page_token=token
            )
            for run in page:
                runs[run.data.tags["readout_key"]] = (run.info.run_id, run.info.status)
            if not (token := page.token):
                return runs

    def _run_for(self, r: Readout, extra: Mapping[str, str] | None = None) -> str:
        run_id, _ = self.runs.get(self.keys.key(r), (None, None))
        if run_id:
            return run_id
        tags = {
            "stage": "transfer",
            "key": self.key,
            "readout_key": self.keys.key(r),
            "readout": r.file_id,
            "target": r.target,
            "sources": "+".join(r.sources),
            "kind": r.kind.value,
            **(extra or {}),
        }
        outcome = self.outcomes.get(r)
        started = outcome.started if outcome is not None and outcome.started else None  # when it ran
        return self.stage.tracker.start_run(readout_run_name(r), self.run_id, tags, start_time=started)

    def _log(self, o: ReadoutOutcome) -> None:
        """One nested run per readout: create, one batched write, close (3 requests)."""
        r, tracker = o.readout, self.stage.tracker
        if self.runs.get(self.keys.key(r), (None, None))[1] == "FINISHED":
            return
        run = self._run_for(r)
        last = max(len(o.train_losses) - 1, 0)  # steps are 0-based epochs; scores are the last's
        rows = [("test_loss", o.mean_loss, last), ("seconds", o.seconds, last)]
        rows += [("val_loss", o.val_loss, last)] if o.val_loss == o.val_loss else []  # not NaN
        rows += [("train_loss", v, i) for i, v in enumerate(o.train_losses)]
        params = {
            "target": r.target,
            "sources": "+".join(r.sources),
            "order": str(r.order),
            "kind": r.kind.value,
        }
        tracker.log_history(run, rows, params)
        tracker.end_run(run, end_time=o.finished or None)  # when the Ray work ended
        self.runs[self.keys.key(r)] = (run, "FINISHED")

    def _log_failure(self, r: Readout, error: str) -> None:
        run = self._run_for(r, {"error": error})
        self.stage.tracker.end_run(run, failed=True)
        self.runs[self.keys.key(r)] = (run, "FAILED")
