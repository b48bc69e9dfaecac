"""Registered task networks are weights only: state dict + architecture, loaded with
`torch.load(weights_only=True)`; a pickle planted in the registry is refused, never run."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.entities import Metric

from components.config import to_dict
from components.models import ModelConfig
from components.tasks import get_task
from pipelines.hparams import HParams
from pipelines.nightly import promote
from pipelines.results import TaskResult
from pipelines.tracking.models import (
    ARCHITECTURE_FILE,
    WEIGHTS_FILE,
    NetworkSpec,
    Registration,
    UnsafeModelError,
    load_registered_model,
)
from pipelines.tracking.runs import Tracker

SPEC = NetworkSpec(get_task("normal"), ModelConfig(width=8, downsample=4), 16, 3)


class _RunsCode:
    """Unpickling this runs a shell command: what a registry writer could plant."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def tracker(tmp_path):
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "weights", (tmp_path / "art").as_uri())


def _register(tracker, run: str, state_dict) -> str:
    """What Stage I does: the run's logged model, then the weights stored and registered."""
    model_id = tracker.models.create_logged_model(run, "normal")
    registration = Registration("taskatlas-normal", "m", "d", version_tags={"task": "normal"})
    return tracker.models.log_task_network(
        run, model_id, state_dict, SPEC, registration, [Metric("final_test_loss", 0.5, 0, 0)]
    )


def _plant(tracker, tmp_path, name, files: dict) -> str:
    """A model version whose files are exactly `files` (name -> bytes or object to torch.save)."""
    run = tracker.start_run("planted")
    folder = tmp_path / f"planted-{run}" / "model"
    folder.mkdir(parents=True)
    for filename, content in files.items():
        if isinstance(content, bytes):
            (folder / filename).write_bytes(content)
        else:
            torch.save(content, folder / filename)
    tracker.client.log_artifacts(run, str(folder), "model")
    return str(tracker.client.create_model_version(name, f"runs:/{run}/model", run).version)


def test_a_registered_network_is_a_state_dict_and_its_architecture_and_loads_back(tracker, tmp_path):
    net = SPEC.build().eval()
    run = tracker.start_run("train/normal")
    version = _register(tracker, run, net.state_dict())
    stored = Path(
        tracker.client.get_model_version_download_uri("taskatlas-normal", version).removeprefix("file://")
    )
    assert {f.name for f in stored.iterdir()} == {WEIGHTS_FILE, ARCHITECTURE_FILE}
    architecture = json.loads((stored / ARCHITECTURE_FILE).read_text())
    assert architecture["task"]["name"] == "normal" and architecture["image_size"] == 16
    loaded = load_registered_model(tracker.tracking_uri, "taskatlas-normal", version)
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(loaded(x), net(x))


def test_a_pickle_planted_in_the_registry_is_refused_and_never_runs(tracker, tmp_path):
    marker = tmp_path / "code-ran"
    _register(tracker, tracker.start_run("train/normal"), SPEC.build().state_dict())
    architecture = json.dumps({"format": "taskatlas-weights-v1", **to_dict(SPEC.__dict__)}).encode()
    evil_weights = _plant(
        tracker,
        tmp_path,
        "taskatlas-normal",
        {WEIGHTS_FILE: {"encoder.0.weight": _RunsCode(marker)}, ARCHITECTURE_FILE: architecture},
    )
    with pytest.raises(UnsafeModelError, match=f"v{evil_weights}: {WEIGHTS_FILE} is not a plain state dict"):
        load_registered_model(tracker.tracking_uri, "taskatlas-normal", evil_weights)
    # A whole pickled module, as `mlflow.pytorch.log_model(serialization_format="pickle")` writes.
    pickled_module = _plant(
        tracker, tmp_path, "taskatlas-normal", {"model.pth": _RunsCode(marker), "MLmodel": b"flavors: {}\n"}
    )
    with pytest.raises(UnsafeModelError, match=f"no readable {ARCHITECTURE_FILE}"):
        load_registered_model(tracker.tracking_uri, "taskatlas-normal", pickled_module)
    assert not marker.exists()

    # Nightly's promotion: the planted champion is refused (not unpickled) and replaced.
    tracker.models.set_alias("taskatlas-normal", "champion", evil_weights)
    run = tracker.start_run("train/normal")
    new = _register(tracker, run, SPEC.build().state_dict())
    result = TaskResult("normal", "k", "unused", 0.5, HParams(1e-3, 1e-4, 32), run, new)
    test = {
        "image_id": np.arange(2),
        "rgb": np.zeros((2, 16, 16, 3), np.uint8),
        "normal": np.zeros((2, 16, 16, 3), np.float32),
    }
    [promotion] = promote(tracker, "taskatlas", {"normal": result}, ["normal"], test, {"normal": SPEC.task})
    assert promotion.promoted and promotion.champion_version == evil_weights
    assert "not a plain state dict" in promotion.refused
    assert tracker.models.alias_version("taskatlas-normal", "champion") == new
    assert not marker.exists()
