"""Stage III: per-image transfer losses -> win rates -> AHP affinities (design.md sections 5, 10).

For each target, every candidate (each source set measured into it, plus `self` and `random`)
is compared with every other image by image; the win-rate matrix W becomes R = W / W^T and the
affinities are R's Perron vector. `pixels` is not a candidate (design.md lists every transfer,
self and random): it is only the reference for `gain`, as `self` is for `quality` and `random` for
`vs_random`.

Replicates: a readout may be trained R times with different seeds (a `replicate` column, 0..R-1;
a table without one is replicate 0 everywhere). The statistic is what ONE training run of each
candidate achieves, as Taskonomy measured it, so more replicates narrow its interval and do not
move it: the win rate of i over j is the mean over replicate pairs of the share of images on which
that replicate of i beats that replicate of j. Paired seeds (`transfer.pairing: paired`, replicate r
of every candidate of a target shares its seed) pair replicate r with replicate r: a target has
R = max_c R_c replicate slots and slot s reads replicate s mod R_c of candidate c (a candidate with
one replicate, such as `self` when the networks are not replicated, is the same in every slot).
Independent seeds average over every pair (a, b) of replicates of i and of j.

One target at a time: `affinity_by_target` reads a target's losses, computes its rows (and its
bootstrap resamples) and drops the losses before reading the next, so no process holds the whole
study's losses. The whole-table functions (`compute_affinity`, `cube_affinity`) run the same
per-target code over a cube of several targets, so both give the same numbers.

The bootstrap is the multi-bootstrap of Sellam et al. (ICLR 2022; design.md section 10). Resample b
draws (1) one multinomial count vector w_b over the study's test images (`image_weights`), shared by
every candidate and every target, since the images are the same images; an image a target has no
label for counts nowhere for it; and (2) replicates with replacement (`replicate_draws`), R - 1 of
R so that their variance is the rerun's, not (R - 1)/R of it: paired, one vector of slots per
target, shared by all its candidates (so the resample keeps the pairing the point estimate relies
on); independent, a draw per candidate. Its win rates are the
same statistic on the drawn replicates under the weights w_b,

    W_b[i, j] = mean over drawn pairs (a, b) of sum_I w_bI (1[l_i^a(I) < l_j^b(I)] + 0.5 1[tie]) / sum_I w_bI,

so E[W_b] = W (the resamples are centred on the point estimate, whatever R), and the same AHP.
Every (candidate, replicate) row of a target is compared with every other once, for the point
estimate and all resamples in one product (`win_rates`); the resamples then only select and
average those comparisons (`_paired_wins`, `_independent_wins`).

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
P_NO_GAIN = "p_no_gain"  # share of a rerun's draws in which its gain (win rate vs pixels) is below 0.5
P_BELOW_RANDOM = "p_below_random"  # share of a rerun's draws in which it loses to random (vs_random < 0.5)
BEST_TIE = 1e-9  # affinities within this relative distance of the highest tie for the best
_CHUNK_ELEMENTS = 1 << 22  # per-image comparison outcomes summed at once
_INTEGER_COLUMNS = 8  # up to this many weight vectors, outcomes are summed in integers, not by BLAS
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
        pa.field(P_BEST, pa.float64()),  # NaN for self and t <- t, which do not compete
        pa.field(P_NO_GAIN, pa.float64()),  # NaN where the gain reference was not measured
        pa.field(P_BELOW_RANDOM, pa.float64()),  # NaN where random was not measured
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
    # (resamples, rows): draws of what a rerun of the study would measure (`predictive_wins`); the
    # shares (p_best, the baseline shares, the taxonomy's stability) are read from these
    predictive: np.ndarray | None = None


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
    seed: int, target: str, n_replicates: int, n: int, sources: tuple[str, ...] | None = None
) -> np.ndarray:
    """(n, max(R - 1, 1)) int: the replicates resample b draws, R - 1 of 0..R-1 with replacement
    (R = `n_replicates`). Paired seeds (`sources` None): one draw of the target's replicate slots,
    shared by all its candidates; independent seeds: a draw per candidate (`sources`). The stream
    depends only on the seed, the target (and the source set, sorted and `+`-joined), so the same
    draw can be made anywhere; the first k rows do not depend on n. One replicate always draws
    replicate 0.

    Why R - 1 and not R (the m-out-of-n bootstrap, m = R - 1): the estimate is a mean over R
    replicates, whose variance across reruns is s^2 / R (s^2 the replicates' variance, ddof 1).
    The mean of R draws from the R values has the plug-in variance (R - 1)/R s^2 / R: at R = 3
    two thirds of the training noise a rerun sees, so stated shares were too sure. The mean of
    R - 1 draws has ((R - 1)/R) s^2 / (R - 1) = s^2 / R: unbiased, and still centred (each draw's
    mean is the estimate)."""
    _check_seed(seed)
    if n_replicates == 1:
        return np.zeros((n, 1), dtype=np.int64)
    entropy = [int(seed), zlib.crc32(target.encode())]
    if sources is not None:
        entropy.append(zlib.crc32("+".join(sources).encode()))
    return np.random.default_rng(np.random.SeedSequence(entropy)).integers(
        0, n_replicates, size=(n, n_replicates - 1)
    )


def affinity_by_target(
    targets: Sequence[str],
    read_target: Callable[[str], pa.Table],
    bootstrap: int = 0,
    seed: int = 0,
    image_ids: Sequence[str] | None = None,
    *,
    paired: bool = True,
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
    `paired`: replicate r of every candidate shares its seed (`transfer.pairing`), so replicates
    are compared r with r; otherwise every pair of replicates. `gain_reference`: what `gain` is the win rate against
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
    return _affinity(names, cubes, bootstrap, seed, image_ids, paired, gain_reference, require_self)


def cube_affinity(
    cube: LossCube, bootstrap: int = 0, seed: int = 0, *, paired: bool = True
) -> AffinityResult:
    """`affinity_by_target` on a cube already built (every target of a whole loss table); the
    image weights are over the cube's image ids."""
    _check_resamples(bootstrap)
    cubes = ((cube, t) for t in range(len(cube.targets)))
    return _affinity(cube.targets, cubes, bootstrap, seed, cube.image_ids, paired)


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
    the highest affinity among its target's candidates other than `self` and `t <- t` (the
    target's own encoder, which the taxonomy never chooses; `random` competes: if it is the best,
    no source helps); candidates tied for the best (within BEST_TIE, relative) share that resample
    equally. NaN for those that do not compete."""
    targets = np.asarray(targets, dtype=object)
    competing = np.array(
        [tuple(s) != SELF and tuple(s) != (t,) for t, s in zip(targets, sources, strict=True)], dtype=bool
    )
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
    predictive: np.ndarray  # (resamples, rows): a rerun's affinities (`predictive_wins`)
    replicates: int  # the most replicates of any candidate
    p_no_gain: np.ndarray  # (rows,) share of `predictive` draws with gain below 0.5 (NaN without a bootstrap)
    p_below_random: np.ndarray  # (rows,) share of `predictive` draws losing to random (NaN without one)


def _affinity(
    names: Sequence[str],
    cubes: Iterable[tuple[LossCube, int]],
    bootstrap: int,
    seed: int,
    image_ids: Sequence[str] | None,
    paired: bool,
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
            rows.append(_target_rows(cube, t, slot_weights, seed, paired, gain_reference))
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
    predictive = np.concatenate([r.predictive for r in rows], axis=1)
    lo, hi = np.percentile(samples, INTERVAL, axis=0)
    columns |= dict(zip(INTERVAL_COLUMNS, map(pa.array, (lo, hi)), strict=True))
    columns[P_BEST] = pa.array(best_shares(targets, sources, predictive))
    columns[P_NO_GAIN] = pa.array(np.concatenate([r.p_no_gain for r in rows]))
    columns[P_BELOW_RANDOM] = pa.array(np.concatenate([r.p_below_random for r in rows]))
    table = pa.table(columns, schema=INTERVAL_SCHEMA)
    return AffinityResult(table, samples, unlabelled, replicates, predictive)


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
    paired: bool,
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
    ones = np.ones((1, losses.shape[2]), dtype=np.int64)
    resamples = weights[:, labelled] if weights is not None else ones[:0]
    first = np.concatenate([[0], np.cumsum(reps)[:-1]])  # row of each candidate's replicate 0
    rows = np.concatenate([losses[c, : reps[c]] for c in range(len(reps))])  # (V, m)
    cross = win_rates(rows, np.concatenate([ones, resamples]))  # (1 + B, V, V)
    n_resamples = len(resamples)
    # The point estimate reads every replicate once; a resample R - 1 drawn (`replicate_draws`).
    if paired:
        slots = int(reps.max())
        drawn = replicate_draws(seed, cube.targets[t], slots, n_resamples)
        point = _paired_wins(cross[:1], first, reps, np.arange(slots)[None])
        wins = np.concatenate([point, _paired_wins(cross[1:], first, reps, drawn)])
    else:
        name = cube.targets[t]
        drawn_each = [
            replicate_draws(seed, name, int(r), n_resamples, s) for s, r in zip(sets, reps, strict=True)
        ]
        point = _independent_wins(cross[:1], first, reps, [np.arange(r)[None] for r in reps])
        wins = np.concatenate([point, _independent_wins(cross[1:], first, reps, drawn_each)])  # (1 + B, n, n)
    candidates = np.flatnonzero([s not in REFERENCES for s in sets])
    among, everyone = (slice(None), candidates[:, None], candidates), np.ones(len(candidates), bool)
    affinity = ahp_affinity(wins[among], everyone)
    ahead = predictive_wins(wins[0], wins[1:])  # (B, n, n): a rerun's win rates
    predictive = ahp_affinity(ahead[among], everyone)

    def against(reference: tuple[str, ...], stack: np.ndarray) -> np.ndarray:  # (k, n_cand); NaN without it
        if reference not in sets:
            return np.full((len(stack), len(candidates)), np.nan)
        return stack[:, candidates, sets.index(reference)]

    quality, gain, vs_random = (against(r, wins[:1])[0] for r in (SELF, gain_reference, RANDOM))
    return _TargetRows(
        target=cube.targets[t],
        sources=[sets[c] for c in candidates],
        affinity=affinity[0],
        quality=quality,
        gain=gain,
        vs_random=vs_random,
        samples=affinity[1:],
        predictive=predictive,
        replicates=int(reps.max()),
        p_no_gain=_share_below_half(against(gain_reference, ahead)),
        p_below_random=_share_below_half(against(RANDOM, ahead)),
    )


def predictive_wins(point: np.ndarray, resamples: np.ndarray) -> np.ndarray:
    """(n, n) win rates W and their (B, n, n) bootstrap resamples W_b -> (B, n, n) draws of what a
    rerun of the whole study (other seeds, other test images of the same kind) would measure.

    The study's shares claim how often a rerun makes a choice. A rerun's estimate differs from
    this one by both studies' errors, twice the variance the bootstrap gives this one alone; a
    resample carries only this study's. So draw b adds two independent bootstrap deviations (of b and
    of b + 1, cyclically) to the estimate, W_b + W_(b+1) - W, clipped to [0, 1], with W_ji = 1 -
    W_ij kept. Its mean is W; with one resample there is nothing to pair: the resample itself."""
    if len(resamples) < 2:
        return resamples.copy()
    ahead = np.clip(resamples + np.roll(resamples, -1, axis=0) - point, 0.0, 1.0)
    n = point.shape[0]
    ahead[:, np.arange(n), np.arange(n)] = 0.5
    return ahead


def _share_below_half(wins: np.ndarray) -> np.ndarray:
    """(B, rows) win rates -> (rows,) share of resamples below 0.5 (NaN without resamples or reference)."""
    if not len(wins) or np.isnan(wins).all():
        return np.full(wins.shape[1], np.nan)
    return (wins < 0.5).mean(axis=0)


def _paired_wins(cross: np.ndarray, first: np.ndarray, reps: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """(k, V, V) win rates between (candidate, replicate) rows, candidate c's replicates at rows
    first[c]..first[c]+reps[c]-1, and (k, S) slots per weight vector -> (k, n, n): the mean over
    the drawn slots s of the win rates between replicate s mod R_c of each candidate."""
    k, n = len(cross), len(reps)
    out = np.zeros((k, n, n))
    for column in draws.T:  # (k,) the s-th drawn slot of each weight vector
        rows = first[None, :] + column[:, None] % reps[None, :]  # (k, n)
        out += cross[np.arange(k)[:, None, None], rows[:, :, None], rows[:, None, :]]
    return out / draws.shape[1]


def _independent_wins(
    cross: np.ndarray, first: np.ndarray, reps: np.ndarray, draws: list[np.ndarray]
) -> np.ndarray:
    """As `_paired_wins` for independent seeds: draws[c] (k, R_c) is each weight vector's draw of
    candidate c's replicates; the win rate of i over j is the mean over every pair of drawn
    replicates, sum_ab u_i(a) u_j(b) cross[a, b] with u_c the share of c's draw that is each row."""
    k, n = len(cross), len(reps)
    share = np.zeros((k, n, cross.shape[1]))  # (k, n, V)
    for c, drawn in enumerate(draws):
        for column in drawn.T:
            np.add.at(share, (np.arange(k), c, first[c] + column), 1.0 / drawn.shape[1])
    out = np.einsum("kiv,kvw,kjw->kij", share, cross, share)
    out[:, np.arange(n), np.arange(n)] = 0.5  # a candidate against itself: a tie, as win_rates has it
    return out


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
    """Per target, its `k` highest-affinity candidates other than `self` and `t <- t` (the target's
    own encoder, never a transfer the taxonomy may choose): (sources, affinity)."""
    by_target: dict[str, list] = {}
    for row in table.select(["target", "sources", "affinity"]).to_pylist():
        if tuple(row["sources"]) not in (SELF, (row["target"],)):
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
