"""How sure the answer is: the multi-bootstrap over test images and replicates (design.md
section 10).

A resample draws one multinomial count vector w over the study's test images, the same for every
candidate and every target (`image_weights`), and the replicates it reads (`replicate_draws`: with
paired seeds one draw of a target's replicate slots, shared by all its candidates). Its win rates
are the point estimate's statistic, the mean over the drawn replicate pairs of a weighted count,

    W_b[i, j] = mean_(a,b) sum_I w_I * (1[loss_i^a(I) < loss_j^b(I)] + 0.5 * 1[tie]) / sum_I w_I,

computed with the point estimate, per target, by `components.affinity` (`affinity_by_target`,
`cube_affinity`); each resample goes through the same AHP and, for stability, the same taxonomy
BIP. Reading targets one at a time changes nothing: the weights are over the study's image ids
and the replicate draws depend on the seed and the target (and the source set, for independent
seeds) only. This module lays the resamples out over a cube, gives their intervals and each
candidate's probability of being the best, and solves the BIP on each. Unlabelled images (NaN
loss for every candidate) get weight 0 for their target, as they count nowhere in Stage III.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa

from components.affinity import P_BEST, PIXELS
from components.errors import TaskatlasError
from components.loss_cube import LossCube
from components.resampling import image_weights
from components.taxonomy import Taxonomy, TaxonomyOptions, solve_taxonomy
from components.transfer_table import TransferTable
from components.vocabulary import SELF

ROOT = SELF  # the source set of a target that is a root, in the stability of its transfers


def resample_weights(cube: LossCube, n: int, seed: int) -> Iterator[np.ndarray]:
    """Per target, in cube order: an (n, m) int matrix, resample b's count of each of the target's
    image slots (`cube.losses[t]`'s last axis).

    Every target's counts come from the same study-wide vectors, `image_weights(seed,
    cube.image_ids, n)`: a shared image has the same count in every target. Unlabelled images and
    padding get 0, so a target's row sums to the draws that landed on its labelled images. These
    are the weights `cube_affinity(cube, n, seed)` uses.
    """
    _check_bootstrappable(cube, n)  # here, not at the first next()
    return _weights(cube, image_weights(seed, cube.image_ids, n))


def _weights(cube: LossCube, weights: np.ndarray) -> Iterator[np.ndarray]:
    for t in range(len(cube.targets)):
        slots = cube.images[t]
        yield np.where(_labelled(cube, t) & (slots >= 0), weights[:, slots], 0)


def candidate_mask(cube: LossCube) -> np.ndarray:
    """(T, n_cand) bool: the candidates of `affinity_from_cube` (pixels is only a reference)."""
    mask = cube.candidates >= 0
    pixels_at = cube.candidate_index(PIXELS)
    rows = np.flatnonzero(pixels_at >= 0)
    mask[rows, pixels_at[rows]] = False
    return mask


def best_candidates(
    table: pa.Table, threshold: float = 0.1
) -> dict[str, list[tuple[tuple[str, ...], float]]]:
    """Per target, the candidates not distinguishable from the best: those whose `p_best` (the
    share of resamples in which they have the highest affinity, `self` aside) is at least
    `threshold`, as (sources, p_best), most probable first. Needs a table with `p_best` (from a
    bootstrap)."""
    if P_BEST not in table.column_names:
        raise TaskatlasError(f"the affinity table has no {P_BEST!r} column: compute it with a bootstrap")
    best: dict[str, list[tuple[tuple[str, ...], float]]] = {}
    for row in table.select(["target", "sources", P_BEST]).to_pylist():
        p = row[P_BEST]
        if p is not None and p == p and p >= threshold:  # NaN (self) never
            best.setdefault(row["target"], []).append((tuple(row["sources"]), float(p)))
    return {t: sorted(rows, key=lambda r: (-r[1], r[0])) for t, rows in sorted(best.items())}


def stability_of_rows(
    targets: list[str],
    sources: list[tuple[str, ...]],
    samples: np.ndarray,
    options: TaxonomyOptions,
    chosen: Taxonomy,
    *,
    available: np.ndarray | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Solve the BIP on every resample; how often each answer comes back, from resampled affinities given per row of an affinity table:
    `samples` is (resamples, rows), row i being `targets[i] <- sources[i]`. `available`
    (resamples, rows) bool: rows a resample leaves out of its BIP (False: that resample's beam
    would not have trained the transfer); default every row in every resample. `progress(1)` is
    called as each resample is solved."""
    if available is not None and np.shape(available) != np.shape(samples):
        raise TaskatlasError(
            f"stability: available has shape {np.shape(available)}, the samples {np.shape(samples)}"
        )
    roots: Counter[str] = Counter()
    transfers: defaultdict[str, Counter[str]] = defaultdict(Counter)
    same = 0
    for b, values in enumerate(samples):
        rows = zip(targets, sources, values, strict=True)
        if available is not None:
            rows = (row for row, keep in zip(rows, available[b], strict=True) if keep)
        taxonomy = solve_taxonomy(TransferTable.from_rows(rows), options)
        roots.update(taxonomy.roots)
        for target in taxonomy.affinity:  # every target solved for: a root or served by a transfer
            transfers[target]["+".join(taxonomy.transfers.get(target, (ROOT,)))] += 1
        same += taxonomy.roots == chosen.roots and dict(taxonomy.transfers) == dict(chosen.transfers)
        if progress is not None:
            progress(1)
    n = len(samples)
    return {
        "roots": _fractions(roots, n),
        "transfers": {target: _fractions(transfers[target], n) for target in sorted(transfers)},
        "taxonomy": same / n,
    }


def _fractions(counts: Counter[str], n: int) -> dict[str, float]:
    return {key: count / n for key, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))}


def _labelled(cube: LossCube, t: int) -> np.ndarray:
    """(m,) bool: images of target t with a loss (not unlabelled, not padding)."""
    return ~np.isnan(cube.losses[t]).all(axis=(0, 1))


def _check_bootstrappable(cube: LossCube, n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise TaskatlasError(f"bootstrap: the number of resamples must be an integer >= 1, got {n!r}")
    if (single := np.flatnonzero(cube.n_images < 2)).size:
        names = ", ".join(cube.targets[i] for i in single)
        raise TaskatlasError(
            f"cannot bootstrap target(s) {names}: only one labelled test image (a resample needs at least 2)"
        )
