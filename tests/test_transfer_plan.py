"""Stage II's plan: a pure function; no Ray, no files."""

from __future__ import annotations

import math

import pytest

from components.errors import ConfigError
from components.transfer import (
    Readout,
    ReadoutKind,
    baseline,
    describe_plan,
    estimate_seconds,
    plan_transfers,
    rank_sources,
)
from pipelines.cli import build_parser
from pipelines.config import load_pipeline_config

SOURCES = (
    "colorization",
    "depth_zbuffer",
    "edge_texture",
    "normal",
    "reshading",
)  # colorization: source-only
TARGETS = ("depth_zbuffer", "edge_texture", "normal", "reshading")


def test_first_order_is_every_source_into_every_target_including_its_own_encoder():
    plan = plan_transfers(TARGETS, SOURCES, orders=(2, 3), beams=(3, 3))
    assert len(plan.first_order) == len(TARGETS) * len(SOURCES)
    assert {(r.target, r.sources) for r in plan.first_order} == {(t, (s,)) for t in TARGETS for s in SOURCES}
    assert all(r.kind is ReadoutKind.TRANSFER and r.order == 1 for r in plan.first_order)
    assert Readout("normal", ("normal",)) in plan.first_order  # its own encoder's transfer


def test_counts_by_order_and_baseline():
    plan = plan_transfers(TARGETS, SOURCES, orders=(2, 3), beams=(3, 4))
    # each target has 4 candidates (every source but itself): C(3,2) pairs, C(4,3) triples
    assert plan.counts() == {
        "order 1": 20,
        "order 2": 4 * math.comb(3, 2),
        "order 3": 4 * math.comb(4, 3),
        "self": 4,
        "pixels": 4,
        "random": 4,
    }
    assert plan.trained == 20 + 12 + 16 + 4 + 4  # `self` is read from Stage I, not trained


def test_beam_is_narrowed_by_the_number_of_candidates():
    plan = plan_transfers(("normal",), ("depth_zbuffer", "normal", "reshading"), orders=(2,), beams=(5,))
    assert plan.higher_order_count("normal", 2) == 1  # only 2 candidates besides normal itself
    target_not_a_source = plan_transfers(("curvature",), ("depth_zbuffer", "normal", "reshading"), (2,), (5,))
    assert target_not_a_source.higher_order_count("curvature", 2) == 3


def test_higher_order_comes_from_the_targets_top_b_first_order_sources():
    plan = plan_transfers(TARGETS, SOURCES, orders=(2, 3), beams=(2, 3))
    losses = {
        "normal": 0.05,
        "reshading": 0.3,
        "depth_zbuffer": 0.1,
        "colorization": 0.9,
        "edge_texture": 0.2,
    }
    higher = plan.higher_order("normal", losses)
    # normal is best but is the target itself: the beam is depth_zbuffer, edge_texture, reshading
    assert [r.sources for r in higher if r.order == 2] == [("depth_zbuffer", "edge_texture")]
    assert [r.sources for r in higher if r.order == 3] == [("depth_zbuffer", "edge_texture", "reshading")]
    assert all(r.target == "normal" and "normal" not in r.sources for r in higher)
    assert len(higher) == plan.higher_order_count("normal", 2) + plan.higher_order_count("normal", 3)


def test_no_target_is_among_its_own_sources_beyond_first_order():
    plan = plan_transfers(TARGETS, SOURCES, orders=(2, 3), beams=(4, 4))
    for t in TARGETS:
        losses = {s: float(i) for i, s in enumerate(SOURCES)}
        for r in plan.higher_order(t, losses):
            assert t not in r.sources
            assert r.sources == tuple(sorted(r.sources))
            assert len(set(r.sources)) == r.order
        assert len(plan.higher_order(t, losses)) == plan.higher_order_count(t, 2) + plan.higher_order_count(
            t, 3
        )


def test_a_failed_first_order_source_is_left_out_of_the_beam():
    plan = plan_transfers(("normal",), SOURCES, orders=(2,), beams=(2,))
    losses = {"reshading": 0.1, "depth_zbuffer": 0.2, "edge_texture": 0.3}  # colorization failed
    assert [r.sources for r in plan.higher_order("normal", losses)] == [("depth_zbuffer", "reshading")]


