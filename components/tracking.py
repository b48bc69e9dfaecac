"""The one place that talks to MLflow: a thin tracker with explicit run and experiment ids.

Why explicit ids everywhere: `mlflow.set_experiment()` leaks `MLFLOW_EXPERIMENT_ID` into the
environment and fluent runs are process-global, which breaks as soon as Ray workers or threads
log. The driver creates the store, the experiment and every run; workers get a `RunLogger`
(tracking URI + run id) and only append metrics to that run, so a restarted worker keeps
logging to the same run instead of making a second one.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

_MAX_BATCH = 900  # MLflow caps log_batch at 1000 metrics


def default_tracking_uri(storage_root: str | Path) -> str:
    """SQLite under the storage root, as an absolute URI (relative ones resolve per process)."""
    return f"sqlite:///{Path(storage_root).resolve() / 'mlflow.db'}"


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in data.items():
        if isinstance(v, Mapping):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


@dataclass(frozen=True)
class RunLogger:
    """Picklable handle that appends metrics to one existing run (what a rank-0 worker gets)."""

    tracking_uri: str
    run_id: str

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        MlflowClient(self.tracking_uri).log_batch(self.run_id, metrics=batch, synchronous=True)


class Tracker:
    """Driver-side access to one experiment of one tracking store."""

    def __init__(self, tracking_uri: str, experiment_name: str, artifact_location: str | None = None):
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is None:
            self.experiment_id = self.client.create_experiment(
                experiment_name, artifact_location=artifact_location
            )
        else:
            self.experiment_id = experiment.experiment_id

    def start_run(
        self, name: str, parent_run_id: str | None = None, tags: Mapping[str, str] | None = None
    ) -> str:
        all_tags = {MLFLOW_RUN_NAME: name, **(tags or {})}
        if parent_run_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return run.info.run_id

    def find_run(self, name: str, parent_run_id: str | None = None) -> str | None:
        """The newest run of that name (under that parent): reused instead of duplicated on rerun."""
        query = f"tags.`{MLFLOW_RUN_NAME}` = '{name}'"
        if parent_run_id:
            query += f" and tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'"
        runs = self.client.search_runs(
            [self.experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1
        )
        return runs[0].info.run_id if runs else None

    def logger(self, run_id: str) -> RunLogger:
        return RunLogger(self.tracking_uri, run_id)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(k, v[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        self.log_history(run_id, [(k, float(v), step) for k, v in metrics.items()])

    def log_history(
        self, run_id: str, rows: list[tuple[str, float, int]], params: Mapping[str, str] | None = None
    ) -> None:
        """Many (key, value, step) metrics, and a few params, in as few requests as MLflow allows."""
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, s) for k, v, s in rows]
        first_params = [Param(k, str(v)) for k, v in (params or {}).items()]
        for i in range(0, max(len(metrics), 1), _MAX_BATCH):
            self.client.log_batch(run_id, metrics=metrics[i : i + _MAX_BATCH], params=first_params)
            first_params = []

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_dict(self, run_id: str, data: Any, filename: str) -> None:
        self.client.log_dict(run_id, data, filename)

    def end_run(self, run_id: str, failed: bool = False) -> None:
        status = RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED)
        self.client.set_terminated(run_id, status)

    def log_torch_model(
        self, run_id: str, model: Any, registered_name: str, input_example: Any = None
    ) -> str:
        """Log a PyTorch model to the run and register a new version; returns the version."""
        mlflow.set_tracking_uri(self.tracking_uri)
        with mlflow.start_run(run_id=run_id, experiment_id=self.experiment_id, nested=True):
            # pickle: loads back as the same nn.Module (encoder/representation/decoder intact).
            info = mlflow.pytorch.log_model(
                model, name="model", input_example=input_example, serialization_format="pickle"
            )
        version = mlflow.register_model(info.model_uri, registered_name)
        return str(version.version)

    def alias_version(self, registered_name: str, alias: str) -> str | None:
        """The version an alias points at, or None (no such model or alias yet)."""
        try:
            return str(self.client.get_model_version_by_alias(registered_name, alias).version)
        except mlflow.exceptions.MlflowException:
            return None

    def set_alias(self, registered_name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(registered_name, alias, version)

    def write_json_artifact(self, run_id: str, data: Any, filename: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / filename
            path.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
            self.client.log_artifact(run_id, str(path))


def load_registered_model(tracking_uri: str, registered_name: str, version: str) -> Any:
    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.pytorch.load_model(f"models:/{registered_name}/{version}", map_location="cpu")
