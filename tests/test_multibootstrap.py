"""The multi-bootstrap over test images and replicates (design.md section 10): against a
brute-force resample (paired and independent seeds, unequal replicate counts), on hand-worked
tables, planted ties and winners, centred on planted tables with R = 1, 2, 3, and R = 1 against the
numbers from before replicates existed."""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from scipy import stats

from components.affinity import INTERVAL_SCHEMA, affinity_by_target, compute_affinity, cube_affinity
from components.bootstrap import (
    best_candidates,
    resample_weights,
    stability_of_rows,
)
from components.errors import TaskatlasError
from components.loss_cube import loss_cube
from components.resampling import (
    image_weights,
    predictive_wins,
    replicate_draws,
    replicate_factor,
    replicate_scale,
    with_replicate_noise,
)
from components.taxonomy import TaxonomyOptions, solve_taxonomy
from components.transfer_table import TransferTable
from components.win_rates import win_rates
from pipelines.cli import main
from tests.conftest import affinity_with_intervals, assert_same_table

pytestmark = pytest.mark.numerics  # CI runs these again under another CPU kernel path

NAN = float("nan")


def _table(per_target: dict[str, dict[str, np.ndarray]], replicate_column: bool = True) -> pa.Table:
    """{target: {"a+b": (R, m) losses}} -> the long loss table; image ids `img<i>`; a NaN-only image
    column is written as NaN rows (an unlabelled image), and a column of `None` is left out."""
    rows = []
    for target, by_source in per_target.items():
        for sources, losses in by_source.items():
            for r, per_image in enumerate(np.atleast_2d(losses)):
                for i, loss in enumerate(per_image):
                    if loss is not None:
                        rows.append((target, sources.split("+"), f"img{i}", float(loss), r))
    columns = {
        "target": [r[0] for r in rows],
        "sources": pa.array([r[1] for r in rows], pa.list_(pa.string())),
        "image_id": [r[2] for r in rows],
        "loss": [r[3] for r in rows],
    }
    if replicate_column:
        columns["replicate"] = pa.array([r[4] for r in rows], pa.int32())
    return pa.table(columns)


def _split(table: pa.Table):
    return lambda target: table.filter(pc.equal(table["target"], target))


# Two targets, 2-3 replicates, losses in quarters (replicate averages are exact, so the brute force
# and the code agree on every tie). y has no label on img2 and is not measured on img5 at all;
# img6 exists only for y: the image weights are over the union img0..img6.
TINY = {
    "x": {
        "self": [[1.0, 0.5, 1.25, 0.75, 1.0, 0.5, None]],
        "a": [
            [1.0, 0.75, 1.0, 0.5, 1.25, 0.75, None],
            [0.5, 0.75, 1.5, 1.0, 1.0, 0.25, None],
            [1.25, 1.0, 0.5, 0.75, 0.75, 0.5, None],
        ],
        "b": [[0.75, 1.0, 1.0, 1.0, 0.5, 1.0, None], [1.0, 0.5, 0.75, 0.75, 1.0, 1.25, None]],
        "a+b": [
            [0.5, 0.5, 1.0, 0.75, 0.75, 0.5, None],
            [0.75, 0.75, 0.75, 0.5, 1.0, 0.75, None],
            [1.0, 0.5, 1.0, 1.0, 0.5, 0.25, None],
        ],
        "random": [
            [1.5, 1.25, 1.0, 1.5, 1.25, 1.0, None],
            [1.25, 1.5, 1.5, 1.0, 1.0, 1.25, None],
            [1.0, 1.25, 1.25, 1.25, 1.5, 0.75, None],
        ],
        "pixels": [[1.25, 1.0, 1.0, 1.25, 0.75, 1.0, None], [1.0, 1.0, 1.25, 1.0, 1.0, 1.5, None]],
    },
    "y": {
        "self": [[0.5, 0.75, NAN, 1.0, 0.5, None, 0.75]],
        "a": [[0.75, 0.5, NAN, 1.0, 0.75, None, 0.5], [1.0, 0.75, NAN, 0.5, 0.5, None, 1.0]],
        "x": [[0.5, 1.0, NAN, 0.75, 1.0, None, 0.75], [0.75, 0.75, NAN, 1.0, 0.5, None, 0.5]],
        "random": [[1.0, 1.0, NAN, 1.25, 0.75, None, 1.0], [0.75, 1.25, NAN, 1.0, 1.0, None, 1.25]],
    },
}


