"""What a bootstrap resample draws (image weights, replicate slots), how its win rates average over
the drawn replicates, and the checks on the bootstrap's arguments; `components.affinity` explains
the multi-bootstrap."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
from scipy.special import gammaincinv

from components.errors import TaskatlasError
from components.loss_cube import LossCube


def image_weights(seed: int, image_ids: Sequence[str] | np.ndarray, n: int) -> np.ndarray:
    """(n, len(image_ids)) int: resample b's count of each test image, multinomial with
    len(image_ids) draws; `image_ids` are the study's test image ids, sorted and distinct (the
    weights of an image are found by its position). The same weights serve every candidate and
    every target; a target's images without a label count nowhere for it."""
    check_seed(seed)
    ids = np.asarray(image_ids, dtype=str)
    if ids.ndim != 1 or not len(ids):
        raise TaskatlasError("bootstrap: expected a non-empty list of test image ids")
    if len(ids) > 1 and not (ids[1:] > ids[:-1]).all():
        raise TaskatlasError("bootstrap: the test image ids must be sorted and distinct")
    uniform = np.full(len(ids), 1.0 / len(ids))
    return np.random.default_rng(np.random.SeedSequence(seed)).multinomial(len(ids), uniform, size=n)


def study_positions(study: np.ndarray, cube: LossCube, name: str) -> np.ndarray:
    """(len(cube.image_ids),) position of each of the cube's image ids among the study's."""
    ids = np.asarray(cube.image_ids, dtype=str)
    at = np.minimum(np.searchsorted(study, ids), len(study) - 1)
    if (missing := np.flatnonzero(study[at] != ids)).size:
        raise TaskatlasError(
            f"target {name}: test image {ids[missing[0]]!r} is not among the study's "
            f"{len(study)} test image ids given for the bootstrap"
        )
    return at


def replicate_draws(
    seed: int, target: str, n_replicates: int, n: int, sources: tuple[str, ...] | None = None
) -> np.ndarray:
    """(n, n_replicates) int: the replicates resample b draws (n_replicates of 0..n_replicates-1, with
    replacement). Paired seeds (`sources` None): one draw of the target's replicate slots, shared by
    all its candidates; independent seeds: a draw per candidate (`sources`). The stream depends
    only on the seed, the target (and the source set, sorted and `+`-joined), so the same draw can
    be made anywhere; the first k rows do not depend on n. One replicate always draws replicate 0."""
    check_seed(seed)
    if n_replicates == 1:
        return np.zeros((n, 1), dtype=np.int64)
    entropy = [int(seed), zlib.crc32(target.encode())]
    if sources is not None:
        entropy.append(zlib.crc32("+".join(sources).encode()))
    return np.random.default_rng(np.random.SeedSequence(entropy)).integers(
        0, n_replicates, size=(n, n_replicates)
    )


def replicate_factor(replicates: np.ndarray | int) -> np.ndarray:
    """sqrt(R / (R - 1)) (1 where R <= 1): how much wider a rerun's replicate noise is than the
    bootstrap's. The estimate is a mean over R replicates, which varies across reruns by s^2 / R
    (s^2: the replicates' variance, ddof 1); the mean of R replicates drawn from the R there are
    varies by the plug-in (R - 1)/R s^2 / R: two thirds at R = 3."""
    r = np.asarray(replicates, dtype=float)
    return np.sqrt(np.where(r > 1, r / np.maximum(r - 1, 1), 1.0))


