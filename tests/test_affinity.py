"""Stage III: win rates, the AHP Perron vector, and the affinity table from per-image losses."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

import components.affinity as affinity
import components.affinity_io as affinity_io
from components.affinity import affinity_by_target, compute_affinity, top_sources
from components.affinity_io import read_affinities, read_losses, write_affinity
from components.ahp import ahp_affinity, perron_vector
from components.bootstrap import candidate_mask
from components.errors import TaskatlasError
from components.loss_cube import loss_cube, unlabelled_counts
from components.taxonomy import TaxonomyOptions, solve_taxonomy
from components.win_rates import win_rates
from tests.conftest import affinity_with_intervals, bootstrap_affinities

pytestmark = pytest.mark.numerics  # CI runs these again under another CPU kernel path


def _losses(per_target: dict[str, dict[str, list[float]]], image_offset: int = 0) -> pa.Table:
    """{target: {"a+b": [loss per image]}} -> the long loss table."""
    rows = [
        (target, sources, image_offset + i, loss)
        for target, by_source in per_target.items()
        for sources, losses in by_source.items()
        for i, loss in enumerate(losses)
    ]
    return pa.table(
        {
            "target": [r[0] for r in rows],
            "sources": [r[1] for r in rows],
            "image_id": [r[2] for r in rows],
            "loss": [float(r[3]) for r in rows],
        }
    )


def _by_sources(table: pa.Table, target: str) -> dict[str, dict]:
    return {"+".join(r["sources"]): r for r in table.to_pylist() if r["target"] == target}


def test_perron_vector_recovers_a_consistent_matrix():
    v = np.array([0.5, 0.2, 0.2, 0.1])
    ratios = v[:, None] / v[None, :]
    np.testing.assert_allclose(perron_vector(ratios), v, rtol=1e-12)
    batch = np.stack([ratios, np.eye(4)])  # vectorized over targets
    np.testing.assert_allclose(perron_vector(batch)[0], v, rtol=1e-12)


def test_ahp_on_consistent_win_rates_recovers_the_weights():
    v = np.array([0.4, 0.3, 0.2, 0.1])
    wins = v[:, None] / (v[:, None] + v[None, :])  # then W / W^T = v_i / v_j exactly
    affinity = ahp_affinity(wins[None], np.ones((1, 4), dtype=bool))[0]
    np.testing.assert_allclose(affinity, v, rtol=1e-12)


def test_ties_count_half():
    losses = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0], [1.0, 0.0, 0.0, 0.0]])
    wins = win_rates(losses, np.ones((1, 4)))[0]  # one weight vector: every image once
    assert wins[0, 1] == pytest.approx((0.5 + 1 + 0 + 0.5) / 4)
    assert wins[0, 1] + wins[1, 0] == pytest.approx(1.0)
    assert wins[2, 0] == pytest.approx((0.5 + 1 + 1 + 1) / 4)
    np.testing.assert_array_equal(np.diag(wins), 0.5)


def test_clipping_keeps_a_total_win_finite():
    wins = np.array([[[0.5, 1.0], [0.0, 0.5]]])
    affinity = ahp_affinity(wins, np.ones((1, 2), dtype=bool))[0]
    np.testing.assert_allclose(affinity, [0.999, 0.001])  # W clipped to [0.001, 0.999]


def test_strict_per_image_dominance_orders_the_affinities():
    rng = np.random.default_rng(0)
    base = rng.random(30)
    table = _losses(
        {"t": {"self": base, "a": base + 1, "b+c": base + 2, "random": base + 3, "pixels": base + 2.5}}
    )
    rows = _by_sources(compute_affinity(table), "t")
    assert (
        rows["self"]["affinity"]
        > rows["a"]["affinity"]
        > rows["b+c"]["affinity"]
        > rows["random"]["affinity"]
    )
    assert "pixels" not in rows  # the gain reference, not a candidate
    assert sum(r["affinity"] for r in rows.values()) == pytest.approx(1.0)
    assert rows["a"]["quality"] == 0.0 and rows["self"]["quality"] == 0.5
    assert rows["a"]["gain"] == 1.0 and rows["random"]["gain"] == 0.0
    assert rows["b+c"]["order"] == 2 and rows["b+c"]["sources"] == ["b", "c"]


def test_affinities_sum_to_one_per_target_and_padding_is_harmless():
    """Targets with different numbers of candidates and images, computed together and alone."""
    rng = np.random.default_rng(1)
    per_target = {
        "x": {s: rng.random(12) for s in ("self", "random", "a", "b", "a+b")},
        "y": {s: rng.random(7) for s in ("self", "a", "x")},
    }
    together = compute_affinity(_losses(per_target))
    sums = {}
    for r in together.to_pylist():
        sums[r["target"]] = sums.get(r["target"], 0.0) + r["affinity"]
    assert sums == {"x": pytest.approx(1.0), "y": pytest.approx(1.0)}
    for target in per_target:
        alone = compute_affinity(_losses({target: per_target[target]}))
        for key, row in _by_sources(alone, target).items():
            assert _by_sources(together, target)[key]["affinity"] == pytest.approx(row["affinity"], rel=1e-10)
    assert all(np.isnan(r["gain"]) for r in together.to_pylist())  # no pixels measured


def test_a_source_set_given_in_two_orders_is_one_source_set():
    rng = np.random.default_rng(2)
    losses = {s: rng.random(10) for s in ("self", "a", "a+b")}
    reference = _by_sources(compute_affinity(_losses({"t": losses})), "t")
    rows = _losses({"t": losses}).to_pylist()
    for i, row in enumerate(rows):
        if row["sources"] == "a+b" and i % 2:
            row["sources"] = "b+a"
    mixed = _by_sources(compute_affinity(pa.Table.from_pylist(rows)), "t")
    assert mixed.keys() == reference.keys()
    assert mixed["a+b"]["affinity"] == pytest.approx(reference["a+b"]["affinity"])


def test_list_column_and_csv_inputs(tmp_path):
    rng = np.random.default_rng(3)
    table = _losses({"t": {s: rng.random(6) for s in ("self", "a", "b+a")}})
    as_lists = table.set_column(
        1, "sources", pa.array([s.split("+") for s in table["sources"].to_pylist()], pa.list_(pa.string()))
    )
    pq.write_table(as_lists, tmp_path / "losses.parquet")
    pacsv.write_csv(table, tmp_path / "losses.csv")
    from_parquet = compute_affinity(read_losses(tmp_path / "losses.parquet"))
    from_csv = compute_affinity(read_losses(tmp_path / "losses.csv"))
    no_reference = ["gain", "vs_random"]  # NaN: neither pixels nor random was measured
    assert from_parquet.drop_columns(no_reference).equals(from_csv.drop_columns(no_reference))
    assert _by_sources(from_parquet, "t").keys() == {"self", "a", "a+b"}


def test_missing_image_names_the_target_and_source_set():
    table = _losses({"t": {"self": [1, 2, 3], "a": [1, 2, 3], "b+c": [1, 2]}})
    with pytest.raises(TaskatlasError, match=r"t <- b\+c: losses for 2 of the target's 3 test images"):
        compute_affinity(table)


def test_duplicate_loss_and_missing_self_are_errors():
    rows = _losses({"t": {"self": [1, 2], "a+b": [1, 2]}}).to_pylist()
    rows.append({**rows[-1], "sources": "b+a"})  # image 1 of a+b again, in the other order
    with pytest.raises(TaskatlasError, match=r"t <- a\+b: image 1 has 2 losses"):
        compute_affinity(pa.Table.from_pylist(rows))
    with pytest.raises(TaskatlasError, match="no 'self' losses"):
        compute_affinity(_losses({"t": {"a": [1, 2]}}))
    with pytest.raises(TaskatlasError, match="must be finite"):
        compute_affinity(_losses({"t": {"self": [1, float("inf")]}}))
    with pytest.raises(TaskatlasError, match=r"loss of t <- a on image 1 is NaN while other candidates"):
        compute_affinity(_losses({"t": {"self": [1, 2], "a": [1, float("nan")]}}))
    with pytest.raises(TaskatlasError, match="target t has no test image with a valid label"):
        compute_affinity(_losses({"t": {"self": [float("nan")], "a": [float("nan")]}}))


def test_an_image_without_a_valid_label_is_left_out_of_the_win_rates_and_counted():
    nan = float("nan")
    labelled = {"self": [1.0, 3.0, 2.0], "a": [2.0, 1.0, 1.0], "b": [3.0, 2.0, 3.0]}
    with_hole = {k: [*v[:1], nan, *v[1:]] for k, v in labelled.items()}  # image 1: no label
    cube = loss_cube(_losses({"t": with_hole, "u": labelled}))
    assert cube.unlabelled.tolist() == [1, 0] and cube.n_images.tolist() == [3, 3]
    expected = compute_affinity(_losses({"t": labelled}))
    got = compute_affinity(_losses({"t": with_hole}))
    np.testing.assert_allclose(got["affinity"].to_numpy(), expected["affinity"].to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(got["quality"].to_numpy(), expected["quality"].to_numpy(), rtol=1e-12)


def test_affinity_parquet_feeds_the_solver(tmp_path):
    rng = np.random.default_rng(4)
    per_target = {
        "a": {s: rng.random(20) for s in ("self", "b", "c", "b+c", "random")},
        "b": {s: rng.random(20) for s in ("self", "a", "c", "random")},
        "c": {"self": rng.random(20) + 1.0, "a": rng.random(20), "b": rng.random(20) + 2.0},
    }
    path = tmp_path / "affinity.parquet"
    write_affinity(compute_affinity(_losses(per_target)), path)
    table = read_affinities(path)
    assert set(table.tasks) == {"a", "b", "c"}  # `random` is a baseline: an AHP candidate, never a task
    taxonomy = solve_taxonomy(table, TaxonomyOptions(budget=1, max_order=2))
    assert len(taxonomy.roots) == 1
    assert set(taxonomy.transfers) | set(taxonomy.roots) >= {"a", "b", "c"} - {"random"}


def test_top_sources_rank_candidates_other_than_self_and_the_targets_own_encoder():
    table = compute_affinity(
        _losses({"t": {"self": [1, 1, 1], "a": [2, 2, 2], "b": [3, 0, 0], "a+b": [4, 4, 4], "t": [0, 0, 0]}})
    )
    best = top_sources(table, 2)["t"]  # t <- t would lead: it is no transfer the taxonomy may choose
    assert [s for s, _ in best] == [("b",), ("a",)] and best[0][1] > best[1][1]


def _assert_same_table(got: pa.Table, want: pa.Table) -> None:
    """Same schema and values, NaN equal to NaN (gain is NaN without pixels)."""
    assert got.schema == want.schema
    for name in want.column_names:
        if pa.types.is_floating(want[name].type):
            np.testing.assert_array_equal(got[name].to_numpy(), want[name].to_numpy())
        else:
            assert got[name].equals(want[name]), name


def _study(rng: np.random.Generator) -> pa.Table:
    """Four targets with different candidates and image counts; ties, pixels, an unlabelled image."""
    per_target = {
        "a": {s: rng.integers(0, 4, 30).astype(float) for s in ("self", "random", "pixels", "b", "c", "b+c")},
        "b": {s: rng.random(12) for s in ("self", "a", "c")},
        "c": {s: rng.integers(0, 3, 25).astype(float) for s in ("self", "random", "a", "b", "a+b", "a+b+d")},
        "d": {s: rng.random(9) for s in ("self", "pixels", "a")},
    }
    for losses in per_target["c"].values():
        losses[3] = np.nan  # image 3 has no valid label for c
    return _losses(per_target)


def _split(table: pa.Table, calls: list[str] | None = None):
    """read_target over one table: each target's rows, fresh on every call; records the calls."""

    def read_target(target: str) -> pa.Table:
        if calls is not None:
            calls.append(target)
        return table.filter(pc.equal(table["target"], target))

    return read_target