def _brute_force(per_target: dict, target: str, seed: int, b: int, n: int, paired: bool = True) -> dict:
    """Resample b by hand, with explicit loops: the study's image weights, the drawn replicates
    (paired: one draw of the target's slots, slot s reading replicate s mod R_c; independent: a draw
    per candidate, every drawn pair), the mean of their weighted win rates, the replicates' part
    widened and t-scaled, a candidate trained once moved by the noise the others measured, the
    Perron vector."""
    ids = sorted({f"img{i}" for t in per_target.values() for v in t.values() for i in range(len(v[0]))})
    by_source = {tuple(sorted(s.split("+"))): np.array(v, dtype=float) for s, v in per_target[target].items()}
    everyone = sorted(by_source)  # the cube's candidates, pixels too (its noise is pooled as well)
    names = [s for s in everyone if s != ("pixels",)]
    slots = max(len(v) for v in by_source.values())  # pixels counts: the cube's replicate slots
    labelled = [i for i in range(len(ids)) if i < by_source[names[0]].shape[1]]
    labelled = [i for i in labelled if not np.isnan(by_source[names[0]][0, i])]  # measured, with a label

    def slot_pairs(slots_drawn):
        return {
            (p, q): [(s % len(by_source[p]), s % len(by_source[q])) for s in slots_drawn]
            for p in everyone
            for q in everyone
        }

    def every_pair(mine):
        return {(p, q): [(x, y) for x in mine[p] for y in mine[q]] for p in everyone for q in everyone}

    def rates(c):  # resample c: (win rate over every replicate, over the drawn ones) of each ordered pair
        weights = dict(zip(ids, image_weights(seed, ids, n)[c], strict=True))
        if paired:  # the replicates every slot reads, and those resample c draws
            every = slot_pairs(range(slots))
            pairs = slot_pairs(replicate_draws(seed, target, slots, n)[c])
        else:
            every = every_pair({s: range(len(by_source[s])) for s in everyone})
            pairs = every_pair(
                {s: replicate_draws(seed, target, len(by_source[s]), n, s)[c] for s in everyone}
            )
        total = sum(weights[f"img{i}"] for i in labelled)

        def rate(p, q, chosen):  # the mean weighted win rate of p over q over the chosen replicate pairs
            out = []
            for x, y in chosen[p, q]:
                lp, lq = by_source[p][x], by_source[q][y]
                won = sum(weights[f"img{i}"] * ((lp[i] < lq[i]) + 0.5 * (lp[i] == lq[i])) for i in labelled)
                out.append(won / total)
            return np.mean(out)

        return {(p, q): (rate(p, q, every), rate(p, q, pairs)) for p in everyone for q in everyone if p != q}

    def t_scale(dof):  # sqrt(nu / chi2_nu) at resample b's uniform
        u = np.random.default_rng(
            np.random.SeedSequence([seed, zlib.crc32(target.encode()), zlib.crc32(b"replicate scale")])
        ).random(n)[b]
        return np.sqrt(dof / stats.chi2.ppf(u, dof)) if dof > 0 else 1.0

    def pair_replicates(p, q):  # R, the replicates whose noise the pair carries
        if paired:
            return slots
        many = [len(by_source[s]) for s in (p, q) if len(by_source[s]) > 1]
        return min(many) if many else 1

    def widening(p, q):  # sqrt(R / (R - 1))
        r = pair_replicates(p, q)
        return np.sqrt(r / (r - 1)) if r > 1 else 1.0

    measured = {s for s in everyone if len(by_source[s]) > 1}
    shift = dict.fromkeys(everyone, 0.0)
    if measured and len(measured) < len(everyone):  # a candidate trained once borrows the target's noise
        every_b = [rates(c) for c in range(n)]
        spread = {
            (p, q): np.var([widening(p, q) * (r[p, q][1] - r[p, q][0]) for r in every_b])
            for p in everyone
            for q in everyone
            if p < q
        }
        both = [v for (p, q), v in spread.items() if p in measured and q in measured]
        one = [v for (p, q), v in spread.items() if (p in measured) != (q in measured)]
        own = np.mean(both) / 2 if both else np.mean(one)
        draws = np.random.default_rng(
            np.random.SeedSequence([seed, zlib.crc32(target.encode()), zlib.crc32(b"unmeasured candidates")])
        ).normal(size=(n, len(everyone)))[b]
        dof = slots - 1 if paired else max(len(v) for v in by_source.values()) - 1
        for c, s in enumerate(everyone):
            if s not in measured:
                shift[s] = draws[c] * np.sqrt(own) * t_scale(dof)
    resample = rates(b)
    k = len(names)
    wins = np.full((k, k), 0.5)
    for i, p in enumerate(names):
        for j, q in enumerate(names):
            if i != j:
                images, drawn = resample[p, q]
                scaled = widening(p, q) * t_scale(pair_replicates(p, q) - 1) * (drawn - images)
                wins[i, j] = min(max(images + scaled + shift[p] - shift[q], 0.0), 1.0)
    clipped = np.clip(wins, 0.001, 0.999)
    values, vectors = np.linalg.eig(clipped / clipped.T)
    vector = np.abs(vectors[:, np.argmax(values.real)].real)
    return dict(zip(names, vector / vector.sum(), strict=True))


