"""Stage IV: the BIP against exhaustive search over root sets, on random instances and on Taskonomy."""

from __future__ import annotations

import csv
import itertools
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from components.affinity_io import read_affinities
from components.errors import TaskatlasError
from components.taxonomy import Linking, Taxonomy, TaxonomyOptions, Transform, solve_taxonomy, sweep_budgets
from components.transfer_table import TransferTable

pytestmark = pytest.mark.numerics  # CI runs these again under another CPU kernel path

# Taskonomy's released affinities, kept in the repository (see its README.md)
TASKONOMY_16K = Path(__file__).resolve().parent / "data" / "taskonomy" / "affinities_16k.csv"
Row = tuple[str, tuple[str, ...], float]


def _f(affinity: float, transform: Transform) -> float:
    value = math.sqrt(affinity) if transform is Transform.SQRT else affinity
    return min(max(value, 1e-5), 1.0)


def _exhaustive(rows: list[Row], options: TaxonomyOptions) -> float | None:
    """Best objective over every affordable root set (None: no root set is feasible).

    Written from design.md section 6 directly, independent of the solver's model: each non-root
    target takes its best transfer whose sources are all roots. Vectorized over root sets.
    """
    names = {t for t, _, _ in rows} | {s for _, srcs, _ in rows for s in srcs}
    tasks = sorted(names - {"self", "pixels"} - options.exclude)
    bit = {t: 1 << i for i, t in enumerate(tasks)}
    measured = {t for t, srcs, _ in rows if srcs != ("pixels",)}
    targets = [
        t
        for t in tasks
        if t in measured
        and t not in options.source_only
        and (options.targets is None or t in options.targets)
    ]
    cost = {t: options.cost.get(t, 1.0) for t in tasks}
    cheapest = sorted(cost.values())
    root_sets = []
    for k in range(len(tasks) + 1):
        if sum(cheapest[:k]) > options.budget + 1e-9:
            break
        for roots in itertools.combinations(tasks, k):
            if sum(cost[r] for r in roots) <= options.budget + 1e-9:
                root_sets.append(sum(bit[r] for r in roots))
    masks = np.array(root_sets, dtype=np.int64)
    total = np.zeros(len(masks))
    for t in targets:
        r = options.importance.get(t, 1.0)
        self_value = max(v for tt, srcs, v in rows if tt == t and srcs == ("self",))
        edges = [
            (sum(bit[s] for s in srcs), r * _f(v, options.transform))
            for tt, srcs, v in rows
            if tt == t
            and 0 < len(srcs) <= options.max_order
            and t not in srcs
            and all(s in bit for s in srcs)
        ]
        best = np.full(len(masks), -np.inf)
        for edge_mask, value in edges:
            covered = (np.int64(edge_mask) & ~masks) == 0
            best = np.where(covered, np.maximum(best, value), best)
        is_root = (masks & bit[t]) != 0
        total += np.where(is_root, r * _f(self_value, options.transform), best)
    return float(total.max()) if np.isfinite(total).any() else None


def _check_solution(taxonomy: Taxonomy, rows: list[Row], options: TaxonomyOptions) -> None:
    """Feasible, and its objective recomputed from the rows equals the reported one."""
    best = {}
    for t, srcs, v in rows:
        key = (t, tuple(sorted(set(srcs))))
        best[key] = max(v, best.get(key, -1.0))
    roots = set(taxonomy.roots)
    assert sum(options.cost.get(r, 1.0) for r in roots) <= options.budget + 1e-9
    assert not (roots & options.exclude)
    objective = 0.0
    for target, srcs in taxonomy.transfers.items():
        assert target not in roots and target not in srcs
        assert set(srcs) <= roots and 1 <= len(srcs) <= options.max_order
        objective += options.importance.get(target, 1.0) * _f(best[(target, srcs)], options.transform)
    covered = set(taxonomy.transfers) | (roots & set(taxonomy.affinity))
    assert covered == set(taxonomy.affinity)
    for root in roots & set(taxonomy.affinity):
        objective += options.importance.get(root, 1.0) * _f(best[(root, ("self",))], options.transform)
    assert objective == pytest.approx(taxonomy.objective, abs=1e-9)