def replicate_scale(seed: int, target: str, n: int, dof: np.ndarray | int) -> np.ndarray:
    """(n, *shape of dof) sqrt(nu / q_b): resample b's scale of its replicates' deviation, q_b the
    chi-square quantile (nu = dof degrees of freedom) of one uniform per resample and target.

    Why: R replicates estimate the spread of their pair's win rate with R - 1 degrees of freedom
    (2 at R = 3), so a rerun's estimate is Student-t about this one, not normal: three runs that
    happen to agree say little about how far a fourth lands. A normal deviation times this scale
    is t-distributed with nu degrees of freedom (the scale mixture that defines t). One uniform per
    resample serves every pair of the target (comonotone across pairs of different nu): a resample
    is one guess at how noisy the target's training is, which keeps AHP's ratios of a resample
    consistent with each other. nu <= 0 (no replicate noise): scale 1. The stream depends only on
    the seed and the target, like `replicate_draws`."""
    check_seed(seed)
    nu = np.asarray(dof, dtype=float)
    entropy = [int(seed), zlib.crc32(target.encode()), zlib.crc32(b"replicate scale")]
    u = np.random.default_rng(np.random.SeedSequence(entropy)).random(n)
    u = u.reshape((n,) + (1,) * nu.ndim)
    quantile = 2 * gammaincinv(np.maximum(nu, 1) / 2, np.maximum(u, 1e-300))  # chi-square(nu) at u
    return np.where(nu > 0, np.sqrt(np.maximum(nu, 1) / quantile), 1.0)


def with_replicate_noise(
    images: np.ndarray, drawn: np.ndarray, factor: np.ndarray | float, shift: np.ndarray | None = None
) -> np.ndarray:
    """(B, n, n) win rates of resamples of the images alone (every replicate, as the estimate reads
    them) and of images and replicates drawn together -> the resamples with the replicates' part of
    the deviation widened by `factor` (`replicate_factor`, times `replicate_scale`; scalar or per
    pair), each candidate's `shift` (B, n) added to its wins and taken from its losses
    (`unmeasured_shifts`), clipped to [0, 1]. The image part is left as the bootstrap gives it (n
    images: (n - 1)/n of its variance, nearly all). Not fewer replicates drawn (R - 1 of R has the
    right variance too): a resample of fewer runs is one of more extreme win rates, which AHP's
    ratios turn into affinities outside the interval of the estimate. W_ji = 1 - W_ij is kept: every
    part keeps it, and the clip is symmetric."""
    deviation = factor * (drawn - images)
    if shift is not None:
        deviation = deviation + shift[:, :, None] - shift[:, None, :]
    return _win_rates(images + deviation)


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
    return _win_rates(resamples + np.roll(resamples, -1, axis=0) - point)


def _win_rates(drawn: np.ndarray) -> np.ndarray:
    """(B, n, n) shifted win rates back into [0, 1], each candidate against itself a tie (0.5).
    A symmetric clip keeps W_ji = 1 - W_ij where the shift kept it."""
    out = np.clip(drawn, 0.0, 1.0)
    n = out.shape[-1]
    out[:, np.arange(n), np.arange(n)] = 0.5
    return out


