"""What a positioning keeps in MLflow: the study encoders it builds on, found in the registry, and its
model registered weights-only as `<study>-<task>-transfer`, the champion."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from mlflow.entities import Metric

from components.data.shards import ShardStore
from components.errors import TaskatlasError
from components.tasks import Task, channels_for
from components.transfer.model import EncoderRef, TransferSpec
from pipelines.config import PipelineConfig
from pipelines.results import TaskResult
from pipelines.tracking.models import CHAMPION, Registration
from pipelines.tracking.registry import KEY_TAG, network_model, positioned_model, version_tags
from pipelines.tracking.runs import Tracker


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


def register_model(
    cfg: PipelineConfig,
    task: Task,
    store: ShardStore,
    sources: tuple[str, ...],
    encoders: dict[str, EncoderRef],
    weights: Mapping[str, Any],
    in_channels: int,
    test_loss: float,
    key: str,
    tracker: Tracker,
    run_id: str,
) -> tuple[str, str]:
    """The positioned model (a readout on the frozen `encoders` of `sources`) registered
    weights-only as a new version of `<study>-<task>-transfer`, made the champion; its name and
    version. `key`: the step that made it, on the version, so a rerun finds it."""
    spec = TransferSpec(
        task=task,
        model=cfg.model,
        image_size=cfg.data.size,
        channels=channels_for(task, store),
        width=cfg.transfer.width,
        in_channels=in_channels,
        encoders=tuple(encoders[s] for s in sources),
    )
    name = positioned_model(cfg.name, task.name)
    model_id = tracker.models.create_logged_model(run_id, name)
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
            KEY_TAG: key,
            "sources": "+".join(sources),
            "encoders": ",".join(f"{e.registered}/{e.version}" for e in spec.encoders),
            "data_version": store.data_version,
            "mean_test_loss": f"{test_loss:.6g}",
        },
        version_description=(
            f"{task.name} from the frozen encoders of {' + '.join(sources)} (registered versions "
            f"{', '.join(f'{e.registered} v{e.version}' for e in spec.encoders)}) and a readout trained on "
            f"{store.manifest.counts['transfer']} labelled images; mean test loss {test_loss:.4g}. "
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
    return name, version
