"""Readout replicates, beams that don't depend on luck, and the verdict (design.md section 10):
pure functions, against hand-worked answers."""

from __future__ import annotations

import numpy as np
import pytest

from components.answer import Stability, Verdict
from components.taxonomy import Taxonomy
from components.transfer.beams import beam, beam_availability
from components.transfer.plan import (
    Pairing,
    Readout,
    ReadoutKind,
    baseline,
    network_replicate,
    plan_transfers,
    readout_seed,
    split_seed,
)
from components.transfer.readout import validation_split
from components.verdict import edge_text, noise_note, ties_text, verdict


def test_paired_replicates_share_a_seed_per_target_and_replicate_zero_keeps_the_study_seed():
    a, b = Readout("normal", ("depth_euclidean",)), Readout("normal", ("edge_texture",))
    assert readout_seed(7, a) == readout_seed(7, b) == 7  # what every study used before replicates
    a1, b1 = (
        Readout("normal", ("depth_euclidean",), replicate=1),
        Readout("normal", ("edge_texture",), replicate=1),
    )
    assert readout_seed(7, a1) == readout_seed(7, b1) != 7
    assert readout_seed(7, a1) != readout_seed(7, Readout("normal", ("edge_texture",), replicate=2))
    independent = {readout_seed(7, r, Pairing.INDEPENDENT) for r in (a, b, a1, b1)}
    assert len(independent) == 4


def test_each_replicate_trains_on_rows_of_its_own_and_replicate_zero_keeps_the_studys():
    """A rerun draws which transfer images the readouts fit on: one split shared by every
    replicate would leave that out of the multi-bootstrap (it once made one run's colorization
    lose to `random` on both depth targets in all three replicates)."""
    assert split_seed(7, 0) == 7  # the split every study had before
    seeds = [split_seed(7, r) for r in range(4)]
    assert len(set(seeds)) == 4 and split_seed(8, 1) != split_seed(7, 1)
    fits = [validation_split(200, 0.2, s)[0] for s in seeds]
    assert all(len(f) == 160 for f in fits)
    assert all(not np.array_equal(a, b) for i, a in enumerate(fits) for b in fits[i + 1 :])


def test_replicas_and_counts():
    plan = plan_transfers(["a", "b"], ["a", "b", "c"], orders=(2,), beams=(2,), replicates=3)
    r = plan.first_order[0]
    assert [x.replicate for x in plan.replicas(r)] == [0, 1, 2]
    assert [x.name for x in plan.replicas(r)] == ["a->a", "a->a#1", "a->a#2"]
    assert plan.replicas(baseline("a", ReadoutKind.SELF)) == (baseline("a", ReadoutKind.SELF),)
    counts = plan.counts()
    assert counts == {"order 1": 18, "order 2": 6, "self": 2, "pixels": 6, "random": 6}
    with pytest.raises(ValueError, match="replicate"):
        Readout("a", ("b",), replicate=-1)
    assert Readout("a", ("b",), replicate=2).file_id == "b--a.r2"


def test_with_network_replicates_self_has_a_replicate_per_readout_replicate():
    # One network per task: `self` is scored once, as before network replicates.
    one = plan_transfers(["a"], ["a", "b"], orders=(), beams=(), replicates=3)
    assert one.replicas(baseline("a", ReadoutKind.SELF)) == (baseline("a", ReadoutKind.SELF),)
    # Two: replicate r of every candidate, self included, reads network r mod 2.
    two = plan_transfers(["a"], ["a", "b"], orders=(), beams=(), replicates=3, networks=2)
    selves = two.replicas(baseline("a", ReadoutKind.SELF))
    assert [x.name for x in selves] == ["self->a", "self->a#1", "self->a#2"]
    assert [network_replicate(x, 2) for x in selves] == [0, 1, 0]
    assert two.counts() == {"order 1": 6, "self": 3, "pixels": 3, "random": 3}
    assert two.trained == one.trained  # `self` is scored, never trained