@pytest.mark.parametrize("bootstrap", [0, 7])
def test_per_target_streaming_equals_the_whole_table(bootstrap):
    table = _study(np.random.default_rng(6))
    calls: list[str] = []
    result = affinity_by_target(["d", "b", "c", "a"], _split(table, calls), bootstrap, seed=4)
    # each target read once, in the table's order; with a bootstrap and no image ids given, a first
    # pass reads each target for its image ids (the resamples' image weights are over the study's)
    assert calls == ["a", "b", "c", "d"] * (2 if bootstrap else 1)
    cube = loss_cube(table)
    assert result.unlabelled == unlabelled_counts(cube) == {"c": 1}
    if bootstrap == 0:
        _assert_same_table(result.table, compute_affinity(table))
        assert result.samples is None
        return
    _assert_same_table(result.table, affinity_with_intervals(table, bootstrap, seed=4))
    t, c = np.nonzero(candidate_mask(cube))  # the table's rows, in order
    whole = bootstrap_affinities(cube, bootstrap, seed=4)
    assert result.samples.shape == (bootstrap, result.table.num_rows)
    np.testing.assert_array_equal(result.samples, whole[:, t, c])
    lo, hi = np.percentile(result.samples, (2.5, 97.5), axis=0)
    np.testing.assert_array_equal(result.table["affinity_lo"].to_numpy(), lo)
    np.testing.assert_array_equal(result.table["affinity_hi"].to_numpy(), hi)
    calls.clear()
    given = affinity_by_target(["a", "b", "c", "d"], _split(table, calls), bootstrap, 4, cube.image_ids)
    assert calls == ["a", "b", "c", "d"]  # the study's image ids given: one read per target
    np.testing.assert_array_equal(given.samples, result.samples)  # deterministic per seed
    _assert_same_table(given.table, result.table)
    wider = [*cube.image_ids, "zz-not-in-any-table"]  # a test image no target has: other weights
    assert not np.array_equal(
        affinity_by_target(["a"], _split(table), bootstrap, 4, wider).samples,
        result.samples[:, : len(_by_sources(result.table, "a"))],
    )


