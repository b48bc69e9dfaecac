"""What MLflow shows of Stages III and IV: an `affinity` and a `taxonomy` run under the study's run,
each spanning its work, with its tables and pictures as artifacts and its figures as metrics."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pyarrow as pa

from components.answer import Stability
from components.config import to_dict
from components.taxonomy import SweepPoint, Taxonomy
from pipelines.sections import TaxonomyConfig
from pipelines.tracking.runs import Tracker


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
