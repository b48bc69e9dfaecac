"""The measured affinities indexed for the Stage IV solver (`TransferTable`), baselines dropped.

Apart from the BIP (`components.taxonomy`), so reading an affinity table does not load the solver."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from components.errors import TaskatlasError
from components.vocabulary import PIXELS, RANDOM, SELF

# SELF: the target's fully supervised network, the value of making the target a root. PIXELS and
# RANDOM (raw pixels, a random-init encoder) are baselines, not tasks to supervise: the solver
# drops them.
BASELINES = (PIXELS, RANDOM)  # never roots, never sources (design.md section 6)


@dataclass(frozen=True, eq=False)
class TransferTable:
    """Measured affinities, indexed for the solver.

    `tasks` are all task names (targets and sources, `self`/`pixels` excluded), sorted; the other
    arrays index into it. One row per (target, source set); a source set measured twice (e.g. in
    two orders) keeps its best value, which is what the BIP would pick anyway.
    """

    tasks: tuple[str, ...]
    target: np.ndarray  # (E,) int: the transfer's target
    sources: np.ndarray  # (E, K) int: its sources, sorted, padded with -1
    value: np.ndarray  # (E,) float: affinity
    self_value: np.ndarray  # (n_tasks,) float: affinity of self -> task; NaN where not measured
    is_target: np.ndarray  # (n_tasks,) bool: the task appears as a target

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[str, Sequence[str], float]]) -> TransferTable:
        """Rows of (target, sources, affinity). Rows using `pixels` or `random` are dropped: those
        are baselines, not tasks to supervise, so on any input neither becomes a root (Taskonomy's
        released tables use `random` inside higher-order source sets too)."""
        best: dict[tuple[str, tuple[str, ...]], float] = {}
        self_value: dict[str, float] = {}
        targets: set[str] = set()
        for target, raw_sources, value in rows:
            sources = tuple(sorted(set(raw_sources)))
            value = float(value)
            if not sources:
                raise TaskatlasError(f"target {target!r} has a row with no sources")
            if not math.isfinite(value) or value < 0:
                raise TaskatlasError(
                    f"{target} <- {'+'.join(sources)}: affinity {value} is not a finite >= 0"
                )
            targets.add(target)
            if SELF in sources and len(sources) > 1:
                raise TaskatlasError(f"{target} <- {'+'.join(sources)}: 'self' cannot be combined")
            if set(BASELINES) & set(sources):
                continue
            if sources == (SELF,):
                self_value[target] = max(value, self_value.get(target, -1.0))
                continue
            key = (target, sources)
            best[key] = max(value, best.get(key, -1.0))
        tasks = tuple(sorted(targets | {s for _, sources in best for s in sources}))
        index = {name: i for i, name in enumerate(tasks)}
        width = max((len(sources) for _, sources in best), default=1)
        source_ids = np.full((len(best), width), -1, dtype=np.int64)
        for row, (_, sources) in enumerate(best):
            source_ids[row, : len(sources)] = [index[s] for s in sources]
        return cls(
            tasks=tasks,
            target=np.array([index[t] for t, _ in best], dtype=np.int64),
            sources=source_ids,
            value=np.array(list(best.values()), dtype=float),
            self_value=np.array([self_value.get(t, np.nan) for t in tasks]),
            is_target=np.array([t in targets for t in tasks], dtype=bool),
        )

    @property
    def order(self) -> np.ndarray:
        return (self.sources >= 0).sum(axis=1)

    @property
    def target_names(self) -> tuple[str, ...]:
        return tuple(t for t, is_t in zip(self.tasks, self.is_target, strict=True) if is_t)
