"""Stage III: per-image transfer losses -> win rates -> AHP affinities (design.md sections 5, 10).

For each target, every candidate (each source set measured into it, plus `self` and `random`)
is compared with every other image by image; the win-rate matrix W becomes R = W / W^T and the
affinities are R's Perron vector. `pixels` is not a candidate (design.md lists every transfer,
self and random): it is only the reference for `gain`, as `self` is for `quality`.

One target at a time: `affinity_by_target` reads a target's losses, computes its rows (and its
bootstrap resamples) and drops the losses before reading the next, so no process holds the whole
study's losses (issue 11). The whole-table functions (`compute_affinity`, `cube_affinity`) run the
same per-target code over a cube of several targets, so both give the same numbers.

Win rates are weighted counts, W[i, j] = sum_I w_I (1[l_i < l_j] + 0.5 1[tie]) / sum_I w_I, with
w = 1 for the point estimate and a multinomial count vector per bootstrap resample (design.md
section 10): a target's point estimate and all its resamples are one matrix product.

The loss table is arranged per target in a `LossCube` padded with NaN, which compares false, so
padding never counts. An image whose label has no valid pixel for a target has a NaN loss for
every candidate (design.md section 2): it is left out of that target's win rates and counted in
`LossCube.unlabelled`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from components.affinity_io import factorize, source_sets
from components.errors import TaskatlasError

SELF = ("self",)  # the target's fully supervised network
RANDOM = ("random",)  # a random-init encoder: an ordinary candidate
PIXELS = ("pixels",)  # trained from raw pixels: the reference for gain, not a candidate
WIN_CLIP = (0.001, 0.999)  # keeps W / W^T finite when a source always (or never) wins
INTERVAL = (2.5, 97.5)  # percentiles of the reported 95% interval
INTERVAL_COLUMNS = ("affinity_lo", "affinity_hi")
_CHUNK_ELEMENTS = 1 << 22  # per-image comparison outcomes held in memory at once
_EXACT_FLOAT32 = 1 << 24  # integer sums up to this are exact in float32

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
INTERVAL_SCHEMA = pa.schema([*AFFINITY_SCHEMA, *(pa.field(c, pa.float64()) for c in INTERVAL_COLUMNS)])


@dataclass(frozen=True, eq=False)
class AffinityResult:
    """Stage III's answer: the affinity table, its bootstrap, and what was left out."""

    table: pa.Table  # AFFINITY_SCHEMA (INTERVAL_SCHEMA with a bootstrap); rows by target, then source set
    samples: np.ndarray | None  # (resamples, rows) float64: each resample's affinity of each row
    unlabelled: dict[str, int]  # targets with test images without a valid label -> how many


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
    cells, _, counts = _unique(cell, n_targets * n_cands.max() * n_images.max())
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


def affinity_by_target(
    targets: Sequence[str], read_target: Callable[[str], pa.Table], bootstrap: int = 0, seed: int = 0
) -> AffinityResult:
    """Stage III one target at a time: `read_target(t)` gives t's `target, sources, image_id, loss`
    rows (Stage II's per-target loss table); a target's losses are dropped before the next is read.

    Rows come sorted by target, then source set, as from `compute_affinity` on the whole table.
    `bootstrap` > 0 adds `affinity_lo`, `affinity_hi` and the resamples' affinities; target t (in
    sorted order) resamples from stream t of `seed`, as on the whole table, so both give the same.
    """
    names = sorted(set(targets))
    if len(names) != len(targets) or not names:
        raise TaskatlasError(f"affinity: expected distinct target names, got {list(targets)!r}")

    def read_cube(name: str) -> LossCube:
        table = read_target(name)
        if table.num_rows == 0:
            raise TaskatlasError(f"target {name}: its loss table has no rows")
        cube = loss_cube(table)
        if cube.targets != [name]:
            raise TaskatlasError(
                f"the loss table read for target {name} has rows of target(s) {', '.join(cube.targets)}"
            )
        return cube  # the table is dropped here; only the cube (candidates x images) is kept

    return _affinity(names, ((read_cube(name), 0) for name in names), bootstrap, seed)


def cube_affinity(cube: LossCube, bootstrap: int = 0, seed: int = 0) -> AffinityResult:
    """`affinity_by_target` on a cube already built (every target of a whole loss table)."""
    return _affinity(cube.targets, ((cube, t) for t in range(len(cube.targets))), bootstrap, seed)


