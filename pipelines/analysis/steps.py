"""Stages III and IV as pipeline steps: per-image losses -> affinity -> taxonomy, with MLflow.

The math is `components.affinity` and `components.taxonomy`; this module only decides where
outputs live (step folders keyed by their inputs), skips finished steps, and logs to MLflow.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from components.affinity import affinity_by_target, study_image_ids
from components.affinity_io import DICTIONARY_COLUMNS, transfer_table, write_affinity
from components.bootstrap import stability_of_rows
from components.config import config_hash, to_dict
from components.errors import TaskatlasError
from components.storage import Location
from components.taxonomy import (
    Taxonomy,
    TaxonomyOptions,
    TransferTable,
    solve_taxonomy,
    sweep_budgets,
)
from components.transfer.plan import Pairing
from components.verdict import verdict
from pipelines.config import AnalysisConfig, PipelineConfig
from pipelines.progress import progress_bar
from pipelines.steps import DONE, FILES, Step, sha256_of

if TYPE_CHECKING:  # annotations only: `taxonomy_options` is importable without MLflow
    from pipelines.tracking.runs import Tracker


SAMPLES = "affinity_samples.npy"  # (resamples, rows of affinity.parquet): a rerun's affinities, drawn
AVAILABLE = "beam_available.npy"  # (resamples, rows) bool: the row's sources were in that resample's beam
PRUNED = "pruned.json"  # beside affinity.parquet when Stage II was pruned: what was never a candidate


def affinity_step(cfg: PipelineConfig, transfer_key: str, losses: Location) -> Step:
    """Keyed by Stage II's key, the analysis settings, and what it reads: the SHA-256 of each
    per-target loss table in `losses` (`loss_digests`). A readout done again with other losses
    (its features were damaged, a GPU's nondeterminism) keeps every key of the plan but changes
    its target's table: the affinity, and the taxonomy keyed by it, are done again."""
    # v4: win rates are the mean over paired replicates (one run's), the resamples centred on them;
    # p_no_gain and p_below_random; t <- t never competes for p_best; v5: shares from predictive draws
    parts = ("affinity-v6", transfer_key, analysis_key(cfg.analysis), {"inputs": loss_digests(losses)})
    return Step(cfg.root, "affinity", config_hash(*parts))


def loss_digests(losses: Location) -> dict[str, str]:
    """Target -> SHA-256 of its loss table `<target>.parquet` in `losses`, Stage II's folder of
    them: as Stage II's marker recorded them (a rerun checks them against the files before it
    reuses the step), so no table is read here. A folder outside a finished Stage II step (tables
    given on the command line, a test's) is hashed, once per file version and process."""
    marker, prefix = losses.parent / DONE, f"{losses.name}/"
    recorded = marker.read_json().get(FILES, {}) if marker.exists() else {}
    found = {
        name.removeprefix(prefix).removesuffix(".parquet"): digest
        for name, (_, digest) in recorded.items()
        if name.startswith(prefix) and name.endswith(".parquet")
    }
    if found or not losses.exists():
        return dict(sorted(found.items()))
    tables = (f for f in losses.files() if f.name.endswith(".parquet"))
    return {f.name.removesuffix(".parquet"): sha256_of(f) for f in sorted(tables, key=lambda f: f.name)}


def analysis_key(analysis: AnalysisConfig) -> dict:
    """What of `analysis` keys Stage III: `test_subset` only when set (below 1), so a study that
    scores every test image keeps the key it had before the field existed."""
    fields = to_dict(analysis)
    if analysis.test_subset == 1.0:
        del fields["test_subset"]
    return fields


def in_test_subset(image_ids: Sequence[str], seed: int, fraction: float) -> np.ndarray:
    """(len(image_ids),) bool: the test images `analysis.test_subset` keeps. Image I is kept when
    the first 8 bytes of sha256("<seed>:<I>"), read as a fraction of 2**64, are below `fraction`:
    the image's own draw, the same whichever target's table it is read from and in any process, a
    share `fraction` of the images on average, and an independent draw for another seed. 1.0 keeps
    every image."""
    if fraction >= 1.0:
        return np.ones(len(image_ids), dtype=bool)
    limit = fraction * 2.0**64
    return np.array(
        [
            int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big") < limit
            for i in image_ids
        ],
        dtype=bool,
    )


def keep_test_subset(table: pa.Table, seed: int, fraction: float, what: str) -> pa.Table:
    """The rows of a loss table (`what`: which, for the error) whose `image_id` is in the test
    subset (`in_test_subset`); the table itself at 1.0."""
    if fraction >= 1.0:
        return table
    ids = pc.cast(table["image_id"], pa.string())  # dictionary-encoded as read
    unique = pc.unique(ids).to_pylist()
    kept = [i for i, keep in zip(unique, in_test_subset(unique, seed, fraction), strict=True) if keep]
    if not kept:
        raise TaskatlasError(
            f"analysis.test_subset={fraction} with analysis.seed={seed} keeps none of the "
            f"{len(unique)} test images of {what}; raise analysis.test_subset"
        )
    return table.filter(pc.is_in(ids, value_set=pa.array(kept, pa.string())))


def taxonomy_step(cfg: PipelineConfig, affinity_key: str) -> Step:
    return Step(cfg.root, "taxonomy", config_hash(cfg.taxonomy, affinity_key))


def run_affinity(
    cfg: PipelineConfig, losses: Location, transfer_key: str, tracker: Tracker, parent_run_id: str
) -> Step:
    """Stage III: win rates and AHP on Stage II's per-image losses (`losses`: Stage II's folder of
    per-target loss tables)."""
    step = affinity_step(cfg, transfer_key, losses)
    if step.complete:
        return step
    with step.scratch() as scratch:
        _affinity(cfg, step, losses, transfer_key, tracker, parent_run_id, scratch)
    return step


def _affinity(
    cfg: PipelineConfig,
    step: Step,
    losses: Location,
    transfer_key: str,
    tracker: Tracker,
    parent_run_id: str,
    scratch: Path,
) -> None:
    started = time.time()  # the run spans the work, not just its logging
    # One target's losses in memory at a time (Stage II wrote them per target).
    files = {f.name.removesuffix(".parquet"): f for f in losses.files() if f.name.endswith(".parquet")}
    seed, fraction = cfg.analysis.seed, cfg.analysis.test_subset

    def read(target: str, columns: list[str] | None = None) -> pa.Table:  # the test subset's rows
        dictionary = [c for c in DICTIONARY_COLUMNS if columns is None or c in columns]
        table = files[target].read_parquet(columns, read_dictionary=dictionary)
        return keep_test_subset(table, seed, fraction, f"target {target}'s loss table")

    with progress_bar(len(files), "affinity (bootstrap)", unit="target") as update:
        result = affinity_by_target(
            sorted(files),
            read,
            cfg.analysis.bootstrap,  # > 0: intervals, and each resample's affinities for the stability
            cfg.analysis.seed,
            # the test split's image ids, the resamples' image axis shared by every target (every
            # target's table has a row per test image), read from the image_id columns alone; with
            # `analysis.test_subset`, the subset's ids: the resamples draw from the images scored
            study_image_ids(read(t, ["image_id"]) for t in sorted(files)) if cfg.analysis.bootstrap else None,
            paired=cfg.transfer.pairing is Pairing.PAIRED,
            progress=update,
        )
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
    run = tracker.start_run("affinity", parent_run_id, {"stage": "affinity"}, start_time=started)
    for name in ("affinity.parquet", "affinity.csv", "affinity_heatmap.png", *([PRUNED] if pruned else [])):
        tracker.log_artifact(run, scratch / name)
    metrics = {"rows": table.num_rows, "targets": len(set(table["target"].to_pylist()))}
    metrics |= {f"unlabelled_images.{t}": n for t, n in unlabelled.items()}
    tracker.log_metrics(run, metrics | {"wall_seconds": time.time() - started})
    tracker.end_run(run)
    info = {"transfer_key": transfer_key, "rows": table.num_rows, "unlabelled_images": unlabelled}
    info["inputs"] = loss_digests(losses)  # what it read: each target's loss table, by SHA-256
    step.finish(info | {"mlflow_run": run}, scratch)


def _beam_availability(cfg: PipelineConfig, stage_dir: Location, table, n: int) -> np.ndarray | None:
    """Per resample, which higher-order rows its own validation draw would have put in the beam
    (`beam_availability`), from Stage II's summary of first-order validation losses per replicate;
    None without higher orders (or a summary, as for a loss table given on the command line)."""
    from components.affinity import replicate_draws
    from components.transfer.plan import beam_availability

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


def taxonomy_options(cfg: PipelineConfig, budget: int | None = None) -> TaxonomyOptions:
    t = cfg.taxonomy
    source_only = {name for name in cfg.tasks if cfg.task(name).source_only} | set(t.source_only)
    return TaxonomyOptions(
        budget=budget if budget is not None else t.budget,
        max_order=t.max_order,
        exclude=frozenset(t.exclude),
        source_only=frozenset(source_only - set(t.exclude)),
        importance=dict(t.importance),
        cost=dict(t.cost),
        transform=t.transform,
    )


def run_taxonomy(cfg: PipelineConfig, affinity: Step, tracker: Tracker, parent_run_id: str) -> Step:
    """Stage IV: the BIP at the configured budget, and the whole budget sweep."""
    step = taxonomy_step(cfg, affinity.key)
    if step.complete:
        return step
    with step.scratch() as scratch:
        _taxonomy(cfg, step, affinity, tracker, parent_run_id, scratch)
    return step


def _taxonomy(
    cfg: PipelineConfig, step: Step, affinity: Step, tracker: Tracker, parent_run_id: str, scratch: Path
) -> None:
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
    answer = taxonomy.to_dict() | ({"stability": stability} if stability else {})
    rows = (affinity.location / "affinity.parquet").read_parquet().to_pylist()
    answer["verdict"] = verdict(answer, stability, rows, cfg.transfer.replicates, cfg.train.replicates)
    if pruned.exists():  # transfers the BIP never saw
        answer["pruned"] = pruned.read_json()
    (scratch / "taxonomy.json").write_text(json.dumps(answer, indent=1))
    sweep_rows = [
        {
            "budget": p.budget,
            "objective": p.objective,
            "roots": list(p.taxonomy.roots) if p.taxonomy else None,
        }
        for p in sweep
    ]
    (scratch / "budget_sweep.json").write_text(json.dumps(sweep_rows, indent=1))
    plot_taxonomy(taxonomy, scratch / "taxonomy.png", stability, answer["verdict"])
    plot_sweep(sweep, scratch / "budget_sweep.png", cfg.taxonomy.max_order)
    run = tracker.start_run("taxonomy", parent_run_id, {"stage": "taxonomy"}, start_time=started)
    tracker.log_params(run, to_dict(cfg.taxonomy))
    metrics = {"objective": taxonomy.objective, "roots": len(taxonomy.roots)}
    metrics |= {"stability": stability["taxonomy"]} if stability else {}
    tracker.log_metrics(run, metrics | {"wall_seconds": time.time() - started})
    tracker.log_history(
        run, [("sweep_objective", p.objective, int(p.budget)) for p in sweep if p.objective is not None]
    )
    for name in ("taxonomy.json", "taxonomy.png", "budget_sweep.json", "budget_sweep.png"):
        tracker.log_artifact(run, scratch / name)
    tracker.end_run(run)
    step.finish({"affinity_key": affinity.key, "mlflow_run": run, **answer}, scratch)


def within_table(options: TaxonomyOptions, table: TransferTable) -> TaxonomyOptions:
    """Options naming only tasks the table has: a pruned study can lose a source altogether (pruned
    from every target), and a task with no transfer in the table can be neither root nor source."""
    known = set(table.tasks)
    return replace(
        options,
        exclude=options.exclude & known,
        source_only=options.source_only & known,
        importance={k: v for k, v in options.importance.items() if k in known},
        cost={k: v for k, v in options.cost.items() if k in known},
    )


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


def _stability(affinity: Step, options: TaxonomyOptions, chosen: Taxonomy) -> dict | None:
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
    return stability | {"resamples": len(samples)}
