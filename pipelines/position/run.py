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
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import yaml
from mlflow.entities import Metric

from components.affinity import SCRATCH, affinity_by_target
from components.config import config_hash
from components.data.folder import RGB, FolderColumn, import_folder, load_spec, recorded_spec, scan_folder
from components.data.importing import ARRAY_SUFFIX, NPY_LAYOUTS, ImportConfig, read_raw, split_of
from components.data.shards import MANIFEST, ShardStore
from components.errors import ConfigError, TaskatlasError
from components.plots import plot_position
from components.position import (
    Candidate,
    candidates_of,
    choose_model,
    first_order_columns,
    nearest_tasks,
    root_service,
)
from components.storage import Location, location
from components.tasks import Loss, Task, TaskKind, channels_for, task_from_definition
from components.transfer import Pairing, Readout, ReadoutKind, plan_transfers
from components.transfer.features import load_state_dict
from components.transfer.jobs import train_model
from components.transfer.model import EncoderRef, TransferSpec
from components.transfer.readout import validation_split
from components.verdict import TIE
from pipelines.analysis.steps import affinity_step, analysis_key, loss_digests, taxonomy_step
from pipelines.config import PipelineConfig
from pipelines.invocation import dataset_folder
from pipelines.results import TaskResult
from pipelines.stage1.plan import Stage1Plan
from pipelines.stage2.plan import Stage2Plan, feature_sources
from pipelines.stage2.record import LOSSES
from pipelines.stage2.run import Stage2
from pipelines.steps import Step, log_stored_artifact
from pipelines.tracking.models import CHAMPION, Registration
from pipelines.tracking.registry import KEY_TAG, is_registered, network_model, positioned_model, version_tags
from pipelines.tracking.runs import Tracker

_TRAIN_MODEL = ray.remote(train_model)
POSITION = "position.json"  # the answer, in the step folder (what `--json` prints, less run ids)
READOUT_WEIGHTS = "readout.pt"  # the model's readout, a state dict, in its step folder
READOUT_ABOUT = "readout.json"  # beside it: its input channels and mean test loss


# ---------------------------------------------------------------- up-front checks