def test_ranking_breaks_ties_by_name_so_reruns_pick_the_same_beam():
    assert rank_sources({"b": 0.1, "a": 0.1, "c": 0.05}) == ["c", "a", "b"]
    assert rank_sources({"b": 0.1, "a": 0.1}, exclude="a") == ["b"]


def test_baselines_are_named_like_the_loss_table_expects():
    plan = plan_transfers(("normal",), ("normal",), orders=(), beams=(), baselines=(ReadoutKind.PIXELS,))
    assert plan.baselines == (Readout("normal", ("pixels",), ReadoutKind.PIXELS),)
    assert baseline("normal", ReadoutKind.SELF).sources == ("self",)
    assert baseline("normal", ReadoutKind.RANDOM).name == "random->normal"
    assert Readout("normal", ("depth_zbuffer", "reshading")).name == "depth_zbuffer+reshading->normal"
    assert ">" not in Readout("normal", ("reshading",)).file_id


@pytest.mark.parametrize(
    "args",
    [
        {"orders": (2,), "beams": ()},  # one beam per order
        {"orders": (1,), "beams": (3,)},  # first order is always there
        {"orders": (3,), "beams": (2,)},  # beam smaller than order
        {"orders": (2,), "beams": (3,), "baselines": (ReadoutKind.TRANSFER,)},
    ],
)
def test_bad_plan_settings_are_refused(args):
    with pytest.raises(ValueError):
        plan_transfers(TARGETS, SOURCES, **args)


def test_readout_sources_must_be_a_sorted_set():
    with pytest.raises(ValueError):
        Readout("normal", ("reshading", "depth_zbuffer"))
    with pytest.raises(ValueError):
        Readout("normal", ("normal",), ReadoutKind.PIXELS)


def test_the_printed_plan_has_counts_per_order_and_a_time_estimate():
    plan = plan_transfers(TARGETS, SOURCES, orders=(2,), beams=(3,))
    text = describe_plan(plan, seconds_per_readout=10.0, slots=4, stored=6)
    assert "order 1      20 readouts" in text and "order 2      12 readouts" in text
    assert "already stored: 6" in text
    todo = plan.trained - 6  # 20 + 12 + 8 baselines - 6 stored = 34 -> 9 waves of 4 slots
    assert f"estimate: {todo} readouts x 10.0 s on 4 slot(s) ~ 1m30s" in text
    assert estimate_seconds(8, 2.0, 4) == 4.0 and estimate_seconds(9, 2.0, 4) == 6.0


def test_transfer_config_loads_from_overrides_and_names_bad_fields():
    cfg = load_pipeline_config(
        None, ["transfer.orders=[2]", "transfer.beams=[5]", "transfer.baselines=[self]"]
    )
    assert cfg.transfer.orders == (2,) and cfg.transfer.beams == (5,)
    assert cfg.transfer.baselines == (ReadoutKind.SELF,)
    for override, field in (
        ("transfer.beams=[4,4]", "transfer.beams"),
        ("transfer.gpus_per_readout=2", "transfer.gpus_per_readout"),
        ("transfer.epochs=0", "transfer.epochs"),
        ("transfer.targets=[nope]", "transfer.targets"),
        ("transfer.baselines=[transfer]", "transfer.baselines"),
    ):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_pipeline_config(None, [override])


def test_orders_the_taxonomy_can_never_use_are_refused_and_the_defaults_agree():
    cfg = load_pipeline_config(None, [])
    assert max(cfg.transfer.orders) == cfg.taxonomy.max_order
    with pytest.raises(ConfigError, match=r"^transfer\.orders: order-3 readouts .* taxonomy\.max_order is 2"):
        load_pipeline_config(None, ["transfer.orders=[2,3]", "transfer.beams=[4,4]"])
    cfg = load_pipeline_config(
        None, ["transfer.orders=[2,3]", "transfer.beams=[4,4]", "taxonomy.max_order=3"]
    )
    assert cfg.transfer.orders == (2, 3)


def test_the_transfer_command_is_registered_with_config_overrides_and_tasks():
    args = build_parser().parse_args(
        ["transfer", "-c", "x.yaml", "--set", "transfer.epochs=2", "--tasks", "normal"]
    )
    assert (args.config, args.overrides, args.tasks) == ("x.yaml", ["transfer.epochs=2"], "normal")
