"""Nightly retraining: lock, refresh the data, rerun incrementally, promote champions, summarize.

    taskatlas nightly -c configs/taskonomy-gpu.yaml            # cron / systemd timer / RayCronJob
    taskatlas nightly -c configs/quickstart.yaml --date 2026-11-21   # a backfill

The synthetic dataset is refreshed by deriving its seed from the date, so each night has a new
data version and a rerun on the same day reuses everything (and promotes nothing). An imported
dataset (`data.path`) whose source folder has grown (or changed) since is imported again, as a
new data version under `<storage_root>/data/`, its old images keeping their ids and splits;
while the source is unchanged, the dataset is used as it is.
A task's new model becomes the registry's `champion` only if its test loss is not worse than the
current champion's on the same (new) test split.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import date

import torch

from components.data.sources import refreshed_dataset
from components.study_lock import StudyLocked
from components.tasks import Task
from components.training import iter_batches, nanmean, per_image_losses
from pipelines.config import PipelineConfig
from pipelines.invocation import invocation, study_lock
from pipelines.pipeline import ALL_STAGES, PipelineResult, Stage, run_pipeline
from pipelines.ray_runtime import ensure_ray
from pipelines.results import TaskResult
from pipelines.tracking import CHAMPION, Tracker, UnsafeModelError, load_registered_model


def nightly_config(cfg: PipelineConfig, day: date) -> PipelineConfig:
    if cfg.data.path:
        fresh = refreshed_dataset(cfg.data.path, cfg.root / "data")
        return cfg if fresh == cfg.data.path else replace(cfg, data=replace(cfg.data, path=fresh))
    return replace(
        cfg, data=replace(cfg.data, seed=cfg.data.seed * 100_000_000 + int(day.strftime("%Y%m%d")))
    )


@dataclass(frozen=True)
class Promotion:
    task: str
    version: str
    test_loss: float
    champion_version: str | None
    champion_loss: float | None
    promoted: bool
    refused: str = ""  # why the champion could not be loaded (not weights only): it is replaced


def promote(
    tracker: Tracker,
    results: dict[str, TaskResult],
    retrained: list[str],
    test_data: dict,
    catalog: dict[str, Task],
) -> list[Promotion]:
    """Compare each retrained task's new model with the registry's champion on the same test split."""
    out = []
    for name in retrained:
        r = results[name]
        registered = f"taskatlas-{name}"
        champion = tracker.alias_version(registered, CHAMPION)
        champion_loss, refused = None, ""
        if champion is not None and champion != r.model_version:
            task = catalog[name]
            try:  # weights only: a champion that is anything else is refused, never unpickled
                model = load_registered_model(tracker.tracking_uri, registered, champion)
            except UnsafeModelError as err:
                refused = str(err)
            else:
                batches = iter_batches({k: test_data[k] for k in ("image_id", *task.columns)}, 256)
                champion_loss = nanmean(per_image_losses(model, batches, task, torch.device("cpu"))[1])
        # A task's first version is made champion when it is registered (Stage I): new this night.
        better = champion in (None, r.model_version) or refused != "" or r.test_loss <= champion_loss
        if better:
            tracker.set_alias(registered, CHAMPION, r.model_version)
        out.append(Promotion(name, r.model_version, r.test_loss, champion, champion_loss, better, refused))
    return out


def run_nightly(
    cfg: PipelineConfig, day: date, stages: tuple[Stage, ...] = ALL_STAGES, wait_for_lock: bool = False
) -> dict | None:
    """The nightly job; None if another nightly holds the study's lock (the second of two leaves
    at once, even with `wait_for_lock`). Another command working on the storage root is refused
    (`StudyLocked`), or waited for with `wait_for_lock`."""
    try:
        with study_lock(cfg, "nightly", wait_for_lock, never_wait_for="nightly"):
            return _nightly_under_lock(cfg, day, stages)
    except StudyLocked as err:
        if err.holder.command != "nightly":
            raise
        return None


def _nightly_under_lock(cfg: PipelineConfig, day: date, stages: tuple[Stage, ...]) -> dict:
    ensure_ray()
    cfg = nightly_config(cfg, day)  # under the lock: a re-import happens once
    with invocation(cfg, "nightly") as inv:
        result: PipelineResult = run_pipeline(inv, stages)
        needed = sorted({c for name in result.retrained for c in cfg.task(name).columns})
        test = inv.store.read("test", needed)  # only the columns the champions are scored on
        promotions = promote(inv.tracker, result.stage1, result.retrained, test, cfg.catalog)
        summary = _summary(cfg, day, result, promotions)
        inv.tracker.set_tags(
            inv.run_id,
            {
                "nightly_date": day.isoformat(),
                "retrained": ",".join(result.retrained),
                "promoted": ",".join(summary["promoted"]),
            },
        )
        inv.tracker.log_metrics(
            inv.run_id, {"retrained": len(result.retrained), "promoted": len(summary["promoted"])}
        )
        inv.tracker.write_json_artifact(inv.run_id, summary, "nightly_summary.json")
    return summary


def _summary(cfg: PipelineConfig, day: date, result: PipelineResult, promotions: list[Promotion]) -> dict:
    last_path = cfg.root / "nightly" / "last_taxonomy.json"
    previous = last_path.read_json() if last_path.exists() else None
    summary = {
        "date": day.isoformat(),
        "data_version": result.data_version,
        "retrained": result.retrained,
        "promoted": [p.task for p in promotions if p.promoted],
        "promotions": [p.__dict__ for p in promotions],
        "steps": result.steps,
        "taxonomy": result.taxonomy,
        "taxonomy_changed": None,
    }
    if result.taxonomy is not None:
        now = {"roots": result.taxonomy["roots"], "transfers": result.taxonomy["transfers"]}
        if previous is not None:
            summary["taxonomy_changed"] = previous != now
            summary["roots_before"] = previous["roots"]
        last_path.write_json(now)
    return summary
