"""Stage III: per-image transfer losses -> win rates -> AHP affinities (design.md sections 5, 10).

For each target, every candidate (each source set measured into it, plus `self` and `random`)
is compared with every other image by image; the win-rate matrix W becomes R = W / W^T and the
affinities are R's Perron vector. `pixels` is not a candidate (design.md lists every transfer,
self and random): it is only the reference for `gain`, as `self` is for `quality` and `random` for
`vs_random`.

Replicates: a readout may be trained R times with different seeds (a `replicate` column, 0..R-1;
a table without one is replicate 0 everywhere). The point estimate averages, per image, each
candidate's replicates' losses (with one replicate: its losses, as before replicates existed).

One target at a time: `affinity_by_target` reads a target's losses, computes its rows (and its
bootstrap resamples) and drops the losses before reading the next, so no process holds the whole
study's losses (issue 11). The whole-table functions (`compute_affinity`, `cube_affinity`) run the
same per-target code over a cube of several targets, so both give the same numbers.

The bootstrap is the multi-bootstrap of Sellam et al. (ICLR 2022; design.md section 10). Resample b
draws (1) one multinomial count vector w_b over the study's test images (`image_weights`), shared by
every candidate and every target, since the images are the same images; an image a target has no
label for counts nowhere for it; and (2) per candidate, R_c of its R_c replicates with replacement
(`replicate_draws`, from a stream of the seed, the target and the source set only, so the pipeline
can redo the same draw elsewhere). Per image it averages the drawn replicates' losses, then

    W_b[i, j] = sum_I w_bI (1[l_i(I) < l_j(I)] + 0.5 1[tie]) / sum_I w_bI,

and the same AHP. When every candidate of a target has one replicate, its losses are the same in
every resample: the point estimate and all resamples are one matrix product (`win_rates`). With
replicates, each resample has its own losses and its own comparisons (`_replicate_win_rates`).

The loss table is arranged per target in a `LossCube` padded with NaN, which compares false, so
padding never counts. An image whose label has no valid pixel for a target has a NaN loss for
every candidate and replicate (design.md section 2): it is left out of that target's win rates
and counted in `LossCube.unlabelled`.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from components import vocabulary
from components.affinity_io import REPLICATE, factorize, source_sets
from components.errors import TaskatlasError

# Baselines as source sets (components.vocabulary names them)
SELF = (vocabulary.SELF,)  # the target's fully supervised network
RANDOM = (vocabulary.RANDOM,)  # a random-init encoder: an ordinary candidate, and the reference for vs_random
PIXELS = (vocabulary.PIXELS,)  # trained from raw pixels: the reference for gain, not a candidate
SCRATCH = (vocabulary.SCRATCH,)  # a whole network trained on the same labels: a new task's gain reference
REFERENCES = (PIXELS, SCRATCH)  # measured only to compare against, never AHP candidates
WIN_CLIP = (0.001, 0.999)  # keeps W / W^T finite when a source always (or never) wins
INTERVAL = (2.5, 97.5)  # percentiles of the reported 95% interval
INTERVAL_COLUMNS = ("affinity_lo", "affinity_hi")
P_BEST = "p_best"  # share of resamples in which a candidate has its target's highest affinity
BEST_TIE = 1e-9  # affinities within this relative distance of the highest tie for the best
_CHUNK_ELEMENTS = 1 << 22  # per-image comparison outcomes summed at once
_INTEGER_COLUMNS = 8  # up to this many weight vectors, outcomes are summed in integers, not by BLAS
_RANK_ELEMENTS = 1 << 24  # ranks of replicate averages held at once (a target's images, in chunks)
_SORT_ELEMENTS = 1 << 19  # replicate averages sorted at once (small: the sort stays in cache)
_EXACT_FLOAT32 = 1 << 24  # integer sums up to this are exact in float32

AFFINITY_SCHEMA = pa.schema(
    [
        ("target", pa.string()),
        ("sources", pa.list_(pa.string())),
        ("order", pa.int32()),
        ("affinity", pa.float64()),
        ("quality", pa.float64()),  # win rate against self
        ("gain", pa.float64()),  # win rate against pixels; NaN where pixels was not measured
        ("vs_random", pa.float64()),  # win rate against random; NaN where random was not measured
    ]
)
INTERVAL_SCHEMA = pa.schema(
    [
        *AFFINITY_SCHEMA,
        *(pa.field(c, pa.float64()) for c in INTERVAL_COLUMNS),
        pa.field(P_BEST, pa.float64()),  # NaN for self, which does not compete
    ]
)


@dataclass(frozen=True, eq=False)
class AffinityResult:
    """Stage III's answer: the affinity table, its bootstrap, and what was left out."""

    table: pa.Table  # AFFINITY_SCHEMA (INTERVAL_SCHEMA with a bootstrap); rows by target, then source set
    samples: np.ndarray | None  # (resamples, rows) float64: each resample's affinity of each row
    unlabelled: dict[str, int]  # targets with test images without a valid label -> how many
    # target -> the most replicates of any of its candidates (1 everywhere: training noise not measured)
    replicates: dict[str, int] = field(default_factory=dict)


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