@pytest.mark.parametrize("paired", [True, False])
def test_the_multi_bootstrap_equals_a_brute_force_resample(paired):
    """TINY has candidates with 1, 2 and 3 replicates: unequal counts, both pairings."""
    table = _table(TINY)
    n, seed = 5, 11
    result = affinity_by_target(["x", "y"], _split(table), n, seed, paired=paired)
    rows = [(r["target"], tuple(r["sources"])) for r in result.table.to_pylist()]
    for b in (0, 1, 4):
        for target in ("x", "y"):
            for sources, value in _brute_force(TINY, target, seed, b, n, paired).items():
                got = result.samples[b, rows.index((target, sources))]
                # float64 win rates summed in another order, then an eigenvector: rounding only
                np.testing.assert_allclose(got, value, rtol=1e-9, atol=1e-12)
    whole = cube_affinity(loss_cube(table), n, seed, paired=paired)
    np.testing.assert_array_equal(whole.samples, result.samples)  # the whole table: the same numbers
    assert_same_table(whole.table, result.table)
    assert result.replicates == {"x": 3, "y": 2}


def test_the_point_estimate_is_the_mean_win_rate_of_paired_replicates_not_of_averaged_losses():
    """Hand-worked: a beats b in replicate 0 and loses in replicate 1, so one training run of a
    beats one of b half the time (0.5), while a's averaged losses (2.0) beat b's (2.25) everywhere."""
    table = _table(
        {
            "t": {
                "self": [[1.5, 1.5, 1.5, 1.5]],
                "a": [[1.0, 1.0, 1.0, 1.0], [3.0, 3.0, 3.0, 3.0]],
                "b": [[2.0, 2.0, 2.0, 2.0], [2.5, 2.5, 2.5, 2.5]],
            }
        }
    )
    cube = loss_cube(table)
    result = cube_affinity(cube)
    rows = {tuple(r["sources"]): r for r in result.table.to_pylist()}
    assert rows[("a",)]["quality"] == 0.5  # self, one network, is the same in both slots: 1 then 0
    assert rows[("b",)]["quality"] == 0.0
    # W(a, b) = 0.5, W(a, self) = 0.5, W(b, self) = 0: the AHP of that matrix by hand
    wins = np.array([[0.5, 0.5, 0.5], [0.5, 0.5, 0.0], [0.5, 1.0, 0.5]])  # a, b, self
    clipped = np.clip(wins, 0.001, 0.999)
    values, vectors = np.linalg.eig(clipped / clipped.T)
    vector = np.abs(vectors[:, np.argmax(values.real)].real)
    expected = dict(zip([("a",), ("b",), ("self",)], vector / vector.sum(), strict=True))
    for sources, value in expected.items():
        assert rows[sources]["affinity"] == pytest.approx(value, rel=1e-9)
    independent = {tuple(r["sources"]): r for r in cube_affinity(cube, paired=False).table.to_pylist()}
    assert independent[("a",)]["quality"] == 0.5  # (1 + 0) / 2 over a's replicates against one self


def test_identical_replicates_change_nothing_the_fast_path_and_the_replicate_path_agree():
    """Every replicate a copy of replicate 0: the averages are replicate 0's losses, so the
    replicate path (comparisons per resample) must give what one replicate gives (one product)."""
    rng = np.random.default_rng(3)
    one = {
        t: {s: rng.integers(0, 4, (1, 40)).astype(float) for s in ("self", "a", "b", "a+b", "random")}
        for t in "pq"
    }
    three = {
        t: {s: (v if s == "self" else np.repeat(v, 3, axis=0)) for s, v in d.items()} for t, d in one.items()
    }
    a = affinity_with_intervals(_table(one), 30, seed=2)
    b = affinity_with_intervals(_table(three), 30, seed=2)
    for name in INTERVAL_SCHEMA.names[3:]:
        np.testing.assert_allclose(b[name].to_numpy(), a[name].to_numpy(), rtol=1e-12, equal_nan=True)


def _planted(offsets: np.ndarray, images: int = 400) -> dict:
    """Target t: A = base + d_r, B = base - d_r per replicate r; self better, random worse."""
    base = np.random.default_rng(5).random(images) + 1.0
    return {
        "t": {
            "self": (base - 0.5)[None],
            "A": base[None] + offsets[:, None],
            "B": base[None] - offsets[:, None],
            "random": base[None] + 0.5 + 0.0 * offsets[:, None],
        }
    }


