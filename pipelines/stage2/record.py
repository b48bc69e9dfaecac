"""Stage II's record: the stage's summary table, its MLflow metrics and artifacts, its marker.

The readouts' own runs are logged as they finish (`pipelines.stage2.readout_runs`); this writes what
the finished fan-out adds up to, and the step's marker only when no readout failed (otherwise
`failed.json`, and a rerun retries just those).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from components.storage import Location
from components.transfer import ReadoutKind, TransferPlan
from components.transfer.estimate import Estimate, pruning_report
from pipelines.results import READOUT_RUNS, TARGET_RUNS, Stage2Result
from pipelines.stage2.fanout import FanOut
from pipelines.steps import Fence, Step, log_stored_artifact
from pipelines.tracking.runs import Tracker

LOSSES = "losses"  # the step's folder of per-target loss tables, `<target>.parquet`
PRUNING = "pruning.json"  # in the step folder when transfer.prune is on
# Readouts this run trained (`self` is scored, not trained): on the transfer run and the parent
READOUTS_TRAINED = "readouts_trained"

STAGE_NOTE = """A run per target (`transfer/<target>`) gathers its readouts: small networks trained
on the frozen features of their sources (the `transfer` split less a validation part), scored per
test image; lower loss is better. Each candidate (`target <- sources`) is one run in the experiment
`<this experiment>/readouts`, its replicates' losses as `test_loss/r<k>`, `val_loss/r<k>` and
`train_loss/r<k>`. Baselines: `self` is the target's own fully supervised network (the bar a
transfer tries to reach), `pixels` a readout on the raw image (no encoder), `random` a readout on a
frozen random-init encoder (what architecture alone gives). After Stage III each candidate run has
`pooled_affinity`, `pooled_quality` (win rate against `self`) and `pooled_gain` (win rate against
`pixels`), pooled over its replicates, and each target run lists its candidates by them."""


def summary_table(fan: FanOut) -> pa.Table:
    """One row per readout replicate: target, sources, order, replicate, kind, losses, seconds."""
    readouts = sorted(fan.outcomes)
    return pa.table(
        {
            "target": [r.target for r in readouts],
            "sources": [list(r.sources) for r in readouts],
            "order": pa.array([r.order for r in readouts], pa.int32()),
            "replicate": pa.array([r.replicate for r in readouts], pa.int32()),
            "kind": [r.kind.value for r in readouts],
            "mean_loss": [fan.outcomes[r].mean_loss for r in readouts],
            "val_loss": [fan.outcomes[r].val_loss for r in readouts],
            "seconds": [fan.outcomes[r].seconds for r in readouts],
        }
    )


def counts_of(plan: TransferPlan, fan: FanOut) -> dict[str, int]:
    """Readouts per order and per baseline, as they ended up in the loss tables."""
    counts = {"order 1": 0} | {f"order {k}": 0 for k in plan.orders}
    for r in fan.outcomes:
        name = f"order {r.order}" if r.kind is ReadoutKind.TRANSFER else r.kind.value
        counts[name] = counts.get(name, 0) + 1
    return counts


def record_stage(
    tracker: Tracker, step: Step, run_id: str, plan: TransferPlan, fan: FanOut, seconds: float, fence: Fence
) -> Stage2Result:
    """The summary (Parquet, and CSV for the UI), metrics and failures; the marker if none failed."""
    out = step.location
    summary = summary_table(fan)
    readable = summary.set_column(1, "sources", pc.binary_join(summary["sources"], "+"))
    with step.scratch() as scratch:
        pacsv.write_csv(readable, scratch / "summary.csv")  # the MLflow UI cannot show Parquet
        tracker.log_artifact(run_id, scratch / "summary.csv")
    (out / "summary.parquet").write_parquet(summary)
    log_stored_artifact(tracker, run_id, out / "summary.parquet")
    failed = tuple(sorted(r.name for r in fan.failed))
    metrics = {
        "readouts": len(fan.outcomes),
        READOUTS_TRAINED: fan.ran,
        "failed": len(failed),
        "wall_seconds": seconds,
    }
    tracker.log_metrics(run_id, metrics)
    errors = {r.name: err for r, err in fan.failed.items()}
    if failed:
        tracker.log_dict(run_id, errors, "failed.json")
    result = Stage2Result(
        key=step.key,
        out_dir=out.uri,
        losses_dir=(out / LOSSES).uri,
        summary_path=(out / "summary.parquet").uri,
        run_id=run_id,
        counts=counts_of(plan, fan),
        failed=failed,
        ran=fan.ran,
    )
    if failed:  # incomplete: no marker, so a rerun retries the failed readouts
        (out / "failed.json").write_json(errors)
        return result
    (out / "failed.json").unlink(missing_ok=True)
    first = (r for r in sorted(fan.outcomes) if r.replicate == 0)  # every replicate shares its run
    runs = {r.name: fan.runs[k][0] for r in first if (k := fan.keys.key(r)) in fan.runs}
    (out / READOUT_RUNS).write_json(runs)
    (out / TARGET_RUNS).write_json(fan.log.targets)
    step.finish({k: v for k, v in asdict(result).items() if k not in ("ran", "failed")}, fence=fence)
    return result


def record_pruning(
    tracker: Tracker,
    out: Location,
    run_id: str,
    plan: TransferPlan,
    estimates: Mapping[tuple[str, str], Estimate],
    fan: FanOut,
    about: dict,
) -> None:
    """`pruning.json`: what was pruned and audited, and how well the estimate ranked the
    first-order readouts that were trained (each target's top K and its audit sample)."""
    report = pruning_report(plan, estimates, {r: o.mean_loss for r, o in fan.outcomes.items()}) | about
    (out / PRUNING).write_json(report)
    log_stored_artifact(tracker, run_id, out / PRUNING)
    metrics = {"pruned": len(plan.pruned), "estimate_seconds": report["estimate_seconds"]}
    if report["spearman"] is not None:
        metrics["estimate_spearman"] = report["spearman"]
    tracker.log_metrics(run_id, metrics)
