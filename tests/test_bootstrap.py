"""The bootstrap over test images (design.md section 10): intervals, taxonomy stability, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import components.win_rates as win_rates
from components.affinity import (
    AFFINITY_SCHEMA,
    INTERVAL_COLUMNS,
    INTERVAL_SCHEMA,
    affinity_from_cube,
    compute_affinity,
)
from components.affinity_io import transfer_table
from components.bootstrap import candidate_mask, resample_weights, stability_of_rows
from components.errors import TaskatlasError
from components.loss_cube import loss_cube
from components.taxonomy import TaxonomyOptions, solve_taxonomy
from pipelines.cli import main
from tests.conftest import affinity_with_intervals, assert_same_table, bootstrap_affinities

pytestmark = pytest.mark.numerics  # CI runs these again under another CPU kernel path

N_IMAGES = 200


def _losses(per_target: dict[str, dict[str, list[float]]]) -> pa.Table:
    """{target: {"a+b": [loss per image]}} -> the long loss table (image ids img000, img001, ...)."""
    rows = [
        {"target": target, "sources": sources.split("+"), "image_id": f"img{i:03d}", "loss": float(loss)}
        for target, by_source in per_target.items()
        for sources, losses in by_source.items()
        for i, loss in enumerate(losses)
    ]
    return pa.Table.from_pylist(rows)


def _edge_and_coin() -> pa.Table:
    """Target x: `a` beats `b` on 95% of images. Target y: `c` or `d` wins by a coin flip.

    `self` loses everywhere, so with budget 2 the taxonomy is roots {a, c|d}: x <- a, y <- c|d.
    """
    a_wins = np.arange(N_IMAGES) < 0.95 * N_IMAGES
    coin = np.random.default_rng(2).random(N_IMAGES) < 0.5
    assert coin.mean() != 0.5  # the point estimate must prefer one of c, d
    worst = np.full(N_IMAGES, 10.0)
    return _losses(
        {
            "x": {"self": worst, "a": np.where(a_wins, 1.0, 3.0), "b": np.full(N_IMAGES, 2.0)},
            "y": {"self": worst, "c": np.where(coin, 1.0, 2.0), "d": np.where(coin, 2.0, 1.0)},
        }
    )


@pytest.fixture
def mixed_losses() -> pa.Table:
    """Three targets, list-valued sources of orders 1 and 2, random, pixels; random losses."""
    rng = np.random.default_rng(0)
    candidates = {
        "a": ["self", "b", "c", "b+c", "random", "pixels"],
        "b": ["self", "a", "c", "random", "pixels"],
        "c": ["self", "a", "b", "a+b"],
    }
    return _losses(
        {t: {s: rng.random(40) + 0.1 * k for k, s in enumerate(sets)} for t, sets in candidates.items()}
    )


def test_a_clear_edge_is_stable_and_a_coin_flip_splits():
    cube = loss_cube(_edge_and_coin())
    options = TaxonomyOptions(budget=2, max_order=1)
    chosen = solve_taxonomy(transfer_table(affinity_from_cube(cube)), options)
    coin_winner = chosen.transfers["y"][0]
    assert chosen.roots == tuple(sorted(("a", coin_winner))) and chosen.transfers["x"] == ("a",)

    t, c = np.nonzero(candidate_mask(cube))  # the affinity table's rows
    targets, sources = [cube.targets[i] for i in t], [cube.source_sets[i] for i in cube.candidates[t, c]]
    samples = bootstrap_affinities(cube, 200, seed=0)[:, t, c]
    stability = stability_of_rows(targets, sources, samples, options, chosen)
    assert set(stability) == {"roots", "transfers", "taxonomy"}
    assert stability["transfers"]["x"]["a"] >= 0.95 and stability["roots"]["a"] >= 0.95
    y = stability["transfers"]["y"]
    assert set(y) == {"c", "d"} and sum(y.values()) == pytest.approx(1.0)
    assert 0.2 < y["c"] < 0.8 and 0.2 < y["d"] < 0.8  # a split, neither near 1
    assert stability["roots"]["c"] == y["c"] and stability["roots"]["d"] == y["d"]
    # x always takes a, so the whole taxonomy comes back exactly when y's coin lands the same way
    assert stability["taxonomy"] == y[coin_winner]
    assert list(y.values()) == sorted(y.values(), reverse=True)  # most frequent first


def test_intervals_bracket_the_point_estimate(mixed_losses):
    for losses in (mixed_losses, _edge_and_coin()):
        table = affinity_with_intervals(losses, 200, seed=0)
        assert table.column_names == INTERVAL_SCHEMA.names
        assert_same_table(table.select(AFFINITY_SCHEMA.names), compute_affinity(losses))
        point, lo, hi = (table[c].to_numpy() for c in ("affinity", *INTERVAL_COLUMNS))
        assert (lo <= point).all() and (point <= hi).all() and (lo < hi).any()


def test_a_candidate_that_always_wins_has_a_zero_width_interval():
    # every image ranks self < a < random, so every resample has the same win rates
    losses = _losses({"t": {"self": np.arange(5.0), "a": np.arange(5.0) + 10, "random": np.full(5, 99.0)}})
    cube = loss_cube(losses)
    t, c = np.nonzero(candidate_mask(cube))
    lo, hi = np.percentile(bootstrap_affinities(cube, 50, seed=0)[:, t, c], (2.5, 97.5), axis=0)
    point = compute_affinity(losses)["affinity"].to_numpy()
    np.testing.assert_allclose(lo, point, rtol=1e-12)
    np.testing.assert_allclose(hi, point, rtol=1e-12)


@pytest.mark.parametrize(
    ("per_target", "named"),
    [
        ({"x": {"self": [1.0], "a": [2.0]}, "y": {"self": [1.0], "a": [2.0]}}, "x, y"),
        ({"x": {"self": [1.0, 2.0], "a": [2.0, 1.0]}, "y": {"self": [1.0], "a": [2.0]}}, "y"),
        # two test images, one of them without a valid label: one labelled image left
        ({"x": {"self": [1.0, np.nan], "a": [2.0, np.nan]}}, "x"),
    ],
)
def test_a_target_with_one_labelled_image_is_refused(per_target, named):
    with pytest.raises(TaskatlasError, match=f"cannot bootstrap target\\(s\\) {named}:") as err:
        affinity_with_intervals(_losses(per_target), 10, seed=0)
    assert "\n" not in str(err.value)


def test_weighted_counts_equal_a_brute_force_resample(monkeypatch):
    """Duplicate each image as often as its multinomial count, then run the plain Stage III."""
    rng = np.random.default_rng(5)
    m = 7
    y_losses = {s: rng.integers(0, 3, m).astype(float) for s in ("self", "a", "random")}
    for losses in y_losses.values():
        losses[4] = np.nan  # image 4 has no valid label for y
    table = _losses(
        {
            "x": {s: rng.integers(0, 3, m).astype(float) for s in ("self", "a", "b", "a+b", "pixels")},
            "y": y_losses,
        }
    )
    cube = loss_cube(table)
    n, seed = 6, 3
    weights = list(resample_weights(cube, n, seed))
    samples = bootstrap_affinities(cube, n, seed)
    # One count vector per resample over the study's images, shared by both targets (the images
    # are the same images): x, labelled everywhere, gets all m draws; y the same counts, except on
    # its unlabelled image 4, which counts nowhere for y (its rows sum to less than m).
    assert weights[0].sum(axis=1).tolist() == [m] * n
    np.testing.assert_array_equal(weights[1], np.where(np.arange(m) == 4, 0, weights[0]))

    rows = table.to_pylist()
    for b in range(n):
        duplicated = [
            dict(row, image_id=f"{row['image_id']}-{k}")
            for row in rows
            for k in range(weights[cube.targets.index(row["target"])][b, int(row["image_id"][3:])])
        ]
        brute = compute_affinity(pa.Table.from_pylist(duplicated))
        for row in brute.to_pylist():
            t = cube.targets.index(row["target"])
            c = np.flatnonzero(cube.candidates[t] == cube.source_sets.index(tuple(row["sources"]))).item()
            assert samples[b, t, c] == pytest.approx(row["affinity"], rel=1e-12, abs=1e-15)
    assert (samples[:, ~candidate_mask(cube)] == 0).all()

    np.testing.assert_array_equal(bootstrap_affinities(cube, n, seed), samples)  # same seed, same answer
    assert not np.array_equal(bootstrap_affinities(cube, n, seed + 1), samples)
    monkeypatch.setattr(win_rates, "_CHUNK_ELEMENTS", 5)  # one image per chunk: same answer
    np.testing.assert_allclose(bootstrap_affinities(cube, n, seed), samples, rtol=1e-12)


def test_solve_from_losses_agrees_with_affinity_then_solve(mixed_losses, tmp_path, capsys):
    losses, affinity = tmp_path / "losses.parquet", tmp_path / "affinity.parquet"
    pq.write_table(mixed_losses, losses)
    assert main(["affinity", "--losses", str(losses), "--out", str(affinity)]) == 0
    capsys.readouterr()
    solve = ["solve", "--budget", "2", "--max-order", "2", "--json"]
    assert main([*solve, "--affinities", str(affinity)]) == 0
    from_table = json.loads(capsys.readouterr().out)
    assert main([*solve, "--losses", str(losses)]) == 0
    assert json.loads(capsys.readouterr().out) == from_table

    assert main([*solve, "--losses", str(losses), "--bootstrap", "40", "--seed", "1"]) == 0
    with_stability = json.loads(capsys.readouterr().out)
    stability = with_stability.pop("stability")
    assert with_stability == from_table  # the point estimate does not move
    assert set(stability) == {"resamples", "seed", "roots", "transfers", "taxonomy"}
    assert stability["resamples"] == 40 and stability["seed"] == 1
    assert set(stability["transfers"]) == {"a", "b", "c"}
    for served in stability["transfers"].values():
        assert sum(served.values()) == pytest.approx(1.0)
    assert sum(stability["roots"].values()) == pytest.approx(2.0)  # budget 2, every task costs 1
    assert 0.0 <= stability["taxonomy"] <= 1.0

    assert main([*solve[:-1], "--losses", str(losses), "--bootstrap", "40", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert "stability over 40 resamples of the test images (seed 1): this exact taxonomy in" in text
    assert "  roots: " in text


def test_affinity_bootstrap_writes_the_interval_columns(mixed_losses, tmp_path, capsys):
    losses, out = tmp_path / "losses.parquet", tmp_path / "affinity.parquet"
    pq.write_table(mixed_losses, losses)
    assert (
        main(["affinity", "--losses", str(losses), "--out", str(out), "--bootstrap", "30", "--seed", "2"])
        == 0
    )
    said = capsys.readouterr().out
    assert "95% intervals and p_best over 30 resamples" in said
    assert "training noise not measured" in said  # no replicate column: one replicate per readout
    written = pq.read_table(out)
    assert written.column_names == INTERVAL_SCHEMA.names
    assert_same_table(written, affinity_with_intervals(mixed_losses, 30, seed=2))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["solve", "--budget", "1"], "give exactly one of --affinities FILE and --losses FILE"),
        (["solve", "--budget", "1", "--affinities", "A", "--losses", "L"], "give exactly one of"),
        (["solve", "--budget", "1", "--affinities", "A", "--bootstrap", "5"], "it needs --losses"),
        (["solve", "--sweep", "--losses", "L", "--bootstrap", "5"], "give --budget"),
        (["solve", "--budget", "1", "--losses", "L", "--seed", "3"], "--seed: only used with --bootstrap"),
        (["solve", "--budget", "1", "--losses", "L", "--bootstrap", "0"], "must be >= 1, got 0"),
        (
            ["affinity", "--losses", "L", "--out", "O", "--bootstrap", "5", "--seed", "-1"],
            "--seed: must be >= 0",
        ),
        (["affinity", "--losses", "ONE", "--out", "O", "--bootstrap", "5"], "cannot bootstrap target(s) x:"),
    ],
)
def test_bad_bootstrap_requests_are_one_line_errors(args, message, tmp_path, capsys):
    one_image = tmp_path / "one.parquet"
    pq.write_table(_losses({"x": {"self": [1.0], "a": [2.0]}}), one_image)
    args = [str(one_image) if a == "ONE" else str(tmp_path / a) if a in {"A", "L", "O"} else a for a in args]
    assert main([*args, "--max-order", "1"] if args[0] == "solve" else args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
