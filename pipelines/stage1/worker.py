"""The Ray Train worker of Stage I: a thin shell around `components.training`.

It lives apart from `pipelines.stage1.run`, the driver's side, because every worker process imports
the module its function comes from: this one holds only what a worker runs.

One Ray Train run may train several networks, one after another (`train.networks_per_run`): a
run's start-up (controller, workers, their imports, the process group) costs seconds of CPU, as
much as a small network's whole training, so a share of the networks pays it once.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from components.config import from_dict
from components.data.shards import ShardStore
from components.models import ModelConfig, build_network
from components.storage import location
from components.tasks import Task
from components.training import (
    OptimConfig,
    evaluate,
    iter_batches,
    make_optimizer,
    rank_rows,
    train_one_epoch,
    unwrap,
)
from pipelines.tracking.entities import RunToStart
from pipelines.tracking.logger import RunLogger
from pipelines.tracking.retry import DEFAULT_RETRY_S

CHECKPOINT_FILE = "state.pt"
# The `fail_at_epoch` seam waits this long before killing rank 0: a few of Ray Train's report polls.
FAILURE_DRAIN_S = 6.0


@dataclass(frozen=True)
class WorkerConfig:
    """One network a training worker trains; it arrives as Ray's dict and is typed again."""

    task: dict  # the Task, as `components.config.to_dict` writes it
    model: dict
    image_size: int
    channels: int
    lr: float
    weight_decay: float
    batch_size: int
    epochs: int
    seed: int  # train.seed, or network replicate n's own (`stage1.plan.network_seed`)
    tracking_uri: str
    run_id: str  # its MLflow run; "": the run `new_run` describes, which rank 0 makes at the first batch
    fail_at_epoch: int | None = None  # counted over the run's networks, one after another
    cache_in_memory: bool = True
    data_root: str = ""  # train.loader "shards": the dataset each worker reads its slice of; "": Ray Data
    # `tracking.retry_s`: how long rank 0's logging waits for a silent server, then goes without
    tracking_retry_s: float = DEFAULT_RETRY_S
    weights: str = ""  # where rank 0 writes the final weights (the driver scores and registers them)
    new_run: dict | None = None  # `RunToStart`, as `components.config.to_dict` writes it

    @property
    def network(self) -> str:
        """What names the network in the run's checkpoints: the same on every attempt and rerun."""
        return self.weights or self.run_id


def loop_config(networks: list[WorkerConfig]) -> dict:
    """`TorchTrainer`'s `train_loop_config` for `train_worker`: the networks to train, in order."""
    return {"networks": [asdict(n) for n in networks]}


def train_worker(raw: dict) -> None:
    """Train each network of `raw` (from `loop_config`) in turn. After a restart, the run's checkpoint
    names the network it belongs to: the ones listed before it are done (their weights were
    written before it began), it resumes after its last checkpointed epoch."""
    networks = [WorkerConfig(**n) for n in raw["networks"]]
    first = [sum(n.epochs for n in networks[:i]) for i in range(len(networks))]  # run-wide epochs
    done, state = 0, None
    if (restored := ray.train.get_checkpoint()) is not None:
        with restored.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, weights_only=True)
        # by its weights; by its run id in checkpoints made before networks made their own runs
        done = next(i for i, n in enumerate(networks) if state["network"] in (n.network, n.run_id))
    data = _WorkerData(networks[done:])
    for i in range(done, len(networks)):
        resume = state if i == done else None
        _train_network(networks[i], resume, data, first[i], first_attempt=restored is None)


