"""Stages III and IV run: per-image losses -> affinity -> taxonomy, each step skipped once finished.

The math is `components.affinity` and `components.taxonomy`, where outputs live is `plan`, what
MLflow shows is `record`; this module computes, writes each step's files and pictures, and
finishes the step.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from components.affinity import AffinityResult, affinity_by_target, study_image_ids
from components.affinity_io import DICTIONARY_COLUMNS, transfer_table, write_affinity
from components.answer import Stability, StudyAnswer
from components.bootstrap import stability_of_rows
from components.storage import Location
from components.taxonomy import Taxonomy, TaxonomyOptions, solve_taxonomy, sweep_budgets
from components.transfer.plan import Pairing
from components.verdict import verdict
from pipelines.analysis.plan import (
    AVAILABLE,
    PRUNED,
    SAMPLES,
    affinity_step,
    keep_test_subset,
    loss_digests,
    taxonomy_options,
    taxonomy_step,
    within_table,
)
from pipelines.analysis.record import (
    AFFINITY_ON_PARENT,
    TAXONOMY_ON_PARENT,
    record_affinity,
    record_answer,
    record_taxonomy,
    score_readout_runs,
)
from pipelines.config import PipelineConfig
from pipelines.progress import progress_bar
from pipelines.results import Stage2Result
from pipelines.steps import Fence, Step, StepStatus, log_stored_artifact

if TYPE_CHECKING:  # annotations only: `taxonomy_options` is importable without MLflow
    from pipelines.tracking.runs import Tracker


@dataclass(frozen=True)
class Analysis:
    """What Stages III and IV gave the study's run: the affinity step, the answer (None where
    Stage IV was not asked for) and each step's status."""

    affinity: Step
    answer: StudyAnswer | None
    steps: tuple[tuple[str, StepStatus], ...]

    @property
    def unlabelled_images(self) -> dict[str, int]:
        return self.affinity.info().get("unlabelled_images", {})


def analyse(
    cfg: PipelineConfig,
    stage2: Stage2Result,
    tracker: Tracker,
    run: tuple[str, str],
    fence: Fence,
    *,
    taxonomy: bool,
) -> Analysis:
    """Stages III and IV on Stage II's losses, for the study's run `run` (experiment id, run id):
    each step run or reused, each candidate's run scored once (when its affinity is new), the
    tables and pictures on the study's run, and with `taxonomy` the answer in its description."""
    run_id = run[1]
    affinity = affinity_step(cfg, stage2.key, stage2.losses)
    steps = [("affinity", StepStatus.REUSE if affinity.complete else StepStatus.RUN)]
    fresh = not affinity.complete
    affinity = run_affinity(cfg, stage2.losses, stage2.key, tracker, run_id, fence)
    table = (affinity.location / "affinity.parquet").read_parquet()
    if fresh:
        score_readout_runs(tracker, stage2.readout_runs, stage2.target_runs, table)
    for name in AFFINITY_ON_PARENT:
        log_stored_artifact(tracker, run_id, affinity.location / name)
    if not taxonomy:
        return Analysis(affinity, None, tuple(steps))
    solved = taxonomy_step(cfg, affinity.key)
    steps.append(("taxonomy", StepStatus.REUSE if solved.complete else StepStatus.RUN))
    solved = run_taxonomy(cfg, affinity, tracker, run_id, fence)
    for name in TAXONOMY_ON_PARENT:
        log_stored_artifact(tracker, run_id, solved.location / name)
    answer = StudyAnswer.from_json(solved.info(), str(solved.location))
    record_answer(tracker, run, answer, table)
    return Analysis(affinity, answer, tuple(steps))


def run_affinity(
    cfg: PipelineConfig,
    losses: Location,
    transfer_key: str,
    tracker: Tracker,
    parent_run_id: str,
    fence: Fence,
) -> Step:
    """Stage III: win rates and AHP on Stage II's per-image losses (`losses`: Stage II's folder of
    per-target loss tables)."""
    step = affinity_step(cfg, transfer_key, losses)
    if step.complete:
        return step
    with step.scratch() as scratch:
        info = _affinity(cfg, losses, transfer_key, tracker, parent_run_id, scratch)
        step.finish(info, scratch, fence=fence)
    return step


