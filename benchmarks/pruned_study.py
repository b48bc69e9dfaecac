"""Pruned vs full Stage II: the same synthetic study, on the same Stage I networks, both ways.

    .venv/bin/python benchmarks/pruned_study.py                          # ~6 minutes on 2 cores
    .venv/bin/python benchmarks/pruned_study.py --no-repeat              # ~4.5 minutes
    .venv/bin/python benchmarks/pruned_study.py --seed 1 --max-order 2   # with second order
    .venv/bin/python benchmarks/pruned_study.py --tasks normal,reshading,edge_texture --shared 0  # smoke
    .venv/bin/python benchmarks/pruned_study.py --readout-epochs 10 --transfer-images 600  # ~35 min

Stage I: one network per task, trained here with the plain loop (8 epochs on 600 images, two
at a time on Ray), so the sources really differ: with 3 epochs on 300 images every source's
features were close to random and no estimate could rank them. Stage II then runs through
`Stage2.run`, each study in its own storage root (features and readouts are not shared, so none
reuses another's work): in full, with `transfer.prune` (the probe estimator, top K, the shared
sources, an audit sample), and (`--repeat`, on by default) in full again with another readout
seed: the ceiling, how far two full studies of the same networks agree.
Figures, on the last line as one JSON object:
- `compute_fraction`: transfer compute of the pruned run / the full run, where compute is the
  seconds of every trained readout (`summary.parquet`) plus, for the pruned run, the estimates'
  seconds; `wall_fraction` is the same for `Stage2.run`'s wall time (both encode their features);
- `spearman`: mean over targets of the rank correlation between the probe's scores and the full
  study's first-order mean test losses (`--short`: also for a 1-epoch readout, `spearman_short`),
  with what each estimator cost (`estimate_seconds`, `short_seconds`);
- `taxonomy_agreement`: fraction of budgets 2..6 at which both studies choose the same roots (a
  budget the pruned study cannot solve counts as a disagreement);
- `objective_gap`: worst relative loss of BIP objective over those budgets, each pruned
  taxonomy's objective evaluated on the full study's affinities;
- `oracle_agreement`, `oracle_objective_gap`: the same two for the pruning rule fed the full
  study's own first-order losses instead of estimates (a perfect estimator): the rule's ceiling;
- `repeat_spearman`, `repeat_agreement`, `repeat_objective_gap`: the same three for the second
  full study against the first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from a checkout, installed or not
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported: loopback only
os.environ.setdefault("TASKATLAS_RAY_DASHBOARD", "0")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from components.affinity import affinity_from_cube  # noqa: E402
from components.affinity_io import read_affinities, write_affinity  # noqa: E402
from components.data.scenes import SceneConfig  # noqa: E402
from components.data.shards import ShardStore  # noqa: E402
from components.data.synthetic import DatasetConfig, generate_dataset  # noqa: E402
from components.loss_cube import loss_cube  # noqa: E402
from components.models import build_network  # noqa: E402
from components.storage import location  # noqa: E402
from components.tasks import channels_for  # noqa: E402
from components.taxonomy import sweep_budgets, transform_values  # noqa: E402
from components.training import iter_batches, train_one_epoch  # noqa: E402
from components.transfer import BASELINES, TransferPlan, prune_plan  # noqa: E402
from components.transfer.estimate import EstimatorKind, run_estimates, spearman  # noqa: E402
from pipelines.analysis.plan import taxonomy_options, within_table  # noqa: E402
from pipelines.config import load_pipeline_config  # noqa: E402
from pipelines.hparams import HParams  # noqa: E402
from pipelines.invocation import open_tracker  # noqa: E402
from pipelines.results import TaskResult  # noqa: E402
from pipelines.stage2.plan import feature_sources  # noqa: E402
from pipelines.stage2.pruning import estimate_job  # noqa: E402
from pipelines.stage2.run import Stage2  # noqa: E402
from pipelines.steps import unfenced  # noqa: E402

TASKS = (  # 12 tasks, 10 targets (colorization and inpainting are source-only)
    "autoencoding,denoising,colorization,inpainting,depth_zbuffer,depth_euclidean,normal,"
    "reshading,curvature,edge_texture,edge_occlusion,segment_semantic"
)
BUDGETS = (2, 3, 4, 5, 6)


def study_config(root: Path, args: argparse.Namespace, *extra: str, transfer_seed: int | None = None):
    orders = "[2]" if args.max_order >= 2 else "[]"
    beams = "[3]" if args.max_order >= 2 else "[]"
    return load_pipeline_config(
        ROOT / "configs" / "quickstart.yaml",  # the demo's model and readout settings
        [
            f"storage_root={root}",
            f"tasks=[{args.tasks}]",
            f"data.seed={args.seed}",
            f"transfer.seed={args.seed if transfer_seed is None else transfer_seed}",
            f"transfer.orders={orders}",
            f"transfer.beams={beams}",
            f"taxonomy.max_order={args.max_order}",
            f"transfer.epochs={args.readout_epochs}",
            "analysis.bootstrap=0",
            *extra,
        ],
    )


def _train(name: str, cfg, data_root: str, out: str, epochs: int, seed: int) -> str:
    """One Stage I network with the plain loop (tiny settings): its state dict's path."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    task, store = cfg.task(name), ShardStore(data_root)
    data = store.read("train", task.columns)
    net = build_network(task, cfg.model, cfg.data.size, channels_for(task, store))
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        batches = iter_batches(data, 32, shuffle=True, seed=seed + epoch, drop_last=True)
        train_one_epoch(net, optimizer, batches, task, torch.device("cpu"), generator)
    path = Path(out) / f"{name}.pt"
    torch.save(net.state_dict(), path)
    return str(path)


