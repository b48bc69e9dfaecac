"""Stage IV: the taxonomy, a binary integer program over roots and transfers (design.md section 6).

Roots get full supervision; every other target takes exactly one transfer whose sources are all
roots, and the roots' total cost stays within the budget. HiGHS (`scipy.optimize.milp`) solves it.
The model is built once from numpy index arrays into one sparse constraint matrix; a budget sweep
reuses it and only changes the budget row's bound.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from types import MappingProxyType

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from components.errors import TaskatlasError
from components.transfer_table import BASELINES, TransferTable

VALUE_CLIP = (1e-5, 1.0)  # f(affinity) is clipped to this range, as in Taskonomy's solver backend
_MIP_REL_GAP = 1e-9  # HiGHS defaults to 1e-4; we want the optimum, not a near-optimum
# HiGHS presolve costs more than it saves here: with the per-target linking rows the root LP is
# nearly integral. Measured on Taskonomy 16k, max order 1-5, budgets 1-27 (2 CPUs): worst solve
# 0.11 s with presolve, 0.05 s without.
_PRESOLVE = False


class Transform(str, Enum):
    """f in the objective: how an affinity becomes a transfer's value."""

    SQRT = "sqrt"
    NONE = "none"


class Linking(str, Enum):
    """How `x_e` is tied to its sources' roots; all three give the same optimum.

    PER_TARGET is valid because at most one transfer into t is chosen, and implies the other two;
    its LP relaxation is the tightest (benchmarks/taxonomy_solver.py: ~30x faster at order 4-5).
    """

    PER_TARGET = "per_target"  # sum_{e into t, s in S(e)} x_e <= y_s per (t, s): tightest, fastest
    PER_SOURCE = "per_source"  # x_e <= y_s for each s in S(e)
    AGGREGATED = "aggregated"  # |S(e)| x_e <= sum_{s in S(e)} y_s, as written in design.md


def transform_values(affinity: np.ndarray, transform: Transform) -> np.ndarray:
    """f(affinity): sqrt (default) or identity, clipped to VALUE_CLIP either way."""
    values = np.sqrt(affinity) if transform is Transform.SQRT else np.asarray(affinity, dtype=float)
    return np.clip(values, *VALUE_CLIP)


@dataclass(frozen=True)
class TaxonomyOptions:
    """What to solve for. `targets=None` means every task measured as a target.

    Tasks that appear only as sources are never targets; `source_only` adds more; `exclude`
    removes tasks entirely (neither root, target nor source). `importance` (r_t) and `cost`
    default to 1 for tasks not named.
    """

    budget: float = 1.0
    max_order: int = 1
    targets: frozenset[str] | None = None
    exclude: frozenset[str] = frozenset()
    source_only: frozenset[str] = frozenset()
    importance: Mapping[str, float] = field(default_factory=dict)
    cost: Mapping[str, float] = field(default_factory=dict)
    transform: Transform = Transform.SQRT
    linking: Linking = Linking.PER_TARGET

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        if not _is_number(self.budget) or self.budget < 0:
            raise TaskatlasError(f"budget: must be a finite number >= 0, got {self.budget!r}")
        if isinstance(self.max_order, bool) or not isinstance(self.max_order, int) or self.max_order < 1:
            raise TaskatlasError(f"max_order: must be an integer >= 1, got {self.max_order!r}")
        for name in ("importance", "cost"):
            weights = dict(getattr(self, name))
            for task, weight in weights.items():
                if not _is_number(weight) or weight < 0:
                    raise TaskatlasError(f"{name}: {task}={weight!r} must be a finite number >= 0")
            set_(name, MappingProxyType({t: float(w) for t, w in weights.items()}))
        for name in ("exclude", "source_only"):
            set_(name, frozenset(getattr(self, name)))
        if self.targets is not None:
            set_("targets", frozenset(self.targets))
            for name in ("exclude", "source_only"):
                if clash := self.targets & getattr(self, name):
                    raise TaskatlasError(f"targets: {', '.join(sorted(clash))} also given in {name}")
        try:
            set_("transform", Transform(self.transform))
            set_("linking", Linking(self.linking))
        except ValueError as err:
            raise TaskatlasError(f"transform/linking: {err}") from None


