"""`components.position`: nearest tasks, what the roots serve, the model's transfer (hand-worked)."""

import math

import pyarrow as pa
import pytest

from components.position import (
    Candidate,
    candidates_of,
    choose_model,
    first_order_columns,
    nearest_tasks,
    root_service,
    split_test_images,
)

pytestmark = pytest.mark.numerics  # CI runs these again under another CPU kernel path

NAN = float("nan")


def cand(sources, affinity, p_best=NAN, gain=0.5):
    return Candidate(tuple(sources), affinity, NAN, NAN, p_best, gain, 0.5, NAN)


def test_nearest_tasks_rank_by_spearman_over_shared_sources():
    study = {
        # ranks a > b > c > d: the same order as the new task's
        "alike": {"a": 0.4, "b": 0.3, "c": 0.2, "d": 0.1},
        # the reverse order: rho -1
        "opposite": {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4},
        # shares only 2 sources with the new task (itself is never its own source): not compared
        "few": {"a": 0.5, "b": 0.5},
        "new": {"a": 0.9, "b": 0.8, "c": 0.7},  # the new task itself, where the study has it
    }
    new = {"a": 0.5, "b": 0.25, "c": 0.15, "d": 0.1}
    near = nearest_tasks(study, new, exclude=["new"])
    assert [t for t, _ in near] == ["alike", "opposite"]
    assert near[0][1] == pytest.approx(1.0) and near[1][1] == pytest.approx(-1.0)


def test_nearest_tasks_leave_out_the_targets_own_column_entry():
    """A study target's column has no entry for itself; the new task's column has every study
    task. Only sources in both are compared, never the target as a source of itself."""
    study = {"t": {"a": 0.3, "b": 0.2, "c": 0.1}}
    new = {"a": 0.1, "b": 0.2, "c": 0.3, "t": 0.9}
    assert nearest_tasks(study, new) == [("t", pytest.approx(-1.0))]


def test_root_service_and_one_more_root():
    cands = [
        cand(["a"], 0.30),
        cand(["b"], 0.20),
        cand(["a", "c"], 0.45),
        cand(["d"], 0.35),
        cand(["random"], 0.50),  # a baseline never serves
    ]
    base, more = root_service(cands, roots=["a", "b"], tasks=["a", "b", "c", "d"])
    assert base.sources == ("a",)
    # c with a gives 0.45 (+0.15); d alone 0.35 (+0.05)
    assert [(t, c.sources, round(g, 6)) for t, c, g in more] == [("c", ("a", "c"), 0.15), ("d", ("d",), 0.05)]


def test_root_service_without_a_usable_candidate():
    base, more = root_service([cand(["c"], 0.2)], roots=["a"], tasks=["a", "c"])
    assert base is None and more[0][0] == "c" and more[0][2] == pytest.approx(0.2)


def test_the_model_is_chosen_on_validation_losses_the_fewest_sources_among_equals():
    cands = [cand(["a", "b"], 0.40), cand(["a"], 0.38), cand(["c"], 0.1), cand(["scratch"], 0.5)]
    # the highest affinity (test images) does not choose: the validation loss does
    assert choose_model(cands, {("a", "b"): 0.30, ("a",): 0.50, ("c",): 0.20}).sources == ("c",)
    # within 1% of the lowest, the fewer sources
    assert choose_model(cands, {("a", "b"): 0.300, ("a",): 0.302, ("c",): 0.9}).sources == ("a",)
    assert choose_model(cands, {("a", "b"): 0.300, ("a",): 0.31, ("c",): 0.9}).sources == ("a", "b")
    assert choose_model(cands, {("a", "b"): float("nan"), ("a",): 0.4}).sources == (
        "a",
    )  # no score, no choice
    with pytest.raises(ValueError):
        choose_model([cand(["scratch"], 0.5)], {("scratch",): 0.1})


def test_candidates_and_columns_from_an_affinity_table():
    table = pa.table(
        {
            "target": ["x", "x", "x", "y"],
            "sources": [["a"], ["random"], ["a", "b"], ["a"]],
            "order": [1, 1, 2, 1],
            "affinity": [0.5, 0.2, 0.3, 0.7],
            "quality": [NAN] * 4,
            "gain": [0.9, 0.4, 0.8, 0.6],
            "vs_random": [0.7, 0.5, 0.6, 0.6],
        }
    )
    got = candidates_of(table, "x")
    assert [c.sources for c in got] == [("a",), ("a", "b"), ("random",)]
    assert got[2].is_baseline and not got[0].is_baseline and math.isnan(got[0].p_best)
    assert first_order_columns(table) == {"x": {"a": 0.5}, "y": {"a": 0.7}}


def test_a_model_is_chosen_on_one_half_of_the_test_images_and_reported_on_the_other():
    ids = [f"img{i:03d}" for i in range(11)]
    pick, report = split_test_images(ids)
    assert len(pick) == 6 and len(report) == 5 and not pick & report and pick | report == set(ids)
    assert split_test_images(reversed(ids)) == (pick, report)  # by id, not by order: any process
    assert pick != frozenset(sorted(ids)[:6])  # not the first ids: a hash, so no ordering bias
    # the halves are stable as images are added: most of a half stays in it
    more_pick, _ = split_test_images([*ids, *(f"new{i}" for i in range(3))])
    assert len(pick & more_pick) >= 4
