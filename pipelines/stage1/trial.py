"""Ray Tune's side of Stage I's search: the trial every task's search runs, and the scheduler that
lets every task's search share one Tuner.

One Tuner for all tasks, not one per task, because a Tune trial's actor is a fresh process that
imports torch and Ray (seconds on a small machine) and actors are reused only within a Tuner:
with one Tuner the trials of every task run on the same few actors (`reuse_actors`), and Tune's
start-up is paid once. `PerTaskASHA` keeps the search per task all the same: trials of different
tasks have losses on different scales, so each task's trials race only each other.
"""

from __future__ import annotations

import torch
from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

from components.config import from_dict
from components.data.shards import ShardStore
from components.models import ModelConfig, build_network
from components.tasks import Task
from components.training import (
    OptimConfig,
    evaluate,
    holdout_split,
    iter_batches,
    make_optimizer,
    pick_device,
    train_one_epoch,
)

TASK_KEY = "task_name"  # the trial config's entry naming the task it searches for


def tune_trial(config: dict, jobs: dict) -> None:
    """One trial: the plain loop in-process on its own resources (not a nested TorchTrainer).
    `jobs[task name]` holds the task (as a dict) and its input channels."""
    job = jobs[config[TASK_KEY]]
    task = from_dict(Task, job["task"])
    torch.manual_seed(config["seed"])
    store = ShardStore(config["data_root"])
    data = store.read("train", task.columns)
    fit, val = holdout_split(data, config["holdout_fraction"], config["seed"])
    if config["max_train_images"]:
        fit = {k: v[: config["max_train_images"]] for k, v in fit.items()}
    device = pick_device(config["use_gpu"])
    model = build_network(
        task, from_dict(ModelConfig, config["model"]), config["image_size"], job["channels"]
    )
    model = model.to(device)
    optimizer = make_optimizer(model, OptimConfig(config["lr"], config["weight_decay"], config["batch_size"]))
    generator = torch.Generator(device=device).manual_seed(config["seed"])
    for epoch in range(config["max_epochs"]):
        batches = iter_batches(fit, config["batch_size"], shuffle=True, seed=config["seed"] + epoch)
        train_loss = train_one_epoch(model, optimizer, batches, task, device, generator)
        val_loss = evaluate(model, iter_batches(val, 256), task, device)
        tune.report({"val_loss": val_loss, "train_loss": train_loss, "epoch": epoch + 1})


class PerTaskASHA(FIFOScheduler):
    """ASHA (Tune's `AsyncHyperBandScheduler`) run separately for each task's trials; trials start
    in submission order, as under ASHA."""

    def __init__(self, time_attr: str, max_t: int, grace_period: int, reduction_factor: int):
        super().__init__()
        self._asha_args = {
            "time_attr": time_attr,
            "max_t": max_t,
            "grace_period": grace_period,
            "reduction_factor": reduction_factor,
        }
        self._mode: str | None = None
        self._by_task: dict[str, AsyncHyperBandScheduler] = {}

    def set_search_properties(self, metric, mode, **spec) -> bool:
        if (self._metric and metric) or (self._mode and mode):
            return False
        self._metric, self._mode = metric or self._metric, mode or self._mode
        return True

    def _asha(self, trial) -> AsyncHyperBandScheduler:
        name = trial.config[TASK_KEY]
        if name not in self._by_task:
            self._by_task[name] = AsyncHyperBandScheduler(
                metric=self._metric, mode=self._mode, **self._asha_args
            )
        return self._by_task[name]

    def on_trial_add(self, tune_controller, trial) -> None:
        self._asha(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return self._asha(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._asha(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._asha(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"{name}: {asha.debug_string()}" for name, asha in sorted(self._by_task.items()))