def _random_instance(rng: np.random.Generator) -> tuple[list[Row], TaxonomyOptions]:
    n_tasks = int(rng.integers(3, 8))
    tasks = [f"t{i}" for i in range(n_tasks)]
    n_source_only = int(rng.integers(0, 3))  # tasks never measured as targets
    rows: list[Row] = []
    for t in tasks[n_source_only:]:
        rows.append((t, ("self",), float(rng.random())))
        if rng.random() < 0.3:
            rows.append((t, ("pixels",), float(rng.random())))  # a baseline: ignored by the solver
        for k in (1, 2, 3):
            for srcs in itertools.combinations(tasks, k):
                if rng.random() < (0.7 if k == 1 else 0.35):
                    value = float(rng.random() ** 2)
                    rows.append((t, srcs[::-1] if rng.random() < 0.3 else srcs, value))  # any order
    targets = sorted({t for t, _, _ in rows})
    tasks = sorted(set(targets) | {s for _, srcs, _ in rows for s in srcs} - {"self", "pixels"})
    exclude = frozenset(rng.choice(tasks, size=1)) if rng.random() < 0.15 else frozenset()
    candidates = [t for t in targets if t not in exclude]
    source_only = (
        frozenset(rng.choice(candidates, size=1)) if candidates and rng.random() < 0.2 else frozenset()
    )
    options = TaxonomyOptions(
        budget=float(rng.choice([0, 1, 1.5, 2, 2.5, 3, 4, 6])),
        max_order=int(rng.integers(1, 4)),
        exclude=exclude,
        source_only=source_only,
        importance={t: float(rng.choice([0.0, 0.5, 2.0])) for t in targets if rng.random() < 0.4},
        cost={t: float(rng.choice([0.0, 0.5, 2.0, 3.0])) for t in tasks if rng.random() < 0.4},
        transform=Transform.SQRT if rng.random() < 0.7 else Transform.NONE,
    )
    return rows, options


def _has_targets(rows: list[Row], options: TaxonomyOptions) -> bool:
    targets = {t for t, _, _ in rows} - options.exclude - options.source_only
    return bool(targets)


@pytest.mark.parametrize("seed", range(4))
def test_bip_matches_exhaustive_search_on_random_instances(seed):
    rng = np.random.default_rng(seed)
    solved = infeasible = 0
    for _ in range(60):
        rows, options = _random_instance(rng)
        if not _has_targets(rows, options):
            continue
        table = TransferTable.from_rows(rows)
        expected = _exhaustive(rows, options)
        if expected is None:
            with pytest.raises(TaskatlasError, match="too small"):
                solve_taxonomy(table, options)
            infeasible += 1
            continue
        taxonomy = solve_taxonomy(table, options)
        assert taxonomy.objective == pytest.approx(expected, abs=1e-7)
        _check_solution(taxonomy, rows, options)
        solved += 1
    assert solved >= 45 and infeasible >= 1  # 4 x 60 instances; both outcomes exercised


@pytest.mark.parametrize("linking", list(Linking))
def test_linking_forms_give_the_same_optimum(linking):
    rng = np.random.default_rng(100)
    for _ in range(40):
        rows, options = _random_instance(rng)
        if not _has_targets(rows, options):
            continue
        table = TransferTable.from_rows(rows)
        expected = _exhaustive(rows, options)
        options = replace(options, linking=linking)
        if expected is None:
            with pytest.raises(TaskatlasError):
                solve_taxonomy(table, options)
        else:
            assert solve_taxonomy(table, options).objective == pytest.approx(expected, abs=1e-7)


def _taskonomy_rows() -> list[Row]:
    with TASKONOMY_16K.open() as f:
        return [(r["target"], tuple(r["sources"].split("+")), float(r["value"])) for r in csv.DictReader(f)]


@pytest.mark.parametrize("max_order", [1, 2])
@pytest.mark.parametrize("budget", [1, 2, 3])
def test_bip_matches_exhaustive_search_on_taskonomy(budget, max_order):
    rows = _taskonomy_rows()
    table = read_affinities(TASKONOMY_16K)
    options = TaxonomyOptions(budget=budget, max_order=max_order)
    taxonomy = solve_taxonomy(table, options)
    assert taxonomy.objective == pytest.approx(_exhaustive(rows, options), abs=1e-9)
    assert len(taxonomy.roots) == budget
    _check_solution(taxonomy, rows, options)


def test_every_budget_and_order_solves_on_taskonomy():
    table = read_affinities(TASKONOMY_16K)
    assert len(table.tasks) == 26 and len(table.target_names) == 22  # `random` is a baseline, not a task
    assert "random" not in table.tasks
    for max_order in range(1, 6):
        points = sweep_budgets(table, TaxonomyOptions(max_order=max_order))
        assert [p.budget for p in points] == list(range(1, 27))
        objectives = [p.objective for p in points]
        assert None not in objectives
        assert all(a <= b + 1e-9 for a, b in itertools.pairwise(objectives))  # more budget never hurts


def test_linking_forms_agree_on_taskonomy_at_high_order():
    table = read_affinities(TASKONOMY_16K)
    results = [
        solve_taxonomy(table, TaxonomyOptions(budget=8, max_order=4, linking=linking)) for linking in Linking
    ]
    assert {r.roots for r in results} == {results[0].roots}
    assert max(r.objective for r in results) - min(r.objective for r in results) < 1e-9


