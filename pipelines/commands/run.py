"""`taskatlas run` (the whole pipeline) and `taskatlas nightly` (scheduled retraining).

taskatlas run -c configs/quickstart.yaml [--stages train,transfer] [--dry-run] [--json] [--set k=v]
taskatlas nightly -c configs/quickstart.yaml [--date 2026-11-22]
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date, datetime, timezone
from typing import TYPE_CHECKING

from pipelines.commands.common import add_config_args, add_lock_arg, mlflow_ui_command

LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig
    from pipelines.pipeline import PipelineResult


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="the whole pipeline: data, task networks, transfers, affinity, taxonomy")
    add_config_args(run)
    add_lock_arg(run)
    run.add_argument("--stages", help="comma-separated subset of train,transfer,affinity,taxonomy")
    run.add_argument(
        "--dry-run", action="store_true", help="print which steps would run and which are reused"
    )
    run.add_argument(
        "--readout-seconds",
        type=float,
        help="with --dry-run: device seconds per readout to project the plan's hours from (default: the "
        "median of the root's newest finished Stage II, if any)",
    )
    run.add_argument(
        "--json",
        action="store_true",
        help="end with one JSON line: networks and readouts trained and reused, taxonomy, run id",
    )
    run.set_defaults(func=_run)
    nightly = sub.add_parser("nightly", help="refresh data, retrain incrementally, promote champions")
    add_config_args(nightly)
    add_lock_arg(nightly)
    nightly.add_argument("--stages", help="comma-separated subset of train,transfer,affinity,taxonomy")
    nightly.add_argument("--date", type=date.fromisoformat, help="the night to run (default: today, UTC)")
    nightly.set_defaults(func=_nightly)


def _run(args: argparse.Namespace) -> int:
    from components.errors import TaskatlasError
    from pipelines.config import load_pipeline_config
    from pipelines.invocation import invocation, preflight, study_lock
    from pipelines.pipeline import dry_run, parse_stages, plan_size, run_pipeline
    from pipelines.ray_runtime import ensure_ray

    if args.readout_seconds is not None and not args.readout_seconds > 0:
        raise TaskatlasError(f"--readout-seconds must be > 0, got {args.readout_seconds}")
    cfg = load_pipeline_config(args.config, args.overrides)
    stages = parse_stages(args.stages)
    if args.dry_run:
        for step, status in dry_run(cfg, stages):
            print(f"{status.value:<8} {step}")
        # on stderr: stdout stays one (status, step) per line
        for line in plan_size(cfg, args.readout_seconds):
            print(f"plan size: {line}", file=sys.stderr)
        return 0
    preflight(cfg)
    with study_lock(cfg, "run", args.wait_for_lock) as fence:
        ensure_ray(args.verbose)
        with invocation(cfg, "run", fence, args.verbose) as inv:
            result = run_pipeline(inv, stages)
    print_report(cfg, result, inv.tracker.tracking_uri)
    print_run(inv.tracker.tracking_uri, inv.tracker.experiment_id, inv.run_id)
    if args.json:
        print(json.dumps(result.summary(str(cfg.root), inv.run_id)))
    return 0


def readouts_line(ran: int, reused: int, counts: dict[str, int]) -> str:
    """'readouts: 10 trained, 2 reused (order 1 6, order 2 4, random 2); self 3 ...': the parts in
    brackets add up to trained + reused; `self` is scored, never trained, so it is told apart."""
    from components.vocabulary import SELF

    trained = {k: v for k, v in counts.items() if k != SELF}
    parts = ", ".join(f"{k} {v}" for k, v in trained.items())
    own = f"; {SELF} {counts[SELF]}, scored with each target's own network" if counts.get(SELF) else ""
    return f"readouts: {ran} trained, {reused} reused ({parts}){own}"


def print_report(cfg: PipelineConfig, result: PipelineResult, tracking_uri: str) -> None:
    from components.affinity import top_sources
    from components.loss_cube import describe_unlabelled
    from pipelines.steps import StepStatus

    ran = [s for s, status in result.steps if status is StepStatus.RUN]
    print(
        f"\nsteps: {len(ran)} ran, {len(result.steps) - len(ran)} reused (data version {result.data_version})"
    )
    trained = result.networks_trained  # network replicates (`train.replicates`) included
    reused = [n for n in result.networks if n not in trained]
    print(f"task networks: {len(trained)} trained, {len(reused)} reused")
    if result.stage2:
        n = result.summary(str(cfg.root), "")
        print(readouts_line(n["readouts_ran"], n["readouts_reused"], result.stage2.counts))
        print(f"per-image losses: {result.stage2.losses_dir}")
    if result.unlabelled_images:
        print(describe_unlabelled(result.unlabelled_images))
    if result.affinity_path:
        print(f"best sources per target (affinity): {result.affinity_path}")
        for target, best in top_sources(result.affinity_path.read_parquet(), 3).items():
            print(f"  {target:<18} " + ", ".join(f"{'+'.join(s)} {a:.3f}" for s, a in best))
    if result.taxonomy:
        from components.verdict import edge_text, noise_note, ties_text

        t = result.taxonomy
        stability, said = t.stability, t.verdict
        roots = ", ".join(r + (f" ({stability.root(r):.2f})" if stability else "") for r in t.roots)
        print(f"taxonomy (budget {t.taxonomy.budget:g}, max order {t.taxonomy.max_order}): roots {roots}")
        for target, sources in sorted(t.transfers.items()):
            print(f"  {edge_text(target, sources, said, stability)}")
        if stability:
            print(
                f"  this exact taxonomy comes back in {stability.taxonomy:.0%} of "
                f"{stability.resamples} bootstrap resamples"
            )
        if said.ties:
            print("not distinguishable from the best (probability of being the best):")
            for target in said.ties:
                print(f"  {target:<18} {ties_text(target, said)}")
        print(noise_note(said))
        print(f"outputs: {t.path}")
    print(f"storage root: {cfg.root}")


def print_run(tracking_uri: str, experiment_id: str, run_id: str) -> None:
    """The report's last line: the parent run's page on a tracking server, else its id (after
    the command that opens the UI on the local store, and the page it then shows the run at)."""
    from pipelines.tracking.store import run_url

    if url := run_url(tracking_uri, experiment_id, run_id):
        print(f"MLflow run:   {url}")
        return
    local = run_url(LOCAL_UI, experiment_id, run_id)
    print(f"MLflow UI:    {mlflow_ui_command(tracking_uri)}, then {local}")
    print(f"MLflow run:   {run_id}")


def _nightly(args: argparse.Namespace) -> int:
    from pipelines.config import load_pipeline_config
    from pipelines.invocation import preflight
    from pipelines.nightly import run_nightly
    from pipelines.pipeline import parse_stages

    cfg = load_pipeline_config(args.config, args.overrides)
    day = args.date or datetime.now(timezone.utc).date()
    stages = parse_stages(args.stages)
    preflight(cfg)
    summary = run_nightly(cfg, day, stages, wait_for_lock=args.wait_for_lock, verbose=args.verbose)
    if summary is None:
        print(f"another nightly run holds the lock of {cfg.root} for study {cfg.name}; nothing to do")
        return 0
    print(
        json.dumps(
            {k: summary[k] for k in ("date", "data_version", "retrained", "promoted", "taxonomy_changed")}
        )
    )
    return 0
