"""The whole study as one resumable flow: data -> Stage I -> II -> III -> IV.

    taskatlas run -c configs/quickstart.yaml                 # laptop (what `make demo` runs)
    taskatlas run -c configs/quickstart.yaml --dry-run       # which steps run, which are reused
    taskatlas run -c configs/taskonomy-gpu.yaml --stages transfer,affinity,taxonomy
    taskatlas submit --address http://HEAD:8265 -c configs/taskonomy-gpu.yaml --wait   # cluster

Every step's output lives under the storage root keyed by a hash of its config, its inputs'
keys and the data version (design.md section 1), so a killed run resumes and a changed setting
recomputes only what depends on it: a transfer setting never retrains task networks.
"""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass, field, replace
from enum import Enum

from components.answer import StudyAnswer
from components.data.shards import MANIFEST, ShardStore
from components.errors import TaskatlasError
from components.storage import Location
from components.tasks import Task
from components.vocabulary import SELF
from pipelines.analysis.plan import affinity_step, taxonomy_step
from pipelines.analysis.run import analyse
from pipelines.config import PipelineConfig
from pipelines.invocation import Invocation, dataset_folder
from pipelines.results import Stage2Result, TaskResult
from pipelines.stage1.plan import Stage1Plan, network_name
from pipelines.stage1.run import Stage1
from pipelines.stage2.plan import Stage2Plan, transfer_plan
from pipelines.stage2.record import LOSSES, READOUTS_TRAINED
from pipelines.stage2.run import Stage2
from pipelines.steps import DONE, StepStatus


class Stage(str, Enum):
    TRAIN = "train"
    TRANSFER = "transfer"
    AFFINITY = "affinity"
    TAXONOMY = "taxonomy"


ALL_STAGES = tuple(Stage)


def parse_stages(text: str | None) -> tuple[Stage, ...]:
    if not text:
        return ALL_STAGES
    try:
        wanted = {Stage(s.strip()) for s in text.split(",") if s.strip()}
    except ValueError:
        raise TaskatlasError(
            f"--stages: choose from {', '.join(s.value for s in Stage)}; got {text!r}"
        ) from None
    return tuple(s for s in ALL_STAGES if s in wanted)


@dataclass
class PipelineResult:
    data_version: str
    stage1: dict[str, TaskResult] = field(default_factory=dict)
    retrained: list[str] = field(default_factory=list)  # task networks (replicate 0) trained by this run
    # network replicates n > 0 (`train.replicates`) trained by this run, by name (`normal#1`)
    replicates_trained: list[str] = field(default_factory=list)
    stage2: Stage2Result | None = None
    affinity_path: Location | None = None  # the affinity table
    unlabelled_images: dict[str, int] = field(default_factory=dict)  # per target, left out
    taxonomy: StudyAnswer | None = None
    # each step of this run: StepStatus.RUN (it ran) or StepStatus.REUSE
    steps: list[tuple[str, StepStatus]] = field(default_factory=list)

    def summary(self, storage_root: str, run_id: str) -> dict:
        """What `taskatlas run --json` prints: what was trained, what was reused, the answer."""
        trained = self.stage2.ran if self.stage2 else 0
        readouts = sum(self.stage2.counts.values()) - self.stage2.counts.get(SELF, 0) if self.stage2 else 0
        networks = self.networks_trained
        return {
            "networks_trained": networks,  # by name: `normal`, and `normal#1` for replicate 1
            "networks_reused": [n for n in self.networks if n not in networks],
            "readouts_ran": trained,
            "readouts_reused": readouts - trained,
            "taxonomy": self.taxonomy.to_json() if self.taxonomy else None,
            "storage_root": storage_root,
            "run_id": run_id,
            "data_version": self.data_version,
            "losses": self.stage2.losses_dir if self.stage2 else None,  # per-image losses, per target
            "affinity": str(self.affinity_path) if self.affinity_path else None,  # Stage III's table
        }

    @property
    def networks(self) -> list[str]:
        """Every network of Stage I by name: each task's, then its replicates' (`normal#1`)."""
        return [network_name(t, n) for t, r in self.stage1.items() for n in range(1 + len(r.replicas))]

    @property
    def networks_trained(self) -> list[str]:
        return [*self.retrained, *self.replicates_trained]