def test_a_seed_effect_comes_out_as_a_tie_not_as_a_winner():
    offsets = np.array([0.1, -0.1, 0.1, -0.1])  # the sign of A - B flips between seeds
    with_replicates = affinity_with_intervals(_table(_planted(offsets)), 200, seed=0)
    p_best = {tuple(r["sources"]): r["p_best"] for r in with_replicates.to_pylist()}
    assert (
        p_best[("A",)] < 0.9
        and p_best[("B",)] < 0.9
        and p_best[("A",)] + p_best[("B",)] == pytest.approx(1.0)
    )
    assert np.isnan(p_best[("self",)]) and p_best[("random",)] == 0.0
    assert {s for s, _ in best_candidates(with_replicates)["t"]} == {("A",), ("B",)}
    # replicate 0 alone (a bootstrap over images only) is sure that B is best: false certainty
    one_seed = affinity_with_intervals(_table(_planted(offsets[:1])), 200, seed=0)
    assert {tuple(r["sources"]): r["p_best"] for r in one_seed.to_pylist()}[("B",)] == 1.0


def test_a_clear_winner_stays_the_best():
    rng = np.random.default_rng(8)
    images = 300
    base = rng.random(images) + 1.0
    better = rng.random(images) < 0.9  # A beats B on 90% of the images, in every replicate
    noise = rng.normal(0, 0.01, (4, images))
    losses = {
        "t": {
            "self": (base - 0.5)[None],
            "A": base + np.where(better, -0.2, 0.2) + noise,
            "B": base + noise[::-1],
            "random": base + 0.5 + noise,
        }
    }
    table = affinity_with_intervals(_table(losses), 200, seed=1)
    p_best = {tuple(r["sources"]): r["p_best"] for r in table.to_pylist()}
    assert p_best[("A",)] >= 0.95
    assert best_candidates(table, threshold=0.01)["t"][0] == (("A",), p_best[("A",)])


def test_with_one_replicate_the_point_estimate_is_what_it_was_before_replicates():
    """Expected numbers computed with the code before replicates existed (commit bcd0686, Stage III
    `compute_affinity` on this table, printed with repr): one replicate must change nothing."""
    fixed = {
        "t": {
            "self": [[0.5, 1.0, 0.2, 0.7, 0.3, 0.9, 0.4, 0.6]],
            "a": [[0.6, 0.8, 0.2, 1.1, 0.5, 0.9, 0.3, 0.9]],
            "b": [[1.0, 0.7, 0.4, 0.7, 0.8, 1.2, 0.5, 0.6]],
            "a+b": [[0.55, 0.75, 0.3, 0.8, 0.45, 1.0, 0.35, 0.7]],
            "random": [[1.5, 1.2, 0.9, 1.0, 0.8, 1.4, 0.6, 1.1]],
            "pixels": [[1.2, 0.9, 0.6, 1.2, 0.7, 1.0, 0.5, 0.8]],
        },
        "u": {
            "self": [[0.1, 0.4, NAN, 0.3, 0.2, 0.5]],
            "a": [[0.3, 0.2, NAN, 0.3, 0.6, 0.4]],
            "t": [[0.2, 0.5, NAN, 0.1, 0.6, 0.7]],
            "random": [[0.4, 0.6, NAN, 0.3, 0.5, 0.9]],
        },
    }
    expected = {  # (target, sources): (affinity, quality, gain)
        ("t", "a"): (0.08429992921780402, 0.375, 0.875),
        ("t", "a+b"): (0.3590567219629281, 0.25, 0.9375),
        ("t", "b"): (0.062101045251171216, 0.25, 0.6875),
        ("t", "random"): (0.0022785727017890795, 0.0, 0.125),
        ("t", "self"): (0.49226373086630765, 0.5, 0.875),
        ("u", "a"): (0.25359289132494045, 0.5, NAN),
        ("u", "random"): (0.06437567888593879, 0.1, NAN),
        ("u", "self"): (0.4890410807260989, 0.5, NAN),
        ("u", "t"): (0.19299034906302176, 0.2, NAN),
    }
    for replicate_column in (False, True):  # no column, or replicate 0 everywhere: the same
        got = compute_affinity(_table(fixed, replicate_column)).to_pylist()
        assert [(r["target"], "+".join(r["sources"])) for r in got] == list(expected)
        values = np.array([[r["affinity"], r["quality"], r["gain"]] for r in got])
        want = np.array(list(expected.values()))
        # Win rates are integer counts over a total, exact on any CPU. The affinities come from
        # LAPACK's eigendecomposition of a 5x5 matrix, whose kernels differ by CPU: last-bit
        # differences (1e-16 seen across hosts) only, far inside 1e-9.
        np.testing.assert_array_equal(values[:, 1:], want[:, 1:])
        np.testing.assert_allclose(values[:, 0], want[:, 0], rtol=1e-9, atol=0)


