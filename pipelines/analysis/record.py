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
from components.vocabulary import SELF
from pipelines.analysis.report import answer_markdown
from pipelines.sections import TaxonomyConfig
from pipelines.tracking.runs import Tracker

# What the parent run holds of Stages III and IV (its description names exactly these); the
# `affinity` and `taxonomy` runs hold the rest. CSV: the UI previews it, not Parquet.
AFFINITY_ON_PARENT = ("affinity.csv", "affinity.parquet", "affinity_heatmap.png")
TAXONOMY_ON_PARENT = ("taxonomy.json", "taxonomy.png", "budget_sweep.png")
ROOTS_TAG = "taxonomy.roots"  # on the parent run: the chosen roots, comma-separated
# Stage III's columns on each candidate's run (as `pooled_<column>`): the affinity with its
# bootstrap interval (95%), quality (vs self), gain (vs pixels)
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


def score_readout_runs(
    tracker: Tracker, runs: Mapping[str, str], targets: Mapping[str, str], table: pa.Table
) -> None:
    """Stage III's verdict on each candidate, pooled over its replicates: on its own run
    (`pooled_` + each of `SCORES`), so MLflow's run table sorts and filters sources by them; and
    on each target's run (`targets`), its candidates listed best first."""
    scores: dict[str, dict[str, float]] = {}
    by_target: dict[str, list[tuple[dict, str | None]]] = {}
    for row in table.to_pylist():
        run = runs.get(f"{'+'.join(row['sources'])}->{row['target']}")
        if run:
            scores[run] = {f"pooled_{k}": row[k] for k in SCORES if k in row and row[k] == row[k]}  # not NaN
        by_target.setdefault(row["target"], []).append((row, run))
    tracker.batches.log_metrics_many(scores)  # concurrent requests against a server: thousands of readouts
    for target, rows in sorted(by_target.items()):
        if run := targets.get(target):
            tracker.describe(run, candidates_markdown(target, rows, tracker.companion("readouts")))
            shares = [r["affinity"] for r, _ in rows if list(r["sources"]) not in ([target], [SELF])]
            best = {"best_pooled_affinity": max(shares)} if shares else {}
            tracker.log_metrics(run, {"candidates": len(rows)} | best)


def candidates_markdown(target: str, rows: Sequence[tuple[dict, str | None]], experiment_id: str) -> str:
    """A target's candidates, best pooled affinity first, each linked to its run."""
    lines = [
        f"Candidate sources for **{target}**, pooled over their replicates, best first: `affinity`",
        "(AHP share of the win rates, with its 95% bootstrap interval; the candidates sum to 1),",
        "`p_best` (how often the bootstrap ranks it first), `quality` (win rate against `self`) and",
        "`gain` (against `pixels`). `self` is the target's own network (its share is what a root",
        f"scores); `{target}`, a readout on its own frozen encoder, is no transfer the taxonomy may",
        "choose. Each name opens the candidate's run (per-replicate losses).",
        "",
        "| sources | affinity | 95% | p_best | quality | gain |",
        "|---|---|---|---|---|---|",
    ]

    def num(x: float | None) -> str:
        return "" if x is None or x != x else f"{x:.3f}"

    for row, run in sorted(rows, key=lambda x: -x[0]["affinity"]):
        name = "+".join(row["sources"])
        name = f"{name} (own encoder)" if list(row["sources"]) == [target] else name
        cell = f"[{name}](#/experiments/{experiment_id}/runs/{run})" if run else name
        lo, hi = num(row.get("affinity_lo")), num(row.get("affinity_hi"))
        interval = f"{lo}-{hi}" if lo and hi else ""
        lines.append(
            f"| {cell} | {num(row['affinity'])} | {interval} | {num(row.get('p_best'))} "
            f"| {num(row.get('quality'))} | {num(row.get('gain'))} |"
        )
    return "\n".join(lines)


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
