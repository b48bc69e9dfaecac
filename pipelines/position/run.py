"""`taskatlas position`: where a new task sits among a finished study's tasks, from a folder of
images labelled for that task only, and a model for it built on its best sources (design.md
section 12; Taskonomy's closing use case).

    taskatlas position -c configs/quickstart.yaml --task near.yaml --images my-images/
    taskatlas predict -c configs/quickstart.yaml --model taskatlas-quickstart-near-transfer --images new/ --out preds/

Everything is checked before any work (the task definition, the folder, the split's size, the
study being finished), then, each step resumable under the study's storage root:
1. The folder is imported as a dataset of its own (`rgb/` and the task's column), split per image
   by name into transfer and test images: `position/<task>/data/<key>/`. Its data version keys
   every step after it, so more images retrain only this task's readouts.
2. Stage II for one target, the study's own fan-out (`Stage2`): the study's frozen encoders encode
   the new images once (the feature cache, keyed by encoder and data version), readouts from every
   study task and higher orders from the new target's beam, with replicates; baselines `scratch`,
   `random`, `pixels`, and `self` only where the study has a network for this very task.
3. Stage III for this target: the multi-bootstrap's affinities with intervals and p_best, gain as
   the win rate against `scratch` (Taskonomy's Gain).
4. Where it sits (`components.position`): the study tasks nearest to it, what the study's roots
   give it, what one more root would add.
5. The model: the chosen transfer's readout trained again with its weights kept (replicate 0's seed:
   the same readout), registered weights-only as `<study>-<task>-transfer`, champion.
Nothing of the study is recomputed.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from components.affinity import SCRATCH, affinity_by_target
from components.config import config_hash
from components.data.shards import ShardStore
from components.errors import TaskatlasError
from components.plots import plot_position
from components.position import (
    candidates_of,
    choose_model,
)
from components.storage import Location, location
from components.tasks import Task
from components.transfer import Pairing, Readout, ReadoutKind, plan_transfers
from components.transfer.features import load_state_dict
from components.transfer.jobs import train_model
from components.transfer.model import EncoderRef
from components.transfer.readout import validation_split
from pipelines.analysis.plan import analysis_key, loss_digests
from pipelines.config import PipelineConfig
from pipelines.position.answer import PositionAnswer, RegisteredModel, answer_markdown, answer_of
from pipelines.position.inputs import Study
from pipelines.position.record import register_model, registered_encoders
from pipelines.results import TaskResult
from pipelines.stage2.plan import feature_sources
from pipelines.stage2.run import Stage2
from pipelines.steps import Fence, Step, code_digest, log_stored_artifact
from pipelines.tracking.registry import is_registered
from pipelines.tracking.runs import Tracker

_TRAIN_MODEL = ray.remote(train_model)
POSITION = "position.json"  # the answer, in the step folder (what `--json` prints, less run ids)
# The code that turns the losses into the answer, besides Stage III's (in the study's affinity key)
POSITION_CODE = ("components.position", "pipelines.position.answer")
READOUT_WEIGHTS = "readout.pt"  # the model's readout, a state dict, in its step folder
READOUT_ABOUT = "readout.json"  # beside it: its input channels and mean test loss


@dataclass(frozen=True)
class PositionResult:
    answer: PositionAnswer  # POSITION's contents
    folder: str  # the step folder: affinity.parquet, position.json, position.png
    readouts_ran: int
    run_id: str
    losses: Location  # the new target's per-image loss table (Stage II's)

    def summary(self) -> dict[str, Any]:
        return {
            **self.answer.to_json(),
            "readouts_ran": self.readouts_ran,
            "run_id": self.run_id,
            "folder": self.folder,
        }


def position_task(
    study: Study, task: Task, store: ShardStore, tracker: Tracker, run_id: str, fence: Fence, use_self: bool
) -> PositionResult:
    """`task` placed among `study`'s tasks and its model registered, under the study lock whose
    check is `fence`."""
    cfg = study.config
    sources = [t for t in cfg.tasks if t != task.name]
    baselines = [ReadoutKind.SCRATCH, ReadoutKind.RANDOM, ReadoutKind.PIXELS] + (
        [ReadoutKind.SELF] if use_self else []
    )
    t = cfg.transfer
    fit = validation_split(store.manifest.counts["transfer"], t.val_fraction, t.seed)[0].size
    epochs = cfg.position.epochs(t.epochs, fit, t.batch_size)
    derived = replace(
        cfg,
        tasks=(task.name,),
        task_definitions={task.name: task.definition()},
        data=replace(cfg.data, path=store.root.uri),
        transfer=replace(
            t,
            targets=(task.name,),
            baselines=tuple(baselines),
            epochs=epochs,
            scratch_epochs=cfg.position.epochs(t.scratch_epochs, fit, t.batch_size),
        ),
    )
    t = derived.transfer
    n = derived.train.replicates  # readout replicate r reads the study's network replicate r mod n
    plan = plan_transfers(
        [task.name], sources, t.orders, t.beams, t.baselines, t.replicates, t.widen_beams, n
    )
    networks = {s: study.networks[s] for s in sources} | (
        {task.name: study.networks[task.name]} if use_self else {}
    )
    encoders = registered_encoders(tracker, cfg.name, networks)  # before any work
    stage2 = Stage2(derived, store, tracker, run_id, fence)
    transfer = stage2.run(networks, plan)
    if transfer.failed:
        raise TaskatlasError(f"{len(transfer.failed)} readout(s) failed: {', '.join(transfer.failed)}")

    # The answer places the task among the study's affinities and roots: a study rerun with other
    # settings (a new affinity table or taxonomy) makes a new answer, its readouts reused. It reads
    # the new target's loss table: keyed by its SHA-256 too (Stage II's marker has it), so a readout
    # done again with other losses makes a new answer, as the study's own are in its affinity key.
    where = config_hash(
        "position",
        code_digest(*POSITION_CODE),
        transfer.key,
        analysis_key(cfg.analysis),
        study.affinity.key,
        study.taxonomy.roots,
        {"inputs": loss_digests(transfer.losses)},
    )
    step = Step(cfg.root, f"position/{task.name}", where)
    if not step.complete:
        table = affinity_by_target(
            [task.name],
            lambda name: (transfer.losses / f"{name}.parquet").read_parquet(),
            cfg.analysis.bootstrap,
            cfg.analysis.seed,
            paired=t.pairing is Pairing.PAIRED,
            gain_reference=SCRATCH,
            require_self=False,
        ).table
        (step.location / "affinity.parquet").write_parquet(table)
        candidates = candidates_of(table, task.name)
        # chosen on validation images, so its figures on the test images are not what picked it
        chosen = choose_model(candidates, validation_losses(location(transfer.summary_path), task.name))
        model = _model(derived, stage2, networks, plan, task, chosen.sources, encoders, tracker, run_id)
        answer = answer_of(study, task, store, candidates, chosen, model, t.replicates)
        with step.scratch() as scratch:
            plot_position(task.name, table.to_pylist(), scratch / "position.png", chosen.sources)
            _store(step, answer, scratch, fence)
    answer = PositionAnswer.from_json(step.info())
    # The model as the current tracking store has it: registered again if the store lost it
    model = _model(derived, stage2, networks, plan, task, answer.model.sources, encoders, tracker, run_id)
    if model != answer.model:
        answer = replace(answer, model=model)
        with step.scratch() as scratch:
            _store(step, answer, scratch, fence)
    for name in ("position.png", POSITION):
        log_stored_artifact(tracker, run_id, step.location / name)
    tracker.describe(run_id, answer_markdown(answer))
    return PositionResult(
        answer, step.location.uri, transfer.ran, run_id, transfer.losses / f"{task.name}.parquet"
    )


def _store(step: Step, answer: PositionAnswer, scratch: Path, fence: Fence) -> None:
    """The answer as `position.json` beside the step's files, and as its marker."""
    (scratch / POSITION).write_text(json.dumps(answer.to_json(), indent=1))
    step.finish(answer.to_json(), scratch, fence=fence)