def paired_wins(cross: np.ndarray, first: np.ndarray, reps: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """(k, V, V) win rates between (candidate, replicate) rows, candidate c's replicates at rows
    first[c]..first[c]+reps[c]-1, and (k, S) slots per weight vector -> (k, n, n): the mean over
    the drawn slots s of the win rates between replicate s mod R_c of each candidate."""
    k, n = len(cross), len(reps)
    out = np.zeros((k, n, n))
    for column in draws.T:  # (k,) the s-th drawn slot of each weight vector
        rows = first[None, :] + column[:, None] % reps[None, :]  # (k, n)
        out += cross[np.arange(k)[:, None, None], rows[:, :, None], rows[:, None, :]]
    return out / draws.shape[1]


def independent_wins(
    cross: np.ndarray, first: np.ndarray, reps: np.ndarray, draws: list[np.ndarray]
) -> np.ndarray:
    """As `paired_wins` for independent seeds: draws[c] (k, R_c) is each weight vector's draw of
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


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise TaskatlasError(f"bootstrap: the seed must be an integer >= 0, got {seed!r}")


def check_resamples(bootstrap: int) -> None:
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int | np.integer) or bootstrap < 0:
        raise TaskatlasError(f"bootstrap: the number of resamples must be an integer >= 0, got {bootstrap!r}")


def resampled_wins(
    cross: np.ndarray,
    first: np.ndarray,
    reps: np.ndarray,
    sets: list[tuple[str, ...]],
    seed: int,
    target: str,
    paired: bool,
) -> np.ndarray:
    """(1 + B, V, V) win rates between a target's (candidate, replicate) rows, row 0 over all
    images and the others under each resample's image weights -> (1 + B, n, n) candidate win rates:
    row 0 the estimate (every replicate once), then each resample's images with every replicate,
    its drawn replicates' part of the deviation widened to a rerun's (`with_replicate_noise`), and
    candidates trained once given the noise the others measured (`unmeasured_shifts`).
    `sets`: the candidates' source sets (independent seeds draw per candidate)."""
    k, n_resamples = len(cross), len(cross) - 1
    if paired:
        slots = int(reps.max())
        images = paired_wins(cross, first, reps, np.broadcast_to(np.arange(slots), (k, slots)))
        drawn = paired_wins(cross[1:], first, reps, replicate_draws(seed, target, slots, n_resamples))
        factor, dof = replicate_factor(slots), slots - 1
        scale = replicate_scale(seed, target, n_resamples, dof)[:, None, None]
    else:
        every = [np.broadcast_to(np.arange(r), (k, r)) for r in reps]
        images = independent_wins(cross, first, reps, every)
        each = [
            replicate_draws(seed, target, int(r), n_resamples, s) for s, r in zip(sets, reps, strict=True)
        ]
        drawn = independent_wins(cross[1:], first, reps, each)
        # per pair: the fewer replicates of the two that have more than one (one adds no noise)
        many = np.where(reps > 1, reps, 0)
        pair = np.where(
            (many[:, None] > 0) & (many[None, :] > 0),
            np.minimum(many[:, None], many[None, :]),
            np.maximum(many[:, None], many[None, :]),
        )
        factor, dof = replicate_factor(pair), int(reps.max()) - 1
        scale = replicate_scale(seed, target, n_resamples, pair - 1)
    shift = unmeasured_shifts(factor * (drawn - images[1:]), reps, seed, target)
    shift = shift * replicate_scale(seed, target, n_resamples, dof)[:, None]  # t, as the measured
    return np.concatenate([images[:1], with_replicate_noise(images[1:], drawn, factor * scale, shift)])


def unmeasured_shifts(deviation: np.ndarray, reps: np.ndarray, seed: int, target: str) -> np.ndarray:
    """(B, n, n) replicate deviations of a target's win rates (widened, not yet t-scaled) and each
    candidate's replicates -> (B, n) a shift of each candidate trained once, 0 for the others.

    Why: a candidate with one replicate is the same run in every resample, so its own training
    noise was assumed away: its win rates varied only by its opponents' replicates, half what a
    rerun's would (racing leaves candidates at one replicate; so do networks that are not
    replicated, such as `self`). It borrows its target's: a pair of measured candidates (two
    replicates or more) varies by about s_i^2 + s_j^2, so one candidate by the mean over those
    pairs of their variance, halved (with no such pair, the mean variance of the pairs of one
    measured and one unmeasured candidate: the measured one's alone). Resample b moves candidate c
    by a normal draw of that variance: + on its wins over every other, - on theirs over it, as a
    better or worse training run would. Nothing where no candidate is measured (no noise seen)."""
    n_resamples, n = deviation.shape[:2]
    measured = reps > 1
    if measured.all() or not measured.any() or not n_resamples:
        return np.zeros((n_resamples, n))
    i, j = np.triu_indices(n, 1)
    variance = deviation[:, i, j].var(axis=0)  # per pair, over the resamples
    both, one = measured[i] & measured[j], measured[i] != measured[j]
    own = variance[both].mean() / 2 if both.any() else variance[one].mean()
    entropy = [int(seed), zlib.crc32(target.encode()), zlib.crc32(b"unmeasured candidates")]
    draws = np.random.default_rng(np.random.SeedSequence(entropy)).normal(size=(n_resamples, n))
    return np.where(measured, 0.0, draws * np.sqrt(own))
