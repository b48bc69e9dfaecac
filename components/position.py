"""Where a new task sits among a finished study's tasks (design.md section 12): pure functions over
the new task's affinity rows and the study's affinity table and taxonomy.

- `nearest_tasks`: the study's targets whose columns of source affinities rank the sources most
  alike the new task's (Spearman over the sources both were measured from). Tasks that the same
  sources serve, in the same order, need the same things from a representation.
- `root_service`: the best source set the study's roots offer the new task (what it gets for free
  from the taxonomy already chosen), and what each further root would add to that.
- `choose_model`: the transfer a positioned task's model is built on.
- `split_test_images`: the two halves of the test images a model is chosen on and reported on,
  so that the figures a user reads were not used to pick the model.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from scipy.stats import spearmanr

from components.affinity import PIXELS, RANDOM, SCRATCH, SELF

BASELINE_SETS = (SELF, RANDOM, PIXELS, SCRATCH)  # never a study's source, never a model's sources
MIN_COMMON_SOURCES = 3  # fewer shared sources rank nothing: such a study task is not compared


@dataclass(frozen=True)
class Candidate:
    """One row of the new task's affinity table: a source set (or a baseline) into the new task."""

    sources: tuple[str, ...]
    affinity: float
    affinity_lo: float  # the 95% interval of the multi-bootstrap (NaN without one)
    affinity_hi: float
    p_best: float  # share of resamples in which it has the highest affinity (NaN without a bootstrap)
    gain: float  # win rate against `scratch` on the same labels: Taskonomy's Gain
    vs_random: float  # win rate against the frozen random encoder
    quality: float  # win rate against the task's full network (NaN: the study has none)

    @property
    def is_baseline(self) -> bool:
        return self.sources in BASELINE_SETS

    @property
    def name(self) -> str:
        return "+".join(self.sources)


def candidates_of(table: pa.Table, target: str) -> list[Candidate]:
    """The target's rows of an affinity table, highest affinity first (ties by name)."""
    nan = float("nan")
    out = []
    for row in table.to_pylist():
        if row["target"] != target:
            continue
        out.append(
            Candidate(
                tuple(row["sources"]),
                row["affinity"],
                row.get("affinity_lo", nan),
                row.get("affinity_hi", nan),
                row.get("p_best", nan),
                row["gain"],
                row["vs_random"],
                row["quality"],
            )
        )
    return sorted(out, key=lambda c: (-c.affinity, c.name))


def first_order_columns(table: pa.Table) -> dict[str, dict[str, float]]:
    """Study target -> {source task: affinity} of its first-order transfers (no baselines)."""
    out: dict[str, dict[str, float]] = {}
    for row in table.select(["target", "sources", "affinity"]).to_pylist():
        sources = tuple(row["sources"])
        if len(sources) == 1 and sources not in BASELINE_SETS:
            out.setdefault(row["target"], {})[sources[0]] = row["affinity"]
    return out


def nearest_tasks(
    study: Mapping[str, Mapping[str, float]], new: Mapping[str, float], exclude: Iterable[str] = ()
) -> list[tuple[str, float]]:
    """(study task, Spearman rho) nearest first: how alike each study target's column of
    first-order source affinities ranks the sources it shares with the new task's. `exclude`:
    targets not to compare (the new task itself, where the study has it). Ties by name."""
    skip = set(exclude)
    out = []
    for task, column in study.items():
        common = sorted(set(column) & set(new) - {task})
        if task in skip or len(common) < MIN_COMMON_SOURCES:
            continue
        a, b = [column[s] for s in common], [new[s] for s in common]
        rho = 0.0 if np.ptp(a) == 0 or np.ptp(b) == 0 else float(spearmanr(a, b).statistic)
        out.append((task, rho))
    return sorted(out, key=lambda tr: (-tr[1], tr[0]))


def best_within(candidates: Sequence[Candidate], allowed: Iterable[str]) -> Candidate | None:
    """The highest-affinity transfer whose sources are all `allowed`."""
    allowed = set(allowed)
    usable = [c for c in candidates if not c.is_baseline and set(c.sources) <= allowed]
    return max(usable, key=lambda c: (c.affinity, c.name), default=None)


def root_service(
    candidates: Sequence[Candidate], roots: Sequence[str], tasks: Sequence[str]
) -> tuple[Candidate | None, list[tuple[str, Candidate | None, float]]]:
    """(the best transfer from the study's roots alone, [(one more root, the best transfer then,
    the affinity it adds)] best addition first). A root that adds nothing adds 0."""
    base = best_within(candidates, roots)
    start = base.affinity if base else 0.0
    more = []
    for task in tasks:
        if task in roots:
            continue
        best = best_within(candidates, [*roots, task])
        more.append((task, best, (best.affinity if best else 0.0) - start))
    return base, sorted(more, key=lambda x: (-x[2], x[0]))


def choose_model(candidates: Sequence[Candidate]) -> Candidate:
    """The transfer to build the new task's model on: the highest affinity among transfers; where
    several are equally likely to be best (p_best), the one with fewer sources is as good and
    cheaper to run, so among those within 0.05 of the top p_best the smallest order wins."""
    transfers = [c for c in candidates if not c.is_baseline]
    if not transfers:
        raise ValueError("no transfer was measured into the new task")
    top = max(transfers, key=lambda c: (c.affinity, c.name))
    if math.isnan(top.p_best):
        return top
    close = [c for c in transfers if c.p_best >= top.p_best - 0.05]
    return min(close, key=lambda c: (len(c.sources), -c.affinity, c.name))


def split_test_images(image_ids: Iterable[str]) -> tuple[frozenset[str], frozenset[str]]:
    """(chosen on, reported on): the test images in two halves of equal size (the first one more
    when odd), by a hash of each id, so the split needs no seed and is the same in every process.
    A model chosen for its score on the first half is reported on the second, which it was not
    chosen on: a winner's figures on its own selection images are biased upward."""
    ids = sorted(set(map(str, image_ids)), key=lambda i: (hashlib.sha256(i.encode()).digest(), i))
    half = (len(ids) + 1) // 2
    return frozenset(ids[:half]), frozenset(ids[half:])