def compute_affinity(losses: pa.Table) -> pa.Table:
    """The affinity table (AFFINITY_SCHEMA) of a per-image loss table; needs `self` for every target."""
    return affinity_from_cube(loss_cube(losses))


def affinity_from_cube(cube: LossCube) -> pa.Table:
    """`compute_affinity` on a cube already built (callers that also report `cube.unlabelled`)."""
    return cube_affinity(cube).table


def resample_counts(stream: np.random.SeedSequence, n_images: int, n: int) -> np.ndarray:
    """(n, n_images) int: n multinomial resamples of a target's labelled images (each row sums to
    n_images); `stream` is the target's own, so its resamples do not depend on other targets."""
    uniform = np.full(n_images, 1.0 / n_images)
    return np.random.default_rng(stream).multinomial(n_images, uniform, size=n)


def resample_streams(seed: int, n_targets: int) -> list[np.random.SeedSequence]:
    """One random stream per target (targets in sorted order), all from `seed`."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise TaskatlasError(f"bootstrap: the seed must be an integer >= 0, got {seed!r}")
    return np.random.SeedSequence(seed).spawn(n_targets)


def win_rates(losses: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(n, m) finite losses of one target's candidates, (k, m) integer image weights -> (k, n, n) W.

    W[b, i, j] = sum_I w_bI (1[l_i(I) < l_j(I)] + 0.5 1[tie]) / sum_I w_bI, W[b, i, i] = 0.5. Each
    image's outcome for the pair i < j is sign(rank_j - rank_i) in {-1, 0, 1} (ranks among the
    candidates, float32), and one matrix product per chunk of images sums them for every weight
    vector. The sums are integers, so float32 is exact below 2**24 and W[j, i] = 1 - W[i, j] exactly.
    """
    n, m = losses.shape
    weights = np.asarray(weights)
    total = weights.sum(axis=1, dtype=np.float64)[:, None]  # (k, 1)
    dtype = np.float32 if total.max() <= _EXACT_FLOAT32 else np.float64
    ranks, weights = _ranks(losses, dtype), weights.astype(dtype)
    i, j = np.triu_indices(n, 1)
    signed = np.zeros((len(weights), len(i)), dtype)  # (k, pairs): weighted sum of sign(rank_j - rank_i)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, len(i)))
    for start in range(0, m, chunk):
        block = ranks[:, start : start + chunk]
        signed += weights[:, start : start + chunk] @ np.sign(block[j] - block[i]).T
    wins_ij = (total + signed) / 2  # weighted wins of i over j, ties half (float64, exact)
    wins = np.full((len(weights), n, n), 0.5)
    wins[:, i, j] = wins_ij / total
    wins[:, j, i] = (total - wins_ij) / total
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
    """(..., n, n) win rates and (..., n) candidate mask -> (..., n) affinities (0 outside the mask)."""
    clipped = np.clip(wins, *WIN_CLIP)
    both = mask[..., :, None] & mask[..., None, :]
    ratios = np.where(both, clipped / np.swapaxes(clipped, -1, -2), 0.0)
    return perron_vector(ratios)


@dataclass(frozen=True, eq=False)
class _TargetRows:
    """One target's rows of the affinity table, and its resamples' affinities."""

    target: str
    sources: list[tuple[str, ...]]
    affinity: np.ndarray  # (rows,)
    quality: np.ndarray  # (rows,)
    gain: np.ndarray  # (rows,) NaN without pixels
    samples: np.ndarray  # (resamples, rows); (0, rows) without a bootstrap