def test_per_target_streaming_holds_one_target_at_a_time(monkeypatch):
    """When a target is read, nothing of the previous one is alive: neither its table nor its cube."""
    table = _study(np.random.default_rng(7))
    read = _split(table)
    alive: list[weakref.ref] = []

    def read_target(target: str) -> pa.Table:
        gc.collect()
        assert all(ref() is None for ref in alive), "the previous target's losses are still held"
        rows = read(target)
        alive.append(weakref.ref(rows))
        return rows

    def recorded_cube(rows: pa.Table):
        cube = loss_cube(rows)
        alive.append(weakref.ref(cube))
        return cube

    monkeypatch.setattr(affinity, "loss_cube", recorded_cube)
    affinity_by_target(["a", "b", "c", "d"], read_target, bootstrap=3)
    assert len(alive) == 12  # the first pass (image ids) reads 4 tables, then 4 tables and 4 cubes


def test_per_target_streaming_errors_name_the_targets():
    table = _study(np.random.default_rng(8))
    read = _split(table)
    with pytest.raises(TaskatlasError, match=r"loss table read for target a has rows of target\(s\) a, b"):
        affinity_by_target(["a", "b"], lambda t: pa.concat_tables([read("a"), read("b")]))
    with pytest.raises(TaskatlasError, match="target a: its loss table has no rows"):
        affinity_by_target(["a"], lambda t: read(t).slice(0, 0))
    with pytest.raises(TaskatlasError, match="expected distinct target names"):
        affinity_by_target(["a", "a"], read)
    without_self = table.filter(pc.invert(pc.equal(table["sources"], "self")))
    with pytest.raises(TaskatlasError, match=r"target\(s\) a, b have no 'self' losses"):
        affinity_by_target(["a", "b"], _split(without_self))
    one_image = _losses({"x": {"self": [1.0], "a": [2.0]}, "y": {"self": [1.0, 2.0], "a": [2.0, 1.0]}})
    with pytest.raises(TaskatlasError, match=r"cannot bootstrap target\(s\) x:"):
        affinity_by_target(["x", "y"], _split(one_image), bootstrap=5)
    with pytest.raises(TaskatlasError, match="must be an integer >= 0"):
        affinity_by_target(["a"], read, bootstrap=-1)