def test_beam_ranks_by_the_replicates_mean_not_by_one_seed():
    losses = {"x": [0.10, 0.50, 0.50], "y": [0.30, 0.31, 0.29], "z": [0.9, 0.9, 0.9], "t": [0.0]}
    # replicate 0 alone ranks x first; the mean (0.367) puts it behind y (0.30)
    assert beam({s: v[0] for s, v in losses.items()}, 1, exclude="t") == ["x"]
    assert beam(losses, 1, exclude="t") == ["y"]
    assert beam(losses, 2, exclude="t") == ["y", "x"]


def test_a_widened_beam_takes_in_sources_within_seed_noise_of_its_edge():
    losses = {
        "a": [0.10, 0.11, 0.09],
        "b": [0.20, 0.30, 0.25],  # mean 0.25, se 0.029
        "c": [0.24, 0.34, 0.29],  # mean 0.29, se 0.029: 0.04 behind b, within 1 se of the difference (0.041)
        "d": [0.60, 0.61, 0.59],  # far behind
    }
    assert beam(losses, 2) == ["a", "b"]
    assert beam(losses, 2, widen=1.0) == ["a", "b", "c"]
    assert beam(losses, 2, widen=0.5) == ["a", "b"]  # 0.04 > 0.5 x 0.041
    single = {s: v[:1] for s, v in losses.items()}  # one replicate: no noise measured, nothing widened
    assert beam(single, 2, widen=1.0) == ["a", "b"]
    failed = {**losses, "e": [float("nan")]}  # a failed readout is never in the beam
    assert "e" not in beam(failed, 4, widen=1.0)


def test_beam_availability_redoes_the_beam_from_each_resamples_drawn_replicates():
    val = {
        ("t", "a"): np.array([0.1, 0.1]),
        ("t", "b"): np.array([0.2, 0.5]),
        ("t", "c"): np.array([0.3, 0.3]),
    }
    # resample 0 draws b's replicate 0 twice (mean 0.2: b in the beam of 2), resample 1 its
    # replicate 1 twice (mean 0.5: c takes its place), resample 2 both (0.35: c again)
    draws = {
        ("t", "a"): np.array([[0, 1], [0, 1], [0, 1]]),
        ("t", "b"): np.array([[0, 0], [1, 1], [0, 1]]),
        ("t", "c"): np.array([[0, 1], [0, 1], [0, 1]]),
    }
    rows = [("t", ("a",)), ("t", ("a", "b")), ("t", ("a", "c")), ("t", ("self",)), ("t", ("b", "c"))]
    available = beam_availability(rows, val, draws, orders=(2,), beams=(2,), widen=0.0, n=3)
    assert available.tolist() == [
        [True, True, False, True, False],
        [True, False, True, True, False],
        [True, False, True, True, False],
    ]


AFFINITY = [
    {"target": "reshading", "sources": ["normal"], "p_best": 0.55, "vs_random": 0.9, "gain": 0.8},
    {"target": "reshading", "sources": ["depth", "normal"], "p_best": 0.40, "vs_random": 0.9, "gain": 0.8},
    {"target": "reshading", "sources": ["edge"], "p_best": 0.05, "vs_random": 0.6, "gain": 0.6},
    {"target": "reshading", "sources": ["self"], "p_best": None, "vs_random": 0.99, "gain": 0.99},
    {"target": "curvature", "sources": ["edge"], "p_best": 0.02, "vs_random": 0.30, "gain": 0.7},
    {"target": "curvature", "sources": ["random"], "p_best": 0.98, "vs_random": 0.5, "gain": 0.9},
]
TAXONOMY = Taxonomy(2, 1, 0.0, ("edge", "normal"), {"reshading": ("normal",), "curvature": ("edge",)}, {})
STABILITY = Stability.from_json(
    {
        "roots": {"edge": 1.0, "normal": 1.0},
        "transfers": {
            "reshading": {"normal": 0.55, "depth+normal": 0.40, "edge": 0.05},
            "curvature": {"edge": 1.0},
        },
        "taxonomy": 0.5,
    }
)