def _affinity(
    names: Sequence[str], cubes: Iterable[tuple[LossCube, int]], bootstrap: int, seed: int
) -> AffinityResult:
    """The i-th (cube, t) of `cubes` is target names[i], resampled from stream i: its rows, then the table.

    A target without `self`, or with one labelled image under a bootstrap, is an error naming every
    such target; after the first one the rest are only validated, not computed.
    """
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int | np.integer) or bootstrap < 0:
        raise TaskatlasError(f"bootstrap: the number of resamples must be an integer >= 0, got {bootstrap!r}")
    streams = iter(resample_streams(seed, len(names)) if bootstrap else [None] * len(names))
    rows: list[_TargetRows] = []
    no_self: list[str] = []
    too_few: list[str] = []
    unlabelled: dict[str, int] = {}
    for cube, t in cubes:  # not zip: it would keep the previous cube while the next one is read
        name, stream = cube.targets[t], next(streams)
        if cube.unlabelled[t]:
            unlabelled[name] = int(cube.unlabelled[t])
        if cube.candidate_index(SELF)[t] < 0:
            no_self.append(name)
        if bootstrap and cube.n_images[t] < 2:
            too_few.append(name)
        if not (no_self or too_few):
            rows.append(_target_rows(cube, t, bootstrap, stream))
        del cube  # before the next target is read
    if too_few:
        raise TaskatlasError(
            f"cannot bootstrap target(s) {', '.join(too_few)}: only one labelled test image "
            "(a resample needs at least 2)"
        )
    if no_self:
        raise TaskatlasError(
            f"target(s) {', '.join(no_self)} have no 'self' losses (the fully supervised network)"
        )
    sources = [s for r in rows for s in r.sources]
    columns = {
        "target": pa.array([r.target for r in rows for _ in r.sources], pa.string()),
        "sources": pa.array([list(s) for s in sources], pa.list_(pa.string())),
        "order": pa.array([len(s) for s in sources], pa.int32()),
        **{
            c: pa.array(np.concatenate([getattr(r, c) for r in rows]))
            for c in ("affinity", "quality", "gain")
        },
    }
    if not bootstrap:
        return AffinityResult(pa.table(columns, schema=AFFINITY_SCHEMA), None, unlabelled)
    samples = np.concatenate([r.samples for r in rows], axis=1)
    lo, hi = np.percentile(samples, INTERVAL, axis=0)
    columns |= dict(zip(INTERVAL_COLUMNS, map(pa.array, (lo, hi)), strict=True))
    return AffinityResult(pa.table(columns, schema=INTERVAL_SCHEMA), samples, unlabelled)


def _target_rows(
    cube: LossCube, t: int, bootstrap: int, stream: np.random.SeedSequence | None
) -> _TargetRows:
    """Target t of the cube: point estimate (weights 1) and resamples in one `win_rates` call."""
    present = cube.candidates[t] >= 0  # padding candidates come last
    sets = [cube.source_sets[i] for i in cube.candidates[t][present]]
    losses = cube.losses[t][present]
    losses = losses[:, ~np.isnan(losses[0])]  # labelled images (NaN: every candidate, or padding)
    weights = np.ones((1, losses.shape[1]), dtype=np.int64)
    if bootstrap:
        weights = np.concatenate([weights, resample_counts(stream, losses.shape[1], bootstrap)])
    wins = win_rates(losses, weights)  # (1 + bootstrap, n, n)
    keep = np.array([s != PIXELS for s in sets])
    candidates = np.flatnonzero(keep)
    affinity = ahp_affinity(wins[:, candidates[:, None], candidates], np.ones(len(candidates), bool))
    gain = np.full(len(candidates), np.nan)  # NaN where pixels was not measured
    if PIXELS in sets:
        gain = wins[0, candidates, sets.index(PIXELS)]
    return _TargetRows(
        target=cube.targets[t],
        sources=[sets[c] for c in candidates],
        affinity=affinity[0],
        quality=wins[0, candidates, sets.index(SELF)],
        gain=gain,
        samples=affinity[1:],
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


def _rank_within(sorted_keys: np.ndarray) -> np.ndarray:
    """Position of each element among the elements with the same key (keys sorted)."""
    return np.arange(len(sorted_keys)) - np.searchsorted(sorted_keys, sorted_keys, side="left")


def _ranks(losses: np.ndarray, dtype: type) -> np.ndarray:
    """(n, m) losses -> (n, m) rank of each candidate among the candidates on the same image, ties
    equal: small integers, so differences in float32 keep every comparison of the float64 losses."""
    by_image = np.ascontiguousarray(losses.T)  # (m, n): one image's candidates are contiguous
    order = np.argsort(by_image, axis=1)
    ordered = np.take_along_axis(by_image, order, axis=1)
    dense = np.zeros(by_image.shape, dtype)
    np.cumsum(ordered[:, 1:] != ordered[:, :-1], axis=1, dtype=dtype, out=dense[:, 1:])
    ranks = np.empty_like(dense)
    np.put_along_axis(ranks, order, dense, axis=1)
    return np.ascontiguousarray(ranks.T)
