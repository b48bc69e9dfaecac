"""Raced readout replicates: the policy on hand-made rows, and a tiny raced study (real Ray, real
MLflow) whose readouts are a subset of the full study's, under the same keys."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest

from components.racing import contested, next_round
from pipelines.cli import main
from tests.study import write_study

NAN = math.nan


def _rows(target: str, shares: dict[str, tuple[float, float]]) -> list[dict]:
    return [
        {"target": target, "sources": s.split("+"), "p_best": p, "affinity": a}
        for s, (p, a) in shares.items()
    ]


NORMAL = {
    "depth": (0.99, 0.5),
    "edge": (0.01, 0.2),
    "shade": (0.0, 0.1),
    "self": (NAN, 0.1),
    "normal": (NAN, 0.1),
}
CURV = {
    "depth": (0.6, 0.4),
    "edge": (0.3, 0.3),
    "depth+edge": (0.08, 0.2),
    "shade": (0.015, 0.05),
    "random": (0.0, 0.05),
}
ROWS = (
    _rows("normal", NORMAL) + _rows("curv", CURV) + _rows("flat", {"depth": (NAN, 1.0)})
)  # flat: no bootstrap
TWO = {
    ("normal", ("depth",)): 2,
    ("curv", ("depth",)): 2,
    ("curv", ("edge",)): 2,
    ("curv", ("depth", "edge")): 2,
}


def test_a_settled_target_races_nothing_and_an_open_one_races_its_contenders_with_self():
    got = contested(ROWS, TWO, p_best=0.02, settled=0.98, top=3)
    assert set(got) == {"curv"}  # normal's best, replicated, holds in 0.99 of resamples: settled
    # shade: 0.015. No flag is open (no p_below_random, p_no_gain): random, pixels and curv <- curv
    # decide nothing and keep their replicates
    assert got["curv"] == {("depth",), ("edge",), ("depth", "edge"), ("self",)}
    assert ("depth", "edge") not in contested(ROWS, TWO, p_best=0.1, settled=0.98, top=3)["curv"]
    assert contested(ROWS, TWO, p_best=0.02, settled=0.5, top=3) == {}  # 0.6 >= 0.5: settled too


def test_shares_from_one_replicate_settle_nothing_and_race_each_targets_top_candidates():
    """One replicate: the resamples saw only the test images, so a 0.99 is not yet a 0.99. The
    best by affinity race until they have two replicates, whatever their p_best."""
    got = contested(ROWS, {}, p_best=0.02, settled=0.98, top=2)
    assert got["normal"] == {("depth",), ("edge",), ("self",)}
    assert got["curv"] >= {("depth",), ("edge",), ("depth", "edge")} and ("shade",) not in got["curv"]


def test_a_baseline_races_only_where_a_racing_candidates_flag_on_it_is_still_open():
    """`random` decides the below-random flag, `pixels` the no-gain flag: each races where a
    candidate still in the race has that flag's share open (>= p_best, < settled), not where it
    is settled either way or where only a candidate out of the race has it open."""

    def flagged(depth: dict, shade: dict) -> list[dict]:
        rows = _rows("curv", CURV)
        for row in rows:
            row |= {"depth": depth, "shade": shade}.get("+".join(row["sources"]), {})
        return rows

    def baselines(depth: dict, shade: dict | None = None) -> set:
        got = contested(flagged(depth, shade or {}), TWO, p_best=0.02, settled=0.98, top=3)["curv"]
        return {s for s in got if s in {("random",), ("pixels",), ("self",), ("curv",)}}

    assert baselines({"p_below_random": 0.5, "p_no_gain": 0.0}) == {("self",), ("random",)}
    assert baselines({"p_below_random": 0.01, "p_no_gain": 0.3}) == {("self",), ("pixels",)}
    assert baselines({"p_below_random": 0.99, "p_no_gain": 1.0}) == {("self",)}  # settled: it loses
    assert baselines({}, {"p_below_random": 0.5, "p_no_gain": 0.5}) == {("self",)}  # shade is out


def test_an_open_flag_races_its_candidate_and_baseline_even_in_a_settled_target():
    """`flags`: a flag whose share is in [flags, settled) may become a claim stated at >= 0.9
    with another replicate, so its candidate races, with the flag's baseline, whether or not
    its target's best is settled; a flag below `flags`, or settled, races nothing."""
    rows = _rows("normal", NORMAL)
    for row in rows:
        row |= {"shade": {"p_below_random": 0.7}, "edge": {"p_no_gain": 0.3}}.get(row["sources"][0], {})
    assert contested(rows, TWO, flags=1.0) == {}  # off: normal is settled
    got = contested(rows, TWO, flags=0.5)
    assert got == {"normal": {("shade",), ("random",)}}  # not edge (0.3 < 0.5), not self
    assert contested(rows, TWO, flags=0.2)["normal"] == {("shade",), ("random",), ("edge",), ("pixels",)}
    assert contested(rows, TWO, flags=0.5, settled=0.7) == {}  # 0.7: settled


