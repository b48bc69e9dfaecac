"""Taskonomy's novel-task experiment on the built-in data: each target task of a finished study in
turn is positioned as if it were new, from a few labelled images (design.md section 12).

    .venv/bin/python benchmarks/novel_task.py                          # the quickstart's study (made if missing), 5% labels
    .venv/bin/python benchmarks/novel_task.py --budgets 0.05,0.25      # both budgets: the table in docs/benchmarks.md
    .venv/bin/python benchmarks/novel_task.py --targets normal,reshading
    .venv/bin/python benchmarks/novel_task.py --seed 3                 # other labelled images

For target t and label budget L (a fraction of the study's transfer split), L of the study's
transfer images with t's labels, and the study's test images, become a dataset of their own; t is
positioned against the study with `pipelines.position.run` exactly as `taskatlas position` does (no
`self`: a user's new task has no fully supervised network), and t's own network is never a source.
The model is chosen on validation images, as `taskatlas position` chooses it, so its figures on
the test images are not what picked it. Rankings are compared on two disjoint halves of the test
images (`split_test_images`), so shared test-image noise cannot make them look more alike. Per (t, L):
- `gain`: the chosen transfer's win rate against `scratch` (a network trained from scratch on the
  same L labels), as `taskatlas position` reports it;
- `quality`: the share of test images on which the chosen transfer (mean over its replicates)
  beats t's fully supervised network from the study;
- `spearman`: the rank correlation of the position's first-order source affinities on the first
  half with the full study's for t on the second half;
- `beats_random`: whether the chosen transfer beats `random` on most test images.
The last line: `median_gain` (smallest budget), `median_quality`, `median_spearman` (over all),
and `beats_random`: the share of targets, among those where some trained source beats `random`,
whose chosen transfer does. Goals: median gain >= 0.7, median Spearman >= 0.6, beats_random 1.0.
For scale, `reference_spearman`: how well the full study's rankings agree with themselves, the
median over targets of the mean Spearman between two of its replicates' first-order rankings (by
mean test loss; no position can agree with the study better than the study's own replicates
agree with each other, give or take the averaging over replicates).

By default one budget, 5% (6-7 minutes on 2 cores: eight positions of 43-67 s); both budgets
(`--budgets 0.05,0.25`, the issue's table) take about 20 minutes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.affinity import SCRATCH, affinity_by_target  # noqa: E402
from components.config import config_hash  # noqa: E402
from components.data.shards import SPLITS, ShardStore, write_dataset  # noqa: E402
from components.errors import TaskatlasError  # noqa: E402
from components.position import BASELINE_SETS, first_order_columns, split_test_images  # noqa: E402
from components.storage import Location  # noqa: E402
from pipelines.config import load_pipeline_config  # noqa: E402
from pipelines.invocation import open_tracker  # noqa: E402
from pipelines.position.inputs import Study, finished_study  # noqa: E402
from pipelines.position.run import position_task  # noqa: E402
from pipelines.ray_runtime import ensure_ray  # noqa: E402
from pipelines.stage2.plan import Stage2Plan  # noqa: E402
from pipelines.stage2.record import LOSSES  # noqa: E402
from pipelines.steps import unfenced  # noqa: E402


def labelled_subset(study: ShardStore, column: str, n: int, seed: int, out) -> ShardStore:
    """n of the study's transfer images (drawn with `seed`) and all its test images, with the
    RGB and `column` only: what a user with a new task and n labels would bring."""
    cols = list(dict.fromkeys(["rgb", column]))  # autoencoding's label is the RGB image itself
    ids = study.read("transfer", ["rgb"])["image_id"].astype(str)
    chosen = set(np.random.default_rng([seed, n]).choice(np.sort(ids), n, replace=False))
    data = {s: study.read(s, cols) for s in ("transfer", "test")}
    keep = {
        "train": np.zeros(0, int),
        "transfer": np.flatnonzero(np.isin(data["transfer"]["image_id"].astype(str), list(chosen))),
    }
    keep["test"] = np.arange(len(data["test"]["image_id"]))

    def produce(split: str, start: int, count: int):
        rows = keep[split][start : start + count]
        part = data.get(split)
        return [str(i) for i in part["image_id"][rows]], {c: part[c][rows] for c in cols}

    columns = tuple(c for c in study.manifest.columns if c.name in ("rgb", column))
    label_classes = {k: v for k, v in study.manifest.label_classes.items() if k == column}
    write_dataset(
        out,
        source="novel-task-benchmark",
        settings={"study": study.data_version, "column": column, "images": n, "seed": seed},
        columns=columns,
        counts={s: len(keep[s]) for s in SPLITS},
        produce=produce,
        rows_per_shard=512,
        label_classes=label_classes,
    )
    return ShardStore(out)


def study_losses(study: Study) -> Location:
    """The full study's folder of per-target loss tables."""
    plan = Stage2Plan(study.config, study.store)
    return plan.step(plan.key(study.networks)).location / LOSSES


