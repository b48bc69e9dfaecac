"""Nightly retraining: lock, refresh the data, rerun incrementally, promote champions, summarize.

    taskatlas nightly -c configs/taskonomy-gpu.yaml            # cron / systemd timer / RayCronJob
    taskatlas nightly -c configs/quickstart.yaml --date 2026-11-21   # a backfill

The synthetic dataset is refreshed by deriving its seed from the date, so each night has a new
data version and a rerun on the same day reuses everything (and promotes nothing). An imported
dataset (`data.path`) whose source folder has grown (or changed) since is imported again, as a
new data version under `<storage_root>/data/`, its old images keeping their ids and splits;
while the source is unchanged, the dataset is used as it is.
A task's new model becomes the registry's `champion` (of `<study>-<task>`, `pipelines/tracking/registry.py`)
only if its test loss is not worse than the current champion's on the same (new) test split. A
champion of another definition of the task (another loss, column, ...) is not scored with this
one's loss: the study redefined the task, and the new model takes its place. What a night
remembers for the next (the last taxonomy) is kept per study, under `nightly/<study>/`, so
studies that share a storage root and a tracking store never touch each other's state.
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
from pipelines.steps import Fence
from pipelines.tracking.models import CHAMPION, UnsafeModelError, load_registered_weights, network_spec
from pipelines.tracking.registry import network_model, nightly_state, registered_definition
from pipelines.tracking.runs import Tracker


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
    # The champion's definition hash where it is not this task's: not scored, and replaced
    champion_definition: str = ""


def promote(
    tracker: Tracker,
    study: str,
    results: dict[str, TaskResult],
    retrained: list[str],
    test_data: dict,
    catalog: dict[str, Task],
) -> list[Promotion]:
    """Compare each retrained task's new model with the champion of the study's registered model
    on the same test split, when that champion is of the same task definition."""
    out = []
    for name in retrained:
        r, task = results[name], catalog[name]
        registered = network_model(study, name)
        champion = tracker.models.alias_version(registered, CHAMPION)
        champion_loss, refused, other = None, "", ""
        if champion is not None and champion != r.model_version:
            tagged = registered_definition(tracker, registered, champion)
            if tagged not in (None, task.definition_hash):  # the study redefined the task
                other = tagged
            else:  # same definition, or untagged: its stored task says
                try:
                    champion_loss, other = _score_champion(tracker, registered, champion, task, test_data)
                except UnsafeModelError as err:  # weights only: anything else is refused, never unpickled
                    refused = str(err)
        # A task's first version is made champion when it is registered (Stage I): new this night.
        better = champion in (None, r.model_version) or bool(refused or other) or r.test_loss <= champion_loss
        if better:
            tracker.models.set_alias(registered, CHAMPION, r.model_version)
        out.append(
            Promotion(name, r.model_version, r.test_loss, champion, champion_loss, better, refused, other)
        )
    return out


def _score_champion(
    tracker: Tracker, registered: str, version: str, task: Task, test_data: dict
) -> tuple[float | None, str]:
    """(the champion's mean test loss, "") or, for a champion registered before the definition tag
    whose stored task has another definition, (None, its definition hash): never scored."""
    architecture, state = load_registered_weights(tracker.tracking_uri, registered, version)
    spec = network_spec(architecture)
    if spec.task.definition_hash != task.definition_hash:
        return None, spec.task.definition_hash
    model = spec.build()
    model.load_state_dict(state)
    batches = iter_batches({k: test_data[k] for k in ("image_id", *task.columns)}, 256)
    return nanmean(per_image_losses(model.eval(), batches, task, torch.device("cpu"))[1]), ""


def run_nightly(
    cfg: PipelineConfig,
    day: date,
    stages: tuple[Stage, ...] = ALL_STAGES,
    wait_for_lock: bool = False,
    verbose: bool = False,
) -> dict | None:
    """The nightly job; None if another nightly of this study holds the storage root's lock (the
    second of two leaves at once, even with `wait_for_lock`). Any other command working on the
    root, another study's nightly included, is refused (`StudyLocked`), or waited for with
    `wait_for_lock`."""
    command = lock_command(cfg.name)
    try:
        with study_lock(cfg, command, wait_for_lock, never_wait_for=command) as fence:
            return _nightly_under_lock(cfg, day, stages, verbose, fence)
    except StudyLocked as err:
        if err.holder.command != command:
            raise
        return None


def lock_command(study: str) -> str:
    """What a nightly's lock record says it runs: `nightly (<study>)`. Two studies may share a
    storage root; only a nightly of the same study has nothing to add to one already running."""
    return f"nightly ({study})"


def _nightly_under_lock(
    cfg: PipelineConfig, day: date, stages: tuple[Stage, ...], verbose: bool, fence: Fence
) -> dict:
    ensure_ray(verbose)
    cfg = nightly_config(cfg, day)  # under the lock: a re-import happens once
    with invocation(cfg, "nightly", fence, verbose) as inv:
        result: PipelineResult = run_pipeline(inv, stages)
        needed = sorted({c for name in result.retrained for c in cfg.task(name).columns})
        test = inv.store.read("test", needed)  # only the columns the champions are scored on
        promotions = promote(inv.tracker, cfg.name, result.stage1, result.retrained, test, cfg.catalog)
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
    last_path = nightly_state(cfg.root, cfg.name) / "last_taxonomy.json"  # this study's, not the root's
    previous = last_path.read_json() if last_path.exists() else None
    summary = {
        "date": day.isoformat(),
        "data_version": result.data_version,
        "retrained": result.retrained,
        "promoted": [p.task for p in promotions if p.promoted],
        "promotions": [p.__dict__ for p in promotions],
        "steps": result.steps,
        "taxonomy": result.taxonomy.to_json() | {"path": result.taxonomy.path} if result.taxonomy else None,
        "taxonomy_changed": None,
    }
    if result.taxonomy is not None:
        now = {k: v for k, v in result.taxonomy.to_json().items() if k in ("roots", "transfers")}
        if previous is not None:
            summary["taxonomy_changed"] = previous != now
            summary["roots_before"] = previous["roots"]
        last_path.write_json(now)
    return summary