def test_vs_random_is_the_win_rate_against_random():
    table = _table(
        {"t": {"self": [[1.0, 1.0, 1.0, 1.0]], "a": [[2.0, 2.0, 2.0, 0.0]], "random": [[1.5, 1.5, 1.5, 1.5]]}}
    )
    rows = {tuple(r["sources"]): r for r in compute_affinity(table).to_pylist()}
    assert rows[("a",)]["vs_random"] == 0.25  # loses to random on 3 of 4 images: a useless transfer
    assert rows[("random",)]["vs_random"] == 0.5 and rows[("self",)]["vs_random"] == 1.0
    no_random = compute_affinity(_table({"t": {"self": [[1.0, 2.0]], "a": [[2.0, 1.0]]}}))
    assert np.isnan(no_random["vs_random"].to_numpy()).all()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda rows: [
                r
                for r in rows
                if not (r["sources"] == ["a"] and r["replicate"] == 1 and r["image_id"] == "img2")
            ],
            "t <- a: losses for 5 of the target's 6 test images in replicate 1",
        ),
        (
            lambda rows: [r for r in rows if not (r["sources"] == ["a"] and r["replicate"] == 1)],
            "t <- a: no losses in replicate 1, but losses in replicate 2",
        ),
        (
            lambda rows: [*rows, next(r for r in rows if r["sources"] == ["b"] and r["replicate"] == 1)],
            "t <- b: image 'img0' has 2 losses in replicate 1",
        ),
        (
            lambda rows: [
                dict(r, loss=NAN)
                if r["sources"] == ["b"] and r["replicate"] == 0 and r["image_id"] == "img3"
                else r
                for r in rows
            ],
            "loss of t <- b on image 'img3' is NaN while other candidates have a loss there (replicate 0",
        ),
        (
            lambda rows: [dict(r, replicate=None) if r["image_id"] == "img1" else r for r in rows],
            "column 'replicate' has 6 missing value(s)",
        ),
    ],
)
def test_missing_replicate_rows_are_one_line_errors_naming_target_sources_and_replicate(edit, message):
    losses = np.arange(18.0).reshape(3, 6) / 4
    table = _table({"t": {"self": losses[:1], "a": losses, "b": losses[:2] + 1}})
    edited = pa.Table.from_pylist(edit(table.to_pylist()), schema=table.schema)
    with pytest.raises(TaskatlasError) as err:
        compute_affinity(edited)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("replicates", [2, 3, 5])
def test_a_resamples_replicate_noise_is_widened_to_a_reruns(replicates):
    """A rerun's mean over R replicates varies by s^2 / R (s^2: the replicates' variance, ddof 1).
    The mean of R replicates drawn from the R there are varies by (R - 1)/R of that (2/3 at R = 3:
    shares too sure of how the networks and readouts trained); widened by sqrt(R / (R - 1)) about
    the image-only resample (here the estimate itself: one image), it varies by s^2 / R. Values in
    (0.3, 0.7), so no clip. Tolerance: the standard error of a variance from 20,000 draws is under
    2% of it; 6% is three of those, and without the widening it is 17% (R = 5) to 50% (R = 2) off."""
    values = 0.5 + 0.05 * np.random.default_rng(replicates).normal(size=replicates)
    drawn = values[replicate_draws(3, "normal", replicates, 20_000)].mean(axis=1)

    def pair(w):  # (B,) win rates of one candidate over another -> (B, 2, 2) win-rate matrices
        return np.stack(
            [np.stack([np.full_like(w, 0.5), w], -1), np.stack([1 - w, np.full_like(w, 0.5)], -1)], 1
        )

    widened = with_replicate_noise(
        pair(np.full_like(drawn, values.mean())), pair(drawn), replicate_factor(replicates)
    )
    np.testing.assert_allclose(widened[:, 1, 0], 1 - widened[:, 0, 1])  # W_ji = 1 - W_ij kept
    means = widened[:, 0, 1]
    assert values.min() > 0.3 and values.max() < 0.7
    assert means.mean() == pytest.approx(values.mean(), abs=0.05 * values.std())  # centred
    assert means.var() == pytest.approx(values.var(ddof=1) / replicates, rel=0.06)
    assert drawn.var() == pytest.approx((replicates - 1) / replicates**2 * values.var(ddof=1), rel=0.06)


def _pair(w):  # (B,) win rates of one candidate over another -> (B, 2, 2) win-rate matrices
    return np.stack([np.stack([np.full_like(w, 0.5), w], -1), np.stack([1 - w, np.full_like(w, 0.5)], -1)], 1)


