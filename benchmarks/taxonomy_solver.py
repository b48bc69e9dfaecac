"""Time the taxonomy BIP on Taskonomy's released 16k affinities (26 tasks, 22 targets; `random` is a baseline).

    .venv/bin/python benchmarks/taxonomy_solver.py                     # all three linking forms
    .venv/bin/python benchmarks/taxonomy_solver.py --linking per_target --repeats 9

Times `solve_taxonomy` (model building included, file reading not) at budgets 2, 8, 12 and max
orders 1, 4, 5, median of --repeats runs, and the full budget sweep (1..26) at max order 5.
Each linking form is timed the same way; their objectives must agree. The last line printed is
one JSON object (`max_solve_s`, `sweep_order5_s` for the default form, and the other forms').
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from a checkout, installed or not

from components.affinity_io import read_affinities  # noqa: E402
from components.taxonomy import Linking, TaxonomyOptions, solve_taxonomy, sweep_budgets  # noqa: E402

DEFAULT_AFFINITIES = ROOT / "tests" / "data" / "taskonomy" / "affinities_16k.csv"  # see its README.md
BUDGETS = (2, 8, 12)
ORDERS = (1, 4, 5)
SWEEP_ORDER = 5


def _median_seconds(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _bench(table, linking: Linking, repeats: int) -> dict:
    solves, objectives = {}, {}
    for order in ORDERS:
        for budget in BUDGETS:
            options = TaxonomyOptions(budget=budget, max_order=order, linking=linking)
            seconds, taxonomy = _median_seconds(lambda o=options: solve_taxonomy(table, o), repeats)
            solves[f"order{order}_budget{budget}"] = round(seconds, 4)
            objectives[(order, budget)] = taxonomy.objective
            print(
                f"{linking.value:>10}  order {order}  budget {budget:>2}  {seconds:8.4f} s  objective {taxonomy.objective:.6f}"
            )
    options = TaxonomyOptions(max_order=SWEEP_ORDER, linking=linking)
    sweep_s, points = _median_seconds(lambda: sweep_budgets(table, options), max(1, repeats // 3))
    print(f"{linking.value:>10}  sweep of {len(points)} budgets at order {SWEEP_ORDER}: {sweep_s:.3f} s")
    return {
        "max_solve_s": max(solves.values()),
        "sweep_order5_s": round(sweep_s, 4),
        "solve_s": solves,
        "objectives": objectives,
        "sweep_objectives": [p.objective for p in points],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--affinities", type=Path, default=DEFAULT_AFFINITIES)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--linking", choices=["all", *(f.value for f in Linking)], default="all")
    args = parser.parse_args()

    table = read_affinities(args.affinities)
    default = TaxonomyOptions().linking
    forms = list(Linking) if args.linking == "all" else [Linking(args.linking)]
    forms.sort(key=lambda f: f is not default)
    results = {
        f: _bench(table, f, args.repeats if f is default else max(1, args.repeats // 2)) for f in forms
    }

    first = results[forms[0]]
    agree = all(
        abs(r["objectives"][k] - first["objectives"][k]) < 1e-9
        for r in results.values()
        for k in first["objectives"]
    ) and all(
        abs(a - b) < 1e-9
        for r in results.values()
        for a, b in zip(r["sweep_objectives"], first["sweep_objectives"], strict=True)
    )
    summary = {
        "affinities": args.affinities.name,
        "linking": forms[0].value,
        "max_solve_s": first["max_solve_s"],
        "sweep_order5_s": first["sweep_order5_s"],
        "solve_s": first["solve_s"],
        "other_linking": {
            f.value: {"max_solve_s": r["max_solve_s"], "sweep_order5_s": r["sweep_order5_s"]}
            for f, r in results.items()
            if f is not forms[0]
        },
        "objectives_agree": agree,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
