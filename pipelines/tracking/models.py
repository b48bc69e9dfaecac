"""Models in MLflow: task networks stored as weights only (state dict + the architecture that
rebuilds them with the project's own code, never a pickle), registered, and loaded back."""

from __future__ import annotations

import contextlib
import json
import pickle
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import mlflow.artifacts
import torch
from mlflow.entities import (
    LoggedModelOutput,
    Metric,
)
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import Schema, TensorSpec
from mlflow.utils.mlflow_tags import (
    MLFLOW_MODEL_VERSIONS,
)

from components.config import from_dict, to_dict
from components.errors import TaskatlasError
from components.models import ModelConfig, TaskNetwork, build_network
from components.tasks import Task
from pipelines.compat import process_tracking_uri as _process_tracking_uri
from pipelines.tracking.entities import NOTE, flatten
from pipelines.tracking.store import is_server

# A registered task network is these two files, never a pickled module (design.md section 8).
WEIGHTS_FILE = "weights.pt"  # the state dict, read back with torch.load(weights_only=True)


ARCHITECTURE_FILE = "architecture.json"  # what rebuilds the network with the project's own code


_WEIGHTS_FORMAT = "taskatlas-weights-v1"


CHAMPION = "champion"  # the registry alias of a task's best model (nightly moves it for networks)


class UnsafeModelError(TaskatlasError):
    """A registry payload that is not a plain state dict plus architecture: refused, not loaded."""


@dataclass(frozen=True)
class NetworkSpec:
    """Everything that rebuilds a task network except its weights."""

    task: Task
    model: ModelConfig
    image_size: int
    channels: int

    def build(self) -> TaskNetwork:
        return build_network(self.task, self.model, self.image_size, self.channels)


@dataclass(frozen=True)
class Registration:
    """Where a logged model is registered and what the registry says: the registered model's
    description and tags (what every version is), and this version's."""

    name: str
    description: str
    version_description: str
    tags: Mapping[str, str] = field(default_factory=dict)
    version_tags: Mapping[str, str] = field(default_factory=dict)


def tensor_signature(model: torch.nn.Module, example: torch.Tensor) -> ModelSignature:
    """The input and output tensors of `model` (a batch dimension of any size), from one example."""
    with torch.no_grad():
        out = model.eval()(example)

    def batch_of(t: torch.Tensor) -> Schema:  # (-1, C, H, W): any batch size
        return Schema([TensorSpec(t.numpy().dtype, (-1, *t.shape[1:]))])

    return ModelSignature(inputs=batch_of(example), outputs=batch_of(out))


