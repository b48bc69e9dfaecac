"""Stage II's pruning (design.md section 11): a cheap estimate of every first-order readout, one
Ray task per target, then the top sources per target, the shared ones and an audit sample."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict

import ray

from components.storage import Location
from components.tasks import channels_for
from components.transfer import TransferPlan, prune_for_budget, prune_plan
from components.transfer.estimate import Estimate, EstimateJob, EstimatorKind, run_estimates
from pipelines.stage2.plan import Stage2Plan

_REMOTE_ESTIMATES = ray.remote(run_estimates)


def estimates(
    jobs: Stage2Plan, out: Location, plan: TransferPlan, dirs: Mapping[tuple[str, str], str]
) -> dict[tuple[str, str], Estimate]:
    """(target, source) -> estimate for every planned first-order readout. Stored in the stage
    folder, so a resumed run prunes exactly as the first did."""
    stored = out / "estimates.json"
    if stored.exists():
        return {(r["target"], r["source"]): Estimate(**r) for r in stored.read_json()}
    refs = []
    for target in plan.targets:
        job = estimate_job(jobs, target, [r.sources[0] for r in plan.first_order_of(target)], dirs)
        refs.append(_REMOTE_ESTIMATES.options(**jobs.resources).remote(job))
    found = [e for batch in ray.get(refs) for e in batch]
    stored.write_json([asdict(e) for e in found])
    return {(e.target, e.source): e for e in found}


def estimate_job(
    jobs: Stage2Plan,
    target: str,
    sources: list[str],
    dirs: Mapping[tuple[str, str], str],
    kind: EstimatorKind | None = None,
) -> EstimateJob:
    """One target's estimates of `sources`, from their cached features (`kind`: the configured
    estimator unless given)."""
    cfg, p, task = jobs.config, jobs.transfer.prune, jobs.config.task(target)
    return EstimateJob(
        target=task,
        feature_dirs=tuple((s, dirs[s, task.input.value]) for s in sources),
        data_root=jobs.store.root.uri,
        kind=kind or p.estimator,
        settings=jobs.settings,
        model=cfg.model,
        image_size=cfg.data.size,
        channels=channels_for(task, jobs.store),
        short_epochs=p.short_epochs,
        use_gpu=jobs.use_gpu,
        threads=max(1, int(jobs.transfer.cpus_per_readout)),
    )


def pruned(
    jobs: Stage2Plan,
    plan: TransferPlan,
    found: Mapping[tuple[str, str], Estimate],
    seconds_per_readout: Callable[[], float],
) -> TransferPlan:
    """Top-K sources per target by estimate (K from the budget in budget mode, which times one
    readout with `seconds_per_readout`), the shared sources, an audit sample of the rest, every
    baseline."""
    p, seed = jobs.transfer.prune, jobs.transfer.seed
    scores = {k: e.score for k, e in found.items()}
    if not p.compute_fraction:
        return prune_plan(plan, scores, p.top_k, p.audit_fraction, seed, p.shared)
    spent = sum(e.seconds for e in found.values())
    smaller, cost = prune_for_budget(
        plan, scores, p.compute_fraction, seconds_per_readout(), spent, p.audit_fraction, seed, p.shared
    )
    if cost > p.compute_fraction:  # K never goes below 1: say so rather than overspend quietly
        print(
            f"transfer.prune.compute_fraction: {p.compute_fraction} cannot be met; the smallest "
            f"pruned plan (top_k {smaller.top_k}, shared {p.shared}, audit_fraction {p.audit_fraction}, "
            f"baselines never pruned) costs {cost:.2f} of the full plan",
            file=sys.stderr,
            flush=True,
        )
    return smaller
