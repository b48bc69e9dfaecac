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
one replicate, such as `self` when the networks are not replicated, is the same in every slot,
and its resamples borrow the training noise its target's other candidates measured:
`unmeasured_shifts`). Independent seeds average over every pair (a, b) of replicates of i and of j.

One target at a time: `affinity_by_target` reads a target's losses, computes its rows (and its
bootstrap resamples) and drops the losses before reading the next, so no process holds the whole
study's losses. The whole-table functions (`compute_affinity`, `cube_affinity`) run the same
per-target code over a cube of several targets, so both give the same numbers.

The bootstrap is the multi-bootstrap of Sellam et al. (ICLR 2022; design.md section 10). Resample b
draws (1) one multinomial count vector w_b over the study's test images (`image_weights`), shared by
every candidate and every target, since the images are the same images; an image a target has no
label for counts nowhere for it; and (2) replicates with replacement (`replicate_draws`): paired,
one vector of R slots per target, shared by all its candidates (so the resample keeps the pairing
the point estimate relies on); independent, R_c replicates per candidate. The replicates' part of
each resample's deviation is widened by sqrt(R / (R - 1)) (`with_replicate_noise`): R draws from
R replicates vary by (R - 1)/R of what a rerun's R fresh ones do; and scaled by sqrt(nu / chi2_nu),
nu = R - 1 (`replicate_scale`), since R replicates only estimate that spread, so a rerun lands
Student-t about the estimate. Its win rates are the
same statistic on the drawn replicates under the weights w_b,

    W_b[i, j] = mean over drawn pairs (a, b) of sum_I w_bI (1[l_i^a(I) < l_j^b(I)] + 0.5 1[tie]) / sum_I w_bI,

so E[W_b] = W (the resamples are centred on the point estimate, whatever R), and the same AHP.
Every (candidate, replicate) row of a target is compared with every other once, for the point
estimate and all resamples in one product (`win_rates`); the resamples then only select and
average those comparisons (`paired_wins`, `independent_wins`).

The loss table is arranged per target in a `LossCube` padded with NaN, which compares false, so
padding never counts. An image whose label has no valid pixel for a target has a NaN loss for
every candidate and replicate (design.md section 2): it is left out of that target's win rates
and counted in `LossCube.unlabelled`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from components import vocabulary
from components.affinity_io import factorize
from components.ahp import ahp_affinity
from components.errors import TaskatlasError
from components.loss_cube import LossCube, loss_cube
from components.resampling import (
    check_resamples,
    check_seed,
    image_weights,
    predictive_wins,
    resampled_wins,
    study_positions,
)
from components.win_rates import win_rates

# Baselines as source sets (components.vocabulary names them)
SELF = (vocabulary.SELF,)  # the target's fully supervised network
RANDOM = (vocabulary.RANDOM,)  # a random-init encoder: an ordinary candidate, and the reference for vs_random
PIXELS = (vocabulary.PIXELS,)  # trained from raw pixels: the reference for gain, not a candidate
SCRATCH = (vocabulary.SCRATCH,)  # a whole network trained on the same labels: a new task's gain reference
REFERENCES = (PIXELS, SCRATCH)  # measured only to compare against, never AHP candidates
INTERVAL = (2.5, 97.5)  # percentiles of the reported 95% interval
INTERVAL_COLUMNS = ("affinity_lo", "affinity_hi")
P_BEST = "p_best"  # share of resamples in which a candidate has its target's highest affinity
P_NO_GAIN = "p_no_gain"  # share of a rerun's draws in which its gain (win rate vs pixels) is below 0.5
P_BELOW_RANDOM = "p_below_random"  # share of a rerun's draws in which it loses to random (vs_random < 0.5)
# The flags on a transfer, one per baseline it may lose to: (the baseline, the column of the share
# of draws in which it loses to it, the column of its win rate against it)
BASELINE_FLAGS = ((vocabulary.RANDOM, P_BELOW_RANDOM, "vs_random"), (vocabulary.PIXELS, P_NO_GAIN, "gain"))
BEST_TIE = 1e-9  # affinities within this relative distance of the highest tie for the best

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


def study_image_ids(tables: Iterable[pa.Table]) -> list[str]:
    """The sorted union, as text, of the `image_id`s of `tables` (read one after another): the
    image axis of `image_weights` when the caller does not know the test split's ids."""
    ids: set[str] = set()
    for table in tables:
        ids.update(str(v) for v in factorize(table["image_id"], "image_id")[1])
        del table  # before the next table is read
    return sorted(ids)


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
    check_resamples(bootstrap)

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
        check_seed(seed)  # before reading anything
        image_ids = study_image_ids(read_target(name) for name in names)
    cubes = ((read_cube(name), 0) for name in names)
    return _affinity(names, cubes, bootstrap, seed, image_ids, paired, gain_reference, require_self)


def cube_affinity(
    cube: LossCube, bootstrap: int = 0, seed: int = 0, *, paired: bool = True
) -> AffinityResult:
    """`affinity_by_target` on a cube already built (every target of a whole loss table); the
    image weights are over the cube's image ids."""
    check_resamples(bootstrap)
    cubes = ((cube, t) for t in range(len(cube.targets)))
    return _affinity(cube.targets, cubes, bootstrap, seed, cube.image_ids, paired)


def compute_affinity(losses: pa.Table) -> pa.Table:
    """The affinity table (AFFINITY_SCHEMA) of a per-image loss table; needs `self` for every target."""
    return affinity_from_cube(loss_cube(losses))


def affinity_from_cube(cube: LossCube) -> pa.Table:
    """`compute_affinity` on a cube already built (callers that also report `cube.unlabelled`)."""
    return cube_affinity(cube).table


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
    check_resamples(bootstrap)
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
                    positions = study_positions(study, cube, name)
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
    wins = resampled_wins(cross, first, reps, sets, seed, cube.targets[t], paired)  # (1 + B, n, n)
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


def _share_below_half(wins: np.ndarray) -> np.ndarray:
    """(B, rows) win rates -> (rows,) share of resamples below 0.5 (NaN without resamples or reference)."""
    if not len(wins) or np.isnan(wins).all():
        return np.full(wins.shape[1], np.nan)
    return (wins < 0.5).mean(axis=0)


def top_sources(table: pa.Table, k: int) -> dict[str, list[tuple[tuple[str, ...], float]]]:
    """Per target, its `k` highest-affinity candidates other than `self` and `t <- t` (the target's
    own encoder, never a transfer the taxonomy may choose): (sources, affinity)."""
    by_target: dict[str, list] = {}
    for row in table.select(["target", "sources", "affinity"]).to_pylist():
        if tuple(row["sources"]) not in (SELF, (row["target"],)):
            by_target.setdefault(row["target"], []).append((tuple(row["sources"]), row["affinity"]))
    return {t: sorted(rows, key=lambda r: (-r[1], r[0]))[:k] for t, rows in sorted(by_target.items())}