@dataclass(frozen=True)
class Taxonomy:
    """A solution: the roots, and each non-root target's transfer with its affinity."""

    budget: float
    max_order: int
    objective: float
    roots: tuple[str, ...]  # sorted
    transfers: Mapping[str, tuple[str, ...]]  # non-root target -> sorted sources
    affinity: Mapping[str, float]  # every target -> affinity of what it uses (self for roots)

    def to_dict(self) -> dict:
        """The JSON form of design.md section 6."""
        budget = int(self.budget) if float(self.budget).is_integer() else self.budget
        return {
            "budget": budget,
            "max_order": self.max_order,
            "objective": self.objective,
            "roots": list(self.roots),
            "transfers": {t: list(s) for t, s in sorted(self.transfers.items())},
        }


@dataclass(frozen=True)
class SweepPoint:
    budget: float
    taxonomy: Taxonomy | None  # None: no taxonomy fits this budget

    @property
    def objective(self) -> float | None:
        return None if self.taxonomy is None else self.taxonomy.objective


def solve_taxonomy(table: TransferTable, options: TaxonomyOptions) -> Taxonomy:
    """The optimal taxonomy; TaskatlasError saying why if none fits the budget."""
    model = _build_model(table, options)
    _check_forced_roots(model, options.budget)
    solution = model.solve(options.budget)
    if solution is None:
        minimum = model.min_budget()
        raise TaskatlasError(
            f"budget {options.budget:g} is too small: covering all {len(model.target_y)} targets with "
            f"transfers of order <= {options.max_order} needs roots costing at least {minimum:g}"
        )
    return model.taxonomy(solution, options)


def sweep_budgets(
    table: TransferTable, options: TaxonomyOptions, budgets: Iterable[float] | None = None
) -> tuple[SweepPoint, ...]:
    """Solve for each budget (default 1..number of tasks) with one model: the objective-vs-budget curve."""
    model = _build_model(table, options)
    if budgets is None:
        budgets = range(1, len(model.tasks) + 1)
    points = []
    for budget in budgets:
        budget_options = replace(options, budget=budget)
        solution = model.solve(budget) if model.forced_cost <= budget else None
        taxonomy = None if solution is None else model.taxonomy(solution, budget_options)
        points.append(SweepPoint(budget=budget, taxonomy=taxonomy))
    return tuple(points)


@dataclass(frozen=True, eq=False)
class _Model:
    """The BIP over z = [y (one per task), x (one per allowed transfer)]; the budget is row 0."""

    tasks: tuple[str, ...]  # names of the y variables
    target_y: np.ndarray  # (T,) y index of each target
    edge_target: np.ndarray  # (E,) y index of each transfer's target
    edge_sources: np.ndarray  # (E, K) y indices of its sources, -1 padded
    edge_affinity: np.ndarray  # (E,)
    self_affinity: np.ndarray  # (n_y,) NaN where not a target
    cost: np.ndarray  # (n_y,)
    gain: np.ndarray  # (n_y + E,) objective coefficients, to maximize
    matrix: sparse.csr_array
    lower: np.ndarray
    upper: np.ndarray
    forced_cost: float  # cost of the targets that have no transfer and so must be roots

    def solve(self, budget: float) -> np.ndarray | None:
        """The optimal 0/1 vector z, or None when infeasible."""
        upper = self.upper.copy()
        upper[0] = budget
        return _milp(-self.gain, LinearConstraint(self.matrix, self.lower, upper))

    def min_budget(self) -> float:
        """The cheapest root set that covers every target (no budget row)."""
        objective = np.concatenate([self.cost, np.zeros(len(self.edge_target))])
        rows = LinearConstraint(self.matrix[1:], self.lower[1:], self.upper[1:])
        z = _milp(objective, rows)
        return math.inf if z is None else float(objective @ z)

    def taxonomy(self, z: np.ndarray, options: TaxonomyOptions) -> Taxonomy:
        n_y = len(self.tasks)
        roots = np.flatnonzero(z[:n_y])
        chosen = np.flatnonzero(z[n_y:])
        transfers = {
            self.tasks[t]: tuple(sorted(self.tasks[s] for s in srcs if s >= 0))
            for t, srcs in zip(self.edge_target[chosen], self.edge_sources[chosen], strict=True)
        }
        affinity = {self.tasks[t]: float(self.self_affinity[t]) for t in np.intersect1d(roots, self.target_y)}
        affinity |= {
            self.tasks[t]: float(a)
            for t, a in zip(self.edge_target[chosen], self.edge_affinity[chosen], strict=True)
        }
        return Taxonomy(
            budget=options.budget,
            max_order=options.max_order,
            objective=float(self.gain @ z),
            roots=tuple(sorted(self.tasks[r] for r in roots)),
            transfers=MappingProxyType(dict(sorted(transfers.items()))),
            affinity=MappingProxyType(dict(sorted(affinity.items()))),
        )


