"""Where a new task sits among a finished study's tasks (design.md section 12): pure functions over
the new task's affinity rows and the study's affinity table and taxonomy.

- `nearest_tasks`: the study's targets whose columns of source affinities rank the sources most
  alike the new task's (Spearman over the sources both were measured from). Tasks that the same
  sources serve, in the same order, need the same things from a representation.
- `root_service`: the best source set the study's roots offer the new task (what it gets for free
  from the taxonomy already chosen), and what each further root would add to that.
- `choose_model`: the transfer a positioned task's model is built on, chosen on validation images.
- `split_test_images`: two disjoint halves of the test images, for comparisons that must not
  share test-image noise (the novel-task benchmark's rankings).
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


VAL_TIE = 0.01  # validation losses within this share of the lowest are as good: the fewest sources win


def choose_model(candidates: Sequence[Candidate], val_loss: Mapping[tuple[str, ...], float]) -> Candidate:
    """The transfer to build the new task's model on, chosen on validation images (the part of
    the labelled transfer images each readout held out), never on the test images whose figures
    the user then reads: a winner's score on the images that picked it is biased upward.
    `val_loss`: each transfer's validation loss, the mean over its replicates. The lowest wins;
    among those within VAL_TIE of it, the one with fewer sources (as good, cheaper to run)."""
    scored = [c for c in candidates if not c.is_baseline and math.isfinite(val_loss.get(c.sources, math.nan))]
    if not scored:
        raise ValueError("no transfer into the new task has a validation loss")
    best = min(val_loss[c.sources] for c in scored)
    close = [c for c in scored if val_loss[c.sources] <= best + VAL_TIE * abs(best)]
    return min(close, key=lambda c: (len(c.sources), val_loss[c.sources], c.name))


def split_test_images(image_ids: Iterable[str]) -> tuple[frozenset[str], frozenset[str]]:
    """Two disjoint halves of the test images, of equal size (the first one more when odd), by a
    hash of each id: no seed, the same in every process. Two rankings compared on the same images
    share those images' noise, which makes them look more alike than they are."""
    ids = sorted(set(map(str, image_ids)), key=lambda i: (hashlib.sha256(i.encode()).digest(), i))
    half = (len(ids) + 1) // 2
    return frozenset(ids[:half]), frozenset(ids[half:])