class ModelRegistry:
    """The tracking store's model registry: task networks and positioned models stored as weights
    only, their versions, tags and aliases. The tracker's `models`."""

    def __init__(self, client: Any, tracking_uri: str, experiment_id: str):
        self.client, self.tracking_uri, self.experiment_id = client, tracking_uri, experiment_id

    def create_logged_model(self, run_id: str, name: str, params: Mapping[str, Any] | None = None) -> str:
        """The MLflow logged model a training run produces, made before training starts, with the
        hyperparameters it is trained with. It gets its metrics (the final epoch's) and its files
        when it is registered (`register_weights`)."""
        flat = {k: v[:6000] for k, v in flatten(params or {}).items()}
        model = self.client.create_logged_model(
            self.experiment_id, name=name, source_run_id=run_id, params=flat or None
        )
        return model.model_id

    def last_metrics(self, run_id: str, keys: Sequence[str]) -> list[Metric]:
        """The newest record of each of `keys` at its highest step (what the run's page shows),
        exactly as logged: logged again with a model id it adds no row to the run's history."""
        out = []
        for key in keys:
            history = self.client.get_metric_history(run_id, key)
            if history:
                out.append(max(history, key=lambda m: (m.step, m.timestamp)))
        return out

    def log_task_network(
        self,
        run_id: str,
        model_id: str,
        state_dict: Mapping[str, Any],
        spec: NetworkSpec,
        registration: Registration,
        metrics: Sequence[Metric],
        signature: ModelSignature | None = None,
    ) -> str:
        """Store a task network as weights only (its state dict and the architecture that
        rebuilds it) in its logged model `model_id`, with its final `metrics`, and register a
        new version of it; returns the version."""
        architecture = {"format": _WEIGHTS_FORMAT, **to_dict(spec.__dict__)}
        return self.register_weights(
            run_id, model_id, state_dict, architecture, registration, metrics, signature
        )

    def register_weights(
        self,
        run_id: str,
        model_id: str,
        state_dict: Mapping[str, Any],
        architecture: Mapping[str, Any],
        registration: Registration,
        metrics: Sequence[Metric] = (),
        signature: ModelSignature | None = None,
    ) -> str:
        """Any model as weights only: `state_dict` and `architecture` (JSON, with its `format`)
        in the logged model `model_id`, which gets `metrics` (one value per key: its final ones),
        becomes an output of its run, and is registered as a new version (from `models:/<id>`, so
        the logged model, the run and the version link to each other in the UI). `signature`:
        the input and output tensors, in an `MLmodel` file beside the weights."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "model"
            folder.mkdir()
            torch.save(dict(state_dict), folder / WEIGHTS_FILE)
            (folder / ARCHITECTURE_FILE).write_text(json.dumps(dict(architecture), indent=1, sort_keys=True))
            if signature is not None:
                Model(run_id=run_id, model_id=model_id, signature=signature).save(folder / "MLmodel")
            self.client.log_model_artifacts(model_id, str(folder))
        # The logged model's page shows its tags and, as its description, the version's text
        self.client.set_logged_model_tags(
            model_id, dict(registration.version_tags) | {NOTE: registration.version_description}
        )
        self._log_model_metrics(run_id, model_id, metrics)
        step = max((m.step for m in metrics), default=0)
        run = self.client.get_run(run_id)
        if model_id not in {o.model_id for o in (run.outputs.model_outputs if run.outputs else [])}:
            self.client.log_outputs(run_id, [LoggedModelOutput(model_id, step)])
        self.client.finalize_logged_model(model_id, "READY")
        return self.register_version(registration, model_id, run_id)

    def register_version(self, registration: Registration, model_id: str, run_id: str) -> str:
        """A new version of `registration.name` from the logged model `model_id` of `run_id`, so
        the logged model, the run and the version link to each other; returns the version."""
        self._describe_registered_model(registration)
        with self._models_uris_resolvable():
            version = self.client.create_model_version(
                registration.name,
                f"models:/{model_id}",
                run_id,
                tags=dict(registration.version_tags),
                description=registration.version_description,
                model_id=model_id,
            )
        self._link_version(model_id, registration.name, int(version.version))
        return str(version.version)

    def find_version(self, registered_name: str, tags: Mapping[str, str]) -> str | None:
        """The newest version of `registered_name` carrying all of `tags` whose files are this
        experiment's, or None. A version made before the storage root was copied or moved holds
        files under the old root (its logged model is the renamed old experiment's): not ours."""
        versions = self.client.search_model_versions(f"name = '{registered_name}'")
        matching = [
            int(v.version)
            for v in versions
            if all(v.tags.get(k) == t for k, t in tags.items()) and self._in_this_experiment(v)
        ]
        return str(max(matching)) if matching else None

    def made_here(self, registered_name: str, version: str) -> bool:
        """Whether a registered version's files are this experiment's (see `find_version`)."""
        return self._in_this_experiment(self.client.get_model_version(registered_name, version))

    def tags_if_made_here(self, registered_name: str, version: str) -> dict[str, str] | None:
        """A registered version's tags, or None if its files are another experiment's: one request
        for both (`is_registered`)."""
        found = self.client.get_model_version(registered_name, version)
        return dict(found.tags) if self._in_this_experiment(found) else None

    def _in_this_experiment(self, version: Any) -> bool:
        if (model_id := _model_id(version)) is None:  # registered from a path: nothing says where
            return True
        return self.client.get_logged_model(model_id).experiment_id == self.experiment_id

    def version_model_id(self, registered_name: str, version: str) -> str | None:
        """The logged model a registered version was made from (None: registered from a path)."""
        return _model_id(self.client.get_model_version(registered_name, version))

    def _log_model_metrics(self, run_id: str, model_id: str, metrics: Sequence[Metric]) -> None:
        """`metrics` on the logged model, each key once (a key it has already is left as it is).
        Logged through the run: one the run has already (same key, value, step, timestamp) is not
        recorded there twice."""
        have = {m.key for m in self.client.get_logged_model(model_id).metrics or []}
        rows = [
            Metric(
                m.key,
                float(m.value),
                m.timestamp,
                m.step,
                model_id=model_id,
                dataset_name=m.dataset_name,
                dataset_digest=m.dataset_digest,
            )
            for m in metrics
            if m.key not in have
        ]
        if rows:
            self.client.log_batch(run_id, metrics=rows, synchronous=True)

    def _describe_registered_model(self, registration: Registration) -> None:
        """The registered model, made if new, with its description and tags (every version's)."""
        name = registration.name
        try:
            self.client.create_registered_model(
                name, tags=dict(registration.tags), description=registration.description
            )
            return
        except mlflow.exceptions.MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        self.client.update_registered_model(name, registration.description)
        for key, value in registration.tags.items():
            self.client.set_registered_model_tag(name, key, value)

    def _models_uris_resolvable(self):
        """Where a `models:/<id>` source can be registered. A tracking server resolves it in its
        own store. A local store's registry resolves it with `MlflowClient()`, on the process-wide
        tracking URI: that is set to ours for the call (without touching the environment, under a
        lock, and put back after), since this tracker never uses the process-wide URI itself."""
        if is_server(self.tracking_uri):
            return contextlib.nullcontext()
        return _process_tracking_uri(self.tracking_uri)

    def _link_version(self, model_id: str, name: str, version: int) -> None:
        """The logged model's `mlflow.modelVersions` tag, what the UI reads to show it registered:
        a tracking server sets it when the version is created, a local store does not."""
        tags = self.client.get_logged_model(model_id).tags
        linked = json.loads(tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
        if any(v.get("name") == name and str(v.get("version")) == str(version) for v in linked):
            return
        linked.append({"name": name, "version": version})
        self.client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(linked)})

    def alias_version(self, registered_name: str, alias: str) -> str | None:
        """The version an alias points at, or None (no such model or alias yet)."""
        try:
            return str(self.client.get_model_version_by_alias(registered_name, alias).version)
        except mlflow.exceptions.MlflowException:
            return None

    def version_tags(self, registered_name: str, version: str) -> dict[str, str]:
        """The tags of a registered version (its task, study and definition hash, for ours)."""
        return dict(self.client.get_model_version(registered_name, version).tags)

    def set_alias(self, registered_name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(registered_name, alias, version)


def _model_id(version: Any) -> str | None:
    """A registered version's logged model (None: registered from a path). A local store keeps
    it only in the version's source, `models:/<model id>`."""
    if version.model_id:
        return version.model_id
    source = version.source or ""
    return source.removeprefix("models:/") if source.startswith("models:/m-") else None


def resolve_version(tracking_uri: str, model: str) -> tuple[str, str]:
    """`name`, `name@alias` or `name/version` -> (registered name, version); `name` alone is its
    champion. One-line errors for an unknown model, alias or version."""
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    if "/" in model:
        name, version = model.rsplit("/", 1)
        try:
            return name, str(client.get_model_version(name, version).version)
        except mlflow.exceptions.MlflowException:
            raise TaskatlasError(f"--model: {name} has no version {version!r} at {tracking_uri}") from None
    name, _, alias = model.partition("@")
    alias = alias or CHAMPION
    try:
        return name, str(client.get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        known = [m.name for m in client.search_registered_models(max_results=50)]
        raise TaskatlasError(
            f"--model: no registered model {name!r} with alias {alias!r} at {tracking_uri}"
            f" (registered: {', '.join(sorted(known)) or 'none'})"
        ) from None


def load_registered_weights(
    tracking_uri: str, registered_name: str, version: str, formats: Sequence[str] = (_WEIGHTS_FORMAT,)
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(architecture, state dict) of a registered version, loaded with `torch.load(weights_only=
    True)`; anything that is not a plain state dict plus an architecture in one of `formats` is
    refused, never unpickled."""
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    what = f"registered model {registered_name} v{version}"
    uri = client.get_model_version_download_uri(registered_name, version)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri, dst_path=tmp)
        )
        try:
            architecture = json.loads((local / ARCHITECTURE_FILE).read_text())
        except (OSError, ValueError):
            raise UnsafeModelError(
                f"{what}: no readable {ARCHITECTURE_FILE}; only weights-only models are loaded"
                " (a model registered by an older taskatlas: retrain it)"
            ) from None
        if not isinstance(architecture, dict) or architecture.get("format") not in formats:
            raise UnsafeModelError(f"{what}: {ARCHITECTURE_FILE} is not in the {' or '.join(formats)} format")
        try:
            state = torch.load(local / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise UnsafeModelError(
                f"{what}: {WEIGHTS_FILE} is not a plain state dict; refused ({first})"
            ) from None
    return architecture, state


def network_spec(architecture: Mapping[str, Any]) -> NetworkSpec:
    return NetworkSpec(
        task=from_dict(Task, architecture["task"], "task."),
        model=from_dict(ModelConfig, architecture["model"], "model."),
        image_size=int(architecture["image_size"]),
        channels=int(architecture["channels"]),
    )


def load_registered_model(tracking_uri: str, registered_name: str, version: str) -> TaskNetwork:
    """Rebuild a registered task network with the project's code and load its weights with
    `torch.load(weights_only=True)`; anything else in the registry is refused, never unpickled."""
    architecture, state = load_registered_weights(tracking_uri, registered_name, version)
    model = network_spec(architecture).build()
    model.load_state_dict(state)
    return model.eval()