def study_affinity(
    cfg: PipelineConfig,
    losses: Location,
    *,
    require_self: bool = True,
    progress: Callable[[int], None] | None = None,
) -> AffinityResult:
    """Win rates, AHP and the multi-bootstrap (`analysis` settings) on Stage II's folder of
    per-target loss tables, each on the test subset (`keep_test_subset`), one target's losses in
    memory at a time: Stage III's, and each racing round's in Stage II."""
    files = {f.name.removesuffix(".parquet"): f for f in losses.files() if f.name.endswith(".parquet")}
    seed, fraction = cfg.analysis.test_subset_seed, cfg.analysis.test_subset
    seed_key = "analysis.seed" if cfg.analysis.subset_seed is None else "analysis.subset_seed"

    def read(target: str, columns: list[str] | None = None) -> pa.Table:  # the test subset's rows
        dictionary = [c for c in DICTIONARY_COLUMNS if columns is None or c in columns]
        table = files[target].read_parquet(columns, read_dictionary=dictionary)
        return keep_test_subset(table, seed, fraction, f"target {target}'s loss table", seed_key)

    return affinity_by_target(
        sorted(files),
        read,
        cfg.analysis.bootstrap,  # > 0: intervals, and each resample's affinities for the stability
        cfg.analysis.seed,
        # the test split's image ids, the resamples' image axis shared by every target (every
        # target's table has a row per test image), read from the image_id columns alone; with
        # `analysis.test_subset`, the subset's ids: the resamples draw from the images scored
        study_image_ids(read(t, ["image_id"]) for t in sorted(files)) if cfg.analysis.bootstrap else None,
        paired=cfg.transfer.pairing is Pairing.PAIRED,
        require_self=require_self,
        progress=progress,
    )


def _affinity(
    cfg: PipelineConfig,
    losses: Location,
    transfer_key: str,
    tracker: Tracker,
    parent_run_id: str,
    scratch: Path,
) -> dict:
    """The affinity step's files in `scratch`, its run logged; its marker's summary."""
    started = time.time()  # the run spans the work, not just its logging
    targets = [f for f in losses.files() if f.name.endswith(".parquet")]
    with progress_bar(len(targets), "affinity (bootstrap)", unit="target") as update:
        result = study_affinity(cfg, losses, progress=update)
    table, unlabelled = result.table, result.unlabelled
    if result.samples is not None:  # one column per table row, in order
        np.save(scratch / SAMPLES, result.predictive.astype(np.float32))  # the stability's draws
        if (available := _beam_availability(cfg, losses.parent, table, len(result.samples))) is not None:
            np.save(scratch / AVAILABLE, available)
    from components.plots import plot_affinity_heatmap  # matplotlib: only where a picture is made

    write_affinity(table, scratch / "affinity.parquet")
    write_affinity(table, scratch / "affinity.csv")
    if pruned := _pruned_transfers(losses.parent):
        (scratch / PRUNED).write_text(json.dumps(pruned, indent=1))
    plot_affinity_heatmap(table, scratch / "affinity_heatmap.png")
    files = ("affinity.parquet", "affinity.csv", "affinity_heatmap.png", *([PRUNED] if pruned else []))
    run = record_affinity(
        tracker, parent_run_id, started, [scratch / name for name in files], table, unlabelled
    )
    info = {"transfer_key": transfer_key, "rows": table.num_rows, "unlabelled_images": unlabelled}
    info["inputs"] = loss_digests(losses)  # what it read: each target's loss table, by SHA-256
    return info | {"mlflow_run": run}


def _beam_availability(cfg: PipelineConfig, stage_dir: Location, table, n: int) -> np.ndarray | None:
    """Per resample, which higher-order rows its own validation draw would have put in the beam
    (`beam_availability`), from Stage II's summary of first-order validation losses per replicate;
    None without higher orders (or a summary, as for a loss table given on the command line)."""
    from components.resampling import replicate_draws
    from components.transfer.beams import beam_availability

    t = cfg.transfer
    if not t.orders or not (stage_dir / "summary.parquet").exists():
        return None
    summary = (stage_dir / "summary.parquet").read_parquet().to_pylist()
    by_readout: dict[tuple[str, str], dict[int, float]] = {}
    for row in summary:
        if row["kind"] == "transfer" and row["order"] == 1:
            by_readout.setdefault((row["target"], row["sources"][0]), {})[row.get("replicate") or 0] = row[
                "val_loss"
            ]
    val_losses = {k: np.array([v[r] for r in sorted(v)]) for k, v in by_readout.items()}
    paired = t.pairing is Pairing.PAIRED
    slots: dict[str, int] = {}  # per target, its readouts' most replicates: Stage III's slots
    for (target, _), v in val_losses.items():
        slots[target] = max(slots.get(target, 0), len(v))
    draws = {  # the replicates each resample reads of the readout, as Stage III draws them
        (target, source): replicate_draws(cfg.analysis.seed, target, slots[target], n) % len(v)
        if paired
        else replicate_draws(cfg.analysis.seed, target, len(v), n, (source,))
        for (target, source), v in val_losses.items()
    }
    rows = list(zip(table["target"].to_pylist(), map(tuple, table["sources"].to_pylist()), strict=True))
    return beam_availability(rows, val_losses, draws, t.orders, t.beams, t.widen_beams, n)