def _milp(objective: np.ndarray, rows: LinearConstraint) -> np.ndarray | None:
    result = milp(
        objective,
        integrality=np.ones(len(objective)),
        bounds=Bounds(0, 1),
        constraints=rows,
        options={"mip_rel_gap": _MIP_REL_GAP, "presolve": _PRESOLVE},
    )
    if result.status == 2:
        return None
    if result.x is None:
        raise TaskatlasError(f"the BIP solver stopped without a solution: {result.message}")
    return np.round(result.x).astype(bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_names(options: TaxonomyOptions, table: TransferTable) -> None:
    known = set(table.tasks) | set(BASELINES)  # naming a baseline is harmless: it is never in the BIP
    for name in ("targets", "exclude", "source_only", "importance", "cost"):
        given = getattr(options, name) or ()
        if unknown := sorted(set(given) - known):
            raise TaskatlasError(
                f"{name}: unknown task(s) {', '.join(unknown)} (known: {', '.join(table.tasks)})"
            )
    if options.targets is not None and (not_targets := sorted(options.targets - set(table.target_names))):
        raise TaskatlasError(
            f"targets: {', '.join(not_targets)} has no transfer into it, so it can only be a source"
        )


def _build_model(table: TransferTable, options: TaxonomyOptions) -> _Model:
    _check_names(options, table)
    names = np.array(table.tasks, dtype=object)
    keep = ~np.isin(names, list(options.exclude))
    is_target = table.is_target & keep & ~np.isin(names, list(options.source_only))
    if options.targets is not None:
        is_target &= np.isin(names, list(options.targets))
    if not is_target.any():
        raise TaskatlasError("no targets left to solve for (all excluded or source-only)")
    if missing := list(names[is_target & np.isnan(table.self_value)]):
        raise TaskatlasError(
            f"target(s) {', '.join(missing)} have no 'self' affinity (their value as a root)"
        )
    y_of_task = np.where(keep, np.cumsum(keep) - 1, -1)
    n_y = int(keep.sum())

    sources = table.sources
    valid = sources >= 0
    edges = np.flatnonzero(
        (table.order <= options.max_order)
        & is_target[table.target]
        & np.where(valid, keep[sources], True).all(axis=1)
        & ~(sources == table.target[:, None]).any(axis=1)
    )
    edge_target = y_of_task[table.target[edges]]
    edge_sources = np.where(valid[edges], y_of_task[sources[edges]], -1)[:, : options.max_order]
    tasks = tuple(names[keep])
    importance = np.array([options.importance.get(t, 1.0) for t in tasks])
    cost = np.array([options.cost.get(t, 1.0) for t in tasks])
    self_affinity = np.where(is_target, table.self_value, np.nan)[keep]
    target_y = np.flatnonzero(is_target[keep])
    gain_y = np.zeros(n_y)
    gain_y[target_y] = importance[target_y] * transform_values(self_affinity[target_y], options.transform)
    edge_affinity = table.value[edges]
    gain_x = importance[edge_target] * transform_values(edge_affinity, options.transform)

    matrix, lower, upper = _constraints(n_y, target_y, edge_target, edge_sources, cost, options.linking)
    has_edge = np.isin(target_y, edge_target)
    return _Model(
        tasks=tasks,
        target_y=target_y,
        edge_target=edge_target,
        edge_sources=edge_sources,
        edge_affinity=edge_affinity,
        self_affinity=self_affinity,
        cost=cost,
        gain=np.concatenate([gain_y, gain_x]),
        matrix=matrix,
        lower=lower,
        upper=upper,
        forced_cost=float(cost[target_y[~has_edge]].sum()),
    )


def _constraints(
    n_y: int,
    target_y: np.ndarray,
    edge_target: np.ndarray,
    edge_sources: np.ndarray,
    cost: np.ndarray,
    linking: Linking,
) -> tuple[sparse.csr_array, np.ndarray, np.ndarray]:
    """Rows: budget (0), one cover row per target, then the linking rows; built from index arrays."""
    n_e, n_t = len(edge_target), len(target_y)
    x_col = n_y + np.arange(n_e)
    cover_row = np.full(n_y, -1)
    cover_row[target_y] = 1 + np.arange(n_t)
    pair_edge, pair_k = np.nonzero(edge_sources >= 0)  # one pair per (transfer, source)
    pair_source = edge_sources[pair_edge, pair_k]
    n_pairs = len(pair_edge)
    if linking is Linking.PER_TARGET:  # row per (t, s): sum of x_e into t using s, minus y_s
        keys, x_row = np.unique(edge_target[pair_edge] * n_y + pair_source, return_inverse=True)
        n_link, y_row, y_col = len(keys), np.arange(len(keys)), keys % n_y
        x_link_col, x_val = x_col[pair_edge], np.ones(n_pairs)
    elif linking is Linking.PER_SOURCE:  # row per (e, s): x_e - y_s
        n_link, x_row, y_row, y_col = n_pairs, np.arange(n_pairs), np.arange(n_pairs), pair_source
        x_link_col, x_val = x_col[pair_edge], np.ones(n_pairs)
    else:  # row per e: |S(e)| x_e - sum_{s in S(e)} y_s
        n_link, x_row, y_row, y_col = n_e, np.arange(n_e), pair_edge, pair_source
        x_link_col, x_val = x_col, (edge_sources >= 0).sum(axis=1).astype(float)
    first_link = 1 + n_t
    rows = np.concatenate(
        [np.zeros(n_y), cover_row[target_y], cover_row[edge_target], first_link + x_row, first_link + y_row]
    )
    cols = np.concatenate([np.arange(n_y), target_y, x_col, x_link_col, y_col])
    vals = np.concatenate([cost, np.ones(n_t), np.ones(n_e), x_val, -np.ones(len(y_col))])
    shape = (first_link + n_link, n_y + n_e)
    matrix = sparse.coo_array((vals, (rows.astype(np.int64), cols.astype(np.int64))), shape=shape).tocsr()
    lower = np.concatenate([[-np.inf], np.ones(n_t), np.full(n_link, -np.inf)])
    upper = np.concatenate([[np.inf], np.ones(n_t), np.zeros(n_link)])
    return matrix, lower, upper


def _check_forced_roots(model: _Model, budget: float) -> None:
    if model.forced_cost > budget:
        lonely = sorted(set(model.target_y) - set(model.edge_target))
        raise TaskatlasError(
            f"budget {budget:g} is too small: target(s) {', '.join(model.tasks[t] for t in lonely)} have no "
            f"transfer within the allowed order and sources, so they must be roots, costing {model.forced_cost:g}"
        )
