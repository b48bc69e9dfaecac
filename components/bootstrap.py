"""How sure the answer is: a bootstrap over each target's test images (design.md section 10).

A resample draws each target's labelled test images again, with replacement: a multinomial count
vector w over the images. Its win rates are a weighted count,

    W_b[i, j] = sum_I w_I * (1[loss_i(I) < loss_j(I)] + 0.5 * 1[tie]) / sum_I w_I,

so every resample of a target is one (B, m) x (m, pairs) matrix product over the per-image
comparison outcomes, never a pass over rows. Each resample then goes through the same AHP as the
point estimate (`components.affinity.ahp_affinity`) and, for stability, the same taxonomy BIP.
Unlabelled images (NaN loss for every candidate) get weight 0, as they count nowhere in Stage III.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from components.affinity import AFFINITY_SCHEMA, PIXELS, LossCube, affinity_from_cube, ahp_affinity, loss_cube
from components.errors import TaskatlasError
from components.taxonomy import Taxonomy, TaxonomyOptions, TransferTable, solve_taxonomy

INTERVAL = (2.5, 97.5)  # percentiles of the reported 95% interval
INTERVAL_COLUMNS = ("affinity_lo", "affinity_hi")
INTERVAL_SCHEMA = pa.schema([*AFFINITY_SCHEMA, *(pa.field(c, pa.float64()) for c in INTERVAL_COLUMNS)])
ROOT = "self"  # the source set of a target that is a root, in the stability of its transfers
_CHUNK_ELEMENTS = 1 << 22  # comparison outcomes (or AHP matrix entries) held in memory at once


def resample_weights(cube: LossCube, n: int, seed: int) -> Iterator[np.ndarray]:
    """Per target, in cube order: an (n, m) int matrix, resample b's count of each image.

    Each row is multinomial over the target's labelled images and sums to their number; unlabelled
    images and padding get 0. Target t draws from its own stream (seed spawned per target), so its
    resamples do not depend on the other targets.
    """
    _check_bootstrappable(cube, n)  # here, not at the first next()
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise TaskatlasError(f"bootstrap: the seed must be an integer >= 0, got {seed!r}")
    return _weights(cube, n, np.random.SeedSequence(seed).spawn(len(cube.targets)))


def _weights(cube: LossCube, n: int, streams: list[np.random.SeedSequence]) -> Iterator[np.ndarray]:
    for t, stream in enumerate(streams):
        labelled = np.flatnonzero(_labelled(cube, t))
        counts = np.random.default_rng(stream).multinomial(
            len(labelled), np.full(len(labelled), 1.0 / len(labelled)), size=n
        )
        weights = np.zeros((n, cube.losses.shape[2]), dtype=np.int64)
        weights[:, labelled] = counts
        yield weights


def bootstrap_affinities(cube: LossCube, n: int, seed: int) -> np.ndarray:
    """(n, T, n_cand) affinities of n resamples; 0 outside `candidate_mask(cube)` (pixels, padding).

    Holds the (n, T, n_cand, n_cand) win rates at once; comparisons and AHP run in chunks.
    """
    _check_bootstrappable(cube, n)
    n_targets, n_cand, _ = cube.losses.shape
    wins = np.full((n, n_targets, n_cand, n_cand), 0.5)  # diagonal 0.5, as in win_rates
    upper, lower = np.triu_indices(n_cand, 1)  # candidate pairs i < j; W[j, i] is 1 - W[i, j]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, len(upper)))
    for t, weights in enumerate(resample_weights(cube, n, seed)):
        labelled = _labelled(cube, t)
        losses, weights = cube.losses[t][:, labelled], weights[:, labelled].astype(float)  # (n_cand, m)
        counts = np.zeros((n, len(upper)))  # (B, pairs): weighted wins of i over j, ties half
        for start in range(0, losses.shape[1], chunk):
            a, b = losses[upper, start : start + chunk], losses[lower, start : start + chunk]
            counts += weights[:, start : start + chunk] @ ((a < b) + 0.5 * (a == b)).T
        total = cube.n_images[t]  # every resample keeps the target's number of labelled images
        wins[:, t, upper, lower] = counts / total
        wins[:, t, lower, upper] = (total - counts) / total  # exact: counts are multiples of 0.5
    mask = candidate_mask(cube)
    per_chunk = max(1, _CHUNK_ELEMENTS // max(1, wins[0].size))
    return np.concatenate(
        [ahp_affinity(wins[start : start + per_chunk], mask) for start in range(0, n, per_chunk)]
    )


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
    return affinity_with_intervals(cube, bootstrap_affinities(cube, n, seed))


def affinity_with_intervals(cube: LossCube, samples: np.ndarray) -> pa.Table:
    """The cube's affinity table with the intervals of `samples` (from `bootstrap_affinities`)."""
    table = affinity_from_cube(cube)
    lo, hi = affinity_intervals(cube, samples)
    return pa.Table.from_arrays([*table.columns, pa.array(lo), pa.array(hi)], schema=INTERVAL_SCHEMA)


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