def _small_table() -> TransferTable:
    return TransferTable.from_rows(
        [
            ("a", ("self",), 0.5),
            ("b", ("self",), 0.4),
            ("c", ("self",), 0.2),
            ("b", ("a",), 0.2),
            ("c", ("a", "s"), 0.3),
            ("c", ("s", "a"), 0.1),  # the same source set in another order: the best value is kept
            ("c", ("b",), 0.05),
        ]
    )


def test_sweep_reuses_the_model_and_marks_infeasible_budgets():
    points = sweep_budgets(
        _small_table(), TaxonomyOptions(max_order=2, cost={"a": 2}), budgets=[0, 1, 2, 3, 5]
    )
    assert [p.taxonomy is None for p in points] == [True, True, True, False, False]  # a must be a root
    assert points[3].taxonomy.roots == ("a", "s")  # c <- a + s beats supervising b or c
    assert points[4].taxonomy.roots == ("a", "b", "s")


def test_duplicate_source_set_keeps_its_best_value():
    taxonomy = solve_taxonomy(_small_table(), TaxonomyOptions(budget=2, max_order=2, targets={"c"}))
    assert taxonomy.transfers == {"c": ("a", "s")}
    assert taxonomy.affinity["c"] == 0.3
    assert taxonomy.objective == pytest.approx(math.sqrt(0.3))


def test_to_dict_is_the_design_json():
    taxonomy = solve_taxonomy(_small_table(), TaxonomyOptions(budget=2, max_order=1))
    assert taxonomy.to_dict() == {
        "budget": 2,
        "max_order": 1,
        "objective": pytest.approx(math.sqrt(0.5) + 2 * math.sqrt(0.2)),
        "roots": ["a", "c"],
        "transfers": {"b": ["a"]},
    }


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (TaxonomyOptions(budget=0, max_order=1), "too small"),
        (TaxonomyOptions(budget=1, max_order=1, exclude={"b"}), r"a, c have no transfer.*must be roots"),
        (TaxonomyOptions(budget=1, max_order=1, targets={"zzz"}), "targets: unknown task"),
        (TaxonomyOptions(budget=1, max_order=1, targets={"s"}), "only be a source"),
        (TaxonomyOptions(budget=1, max_order=1, cost={"nope": 2}), "cost: unknown task"),
        (TaxonomyOptions(budget=3, max_order=1, exclude={"a", "b", "c"}), "no targets"),
    ],
)
def test_infeasible_and_bad_requests_say_why(options, message):
    with pytest.raises(TaskatlasError, match=message):
        solve_taxonomy(_small_table(), options)


def test_too_small_budget_reports_the_minimum():
    table = _small_table()
    options = TaxonomyOptions(budget=3, max_order=1, cost={"a": 2, "b": 2, "c": 2})
    with pytest.raises(TaskatlasError, match=r"budget 3 is too small: covering all 3 targets.*at least 4"):
        solve_taxonomy(table, options)
    assert solve_taxonomy(table, replace(options, budget=4)).roots == ("a", "c")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"budget": -1}, "budget"),
        ({"budget": math.nan}, "budget"),
        ({"max_order": 0}, "max_order"),
        ({"importance": {"a": -1}}, "importance"),
        ({"cost": {"a": math.inf}}, "cost"),
        ({"transform": "cube"}, "transform"),
        ({"targets": {"a"}, "exclude": {"a"}}, "targets"),
    ],
)
def test_options_are_validated_once(kwargs, field):
    with pytest.raises(TaskatlasError, match=field):
        TaxonomyOptions(**kwargs)


def test_baselines_are_never_roots_or_sources_on_any_input():
    # `random` wins everything here; a baseline still must not be supervised or used as a source.
    rows = [
        ("a", ("self",), 0.2),
        ("b", ("self",), 0.2),
        ("a", ("random",), 0.9),
        ("b", ("random",), 0.9),
        ("a", ("b",), 0.1),
        ("b", ("a",), 0.1),
        ("a", ("pixels",), 0.9),
        ("b", ("pixels",), 0.9),
    ]
    table = TransferTable.from_rows(rows)
    assert "random" not in table.tasks and "pixels" not in table.tasks
    for exclude in (frozenset(), frozenset({"random"})):  # naming a baseline is allowed, not needed
        taxonomy = solve_taxonomy(table, TaxonomyOptions(budget=1, max_order=1, exclude=exclude))
        assert len(taxonomy.roots) == 1 and set(taxonomy.roots) <= {"a", "b"}
        assert all("random" not in s for s in taxonomy.transfers.values())