def study_image_ids(tables: Iterable[pa.Table]) -> list[str]:
    """The sorted union, as text, of the `image_id`s of `tables` (read one after another): the
    image axis of `image_weights` when the caller does not know the test split's ids."""
    ids: set[str] = set()
    for table in tables:
        ids.update(str(v) for v in factorize(table["image_id"], "image_id")[1])
        del table  # before the next table is read
    return sorted(ids)


def image_weights(seed: int, image_ids: Sequence[str] | np.ndarray, n: int) -> np.ndarray:
    """(n, len(image_ids)) int: resample b's count of each test image, multinomial with
    len(image_ids) draws; `image_ids` are the study's test image ids, sorted and distinct (the
    weights of an image are found by its position). The same weights serve every candidate and
    every target; a target's images without a label count nowhere for it."""
    _check_seed(seed)
    ids = np.asarray(image_ids, dtype=str)
    if ids.ndim != 1 or not len(ids):
        raise TaskatlasError("bootstrap: expected a non-empty list of test image ids")
    if len(ids) > 1 and not (ids[1:] > ids[:-1]).all():
        raise TaskatlasError("bootstrap: the test image ids must be sorted and distinct")
    uniform = np.full(len(ids), 1.0 / len(ids))
    return np.random.default_rng(np.random.SeedSequence(seed)).multinomial(len(ids), uniform, size=n)


def replicate_draws(
    seed: int, target: str, sources: tuple[str, ...], n_replicates: int, n: int
) -> np.ndarray:
    """(n, n_replicates) int: the replicates that resample b draws of candidate `sources` of
    `target` (R of its R replicates, with replacement). The stream depends only on the seed, the
    target and the source set (sorted, `+`-joined), so the same draw can be made anywhere; the first
    k rows do not depend on n. A candidate with one replicate always draws replicate 0."""
    _check_seed(seed)
    if n_replicates == 1:
        return np.zeros((n, 1), dtype=np.int64)
    stream = np.random.SeedSequence(
        [int(seed), zlib.crc32(target.encode()), zlib.crc32("+".join(sources).encode())]
    )
    return np.random.default_rng(stream).integers(0, n_replicates, size=(n, n_replicates))