def test_verdict_says_ties_as_ties_shaky_edges_as_alternatives_and_flags_useless_transfers():
    said = verdict(TAXONOMY, STABILITY, AFFINITY, replicates=3)
    assert said.to_json()["ties"] == {
        "reshading": [["normal", 0.55], ["depth+normal", 0.4]],
        "curvature": [["random", 0.98]],
    }
    assert said.to_json()["alternatives"] == {
        "reshading": [["normal", 0.55], ["depth+normal", 0.4], ["edge", 0.05]]
    }
    assert said.to_json()["no_gain"] == {
        "curvature": {"sources": "edge", "loses_to": {"random": None}}
    }  # no resamples
    assert edge_text("reshading", ["normal"], said, STABILITY) == (
        "reshading <- normal (0.55) or depth + normal (0.40) or edge (0.05)"
    )
    assert edge_text("curvature", ["edge"], said, STABILITY) == (
        "curvature <- edge (1.00)  [loses to random: no better than a random encoder]"
    )
    assert ties_text("reshading", said) == "normal (0.55) ~ depth + normal (0.40)"
    assert "training seeds" in noise_note(said)


def test_one_replicate_says_training_noise_was_not_measured():
    said = verdict(TAXONOMY, STABILITY, AFFINITY, replicates=1)
    assert not said.training_noise_measured
    assert "NOT measured" in noise_note(said)
    plain = verdict(TAXONOMY, None, AFFINITY, replicates=1)  # no bootstrap: no alternatives to give
    assert (
        plain.alternatives == {} and edge_text("reshading", ["normal"], plain, None) == "reshading <- normal"
    )


def test_one_network_per_task_says_how_the_networks_trained_is_not_in_the_intervals():
    said = verdict(TAXONOMY, STABILITY, AFFINITY, replicates=3)
    assert said.networks == 1 and not said.network_noise_measured
    assert "networks: 1 training run each" in noise_note(said) and "not in the intervals" in noise_note(said)
    both = verdict(TAXONOMY, STABILITY, AFFINITY, replicates=3, networks=2)
    assert both.network_noise_measured and "2 network replicates" in noise_note(both)
    assert "not in the intervals" not in noise_note(both)
    stored = {k: v for k, v in said.to_json().items() if k not in ("networks", "network_noise_measured")}
    assert noise_note(Verdict.from_json(stored)) == noise_note(
        said
    )  # a study from before network replicates had one


def test_a_transfer_is_flagged_only_where_the_resamples_say_it_loses_naming_the_baseline():
    """Regression: `edge_texture <- normal` beat random on 0.85 of images and lost to pixels at a
    point win rate of 0.375, and was flagged as gaining nothing from transfer. Now a flag needs
    at least STABLE of the resamples losing to a baseline, and says which one, with that share."""
    rows = [
        {
            "target": "edge",
            "sources": ["normal"],
            "vs_random": 0.85,
            "gain": 0.375,
            "p_best": 0.9,
            "p_below_random": 0.0,
            "p_no_gain": 0.7,
        },
        {
            "target": "curv",
            "sources": ["edge"],
            "vs_random": 0.7,
            "gain": 0.2,
            "p_best": 0.6,
            "p_below_random": 0.05,
            "p_no_gain": 0.96,
        },
        {
            "target": "depth",
            "sources": ["edge"],
            "vs_random": 0.2,
            "gain": 0.1,
            "p_best": 0.5,
            "p_below_random": 0.93,
            "p_no_gain": 1.0,
        },
    ]
    taxonomy = Taxonomy(
        1, 1, 0.0, ("normal",), {"edge": ("normal",), "curv": ("edge",), "depth": ("edge",)}, {}
    )
    said = verdict(taxonomy, None, rows, replicates=3)
    assert said.to_json()["no_gain"] == {
        "curv": {"sources": "edge", "loses_to": {"pixels": 0.96}},
        "depth": {"sources": "edge", "loses_to": {"random": 0.93, "pixels": 1.0}},
    }
    assert edge_text("edge", ["normal"], said, None) == "edge <- normal"
    assert edge_text("curv", ["edge"], said, None) == (
        "curv <- edge  [loses to pixels (0.96 of resamples): no better than training from pixels]"
    )
    assert edge_text("depth", ["edge"], said, None) == (
        "depth <- edge  [loses to random (0.93 of resamples) and pixels (1.00 of resamples): "
        "no better than a random encoder]"
    )
