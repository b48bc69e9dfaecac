"""`taskatlas transfer`: Stage I (skipping finished task networks), then Stage II's readouts.

taskatlas transfer -c configs/quickstart.yaml
taskatlas transfer -c configs/quickstart.yaml --tasks normal,reshading,edge_texture --set transfer.epochs=2
taskatlas transfer -c configs/taskonomy-gpu.yaml --set transfer.gpus_per_readout=0.25

Prints the plan (readouts per order and baseline, and the estimated time) before anything
trains, and the summary table at the end. A rerun skips every stored readout.
"""

from __future__ import annotations

import argparse

from pipelines.commands.common import add_config_args, add_lock_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "transfer",
        help="Stage II: readouts on frozen, cached encoders, fanned out on Ray (trains Stage I first)",
    )
    add_config_args(p)
    add_lock_arg(p)
    p.add_argument("--tasks", help="comma-separated subset of the config's tasks (the sources)")
    p.set_defaults(func=_transfer)


def _transfer(args: argparse.Namespace) -> int:

    from components.tasks import parse_tasks
    from components.transfer import describe_plan
    from pipelines.config import load_pipeline_config
    from pipelines.invocation import invocation, preflight, study_lock
    from pipelines.ray_runtime import ensure_ray
    from pipelines.stage1.run import Stage1
    from pipelines.stage2.run import Stage2

    cfg = load_pipeline_config(args.config, args.overrides)
    tasks = parse_tasks(args.tasks or cfg.tasks, cfg.catalog)
    preflight(cfg, [t.name for t in tasks])
    with study_lock(cfg, "transfer", args.wait_for_lock) as fence:
        ensure_ray(args.verbose)
        with invocation(cfg, "transfer", fence, args.verbose) as inv:
            stage2 = Stage2(cfg, inv.store, inv.tracker, inv.run_id, inv.fence)
            plan = stage2.jobs.plan([t.name for t in tasks])
            seconds, slots = stage2.estimate(plan)
            print(describe_plan(plan, seconds, slots), flush=True)
            results = Stage1(cfg, inv.store, inv.tracker, inv.run_id, inv.fence, verbose=inv.verbose).run(
                tasks, search=True
            )
            result = stage2.run(results, plan)
    print(format_summary(result.summary().to_pylist()))
    print(f"\nper-image losses: {result.losses_dir}  ({result.ran} readouts trained, the rest stored)")
    if result.failed:
        print(f"FAILED after retries ({len(result.failed)}): {', '.join(result.failed)}")
        return 1
    return 0


def format_summary(rows: list[dict]) -> str:
    lines = [f"{'target':<18} {'sources':<40} {'order':>5} {'mean loss':>10} {'seconds':>8}"]
    for row in sorted(rows, key=lambda r: (r["target"], r["mean_loss"])):
        sources = "+".join(row["sources"])
        lines.append(
            f"{row['target']:<18} {sources:<40} {row['order']:>5} {row['mean_loss']:>10.4f} {row['seconds']:>8.1f}"
        )
    return "\n".join(lines)