@pytest.mark.parametrize("replicates", [2, 3, 5])
def test_a_reruns_estimate_lands_inside_the_predictive_interval_95_percent_of_the_time(replicates):
    """The shares are read from draws of what a rerun would measure; their 95% interval must hold a
    rerun's estimate 95% of the time. Simulated studies: R replicate win rates ~ N(0.5, 0.05^2), a
    rerun draws R fresh ones. With the replicates' spread as the truth (the plug-in bootstrap), the
    interval is too narrow: R replicates estimate that spread with R - 1 degrees of freedom, and
    the interval held about 0.72 (R = 2), 0.79 (3) and 0.87 (5) of reruns. With the Student-t scale
    (`replicate_scale`) it holds 0.95. Tolerance: the standard error of a share from 1,500 studies
    is 0.006; 0.025 is four of those, and the plug-in misses by three times that at R = 5."""
    rng = np.random.default_rng(replicates)
    resamples = 400
    held = {False: [], True: []}
    for study in range(1500):
        values = 0.5 + 0.05 * rng.normal(size=replicates)
        rerun = (0.5 + 0.05 * rng.normal(size=replicates)).mean()
        drawn = values[replicate_draws(study, "t", replicates, resamples)].mean(axis=1)
        for scaled in held:
            scale = replicate_scale(study, "t", resamples, replicates - 1)[:, None, None] if scaled else 1.0
            widened = with_replicate_noise(
                _pair(np.full(resamples, values.mean())), _pair(drawn), replicate_factor(replicates) * scale
            )
            ahead = predictive_wins(_pair(np.array([values.mean()]))[0], widened)[:, 0, 1]
            lo, hi = np.percentile(ahead, [2.5, 97.5])
            held[scaled].append(lo <= rerun <= hi)
    assert np.mean(held[True]) == pytest.approx(0.95, abs=0.025)
    assert np.mean(held[False]) < 0.95 - 0.06  # the plug-in: too sure


def test_the_replicate_scale_makes_a_normal_deviation_student_t():
    """sqrt(nu / chi2_nu) times a standard normal is t with nu degrees of freedom: at nu = 2, 18.4%
    of |t| exceed 2 (a normal: 4.6%). Tolerance: 200,000 draws give a standard error of 0.001 on
    that share. One scale per resample is shared by the pairs of a target; nu <= 0 is scale 1."""
    scale = replicate_scale(5, "normal", 200_000, 2)
    z = np.random.default_rng(0).normal(size=len(scale)) * scale
    assert (np.abs(z) > 2).mean() == pytest.approx(2 * stats.t.sf(2, 2), abs=0.005)
    per_pair = replicate_scale(5, "normal", 10, np.array([[0, 2], [2, 4]]))
    assert per_pair.shape == (10, 2, 2) and (per_pair[:, 0, 0] == 1).all()
    np.testing.assert_array_equal(per_pair[:, 0, 1], scale[:10])  # the same stream, whatever the shape
    assert (np.argsort(per_pair[:, 0, 1]) == np.argsort(per_pair[:, 1, 1])).all()  # one uniform per resample


def test_image_weights_and_replicate_draws():
    ids = [f"img{i:02d}" for i in range(30)]
    w = image_weights(7, ids, 50)
    assert w.shape == (50, 30) and (w.sum(axis=1) == 30).all()
    np.testing.assert_array_equal(image_weights(7, ids, 50), w)
    with pytest.raises(TaskatlasError, match="sorted and distinct"):
        image_weights(7, ids[::-1], 5)
    d = replicate_draws(7, "normal", 3, 40)  # paired: one draw of the target's slots
    assert d.shape == (40, 3) and set(np.unique(d)) <= {0, 1, 2}
    np.testing.assert_array_equal(replicate_draws(7, "normal", 3, 10), d[:10])  # a prefix
    assert not np.array_equal(replicate_draws(7, "depth", 3, 40), d)
    e = replicate_draws(7, "normal", 3, 40, ("depth", "edge"))  # independent: one per candidate
    assert not np.array_equal(e, d) and not np.array_equal(replicate_draws(7, "normal", 3, 40, ("depth",)), e)
    assert (replicate_draws(7, "normal", 1, 5) == 0).all()


def test_a_resample_that_misses_a_targets_images_says_nothing_about_it():
    wins = win_rates(np.array([[1.0, 2.0], [2.0, 1.0], [0.0, 0.0]]), np.array([[0, 0], [1, 0]]))
    assert (wins[0] == 0.5).all() and wins[1, 0, 1] == 1.0


def test_weights_are_shared_across_targets():
    cube = loss_cube(_table(TINY))
    x, y = resample_weights(cube, 20, seed=3)
    ids = np.array(cube.image_ids)
    for t, w in enumerate((x, y)):
        slots = cube.images[t]
        for slot in np.flatnonzero(slots >= 0):
            if ids[slots[slot]] != "img2" or t == 0:  # img2 is unlabelled for y: weight 0
                np.testing.assert_array_equal(w[:, slot], image_weights(3, ids, 20)[:, slots[slot]])
            else:
                assert (w[:, slot] == 0).all()


