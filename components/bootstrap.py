"""How sure the answer is: a bootstrap over each target's test images (design.md section 10).

A resample draws each target's labelled test images again, with replacement: a multinomial count
vector w over the images. Its win rates are a weighted count,

    W_b[i, j] = sum_I w_I * (1[loss_i(I) < loss_j(I)] + 0.5 * 1[tie]) / sum_I w_I,

computed with the point estimate, per target, by `components.affinity` (`affinity_by_target`,
`cube_affinity`); each resample goes through the same AHP and, for stability, the same taxonomy
BIP. Target t draws from its own stream (stream t of the seed, targets sorted), as design.md asks
for a bootstrap over each target's images: reading targets one at a time changes nothing. This
module lays the resamples out over a cube, gives their intervals, and solves the BIP on each.
Unlabelled images (NaN loss for every candidate) get weight 0, as they count nowhere in Stage III.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from components.affinity import (
    INTERVAL,
    INTERVAL_COLUMNS,
    PIXELS,
    LossCube,
    affinity_from_cube,
    cube_affinity,
    loss_cube,
    resample_counts,
    resample_streams,
)
from components.errors import TaskatlasError
from components.taxonomy import Taxonomy, TaxonomyOptions, TransferTable, solve_taxonomy

ROOT = "self"  # the source set of a target that is a root, in the stability of its transfers


def resample_weights(cube: LossCube, n: int, seed: int) -> Iterator[np.ndarray]:
    """Per target, in cube order: an (n, m) int matrix, resample b's count of each image.

    Each row is multinomial over the target's labelled images and sums to their number; unlabelled
    images and padding get 0. These are the weights `cube_affinity(cube, n, seed)` uses.
    """
    _check_bootstrappable(cube, n)  # here, not at the first next()
    return _weights(cube, n, resample_streams(seed, len(cube.targets)))


def _weights(cube: LossCube, n: int, streams: list[np.random.SeedSequence]) -> Iterator[np.ndarray]:
    for t, stream in enumerate(streams):
        labelled = np.flatnonzero(_labelled(cube, t))
        weights = np.zeros((n, cube.losses.shape[2]), dtype=np.int64)
        weights[:, labelled] = resample_counts(stream, len(labelled), n)
        yield weights


def bootstrap_affinities(cube: LossCube, n: int, seed: int) -> np.ndarray:
    """(n, T, n_cand) affinities of n resamples; 0 outside `candidate_mask(cube)` (pixels, padding)."""
    _check_bootstrappable(cube, n)
    samples = np.zeros((n, *cube.candidates.shape))
    t, c = np.nonzero(candidate_mask(cube))  # the rows of the cube's affinity table, in order
    samples[:, t, c] = cube_affinity(cube, n, seed).samples
    return samples


def candidate_mask(cube: LossCube) -> np.ndarray:
    """(T, n_cand) bool: the candidates of `affinity_from_cube` (pixels is only a reference)."""
    mask = cube.candidates >= 0
    pixels_at = cube.candidate_index(PIXELS)
    rows = np.flatnonzero(pixels_at >= 0)
    mask[rows, pixels_at[rows]] = False
    return mask


def affinity_intervals(cube: LossCube, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi): the 95% percentile interval of each row of the cube's affinity table, in its order."""
    t, c = np.nonzero(candidate_mask(cube))  # the row order of affinity_from_cube
    lo, hi = np.percentile(samples[:, t, c], INTERVAL, axis=0)
    return lo, hi


def compute_affinity_with_intervals(losses: pa.Table, n: int, seed: int) -> pa.Table:
    """`compute_affinity` plus `affinity_lo`, `affinity_hi` over n resamples (INTERVAL_SCHEMA)."""
    cube = loss_cube(losses)
    _check_bootstrappable(cube, n)
    return cube_affinity(cube, n, seed).table


def affinity_with_intervals(cube: LossCube, samples: np.ndarray) -> pa.Table:
    """The cube's affinity table with the intervals of `samples` (from `bootstrap_affinities`)."""
    table = affinity_from_cube(cube)
    for name, values in zip(INTERVAL_COLUMNS, affinity_intervals(cube, samples), strict=True):
        table = table.append_column(pa.field(name, pa.float64()), pa.array(values))
    return table


def taxonomy_stability(
    cube: LossCube, samples: np.ndarray, options: TaxonomyOptions, chosen: Taxonomy
) -> dict:
    """Solve the BIP on every resample; how often each answer comes back.

    `chosen` is the point-estimate taxonomy. Returns fractions of resamples: `roots` (task -> root),
    `transfers` (target -> `+`-joined source set that serves it, `self` when it is a root) and
    `taxonomy` (exactly the chosen roots and transfers). Inner mappings list the most frequent first.
    """
    t, c = np.nonzero(candidate_mask(cube))
    targets = [cube.targets[i] for i in t]
    sources = [cube.source_sets[i] for i in cube.candidates[t, c]]
    return stability_of_rows(targets, sources, samples[:, t, c], options, chosen)


def stability_of_rows(
    targets: list[str],
    sources: list[tuple[str, ...]],
    samples: np.ndarray,
    options: TaxonomyOptions,
    chosen: Taxonomy,
) -> dict:
    """`taxonomy_stability` on resampled affinities given per row of an affinity table:
    `samples` is (resamples, rows), row i being `targets[i] <- sources[i]`."""
    roots: Counter[str] = Counter()
    transfers: defaultdict[str, Counter[str]] = defaultdict(Counter)
    same = 0
    for values in samples:
        taxonomy = solve_taxonomy(
            TransferTable.from_rows(zip(targets, sources, values, strict=True)), options
        )
        roots.update(taxonomy.roots)
        for target in taxonomy.affinity:  # every target solved for: a root or served by a transfer
            transfers[target]["+".join(taxonomy.transfers.get(target, (ROOT,)))] += 1
        same += taxonomy.roots == chosen.roots and dict(taxonomy.transfers) == dict(chosen.transfers)
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
    return ~np.isnan(cube.losses[t]).all(axis=0)


def _check_bootstrappable(cube: LossCube, n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise TaskatlasError(f"bootstrap: the number of resamples must be an integer >= 1, got {n!r}")
    if (single := np.flatnonzero(cube.n_images < 2)).size:
        names = ", ".join(cube.targets[i] for i in single)
        raise TaskatlasError(
            f"cannot bootstrap target(s) {names}: only one labelled test image (a resample needs at least 2)"
        )
