"""The Ray Train worker of Stage I: a thin shell around `components.training`.

It lives apart from `pipelines.stage1`, the driver's side, because every worker process imports
the module its function comes from: this one holds only what a worker runs.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from components.config import from_dict
from components.data.shards import ShardStore
from components.models import ModelConfig, build_network
from components.tasks import Task
from components.tracking import RunLogger
from components.training import (
    OptimConfig,
    evaluate,
    iter_batches,
    make_optimizer,
    rank_rows,
    train_one_epoch,
    unwrap,
)

CHECKPOINT_FILE = "state.pt"
# train.fail_at_epoch waits this long before killing rank 0: a few of Ray Train's report polls.
FAILURE_DRAIN_S = 6.0


@dataclass(frozen=True)
class WorkerConfig:
    """What a training worker needs; it arrives as Ray's dict and is typed again on line one."""

    task: dict  # the Task, as `components.config.to_dict` writes it
    model: dict
    image_size: int
    channels: int
    lr: float
    weight_decay: float
    batch_size: int
    epochs: int
    seed: int
    tracking_uri: str
    run_id: str
    model_id: str = ""  # the run's MLflow logged model: epoch metrics are its metrics too
    fail_at_epoch: int | None = None
    cache_in_memory: bool = True
    data_root: str = ""  # train.loader "shards": the dataset each worker reads its slice of; "": Ray Data


def train_worker(raw: dict) -> None:
    cfg = WorkerConfig(**raw)
    task = from_dict(Task, cfg.task)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    # Rank 0 records how the group is laid out, as tags: constants of a run, not curves (the
    # multi-node test reads them back from MLflow).
    layout = {"world_size": context.get_world_size(), "nodes": _distinct_ray_nodes()}
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device()
    model = build_network(task, from_dict(ModelConfig, cfg.model), cfg.image_size, cfg.channels)
    optimizer = make_optimizer(model, OptimConfig(cfg.lr, cfg.weight_decay, cfg.batch_size))
    start_epoch, restored = 0, ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"] + 1
    model = ray.train.torch.prepare_model(model)
    logger = RunLogger(cfg.tracking_uri, cfg.run_id, cfg.model_id or None) if rank == 0 else None
    # Epochs an earlier attempt logged but did not checkpoint (killed in between) run again from
    # the last checkpoint; the run keeps the first record of each epoch, never two.
    logged = logger.logged_steps("train_loss") if logger is not None else set()
    if logger is not None:
        logger.set_tags(layout)
    generator = torch.Generator(device=device).manual_seed(cfg.seed + rank)
    cached_train: dict | None = None  # see TrainConfig.loader and TrainConfig.cache_in_memory
    cached_test: list | None = None
    if cfg.data_root:
        store = ShardStore(cfg.data_root)
        start, stop = rank_rows(store.manifest.counts["train"], rank, context.get_world_size())
        cached_train = store.read_rows("train", task.columns, start, stop)
        if rank == 0:
            cached_test = list(iter_batches(store.read("test", task.columns), 256))
    else:
        train_shard, test_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("test")
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.fail_at_epoch == epoch and restored is None and rank == 0:
            # Injected failure (tests): the worker process dies mid-run. Ray's controller collects
            # reports by polling every few seconds, so wait for it to register the last checkpoint:
            # otherwise, on a loaded machine, the kill races the registration and the restart
            # resumes from an older checkpoint than the test can name.
            time.sleep(FAILURE_DRAIN_S)
            os._exit(1)
        if cached_train is not None:  # later epochs: the worker's own shard, reshuffled in memory
            batches = iter_batches(cached_train, cfg.batch_size, shuffle=True, seed=cfg.seed + epoch)
        else:
            batches = train_shard.iter_batches(
                batch_size=cfg.batch_size,
                batch_format="numpy",
                local_shuffle_buffer_size=4 * cfg.batch_size,
                local_shuffle_seed=cfg.seed + epoch,
            )
            if cfg.cache_in_memory:
                batches, seen = _tee(batches)
        metrics = {"train_loss": train_one_epoch(model, optimizer, batches, task, device, generator)}
        if cached_train is None and cfg.cache_in_memory:
            cached_train = {k: np.concatenate([b[k] for b in seen]) for k in seen[0]}
        checkpoint = None
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                if cached_test is None:
                    cached_test = list(test_shard.iter_batches(batch_size=256, batch_format="numpy"))
                metrics["test_loss"] = evaluate(unwrap(model), cached_test, task, device)
                if epoch not in logged:
                    logger.log_metrics(metrics, step=epoch)
                state = {
                    "model": unwrap(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch,
                }
                torch.save(state, Path(tmp) / CHECKPOINT_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({**metrics, "epoch": epoch}, checkpoint=checkpoint)


def _tee(batches):
    """Pass batches through while keeping them (to cache a worker's shard after one epoch)."""
    seen: list = []

    def gen():
        for batch in batches:
            seen.append(batch)
            yield batch

    return gen(), seen


def _distinct_ray_nodes() -> int:
    """How many Ray nodes the worker group spans (by node id: local test clusters share one IP)."""
    node = ray.get_runtime_context().get_node_id()
    if not torch.distributed.is_initialized():
        return 1
    nodes: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(nodes, node)
    return len(set(nodes))