def affinity_by_target(
    targets: Sequence[str],
    read_target: Callable[[str], pa.Table],
    bootstrap: int = 0,
    seed: int = 0,
    image_ids: Sequence[str] | None = None,
    *,
    replicate_groups: int | None = None,
    gain_reference: tuple[str, ...] = PIXELS,
    require_self: bool = True,
    progress: Callable[[int], None] | None = None,
) -> AffinityResult:
    """Stage III one target at a time: `read_target(t)` gives t's `target, sources, image_id, loss`
    (and `replicate`) rows, Stage II's per-target loss table; a target's losses are dropped before
    the next is read.

    Rows come sorted by target, then source set, as from `compute_affinity` on the whole table.
    `bootstrap` > 0 adds `affinity_lo`, `affinity_hi`, `p_best` and the resamples' affinities.
    `image_ids`: the study's test image ids (the bootstrap's image axis, shared by every target);
    without them a first pass reads every target's table for its ids (read_target is then called
    twice per target). With the same ids, the whole table (`cube_affinity`) gives the same numbers.
    `replicate_groups`: see `cube_affinity`. `gain_reference`: what `gain` is the win rate against
    (`SCRATCH` for a positioned task, Taskonomy's Gain). `require_self`: a target without `self`
    is an error (a study's); a positioned task has no full network, and NaN quality. `progress(1)`
    is called as each target's table is read.
    """
    names = sorted(set(targets))
    if len(names) != len(targets) or not names:
        raise TaskatlasError(f"affinity: expected distinct target names, got {list(targets)!r}")
    _check_resamples(bootstrap)

    def read_cube(name: str) -> LossCube:
        table = read_target(name)
        if table.num_rows == 0:
            raise TaskatlasError(f"target {name}: its loss table has no rows")
        cube = loss_cube(table)
        if cube.targets != [name]:
            raise TaskatlasError(
                f"the loss table read for target {name} has rows of target(s) {', '.join(cube.targets)}"
            )
        if progress is not None:
            progress(1)
        return cube  # the table is dropped here; only the cube (candidates x replicates x images) is kept

    if bootstrap and image_ids is None:
        _check_seed(seed)  # before reading anything
        image_ids = study_image_ids(read_target(name) for name in names)
    cubes = ((read_cube(name), 0) for name in names)
    return _affinity(names, cubes, bootstrap, seed, image_ids, replicate_groups, gain_reference, require_self)


def cube_affinity(
    cube: LossCube, bootstrap: int = 0, seed: int = 0, *, replicate_groups: int | None = None
) -> AffinityResult:
    """`affinity_by_target` on a cube already built (every target of a whole loss table); the
    image weights are over the cube's image ids.

    `replicate_groups` G (default: `bootstrap`, exact): only G distinct replicate draws, resample b
    using draw b mod G (row b mod G of `replicate_draws`), each shared by about B/G image-weight
    vectors, a nested multi-bootstrap that computes a target's comparisons G times instead of B.
    What it costs: the resamples see only G draws of the training noise, so the training-noise part
    of the intervals and of p_best is estimated from G draws, not B (its Monte Carlo error grows
    like 1/sqrt(G)); the resamples are no longer independent, and with small G the intervals are
    lumpier. G = B is the plain multi-bootstrap. Without replicates it changes nothing.
    """
    _check_resamples(bootstrap)
    cubes = ((cube, t) for t in range(len(cube.targets)))
    return _affinity(cube.targets, cubes, bootstrap, seed, cube.image_ids, replicate_groups)


def compute_affinity(losses: pa.Table) -> pa.Table:
    """The affinity table (AFFINITY_SCHEMA) of a per-image loss table; needs `self` for every target."""
    return affinity_from_cube(loss_cube(losses))


def affinity_from_cube(cube: LossCube) -> pa.Table:
    """`compute_affinity` on a cube already built (callers that also report `cube.unlabelled`)."""
    return cube_affinity(cube).table


