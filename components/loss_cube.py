"""The loss table arranged per target (`LossCube`): validated, padded with NaN, and the unlabelled images counted.

Stage III and its bootstrap read losses only through a cube, so the checks on a loss table live here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from components.affinity_io import REPLICATE, factorize, source_sets
from components.errors import TaskatlasError


@dataclass(frozen=True, eq=False)
class LossCube:
    """The loss table arranged per target, padded with NaN."""

    targets: list[str]  # (T,) sorted
    source_sets: list[tuple[str, ...]]  # every source set in the table, sorted
    candidates: np.ndarray  # (T, n) int: index into source_sets of each candidate; -1 = padding
    losses: np.ndarray  # (T, n, R, m) float: loss of candidate c's replicate r on the target's image i
    n_replicates: np.ndarray  # (T, n) int: replicates of each candidate (0 = padding)
    n_images: np.ndarray  # (T,) test images of each target that count (labelled ones)
    unlabelled: np.ndarray  # (T,) test images left out: no valid label pixel for the target
    image_ids: list[str]  # every image id of the table as text, sorted: the bootstrap's image axis
    images: np.ndarray  # (T, m) int: index into image_ids of the target's image i; -1 = padding

    def candidate_index(self, sources: tuple[str, ...]) -> np.ndarray:
        """(T,) position of `sources` among each target's candidates, -1 where absent."""
        if sources not in self.source_sets:
            return np.full(len(self.targets), -1)
        hit = self.candidates == self.source_sets.index(sources)
        return np.where(hit.any(axis=1), hit.argmax(axis=1), -1)


def loss_cube(table: pa.Table) -> LossCube:
    """Validate and arrange a `target, sources, image_id, loss[, replicate]` table; no loop over rows.

    Each candidate's replicates are numbered 0..R_c-1 (R_c >= 1; without a `replicate` column every
    row is replicate 0). Every replicate of a candidate must have a loss for each of the target's
    test images (the union over its candidates), exactly once; otherwise the error names the
    target, source set and replicate. A NaN loss means "no valid label pixel": allowed only where
    every candidate and replicate has it.
    """
    target, targets = factorize(table["target"], "target")
    source, sets = source_sets(table["sources"])
    image, raw_ids = factorize(table["image_id"], "image_id")
    replicate = _replicate_column(table)
    loss = table["loss"].to_numpy(zero_copy_only=False).astype(float)

    def where(row: int) -> str:  # "t <- a+b"
        return f"{targets[target[row]]} <- {'+'.join(sets[source[row]])}"

    if np.isinf(loss).any():
        bad = int(np.flatnonzero(np.isinf(loss))[0])
        raise TaskatlasError(
            f"loss of {where(bad)} on image {raw_ids[image[bad]]!r} in replicate {replicate[bad]} is "
            f"{loss[bad]} (must be finite, or NaN for an unlabelled image)"
        )
    n_targets = len(targets)
    cand_target, cand_set, cand_of_row, n_cands = _group(target, source, len(sets), n_targets)
    img_target, img_value, img_of_row, n_images = _group(target, image, len(raw_ids), n_targets)
    cand_rank, img_rank = _rank_within(cand_target), _rank_within(img_target)
    row_cand, row_img = cand_rank[cand_of_row], img_rank[img_of_row]
    n_c, n_r, m = int(n_cands.max()), int(replicate.max()) + 1, int(n_images.max())

    cell = ((target * n_c + row_cand) * n_r + replicate) * m + row_img
    if (repeated := _repeated_key(cell, n_targets * n_c * n_r * m)) is not None:
        key, count = repeated
        row = int(np.flatnonzero(cell == key)[0])
        raise TaskatlasError(
            f"{where(row)}: image {raw_ids[image[row]]!r} has {count} losses in replicate "
            f"{replicate[row]} (source sets are compared as sets: a+b is b+a)"
        )
    per_replicate = np.bincount(cand_of_row * n_r + replicate, minlength=len(cand_target) * n_r)
    per_replicate = per_replicate.reshape(-1, n_r)  # (candidates, R) rows of each replicate
    n_reps = n_r - np.argmax(per_replicate[:, ::-1] > 0, axis=1)  # highest replicate + 1
    expected = np.where(np.arange(n_r) < n_reps[:, None], n_images[cand_target][:, None], 0)
    if (short := np.argwhere(per_replicate < expected)).size:
        c, r = map(int, short[0])
        name = f"{targets[cand_target[c]]} <- {'+'.join(sets[cand_set[c]])}"
        if per_replicate[c, r] == 0:
            raise TaskatlasError(
                f"{name}: no losses in replicate {r}, but losses in replicate {n_reps[c] - 1} "
                "(a candidate's replicates are numbered 0..R-1)"
            )
        raise TaskatlasError(
            f"{name}: losses for {per_replicate[c, r]} of the target's {n_images[cand_target[c]]} test "
            f"images in replicate {r}; every source set needs all of them in every replicate"
        )

    candidates = np.full((n_targets, n_c), -1)
    candidates[cand_target, cand_rank] = cand_set
    n_replicates = np.zeros((n_targets, n_c), dtype=np.int64)
    n_replicates[cand_target, cand_rank] = n_reps
    losses = np.full((n_targets, n_c, n_r, m), np.nan)
    losses[target, row_cand, replicate, row_img] = loss
    nan_rows = np.flatnonzero(np.isnan(loss))
    nan_count = np.bincount(target[nan_rows] * m + row_img[nan_rows], minlength=n_targets * m)
    nan_count = nan_count.reshape(n_targets, m)  # (T, m): (candidate, replicate) pairs without a loss
    cells = n_replicates.sum(axis=1)[:, None]  # (T, 1): (candidate, replicate) pairs of each target
    if (partial := np.argwhere((nan_count > 0) & (nan_count < cells))).size:
        t, i = map(int, partial[0])
        row = int(nan_rows[(target[nan_rows] == t) & (row_img[nan_rows] == i)][0])
        raise TaskatlasError(
            f"loss of {where(row)} on image {raw_ids[image[row]]!r} is NaN while other candidates "
            f"have a loss there (replicate {replicate[row]}; NaN marks an image without a valid "
            "label, for every candidate and replicate)"
        )
    unlabelled = (nan_count == cells).sum(axis=1)  # padding has no placed NaN
    if (empty := np.flatnonzero(unlabelled >= n_images)).size:
        raise TaskatlasError(f"target {targets[empty[0]]} has no test image with a valid label")

    text = np.array([str(v) for v in raw_ids])  # the image axis of the bootstrap: ids as text
    order = np.argsort(text, kind="stable")
    if len(text) > 1 and (same := text[order][1:] == text[order][:-1]).any():
        raise TaskatlasError(f"image ids {text[order][np.argmax(same)]!r} appear in two spellings")
    text_rank = np.empty(len(order), dtype=np.int64)
    text_rank[order] = np.arange(len(order))
    images = np.full((n_targets, m), -1)
    images[img_target, img_rank] = text_rank[img_value]
    return LossCube(
        targets=targets,
        source_sets=sets,
        candidates=candidates,
        losses=losses,
        n_replicates=n_replicates,
        n_images=n_images - unlabelled,
        unlabelled=unlabelled,
        image_ids=text[order].tolist(),
        images=images,
    )