class _WorkerData:
    """The batches every network of the run trains and is tested on, loaded once per worker:
    each network reads the columns it needs from the same arrays."""

    def __init__(self, networks: list[WorkerConfig]):
        self.columns = sorted({c for n in networks for c in from_dict(Task, n.task).columns})
        self.data_root = networks[0].data_root
        self.cache_in_memory = networks[0].cache_in_memory
        self._train: dict | None = None
        self._test: list | None = None

    def train_batches(self, batch_size: int, seed: int):
        """One epoch's shuffled batches of this worker's share of the train split."""
        if self._train is None and self.data_root:
            context = ray.train.get_context()
            store = ShardStore(self.data_root)
            rank, world = context.get_world_rank(), context.get_world_size()
            start, stop = rank_rows(store.manifest.counts["train"], rank, world)
            self._train = store.read_rows("train", self.columns, start, stop)
        if self._train is not None:  # the worker's own share, reshuffled in memory
            return iter_batches(self._train, batch_size, shuffle=True, seed=seed)
        batches = ray.train.get_dataset_shard("train").iter_batches(
            batch_size=batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=4 * batch_size,
            local_shuffle_seed=seed,
        )
        return self._caching(batches) if self.cache_in_memory else batches

    def test_batches(self) -> list:
        if self._test is None:
            if self.data_root:
                self._test = list(iter_batches(ShardStore(self.data_root).read("test", self.columns), 256))
            else:
                self._test = list(
                    ray.train.get_dataset_shard("test").iter_batches(batch_size=256, batch_format="numpy")
                )
        return self._test

    def _caching(self, batches):
        """Pass Ray Data's batches through, keeping them: after the first epoch the worker's shard
        is in memory and later epochs (and networks) reshuffle it there."""
        seen: list = []
        for batch in batches:
            seen.append(batch)
            yield batch
        self._train = {k: np.concatenate([b[k] for b in seen]) for k in seen[0]}


def _train_network(
    cfg: WorkerConfig, state: dict | None, data: _WorkerData, run_epoch: int, first_attempt: bool
) -> None:
    """Train one network from `state` (its checkpoint) or from scratch; its first epoch is the
    run's `run_epoch` (what the failure seam counts)."""
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
    start_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"] + 1
    model = ray.train.torch.prepare_model(model)
    logger = _run_logger(cfg) if rank == 0 else None  # the run starts here, where the work does
    # Epochs an earlier attempt logged but did not checkpoint (killed in between) run again from
    # the last checkpoint; the run keeps the first record of each epoch, never two.
    logged = logger.logged_steps("train_loss") if logger is not None else set()
    if logger is not None:
        # A network resumed after a failure says from which checkpoint, for whoever browses runs.
        resumed = {"resumed_after_epoch": state["epoch"]} if state is not None else {}
        logger.set_tags({**layout, **resumed})
    generator = torch.Generator(device=device).manual_seed(cfg.seed + rank)
    # Rank 0 samples its machine (CPU, memory, GPU) onto the run while it trains (with psutil).
    with logger.system_metrics() if logger is not None else contextlib.nullcontext():
        for epoch in range(start_epoch, cfg.epochs):
            if cfg.fail_at_epoch == run_epoch + epoch and first_attempt and rank == 0:
                # Injected failure (tests): the worker process dies mid-run. Ray's controller collects
                # reports by polling every few seconds, so wait for it to register the last checkpoint:
                # otherwise, on a loaded machine, the kill races the registration and the restart
                # resumes from an older checkpoint than the test can name.
                time.sleep(FAILURE_DRAIN_S)
                os._exit(1)
            batches = data.train_batches(cfg.batch_size, cfg.seed + epoch)
            metrics = {"train_loss": train_one_epoch(model, optimizer, batches, task, device, generator)}
            checkpoint = None
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    metrics["test_loss"] = evaluate(unwrap(model), data.test_batches(), task, device)
                    if epoch not in logged:
                        logger.log_metrics(metrics, step=epoch)
                    state = {
                        "network": cfg.network,
                        "model": unwrap(model).state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "epoch": epoch,
                    }
                    torch.save(state, Path(tmp) / CHECKPOINT_FILE)
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report({**metrics, "epoch": epoch, "task": task.name}, checkpoint=checkpoint)
        if rank == 0:  # also after a restart at the very end: the weights come from the checkpoint
            weights = io.BytesIO()
            torch.save(unwrap(model).state_dict(), weights)
            location(cfg.weights).write_bytes(weights.getvalue())


def _run_logger(cfg: WorkerConfig) -> RunLogger:
    """Rank 0's logger, of the network's run: the driver's, or the one its first attempt made,
    or made now, as its work begins (MLflow sets a run's start time only when it is made)."""
    if cfg.run_id:
        return RunLogger(cfg.tracking_uri, cfg.run_id, cfg.tracking_retry_s)
    return RunLogger.start(cfg.tracking_uri, from_dict(RunToStart, cfg.new_run or {}), cfg.tracking_retry_s)


def _distinct_ray_nodes() -> int:
    """How many Ray nodes the worker group spans (by node id: local test clusters share one IP)."""
    node = ray.get_runtime_context().get_node_id()
    if not torch.distributed.is_initialized():
        return 1
    nodes: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(nodes, node)
    return len(set(nodes))
