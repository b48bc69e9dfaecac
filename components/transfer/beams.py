"""A target's beam: which first-order sources its higher-order source sets are drawn from, and
whether a bootstrap resample would have drawn the same ones (`beam_availability`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def rank_sources(first_order_losses: Mapping[str, float], exclude: str = "") -> list[str]:
    """Sources by mean test loss, best first; ties by name so every rerun picks the same beam."""
    return sorted((s for s in first_order_losses if s != exclude), key=lambda s: (first_order_losses[s], s))


MAX_WIDEN = 2  # a widened beam takes in at most this many sources past its size


def beam(
    losses: Mapping[str, float | Sequence[float]], size: int, widen: float = 0.0, exclude: str = ""
) -> list[str]:
    """A target's beam: its `size` best sources by mean validation loss over their replicates, and,
    with `widen` > 0, up to `MAX_WIDEN` more whose mean lies within `widen` standard errors of the
    difference from the last one in (sources a rerun with other seeds could as well have put in).

    Why the replicates' mean and a margin: a beam chosen on one seed's losses is luck where sources
    are within seed noise of its edge, and a higher-order transfer outside it is never measured."""
    values = {s: np.atleast_1d(np.asarray(v, dtype=float)) for s, v in losses.items() if s != exclude}
    values = {s: v[np.isfinite(v)] for s, v in values.items()}
    values = {s: v for s, v in values.items() if v.size}
    means = {s: float(v.mean()) for s, v in values.items()}
    ranked = rank_sources(means)
    chosen = ranked[:size]
    if widen <= 0 or len(ranked) <= size or size == 0:
        return chosen
    edge = chosen[-1]

    def se2(s: str) -> float:  # squared standard error of a source's mean; 0 with one replicate
        v = values[s]
        return float(v.var(ddof=1) / v.size) if v.size > 1 else 0.0

    for s in ranked[size : size + MAX_WIDEN]:
        if means[s] - means[edge] <= widen * math.sqrt(se2(s) + se2(edge)):
            chosen.append(s)
    return chosen


def beam_availability(
    rows: Sequence[tuple[str, tuple[str, ...]]],
    val_losses: Mapping[tuple[str, str], np.ndarray],
    draws: Mapping[tuple[str, str], np.ndarray],
    orders: Sequence[int],
    beams: Sequence[int],
    widen: float,
    n: int,
) -> np.ndarray:
    """(n, rows) bool: whether each affinity row (target, source set) was in reach in each of n
    bootstrap resamples. A higher-order set is in reach when all its sources are in the beam that
    resample's validation losses choose: `val_losses[(target, source)]` are a first-order
    readout's replicates' validation losses and `draws[(target, source)]` (n, R) the replicates
    the resample draws of it (the same draw as its test losses). First-order rows, baselines and
    orders not in `orders` are always in reach.

    Why: each study's higher-order candidates come from its own beam; a bootstrap over test losses
    alone cannot see that a rerun might not have trained a transfer at all."""
    size = dict(zip(orders, beams, strict=True))
    out = np.ones((n, len(rows)), dtype=bool)
    chosen: dict[tuple[str, int], list[set[str]]] = {}
    for i, (target, sources) in enumerate(rows):
        k = len(sources)
        if k < 2 or k not in size:
            continue
        if (target, k) not in chosen:
            mine = {s: v for (t, s), v in val_losses.items() if t == target}
            chosen[target, k] = [
                set(beam({s: v[draws[target, s][b]] for s, v in mine.items()}, size[k], widen, target))
                for b in range(n)
            ]
        out[:, i] = [set(sources) <= reach for reach in chosen[target, k]]
    return out