def load_task(path: str | Path) -> Task:
    """NEW.yaml: one task definition under its name, the form of `task_definitions`."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"--task {path}: cannot read it ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"--task {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict) or len(data) != 1:
        raise ConfigError(f"--task {path}: expected one task, `<name>: {{column, kind, loss, channels}}`")
    name, definition = next(iter(data.items()))
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"--task {path}: {name!r} is not a task name (letters, digits and underscores)")
    task = task_from_definition(name, definition, where=f"{path.name}: ")
    if task.column == RGB:  # its labels would be the images, and its predictions go to OUT/rgb
        raise ConfigError(
            f"{path.name}: {name}.column: {RGB!r} is the images' own folder; "
            "a new task's labels are a column (folder) of their own"
        )
    return task


@dataclass(frozen=True)
class Study:
    """A finished study: its networks, its affinity table and its taxonomy."""

    config: PipelineConfig
    store: ShardStore
    networks: dict[str, TaskResult]
    affinity: Step
    taxonomy: dict


def finished_study(cfg: PipelineConfig) -> Study:
    """The study of `cfg`, or a one-line error saying what is missing."""
    hint = "run `taskatlas run` with this config first"
    folder = dataset_folder(cfg)
    if not (folder / MANIFEST).exists():
        raise TaskatlasError(f"the study {cfg.name!r} is not finished: no dataset at {folder}; {hint}")
    store = ShardStore(folder)
    stage1 = Stage1Plan(cfg, store)
    networks = {}
    for task in cfg.study_tasks():
        if (done := stage1.finished(task)) is None:
            raise TaskatlasError(f"the study {cfg.name!r} is not finished: no {task.name} network; {hint}")
        networks[task.name] = done
    stage2 = Stage2Plan(cfg, store)
    transfer = stage2.step(stage2.key(networks))
    affinity = affinity_step(cfg, transfer.key, transfer.location / LOSSES)
    taxonomy = taxonomy_step(cfg, affinity.key)
    if not (transfer.complete and affinity.complete and taxonomy.complete):
        raise TaskatlasError(f"the study {cfg.name!r} is not finished: no taxonomy yet; {hint}")
    return Study(cfg, store, networks, affinity, (taxonomy.location / "taxonomy.json").read_json())


def check_task(cfg: PipelineConfig, task: Task) -> bool:
    """A new task, or one of the study's with the very same definition (then its network is the
    `self` baseline, never a source). Returns whether `self` applies."""
    if task.name in cfg.tasks:
        mine = cfg.task(task.name)
        if mine.definition() != task.definition():
            differs = next(k for k, v in task.definition().items() if mine.definition().get(k) != v)
            raise ConfigError(
                f"task {task.name}: the study has a task of that name with another {differs}; "
                "give the new task a name of its own"
            )
        return True
    return False


def check_images(
    folder: Path, task: Task, cfg: PipelineConfig, spec_path: str | None
) -> dict[str, FolderColumn]:
    """The folder has `rgb/` and the task's column for enough images, before anything is written:
    (the column's import spec)."""
    if not folder.is_dir():
        raise ConfigError(f"--images {folder}: no such folder")
    if not (folder / task.column).is_dir():
        raise ConfigError(f"--images {folder}: no {task.column}/ folder (the column of task {task.name})")
    with _columns_view(folder, (RGB, task.column)) as view:
        found = scan_folder(view, skip_incomplete=True)
    n_test = sum(split_of(i, _import_config(cfg)) == "test" for i in found.ids)
    p = cfg.position
    if n_test < p.min_test_images or len(found.ids) - n_test < 2 * p.min_test_images:
        need = math.ceil(3 * p.min_test_images / p.test_fraction)
        raise ConfigError(
            f"--images {folder}: {len(found.ids)} labelled images give {n_test} test and "
            f"{len(found.ids) - n_test} transfer images; positioning needs at least {p.min_test_images} "
            f"test and {2 * p.min_test_images} transfer images (about {need} images)"
        )
    spec = load_spec(spec_path)  # other columns' entries are not used: only the task's column is read
    column = spec.get(task.column, FolderColumn(labels=task.loss is Loss.CROSS_ENTROPY))
    if task.kind is TaskKind.PIXEL and not column.labels:
        sample = folder / task.column / found.files[task.column][found.ids[0]].name
        if (channels := read_raw(sample).shape[-1]) != task.channels:
            npy = sample.suffix.lower() == ARRAY_SUFFIX
            layouts = f" (an .npy file is read as {NPY_LAYOUTS})" if npy else ""
            raise ConfigError(
                f"{sample}: {channels} channel(s), but task {task.name} has channels: {task.channels}{layouts}"
            )
    return {task.column: column}


def _import_config(cfg: PipelineConfig) -> ImportConfig:
    p = cfg.position
    return ImportConfig(
        size=cfg.data.size, transfer_fraction=1 - p.test_fraction, test_fraction=p.test_fraction
    )


def import_key(cfg: PipelineConfig, listing: list, spec: dict[str, FolderColumn]) -> str:
    """A folder version's import: its files, the spec as recorded, the split settings."""
    recorded = {c: recorded_spec(s) for c, s in spec.items()}
    return config_hash("position-data-v1", listing, recorded, _import_config(cfg))


def import_images(cfg: PipelineConfig, task: Task, folder: Path, spec: dict[str, FolderColumn]) -> ShardStore:
    """The folder's RGB and task column as a dataset under the study's root, imported once per
    version of the folder (its files' names, sizes and times)."""
    listing = [
        (f"{c}/{p.name}", p.stat().st_size, p.stat().st_mtime_ns)
        for c in (RGB, task.column)
        for p in sorted((folder / c).iterdir())
        if p.is_file()
    ]
    out = cfg.root / "position" / task.name / "data" / import_key(cfg, listing, spec)
    if not (out / MANIFEST).exists():
        with _columns_view(folder, (RGB, task.column)) as view:
            import_folder(view, out.uri, _import_config(cfg), spec, skip_incomplete=True)
    return ShardStore(out)


@contextmanager
def _columns_view(folder: Path, columns: tuple[str, ...]) -> Iterator[Path]:
    """A folder of links to `columns` of `folder`: the importer takes every column folder it
    finds, and the user's folder may hold others (labels of other tasks). Its path depends only
    on the folder and columns: the importer records it, and an interrupted import resumes only
    under the same settings."""
    name = config_hash("position-view", str(folder.resolve()), columns)
    view = Path(tempfile.gettempdir()) / f"taskatlas-position-{name}-{os.getuid()}"
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    try:
        for c in columns:
            (view / c).symlink_to(folder.resolve() / c, target_is_directory=True)
        yield view
    finally:
        shutil.rmtree(view, ignore_errors=True)


# ---------------------------------------------------------------- the flow


@dataclass(frozen=True)
class PositionResult:
    answer: dict[str, Any]  # POSITION's contents
    folder: str  # the step folder: affinity.parquet, position.json, position.png
    readouts_ran: int
    run_id: str
    losses: Location  # the new target's per-image loss table (Stage II's)

    def summary(self) -> dict[str, Any]:
        return {
            **self.answer,
            "readouts_ran": self.readouts_ran,
            "run_id": self.run_id,
            "folder": self.folder,
        }


def position_task(
    study: Study, task: Task, store: ShardStore, tracker: Tracker, run_id: str, use_self: bool
) -> PositionResult:
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
    stage2 = Stage2(derived, store, tracker, run_id)
    transfer = stage2.run(networks, plan)
    if transfer.failed:
        raise TaskatlasError(f"{len(transfer.failed)} readout(s) failed: {', '.join(transfer.failed)}")

    # The answer places the task among the study's affinities and roots: a study rerun with other
    # settings (a new affinity table or taxonomy) makes a new answer, its readouts reused. It reads
    # the new target's loss table: keyed by its SHA-256 too (Stage II's marker has it), so a readout
    # done again with other losses makes a new answer, as the study's own are in its affinity key.
    where = config_hash(
        "position-v3",
        transfer.key,
        analysis_key(cfg.analysis),
        study.affinity.key,
        study.taxonomy["roots"],
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
        answer = _answer(study, task, store, candidates, chosen, model, t.replicates)
        with step.scratch() as scratch:
            plot_position(task.name, table.to_pylist(), scratch / "position.png", chosen.sources)
            (scratch / POSITION).write_text(json.dumps(answer, indent=1))
            step.finish(answer, scratch)
    answer = step.info()
    # The model as the current tracking store has it: registered again if the store lost it
    sources = tuple(answer["model_sources"])
    model = _model(derived, stage2, networks, plan, task, sources, encoders, tracker, run_id)
    if any(answer[k] != v for k, v in model.items()):
        answer |= model
        with step.scratch() as scratch:
            (scratch / POSITION).write_text(json.dumps(answer, indent=1))
            step.finish(answer, scratch)
    for name in ("position.png", POSITION):
        log_stored_artifact(tracker, run_id, step.location / name)
    tracker.describe(run_id, answer_markdown(answer))
    return PositionResult(
        answer, step.location.uri, transfer.ran, run_id, transfer.losses / f"{task.name}.parquet"
    )


def registered_encoders(
    tracker: Tracker, study: str, networks: dict[str, TaskResult]
) -> dict[str, EncoderRef]:
    """Each study network's registered version in the current tracking store, found by its step
    key under the study's name (or the name its marker records: another study's). A positioned
    model names its encoders by version and `predict` loads them from the registry, so a network
    that is not there (the store was replaced, as a damaged `mlflow.db` moved aside) is refused,
    in one line, before any work: `taskatlas run` registers the study's networks again."""
    refs, missing = {}, []
    for name, network in networks.items():
        names = dict.fromkeys([network_model(study, name), network.registered or network_model(study, name)])
        found = [
            (n, v) for n in names if (v := tracker.models.find_version(n, {KEY_TAG: network.key})) is not None
        ]
        if found:
            refs[name] = EncoderRef(name, *found[0])
        else:
            missing.append(name)
    if missing:
        raise TaskatlasError(
            f"position: the study's network(s) {', '.join(missing)} are not registered at "
            f"{tracker.tracking_uri}, so a model on them could not be loaded; run `taskatlas run` with "
            "the study's config first (it registers its networks again from their stored weights)"
        )
    return refs


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
) -> dict[str, str]:
    """Retrain the chosen transfer's (`sources`) replicate 0 with its weights kept and register
    it, once. Its weights stay in the step (`READOUT_WEIGHTS`): a registered version the current
    tracking store does not have is registered again from them."""
    readout = Readout(task.name, sources)
    keys = stage2.jobs.readout_keys(networks)
    step = Step(cfg.root, f"position/{task.name}/model", keys.key(readout))
    stored, about = step.location / READOUT_WEIGHTS, step.location / READOUT_ABOUT
    done = step.info() if step.complete else None
    if done is not None and is_registered(tracker, done["model"], done["model_version"], step.key):
        return done
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
    spec = TransferSpec(
        task=task,
        model=cfg.model,
        image_size=cfg.data.size,
        channels=channels_for(task, stage2.store),
        width=cfg.transfer.width,
        in_channels=in_channels,
        encoders=tuple(encoders[s] for s in sources),
    )
    name = positioned_model(cfg.name, task.name)
    model_id = tracker.create_logged_model(run_id, name)
    registration = Registration(
        name,
        description=(
            f"The {task.name} task positioned against a taskatlas study: a readout on the frozen "
            "encoders of its best sources, one version per positioning, `@champion` the newest. "
            "Weights only: `taskatlas predict --model NAME` runs it."
        ),
        tags={"task": task.name, "study": cfg.name, "kind": task.kind.value, "positioned": "true"},
        version_tags={
            **version_tags(cfg.name, task),
            KEY_TAG: step.key,
            "sources": "+".join(sources),
            "encoders": ",".join(f"{e.registered}/{e.version}" for e in spec.encoders),
            "data_version": stage2.store.data_version,
            "mean_test_loss": f"{test_loss:.6g}",
        },
        version_description=(
            f"{task.name} from the frozen encoders of {' + '.join(sources)} (registered versions "
            f"{', '.join(f'{e.registered} v{e.version}' for e in spec.encoders)}) and a readout trained on "
            f"{stage2.store.manifest.counts['transfer']} labelled images; mean test loss {test_loss:.4g}. "
            "Weights only: `taskatlas predict --model NAME` runs it."
        ),
    )
    now = int(time.time() * 1000)
    version = tracker.models.register_weights(
        run_id,
        model_id,
        weights,
        spec.architecture(),
        registration,
        [Metric("mean_test_loss", test_loss, now, 0)],
    )
    tracker.models.set_alias(name, CHAMPION, version)
    with step.scratch() as scratch:
        if not stored.exists():
            torch.save(dict(weights), scratch / READOUT_WEIGHTS)
            (scratch / READOUT_ABOUT).write_text(
                json.dumps({"in_channels": in_channels, "mean_test_loss": test_loss})
            )
        return step.finish({"model": name, "model_version": version, "model_sources": list(sources)}, scratch)


def _answer(
    study: Study,
    task: Task,
    store: ShardStore,
    candidates: list[Candidate],
    chosen: Candidate,
    model: dict,
    replicates: int,
) -> dict[str, Any]:
    """The answer as JSON: every candidate, the best (ties said as ties), where it sits, the model."""
    study_table = (study.affinity.location / "affinity.parquet").read_parquet()
    column = {c.sources[0]: c.affinity for c in candidates if len(c.sources) == 1 and not c.is_baseline}
    nearest = nearest_tasks(first_order_columns(study_table), column, exclude=[task.name])
    roots = list(study.taxonomy["roots"])
    from_roots, more = root_service(candidates, roots, [t for t in study.config.tasks if t != task.name])
    ties = [c for c in candidates if not c.is_baseline and (c.p_best >= TIE or math.isnan(c.p_best))]
    if any(math.isnan(c.p_best) for c in ties):  # no bootstrap: the point estimate's best only
        ties = [max(ties, key=lambda c: c.affinity)] if ties else []
    counts = store.manifest.counts
    return {
        "task": task.name,
        "data_version": store.data_version,
        "images": {"transfer": counts["transfer"], "test": counts["test"]},
        "replicates": replicates,
        "candidates": [_round(asdict(c)) | {"sources": list(c.sources)} for c in candidates],
        "best": [{"sources": list(c.sources), "p_best": _num(c.p_best)} for c in ties],
        "nearest": [t for t, _ in nearest],
        "nearest_rho": {t: round(r, 3) for t, r in nearest},
        "roots": roots,
        "from_roots": {"sources": list(from_roots.sources), "affinity": _num(from_roots.affinity)}
        if from_roots
        else None,
        "one_more_root": [
            {"task": t, "sources": list(c.sources) if c else None, "adds": _num(gain)} for t, c, gain in more
        ],
        **model,
        "chosen": {  # chosen on validation images; these figures are the test images'
            "sources": list(chosen.sources),
            "affinity": _num(chosen.affinity),
            "gain": _num(chosen.gain),
            "quality": _num(chosen.quality),
            "vs_random": _num(chosen.vs_random),
        },
    }


def validation_losses(summary: Location, target: str) -> dict[tuple[str, ...], float]:
    """Each transfer into `target`: its validation loss, the mean over its replicates (Stage II's
    summary: one row per readout replicate)."""
    by: dict[tuple[str, ...], list[float]] = {}
    for row in summary.read_parquet().to_pylist():
        if row["kind"] == ReadoutKind.TRANSFER.value and row["target"] == target:
            by.setdefault(tuple(row["sources"]), []).append(row["val_loss"])
    return {sources: float(np.mean(v)) for sources, v in by.items()}


def _num(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), 4)


def _round(row: dict) -> dict:
    return {k: _num(v) if isinstance(v, float) else v for k, v in row.items()}


def answer_markdown(answer: dict) -> str:
    """The MLflow description of a position run: the answer in a few lines."""
    lines = [f"## Where {answer['task']} sits", ""]
    lines.append(
        f"From {answer['images']['transfer']} labelled transfer images and {answer['images']['test']} test "
        f"images, {answer['replicates']} replicate(s) of every readout."
    )
    lines += ["", "| sources | affinity | 95% interval | gain vs scratch | p_best |", "|---|---|---|---|---|"]
    for c in answer["candidates"][:12]:
        lines.append(
            f"| {'+'.join(c['sources'])} | {_fmt(c['affinity'])} | {_fmt(c['affinity_lo'])}-"
            f"{_fmt(c['affinity_hi'])} | {_fmt(c['gain'])} | {_fmt(c['p_best'])} |"
        )
    lines += ["", f"Nearest study tasks: {', '.join(answer['nearest'][:3]) or 'none'}."]
    lines.append(
        f"Model: `{answer['model']}` v{answer['model_version']}, from {' + '.join(answer['model_sources'])}."
    )
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"
