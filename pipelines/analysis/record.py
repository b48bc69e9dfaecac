"""What MLflow shows of Stages III and IV: an `affinity` and a `taxonomy` run under the study's run,
each spanning its work, with its tables and pictures as artifacts and its figures as metrics."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pyarrow as pa

from components.answer import Stability, StudyAnswer
from components.config import to_dict
from components.taxonomy import SweepPoint, Taxonomy
from pipelines.analysis.report import answer_markdown
from pipelines.sections import TaxonomyConfig
from pipelines.tracking.runs import Tracker

# What the parent run holds of Stages III and IV (its description names exactly these); the
# `affinity` and `taxonomy` runs hold the rest. CSV: the UI previews it, not Parquet.
AFFINITY_ON_PARENT = ("affinity.csv", "affinity.parquet", "affinity_heatmap.png")
TAXONOMY_ON_PARENT = ("taxonomy.json", "taxonomy.png", "budget_sweep.png")
ROOTS_TAG = "taxonomy.roots"  # on the parent run: the chosen roots, comma-separated
# Stage III's columns on each readout's run: the affinity with its bootstrap interval (95%),
# quality (vs self), gain (vs pixels)
SCORES = ("affinity", "affinity_lo", "affinity_hi", "quality", "gain")


def record_affinity(
    tracker: Tracker,
    parent_run_id: str,
    started: float,
    files: Sequence[Path],
    table: pa.Table,
    unlabelled: Mapping[str, int],
) -> str:
    """The affinity run (from `started`, epoch seconds, to now): its `files`, its table's size and
    each target's images without a label; its id."""
    run = tracker.start_run("affinity", parent_run_id, {"stage": "affinity"}, start_time=started)
    for path in files:
        tracker.log_artifact(run, path)
    metrics = {"rows": table.num_rows, "targets": len(set(table["target"].to_pylist()))}
    metrics |= {f"unlabelled_images.{t}": n for t, n in unlabelled.items()}
    tracker.log_metrics(run, metrics | {"wall_seconds": time.time() - started})
    tracker.end_run(run)
    return run


def record_taxonomy(
    tracker: Tracker,
    parent_run_id: str,
    started: float,
    config: TaxonomyConfig,
    taxonomy: Taxonomy,
    stability: Stability | None,
    sweep: Sequence[SweepPoint],
    files: Sequence[Path],
) -> str:
    """The taxonomy run: the settings, the objective and roots (and how stable the answer is),
    the budget sweep as a history by budget, and `files`; its id."""
    run = tracker.start_run("taxonomy", parent_run_id, {"stage": "taxonomy"}, start_time=started)
    tracker.log_params(run, to_dict(config))
    metrics = {"objective": taxonomy.objective, "roots": len(taxonomy.roots)}
    metrics |= {"stability": stability.taxonomy} if stability else {}
    tracker.log_metrics(run, metrics | {"wall_seconds": time.time() - started})
    # the sweep one metric per budget, each named with it: a history's last point would show on
    # the run's page as if it were the objective (budget_sweep.png draws the curve)
    tracker.log_metrics(
        run, {f"objective_at_budget_{p.budget}": p.objective for p in sweep if p.objective is not None}
    )
    for path in files:
        tracker.log_artifact(run, path)
    tracker.end_run(run)
    return run


def score_readout_runs(tracker: Tracker, runs: dict[str, str], table: pa.Table) -> None:
    """Stage III's verdict on each readout, on its own run (`SCORES`), so MLflow's run table
    sorts and filters sources by them."""
    scores = {}
    for row in table.to_pylist():
        if run := runs.get(f"{'+'.join(row['sources'])}->{row['target']}"):
            scores[run] = {k: row[k] for k in SCORES if k in row and row[k] == row[k]}  # not NaN
    tracker.batches.log_metrics_many(scores)  # concurrent requests against a server: thousands of readouts


def record_answer(tracker: Tracker, run: tuple[str, str], answer: StudyAnswer, affinity: pa.Table) -> None:
    """The answer on the study's run `run` (experiment id, run id): its objective and stability,
    the roots as a tag (studies compared and filtered in the run table: tags.`taxonomy.roots`),
    and the description a researcher reads first."""
    metrics = {"taxonomy_objective": answer.taxonomy.objective}
    if answer.stability:
        metrics["taxonomy_stability"] = answer.stability.taxonomy
    run_id = run[1]
    tracker.log_metrics(run_id, metrics)
    tracker.set_tags(run_id, {ROOTS_TAG: ",".join(answer.roots)})
    artifacts = (*TAXONOMY_ON_PARENT, *AFFINITY_ON_PARENT)
    tracker.describe(run_id, answer_markdown(answer, affinity, run, artifacts))
