"""What a run is, for every room that logs: its final status, its dataset, a run to start (made by the
worker that does its work) and a finished run logged in one call."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from mlflow.entities import (
    Dataset,
    DatasetInput,
    InputTag,
    Metric,
    Param,
)
from mlflow.utils.mlflow_tags import (
    MLFLOW_DATASET_CONTEXT,
)

from components.storage import location

STORAGE_ROOT_TAG = "taskatlas.storage_root"  # on every run: which study a run belongs to


QUEUE_SECONDS = "queue_seconds"  # on a network's run: from queued by the driver to its first batch


NOTE = "mlflow.note.content"  # the markdown description MLflow's UI shows for a run or experiment


class FinalStatus(str, Enum):
    """How a run whose work is over ended (MLflow's run status names)."""

    FINISHED = "FINISHED"
    FAILED = "FAILED"
    KILLED = "KILLED"


@dataclass(frozen=True)
class DatasetRef:
    """A versioned dataset as a run's input in MLflow: its name, version digest and location."""

    name: str
    digest: str
    source: str

    def input(self, context: str) -> DatasetInput:
        """The input of a run that read the dataset's `context` split (train, transfer, test)."""
        dataset = Dataset(self.name, self.digest, "local", json.dumps({"uri": self.source}))
        return DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)])


@dataclass(frozen=True)
class RunToStart:
    """A run made where and when its work begins (`RunLogger.start`): what `Tracker.start_run`
    would make, with its params and dataset. `id_file` (a `components.storage` URI, JSON) keeps
    the made run's id: a restarted worker logs to the run its first attempt made, and the driver
    finds it there."""

    experiment_id: str
    name: str
    tags: dict[str, str]  # its name, parent, source and study tags included
    params: dict[str, str]  # flattened
    id_file: str
    dataset: DatasetRef | None = None
    dataset_context: str = "training"
    queued_at: float = 0.0  # epoch seconds: when its work was queued (`QUEUE_SECONDS`); 0: not said

    def create(self, client: Any, start_time: float) -> str:
        """Make the run, starting at `start_time` (epoch seconds), and keep its id in `id_file`
        at once; then its params, its time in the queue and its dataset. Its id."""
        start_ms = int(start_time * 1000)
        run_id = client.create_run(
            self.experiment_id, start_time=start_ms, tags=self.tags, run_name=self.name
        ).info.run_id
        location(self.id_file).write_json({"run_id": run_id})
        params = [Param(k, v) for k, v in self.params.items()]
        waited = max(start_time - self.queued_at, 0.0)
        metrics = [Metric(QUEUE_SECONDS, waited, start_ms, 0)] if self.queued_at else []
        for i in range(0, max(len(params), 1), 100):
            client.log_batch(run_id, metrics=metrics if i == 0 else [], params=params[i : i + 100])
        if self.dataset is not None:
            client.log_inputs(run_id, [self.dataset.input(self.dataset_context)])
        return run_id


@dataclass(frozen=True)
class FinishedRun:
    """A run whose work is over, logged whole by `Tracker.log_finished_runs`.

    `run_id` names a run an earlier driver created and left unfinished (RUNNING, KILLED, FAILED):
    that run is completed (tags, params, metrics, status, end time) instead of a new one created;
    its start time stays. Times are epoch seconds; 0 means now."""

    name: str
    tags: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    metrics: Sequence[tuple[str, float, int]] = ()  # (key, value, step) rows
    start_time: float = 0.0
    end_time: float = 0.0
    status: FinalStatus = FinalStatus.FINISHED
    run_id: str | None = None
    inputs: Sequence[DatasetInput] = ()  # the datasets it read (one more request)
    parent_run_id: str | None = None  # its own parent, where runs of one batch have different ones


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in data.items():
        if isinstance(v, Mapping):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out