def replicate_agreement(losses: Location, target: str) -> float:
    """Mean Spearman between two replicates' first-order source rankings (mean test loss) of the
    full study for `target`, over every pair of replicates; NaN with one replicate."""
    table = (losses / f"{target}.parquet").read_parquet()
    table = table.filter(pc.equal(pc.list_value_length(table["sources"]), 1))
    sums: dict[tuple[int, str], list[float]] = {}
    columns = (table["replicate"].to_pylist(), pc.list_flatten(table["sources"]).to_pylist(), table["loss"])
    for replicate, source, loss in zip(*columns[:2], columns[2].to_numpy(), strict=True):
        if (source,) not in BASELINE_SETS and source != target and np.isfinite(loss):
            sums.setdefault((replicate, source), []).append(float(loss))
    means: dict[int, dict[str, float]] = {}
    for (replicate, source), losses in sums.items():
        means.setdefault(replicate, {})[source] = float(np.mean(losses))
    rhos = [
        spearmanr([means[a][s] for s in sorted(means[a])], [means[b][s] for s in sorted(means[a])]).statistic
        for a, b in itertools.combinations(sorted(means), 2)
    ]
    return float(np.mean(rhos)) if rhos else float("nan")


def on_images(table, images: frozenset[str]):
    """The rows of a loss table whose image is among `images`."""
    ids = pc.cast(table["image_id"], pa.string())
    return table.filter(pc.is_in(ids, value_set=pa.array(sorted(images), pa.string())))


def first_order(table, target: str, position: bool) -> dict[str, float]:
    """A loss table's first-order affinities into `target` (a position's: no `self`, gain against
    `scratch`), by source."""
    result = affinity_by_target(
        [target],
        lambda _: table,
        gain_reference=SCRATCH if position else ("pixels",),
        require_self=not position,
    )
    return first_order_columns(result.table).get(target, {})


def quality_on(position_losses, study_losses, sources: tuple[str, ...]) -> float:
    """Share of images on which the chosen transfer (its replicates' mean loss) beats `self`."""

    def per_image(table, wanted: tuple[str, ...]) -> dict[str, float]:
        rows = table.filter(pc.equal(pc.array_join(table["sources"], "+"), "+".join(wanted))).to_pylist()
        by: dict[str, list[float]] = {}
        for r in rows:
            by.setdefault(str(r["image_id"]), []).append(r["loss"])
        return {i: float(np.mean(v)) for i, v in by.items()}

    chosen, full = per_image(position_losses, sources), per_image(study_losses, ("self",))
    common = [i for i in chosen if i in full and np.isfinite(chosen[i]) and np.isfinite(full[i])]
    return float(np.mean([(chosen[i] < full[i]) + 0.5 * (chosen[i] == full[i]) for i in common]))


