"""Stages III + IV at Taskonomy scale on generated per-image losses, one target's table at a time.

    .venv/bin/python benchmarks/analysis_scale.py                  # about 1.5 minutes on 2 cores
    .venv/bin/python benchmarks/analysis_scale.py --images 2000 --bootstrap 20   # a quick look
    .venv/bin/python benchmarks/analysis_scale.py --data /tmp/losses --profile   # keep the files; cProfile
    .venv/bin/python benchmarks/analysis_scale.py --data /tmp/losses --budget 8  # reuse them, harder BIP
    .venv/bin/python benchmarks/analysis_scale.py --replicates 3   # 60 M rows: the multi-bootstrap
    .venv/bin/python benchmarks/analysis_scale.py --replicates 3 --replicate-groups 20  # nested, faster

Generates Stage II's output as it will be written, one Parquet table per target (`<target>.parquet`,
columns `target, sources, image_id, loss, replicate`): 26 targets, every first-order source (the 25
other tasks, `self`, `random`, `pixels`) plus the 2- and 3-subsets of each target's top 5 sources
(48 per target), 16,000 test images, `--replicates` R trainings of every readout but `self`: about
20 million rows at R = 1, 60 million at R = 3. A replicate's loss on an image is its readout's plus
seed noise (per image, and a shift per replicate). Sources differ in reach (`--hubs`): a few serve
many targets, as Taskonomy found; with `--hubs 0` (or `--no-hub`) every task is a point in space
and the BIP becomes a facility-location problem that HiGHS needs seconds per solve to close.

Then, in a fresh subprocess so that the figures exclude generation: `affinity_by_target` with a
bootstrap (the study's image ids from the tables' `image_id` columns, then reading each target's
table, win rates, AHP, resamples), the taxonomy at one budget,
the budget sweep, and the stability of the chosen taxonomy over the resamples, as
`pipelines/analysis/run.py` does. Goal (issue 11): under 60 s and 4 GB. The last line printed is
one JSON object: `wall_s` (the analysis, imports excluded), `cpu_s`, `peak_rss_gb` (the analysis
process's peak resident memory) and the split per part. On a shared machine `cpu_s` is the steadier
figure; `--blas-threads 1` keeps OpenBLAS from spinning on a busy one.
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import json
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from a checkout, installed or not

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


def _task_names(n: int) -> list[str]:
    return [f"task{i:02d}" for i in range(n)]


def _write_target(
    out: Path,
    target: str,
    position: dict[str, np.ndarray],
    reach: dict[str, float],
    images: int,
    beam: int,
    replicates: int,
    rng,
) -> int:
    """One target's loss table. A task is a point in 3-D with a reach; a source's loss on an image is
    the image's difficulty times exp(distance to the target - the source's reach + noise), so closer
    and more general sources win more often but not always; a k-subset of the top sources is a
    little better than its best member. Replicate r of a readout (`self`: replicate 0 only)
    multiplies that by exp(seed noise): 0.4 per image, 0.1 per replicate (standard deviations)."""
    others = [t for t in position if t != target]
    cost = {s: float(np.linalg.norm(position[s] - position[target])) - reach[s] for s in others}
    top = sorted(others, key=cost.get)[:beam]
    shift = {(s,): c for s, c in cost.items()}
    shift |= {("self",): min(cost.values()) - 0.3, ("random",): max(cost.values()) + 1.0}
    shift[("pixels",)] = max(cost.values())
    for k in (2, 3):
        shift |= {c: min(cost[s] for s in c) - 0.1 * k for c in itertools.combinations(top, k)}
    sets = sorted(shift)
    difficulty = rng.exponential(size=images)
    loss = difficulty * np.exp(
        np.array([shift[s] for s in sets])[:, None] + rng.normal(size=(len(sets), images))
    )
    loss = loss[:, None]  # (candidates, replicates, images); with R = 1 the data of before replicates
    if replicates > 1:
        seed_noise = 0.4 * rng.normal(size=(len(sets), replicates, images))
        loss = loss * np.exp(seed_noise + 0.1 * rng.normal(size=(len(sets), replicates, 1)))
    loss = loss.astype(np.float32)  # as the readouts record them
    if rng.random() < 0.3:  # some targets have images without a valid label: NaN for every source
        loss[:, :, rng.random(images) < 0.01] = np.nan
    blocks = [(c, r) for c in range(len(sets)) for r in range(1 if sets[c] == ("self",) else replicates)]
    names = sorted({s for c in sets for s in c})
    index = {s: i for i, s in enumerate(names)}
    lengths = np.repeat([len(sets[c]) for c, _ in blocks], images)  # rows: source set, replicate, image
    members = np.concatenate([np.tile([index[s] for s in sets[c]], images) for c, _ in blocks])
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    sources = pa.ListArray.from_arrays(offsets, pc.take(pa.array(names), pa.array(members)))
    ids = pa.array([f"test-{i:07d}" for i in range(images)])
    table = pa.table(
        {
            "target": pc.take(pa.array([target]), pa.array(np.zeros(len(lengths), dtype=np.int32))),
            "sources": sources,
            "image_id": pc.take(ids, pa.array(np.tile(np.arange(images), len(blocks)))),
            "loss": pa.array(np.concatenate([loss[c, r] for c, r in blocks])),
            "replicate": pa.array(np.repeat([r for _, r in blocks], images).astype(np.int32)),
        }
    )
    pq.write_table(table, out / f"{target}.parquet")
    return table.num_rows


def generate(
    out: Path, n_tasks: int, images: int, beam: int, hubs: float, replicates: int, seed: int
) -> dict:
    """Every target's table; `hubs` is the mean reach (exponential), 0 for none."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    position = dict(zip(_task_names(n_tasks), rng.normal(size=(n_tasks, 3)), strict=True))
    reach = dict(zip(position, rng.exponential(hubs, n_tasks) if hubs else np.zeros(n_tasks), strict=True))
    start = time.perf_counter()
    rows = sum(_write_target(out, t, position, reach, images, beam, replicates, rng) for t in position)
    return {"rows": rows, "generate_s": round(time.perf_counter() - start, 2)}