def run_pipeline(inv: Invocation, stages: tuple[Stage, ...] = ALL_STAGES) -> PipelineResult:
    """Run the requested stages in order; earlier stages that are not requested must be complete."""
    cfg = inv.config
    tasks = cfg.study_tasks()
    result = PipelineResult(inv.store.data_version)
    planned = Stage1Plan(cfg, inv.store)
    before = {t.name: [r is not None for r in planned.finished_networks(t)] for t in tasks}
    if Stage.TRAIN in stages:
        result.stage1 = Stage1(cfg, inv.store, inv.tracker, inv.run_id, inv.fence, verbose=inv.verbose).run(
            tasks, search=True
        )
    else:
        result.stage1 = _require_stage1(planned, tasks)
    result.retrained = [t.name for t in tasks if not before[t.name][0]]
    result.replicates_trained = [
        network_name(t.name, n) for t in tasks for n, done in enumerate(before[t.name]) if n and not done
    ]
    result.steps += [
        (f"train/{network_name(t.name, n)}", StepStatus.REUSE if done else StepStatus.RUN)
        for t in tasks
        for n, done in enumerate(before[t.name])
    ]
    if not {Stage.TRANSFER, Stage.AFFINITY, Stage.TAXONOMY} & set(stages):
        return result

    stage2 = Stage2(cfg, inv.store, inv.tracker, inv.run_id, inv.fence)
    if Stage.TRANSFER not in stages and not stage2.jobs.is_complete(stage2.jobs.key(result.stage1)):
        raise TaskatlasError("stage transfer has not run for these settings; add it to --stages")
    result.stage2 = stage2.run(result.stage1)
    result.steps.append(("transfer", StepStatus.REUSE if result.stage2.ran == 0 else StepStatus.RUN))
    if result.stage2.failed:
        raise TaskatlasError(
            f"{len(result.stage2.failed)} readout(s) failed: {', '.join(result.stage2.failed)}"
        )
    if not {Stage.AFFINITY, Stage.TAXONOMY} & set(stages):
        return result

    analysis = analyse(
        cfg,
        result.stage2,
        inv.tracker,
        (inv.tracker.experiment_id, inv.run_id),
        inv.fence,
        taxonomy=Stage.TAXONOMY in stages,
    )
    result.steps += analysis.steps
    result.affinity_path = analysis.affinity.location / "affinity.parquet"
    result.unlabelled_images = analysis.unlabelled_images
    if analysis.answer is None:
        return result
    result.taxonomy = analysis.answer
    inv.tracker.log_metrics(
        inv.run_id,
        {
            "networks": len(result.networks),  # replicates included
            "networks_trained": len(result.networks_trained),
            # readout replicates (self's included): the candidate runs' `replicates`, summed
            "readouts": sum(result.stage2.counts.values()),
            READOUTS_TRAINED: result.stage2.ran,  # as on the transfer run
        },
    )
    return result


def dry_run(cfg: PipelineConfig, stages: tuple[Stage, ...] = ALL_STAGES) -> list[tuple[str, StepStatus]]:
    """What `run` would do, without running anything: each step's status."""
    folder = dataset_folder(cfg)
    if not (folder / MANIFEST).exists():
        return [("data", StepStatus.RUN)] + [
            (s.value, StepStatus.RUN if s in stages else StepStatus.SKIP) for s in ALL_STAGES
        ]
    store = ShardStore(folder)
    plan: list[tuple[str, StepStatus]] = [("data", StepStatus.REUSE)]
    stage1 = Stage1Plan(cfg, store)
    results, complete = {}, True
    for task in cfg.study_tasks():
        if cfg.tune.enabled:  # each search a network replicate trains with (`tune.each_replicate`)
            for n in stage1.searches():
                if stage1.searched_hparams(task, n) is None:
                    plan.append(
                        (
                            f"tune/{network_name(task.name, n)}",
                            StepStatus.RUN if Stage.TRAIN in stages else StepStatus.MISSING,
                        )
                    )
        networks = stage1.finished_networks(task)  # each network replicate (`train.replicates`)
        for n, cached in enumerate(networks):
            status = (
                StepStatus.REUSE
                if cached
                else StepStatus.RUN
                if Stage.TRAIN in stages
                else StepStatus.MISSING
            )
            plan.append((f"train/{network_name(task.name, n)}", status))
        complete &= None not in networks
        if networks[0] is not None:  # with the replicates trained so far, for the readouts' preview
            trained = tuple(itertools.takewhile(lambda r: r is not None, networks[1:]))
            results[task.name] = replace(networks[0], replicas=trained)
    downstream = [Stage.TRANSFER, Stage.AFFINITY, Stage.TAXONOMY]
    stage2 = Stage2Plan(cfg, store)
    if Stage.TRANSFER in stages:
        readouts = stage2.preview(results)
        if reused := sum(status is StepStatus.REUSE for _, status in readouts):
            plan.append((f"readouts ({reused} stored)", StepStatus.REUSE))
        plan += [(f"readout {name}", status) for name, status in readouts if status is StepStatus.RUN]
    if not complete:
        return plan + [(s.value, StepStatus.RUN if s in stages else StepStatus.SKIP) for s in downstream]
    transfer_key = stage2.key(results)
    steps = {Stage.TRANSFER: stage2.is_complete(transfer_key)}
    # keyed by Stage II's loss tables as its marker recorded them: only once Stage II is done
    losses = stage2.step(transfer_key).location / LOSSES
    affinity = affinity_step(cfg, transfer_key, losses) if steps[Stage.TRANSFER] else None
    steps[Stage.AFFINITY] = affinity is not None and affinity.complete
    steps[Stage.TAXONOMY] = steps[Stage.AFFINITY] and taxonomy_step(cfg, affinity.key).complete
    for s in downstream:
        plan.append(
            (s.value, StepStatus.REUSE if steps[s] else StepStatus.RUN if s in stages else StepStatus.SKIP)
        )
    return plan


