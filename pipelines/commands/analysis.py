"""`taskatlas affinity` and `taskatlas solve`: Stages III and IV on files, no Ray needed.

taskatlas affinity --losses transfer_losses.parquet --out affinity.parquet     # + affinity.png
taskatlas affinity --losses transfer_losses.parquet --out affinity.parquet --bootstrap 200  # + intervals, p_best
taskatlas solve --affinities affinity.parquet --budget 4 --max-order 2 --plot taxonomy.png
taskatlas solve --losses transfer_losses.parquet --budget 4 --max-order 2 --bootstrap 200 --json  # + stability
taskatlas solve --affinities tests/data/taskonomy/affinities_16k.csv --budget 8 --max-order 4 --json
taskatlas solve --affinities FILE --max-order 3 --sweep --sweep-plot sweep.png  # objective vs budget
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from components.errors import TaskatlasError

if TYPE_CHECKING:
    from components.affinity import AffinityResult
    from components.taxonomy import SweepPoint, Taxonomy

TRANSFORMS = ("sqrt", "none")  # components.taxonomy.Transform's values, without importing scipy here


def register(sub: argparse._SubParsersAction) -> None:
    aff = sub.add_parser("affinity", help="Stage III: per-image losses -> AHP affinity table and heatmap")
    aff.add_argument(
        "--losses",
        required=True,
        type=Path,
        help="target,sources,image_id,loss[,replicate] (.parquet/.csv; Parquet is read a target at a time)",
    )
    aff.add_argument("--out", required=True, type=Path, help="affinity table to write (.parquet)")
    aff.add_argument("--heatmap", type=Path, help="heatmap PNG (default: --out with .png)")
    _bootstrap_arguments(aff, "adds affinity_lo, affinity_hi (a 95%% interval) and p_best")
    aff.set_defaults(func=_affinity)

    solve = sub.add_parser("solve", help="Stage IV: the taxonomy BIP on an affinity table")
    solve.add_argument("--affinities", type=Path, help="affinity.parquet or target,sources,order,value CSV")
    solve.add_argument(
        "--losses", type=Path, help="per-image losses instead: the affinities are computed as `affinity` does"
    )
    solve.add_argument("--budget", help="total cost of the roots (each task costs 1 unless --cost)")
    solve.add_argument("--max-order", required=True, type=int, help="largest source set a transfer may use")
    solve.add_argument("--targets", help="comma-separated targets (default: every measured target)")
    solve.add_argument("--exclude", help="comma-separated tasks to leave out entirely")
    solve.add_argument("--source-only", help="comma-separated tasks that may be roots but never targets")
    solve.add_argument("--importance", help="per-target weight r_t, e.g. rgb2depth=2,edge2d=0.5 (default 1)")
    solve.add_argument("--cost", help="per-task supervision cost, e.g. segment2d=3 (default 1)")
    solve.add_argument("--transform", default=TRANSFORMS[0], choices=TRANSFORMS)
    solve.add_argument("--sweep", action="store_true", help="also solve every budget 1..number of tasks")
    solve.add_argument("--sweep-plot", type=Path, help="objective-vs-budget PNG (implies --sweep)")
    solve.add_argument("--json", action="store_true", help="print the result as JSON")
    solve.add_argument("--plot", type=Path, help="taxonomy graph PNG (needs --budget)")
    _bootstrap_arguments(solve, "solves every resample (needs --losses, --budget): adds stability")
    solve.set_defaults(func=_solve)


def _bootstrap_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--bootstrap",
        type=int,
        metavar="N",
        help=f"N multi-bootstrap resamples (the test images, and each readout's replicates); {what}",
    )
    parser.add_argument("--seed", type=int, help="seed of the resamples (default 0; needs --bootstrap)")
    parser.add_argument(
        "--independent-seeds",
        action="store_true",
        help="replicate r of each readout had a seed of its own (transfer.pairing: independent): "
        "compare every pair of replicates, not replicate r with replicate r",
    )


def _bootstrap_request(args: argparse.Namespace) -> tuple[int, int] | None:
    """(resamples, seed), or None without --bootstrap; one-line errors for a bad request."""
    if args.bootstrap is None:
        if args.seed is not None:
            raise TaskatlasError("--seed: only used with --bootstrap N")
        return None
    if args.bootstrap < 1:
        raise TaskatlasError(f"--bootstrap: the number of resamples must be >= 1, got {args.bootstrap}")
    if args.seed is not None and args.seed < 0:
        raise TaskatlasError(f"--seed: must be >= 0, got {args.seed}")
    return args.bootstrap, 0 if args.seed is None else args.seed


def _affinity(args: argparse.Namespace) -> int:
    from components.affinity_io import write_affinity
    from components.loss_cube import describe_unlabelled
    from components.plots import plot_affinity_heatmap

    bootstrap = _bootstrap_request(args)
    result = _affinity_of(args.losses, bootstrap, not args.independent_seeds)
    table = result.table
    write_affinity(table, args.out)
    heatmap = plot_affinity_heatmap(table, args.heatmap or args.out.with_suffix(".png"))
    n_targets = len(set(table["target"].to_pylist()))
    intervals = "" if bootstrap is None else f", 95% intervals and p_best over {bootstrap[0]} resamples"
    print(f"wrote {args.out} ({table.num_rows} rows, {n_targets} targets{intervals}) and {heatmap}")
    if bootstrap is not None and max(result.replicates.values()) == 1:
        print(_NOT_MEASURED)
    if result.unlabelled:
        print(describe_unlabelled(result.unlabelled))
    return 0


_NOT_MEASURED = (
    "one replicate per readout: the resamples cover which test images were drawn, not how each "
    "readout happened to train (training noise not measured)"
)


def _affinity_of(path: Path, bootstrap: tuple[int, int] | None, paired: bool) -> AffinityResult:
    """Stage III on a loss file, one target's rows in memory at a time (a Parquet file is read by
    the row groups holding each target); with a bootstrap, over the file's image ids. `paired`:
    replicate r of every candidate shares its seed."""
    from components.affinity import affinity_by_target
    from components.affinity_io import LossFile

    losses = LossFile(path)
    resamples, seed = bootstrap or (0, 0)
    image_ids = losses.image_ids() if resamples else None
    return affinity_by_target(losses.targets, losses.read_target, resamples, seed, image_ids, paired=paired)


def _solve(args: argparse.Namespace) -> int:
    # Only what this request needs is imported: a plain solve answers in well under a second.
    from components.affinity_io import read_affinities, transfer_table
    from components.taxonomy import TaxonomyOptions, Transform, solve_taxonomy, sweep_budgets

    sweep = args.sweep or args.sweep_plot is not None
    if args.budget is None and not sweep:
        raise TaskatlasError("--budget is required (or --sweep for every budget)")
    if args.plot is not None and args.budget is None:
        raise TaskatlasError("--plot draws the taxonomy of one budget: give --budget")
    if (args.affinities is None) == (args.losses is None):
        raise TaskatlasError("give exactly one of --affinities FILE and --losses FILE")
    bootstrap = _bootstrap_request(args)
    if bootstrap is not None and args.losses is None:
        raise TaskatlasError("--bootstrap resamples test images: it needs --losses (per-image losses)")
    if bootstrap is not None and args.budget is None:
        raise TaskatlasError("--bootstrap measures the stability of one taxonomy: give --budget")
    options = TaxonomyOptions(
        budget=_number("--budget", args.budget) if args.budget is not None else 1.0,
        max_order=args.max_order,
        targets=_names(args.targets) or None,
        exclude=_names(args.exclude),
        source_only=_names(args.source_only),
        importance=_weights("--importance", args.importance),
        cost=_weights("--cost", args.cost),
        transform=Transform(args.transform),
    )
    measured = (
        None if args.losses is None else _affinity_of(args.losses, bootstrap, not args.independent_seeds)
    )
    table = read_affinities(args.affinities) if measured is None else transfer_table(measured.table)
    taxonomy = solve_taxonomy(table, options) if args.budget is not None else None
    stability = None
    if bootstrap is not None and measured is not None and taxonomy is not None:
        from components.bootstrap import stability_of_rows

        rows = measured.table.select(["target", "sources"]).to_pydict()
        sources = [tuple(s) for s in rows["sources"]]
        stability = {"resamples": bootstrap[0], "seed": bootstrap[1]}
        stability |= stability_of_rows(rows["target"], sources, measured.predictive, options, taxonomy)
    points = sweep_budgets(table, options) if sweep else None
    if args.json:
        result = taxonomy.to_dict() if taxonomy else {"max_order": options.max_order}
        if stability is not None:
            result["stability"] = stability
        if points is not None:
            result["sweep"] = [_point_dict(p) for p in points]
        print(json.dumps(result, indent=2))
    else:
        if taxonomy:
            print(_summary(taxonomy))
        if taxonomy and stability is not None:
            print(_stability_summary(taxonomy, stability))
            if max(measured.replicates.values()) == 1:
                print(_NOT_MEASURED)
        if points is not None:
            print(_sweep_table(points))
    notes = sys.stderr if args.json else sys.stdout  # keep stdout pure JSON
    if args.plot is not None and taxonomy:
        from components.plots import plot_taxonomy

        print(f"wrote {plot_taxonomy(taxonomy, args.plot)}", file=notes)
    if args.sweep_plot is not None and points is not None:
        from components.plots import plot_sweep

        print(f"wrote {plot_sweep(points, args.sweep_plot, options.max_order)}", file=notes)
    return 0


def _summary(taxonomy: Taxonomy) -> str:
    lines = [
        f"taxonomy at budget {taxonomy.budget:g}, max order {taxonomy.max_order}",
        f"roots ({len(taxonomy.roots)}): {', '.join(taxonomy.roots)}",
    ]
    supervised = [r for r in taxonomy.roots if r in taxonomy.affinity]
    width = max(map(len, list(taxonomy.affinity) or [""]))
    for root in supervised:
        lines.append(f"  {root:<{width}}  <- self (root)  affinity {taxonomy.affinity[root]:.4g}")
    for target, sources in taxonomy.transfers.items():
        lines.append(
            f"  {target:<{width}}  <- {' + '.join(sources)}  affinity {taxonomy.affinity[target]:.4g}"
        )
    lines.append(f"objective {taxonomy.objective:.6g}")
    return "\n".join(lines)


def _stability_summary(taxonomy: Taxonomy, stability: dict) -> str:
    """The chosen roots and transfers with the fraction of resamples that choose each."""
    lines = [
        f"stability over {stability['resamples']} resamples of the test images (seed {stability['seed']}): "
        f"this exact taxonomy in {stability['taxonomy']:.0%}"
    ]
    roots = ", ".join(f"{r} {stability['roots'].get(r, 0.0):.0%}" for r in taxonomy.roots)
    lines.append(f"  roots: {roots}")
    for target, sources in taxonomy.transfers.items():
        share = stability["transfers"].get(target, {}).get("+".join(sources), 0.0)
        lines.append(f"  {target} <- {' + '.join(sources)}: {share:.0%}")
    return "\n".join(lines)


def _sweep_table(points: tuple[SweepPoint, ...]) -> str:
    lines = ["", "budget  objective  roots"]
    for p in points:
        if p.taxonomy is None:
            lines.append(f"{p.budget:>6g}  {'infeasible':>9}")
        else:
            lines.append(f"{p.budget:>6g}  {p.objective:>9.5f}  {', '.join(p.taxonomy.roots)}")
    return "\n".join(lines)


def _point_dict(point: SweepPoint) -> dict:
    if point.taxonomy is None:
        budget = int(point.budget) if float(point.budget).is_integer() else point.budget
        return {"budget": budget, "objective": None, "roots": None, "transfers": None}
    result = point.taxonomy.to_dict()
    del result["max_order"]
    return result


def _names(text: str | None) -> frozenset[str]:
    return frozenset(name.strip() for name in (text or "").split(",") if name.strip())


def _number(flag: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TaskatlasError(f"{flag}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise TaskatlasError(f"{flag}: {text!r} is not a finite number")
    return value


def _weights(flag: str, text: str | None) -> dict[str, float]:
    """`a=1,b=2.5` -> {"a": 1.0, "b": 2.5}; errors name the flag and the item."""
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        task, sep, value = item.partition("=")
        if not sep or not task.strip():
            raise TaskatlasError(f"{flag}: expected task=number, got {item!r}")
        if task.strip() in weights:
            raise TaskatlasError(f"{flag}: {task.strip()!r} given twice")
        weights[task.strip()] = _number(f"{flag} {task.strip()}", value.strip())
    return weights
