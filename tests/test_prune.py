"""Pruning the fan-out (design.md section 11): the estimator, the pruned plan, and that a pruned
transfer never reaches the AHP or the BIP. All fast but the last, which runs Stage II on Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from components.affinity import affinity_from_cube
from components.affinity_io import read_affinities, write_affinity
from components.data.shards import ShardStore
from components.errors import ConfigError
from components.loss_cube import loss_cube
from components.tasks import get_task
from components.taxonomy import TaxonomyOptions, solve_taxonomy, sweep_budgets
from components.transfer import (
    Readout,
    ReadoutKind,
    baseline,
    plan_transfers,
    planned_fraction,
    prune_for_budget,
    prune_plan,
    shared_sources,
)
from components.transfer.estimate import Estimate, probe_loss, pruning_report, spearman
from pipelines.config import load_pipeline_config
from pipelines.steps import unfenced

pytestmark = pytest.mark.numerics  # CI runs these again under another CPU kernel path

N_FIT, N_VAL = 96, 32


def _split(x: np.ndarray, y: np.ndarray) -> tuple:
    return x[:N_FIT], y[:N_FIT], x[N_FIT:], y[N_FIT:]


def _scores(task: str, sources: dict[str, np.ndarray], y: np.ndarray, channels: int | None = None) -> dict:
    return {name: probe_loss(get_task(task), *_split(x, y), channels) for name, x in sources.items()}


# ---------------------------------------------------------------- the estimator


def test_a_source_that_determines_the_target_ranks_first_then_a_noisy_copy_then_noise():
    rng = np.random.default_rng(0)
    y = rng.random((N_FIT + N_VAL, 1, 32, 32)).astype(np.float32)  # reshading: one L1 channel
    exact = F.pixel_unshuffle(torch.from_numpy(y), 4).numpy()  # (N, 16, 8, 8): the target, rearranged
    sources = {
        "exact": exact.astype(np.float16),
        "noisy": (exact + rng.normal(0, 0.3, exact.shape)).astype(np.float16),
        **{f"random{i}": rng.standard_normal((len(y), 8, 8, 8)).astype(np.float16) for i in range(4)},
    }
    scores = _scores("reshading", sources, y)
    ranked = sorted(scores, key=scores.get)
    assert ranked[:2] == ["exact", "noisy"]
    assert scores["exact"] < 0.01  # a linear map recovers the target exactly
    # uniform [0, 1) labels: the best constant's L1 is 1/4, and noise cannot beat it held out
    for name in ranked[2:]:
        assert 0.24 < scores[name] < 0.27


def test_class_maps_and_vector_targets_rank_the_determining_source_first():
    rng = np.random.default_rng(1)
    n = N_FIT + N_VAL
    classes = rng.integers(0, 6, (n, 32, 32)).astype(np.uint8)
    classes[:3, :4] = 255  # unlabelled pixels are left out, as in the loss
    onehot = F.one_hot(torch.from_numpy(classes).long().clamp(max=5), 6).movedim(-1, 1).float()
    seg = {"exact": F.pixel_unshuffle(onehot, 4).numpy(), "random": rng.standard_normal((n, 8, 8, 8))}
    scores = _scores("segment_semantic", seg, classes, channels=6)
    assert scores["exact"] < 0.1 < np.log(6) - 0.05 < scores["random"]  # chance: log 6 nats
    layout = rng.standard_normal((n, 9)).astype(np.float32)  # room_layout: 9 numbers, L2
    features = np.zeros((n, 9, 8, 8), np.float32) + layout[:, :, None, None]
    vec = {"exact": features, "random": rng.standard_normal((n, 9, 8, 8))}
    scores = _scores("room_layout", vec, layout)
    assert scores["exact"] < 0.01 and scores["random"] > 0.9  # unit-variance labels: L2 of 1


def test_on_random_features_the_ranking_is_at_chance():
    rng = np.random.default_rng(2)
    y = rng.random((N_FIT + N_VAL, 1, 32, 32)).astype(np.float32)
    rhos = []
    for _ in range(12):  # 8 sources of pure noise: their estimated order is independent of anything
        sources = {i: rng.standard_normal((len(y), 8, 8, 8)).astype(np.float16) for i in range(8)}
        scores = _scores("edge_texture", sources, y)
        rhos.append(spearman(np.arange(8), np.array([scores[i] for i in range(8)])))
    assert abs(np.mean(rhos)) < 0.25  # mean of 12 draws of a null Spearman (sd ~0.38/sqrt(12) = 0.11)


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)  # 1 - 6 * 2 / (3 * 8)
    assert np.isnan(spearman([1, 2], [1, 2]))


# ---------------------------------------------------------------- the pruned plan

SOURCES = ("a", "b", "c", "d")
RANK = {"a": 0.0, "b": 1.0, "c": 2.0, "d": 3.0}  # estimated loss of each source, for every target


def _estimates(targets=("a", "b", "c")) -> dict:
    return {(t, s): RANK[s] for t in targets for s in SOURCES}


def test_pruned_plan_keeps_top_k_an_audit_sample_and_every_baseline():
    plan = plan_transfers(("a", "b", "c"), SOURCES, orders=(2,), beams=(2,))
    pruned = prune_plan(plan, _estimates(), top_k=2, audit_fraction=0.5, seed=3)
    # per target: a and b by estimate, one of the other two (ceil(0.5 x 2)) audited, one pruned
    assert len(pruned.first_order) == 9 and len(pruned.pruned) == 3 and len(pruned.audited) == 3
    for t in ("a", "b", "c"):
        kept = {r.sources[0] for r in pruned.first_order_of(t)}
        assert {"a", "b"} < kept and len(kept) == 3
        assert {r.sources[0] for r in pruned.pruned if r.target == t} == {"c", "d"} - kept
    assert pruned.baselines == plan.baselines and pruned.top_k == 2
    # higher orders only from trained sources: two candidates each (the target's own encoder is never
    # one), so one pair per target
    assert pruned.counts() == {"order 1": 9, "order 2": 3, "self": 3, "pixels": 3, "random": 3}
    assert plan.counts()["order 1"] == 12
    beam = pruned.higher_order("c", {"a": 0.5, "b": 0.4, "c": 0.1})  # losses of c's trained readouts
    assert beam == (Readout("c", ("a", "b")),)
    assert prune_plan(plan, _estimates(), 2, 0.5, seed=3) == pruned  # the same audit every time


def test_no_audit_and_k_beyond_the_sources():
    plan = plan_transfers(("a",), SOURCES, orders=(), beams=())
    assert [r.sources[0] for r in prune_plan(plan, _estimates(("a",)), 1).first_order] == ["a"]
    assert prune_plan(plan, _estimates(("a",)), 9).pruned == ()
    with pytest.raises(ValueError):
        prune_plan(plan, _estimates(("a",)), 0)


def test_shared_sources_rank_best_over_all_targets_and_are_kept_for_every_target():
    """b is the top source of one target only but second for the others: over all targets it ranks
    best. Kept by each target's top 1 alone, no source reaches every target, so no one-root
    taxonomy exists; with one shared source, b reaches all three."""
    plan = plan_transfers(("t1", "t2", "t3"), SOURCES, orders=(), beams=())
    order = {"t1": "abcd", "t2": "bcad", "t3": "cbad"}  # each target's sources, best first
    estimates = {(t, s): float(rank.index(s)) for t, rank in order.items() for s in SOURCES}
    # mean scaled ranks: a 4/9, b 2/9, c 3/9, d 1
    assert shared_sources(plan, estimates, 2) == ("b", "c")
    assert shared_sources(plan, estimates, 9) == ("b", "c", "a", "d")
    assert shared_sources(plan, estimates, 0) == ()

    def kept(p):
        return {t: {r.sources[0] for r in p.first_order_of(t)} for t in p.targets}

    alone = prune_plan(plan, estimates, top_k=1)
    assert kept(alone) == {"t1": {"a"}, "t2": {"b"}, "t3": {"c"}} and alone.shared == ()
    assert not set.intersection(*kept(alone).values())
    with_b = prune_plan(plan, estimates, top_k=1, shared=1)
    assert kept(with_b) == {"t1": {"a", "b"}, "t2": {"b"}, "t3": {"c", "b"}} and with_b.shared == ("b",)
    assert len(with_b.pruned) == 12 - 5
    # a target's own network is not ranked for it: a target that is also a source
    plan = plan_transfers(("a",), SOURCES, orders=(), beams=())
    assert shared_sources(plan, {("a", s): RANK[s] for s in SOURCES}, 1) == ("b",)


def test_budget_mode_picks_the_largest_k_that_fits():
    plan = plan_transfers(("a", "b", "c"), SOURCES, orders=(), beams=())
    est = _estimates()

    def k(fraction, spent=0.0, **kw):
        return prune_for_budget(plan, est, fraction, 1.0, spent, **kw)[0].top_k

    # full: 12 first-order + 6 baselines (pixels, random) = 18 readouts of 1 s; pruned: 3K + 6
    assert k(0.5) == 1  # 9 s: K = 1
    assert k(0.7) == 2  # 12.6 s: K = 2
    assert k(0.7, 1.0) == 1  # the estimates' 1 s leaves room for K = 1
    assert k(0.7, audit_fraction=0.5) == 1  # 3 x (2 + 1) + 6 > 12.6
    assert k(0.1) == 1  # never below one
    # every target ranks a first, b second: the shared source (a) is in each top K, so K = 2
    # costs 3 x 2 + 6 = 12 <= 12.6 (an upper bound counting K + shared, 15, chose K = 1)
    assert k(0.7, shared=1) == 2
    # a shared source outside a target's top K does cost: target c ranking c, d first keeps
    # c, d and the shared a at K = 2, so 2 + 2 + 3 + 6 = 13 > 12.6
    other = est | {("c", "c"): -2.0, ("c", "d"): -1.0}
    assert prune_for_budget(plan, other, 0.7, 1.0, 0.0, shared=1)[0].top_k == 1
    smallest, cost = prune_for_budget(plan, est, 0.1, 1.0, 0.0)
    assert cost == pytest.approx(9 / 18) == planned_fraction(plan, smallest, 1.0, 0.0)  # 3 x 1 + 6
    assert planned_fraction(plan, smallest, 1.0, 1.8) == pytest.approx(10.8 / 18)


def test_prune_config_is_off_by_default_and_checked():
    cfg = load_pipeline_config(None, ["data.size=32"])
    assert cfg.transfer.prune.enabled is False
    cfg = load_pipeline_config(
        None, ["data.size=32", "transfer.prune.enabled=true", "transfer.prune.top_k=2"]
    )
    assert cfg.transfer.prune.top_k == 2 and cfg.transfer.prune.estimator.value == "probe"
    with pytest.raises(ConfigError, match=r"transfer\.prune\.audit_fraction"):
        load_pipeline_config(None, ["data.size=32", "transfer.prune.audit_fraction=2"])
    assert cfg.transfer.prune.shared == 2
    with pytest.raises(ConfigError, match=r"transfer\.prune\.shared"):
        load_pipeline_config(None, ["data.size=32", "transfer.prune.shared=-1"])


# ---------------------------------------------------------------- pruned transfers never reach the BIP


def _losses(readouts: list[Readout], loss_of: dict) -> pa.Table:
    rows = {"target": [], "sources": [], "image_id": [], "loss": []}
    for r in readouts:
        for i in range(8):
            rows["target"].append(r.target)
            rows["sources"].append(list(r.sources))
            rows["image_id"].append(f"img{i}")
            rows["loss"].append(loss_of[r] + 0.01 * i)
    return pa.table(rows)


def test_a_pruned_transfer_is_no_candidate_and_never_in_the_taxonomy(tmp_path):
    """b -> a is the best transfer into a by far, but the estimate prunes it: the table never has
    it, so the BIP cannot choose it, at any budget; with it trained, the BIP does choose it."""
    plan = plan_transfers(("a", "b"), ("a", "b", "c"), orders=(), beams=(), baselines=())
    estimates = {("a", "a"): 0.0, ("a", "c"): 1.0, ("a", "b"): 2.0, ("b", "b"): 0.0, ("b", "a"): 1.0}
    estimates[("b", "c")] = 2.0
    pruned = prune_plan(plan, estimates, top_k=2)
    assert pruned.pruned == (Readout("a", ("b",)), Readout("b", ("c",)))
    loss_of = {r: 1.0 for r in plan.first_order} | {Readout("a", ("b",)): 0.1}
    selves = [baseline("a", ReadoutKind.SELF), baseline("b", ReadoutKind.SELF)]
    loss_of |= dict.fromkeys(selves, 0.5)

    def solve(readouts):
        table = affinity_from_cube(loss_cube(_losses([*readouts, *selves], loss_of)))
        write_affinity(table, tmp_path / "aff.parquet")
        rows = {
            (t, tuple(s))
            for t, s in zip(table["target"].to_pylist(), table["sources"].to_pylist(), strict=True)
        }
        transfers = read_affinities(tmp_path / "aff.parquet")
        options = TaxonomyOptions(budget=1, max_order=1, source_only=frozenset({"c"}))
        taxonomies = [p.taxonomy for p in sweep_budgets(transfers, options, [1, 2])]
        return rows, solve_taxonomy(transfers, options), taxonomies

    rows, best, sweep = solve(pruned.first_order)
    assert ("a", ("b",)) not in rows and ("b", ("c",)) not in rows
    assert all(t.transfers.get("a") != ("b",) for t in [best, *sweep] if t)
    rows, best, _ = solve(plan.first_order)  # the full study takes b -> a at budget 1
    assert ("a", ("b",)) in rows and best.roots == ("b",) and best.transfers["a"] == ("b",)


def test_pruning_report_says_what_was_pruned_and_how_well_the_estimate_ranked():
    plan = plan_transfers(("a",), SOURCES, orders=(), beams=())
    pruned = prune_plan(plan, _estimates(("a",)), top_k=2, audit_fraction=0.5, seed=0)
    audited = pruned.audited[0]
    estimates = {k: Estimate(k[0], k[1], v, 0.5) for k, v in _estimates(("a",)).items()}
    losses = {Readout("a", ("a",)): 0.3, Readout("a", ("b",)): 0.2, audited: 0.25}
    report = pruning_report(pruned, estimates, losses)
    assert report["pruned"]["a"] == [s for s in ("c", "d") if s != audited.sources[0]]
    assert report["audited"]["a"] == [audited.sources[0]]
    # estimates a < b < audited; losses b < audited < a: ranks (0, 1, 2) vs (2, 0, 1)
    assert report["spearman"] == pytest.approx(-0.5)
    assert report["audit_misses"] == [audited.name]  # 0.25 beats the worse of the top 2 (0.3)
    assert report["estimate_seconds"] == pytest.approx(2.0)


# ---------------------------------------------------------------- Stage II and III/IV, pruned, on Ray


def test_a_pruned_stage_ii_trains_top_k_and_audit_and_the_outputs_list_the_rest(
    tmp_path, tiny_dataset, ray_session
):
    from test_transfer import TASKS, fake_stage1, make_stage2

    from pipelines.analysis.run import run_affinity, run_taxonomy

    root, store = tmp_path, ShardStore(tiny_dataset)
    results = fake_stage1(root, store)
    overrides = (
        "transfer.epochs=1",
        "transfer.prune.enabled=true",
        "transfer.prune.top_k=1",
        "transfer.prune.audit_fraction=0.5",
        "transfer.prune.shared=0",
        "analysis.bootstrap=0",
        "taxonomy.budget=1",
    )
    stage = make_stage2(root, store, *overrides)
    result = stage.run(results)
    assert result.failed == ()
    report = json.loads((Path(result.out_dir) / "pruning.json").read_text())
    pruned = {(t, s) for t, sources in report["pruned"].items() for s in sources}
    # 3 targets x (1 by estimate + 1 audited of the other 2); orders=[2], beam 2: a pair of the two
    # trained sources, unless one of them is the target's own encoder
    pairs = sum(t not in set(TASKS) - {s for tt, s in pruned if tt == t} for t in TASKS)
    assert result.counts == {"order 1": 6, "order 2": pairs, "self": 3, "pixels": 3, "random": 3}
    assert len(pruned) == 3 and report["estimator"] == "probe"
    assert set(report["estimates"]) == set(TASKS) and all(len(v) == 3 for v in report["estimates"].values())
    losses = result.all_losses().to_pydict()
    measured = {(t, s[0]) for t, s in zip(losses["target"], losses["sources"], strict=True) if len(s) == 1}
    assert not pruned & measured

    cfg = stage.config
    affinity = run_affinity(cfg, result.losses, result.key, stage.tracker, stage.parent_run_id, unfenced)
    side = (affinity.location / "pruned.json").read_json()
    assert sorted(side["transfers"]) == sorted(f"{s}->{t}" for t, s in pruned)
    table = (affinity.location / "affinity.parquet").read_parquet().to_pydict()
    rows = {(t, s[0]) for t, s in zip(table["target"], table["sources"], strict=True) if len(s) == 1}
    assert not pruned & rows
    taxonomy = (
        run_taxonomy(cfg, affinity, stage.tracker, stage.parent_run_id, unfenced).location / "taxonomy.json"
    ).read_json()
    assert taxonomy["pruned"]["transfers"] == side["transfers"]
    for target, sources in taxonomy["transfers"].items():
        assert len(sources) > 1 or (target, sources[0]) not in pruned


def test_a_budget_that_cannot_be_met_is_reported_and_the_smallest_plan_trains(
    tmp_path, tiny_dataset, ray_session, capsys
):
    """K never goes below 1, so a budget below the smallest pruned plan (its baselines are never
    pruned) would be overspent: the run says so in one line instead of quietly."""
    from test_transfer import TASKS, fake_stage1, make_stage2

    root, store = tmp_path, ShardStore(tiny_dataset)
    overrides = (
        "transfer.epochs=1",
        "transfer.orders=[]",
        "transfer.beams=[]",
        "transfer.prune.enabled=true",
        "transfer.prune.compute_fraction=0.05",
        "transfer.prune.shared=0",
        "transfer.prune.audit_fraction=0",
    )
    result = make_stage2(root, store, *overrides).run(fake_stage1(root, store))
    assert result.failed == ()
    assert result.counts["order 1"] == len(TASKS)  # top 1 per target
    report = json.loads((Path(result.out_dir) / "pruning.json").read_text())
    assert report["top_k"] == 1
    err = capsys.readouterr().err
    assert "transfer.prune.compute_fraction: 0.05 cannot be met" in err


def test_a_source_pruned_from_every_target_is_dropped_from_the_solvers_options():
    from components.transfer_table import TransferTable
    from pipelines.analysis.plan import within_table

    table = TransferTable.from_rows([("a", ("b",), 0.6), ("a", ("self",), 0.4), ("b", ("self",), 1.0)])
    options = TaxonomyOptions(budget=1, source_only=frozenset({"c"}), cost={"c": 2.0, "b": 1.0})
    with pytest.raises(Exception, match="unknown task"):
        solve_taxonomy(table, options)  # c lost every transfer to pruning: not in the table
    kept = within_table(options, table)
    assert kept.source_only == frozenset() and dict(kept.cost) == {"b": 1.0}
    assert solve_taxonomy(table, kept).roots == ("b",)