def _model(
    cfg: PipelineConfig,
    stage2: Stage2,
    networks: dict[str, TaskResult],
    plan,
    task: Task,
    sources: tuple[str, ...],
    encoders: dict[str, EncoderRef],
    tracker: Tracker,
    run_id: str,
) -> RegisteredModel:
    """Retrain the chosen transfer's (`sources`) replicate 0 with its weights kept and register
    it, once. Its weights stay in the step (`READOUT_WEIGHTS`): a registered version the current
    tracking store does not have is registered again from them."""
    readout = Readout(task.name, sources)
    keys = stage2.jobs.readout_keys(networks)
    step = Step(cfg.root, f"position/{task.name}/model", keys.key(readout))
    stored, about = step.location / READOUT_WEIGHTS, step.location / READOUT_ABOUT
    done = step.info() if step.complete else None
    if done is not None and is_registered(tracker, done["model"], done["model_version"], step.key):
        return RegisteredModel.from_json(done)
    if done is not None and stored.exists() and about.exists():  # registered again, not trained again
        weights, trained = load_state_dict(stored.uri), about.read_json()
        in_channels, test_loss = trained["in_channels"], trained["mean_test_loss"]
        lost = f"{done['model']} v{done['model_version']}"
        print(
            f"taskatlas: {lost} is not in the registry at {tracker.tracking_uri}; registered again "
            f"from {stored}",
            file=sys.stderr,
            flush=True,
        )
    else:
        dirs = stage2.features.ensure(feature_sources(cfg, networks), plan)
        view = task.input.value
        job = stage2.jobs.job(readout, tuple(dirs[(s, view)] for s in sources), "")
        remote = _TRAIN_MODEL.options(**stage2.jobs.resources)
        weights, in_channels, test_loss = ray.get(remote.remote(job))
    name, version = register_model(
        cfg, task, stage2.store, sources, encoders, weights, in_channels, test_loss, step.key, tracker, run_id
    )
    with step.scratch() as scratch:
        if not stored.exists():
            torch.save(dict(weights), scratch / READOUT_WEIGHTS)
            (scratch / READOUT_ABOUT).write_text(
                json.dumps({"in_channels": in_channels, "mean_test_loss": test_loss})
            )
        model = RegisteredModel(name, version, sources)
        step.finish(model.to_json(), scratch, fence=stage2.fence)
        return model


def validation_losses(summary: Location, target: str) -> dict[tuple[str, ...], float]:
    """Each transfer into `target`: its validation loss, the mean over its replicates (Stage II's
    summary: one row per readout replicate)."""
    by: dict[tuple[str, ...], list[float]] = {}
    for row in summary.read_parquet().to_pylist():
        if row["kind"] == ReadoutKind.TRANSFER.value and row["target"] == target:
            by.setdefault(tuple(row["sources"]), []).append(row["val_loss"])
    return {sources: float(np.mean(v)) for sources, v in by.items()}
