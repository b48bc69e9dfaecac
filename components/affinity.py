"""Stage III: per-image transfer losses -> win rates -> AHP affinities (design.md section 5).

For each target, every candidate (each source set measured into it, plus `self` and `random`)
is compared with every other image by image; the win-rate matrix W becomes R = W / W^T and the
affinities are R's Perron vector. `pixels` is not a candidate (design.md lists every transfer,
self and random): it is only the reference for `gain`, as `self` is for `quality`.

All targets are computed at once on a padded (targets, candidates, images) cube; padding is NaN,
which compares false, so it never counts as a win or a tie. An image whose label has no valid
pixel for a target has a NaN loss for every candidate (design.md section 2): it is left out of
that target's win rates exactly like padding, and counted in `LossCube.unlabelled`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from components.affinity_io import factorize, source_sets
from components.errors import TaskatlasError

SELF = ("self",)  # the target's fully supervised network
RANDOM = ("random",)  # a random-init encoder: an ordinary candidate
PIXELS = ("pixels",)  # trained from raw pixels: the reference for gain, not a candidate
WIN_CLIP = (0.001, 0.999)  # keeps W / W^T finite when a source always (or never) wins
_CHUNK_ELEMENTS = 1 << 24  # comparisons held in memory at once by win_rates

AFFINITY_SCHEMA = pa.schema(
    [
        ("target", pa.string()),
        ("sources", pa.list_(pa.string())),
        ("order", pa.int32()),
        ("affinity", pa.float64()),
        ("quality", pa.float64()),  # win rate against self
        ("gain", pa.float64()),  # win rate against pixels; NaN where pixels was not measured
    ]
)


@dataclass(frozen=True, eq=False)
class LossCube:
    """The loss table arranged per target, padded with NaN."""

    targets: list[str]  # (T,) sorted
    source_sets: list[tuple[str, ...]]  # every source set in the table, sorted
    candidates: np.ndarray  # (T, n) int: index into source_sets of each candidate; -1 = padding
    losses: np.ndarray  # (T, n, m) float: loss of candidate c on the target's image i
    n_images: np.ndarray  # (T,) test images of each target that count (labelled ones)
    unlabelled: np.ndarray  # (T,) test images left out: no valid label pixel for the target

    def candidate_index(self, sources: tuple[str, ...]) -> np.ndarray:
        """(T,) position of `sources` among each target's candidates, -1 where absent."""
        if sources not in self.source_sets:
            return np.full(len(self.targets), -1)
        hit = self.candidates == self.source_sets.index(sources)
        return np.where(hit.any(axis=1), hit.argmax(axis=1), -1)


