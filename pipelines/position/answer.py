"""The answer of a positioning: every candidate, the best (ties said as ties), the study tasks
nearest to the new one, what the roots give it, the model; as JSON and as the run description."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
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


@dataclass(frozen=True)
class RegisteredModel:
    """The positioned task's model in the registry: name, version, and the sources it reads."""

    name: str
    version: str
    sources: tuple[str, ...]

    @classmethod
    def from_json(cls, data: Mapping) -> RegisteredModel:
        return cls(data["model"], str(data["model_version"]), tuple(data["model_sources"]))

    def to_json(self) -> dict[str, Any]:
        return {"model": self.name, "model_version": self.version, "model_sources": list(self.sources)}


@dataclass(frozen=True)
class PositionAnswer:
    """Where a new task sits: its candidates (highest affinity first), the best ones (ties said as
    ties), the study tasks nearest to it, what the study's roots give it and what one more root
    would add, and its model (`chosen`: picked on validation images; its figures are the test
    images'). Stored and printed as JSON (`position.json`, `taskatlas position --json`)."""

    task: str
    data_version: str
    transfer_images: int
    test_images: int
    replicates: int
    candidates: tuple[Candidate, ...]
    best: tuple[Candidate, ...]
    nearest: tuple[tuple[str, float], ...]  # (study task, rank correlation), nearest first
    roots: tuple[str, ...]
    from_roots: Candidate | None  # the best transfer from the roots alone
    one_more_root: tuple[tuple[str, Candidate | None, float], ...]  # (task, best then, affinity added)
    model: RegisteredModel
    chosen: Candidate

    def to_json(self) -> dict[str, Any]:
        def sources(c: Candidate | None) -> list[str] | None:
            return list(c.sources) if c else None

        return {
            "task": self.task,
            "data_version": self.data_version,
            "images": {"transfer": self.transfer_images, "test": self.test_images},
            "replicates": self.replicates,
            "candidates": [_round(asdict(c)) | {"sources": list(c.sources)} for c in self.candidates],
            "best": [{"sources": list(c.sources), "p_best": _num(c.p_best)} for c in self.best],
            "nearest": [t for t, _ in self.nearest],
            "nearest_rho": {t: round(r, 3) for t, r in self.nearest},
            "roots": list(self.roots),
            "from_roots": {"sources": sources(self.from_roots), "affinity": _num(self.from_roots.affinity)}
            if self.from_roots
            else None,
            "one_more_root": [
                {"task": t, "sources": sources(c), "adds": _num(a)} for t, c, a in self.one_more_root
            ],
            **self.model.to_json(),
            "chosen": {
                "sources": list(self.chosen.sources),
                "affinity": _num(self.chosen.affinity),
                "gain": _num(self.chosen.gain),
                "quality": _num(self.chosen.quality),
                "vs_random": _num(self.chosen.vs_random),
            },
        }

    @classmethod
    def from_json(cls, data: Mapping) -> PositionAnswer:
        nan = float("nan")
        candidates = tuple(
            Candidate(**{k: nan if v is None else v for k, v in c.items()} | {"sources": tuple(c["sources"])})
            for c in data["candidates"]
        )
        by_sources = {c.sources: c for c in candidates}

        def find(sources: list[str] | None) -> Candidate | None:
            return None if sources is None else by_sources[tuple(sources)]

        return cls(
            data["task"],
            data["data_version"],
            data["images"]["transfer"],
            data["images"]["test"],
            data["replicates"],
            candidates,
            tuple(by_sources[tuple(b["sources"])] for b in data["best"]),
            tuple((t, data["nearest_rho"][t]) for t in data["nearest"]),
            tuple(data["roots"]),
            find(data["from_roots"]["sources"]) if data["from_roots"] else None,
            tuple((m["task"], find(m["sources"]), m["adds"] or 0.0) for m in data["one_more_root"]),
            RegisteredModel.from_json(data),
            by_sources[tuple(data["chosen"]["sources"])],
        )


def answer_of(
    study: Study,
    task: Task,
    store: ShardStore,
    candidates: list[Candidate],
    chosen: Candidate,
    model: RegisteredModel,
    replicates: int,
) -> PositionAnswer:
    """Every candidate, the best (ties said as ties), where it sits, the model."""
    study_table = (study.affinity.location / "affinity.parquet").read_parquet()
    column = {c.sources[0]: c.affinity for c in candidates if len(c.sources) == 1 and not c.is_baseline}
    nearest = nearest_tasks(first_order_columns(study_table), column, exclude=[task.name])
    roots = list(study.taxonomy.roots)
    from_roots, more = root_service(candidates, roots, [t for t in study.config.tasks if t != task.name])
    ties = [c for c in candidates if not c.is_baseline and (c.p_best >= TIE or math.isnan(c.p_best))]
    if any(math.isnan(c.p_best) for c in ties):  # no bootstrap: the point estimate's best only
        ties = [max(ties, key=lambda c: c.affinity)] if ties else []
    counts = store.manifest.counts
    answer = PositionAnswer(
        task.name,
        store.data_version,
        counts["transfer"],
        counts["test"],
        replicates,
        tuple(candidates),
        tuple(ties),
        tuple(nearest),
        tuple(roots),
        from_roots,
        tuple(more),
        model,
        chosen,
    )
    return PositionAnswer.from_json(answer.to_json())  # as stored: rounded, so a rerun reads the same


def _num(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), 4)


def _round(row: dict) -> dict:
    return {k: _num(v) if isinstance(v, float) else v for k, v in row.items()}


def answer_markdown(answer: PositionAnswer) -> str:
    """The MLflow description of a position run: the answer in a few lines."""
    lines = [f"## Where {answer.task} sits", ""]
    lines.append(
        f"From {answer.transfer_images} labelled transfer images and {answer.test_images} test "
        f"images, {answer.replicates} replicate(s) of every readout."
    )
    lines += ["", "| sources | affinity | 95% interval | gain vs scratch | p_best |", "|---|---|---|---|---|"]
    for c in answer.candidates[:12]:
        lines.append(
            f"| {c.name} | {_fmt(c.affinity)} | {_fmt(c.affinity_lo)}-{_fmt(c.affinity_hi)} | "
            f"{_fmt(c.gain)} | {_fmt(c.p_best)} |"
        )
    lines += ["", f"Nearest study tasks: {', '.join(t for t, _ in answer.nearest[:3]) or 'none'}."]
    m = answer.model
    lines.append(f"Model: `{m.name}` v{m.version}, from {' + '.join(m.sources)}.")
    return "\n".join(lines)


def _fmt(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.3f}"