def test_stability_leaves_out_rows_a_resample_did_not_have():
    rows = [
        ("a", ("self",), 0.2),
        ("a", ("b",), 0.5),
        ("a", ("c",), 0.3),
        ("b", ("self",), 0.2),
        ("b", ("a",), 0.7),
        ("b", ("c",), 0.1),
        ("c", ("self",), 0.2),
        ("c", ("a",), 0.6),
        ("c", ("b",), 0.2),
    ]
    targets, sources, values = zip(*rows, strict=True)
    samples = np.tile(values, (4, 1))
    options = TaxonomyOptions(budget=1, max_order=1)
    chosen = solve_taxonomy(TransferTable.from_rows(rows), options)
    assert chosen.roots == ("a",)
    every = stability_of_rows(list(targets), list(sources), samples, options, chosen)
    assert every["roots"] == {"a": 1.0} and every["taxonomy"] == 1.0
    available = np.ones(samples.shape, bool)
    available[:2, [4, 7]] = False  # resamples 0, 1: nothing from a was trained
    some = stability_of_rows(list(targets), list(sources), samples, options, chosen, available=available)
    assert some["roots"]["a"] == 0.5 and some["taxonomy"] == 0.5


def test_the_cli_reads_a_parquet_file_one_target_at_a_time(tmp_path, capsys):
    table = _table(TINY)
    path, out = tmp_path / "losses.parquet", tmp_path / "affinity.parquet"
    pq.write_table(table, path, row_group_size=20)  # several row groups per target
    assert (
        main(["affinity", "--losses", str(path), "--out", str(out), "--bootstrap", "9", "--seed", "4"]) == 0
    )
    assert "training noise not measured" not in capsys.readouterr().out  # 3 replicates
    written = pq.read_table(out)
    assert written.column_names == INTERVAL_SCHEMA.names
    assert_same_table(written, affinity_with_intervals(table, 9, seed=4))


def _noisy_study(replicates: int, images: int = 300, seed: int = 0) -> dict:
    """One target, five candidates of different strength, each replicate (a training run) shifting
    a candidate's losses by its own offset, plus per-image noise: the replicates disagree."""
    rng = np.random.default_rng(seed)
    base = rng.random(images) + 1.0
    table = {"self": (base - 0.06 + rng.normal(0, 0.08, images))[None]}
    for name, strength in (("a", -0.03), ("b", 0.0), ("c", 0.01), ("d", 0.04), ("random", 0.1)):
        offsets = rng.normal(0, 0.04, (replicates, 1))
        table[name] = base + strength + offsets + rng.normal(0, 0.08, (replicates, images))
    table["pixels"] = base + 0.05 + rng.normal(0, 0.08, (replicates, images))
    return {"t": table}


@pytest.mark.parametrize("replicates", [1, 2, 3])
@pytest.mark.parametrize("paired", [True, False])
def test_the_resamples_are_centred_on_the_point_estimate(replicates, paired):
    """The resamples' win rates have the point estimate's mean whatever R (the statistic is the
    mean over replicate pairs, and a resample draws replicate pairs as the estimate weighs them),
    so every point estimate lies inside its 95% interval and the resamples' mean sits close to it.
    Tolerance: a quarter of the interval's width, well above the Monte Carlo error of a mean of 400
    resamples (about a twentieth of the width) plus the AHP's curvature, and far below the shift
    of resamples that compare replicate averages (the old statistic put estimates at the edge)."""
    for seed in (0, 1):
        table = _table(_noisy_study(replicates, seed=seed))
        result = cube_affinity(loss_cube(table), 400, seed=seed, paired=paired)
        point = result.table["affinity"].to_numpy()
        lo, hi = result.table["affinity_lo"].to_numpy(), result.table["affinity_hi"].to_numpy()
        assert ((lo <= point) & (point <= hi)).all(), (lo, point, hi)
        mean = result.samples.mean(axis=0)
        assert (np.abs(mean - point) <= 0.25 * (hi - lo)).all(), (mean, point, hi - lo)


def test_a_win_rate_over_replicates_is_the_mean_of_each_replicates_win_rate():
    """The estimand is what one training run achieves: quality and gain (win rates against `self`
    and `pixels`) of R paired replicates are the mean of those of each replicate alone, so more
    replicates make the estimate surer without moving what it estimates. Averaging the replicates'
    losses first (the statistic before) makes a sharper candidate instead."""
    study = _noisy_study(4, seed=3)
    rows = compute_affinity(_table(study)).to_pylist()
    alone = [
        compute_affinity(_table({"t": {s: v[r : r + 1] if len(v) > 1 else v for s, v in study["t"].items()}}))
        for r in range(4)
    ]
    for i, row in enumerate(rows):
        for column in ("quality", "gain", "vs_random"):
            each = [a[column][i].as_py() for a in alone]
            assert row[column] == pytest.approx(np.mean(each), abs=1e-12), (row["sources"], column)