def finished(cfg, args) -> tuple[Study, float]:
    """The study, run first (`taskatlas run`) if it is not finished; the seconds that took."""
    start = time.perf_counter()
    try:
        return finished_study(cfg), 0.0
    except TaskatlasError:
        pass
    cmd = [str(Path(sys.executable).parent / "taskatlas"), "run", "-c", args.config]
    out = subprocess.run(
        cmd + [a for s in args.set for a in ("--set", s)], cwd=ROOT, capture_output=True, text=True
    )
    if out.returncode:
        sys.exit(f"the study failed: {out.stderr[-2000:]}")
    return finished_study(cfg), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--set", action="append", default=[], help="config override of the study")
    parser.add_argument(
        "--budgets", default="0.05", help="label budgets, fractions of the transfer split (e.g. 0.05,0.25)"
    )
    parser.add_argument("--targets", default="", help="comma-separated (default: every target of the study)")
    parser.add_argument("--seed", type=int, default=0, help="which labelled images each budget draws")
    args = parser.parse_args()
    cfg = load_pipeline_config(args.config, args.set)
    study, study_seconds = finished(cfg, args)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()] or [
        t for t in cfg.tasks if not cfg.task(t).source_only
    ]
    losses = study_losses(study)
    n_transfer = study.store.manifest.counts["transfer"]
    budgets = sorted(float(b) for b in args.budgets.split(","))
    ensure_ray()
    tracker = open_tracker(cfg)
    rows = []
    for fraction in budgets:
        n = max(4, round(fraction * n_transfer))
        for target in targets:
            task = cfg.task(target)
            folder = cfg.root / "novel_task" / config_hash(study.store.data_version, target, n, args.seed)
            store = labelled_subset(study.store, task.column, n, args.seed, folder)
            run_id = tracker.start_run(f"novel task {target} ({n} labels)", tags={"benchmark": "novel_task"})
            t0 = time.perf_counter()
            result = position_task(study, task, store, tracker, run_id, unfenced, use_self=False)
            answer = result.answer
            tracker.end_run(run_id)
            mine = result.losses.read_parquet()
            theirs = (losses / f"{target}.parquet").read_parquet()
            pick_on, report_on = split_test_images(
                pc.unique(pc.cast(mine["image_id"], pa.string())).to_pylist()
            )
            chosen = answer.chosen  # chosen on validation images; gain and vs_random on the test images
            first = first_order(on_images(mine, pick_on), target, position=True)
            full = first_order(on_images(theirs, report_on), target, position=False)
            common = sorted(set(first) & set(full))
            rho = float(spearmanr([first[s] for s in common], [full[s] for s in common]).statistic)
            any_beats = any(c.vs_random > 0.5 for c in answer.candidates if not c.is_baseline)
            quality = quality_on(mine, theirs, chosen.sources)
            rows.append(
                {
                    "target": target,
                    "labels": n,
                    "chosen": chosen.name,
                    "gain": round(chosen.gain, 4),
                    "quality": round(quality, 4),
                    "spearman": round(rho, 3),
                    "beats_random": chosen.vs_random > 0.5,
                    "any_source_beats_random": any_beats,
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    smallest = [r for r in rows if r["labels"] == max(4, round(budgets[0] * n_transfer))]
    eligible = [r for r in rows if r["any_source_beats_random"]]
    result = {
        "budgets": {str(b): max(4, round(b * n_transfer)) for b in budgets},
        "median_gain": statistics.median(r["gain"] for r in smallest),
        "median_quality": statistics.median(r["quality"] for r in rows if r["quality"] is not None),
        "median_spearman": statistics.median(r["spearman"] for r in rows),
        "reference_spearman": round(statistics.median(replicate_agreement(losses, t) for t in targets), 3),
        "beats_random": round(sum(r["beats_random"] for r in eligible) / len(eligible), 3)
        if eligible
        else None,
        "median_gain_per_budget": {
            str(r0["labels"]): statistics.median(r["gain"] for r in rows if r["labels"] == r0["labels"])
            for r0 in {r["labels"]: r for r in rows}.values()
        },
        "study_seconds": round(study_seconds, 1),
        "position_seconds": round(sum(r["seconds"] for r in rows), 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