def stage1(cfg, store: ShardStore, out: Path, epochs: int, seed: int) -> dict[str, TaskResult]:
    out.mkdir(parents=True, exist_ok=True)
    train = ray.remote(num_cpus=1)(_train)
    refs = {n: train.remote(n, cfg, str(store.root), str(out), epochs, seed) for n in cfg.tasks}
    return {
        n: TaskResult(n, f"bench-{seed}-{n}", ray.get(r), 0.0, HParams(1e-3, 1e-4, 32), "", "1")
        for n, r in refs.items()
    }


def run_stage2(cfg, store: ShardStore, results: dict[str, TaskResult]) -> dict:
    tracker = open_tracker(cfg)
    stage = Stage2(cfg, store, tracker, tracker.start_run("bench"), unfenced)
    start = time.perf_counter()
    result = stage.run(results)
    wall = time.perf_counter() - start
    assert not result.failed, result.failed
    summary = location(result.summary_path).read_parquet().to_pylist()
    compute = sum(r["seconds"] for r in summary if r["kind"] != "self")
    pruning = location(result.out_dir) / "pruning.json"
    report = pruning.read_json() if pruning.exists() else {}
    compute += report.get("estimate_seconds", 0.0)
    trained = sum(1 for r in summary if r["kind"] != "self")
    return {"stage": stage, "result": result, "summary": summary, "wall": wall, "compute": compute}, {
        "trained": trained,
        **report,
    }


def affinities(losses: pa.Table, folder: Path) -> tuple[dict, object]:
    """The AHP table as {(target, sources): affinity} and the solver's TransferTable."""
    table = affinity_from_cube(loss_cube(losses))
    write_affinity(table, folder / "affinity.parquet")
    rows = zip(
        table["target"].to_pylist(), table["sources"].to_pylist(), table["affinity"].to_pylist(), strict=True
    )
    return {(t, tuple(s)): a for t, s, a in rows}, read_affinities(folder / "affinity.parquet")


def objective_on(aff: dict, roots, transfers, options) -> float:
    """The BIP objective of a taxonomy, valued with the affinities `aff` (design.md section 6)."""
    total = 0.0
    for target, sources in transfers.items():
        total += options.importance.get(target, 1.0) * _f(aff.get((target, tuple(sources)), 0.0), options)
    for root in roots:
        if (root, ("self",)) in aff:
            total += options.importance.get(root, 1.0) * _f(aff[root, ("self",)], options)
    return total


def _f(value: float, options) -> float:
    return float(transform_values(np.array([value]), options.transform)[0])


def first_order(summary: list[dict]) -> dict[tuple[str, str], float]:
    """{(target, source): mean test loss} of a Stage II summary's first-order transfers."""
    return {
        (r["target"], r["sources"][0]): r["mean_loss"]
        for r in summary
        if r["kind"] == "transfer" and r["order"] == 1
    }