def analyse(
    data: Path, bootstrap: int, seed: int, groups: int | None, budget: int, max_order: int, profile: bool
) -> dict:
    """The measured part, in its own process: Stage III per target, then Stage IV."""
    from components.affinity import affinity_by_target, study_image_ids
    from components.affinity_io import read_losses, transfer_table
    from components.bootstrap import stability_of_rows
    from components.taxonomy import TaxonomyOptions, solve_taxonomy, sweep_budgets

    targets = sorted(p.stem for p in data.glob("*.parquet"))
    parts = {"read_s": 0.0}

    def read_target(target: str) -> pa.Table:
        start = time.perf_counter()
        table = read_losses(data / f"{target}.parquet")
        parts["read_s"] += time.perf_counter() - start
        return table

    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    start, cpu = time.perf_counter(), time.process_time()
    # the study's image ids from the `image_id` columns alone, as the pipeline reads them
    columns = (
        pq.read_table(data / f"{t}.parquet", columns=["image_id"], read_dictionary=["image_id"])
        for t in targets
    )
    image_ids = study_image_ids(columns) if bootstrap else None
    parts["read_s"] += time.perf_counter() - start
    result = affinity_by_target(targets, read_target, bootstrap, seed, image_ids, replicate_groups=groups)
    parts["affinity_s"] = time.perf_counter() - start - parts["read_s"]  # cube, win rates, AHP, resamples
    mark = time.perf_counter()
    table = transfer_table(result.table)
    options = TaxonomyOptions(budget=budget, max_order=max_order)
    chosen = solve_taxonomy(table, options)
    parts["solve_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    sweep = sweep_budgets(table, options)
    parts["sweep_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    # the draws the stability reads, as the pipeline stores and reloads them
    samples = result.predictive.astype(np.float32).astype(np.float64)
    rows = result.table.select(["target", "sources"]).to_pydict()
    stability = stability_of_rows(
        rows["target"], [tuple(s) for s in rows["sources"]], samples, options, chosen
    )
    parts["stability_s"] = time.perf_counter() - mark
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    if profiler:
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),  # all threads; above wall_s where BLAS runs on several
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3),
        **{k: round(v, 2) for k, v in parts.items()},
        "targets": len(targets),
        "affinity_rows": result.table.num_rows,
        "candidates_per_target": round(result.table.num_rows / len(targets), 1),
        "roots": list(chosen.roots),
        "stability": stability["taxonomy"],
        "sweep_budgets": len(sweep),
        "unlabelled_targets": len(result.unlabelled),
        "replicates": max(result.replicates.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=26, help="tasks; each is a target")
    parser.add_argument("--images", type=int, default=16_000, help="test images per target")
    parser.add_argument("--beam", type=int, default=5, help="top sources whose 2- and 3-subsets are measured")
    parser.add_argument(
        "--hubs",
        type=float,
        default=0.5,
        help="mean reach of a source (some tasks serve many, as in Taskonomy); 0: none, a hard BIP",
    )
    parser.add_argument("--no-hub", action="store_true", help="hub-free tables: the same as --hubs 0")
    parser.add_argument(
        "--replicates",
        type=int,
        default=1,
        help="trainings of each readout (self: one); 1: no replicate noise",
    )
    parser.add_argument("--bootstrap", type=int, default=100)
    parser.add_argument(
        "--replicate-groups",
        type=int,
        help="distinct replicate draws, each shared by bootstrap/G image weights (default: one per resample)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=int, default=3, help="roots (the pipeline's default, 3)")
    parser.add_argument("--max-order", type=int, default=3)
    parser.add_argument("--data", type=Path, help="keep the generated tables here (reused if present)")
    parser.add_argument("--profile", action="store_true", help="cProfile the analysis (to stderr)")
    parser.add_argument(
        "--blas-threads", type=int, help="OPENBLAS_NUM_THREADS for the analysis (default: as inherited)"
    )
    parser.add_argument("--analyse", type=Path, help=argparse.SUPPRESS)  # the subprocess's entry
    args = parser.parse_args()
    hubs = 0.0 if args.no_hub else args.hubs
    if args.analyse:
        figures = analyse(
            args.analyse,
            args.bootstrap,
            args.seed,
            args.replicate_groups,
            args.budget,
            args.max_order,
            args.profile,
        )
        print(json.dumps(figures))
        return

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp) / "losses"
        if args.data and any(data.glob("*.parquet")):
            made = {
                "rows": sum(pq.read_metadata(p).num_rows for p in data.glob("*.parquet")),
                "generate_s": None,
            }
        else:
            made = generate(data, args.tasks, args.images, args.beam, hubs, args.replicates, args.seed)
        size = sum(p.stat().st_size for p in data.glob("*.parquet"))
        print(
            f"{made['rows']:,} rows in {args.tasks} per-target tables, {size / 1e6:.0f} MB, generated in {made['generate_s']} s"
        )
        command = [sys.executable, __file__, "--analyse", str(data), "--bootstrap", str(args.bootstrap)]
        command += [
            "--seed",
            str(args.seed),
            "--budget",
            str(args.budget),
            "--max-order",
            str(args.max_order),
            *(["--replicate-groups", str(args.replicate_groups)] if args.replicate_groups else []),
        ]
        start = time.perf_counter()
        blas = {"OPENBLAS_NUM_THREADS": str(args.blas_threads)} if args.blas_threads else {}
        child = subprocess.run(
            [*command, *(["--profile"] if args.profile else [])],
            check=True,
            stdout=subprocess.PIPE,
            text=True,
            env=os.environ | blas,
        )
        process_s = time.perf_counter() - start
    figures = json.loads(child.stdout.strip().splitlines()[-1])
    for key in ("read_s", "affinity_s", "solve_s", "sweep_s", "stability_s"):
        print(f"{key:>12} {figures[key]:7.2f}")
    summary = {
        "wall_s": figures.pop("wall_s"),
        "peak_rss_gb": figures.pop("peak_rss_gb"),
        "cpu_s": figures.pop("cpu_s"),
        "process_s": round(process_s, 2),  # with the interpreter's start and the imports
        "rows": made["rows"],
        "images": args.images,
        "hubs": hubs if made["generate_s"] is not None else None,  # unknown for reused tables
        "bootstrap": args.bootstrap,
        "replicate_groups": args.replicate_groups or args.bootstrap,
        "budget": args.budget,
        "max_order": args.max_order,
        "blas_threads": args.blas_threads or os.environ.get("OPENBLAS_NUM_THREADS", "default"),
        "generate_s": made["generate_s"],
        "parquet_mb": round(size / 1e6, 1),
        **figures,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