def test_weighted_win_rates_are_exact_counts():
    """float32 sums against a float64 reference, ties included; huge weights take float64."""
    rng = np.random.default_rng(9)
    losses = rng.integers(0, 4, (6, 50)).astype(float)
    losses[0, :5] = np.nextafter(losses[1, :5], np.inf)  # tells apart values float32 would merge
    for weights in (rng.integers(0, 5, (4, 50)), np.full((1, 50), 2**20)):  # total 50 * 2**20 > 2**24
        a, b = losses[:, None, :], losses[None, :, :]
        outcome = (a < b) + 0.5 * (a == b)  # (n, n, m)
        expected = (
            np.einsum("km,ijm->kij", weights.astype(float), outcome) / weights.sum(axis=1)[:, None, None]
        )
        diagonal = np.arange(6)
        expected[:, diagonal, diagonal] = 0.5
        np.testing.assert_array_equal(win_rates(losses, weights), expected)
    assert win_rates(losses[:2, :5], np.ones((1, 5)))[0, 1, 0] == 1.0  # not ties, as in float32


def test_dictionary_columns_as_parquet_readers_give_them(tmp_path):
    """read_losses reads target and image_id as dictionaries; a filtered dictionary column keeps
    values it no longer uses, and list elements may be dictionaries too: same answer."""
    table = _study(np.random.default_rng(10))
    table = table.set_column(2, "image_id", pc.cast(table["image_id"], pa.string()))
    sources = pa.array([s.split("+") for s in table["sources"].to_pylist()], pa.list_(pa.string()))
    pq.write_table(table.set_column(1, "sources", sources), tmp_path / "losses.parquet")
    expected = compute_affinity(table)
    read = read_losses(tmp_path / "losses.parquet")
    assert pa.types.is_dictionary(read.schema.field("target").type)
    _assert_same_table(compute_affinity(read), expected)
    every = pq.read_table(
        tmp_path / "losses.parquet", read_dictionary=["target", "image_id", "sources.list.element"]
    )
    by_target = affinity_by_target(["a", "b", "c", "d"], _split(every))
    _assert_same_table(by_target.table, expected)
    joined = table.set_column(1, "sources", pc.dictionary_encode(table["sources"]))  # "+"-joined
    _assert_same_table(compute_affinity(joined), expected)