def test_t_from_t_never_competes_for_the_best():
    """The target's own encoder (t <- t) is no transfer the taxonomy may choose: no p_best, no tie."""
    rng = np.random.default_rng(2)
    base = rng.random(100) + 1
    table = _table(
        {
            "t": {
                "self": [base - 0.5],
                "t": [base - 0.4],
                "a": [base],
                "b": [base + 0.01],
                "random": [base + 1],
            }
        }
    )
    result = affinity_with_intervals(table, 50, seed=0)
    p_best = {tuple(r["sources"]): r["p_best"] for r in result.to_pylist()}
    assert np.isnan(p_best[("t",)]) and np.isnan(p_best[("self",)])
    assert p_best[("a",)] + p_best[("b",)] + p_best[("random",)] == pytest.approx(1.0)
    assert ("t",) not in {s for s, _ in best_candidates(result, threshold=0.0)["t"]}


def test_the_baseline_shares_count_resamples_that_lose_to_random_or_pixels():
    """p_below_random / p_no_gain: the share of resamples whose win rate against random / pixels is
    below one half; a transfer that beats random everywhere and loses to pixels everywhere."""
    rng = np.random.default_rng(4)
    base = rng.random(120) + 1
    table = _table({"t": {"self": [base - 0.5], "a": [base], "random": [base + 0.5], "pixels": [base - 0.2]}})
    rows = {tuple(r["sources"]): r for r in affinity_with_intervals(table, 60, seed=1).to_pylist()}
    assert rows[("a",)]["p_below_random"] == 0.0 and rows[("a",)]["p_no_gain"] == 1.0
    no_pixels = _table({"t": {"self": [base - 0.5], "a": [base]}})
    row = affinity_with_intervals(no_pixels, 10, seed=1).to_pylist()[0]
    assert np.isnan(row["p_no_gain"]) and np.isnan(row["p_below_random"])


def test_predictive_draws_have_the_estimate_as_mean_and_twice_the_bootstrap_variance():
    """A rerun's estimate differs from this one by both studies' errors: the draws the shares are
    read from spread twice as far (in variance) as the bootstrap's, around the same estimate."""
    from components.resampling import predictive_wins

    rng = np.random.default_rng(0)
    point = np.array([[0.5, 0.6], [0.4, 0.5]])
    deviation = rng.normal(0, 0.03, 4000)  # the bootstrap's, well inside [0, 1]
    resamples = np.tile(point, (4000, 1, 1))
    resamples[:, 0, 1] += deviation
    resamples[:, 1, 0] -= deviation
    ahead = predictive_wins(point, resamples)
    assert ahead[:, 0, 1].mean() == pytest.approx(0.6, abs=0.003)
    assert ahead[:, 0, 1].var() / resamples[:, 0, 1].var() == pytest.approx(2.0, rel=0.1)
    np.testing.assert_allclose(ahead[:, 1, 0], 1 - ahead[:, 0, 1])  # W_ji = 1 - W_ij kept
    assert (ahead[:, 0, 0] == 0.5).all()
    assert ahead.min() >= 0 and ahead.max() <= 1


@pytest.mark.parametrize("paired", [True, False])
def test_a_candidate_trained_once_borrows_the_training_noise_the_others_measured(paired):
    """Racing leaves candidates at one replicate (and `self` has one where networks are not
    replicated). Its own training noise is unseen, so it must borrow its target's: candidate b of
    a planted study cut to its replicate 0 should be about as uncertain as with all three. Without
    borrowing its interquartile range was 0.34-0.36 of the three-replicate one (mean over 4
    studies); with it, 1.0-1.1. Bounds 0.6 and 1.6: the four ratios range 0.64-1.74 (one study's
    replicates are 3 draws of a spread), their mean is the test."""
    from components.resampling import unmeasured_shifts

    def spread(study, seed):
        result = cube_affinity(loss_cube(_table(study)), 400, seed=seed, paired=paired)
        row = [tuple(s) for s in result.table["sources"].to_pylist()].index(("b",))
        lo, hi = np.percentile(result.samples[:, row], [25, 75])
        return hi - lo

    ratios = []
    for seed in range(4):
        study = _noisy_study(3, images=600, seed=seed)
        once = {"t": {**study["t"], "b": study["t"]["b"][:1]}}
        ratios.append(spread(once, seed) / spread(study, seed))
    assert 0.6 <= np.mean(ratios) <= 1.6, ratios
    deviation = np.random.default_rng(0).normal(size=(50, 4, 4))
    assert not unmeasured_shifts(deviation, np.array([3, 3, 2, 3]), 0, "t").any()  # all measured
    assert not unmeasured_shifts(deviation, np.array([1, 1, 1, 1]), 0, "t").any()  # none: nothing seen
    moved = unmeasured_shifts(deviation, np.array([3, 1, 3, 3]), 0, "t")
    assert moved[:, 1].std() > 0 and not np.delete(moved, 1, axis=1).any()
