"""What a positioning reads, each checked before any work: the new task definition, the finished
study it is placed in, and the folder of images labelled for it, imported as a dataset of its own."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from components.answer import StudyAnswer
from components.config import config_hash
from components.data.folder import RGB, FolderColumn, import_folder, load_spec, recorded_spec, scan_folder
from components.data.importing import ImportConfig, split_of
from components.data.raw_files import ARRAY_SUFFIX, NPY_LAYOUTS, read_raw
from components.data.shards import MANIFEST, ShardStore
from components.errors import ConfigError, TaskatlasError
from components.tasks import Loss, Task, TaskKind, task_from_definition
from pipelines.analysis.plan import affinity_step, taxonomy_step
from pipelines.config import PipelineConfig
from pipelines.invocation import dataset_folder
from pipelines.results import TaskResult
from pipelines.stage1.plan import Stage1Plan
from pipelines.stage2.plan import Stage2Plan
from pipelines.stage2.record import LOSSES
from pipelines.steps import Step


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
    taxonomy: StudyAnswer


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
    answer = (taxonomy.location / "taxonomy.json").read_json()
    return Study(cfg, store, networks, affinity, StudyAnswer.from_json(answer, str(taxonomy.location)))


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