def test_source_sets_from_dictionary_encoded_lists_equal_the_joined_strings():
    """Parquet's dictionary-encoded list elements are read by their codes (no string per row):
    unordered, repeated names, several chunks with their own dictionaries, a sliced chunk."""
    as_lists = pa.list_(pa.string())
    encoded = pa.list_(pa.dictionary(pa.int32(), pa.string()))
    column = pa.chunked_array(
        [
            pa.array([["b", "a"], ["a"], ["a", "a"], ["c", "b", "a"]], as_lists).cast(encoded),
            pa.array([["x", "y"], ["a"], ["b", "a"], ["random"]], as_lists).slice(1).cast(encoded),
        ]
    )
    codes, sets = affinity_io.source_sets(column)
    assert sets == [("a",), ("a", "b"), ("a", "b", "c"), ("random",)]
    assert codes.tolist() == [1, 0, 0, 2, 0, 1, 3]
    plain = affinity_io.source_sets(column.cast(as_lists))
    assert plain[1] == sets and plain[0].tolist() == codes.tolist()
    with pytest.raises(TaskatlasError, match="empty source set"):  # the general path decides
        affinity_io.source_sets(pa.array([["a"], []], as_lists).cast(encoded))


def test_a_loss_file_reads_one_target_by_its_row_groups(tmp_path):
    table = _study(np.random.default_rng(11))
    joined = table.set_column(2, "image_id", pc.cast(table["image_id"], pa.string()))  # "+"-joined sources
    pq.write_table(joined, tmp_path / "losses.parquet", row_group_size=40)
    losses = affinity_io.LossFile(tmp_path / "losses.parquet")
    assert losses.targets == ["a", "b", "c", "d"]
    assert losses.read_target("b").num_rows == 36 and set(losses.read_target("b")["target"].to_pylist()) == {
        "b"
    }
    assert losses.image_ids() == sorted(str(i) for i in range(30))
    result = affinity_by_target(losses.targets, losses.read_target, 5, 1, losses.image_ids())
    _assert_same_table(result.table, affinity_with_intervals(joined, 5, seed=1))
