"""The calibration benchmark's math against hand-worked answers, and `analysis.test_subset`, the
random share of test images each of its runs scores on (benchmarks/calibration.py)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.affinity import affinity_by_target
from components.errors import ConfigError, TaskatlasError
from components.storage import location
from pipelines.analysis.plan import SAMPLES, affinity_step, analysis_key, in_test_subset, keep_test_subset
from pipelines.analysis.run import run_affinity
from pipelines.config import PipelineConfig, load_pipeline_config
from pipelines.sections import AnalysisConfig
from pipelines.steps import unfenced

_SPEC = importlib.util.spec_from_file_location(
    "calibration", Path(__file__).parents[1] / "benchmarks" / "calibration.py"
)
cal = importlib.util.module_from_spec(_SPEC)
sys.modules.setdefault("calibration", cal)  # dataclasses look their module up there
_SPEC.loader.exec_module(cal)


def _run(roots, transfers, root_shares, transfer_shares, exact):
    return {
        "roots": roots,
        "transfers": transfers,
        "stability": {"roots": root_shares, "transfers": transfer_shares, "taxonomy": exact},
    }


# Three runs over tasks a, b, c, one root each. Runs 0 and 2 choose a -> b, a -> c; run 1 chooses
# b -> a, b -> c. Each target's `self` share repeats its root share (as `stability_of_rows` gives).
RUNS = [
    _run(
        ["a"],
        {"b": ["a"], "c": ["a"]},
        {"a": 0.95, "b": 0.05},
        {"a": {"self": 0.95, "b": 0.05}, "b": {"a": 0.95, "self": 0.05}, "c": {"a": 1.0}},
        0.9,
    ),
    _run(
        ["b"],
        {"a": ["b"], "c": ["b"]},
        {"a": 0.5, "b": 0.5},
        {"a": {"b": 0.5, "self": 0.5}, "b": {"self": 0.5, "a": 0.5}, "c": {"b": 0.5, "a": 0.5}},
        0.5,
    ),
    _run(
        ["a"],
        {"b": ["a"], "c": ["a"]},
        {"a": 1.0},
        {"a": {"self": 1.0}, "b": {"a": 1.0}, "c": {"a": 1.0}},
        1.0,
    ),
]
RA, RB = ("root", "a", ""), ("root", "b", "")
AB, BA, CA, CB = ("edge", "a", "b"), ("edge", "b", "a"), ("edge", "c", "a"), ("edge", "c", "b")


def test_a_root_is_one_choice_and_one_claim_never_also_its_self_edge():
    assert cal.choices(RUNS[0]) == {RA, BA, CA}
    assert cal.stated(RUNS[0]) == {RA: 0.95, RB: 0.05, AB: 0.05, BA: 0.95, CA: 1.0}
    claimed, _ = cal.claims(RUNS)
    assert not [c for c in claimed if c.choice[2] == "self"]
    # run 0 states 5 choices, run 1 six, run 2 three: 14 claims, not 14 + one per root share
    assert [sum(c.run == i for c in claimed) for i in range(3)] == [5, 6, 3]


def test_claims_hold_where_another_run_chose_them_and_unstated_options_stand_apart():
    claimed, unstated = cal.claims(RUNS)
    by = {(c.run, c.choice): c for c in claimed}
    # run 0's root a at 0.95: run 1 chose b, run 2 chose a -> held in 1 of 2 other runs
    assert by[0, RA].share == 0.95 and by[0, RA].held == (False, True) and by[0, RA].hold_rate == 0.5
    assert by[1, RA].held == (True, True) and by[1, RB].hold_rate == 0.0
    assert by[2, CA].held == (True, False)
    # what a run gave no share: run 0 never stated c <- b; run 2 stated neither b, a <- b nor c <- b
    assert sorted((c.run, c.choice) for c in unstated) == [(0, CB), (2, AB), (2, CB), (2, RB)]
    assert all(c.share == 0.0 and c.hold_rate == 0.5 for c in unstated)


def test_the_figures_of_three_runs_by_hand():
    f = cal.calibration(RUNS)
    rows = {r["bin"]: (r["claims"], r["stated"], r["held"]) for r in f["reliability"]}
    # (0, 0.1]: run 0's b root and a <- b at 0.05, each held in 1 of 2; (0.3, 0.5]: run 1's six at
    # 0.5, three held in both others, three in neither; [0.9, 1]: run 0's three, run 2's three
    assert rows["0.0-0.1"] == (2, pytest.approx(0.05), 0.5)
    assert rows["0.3-0.5"] == (6, 0.5, 0.5)
    assert rows["0.9-1.0"] == (6, pytest.approx(5.9 / 6), 0.5)
    assert [rows[b][0] for b in ("0.1-0.3", "0.5-0.7", "0.7-0.9")] == [0, 0, 0]
    assert (f["claims"], f["checks"], f["unstated"], f["unstated_hold_rate"]) == (14, 28, 4, 0.5)
    assert (f["high_confidence_hold_rate"], f["high_confidence_claims"]) == (0.5, 6)
    assert (f["low_confidence_false_rate"], f["low_confidence_claims"]) == (0.5, 2)
    # Brier, per (claim, other run): run 0's four claims at 0.95 or 0.05 each 0.95^2 + 0.05^2 =
    # 0.905, its c <- a at 1.0 held once: 1; run 1's twelve checks at 0.5: 12 x 0.25 = 3; run 2's
    # three at 1.0 held once each: 3. (4 x 0.905 + 1 + 3 + 3) / 28
    assert f["brier"] == pytest.approx(10.62 / 28)
    # exact: claimed (0.9 + 0.5 + 1) / 3; of the pairs (0,1) (0,2) (1,2) only (0,2) agree
    assert f["exact_claimed"] == pytest.approx(0.8)
    assert f["exact_agreement"] == pytest.approx(1 / 3)
    assert f["exact_gap"] == pytest.approx(0.8 - 1 / 3)
    assert f["high_confidence_interval"] == pytest.approx(cal.wilson(0.5, 6))


NAN = float("nan")


def _row(sources, affinity, p_best, vs_random, p_below, gain, p_no_gain):
    return {
        "target": "t",
        "sources": sources,
        "affinity": affinity,
        "p_best": p_best,
        "vs_random": vs_random,
        "p_below_random": p_below,
        "gain": gain,
        "p_no_gain": p_no_gain,
    }


# Target t's affinity table: `self` and `t <- t` compete for nothing; `random` competes for best
# but, a baseline and no transfer, is never flagged.
TABLE = [
    _row(["self"], 0.0, NAN, 0.9, 0.0, 0.9, 0.0),
    _row(["t"], 0.9, NAN, 0.9, 0.0, 0.9, 0.0),
    _row(["a"], 0.5, 0.7, 0.8, 0.0, 0.4, 0.6),
    _row(["b"], 0.3, 0.3, 0.45, 0.55, 0.3, 0.9),
    _row(["random"], 0.2, 0.0, 0.5, 0.0, 0.2, 1.0),
    _row(["a", "b"], 0.1, 0.0, NAN, NAN, 0.6, 0.05),  # random not measured against it
]


def test_the_affinity_tables_claims_by_hand():
    made, shares, measured = cal.affinity_choices(TABLE)
    assert made == {
        ("best", "t", "a"),  # the highest affinity of those with a p_best (t <- t has none)
        ("below_random", "t", "b"),  # vs_random 0.45
        ("no_gain", "t", "a"),
        ("no_gain", "t", "b"),
    }
    assert shares == {
        ("best", "t", "a"): 0.7,
        ("best", "t", "b"): 0.3,
        ("below_random", "t", "b"): 0.55,
        ("no_gain", "t", "a"): 0.6,
        ("no_gain", "t", "b"): 0.9,
        ("no_gain", "t", "a+b"): 0.05,
    }
    assert measured == {(k, "t", s) for k in ("below_random", "no_gain") for s in ("a", "b")} | {
        ("no_gain", "t", "a+b")
    }


def test_table_claims_are_claims_of_their_kind_and_never_part_of_the_exact_taxonomy():
    other = [dict(r) for r in TABLE]
    other[3] |= {"affinity": 0.6, "vs_random": 0.55, "gain": 0.6}  # b is now the best and gains
    runs = [RUNS[0] | {"affinity_rows": TABLE}, RUNS[2] | {"affinity_rows": other}]
    claimed, _ = cal.claims(runs)
    by = {(c.run, c.choice): c for c in claimed}
    assert by[0, ("best", "t", "a")].held == (False,) and by[0, ("best", "t", "b")].held == (True,)
    assert by[0, ("no_gain", "t", "b")].held == (False,) and by[0, ("no_gain", "t", "a")].held == (True,)
    f = cal.calibration(runs)
    best = f["by_kind"]["best"]
    assert (best["claims"], best["high_claims"], best["low_claims"]) == (4, 0, 0)
    # no_gain at >= 0.9: b (0.9) in each run, which fails in run 1 (gain 0.6) and holds in run 0
    assert (f["by_kind"]["no_gain"]["high_claims"], f["by_kind"]["no_gain"]["high_held"]) == (2, 0.5)
    assert (
        f["by_kind"]["taxonomy"]["claims"] == f["by_kind"]["root"]["claims"] + f["by_kind"]["edge"]["claims"]
    )
    assert f["exact_agreement"] == 1.0  # the same roots and edges: the tables do not enter it


def test_a_flag_is_checked_only_in_runs_that_trained_its_transfer():
    """A higher order is trained only where a run's beam takes it in: a run without `a+b` says
    nothing of whether `a+b` gains over `pixels`, so it is no failed check (it was one, and the
    second-order flags into autoencoding looked over-sure), and `a+b` is no option of its own."""
    gains = [dict(r) for r in TABLE]
    gains[5] |= {"gain": 0.3, "p_no_gain": 0.95}  # a+b gains nothing, surely
    without = [r for r in TABLE if r["sources"] != ["a", "b"]]
    runs = [RUNS[0] | {"affinity_rows": gains}, RUNS[0] | {"affinity_rows": without}]
    runs.append(RUNS[0] | {"affinity_rows": gains})
    claimed, unstated = cal.claims(runs)
    by = {(c.run, c.choice): c for c in claimed}
    ab = ("no_gain", "t", "a+b")
    assert by[0, ab].held == (True,) and by[2, ab].held == (True,)  # run 1 is not asked
    assert (1, ab) not in by and all(c.choice != ab for c in unstated)
    flagged = {(c.run, c.choice) for c in claimed if c.choice[0] == "no_gain" and c.choice[2] == "b"}
    assert flagged == {(0, ("no_gain", "t", "b")), (1, ("no_gain", "t", "b")), (2, ("no_gain", "t", "b"))}
    figures = cal.calibration(runs) | {"runs": 3}
    assert figures["by_kind"]["no_gain"]["high_held"] == 1.0  # b (0.9) and a+b hold
    assert figures["claims"] < figures["checks"] < 2 * figures["claims"]  # a+b: one check each
    figures = cal.rounded(figures)
    figures["goals_met"] = cal.goals_met(figures)
    cal.check_figures(figures)  # what the benchmark checks before it prints


def test_confident_claims_kept_counts_flags_the_raced_study_never_trained_apart():
    spec = importlib.util.spec_from_file_location(
        "racing", Path(__file__).parents[1] / "benchmarks" / "racing.py"
    )
    racing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(racing)
    full = [dict(r) for r in TABLE]
    full[5] |= {"gain": 0.3, "p_no_gain": 0.95}
    raced = [dict(r) for r in TABLE if r["sources"] != ["a", "b"]]
    raced[3] |= {"p_no_gain": 0.8}  # b's flag, stated less surely with fewer replicates
    sure, kept, untrained = racing.confident_kept(
        RUNS[0] | {"affinity_rows": full}, RUNS[0] | {"affinity_rows": raced}
    )
    # at >= 0.9 in the full study: the roots and edges of RUNS[0] at >= 0.9, b's and a+b's no_gain
    roots = sum(p >= 0.9 for p in cal.stated(RUNS[0]).values())
    assert (sure, kept, untrained) == (roots + 2, roots, 1)


def test_wilson_interval_against_published_values_and_by_hand():
    # The textbook 95% Wilson intervals (z = 1.96): 0 of 10 -> [0, 0.2775], 5 of 10 -> [0.2366, 0.7634]
    assert cal.wilson(0.0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert cal.wilson(0.5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    # 1 of 2 by hand: centre 0.5, half-width z / (1 + z^2/2) sqrt(1/8 + z^2/16)
    z = 1.959963984540054
    half = z / (1 + z * z / 2) * math.sqrt(0.25 / 2 + z * z / 16)
    assert cal.wilson(0.5, 2) == pytest.approx((0.5 - half, 0.5 + half), rel=1e-12)
    assert cal.wilson(0.5, 0) is None


def test_goals_need_six_high_claims_and_the_json_is_checked_before_it_is_printed():
    f = cal.calibration(RUNS) | {"runs": 3}
    good = f | {"high_confidence_hold_rate": 0.9, "low_confidence_false_rate": 0.1, "exact_gap": 0.1}
    assert cal.goals_met(good)
    assert not cal.goals_met(good | {"high_confidence_claims": 5})
    assert not cal.goals_met(good | {"exact_gap": 0.2})
    assert not cal.goals_met(good | {"low_confidence_false_rate": None})
    figures = cal.rounded(f)
    figures["goals_met"] = cal.goals_met(figures)
    cal.check_figures(figures)
    with pytest.raises(ValueError, match="exact_gap"):
        cal.check_figures(figures | {"exact_gap": 0.0})
    with pytest.raises(ValueError, match="goals_met"):
        cal.check_figures(figures | {"goals_met": True})
    with pytest.raises(ValueError, match=r"bin 0\.9-1\.0 disagrees"):
        cal.check_figures(figures | {"high_confidence_claims": 7})


# -- analysis.test_subset ------------------------------------------------------------------------


def test_test_subset_is_checked_naming_the_key():
    assert AnalysisConfig().test_subset == 1.0
    assert load_pipeline_config(None, ["analysis.test_subset=0.5"]).analysis.test_subset == 0.5
    for bad in ("0", "1.5", "-0.2", ".nan"):
        with pytest.raises(ConfigError, match=r"^analysis\.test_subset must be in \(0, 1\], got "):
            load_pipeline_config(None, [f"analysis.test_subset={bad}"])


def test_the_subset_is_the_seeds_own_draw_per_image():
    ids = [f"img{i:04d}" for i in range(2000)]
    half = in_test_subset(ids, 3, 0.5)
    assert np.array_equal(half, in_test_subset(ids, 3, 0.5))  # deterministic
    assert np.array_equal(half[::-1], in_test_subset(ids[::-1], 3, 0.5))  # per image, not per position
    # a share of about one half (binomial sd 0.011 on 2000 images: 5 sd either side)
    assert 0.44 < half.mean() < 0.56
    other = in_test_subset(ids, 4, 0.5)
    assert 0.19 < (half & other).mean() < 0.31  # another seed: an independent half, a quarter shared
    assert not (in_test_subset(ids, 3, 0.25) & ~half).any()  # a smaller fraction: inside the half
    assert in_test_subset(ids, 3, 1.0).all()


def test_at_one_the_tables_and_keys_are_those_before_the_field_existed(tmp_path):
    table = pa.table({"image_id": ["x", "y"], "loss": [1.0, 2.0]})
    assert keep_test_subset(table, 5, 1.0, "t") is table
    cfg = PipelineConfig(storage_root=str(tmp_path))
    # what of `analysis` the affinity step hashes: as before `test_subset`, bootstrap and seed
    assert analysis_key(cfg.analysis) == {"bootstrap": 200, "seed": 0}
    assert analysis_key(AnalysisConfig(test_subset=0.5)) == {"bootstrap": 200, "seed": 0, "test_subset": 0.5}
    assert analysis_key(AnalysisConfig(subset_seed=3)) == {"bootstrap": 200, "seed": 0, "subset_seed": 3}
    half = PipelineConfig(storage_root=str(tmp_path), analysis=AnalysisConfig(test_subset=0.5))
    other = PipelineConfig(storage_root=str(tmp_path), analysis=AnalysisConfig(test_subset=0.5, seed=1))
    _losses(tmp_path / "losses")
    assert len({affinity_step(c, "k", location(tmp_path / "losses")).key for c in (cfg, half, other)}) == 3


class _NoTracker:
    """Records nothing: `run_affinity` only starts, logs to and ends a run."""

    def start_run(self, *args, **kwargs):
        return "run"

    def log_artifact(self, *args):
        pass

    def log_metrics(self, *args):
        pass

    def end_run(self, *args):
        pass


def _losses(folder: Path, n_images: int = 40) -> dict[str, pa.Table]:
    """Per-target loss tables of two targets, five candidates each, random losses."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    tables = {}
    for target in ("t", "u"):
        candidates = [["self"], ["random"], ["pixels"], ["a"], ["b"]]
        rows = [(s, f"img{i:03d}") for s in candidates for i in range(n_images)]
        tables[target] = pa.table(
            {
                "target": [target] * len(rows),
                "sources": [s for s, _ in rows],
                "image_id": [i for _, i in rows],
                "loss": rng.random(len(rows)),
            }
        )
        pq.write_table(tables[target], folder / f"{target}.parquet")
    return tables