def test_the_next_round_trains_only_candidates_that_raced_every_round_and_may_have_more():
    a, b, c, own = ("t", ("a",)), ("t", ("b",)), ("t", ("c",)), ("t", ("self",))
    counts = {a: 2, b: 1, c: 2, own: 1}  # after round 1: b left the race after round 0
    still = {"t": {("a",), ("b",), ("self",)}}  # b is back in the race, c is out
    most = {a: 3, b: 3, c: 3, own: 1}  # self: one network, one replicate
    assert next_round(counts, still, 2, most) == [a]  # not b (no replicate 1), not c, not self
    assert next_round(counts, still, 1, most) == [b]
    assert next_round(counts, {}, 2, most) == []


@pytest.mark.parametrize("p_best, settled, top", [(0.0, 0.9, 3), (0.5, 0.4, 3), (0.1, 1.5, 3), (0.1, 0.9, 0)])
def test_racing_thresholds_are_checked(p_best, settled, top):
    with pytest.raises(ValueError, match="racing"):
        contested([], {}, p_best, settled, top)
    with pytest.raises(ValueError, match="flags"):
        contested([], {}, 0.02, 0.98, 3, flags=0.0)


def _run(config, capsys) -> dict:
    assert main(["run", "-c", str(config), "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _newest(folder) -> str:
    return max(folder.glob("*/done.json"), key=lambda p: p.stat().st_mtime).parent.name


def _trained(root) -> set[str]:
    """Every readout file stored under the root: target/sources.key.parquet."""
    return {f"{p.parent.name}/{p.name}" for p in (root / "readouts").glob("*/*.parquet")}


# Slow (make test-all): a raced study, its rerun, then the full one on the same root.
@pytest.mark.slow
def test_a_raced_study_trains_a_subset_of_the_full_ones_readouts_and_resumes_without_redoing(
    tmp_path, capsys, ray_session
):
    root = tmp_path / "runs"
    race = {"replicates": 3, "race": {"enabled": True, "p_best": 0.2, "settled": 0.9}}
    raced_cfg = write_study(tmp_path / "raced.yaml", root, transfer=race)
    full_cfg = write_study(tmp_path / "full.yaml", root, transfer={"replicates": 3})

    raced = _run(raced_cfg, capsys)
    stored = _trained(root)
    # 3 targets x (3 first order, t <- t among them, a pair, pixels, random) x 3 replicates
    full_count = 3 * (3 + 1 + 2) * 3
    assert raced["taxonomy"]["roots"] and 0 < raced["readouts_ran"] < full_count
    summary = pq.read_table(root / "stage2" / _newest(root / "stage2") / "summary.parquet").to_pylist()
    replicates: dict[tuple, set[int]] = {}
    for row in summary:
        replicates.setdefault((row["target"], tuple(row["sources"])), set()).add(row["replicate"])
    # round 0 trained replicate 0 of everything; a readout raced on kept 0..R_c-1, none skipped
    assert all(reps == set(range(len(reps))) for reps in replicates.values())
    assert any(len(reps) == 1 for reps in replicates.values())  # some left the race after round 0

    again = _run(raced_cfg, capsys)  # resumes: every round's choice the same, nothing trained again
    assert again["readouts_ran"] == 0 and again["taxonomy"]["roots"] == raced["taxonomy"]["roots"]
    assert _trained(root) == stored

    full = _run(full_cfg, capsys)  # the same keys raced or not: the full study trains only the rest
    assert stored < _trained(root)
    assert full["readouts_ran"] == len(_trained(root)) - len(stored)