def plan_size(cfg: PipelineConfig, readout_seconds: float | None = None) -> list[str]:
    """What the study's plan holds, from the config alone (a fresh root included): its networks
    and search trials, and its readouts by order and baseline, replicates included; higher
    orders at most (their beams come from the first-order results). With a per-readout time
    (`readout_seconds`, else the median measured by the newest finished Stage II on the root),
    the device-hours its readouts project to; with racing, what round 0 alone trains."""
    tasks, n = cfg.study_tasks(), cfg.train.replicates
    searches = len(Stage1Plan.searches_of(cfg)) if cfg.tune.enabled else 0
    trials = len(tasks) * searches * cfg.tune.num_samples
    counts = transfer_plan(cfg, list(cfg.tasks)).counts()
    higher = {f"order {k}" for k in cfg.transfer.orders}
    readouts = ", ".join(f"{kind} {'at most ' if kind in higher else ''}{c}" for kind, c in counts.items())
    lines = [
        f"networks: {len(tasks) * n} ({len(tasks)} tasks x {n} replicates), search trials: {trials}",
        f"readouts: {readouts} (x {cfg.transfer.replicates} replicates, included)",
    ]
    trained = sum(c for kind, c in counts.items() if kind != SELF)  # `self` is scored, not trained
    if cfg.transfer.race.enabled and (r := cfg.transfer.replicates) > 1:
        lines.append(
            f"racing: round 0 trains {trained // r} of the {trained}; later rounds only the candidates "
            "still in their target's race"
        )
    where = "given"
    if readout_seconds is None and (measured := measured_readout_seconds(cfg.root)) is not None:
        readout_seconds, where = measured, "the median of this root's newest Stage II"
    if readout_seconds is not None:
        hours = trained * readout_seconds / 3600
        lines.append(
            f"projected: {hours:,.1f} device-hours of readouts (at most), at {readout_seconds:.3g} s per "
            f"readout ({where}); networks and searches not included"
        )
    return lines


def measured_readout_seconds(root: Location) -> float | None:
    """The median seconds per trained readout of the newest finished Stage II on the root."""
    finished = [
        f
        for f in (root / "stage2").files(recursive=True)
        if f.name == "summary.parquet" and f.with_name(DONE).exists()
    ]
    if not finished:
        return None
    newest = max(finished, key=lambda f: f.fs.get_file_info(f.path).mtime_ns or 0)
    rows = newest.read_parquet(["kind", "seconds"]).to_pylist()
    seconds = [row["seconds"] for row in rows if row["kind"] != SELF]
    return statistics.median(seconds) if seconds else None


def _require_stage1(stage1: Stage1Plan, tasks: list[Task]) -> dict[str, TaskResult]:
    out = {}
    for task in tasks:
        cached = stage1.finished(task)
        if cached is None:
            raise TaskatlasError(
                f"task network {task.name!r} has not been trained for these settings; add train to --stages"
            )
        out[task.name] = cached
    return out