def oracle_losses(
    plan: TransferPlan, summary: list[dict], table: pa.Table, args: argparse.Namespace
) -> pa.Table:
    """The full study's losses (`table`, its `summary`) restricted to what the same pruning rule
    keeps of `plan` when it ranks by the full study's own first-order losses: a perfect estimator.
    How far this gets is the rule's ceiling, whatever the estimator. Higher orders are kept where
    all their sources are."""
    pruned = prune_plan(plan, first_order(summary), args.top_k, args.audit_fraction, args.seed, args.shared)
    kept = {(r.target, r.sources[0]) for r in pruned.first_order}
    baselines = {k.value for k in BASELINES}
    mask = [
        (len(s) == 1 and s[0] in baselines) or all((t, x) in kept for x in s)
        for t, s in zip(table["target"].to_pylist(), table["sources"].to_pylist(), strict=True)
    ]
    return table.filter(pa.array(mask))


def mean_spearman(a: dict[tuple[str, str], float], b: dict[tuple[str, str], float]) -> float:
    """Mean over targets of the rank correlation of two {(target, source): score} tables."""
    rhos = []
    for target in sorted({t for t, _ in a}):
        pairs = [k for k in a if k[0] == target and k in b]
        rhos.append(spearman(np.array([a[k] for k in pairs]), np.array([b[k] for k in pairs])))
    return float(np.nanmean(rhos))


def compare_sweeps(full_aff: dict, full_sweep, other_sweep, options) -> tuple[float, float, dict]:
    """(agreement, worst objective gap, roots per budget) of `other_sweep` against `full_sweep`:
    the fraction of budgets choosing the same roots, and the worst relative BIP objective lost
    when each of its taxonomies is valued on the full study's affinities."""
    same, gaps, per_budget, budgets = 0, [], {}, 0
    for a, b in zip(full_sweep, other_sweep, strict=True):
        budgets += 1
        if a.taxonomy is None or b.taxonomy is None:
            continue
        best = objective_on(full_aff, a.taxonomy.roots, a.taxonomy.transfers, options)
        assert abs(best - a.taxonomy.objective) < 1e-6 * max(1.0, best), (best, a.taxonomy.objective)
        got = objective_on(full_aff, b.taxonomy.roots, b.taxonomy.transfers, options)
        same += a.taxonomy.roots == b.taxonomy.roots
        gaps.append((best - got) / best)
        per_budget[a.budget] = {"full": list(a.taxonomy.roots), "other": list(b.taxonomy.roots)}
    return same / budgets, max(gaps, default=float("nan")), per_budget