def loss_cube(table: pa.Table) -> LossCube:
    """Validate and arrange a `target, sources, image_id, loss` table; no loop over rows.

    Every candidate of a target must have a loss for each of the target's test images (the union
    over its candidates), exactly once; otherwise the error names the target and source set. A
    NaN loss means "no valid label pixel": allowed only where every candidate has it.
    """
    target, targets = factorize(table["target"], "target")
    source, sets = source_sets(table["sources"])
    image, image_ids = factorize(table["image_id"], "image_id")
    loss = table["loss"].to_numpy(zero_copy_only=False).astype(float)
    if np.isinf(loss).any():
        bad = int(np.flatnonzero(np.isinf(loss))[0])
        raise TaskatlasError(
            f"loss of {targets[target[bad]]} <- {'+'.join(sets[source[bad]])} on image "
            f"{image_ids[image[bad]]!r} is {loss[bad]} (must be finite, or NaN for an unlabelled image)"
        )
    n_targets = len(targets)
    cand_target, cand_set, cand_of_row, n_cands = _group(target, source, len(sets), n_targets)
    img_target, _, img_of_row, n_images = _group(target, image, len(image_ids), n_targets)
    cand_rank = _rank_within(cand_target)
    img_rank = _rank_within(img_target)

    row_cand, row_img = cand_rank[cand_of_row], img_rank[img_of_row]
    cell = (target * n_cands.max() + row_cand) * n_images.max() + row_img
    cells, counts = np.unique(cell, return_counts=True)
    if (counts > 1).any():
        row = int(np.flatnonzero(cell == cells[counts.argmax()])[0])
        raise TaskatlasError(
            f"{targets[target[row]]} <- {'+'.join(sets[source[row]])}: image {image_ids[image[row]]!r} "
            f"has {counts.max()} losses (source sets are compared as sets: a+b is b+a)"
        )
    rows_per_cand = np.bincount(cand_of_row, minlength=len(cand_target))
    if (short := np.flatnonzero(rows_per_cand < n_images[cand_target])).size:
        c = short[0]
        name = targets[cand_target[c]]
        raise TaskatlasError(
            f"{name} <- {'+'.join(sets[cand_set[c]])}: losses for {rows_per_cand[c]} of the target's "
            f"{n_images[cand_target[c]]} test images; every source set needs all of them"
        )

    candidates = np.full((n_targets, n_cands.max()), -1)
    candidates[cand_target, cand_rank] = cand_set
    losses = np.full((n_targets, n_cands.max(), n_images.max()), np.nan)
    losses[target, row_cand, row_img] = loss
    is_nan = np.zeros(losses.shape, bool)
    is_nan[target, row_cand, row_img] = np.isnan(loss)
    nan_count = is_nan.sum(axis=1)  # (T, m): candidates without a loss value on each image
    partial = (nan_count > 0) & (nan_count < n_cands[:, None])
    if partial.any():
        t, i = map(int, np.argwhere(partial)[0])
        c = int(np.flatnonzero(is_nan[t, :, i])[0])
        row = int(np.flatnonzero((target == t) & (row_cand == c) & (row_img == i))[0])
        raise TaskatlasError(
            f"loss of {targets[t]} <- {'+'.join(sets[source[row]])} on image {image_ids[image[row]]!r} "
            "is NaN while other candidates have a loss there (NaN marks an image without a valid "
            "label, for every candidate)"
        )
    unlabelled = (nan_count == n_cands[:, None]).sum(axis=1)  # padding has no placed NaN
    if (empty := np.flatnonzero(unlabelled >= n_images)).size:
        raise TaskatlasError(f"target {targets[empty[0]]} has no test image with a valid label")
    return LossCube(
        targets=targets,
        source_sets=sets,
        candidates=candidates,
        losses=losses,
        n_images=n_images - unlabelled,
        unlabelled=unlabelled,
    )


def unlabelled_counts(cube: LossCube) -> dict[str, int]:
    """Targets with test images left out of their win rates (no valid label pixel) -> how many."""
    return {t: int(n) for t, n in zip(cube.targets, cube.unlabelled, strict=True) if n}


def describe_unlabelled(counts: dict[str, int]) -> str:
    items = ", ".join(f"{t} {n}" for t, n in sorted(counts.items()))
    return f"test images without a valid label, left out of their target's win rates: {items}"


