"""Stage I: one task network per task — Ray Tune searches its hyperparameters, then Ray Train
(`TorchTrainer`, DDP) trains the final model; MLflow records everything.

    taskatlas train -c configs/quickstart.yaml                      # laptop: CPU workers
    taskatlas train -c configs/taskonomy-gpu.yaml                   # cluster: one worker per GPU
    taskatlas train -c configs/quickstart.yaml --tasks normal --set tune.enabled=false   # smoke

Plan, run, record: `pipelines.stage1.plan` says where each network lives and whether it is done,
this module runs the search (`pipelines.stage1.search`) and the Ray Train runs, and
`pipelines.stage1.record` keeps each network's MLflow run and registers it. Each Ray Train
worker (`pipelines.stage1.worker`) and Tune trial (`pipelines.stage1.trial.tune_trial`) is a thin shell
around `components.training`. A task's outputs live under `<storage_root>/stage1/<task>/<key>/`;
a complete task is skipped on rerun, and an interrupted one resumes from its latest Ray Train
checkpoint, kept under `<storage_root>/ray/`. One Ray Train run trains a share of the networks
one after another (`network_runs`), so its start-up is paid once a share; each network keeps its
own MLflow run, step and key. With `train.replicates` N > 1, each task's network is trained N
times from the one search, replicate n with its own seed (`stage1.plan.network_seed`): each
replicate is one more network to train, dealt to the runs like any other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch

from components.config import config_hash, to_dict
from components.data.shards import ShardStore
from components.disk_space import no_space
from components.errors import OutOfSpace
from components.models import TaskNetwork, build_network
from components.tasks import Task, channels_for
from components.training import iter_batches, nanmean, per_image_losses
from components.transfer.features import load_state_dict
from pipelines.config import PipelineConfig
from pipelines.hparams import HParams
from pipelines.progress import progress_bar
from pipelines.ray_runtime import (
    cluster_cpus,
    cluster_gpus,
    interrupts_kept,
    require_fits,
    set_train_report_poll,
)
from pipelines.results import TaskResult
from pipelines.sections import Loader
from pipelines.stage1.loopback import LoopbackTorchConfig
from pipelines.stage1.plan import Stage1Plan, network_runs, worker_batch_size
from pipelines.stage1.ray_data import ray_dataset
from pipelines.stage1.record import Network, NetworkRecord
from pipelines.stage1.restore import registered_network
from pipelines.stage1.search import search_tasks
from pipelines.stage1.train_state import repair_train_state
from pipelines.stage1.worker import WorkerConfig, loop_config, train_worker
from pipelines.steps import Fence
from pipelines.tracking.entities import RunToStart
from pipelines.tracking.runs import Tracker


@dataclass
class Stage1:
    """Stage I for one pipeline invocation: a tracker, a parent run, a dataset."""

    config: PipelineConfig
    store: ShardStore
    tracker: Tracker
    parent_run_id: str
    fence: Fence  # the study lock's check, before each step's marker (`Invocation.fence`)
    fail_at_epoch: int | None = None  # test seam: kill rank 0 once, at epoch N of a Ray Train run
    verbose: bool = False  # Tune's trial tables on the console (`taskatlas -v`)

    @property
    def plan(self) -> Stage1Plan:
        return Stage1Plan(self.config, self.store)

    @property
    def record(self) -> NetworkRecord:
        return NetworkRecord(self.config, self.store, self.tracker, self.parent_run_id, self.fence)

    @property
    def use_gpu(self) -> bool:
        return self.config.train.use_gpu if self.config.train.use_gpu is not None else cluster_gpus() > 0

    @property
    def num_workers(self) -> int:
        if self.config.train.num_workers:
            return self.config.train.num_workers
        return max(cluster_gpus(), 1) if self.use_gpu else 2

    def run(self, tasks: list[Task], search: bool) -> dict[str, TaskResult]:
        """Search (if asked and enabled: one Tuner per search of every pending task) then train
        every task's `train.replicates` networks, dealt to as many concurrent Ray Train runs as
        the cluster has room for (`network_runs`). Task -> its replicate 0, the others `replicas`."""
        t, plan = self.config.train, self.plan
        plan.check_worker_rows(self.num_workers)
        searching = search and self.config.tune.enabled
        unfinished = [task for task in tasks if plan.finished(task) is None] if searching else []
        if unfinished:
            gpus = self.config.tune.gpus_per_trial if self.use_gpu else 0.0
            require_fits(
                {"CPU": self.config.tune.cpus_per_trial, "GPU": gpus},
                "a search trial (tune.cpus_per_trial, tune.gpus_per_trial)",
            )
        # (task, search) -> hyperparameters: every pending search of the unfinished tasks
        hparams = {(name, n): h for n in plan.searches() for name, h in self.search(unfinished, n).items()}
        per_task = self.num_workers * (1 if self.use_gpu else t.cpus_per_worker)
        streaming = t.loader is Loader.RAY_DATA and not t.materialize_data  # its read tasks need a CPU
        spare = cluster_gpus() if self.use_gpu else cluster_cpus() - int(streaming)
        concurrent = t.concurrent_tasks or max(1, int(spare // max(per_task, 1e-9)))
        jobs = [
            (task, hparams.get((task.name, plan.search_of(n))) or plan.hparams_if_known(task, search, n), n)
            for task in tasks
            for n in range(t.replicates)
        ]
        done = self._finished(jobs)
        pending = [job for job in jobs if (job[0].name, job[2]) not in done]
        if pending:
            worker = {"GPU": 1.0} if self.use_gpu else {"CPU": t.cpus_per_worker}
            require_fits(worker, "a training worker (train.cpus_per_worker, train.use_gpu)")
        groups = network_runs(pending, concurrent, t.networks_per_run)
        with (
            progress_bar(len(pending), "networks", unit="network") as update,
            ThreadPoolExecutor(max_workers=max(1, min(concurrent, len(groups)))) as pool,
        ):
            for results in pool.map(lambda group: self._train_pending(group, update), groups):
                done.update(((r.task, r.replicate), r) for r in results)
        return {
            task.name: replace(
                done[task.name, 0], replicas=tuple(done[task.name, n] for n in range(1, t.replicates))
            )
            for task in tasks
        }

    def _finished(self, jobs: Sequence[tuple[Task, dict, int]]) -> dict[tuple[str, int], TaskResult]:
        """(task, replicate) -> its network, of the jobs a run already finished (replicate 0
        found in the current tracking store, or registered again from its weights when the store
        lost it, and adopted as a version of this study's registered model)."""
        done = {}
        for task, hparams, n in jobs:
            if (r := self.plan.cached_result(task, hparams, n)) is not None and n == 0:
                r = registered_network(self.record, task, r, self.plan.train_step(task, hparams))
                r = self.record.adopt(task, r)
            if r is not None:
                done[task.name, n] = r
        return done

    def search(self, tasks: list[Task], search: int = 0) -> dict[str, dict]:
        """Each task's best hyperparameters of its search `search` (`pipelines.stage1.search`)."""
        if not tasks:
            return {}
        return search_tasks(self.plan, self.record, tasks, self.use_gpu, search, self.verbose)

    def train(self, task: Task, hparams: HParams, replicate: int = 0) -> TaskResult:
        """One network (replicate `replicate` of the task's) in a Ray Train run of its own."""
        return self.train_networks([(task, hparams, replicate)])[0]

    def train_networks(self, jobs: Sequence[tuple[Task, dict] | tuple[Task, dict, int]]) -> list[TaskResult]:
        """Train these networks, (task, hyperparameters[, replicate, 0 if left out]), one after
        another in one Ray Train run (one start-up for all), then score, register (replicate 0)
        and finish each. Finished networks are read back."""
        full = [(job[0], job[1], job[2] if len(job) > 2 else 0) for job in jobs]
        results = self._finished(full)
        trained = self._train_pending([job for job in full if (job[0].name, job[2]) not in results])
        results.update(((r.task, r.replicate), r) for r in trained)
        return [results[task.name, n] for task, _, n in full]

    def _train_pending(
        self, jobs: list[tuple[Task, dict, int]], progress: Callable[[int], None] = lambda n: None
    ) -> list[TaskResult]:
        """`train_networks` for networks not finished yet (their markers already read): a network
        whose final weights a killed run already wrote is not trained again. `progress(1)` as
        each is finished."""
        plan, record = self.plan, self.record
        pending = [record.open(task, h, plan.train_step(task, h, n), n) for task, h, n in jobs]
        results = []
        try:
            if untrained := [n for n in pending if not n.weights.exists()]:
                self._fit(untrained)
            while pending:
                results.append(record.finish(pending[0], *score_weights(self.config, self.store, pending[0])))
                pending.pop(0)
                progress(1)
        except BaseException:  # a failed or interrupted training never stays RUNNING
            for network in pending:
                record.fail(network)
            raise
        return results

    def worker_config(
        self,
        task: Task,
        hparams: HParams,
        run_id: str,
        weights: str = "",
        replicate: int = 0,
        new_run: RunToStart | None = None,
    ) -> WorkerConfig:
        """What each DDP worker runs: `run_id` its MLflow run, or "" and `new_run` the run rank 0
        makes at its first batch. `hparams.batch_size` is the effective batch, as in the
        single-process search that chose it: each of N workers takes ceil(B / N) images a step
        and DDP averages their gradients, so the batch and the learning rate that go with it do
        not change with the worker count (no linear scaling rule: nothing to rescale)."""
        cfg = self.config
        return WorkerConfig(
            task=to_dict(task),
            model=to_dict(cfg.model),
            image_size=cfg.data.size,
            channels=channels_for(task, self.store),
            lr=hparams.lr,
            weight_decay=hparams.weight_decay,
            batch_size=worker_batch_size(hparams.batch_size, self.num_workers),
            epochs=cfg.train.epochs,
            seed=self.plan.seed(replicate),  # train.seed for replicate 0
            tracking_uri=self.tracker.tracking_uri,
            tracking_retry_s=cfg.tracking.retry_s,
            run_id=run_id,
            weights=weights,
            fail_at_epoch=self.fail_at_epoch,
            cache_in_memory=cfg.train.cache_in_memory,
            data_root=self.store.root.uri if cfg.train.loader is Loader.SHARDS else "",
            new_run=to_dict(new_run) if new_run is not None else None,
        )

    def _fit(self, networks: list[Network]) -> None:
        cfg = self.config
        workers = [
            self.worker_config(n.task, n.hparams, n.run_id, n.weights.uri, n.replicate, n.new_run)
            for n in networks
        ]
        columns = sorted({c for n in networks for c in n.task.columns})
        names = "+".join(n.file_id for n in networks) if len(networks) <= 3 else f"{len(networks)}-networks"
        # The same networks, the same run: a rerun after a kill resumes its checkpoint ...
        run_name = f"train-{names}-{config_hash([n.step.key for n in networks])}"
        repair_train_state(cfg.root / "ray" / run_name, names)  # ... unless a full disk damaged it
        trainer = ray.train.torch.TorchTrainer(
            train_worker,
            train_loop_config=loop_config(workers),
            torch_config=LoopbackTorchConfig(),  # the rendezvous on 127.0.0.1 for local runs
            scaling_config=ray.train.ScalingConfig(
                num_workers=self.num_workers,
                use_gpu=self.use_gpu,
                resources_per_worker=None if self.use_gpu else {"CPU": cfg.train.cpus_per_worker},
            ),
            run_config=ray.train.RunConfig(
                name=run_name,
                storage_path=(cfg.root / "ray").uri,
                failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
            ),
            **trainer_datasets(self.config, self.store, columns),
        )
        set_train_report_poll(cfg.train.report_poll_s)
        try:
            with interrupts_kept():
                trainer.fit()
        except Exception as err:  # a full disk: name the training, not a worker's traceback
            if (writing := no_space(err)) is None:
                raise
            writing = writing or f"the checkpoints of {names} under {cfg.root / 'ray' / run_name}"
            raise OutOfSpace(f"no space left on device training {names}", writing) from err


def score_weights(cfg: PipelineConfig, store: ShardStore, network: Network) -> tuple[TaskNetwork, float]:
    """The network's final weights and their mean loss over the test split, each image's in its
    step (`test_losses.parquet`). Each network reads only its own task's test columns: a run's
    networks together may need more of the test split than a driver should hold at once."""
    task = network.task
    model = build_network(task, cfg.model, cfg.data.size, channels_for(task, store))
    model.load_state_dict(load_state_dict(network.weights.uri))  # onto the CPU, weights only
    test = store.read("test", task.columns)
    ids, losses = per_image_losses(model, iter_batches(test, 256), task, torch.device("cpu"))
    (network.step.location / "test_losses.parquet").write_parquet(
        pa.table({"image_id": ids.astype(str), "loss": losses})
    )
    return model, nanmean(losses)


def trainer_datasets(cfg: PipelineConfig, store: ShardStore, columns: list[str]) -> dict:
    """TorchTrainer's dataset arguments: none when each worker reads its shards itself."""
    if cfg.train.loader is not Loader.RAY_DATA:
        return {}
    datasets = {split: ray_dataset(store, split, columns) for split in ("train", "test")}
    if cfg.train.materialize_data:
        datasets = {split: ds.materialize() for split, ds in datasets.items()}
    return {"datasets": datasets, "dataset_config": ray.train.DataConfig(datasets_to_split=["train"])}