def estimator_ranking(
    stage: Stage2, results, summary: list[dict], kind: EstimatorKind
) -> tuple[float, float]:
    """(mean Spearman over targets vs the full first-order test losses, seconds) of an estimator."""
    cfg, plan = stage.config, stage.jobs.plan(list(results))
    dirs = stage.features.ensure(feature_sources(cfg, results), plan)  # already encoded: just the folders
    full = first_order(summary)
    rhos, seconds = [], 0.0
    for target in plan.targets:
        estimates = run_estimates(estimate_job(stage.jobs, target, list(plan.sources), dirs, kind))
        seconds += sum(e.seconds for e in estimates)
        scores = np.array([e.score for e in estimates])
        rhos.append(spearman(scores, np.array([full[target, e.source] for e in estimates])))
    return float(np.nanmean(rhos)), seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", default=TASKS, help="comma-separated; the default has 10 targets")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--audit-fraction", type=float, default=0.1)
    p.add_argument("--max-order", type=int, default=1, choices=(1, 2))
    p.add_argument("--shared", type=int, default=2, help="sources kept for every target")
    p.add_argument("--stage1-epochs", type=int, default=8)
    p.add_argument("--readout-epochs", type=int, default=4, help="the quickstart trains readouts for 6")
    p.add_argument("--images", type=int, default=600, help="train split; test gets a third")
    p.add_argument("--transfer-images", type=int, default=None, help="transfer split (default: a third)")
    p.add_argument("--short", action="store_true", help="also rank with a 1-epoch readout (slow)")
    p.add_argument(
        "--repeat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also rerun the full study with another readout seed: how far two full studies agree",
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    tmp = Path(tempfile.mkdtemp(prefix="pruned-study-"))
    n = args.images
    n_transfer = args.transfer_images or n // 3
    data_cfg = DatasetConfig(
        n_train=n, n_transfer=n_transfer, n_test=n // 3, seed=args.seed, scene=SceneConfig(size=32)
    )
    generate_dataset(tmp / "data", data_cfg)
    store = ShardStore(tmp / "data")
    prune = [
        "transfer.prune.enabled=true",
        f"transfer.prune.top_k={args.top_k}",
        f"transfer.prune.audit_fraction={args.audit_fraction}",
        f"transfer.prune.shared={args.shared}",
    ]
    full_cfg = study_config(tmp / "full", args, f"data.n_train={n}")
    pruned_cfg = study_config(tmp / "pruned", args, f"data.n_train={n}", *prune)
    repeat_cfg = study_config(tmp / "repeat", args, f"data.n_train={n}", transfer_seed=args.seed + 1000)
    start = time.perf_counter()
    results = stage1(full_cfg, store, tmp / "stage1", args.stage1_epochs, args.seed)
    stage1_s = time.perf_counter() - start

    full, full_info = run_stage2(full_cfg, store, results)
    pruned, pruned_info = run_stage2(pruned_cfg, store, results)
    probe_rho, probe_s = estimator_ranking(full["stage"], results, full["summary"], EstimatorKind.PROBE)
    short_rho, short_s = float("nan"), 0.0
    if args.short:
        short_rho, short_s = estimator_ranking(full["stage"], results, full["summary"], EstimatorKind.SHORT)

    full_losses = full["result"].all_losses()
    full_aff, full_table = affinities(full_losses, tmp / "full")
    _, pruned_table = affinities(pruned["result"].all_losses(), tmp / "pruned")
    options = taxonomy_options(full_cfg)
    full_sweep = sweep_budgets(full_table, options, BUDGETS)
    pruned_sweep = sweep_budgets(pruned_table, within_table(options, pruned_table), BUDGETS)
    agreement, gap, per_budget = compare_sweeps(full_aff, full_sweep, pruned_sweep, options)
    oracle = oracle_losses(full["stage"].plan(list(results)), full["summary"], full_losses, args)
    _, oracle_table = affinities(oracle, tmp / "oracle")
    oracle_sweep = sweep_budgets(oracle_table, within_table(options, oracle_table), BUDGETS)
    oracle_agreement, oracle_gap, _ = compare_sweeps(full_aff, full_sweep, oracle_sweep, options)
    repeat = {}
    if args.repeat:  # the ceiling: the full study again, readouts drawn with another seed
        again, _ = run_stage2(repeat_cfg, store, results)
        _, again_table = affinities(again["result"].all_losses(), tmp / "repeat")
        again_sweep = sweep_budgets(again_table, options, BUDGETS)
        rep_agreement, rep_gap, rep_roots = compare_sweeps(full_aff, full_sweep, again_sweep, options)
        repeat = {
            "repeat_spearman": round(
                mean_spearman(first_order(full["summary"]), first_order(again["summary"])), 3
            ),
            "repeat_agreement": round(rep_agreement, 3),
            "repeat_objective_gap": round(rep_gap, 4),
            "repeat_roots": {b: r["other"] for b, r in rep_roots.items()},
        }
    out = {
        "seed": args.seed,
        "tasks": len(full_cfg.tasks),
        "targets": len(full["stage"].plan(list(results)).targets),
        "max_order": args.max_order,
        "top_k": args.top_k,
        "shared": args.shared,
        "audit_fraction": args.audit_fraction,
        "readouts_full": full_info["trained"],
        "readouts_pruned": pruned_info["trained"],
        "compute_full_s": round(full["compute"], 1),
        "compute_pruned_s": round(pruned["compute"], 1),
        "compute_fraction": round(pruned["compute"] / full["compute"], 3),
        "wall_fraction": round(pruned["wall"] / full["wall"], 3),
        "spearman": round(probe_rho, 3),
        "spearman_short": round(short_rho, 3),
        "estimate_seconds": round(probe_s, 2),
        "short_seconds": round(short_s, 1),
        "spearman_trained_pruned_run": pruned_info.get("spearman"),
        "audit_misses": len(pruned_info.get("audit_misses", [])),
        "taxonomy_agreement": round(agreement, 3),
        "objective_gap": round(gap, 4),
        "roots": per_budget,
        "oracle_agreement": round(oracle_agreement, 3),
        "oracle_objective_gap": round(oracle_gap, 4),
        **repeat,
        "stage1_s": round(stage1_s, 1),
        "total_s": round(time.perf_counter() - start, 1),
    }
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