def win_rates(losses: np.ndarray, n_images: np.ndarray) -> np.ndarray:
    """(T, n, m) NaN-padded losses -> (T, n, n) W: the fraction of images where i beats j, ties half.

    Loops over chunks of images only to bound memory; each chunk is one broadcast comparison.
    """
    n_targets, n, m = losses.shape
    chunk = max(1, _CHUNK_ELEMENTS // max(1, n_targets * n * n))
    wins = np.zeros((n_targets, n, n))
    for start in range(0, m, chunk):
        block = losses[..., start : start + chunk]
        a, b = block[:, :, None, :], block[:, None, :, :]  # (T, n, 1, c), (T, 1, n, c)
        wins += (a < b).sum(axis=-1) + 0.5 * (a == b).sum(axis=-1)
    wins /= np.asarray(n_images, dtype=float)[:, None, None]
    diagonal = np.arange(n)
    wins[:, diagonal, diagonal] = 0.5
    return wins


def perron_vector(ratios: np.ndarray) -> np.ndarray:
    """(..., n, n) positive matrices -> (..., n) principal eigenvectors, real, positive, sum 1.

    numpy's eig returns complex dtype; the Perron eigenvalue is real, so the real part is exact.
    Zero rows/columns (padding) get weight 0.
    """
    values, vectors = np.linalg.eig(ratios)
    top = np.argmax(values.real, axis=-1)
    vector = np.take_along_axis(vectors, top[..., None, None], axis=-1)[..., 0].real
    vector = vector * np.sign(vector.sum(axis=-1, keepdims=True))
    vector = np.where(np.abs(ratios).sum(axis=-1) > 0, vector, 0.0)
    return vector / vector.sum(axis=-1, keepdims=True)


def ahp_affinity(wins: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(T, n, n) win rates and (T, n) candidate mask -> (T, n) affinities (0 outside the mask)."""
    clipped = np.clip(wins, *WIN_CLIP)
    both = mask[..., :, None] & mask[..., None, :]
    ratios = np.where(both, clipped / np.swapaxes(clipped, -1, -2), 0.0)
    return perron_vector(ratios)


def compute_affinity(losses: pa.Table) -> pa.Table:
    """The affinity table (AFFINITY_SCHEMA) of a per-image loss table; needs `self` for every target."""
    return affinity_from_cube(loss_cube(losses))


def affinity_from_cube(cube: LossCube) -> pa.Table:
    """`compute_affinity` on a cube already built (callers that also report `cube.unlabelled`)."""
    self_at = cube.candidate_index(SELF)
    if (self_at < 0).any():
        missing = [t for t, i in zip(cube.targets, self_at, strict=True) if i < 0]
        raise TaskatlasError(
            f"target(s) {', '.join(missing)} have no 'self' losses (the fully supervised network)"
        )
    pixels_at = cube.candidate_index(PIXELS)
    wins = win_rates(cube.losses, cube.n_images)
    rows = np.arange(len(cube.targets))
    mask = cube.candidates >= 0
    mask[rows[pixels_at >= 0], pixels_at[pixels_at >= 0]] = False
    affinity = ahp_affinity(wins, mask)
    quality = wins[rows, :, self_at]  # (T, n)
    gain = np.where((pixels_at >= 0)[:, None], wins[rows, :, np.maximum(pixels_at, 0)], np.nan)

    t, c = np.nonzero(mask)
    sources = [cube.source_sets[i] for i in cube.candidates[t, c]]
    return pa.table(
        {
            "target": [cube.targets[i] for i in t],
            "sources": [list(s) for s in sources],
            "order": np.array([len(s) for s in sources], dtype=np.int32),
            "affinity": affinity[t, c],
            "quality": quality[t, c],
            "gain": gain[t, c],
        },
        schema=AFFINITY_SCHEMA,
    )


def top_sources(table: pa.Table, k: int) -> dict[str, list[tuple[tuple[str, ...], float]]]:
    """Per target, its `k` highest-affinity candidates other than `self`: (sources, affinity)."""
    by_target: dict[str, list] = {}
    for row in table.select(["target", "sources", "affinity"]).to_pylist():
        if tuple(row["sources"]) != SELF:
            by_target.setdefault(row["target"], []).append((tuple(row["sources"]), row["affinity"]))
    return {t: sorted(rows, key=lambda r: (-r[1], r[0]))[:k] for t, rows in sorted(by_target.items())}


def _group(key: np.ndarray, value: np.ndarray, n_values: int, n_keys: int) -> tuple[np.ndarray, ...]:
    """Distinct (key, value) pairs sorted by key: (pair key, pair value, pair of each row, pairs per key)."""
    pairs, pair_of_row = np.unique(key * n_values + value, return_inverse=True)
    pair_key = pairs // n_values
    return pair_key, pairs % n_values, pair_of_row.ravel(), np.bincount(pair_key, minlength=n_keys)


def _rank_within(sorted_keys: np.ndarray) -> np.ndarray:
    """Position of each element among the elements with the same key (keys sorted)."""
    return np.arange(len(sorted_keys)) - np.searchsorted(sorted_keys, sorted_keys, side="left")
