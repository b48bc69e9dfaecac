"""Stage I's registrations, checked when a run reuses a finished network.

A network's step marker says it was registered, but the registry lives in the tracking store,
which can be replaced under the study: a damaged `mlflow.db` moved aside, as its refusal advises
(`pipelines.tracking.store.sqlite_store_refusal`), or another `tracking_uri`. A rerun then reused every
output and reported success with no registered model, so `predict --model <study>-<task>` failed
and `position` registered models whose encoders were not in the registry. Here a reused network
is looked up in the current store (a version of `<study>-<task>` tagged with its step key,
`config_hash`, as `NetworkRecord.registration` tags every version); one that is not there is
registered again from its stored weights (`model.pt`), in a run `train/<task>` of its own, and
its marker records the new version.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace

import torch
from mlflow.entities import Metric

from components.models import build_network
from components.tasks import Task, channels_for
from components.transfer.features import load_state_dict
from pipelines.results import TaskResult
from pipelines.stage1.record import NetworkRecord
from pipelines.steps import Fence, Step
from pipelines.tracking.models import CHAMPION, NetworkSpec, tensor_signature
from pipelines.tracking.registry import KEY_TAG, network_model

RESTORED_TAG = "registered_again"  # on the run that registered a network again from its weights


def registered_network(record: NetworkRecord, task: Task, result: TaskResult, step: Step) -> TaskResult:
    """`result` (replicate 0, read from `step`'s marker) with a registered version that is in the
    current tracking store: its own, the one found by its step key, or (none there) a new one
    registered from its stored weights. Another study's network whose version is still there is
    left to `NetworkRecord.adopt`."""
    tracker = record.tracker
    ours = network_model(record.config.name, task.name)
    mine = result.registered in ("", ours)
    if (found := tracker.models.find_version(ours, {KEY_TAG: result.key})) is not None:
        if not mine or found == result.model_version:
            return result  # in the store (another study's: `adopt` links it to ours)
        return _recorded(step, replace(result, model_version=found, registered=ours), record.fence)
    if not mine and tracker.models.find_version(result.registered, {KEY_TAG: result.key}) is not None:
        return result  # `adopt` registers it under ours from that study's logged model
    restored = _register_again(record, task, result)
    lost = f"{result.registered or ours} v{result.model_version}"
    print(
        f"taskatlas: network {task.name} ({lost}) is not in the registry at {tracker.tracking_uri}; "
        f"registered again from {result.model_path} as {ours} v{restored.model_version}",
        file=sys.stderr,
        flush=True,
    )
    return _recorded(step, restored, record.fence)


def _register_again(record: NetworkRecord, task: Task, result: TaskResult) -> TaskResult:
    """The stored weights as a new version of the study's `<study>-<task>`, described as
    `NetworkRecord.finish` describes one (its test loss from the marker), in a run of its own;
    champion if the first of its definition there."""
    cfg, tracker = record.config, record.tracker
    channels = channels_for(task, record.store)
    model = build_network(task, cfg.model, cfg.data.size, channels)
    model.load_state_dict(load_state_dict(result.model_path))  # onto the CPU, weights only
    run_id = tracker.start_run(
        f"train/{task.name}",
        record.parent_run_id,
        {"task": task.name, "stage": "train", RESTORED_TAG: "true"},
    )
    model_id = tracker.models.create_logged_model(run_id, task.name, record.trained_with(result.hparams))
    now, last = int(time.time() * 1000), cfg.train.epochs - 1
    registration = record.registration(task, result.test_loss, result.key)
    example = torch.rand(1, 3, cfg.data.size, cfg.data.size)  # RGB in [0, 1]
    version = tracker.models.log_task_network(
        run_id,
        model_id,
        model.state_dict(),
        NetworkSpec(task, cfg.model, cfg.data.size, channels),
        registration,
        [Metric("final_test_loss", result.test_loss, now, last)],
        signature=tensor_signature(model, example),
    )
    if record.first_of_its_definition(registration.name, task):
        tracker.models.set_alias(registration.name, CHAMPION, version)
    tracker.end_run(run_id)
    return replace(result, run_id=run_id, model_version=version, registered=registration.name)


def _recorded(step: Step, result: TaskResult, fence: Fence) -> TaskResult:
    """The network's marker rewritten with its version in the current store (its files as they
    were: checked when the marker was read)."""
    step.finish(result.marker(), fence=fence)
    return result