def run_taxonomy(
    cfg: PipelineConfig, affinity: Step, tracker: Tracker, parent_run_id: str, fence: Fence
) -> Step:
    """Stage IV: the BIP at the configured budget, and the whole budget sweep."""
    step = taxonomy_step(cfg, affinity.key)
    if step.complete:
        return step
    with step.scratch() as scratch:
        info = _taxonomy(cfg, affinity, tracker, parent_run_id, scratch)
        step.finish(info, scratch, fence=fence)
    return step


def _taxonomy(
    cfg: PipelineConfig, affinity: Step, tracker: Tracker, parent_run_id: str, scratch: Path
) -> dict:
    """The taxonomy step's files in `scratch`, its run logged; its marker's summary."""
    from components.plots import plot_sweep, plot_taxonomy  # matplotlib: only where a picture is made

    started = time.time()  # the run spans the work (the bootstrap's solves), not just its logging
    table = transfer_table((affinity.location / "affinity.parquet").read_parquet())
    options = taxonomy_options(cfg)
    pruned = affinity.location / PRUNED
    if pruned.exists():
        options = within_table(options, table)
    taxonomy = solve_taxonomy(table, options)
    sweep = sweep_budgets(table, options)
    stability = _stability(affinity, options, taxonomy)
    rows = (affinity.location / "affinity.parquet").read_parquet().to_pylist()
    said = verdict(taxonomy, stability, rows, cfg.transfer.replicates, cfg.train.replicates)
    # pruned: the transfers the BIP never saw
    answer = StudyAnswer(taxonomy, stability, said, pruned.read_json() if pruned.exists() else None)
    (scratch / "taxonomy.json").write_text(json.dumps(answer.to_json(), indent=1))
    sweep_rows = [
        {
            "budget": p.budget,
            "objective": p.objective,
            "roots": list(p.taxonomy.roots) if p.taxonomy else None,
        }
        for p in sweep
    ]
    (scratch / "budget_sweep.json").write_text(json.dumps(sweep_rows, indent=1))
    plot_taxonomy(taxonomy, scratch / "taxonomy.png", stability, said)
    plot_sweep(sweep, scratch / "budget_sweep.png", cfg.taxonomy.max_order)
    files = [
        scratch / name for name in ("taxonomy.json", "taxonomy.png", "budget_sweep.json", "budget_sweep.png")
    ]
    run = record_taxonomy(tracker, parent_run_id, started, cfg.taxonomy, taxonomy, stability, sweep, files)
    return {"affinity_key": affinity.key, "mlflow_run": run, **answer.to_json()}


def _pruned_transfers(stage_dir: Location) -> dict | None:
    """From Stage II's `pruning.json` (absent when it was not pruned): the first-order transfers
    never trained, so not in the loss table, not AHP candidates and never in the BIP, with the
    estimator's measured rank correlation on the trained ones."""
    path = stage_dir / "pruning.json"
    if not path.exists():
        return None
    report = path.read_json()
    keep = ("estimator", "top_k", "audit_fraction", "spearman", "spearman_by_target", "audit_misses")
    transfers = [f"{s}->{t}" for t, sources in report["pruned"].items() for s in sources]
    shared = report.get("shared", [])  # a pruning.json written before shared sources: none
    return {"transfers": transfers, "audited": report["audited"], "shared": shared} | {
        k: report[k] for k in keep
    }


def _stability(affinity: Step, options: TaxonomyOptions, chosen: Taxonomy) -> Stability | None:
    """How often each root and transfer comes back when the BIP is solved on each bootstrap
    resample's affinities (none without `analysis.bootstrap`)."""
    if not (affinity.location / SAMPLES).exists():
        return None
    rows = (affinity.location / "affinity.parquet").read_parquet(["target", "sources"]).to_pydict()
    sources = [tuple(s) for s in rows["sources"]]
    samples = (affinity.location / SAMPLES).read_array().astype(np.float64)
    available = (
        (affinity.location / AVAILABLE).read_array() if (affinity.location / AVAILABLE).exists() else None
    )
    with progress_bar(len(samples), "taxonomy stability", unit="resample") as update:
        stability = stability_of_rows(
            rows["target"], sources, samples, options, chosen, available=available, progress=update
        )
    return Stability.from_json(stability | {"resamples": len(samples)})