def win_rates(losses: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(n, m) finite losses of one target's candidates, (k, m) integer image weights -> (k, n, n) W.

    W[b, i, j] = sum_I w_bI (1[l_i(I) < l_j(I)] + 0.5 1[tie]) / sum_I w_bI, W[b, i, i] = 0.5 (and
    0.5 everywhere for a weight vector that gives the target's images no weight at all). Each
    image's outcome for the pair i < j is sign(rank_j - rank_i) in {-1, 0, 1} (ranks among the
    candidates), and one matrix product per candidate sums them for every weight vector
    (`_signed_sums`). The sums are integers, so float32 is exact below 2**24 and
    W[j, i] = 1 - W[i, j] exactly.
    """
    weights = np.asarray(weights)
    total = weights.sum(axis=1, dtype=np.float64)[:, None]  # (k, 1)
    signed = _signed_sums(_ranks(losses, np.float32), weights.T)  # (pairs, k)
    return _wins(len(losses), total, signed.T)


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


def best_shares(
    targets: Sequence[str], sources: Sequence[tuple[str, ...]], samples: np.ndarray
) -> np.ndarray:
    """(rows,) `p_best` of each row of an affinity table (row i: targets[i] <- sources[i]) from its
    resamples' affinities `samples` (resamples, rows): the share of resamples in which the row has
    the highest affinity among its target's candidates other than `self` (`random` among them: if
    it is the best, no source helps); candidates tied for the best (within BEST_TIE, relative)
    share that resample equally. NaN for `self`, which does not compete."""
    targets = np.asarray(targets, dtype=object)
    competing = np.array([tuple(s) != SELF for s in sources], dtype=bool)
    shares = np.full(len(targets), np.nan)
    for target in dict.fromkeys(targets.tolist()):
        rows = np.flatnonzero((targets == target) & competing)
        if not rows.size:
            continue
        values = samples[:, rows]
        top = values.max(axis=1, keepdims=True)
        best = values >= top - BEST_TIE * np.abs(top)
        shares[rows] = (best / best.sum(axis=1, keepdims=True)).mean(axis=0)
    return shares


@dataclass(frozen=True, eq=False)
class _TargetRows:
    """One target's rows of the affinity table, and its resamples' affinities."""

    target: str
    sources: list[tuple[str, ...]]
    affinity: np.ndarray  # (rows,)
    quality: np.ndarray  # (rows,)
    gain: np.ndarray  # (rows,) NaN without pixels
    vs_random: np.ndarray  # (rows,) NaN without random
    samples: np.ndarray  # (resamples, rows); (0, rows) without a bootstrap
    replicates: int  # the most replicates of any candidate


def _affinity(
    names: Sequence[str],
    cubes: Iterable[tuple[LossCube, int]],
    bootstrap: int,
    seed: int,
    image_ids: Sequence[str] | None,
    groups: int | None,
    gain_reference: tuple[str, ...] = PIXELS,
    require_self: bool = True,
) -> AffinityResult:
    """The i-th (cube, t) of `cubes` is target names[i]: its rows, then the table. With a bootstrap,
    the image weights are over `image_ids` (the study's test images), shared by every target.

    A target without `self`, or with one labelled image under a bootstrap, is an error naming every
    such target; after the first one the rest are only validated, not computed.
    """
    _check_resamples(bootstrap)
    weights = study = None
    if bootstrap:
        if groups is not None and (isinstance(groups, bool) or not isinstance(groups, int | np.integer)):
            raise TaskatlasError(f"bootstrap: replicate_groups must be an integer, got {groups!r}")
        groups = bootstrap if groups is None else groups
        if not 1 <= groups <= bootstrap:
            raise TaskatlasError(f"bootstrap: replicate_groups must be in 1..{bootstrap}, got {groups}")
        study = np.asarray(image_ids, dtype=str)
        weights = image_weights(seed, study, bootstrap)  # (B, study images)
    rows: list[_TargetRows] = []
    no_self: list[str] = []
    too_few: list[str] = []
    unlabelled: dict[str, int] = {}
    positions = None
    for cube, t in cubes:  # not zip: it would keep the previous cube while the next one is read
        name = cube.targets[t]
        if cube.unlabelled[t]:
            unlabelled[name] = int(cube.unlabelled[t])
        if require_self and cube.candidate_index(SELF)[t] < 0:
            no_self.append(name)
        if bootstrap and cube.n_images[t] < 2:
            too_few.append(name)
        if not (no_self or too_few):
            slot_weights = None
            if bootstrap:
                if t == 0:  # once per cube: where its image ids are among the study's
                    positions = _study_positions(study, cube, name)
                slots = cube.images[t]
                slot_weights = np.where(slots >= 0, weights[:, positions[slots]], 0)  # (B, m)
            rows.append(_target_rows(cube, t, slot_weights, seed, groups, gain_reference))
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
    targets = [r.target for r in rows for _ in r.sources]
    columns = {
        "target": pa.array(targets, pa.string()),
        "sources": pa.array([list(s) for s in sources], pa.list_(pa.string())),
        "order": pa.array([len(s) for s in sources], pa.int32()),
        **{
            c: pa.array(np.concatenate([getattr(r, c) for r in rows]))
            for c in ("affinity", "quality", "gain", "vs_random")
        },
    }
    replicates = {r.target: r.replicates for r in rows}
    if not bootstrap:
        return AffinityResult(pa.table(columns, schema=AFFINITY_SCHEMA), None, unlabelled, replicates)
    samples = np.concatenate([r.samples for r in rows], axis=1)
    lo, hi = np.percentile(samples, INTERVAL, axis=0)
    columns |= dict(zip(INTERVAL_COLUMNS, map(pa.array, (lo, hi)), strict=True))
    columns[P_BEST] = pa.array(best_shares(targets, sources, samples))
    return AffinityResult(pa.table(columns, schema=INTERVAL_SCHEMA), samples, unlabelled, replicates)


def _study_positions(study: np.ndarray, cube: LossCube, name: str) -> np.ndarray:
    """(len(cube.image_ids),) position of each of the cube's image ids among the study's."""
    ids = np.asarray(cube.image_ids, dtype=str)
    at = np.minimum(np.searchsorted(study, ids), len(study) - 1)
    if (missing := np.flatnonzero(study[at] != ids)).size:
        raise TaskatlasError(
            f"target {name}: test image {ids[missing[0]]!r} is not among the study's "
            f"{len(study)} test image ids given for the bootstrap"
        )
    return at


def _target_rows(
    cube: LossCube,
    t: int,
    weights: np.ndarray | None,
    seed: int,
    groups: int | None,
    gain_reference: tuple[str, ...] = PIXELS,
) -> _TargetRows:
    """Target t of the cube: the point estimate, and with `weights` (B, m) over the target's image
    slots its B resamples."""
    present = cube.candidates[t] >= 0  # padding candidates come last
    sets = [cube.source_sets[i] for i in cube.candidates[t][present]]
    reps = cube.n_replicates[t][present]
    losses = cube.losses[t][present][:, : reps.max()]  # (n, R, m)
    labelled = ~np.isnan(losses[0, 0])  # NaN: every candidate and replicate, or padding
    losses = losses[:, :, labelled]
    candidates = np.flatnonzero([s not in REFERENCES for s in sets])
    n_cand, among = len(candidates), np.ix_(candidates, candidates)
    ones = np.ones((1, losses.shape[2]), dtype=np.int64)
    resamples = weights[:, labelled] if weights is not None else ones[:0]
    if (reps == 1).all():  # the same losses in every resample: all of them in one product
        wins = win_rates(losses[:, 0], np.concatenate([ones, resamples]))  # (1 + B, n, n)
        point, stack = wins[0], wins[:, candidates[:, None], candidates]
    else:  # each resample has its own losses: its own comparisons
        point = win_rates(_replicate_mean(losses, reps), ones)[0]
        stack = point[among][None]
        if len(resamples):
            name = cube.targets[t]
            draws = [replicate_draws(seed, name, sets[c], int(reps[c]), groups) for c in candidates]
            resampled = _replicate_win_rates(losses[candidates], reps[candidates], draws, resamples)
            stack = np.concatenate([stack, resampled])
    affinity = ahp_affinity(stack, np.ones(n_cand, bool))  # (1 + B, n_cand)

    def against(reference: tuple[str, ...]) -> np.ndarray:  # win rates against a reference; NaN without it
        if reference not in sets:
            return np.full(n_cand, np.nan)
        return point[candidates, sets.index(reference)]

    return _TargetRows(
        target=cube.targets[t],
        sources=[sets[c] for c in candidates],
        affinity=affinity[0],
        quality=against(SELF),
        gain=against(gain_reference),
        vs_random=against(RANDOM),
        samples=affinity[1:],
        replicates=int(reps.max()),
    )


def _replicate_mean(losses: np.ndarray, reps: np.ndarray) -> np.ndarray:
    """(n, R, m) losses (NaN beyond a candidate's replicates), (n,) replicates -> (n, m): per
    image, the sum of each candidate's replicates in replicate order, over their number."""
    total = losses[:, 0].copy()
    for r in range(1, losses.shape[1]):
        more = np.flatnonzero(reps > r)
        total[more] += losses[more, r]
    return total / reps[:, None]


def _replicate_win_rates(
    losses: np.ndarray, reps: np.ndarray, draws: list[np.ndarray], weights: np.ndarray
) -> np.ndarray:
    """(B, n, n) win rates of the multi-bootstrap's resamples of one target.

    losses (n, R, m) (NaN beyond a candidate's replicates), reps (n,), draws[c] (G, R_c) the
    replicates each of G draws takes of candidate c, weights (B, m); resample b uses draw b mod G.
    A candidate's drawn losses are averaged per image (in replicate order, so a draw's average
    depends only on which replicates it took, as a multiset). Every distinct average of every
    candidate is ranked once per image among all of them (`_ranks`); a resample then gathers its
    candidates' ranks and counts sign(rank_j - rank_i) over the images it weights, one candidate
    against the later ones at a time (`_signed_sums`).
    """
    n, _, m = losses.shape
    n_resamples, n_groups = len(weights), len(draws[0])
    owner, multisets, draw_rows = [], [], np.empty((n, n_groups), dtype=np.int64)
    for c, drawn in enumerate(draws):  # the distinct multisets each candidate's draws take
        unique, inverse = np.unique(np.sort(drawn, axis=1), axis=0, return_inverse=True)
        draw_rows[c] = len(owner) + inverse.ravel()
        owner += [c] * len(unique)
        multisets += [np.pad(u, (0, losses.shape[1] - len(u)), constant_values=-1) for u in unique]
    owner, multisets = np.array(owner), np.array(multisets)  # (V,), (V, R) with -1 past R_c

    total = weights.sum(axis=1, dtype=np.float64)[:, None]  # (B, 1)
    signed = np.zeros((n_resamples, n * (n - 1) // 2))  # (B, pairs) in triu order
    groups = [np.arange(g, n_resamples, n_groups) for g in range(n_groups)]  # resamples of each draw
    chunk = max(1, _RANK_ELEMENTS // len(owner))
    for start in range(0, m, chunk):  # the images in chunks: memory stays bounded
        ranks = _average_ranks(losses[:, :, start : start + chunk], reps, owner, multisets)  # (V, chunk)
        for g, members in enumerate(groups):
            w = weights[members, start : start + chunk]  # (k, chunk)
            used = w.any(axis=0)  # images no resample of the group draws count nothing
            ranked = ranks.take(draw_rows[:, g], axis=0).compress(used, axis=1)  # (n, used)
            signed[members] += _signed_sums(ranked, w[:, used].T).T
    return _wins(n, total, signed)


def _average_ranks(
    losses: np.ndarray, reps: np.ndarray, owner: np.ndarray, multisets: np.ndarray
) -> np.ndarray:
    """(V, m): per image, the rank among all V averages of the average v, candidate owner[v]'s
    losses (n, R, m) over the replicates multisets[v] (-1: none), summed in replicate order and
    divided by the candidate's number of replicates, as `_replicate_mean` does. int16 (half the
    bytes to compare) while the ranks fit, float32 (exact below 2**24) beyond."""
    ranks = np.empty((len(owner), losses.shape[2]), np.int16 if len(owner) < 2**15 else np.float32)
    chunk = max(1, _SORT_ELEMENTS // len(owner))
    for start in range(0, losses.shape[2], chunk):
        values = losses[owner, multisets[:, 0], start : start + chunk]  # (V, chunk)
        for k in range(1, multisets.shape[1]):
            more = np.flatnonzero(multisets[:, k] >= 0)
            values[more] += losses[owner[more], multisets[more, k], start : start + chunk]
        ranks[:, start : start + chunk] = _ranks(values / reps[owner][:, None], np.float32)
    return ranks


def _signed_sums(ranks: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(n, m) ranks, (m, k) integer weights -> (pairs, k) float64: sum_I w_I sign(rank_j(I) -
    rank_i(I)) for each pair i < j, in np.triu_indices order, exact.

    Each candidate is compared with the later ones (two comparisons, no gather), into an int8
    buffer of outcomes of several candidates. A few weight vectors (a resample's, or a group's)
    are summed in int32 by einsum: no BLAS call, whose threads would spin between small products on
    a busy machine. Many (a point estimate with all its resamples) take one float32 matrix product
    per buffer (exact below 2**24; float64 above), few and large.
    """
    n, m = ranks.shape
    n_pairs, k = n * (n - 1) // 2, weights.shape[1]
    out = np.zeros((n_pairs, k))
    integer = k <= _INTEGER_COLUMNS and np.abs(weights).sum(axis=0).max(initial=0) < 2**31
    if integer:
        columns = np.ascontiguousarray(weights.T, dtype=np.int32)  # (k, m)

        def add(outcomes: np.ndarray, lo: int, first: int) -> None:
            w = columns[:, lo : lo + outcomes.shape[1]]
            out[first : first + len(outcomes)] += np.einsum("ij,kj->ik", outcomes.astype(np.int32), w)

    else:
        total = weights.sum(axis=0, dtype=np.float64).max(initial=0)
        floats = weights.astype(np.float32 if total <= _EXACT_FLOAT32 else np.float64)

        def add(outcomes: np.ndarray, lo: int, first: int) -> None:
            w = floats[lo : lo + outcomes.shape[1]]
            out[first : first + len(outcomes)] += outcomes.astype(w.dtype) @ w

    held = _CHUNK_ELEMENTS // 4 if integer else _CHUNK_ELEMENTS  # integers: in cache
    width = min(m, max(1, held // max(1, n - 1)))  # images at a time
    buffer = np.empty((max(n - 1, min(n_pairs, held // width)), width), np.int8)
    for lo in range(0, m, width):
        block = ranks[:, lo : lo + width]
        done = filled = 0  # pairs summed into `out`; outcome rows waiting in `buffer`
        for a in range(n - 1):
            if filled + n - a - 1 > len(buffer):
                add(buffer[:filled, : block.shape[1]], lo, done)
                done, filled = done + filled, 0
            later, rows = block[a + 1 :], buffer[filled : filled + n - a - 1, : block.shape[1]]
            np.subtract((later > block[a]).view(np.int8), (later < block[a]).view(np.int8), out=rows)
            filled += n - a - 1
        add(buffer[:filled, : block.shape[1]], lo, done)
    return out


def _wins(n: int, total: np.ndarray, signed: np.ndarray) -> np.ndarray:
    """(k, 1) total weights, (k, pairs) weighted sign sums -> (k, n, n) win rates (0.5 where a
    weight vector gives no image any weight)."""
    i, j = np.triu_indices(n, 1)
    wins_ij = (total + signed) / 2  # weighted wins of i over j, ties half (float64, exact)
    wins = np.full((len(total), n, n), 0.5)
    counted = np.flatnonzero(total[:, 0] > 0)
    wins[counted[:, None], i, j] = wins_ij[counted] / total[counted]
    wins[counted[:, None], j, i] = (total[counted] - wins_ij[counted]) / total[counted]
    return wins


def top_sources(table: pa.Table, k: int) -> dict[str, list[tuple[tuple[str, ...], float]]]:
    """Per target, its `k` highest-affinity candidates other than `self`: (sources, affinity)."""
    by_target: dict[str, list] = {}
    for row in table.select(["target", "sources", "affinity"]).to_pylist():
        if tuple(row["sources"]) != SELF:
            by_target.setdefault(row["target"], []).append((tuple(row["sources"]), row["affinity"]))
    return {t: sorted(rows, key=lambda r: (-r[1], r[0]))[:k] for t, rows in sorted(by_target.items())}


def _check_resamples(bootstrap: int) -> None:
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int | np.integer) or bootstrap < 0:
        raise TaskatlasError(f"bootstrap: the number of resamples must be an integer >= 0, got {bootstrap!r}")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise TaskatlasError(f"bootstrap: the seed must be an integer >= 0, got {seed!r}")


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
