"""The pipeline config: component configs composed, loaded from YAML with dotted overrides.

load_pipeline_config("configs/quickstart.yaml", ["train.epochs=3", "tasks=normal,reshading"])
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from components.config import load_config
from components.data.shards import MANIFEST, ColumnSpec
from components.data.synthetic import synthetic_columns
from components.errors import ConfigError
from components.models import ModelConfig
from components.storage import Location, is_remote, location
from components.tasks import TASKS, Task, check_column, define_tasks
from pipelines.sections import (
    AnalysisConfig,
    DataConfig,
    PositionConfig,
    TaxonomyConfig,
    TrackingConfig,
    TrainConfig,
    TransferConfig,
    TuneConfig,
)

_STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class PipelineConfig:
    name: str = "taskatlas"  # the MLflow experiment; names the registered models (`<name>-<task>`)
    storage_root: str = "taskatlas-runs"
    tracking_uri: str = ""  # empty: SQLite under the storage root
    tasks: tuple[str, ...] = tuple(TASKS)
    # Tasks added or overridden in the YAML form of components/tasks.yaml (design.md section 9).
    task_definitions: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    taxonomy: TaxonomyConfig = field(default_factory=TaxonomyConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    position: PositionConfig = field(default_factory=PositionConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if not _STUDY_NAME.fullmatch(self.name):
            raise ConfigError(
                f"name: {self.name!r} is not a study name: letters, digits, '.', '_' and '-', starting "
                "with a letter or digit (it names the study's registered models and its nightly folder)"
            )
        catalog = self.catalog  # validates task_definitions
        if unknown := [t for t in self.tasks if t not in catalog]:
            raise ConfigError(f"tasks: unknown task {unknown[0]!r}; known: {', '.join(catalog)}")
        if not self.tasks:
            raise ConfigError("tasks: at least one task is needed")
        if twice := sorted({t for t in self.tasks if self.tasks.count(t) > 1}):
            raise ConfigError(f"tasks: {twice[0]!r} is listed twice")
        only = set(self.taxonomy.source_only)
        if not self.transfer.targets and all(catalog[t].source_only or t in only for t in self.tasks):
            raise ConfigError(
                f"tasks: every task ({', '.join(self.tasks)}) is source-only, so nothing is a transfer "
                "target; add a task that can be one"
            )
        columns = dataset_columns(self.data)
        if self.data.size is None:  # the dataset's own size, or the generator's default
            object.__setattr__(self, "data", replace(self.data, size=_dataset_size(self.data, columns)))
        if unknown := [t for t in self.transfer.targets if t not in catalog]:
            raise ConfigError(f"transfer.targets: unknown task {unknown[0]!r}")
        if missing := [t for t in self.transfer.targets if t not in self.tasks]:
            raise ConfigError(f"transfer.targets: {missing[0]!r} is not among the tasks {list(self.tasks)}")
        t = self.taxonomy
        if unknown := [x for x in [*t.importance, *t.cost, *t.exclude, *t.source_only] if x not in catalog]:
            raise ConfigError(f"taxonomy: unknown task {unknown[0]!r}")
        if self.train.replicates > self.transfer.replicates:
            raise ConfigError(
                f"train.replicates: {self.train.replicates} networks per task, but transfer.replicates is "
                f"{self.transfer.replicates}: readout replicate r reads network replicate r mod "
                f"{self.train.replicates}, so networks {self.transfer.replicates} and up would be trained "
                "and never read; raise transfer.replicates to at least train.replicates"
            )
        if self.transfer.race.enabled and not self.analysis.bootstrap:
            raise ConfigError(
                "transfer.race.enabled: racing decides each round from the multi-bootstrap's p_best, "
                "but analysis.bootstrap is 0; set analysis.bootstrap > 0 or turn racing off"
            )
        if (top := max(self.transfer.orders, default=1)) > self.taxonomy.max_order:
            raise ConfigError(
                f"transfer.orders: order-{top} readouts would be trained but taxonomy.max_order is "
                f"{self.taxonomy.max_order}, so the taxonomy could never use them (and they would still "
                "shift every target's AHP affinities); drop that order or raise taxonomy.max_order"
            )
        if self.data.size % self.model.downsample:
            raise ConfigError(
                f"data.size {self.data.size} must be divisible by model.downsample {self.model.downsample}"
            )
        self._check_dataset(columns)
        _ = self.root  # opened (and checked) once, here

    @cached_property
    def catalog(self) -> dict[str, Task]:
        """Every task this config can name: the built-in catalog with `task_definitions` applied."""
        return define_tasks(self.task_definitions, TASKS, where="task_definitions.")

    def task(self, name: str) -> Task:
        return self.catalog[name]

    def study_tasks(self) -> list[Task]:
        return [self.catalog[name] for name in self.tasks]

    def _check_dataset(self, columns: dict[str, ColumnSpec] | None) -> None:
        """The dataset has `data.size` images and each studied or defined task's column, of a
        dtype and shape the definition can learn, when it can be read here (a `submit`ted config
        may name a path that exists only on the cluster)."""
        if columns is None:
            return
        if not self.data.path:  # generated scenes, made at the size now resolved
            columns = {c.name: c for c in synthetic_columns(self.data.size)}
        check_image_size(self.data, {name: c.shape for name, c in columns.items()})
        for name in [*self.task_definitions, *self.tasks]:
            task = self.catalog[name]
            where = f"task_definitions.{name}" if name in self.task_definitions else f"tasks: {name}"
            if task.column not in columns:
                raise ConfigError(
                    f"{where}.column: the dataset has no column {task.column!r} "
                    f"(it has {', '.join(sorted(columns))})"
                )
            spec = columns[task.column]
            check_column(task, spec.dtype, spec.shape, where)

    @cached_property
    def root(self) -> Location:
        """The storage root: a local folder or an object-store URI (`s3://bucket/prefix`), opened
        once, when the config loads (a bad URI is refused there, naming `storage_root`)."""
        return location(self.storage_root)


def dataset_columns(data: DataConfig) -> dict[str, ColumnSpec] | None:
    """Column name -> its dtype and per-image shape, of the configured dataset (generated scenes:
    at `data.size`, or 64); None when its manifest is not readable here."""
    if not data.path:
        return {c.name: c for c in synthetic_columns(data.size or DEFAULT_SIZE)}
    if is_remote(data.path):  # checked when the run opens the dataset
        return None
    try:
        manifest = json.loads((Path(data.path) / MANIFEST).read_text())
        return {c["name"]: ColumnSpec(c["name"], c["dtype"], tuple(c["shape"])) for c in manifest["columns"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


DEFAULT_SIZE = 64  # generated scenes' side when data.size is unset


def _dataset_size(data: DataConfig, columns: dict[str, ColumnSpec] | None) -> int:
    """`data.size` left unset: the images' side at data.path, or the generator's default."""
    if not data.path:
        return DEFAULT_SIZE
    if columns is None or "rgb" not in columns:
        raise ConfigError(f"data.size: needed, as the dataset at data.path {data.path} cannot be read here")
    return columns["rgb"].shape[-1]


def check_image_size(data: DataConfig, columns: dict[str, tuple[int, ...]]) -> None:
    """Networks are built for `data.size`: an imported dataset of another size is refused."""
    side = columns.get("rgb", (0, data.size))[-1]
    if side != data.size:
        raise ConfigError(
            f"data.size: {data.size}, but the images at data.path {data.path} are {side}x{side}; "
            f"set data.size: {side}"
        )


def load_pipeline_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> PipelineConfig:
    return load_config(PipelineConfig, path, overrides)