def unlabelled_counts(cube: LossCube) -> dict[str, int]:
    """Targets with test images left out of their win rates (no valid label pixel) -> how many."""
    return {t: int(n) for t, n in zip(cube.targets, cube.unlabelled, strict=True) if n}


def describe_unlabelled(counts: dict[str, int]) -> str:
    items = ", ".join(f"{t} {n}" for t, n in sorted(counts.items()))
    return f"test images without a valid label, left out of their target's win rates: {items}"


def _replicate_column(table: pa.Table) -> np.ndarray:
    """(rows,) int64: the `replicate` column, or 0 everywhere for a table without one."""
    if REPLICATE not in table.column_names:
        return np.zeros(table.num_rows, dtype=np.int64)
    column = table[REPLICATE]
    if not pa.types.is_integer(column.type):
        raise TaskatlasError(f"column 'replicate' must be integers, not {column.type}")
    if column.null_count:
        raise TaskatlasError(f"column 'replicate' has {column.null_count} missing value(s)")
    values = column.to_numpy(zero_copy_only=False).astype(np.int64)
    if len(values) and values.min() < 0:
        raise TaskatlasError(f"column 'replicate' has a negative value ({values.min()})")
    return values


def _group(key: np.ndarray, value: np.ndarray, n_values: int, n_keys: int) -> tuple[np.ndarray, ...]:
    """Distinct (key, value) pairs sorted by key: (pair key, pair value, pair of each row, pairs per key)."""
    pairs, pair_of_row, _ = _unique(key * n_values + value, n_keys * n_values)
    pair_key = pairs // n_values
    return pair_key, pairs % n_values, pair_of_row, np.bincount(pair_key, minlength=n_keys)


def _unique(keys: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """np.unique(keys, return_inverse=True, return_counts=True) for keys in [0, size); by counting,
    without a sort, when the range is small (it is for a target's table: sources x images)."""
    if size > 4 * len(keys) + (1 << 20):
        uniques, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        return uniques, inverse.ravel(), counts
    counts = np.bincount(keys, minlength=size)
    uniques = np.flatnonzero(counts)
    code = np.zeros(size, dtype=np.int64)
    code[uniques] = np.arange(len(uniques))
    return uniques, code[keys], counts[uniques]


def _repeated_key(keys: np.ndarray, size: int) -> tuple[int, int] | None:
    """(a key that occurs most often, its count) if some key of `keys` (in [0, size)) repeats."""
    if size > 4 * len(keys) + (1 << 20):
        uniques, counts = np.unique(keys, return_counts=True)
    else:
        counts = np.bincount(keys, minlength=size)
        uniques = np.arange(size)
    top = int(np.argmax(counts)) if len(counts) else 0
    return (int(uniques[top]), int(counts[top])) if len(counts) and counts[top] > 1 else None


def _rank_within(sorted_keys: np.ndarray) -> np.ndarray:
    """Position of each element among the elements with the same key (keys sorted)."""
    return np.arange(len(sorted_keys)) - np.searchsorted(sorted_keys, sorted_keys, side="left")