def _plain(table: pa.Table) -> list[dict]:
    """The rows, NaN written as a string so that equal tables compare equal."""
    return [
        {k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
        for row in table.to_pylist()
    ]


@pytest.mark.parametrize("fraction, seed, subset_seed", [(0.5, 11, None), (1.0, 11, None), (0.5, 12, 11)])
def test_stage_iii_scores_only_the_subset_and_its_bootstrap_resamples_it(
    tmp_path, fraction, seed, subset_seed
):
    """The last case, `analysis.subset_seed`: the images seed 11 keeps, resampled by seed 12 (the
    shares' own Monte Carlo noise, apart from which images are scored)."""
    tables = _losses(tmp_path / "losses")
    analysis = AnalysisConfig(bootstrap=10, seed=seed, test_subset=fraction, subset_seed=subset_seed)
    cfg = PipelineConfig(storage_root=str(tmp_path / "root"), analysis=analysis)
    step = run_affinity(cfg, location(tmp_path / "losses"), "k", _NoTracker(), "parent", unfenced)
    ids = sorted(set(tables["t"]["image_id"].to_pylist()))
    kept = [i for i, keep in zip(ids, in_test_subset(ids, 11, fraction), strict=True) if keep]
    assert len(kept) == len(ids) if fraction == 1.0 else 10 < len(kept) < 30
    # the same affinity computed here on the kept rows only, the kept ids as the resamples' images
    expected = affinity_by_target(
        ["t", "u"],
        lambda t: tables[t].filter(pa.compute.is_in(tables[t]["image_id"], pa.array(kept))),
        10,
        seed,
        kept,
    )
    got = pq.read_table(step.location.local_path / "affinity.parquet")
    assert _plain(got.select(expected.table.column_names)) == _plain(expected.table)
    assert np.array_equal(np.load(step.location.local_path / SAMPLES), expected.predictive.astype(np.float32))


@pytest.mark.parametrize("subset_seed, named", [(None, r"analysis\.seed=0"), (4, r"analysis\.subset_seed=4")])
def test_a_subset_that_keeps_no_image_is_one_line(tmp_path, subset_seed, named):
    """Naming the setting that drew the subset: `analysis.subset_seed` where it is set."""
    _losses(tmp_path / "losses", n_images=2)
    analysis = AnalysisConfig(bootstrap=0, seed=0, test_subset=1e-9, subset_seed=subset_seed)
    cfg = PipelineConfig(storage_root=str(tmp_path / "root"), analysis=analysis)
    with pytest.raises(TaskatlasError, match=rf"^analysis\.test_subset=1e-09 with {named} keeps none"):
        run_affinity(cfg, location(tmp_path / "losses"), "k", _NoTracker(), "parent", unfenced)
