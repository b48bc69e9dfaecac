"""The answer of a positioning: every candidate, the best (ties said as ties), the study tasks
nearest to the new one, what the roots give it, the model; as JSON and as the run description."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from components.data.shards import ShardStore
from components.position import (
    Candidate,
    first_order_columns,
    nearest_tasks,
    root_service,
)
from components.tasks import Task
from components.verdict import TIE
from pipelines.position.inputs import Study


def answer_of(
    study: Study,
    task: Task,
    store: ShardStore,
    candidates: list[Candidate],
    chosen: Candidate,
    model: dict,
    replicates: int,
) -> dict[str, Any]:
    """The answer as JSON: every candidate, the best (ties said as ties), where it sits, the model."""
    study_table = (study.affinity.location / "affinity.parquet").read_parquet()
    column = {c.sources[0]: c.affinity for c in candidates if len(c.sources) == 1 and not c.is_baseline}
    nearest = nearest_tasks(first_order_columns(study_table), column, exclude=[task.name])
    roots = list(study.taxonomy.roots)
    from_roots, more = root_service(candidates, roots, [t for t in study.config.tasks if t != task.name])
    ties = [c for c in candidates if not c.is_baseline and (c.p_best >= TIE or math.isnan(c.p_best))]
    if any(math.isnan(c.p_best) for c in ties):  # no bootstrap: the point estimate's best only
        ties = [max(ties, key=lambda c: c.affinity)] if ties else []
    counts = store.manifest.counts
    return {
        "task": task.name,
        "data_version": store.data_version,
        "images": {"transfer": counts["transfer"], "test": counts["test"]},
        "replicates": replicates,
        "candidates": [_round(asdict(c)) | {"sources": list(c.sources)} for c in candidates],
        "best": [{"sources": list(c.sources), "p_best": _num(c.p_best)} for c in ties],
        "nearest": [t for t, _ in nearest],
        "nearest_rho": {t: round(r, 3) for t, r in nearest},
        "roots": roots,
        "from_roots": {"sources": list(from_roots.sources), "affinity": _num(from_roots.affinity)}
        if from_roots
        else None,
        "one_more_root": [
            {"task": t, "sources": list(c.sources) if c else None, "adds": _num(gain)} for t, c, gain in more
        ],
        **model,
        "chosen": {  # chosen on validation images; these figures are the test images'
            "sources": list(chosen.sources),
            "affinity": _num(chosen.affinity),
            "gain": _num(chosen.gain),
            "quality": _num(chosen.quality),
            "vs_random": _num(chosen.vs_random),
        },
    }


def _num(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), 4)


def _round(row: dict) -> dict:
    return {k: _num(v) if isinstance(v, float) else v for k, v in row.items()}


def answer_markdown(answer: dict) -> str:
    """The MLflow description of a position run: the answer in a few lines."""
    lines = [f"## Where {answer['task']} sits", ""]
    lines.append(
        f"From {answer['images']['transfer']} labelled transfer images and {answer['images']['test']} test "
        f"images, {answer['replicates']} replicate(s) of every readout."
    )
    lines += ["", "| sources | affinity | 95% interval | gain vs scratch | p_best |", "|---|---|---|---|---|"]
    for c in answer["candidates"][:12]:
        lines.append(
            f"| {'+'.join(c['sources'])} | {_fmt(c['affinity'])} | {_fmt(c['affinity_lo'])}-"
            f"{_fmt(c['affinity_hi'])} | {_fmt(c['gain'])} | {_fmt(c['p_best'])} |"
        )
    lines += ["", f"Nearest study tasks: {', '.join(answer['nearest'][:3]) or 'none'}."]
    lines.append(
        f"Model: `{answer['model']}` v{answer['model_version']}, from {' + '.join(answer['model_sources'])}."
    )
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"
