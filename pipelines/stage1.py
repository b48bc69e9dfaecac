"""Stage I: one task network per task — Ray Tune searches its hyperparameters, then Ray Train
(`TorchTrainer`, DDP) trains the final model; MLflow records everything.

    taskatlas train -c configs/quickstart.yaml                      # laptop: CPU workers
    taskatlas train -c configs/taskonomy-gpu.yaml                   # cluster: one worker per GPU
    taskatlas train -c configs/quickstart.yaml --tasks normal --set tune.enabled=false   # smoke

Where Ray meets the plain components: `pipelines.train_worker` (each Ray Train worker) and
`pipelines.search.tune_trial` (each Tune trial) are thin shells around `components.training`.
A task's outputs live under `<storage_root>/stage1/<task>/<key>/` (a `Step`: its marker written
last); a complete task is skipped on rerun, and an interrupted one resumes from its latest Ray
Train checkpoint, kept under `<storage_root>/ray/` (Ray Train and Tune write there themselves,
local or object storage). One Ray Train run trains a share of the networks one after another
(`network_runs`), so its start-up is paid once a share; each network keeps its own MLflow run,
step and key.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch
from ray import tune
from ray.tune.search import BasicVariantGenerator

from components.config import config_hash, to_dict
from components.data.shards import ShardStore
from components.errors import TaskatlasError
from components.models import build_network
from components.storage import Location
from components.tasks import Task, channels_for
from components.tracking import CHAMPION, NetworkSpec, Tracker
from components.training import iter_batches, nanmean, per_image_losses
from components.transfer.features import load_state_dict
from pipelines.config import PipelineConfig
from pipelines.ray_data import ray_dataset
from pipelines.ray_runtime import cluster_cpus, cluster_gpus, set_train_report_poll
from pipelines.search import TASK_KEY, PerTaskASHA, tune_trial
from pipelines.settings import read_settings
from pipelines.steps import Step
from pipelines.torch_loopback import LoopbackTorchConfig
from pipelines.train_worker import WorkerConfig, loop_config, train_worker


@dataclass(frozen=True)
class TaskResult:
    task: str
    key: str
    model_path: str
    test_loss: float
    hparams: dict
    run_id: str
    model_version: str


def best_val_loss(result) -> float | None:
    """A trial's lowest validation loss at any epoch (Tune's scope "all"); None if it reported none."""
    df = result.metrics_dataframe
    if df is None or "val_loss" not in df or df["val_loss"].isna().all():
        return None
    return float(df["val_loss"].min())


def worker_batch_size(batch_size: int, num_workers: int) -> int:
    """Per-worker batch of an effective batch `batch_size` split over `num_workers` DDP workers."""
    return max(1, -(-batch_size // num_workers))


def network_runs(jobs: list, slots: int, per_run: int) -> list[list]:
    """Split the networks to train into Ray Train runs, each training its share one after
    another. `per_run` 0: one run per slot (as few start-ups as keep every slot busy); N: at most
    N networks a run. Shares are dealt round-robin, so their sizes differ by at most one."""
    if not jobs:
        return []
    runs = max(slots, -(-len(jobs) // per_run)) if per_run else slots
    runs = min(runs, len(jobs))
    return [jobs[i::runs] for i in range(runs)]


@dataclass(frozen=True)
class _Network:
    """A network being trained: its step, its MLflow run and logged model."""

    task: Task
    hparams: dict
    step: Step
    run_id: str
    model_id: str

    @property
    def weights(self) -> Location:
        """Its final weights: written by rank 0 after the last epoch, so they exist only once the
        network is trained."""
        return self.step.location / "model.pt"


# ---------------------------------------------------------------- driver side


@dataclass
class Stage1:
    """Stage I for one pipeline invocation: a tracker, a parent run, a dataset."""

    config: PipelineConfig
    store: ShardStore
    tracker: Tracker
    parent_run_id: str

    @property
    def use_gpu(self) -> bool:
        return self.config.train.use_gpu if self.config.train.use_gpu is not None else cluster_gpus() > 0

    @property
    def num_workers(self) -> int:
        if self.config.train.num_workers:
            return self.config.train.num_workers
        return max(cluster_gpus(), 1) if self.use_gpu else 2

    def run(self, tasks: list[Task], search: bool) -> dict[str, TaskResult]:
        """Search (if asked and enabled: every pending task's search in one Tuner) then train
        every task: the pending networks are dealt to as many concurrent Ray Train runs as the
        cluster has room for (`network_runs`), each training its share one after another."""
        t = self.config.train
        self.check_worker_rows()
        if search and self.config.tune.enabled:
            unfinished = [task for task in tasks if self.finished(task) is None]
            hparams = self.search_all(unfinished) if unfinished else {}
        else:
            hparams = {}
        per_task = self.num_workers * (1 if self.use_gpu else t.cpus_per_worker)
        streaming = t.loader == "ray_data" and not t.materialize_data  # its read tasks need a CPU
        spare = cluster_gpus() if self.use_gpu else cluster_cpus() - int(streaming)
        concurrent = t.concurrent_tasks or max(1, int(spare // max(per_task, 1e-9)))
        jobs = [(task, hparams.get(task.name) or self.hparams_if_known(task, search)) for task in tasks]
        done = {task.name: r for task, h in jobs if (r := self.cached_result(task, h)) is not None}
        groups = network_runs(
            [job for job in jobs if job[0].name not in done], concurrent, t.networks_per_run
        )
        with ThreadPoolExecutor(max_workers=max(1, min(concurrent, len(groups)))) as pool:
            for results in pool.map(self._train_pending, groups):
                done.update((r.task, r) for r in results)
        return {task.name: done[task.name] for task in tasks}

    def check_worker_rows(self) -> None:
        """Before any work: every DDP worker trains on an equal share of the train split
        (`rank_rows`), so a split smaller than the worker count would leave a worker nothing."""
        rows = self.store.manifest.counts["train"]
        if rows < self.num_workers:
            raise TaskatlasError(
                f"train.num_workers: {self.num_workers} workers, but the train split has only {rows} "
                "images; every worker needs at least one"
            )

    def _trainer_datasets(self, columns: list[str]) -> dict:
        """TorchTrainer's dataset arguments: none when each worker reads its shards itself."""
        if self.config.train.loader != "ray_data":
            return {}
        datasets = {split: ray_dataset(self.store, split, columns) for split in ("train", "test")}
        if self.config.train.materialize_data:
            datasets = {split: ds.materialize() for split, ds in datasets.items()}
        return {"datasets": datasets, "dataset_config": ray.train.DataConfig(datasets_to_split=["train"])}

    # -- where each task's outputs live; what is already done (reruns, --dry-run, nightly)
    def search_step(self, task: Task) -> Step:
        cfg = self.config
        key = config_hash(task, cfg.model, cfg.tune, cfg.train.seed, self.store.data_version)
        return Step(cfg.root, f"tune/{task.name}", key)

    def cached_hparams(self, task: Task) -> dict | None:
        step = self.search_step(task)
        return step.info()["hparams"] if step.complete else None

    def hparams_if_known(self, task: Task, search: bool) -> dict | None:
        """The hyperparameters training would use, or None while the search has not run."""
        return self.cached_hparams(task) if search and self.config.tune.enabled else self.default_hparams()

    def train_step(self, task: Task, hparams: dict) -> Step:
        """Keyed by everything that changes the trained model: the task's definition, model,
        hyperparameters, epochs, seed, data, and how it is trained (workers as configured, 0 for
        "one per GPU"; GPU or not; batches cached in memory or streamed)."""
        cfg, t = self.config, self.config.train
        how = {
            "num_workers": t.num_workers,
            "use_gpu": t.use_gpu,
            "loader": t.loader,
            "cache_in_memory": t.cache_in_memory and t.loader == "ray_data",
        }
        key = config_hash(task, cfg.model, hparams, t.epochs, t.seed, self.store.data_version, how)
        return Step(cfg.root, f"stage1/{task.name}", key)

    def cached_result(self, task: Task, hparams: dict) -> TaskResult | None:
        step = self.train_step(task, hparams)
        return TaskResult(**step.info()) if step.complete else None

    def finished(self, task: Task, search: bool = True) -> TaskResult | None:
        """The task's trained network for the current settings, if a run already made it."""
        hparams = self.hparams_if_known(task, search)
        return self.cached_result(task, hparams) if hparams is not None else None

    def default_hparams(self) -> dict:
        t = self.config.train
        return {"lr": t.lr, "weight_decay": t.weight_decay, "batch_size": t.batch_size}

    # -- tune
    def search_all(self, tasks: list[Task]) -> dict[str, dict]:
        """Each task's best hyperparameters: from its finished search, or from one Tuner that
        searches all the others at once (see `pipelines.search`); each task's search is then its
        own step."""
        cfg = self.config
        found = {t.name: h for t in tasks if (h := self.cached_hparams(t)) is not None}
        pending = [t for t in tasks if t.name not in found]
        if not pending:
            return found
        use_gpu = self.use_gpu
        resources = {"cpu": cfg.tune.cpus_per_trial, "gpu": cfg.tune.gpus_per_trial if use_gpu else 0}
        jobs = {t.name: {"task": to_dict(t), "channels": channels_for(t, self.store)} for t in pending}
        space = {
            TASK_KEY: tune.grid_search([t.name for t in pending]),
            "lr": tune.loguniform(cfg.tune.lr_min, cfg.tune.lr_max),
            "weight_decay": tune.loguniform(cfg.tune.weight_decay_min, cfg.tune.weight_decay_max),
            "batch_size": tune.choice(list(cfg.tune.batch_sizes)),
            "model": to_dict(cfg.model),
            "image_size": cfg.data.size,
            "data_root": self.store.root.uri,
            "holdout_fraction": cfg.tune.holdout_fraction,
            "max_train_images": cfg.tune.max_train_images,
            "max_epochs": cfg.tune.max_epochs,
            "seed": cfg.train.seed,
            "use_gpu": use_gpu,
        }
        scheduler = PerTaskASHA(
            time_attr="epoch",
            max_t=cfg.tune.max_epochs,
            grace_period=cfg.tune.grace_period,
            reduction_factor=cfg.tune.reduction_factor,
        )
        steps = {t.name: self.search_step(t) for t in pending}
        storage = (cfg.root / "ray").uri
        name = f"tune-{config_hash(sorted((n, step.key) for n, step in steps.items()))}"
        trainable = tune.with_resources(tune.with_parameters(tune_trial, jobs=jobs), resources)
        if tune.Tuner.can_restore(f"{storage}/{name}"):  # an interrupted search resumes
            tuner = tune.Tuner.restore(f"{storage}/{name}", trainable, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                tune_config=tune.TuneConfig(
                    metric="val_loss",
                    mode="min",
                    scheduler=scheduler,
                    num_samples=cfg.tune.num_samples,
                    # Seeded sampling: the same config searches the same points on a rerun.
                    search_alg=BasicVariantGenerator(random_state=cfg.train.seed),
                    reuse_actors=True,
                ),
                # Tune's trial tables only with -v: the console shows the answer, not the search
                run_config=tune.RunConfig(
                    name=name, storage_path=storage, verbose=int(read_settings().verbose)
                ),
            )
        grid = tuner.fit()
        for task in pending:
            results = [r for r in grid if r.config[TASK_KEY] == task.name]
            scored = [(best_val_loss(r), r) for r in results]
            scored = [(loss, r) for loss, r in scored if loss is not None]
            if not scored:
                raise TaskatlasError(
                    f"every Ray Tune trial for {task.name} failed; the first: {results[0].error}"
                )
            best_loss, best = min(scored, key=lambda pair: pair[0])
            hparams = {k: best.config[k] for k in ("lr", "weight_decay", "batch_size")}
            self._log_search(task, results, hparams, best_loss)
            trials = [
                {
                    "trial_id": r.metrics.get("trial_id"),
                    "epochs": r.metrics.get("epoch"),
                    "val_loss": r.metrics.get("val_loss"),
                }
                for r in results
            ]
            steps[task.name].finish({"hparams": hparams, "trials": trials})
            found[task.name] = hparams
        return found

    def _log_search(self, task: Task, results: list, hparams: dict, best_loss: float) -> None:
        run = self.tracker.start_run(
            f"tune/{task.name}", self.parent_run_id, {"task": task.name, "stage": "tune"}
        )
        self.tracker.log_params(run, {"best": hparams, "tune": to_dict(self.config.tune)})
        for result in results:
            trial = self.tracker.start_run(
                f"tune/{task.name}/{result.metrics.get('trial_id')}", run, {"task": task.name}
            )
            self.tracker.log_params(
                trial, {k: result.config[k] for k in ("lr", "weight_decay", "batch_size")}
            )
            df = result.metrics_dataframe
            rows = []
            if df is not None:
                for _, row in df.iterrows():
                    rows += [(m, float(row[m]), int(row["epoch"])) for m in ("val_loss", "train_loss")]
            self.tracker.log_history(trial, rows)
            stopped = int(result.metrics.get("epoch", 0)) < self.config.tune.max_epochs
            self.tracker.set_tags(trial, {"stopped_early": str(stopped).lower()})
            self.tracker.end_run(trial, failed=result.error is not None)
        self.tracker.log_metrics(run, {"best_val_loss": best_loss})
        self.tracker.end_run(run)

    # -- train
    def worker_config(
        self, task: Task, hparams: dict, run_id: str, model_id: str = "", weights: str = ""
    ) -> WorkerConfig:
        """What each DDP worker runs. `hparams["batch_size"]` is the effective batch, as in the
        single-process search that chose it: each of N workers takes ceil(B / N) images a step
        and DDP averages their gradients, so the batch and the learning rate that go with it do
        not change with the worker count (no linear scaling rule: nothing to rescale)."""
        cfg = self.config
        return WorkerConfig(
            task=to_dict(task),
            model=to_dict(cfg.model),
            image_size=cfg.data.size,
            channels=channels_for(task, self.store),
            lr=hparams["lr"],
            weight_decay=hparams["weight_decay"],
            batch_size=worker_batch_size(hparams["batch_size"], self.num_workers),
            epochs=cfg.train.epochs,
            seed=cfg.train.seed,
            tracking_uri=self.tracker.tracking_uri,
            run_id=run_id,
            weights=weights,
            model_id=model_id,
            fail_at_epoch=cfg.train.fail_at_epoch,
            cache_in_memory=cfg.train.cache_in_memory,
            data_root=self.store.root.uri if cfg.train.loader == "shards" else "",
        )

    def train(self, task: Task, hparams: dict) -> TaskResult:
        """One network in a Ray Train run of its own."""
        return self.train_networks([(task, hparams)])[0]

    def train_networks(self, jobs: list[tuple[Task, dict]]) -> list[TaskResult]:
        """Train these networks one after another in one Ray Train run (one start-up for all),
        then score, register and finish each. Finished networks are read back."""
        results = {task.name: r for task, h in jobs if (r := self.cached_result(task, h)) is not None}
        trained = self._train_pending([job for job in jobs if job[0].name not in results])
        results.update((r.task, r) for r in trained)
        return [results[task.name] for task, _ in jobs]

    def _train_pending(self, jobs: list[tuple[Task, dict]]) -> list[TaskResult]:
        """`train_networks` for networks not finished yet (their markers already read): a network
        whose final weights a killed run already wrote is not trained again."""
        pending = [self._open_network(task, hparams) for task, hparams in jobs]
        results = []
        try:
            untrained = [n for n in pending if not n.weights.exists()]
            if untrained:
                self._fit(untrained)
            while pending:
                results.append(self._finish(pending[0]))
                pending.pop(0)
        except BaseException:  # a failed or interrupted training never stays RUNNING
            for network in pending:
                self.tracker.end_run(network.run_id, failed=True)
            raise
        return results

    def _open_network(self, task: Task, hparams: dict) -> _Network:
        """The network's step and its MLflow run: one run (and logged model) per network, an
        earlier attempt's (KILLED or FAILED by now) continued."""
        cfg = self.config
        step = self.train_step(task, hparams)
        run_file = step.location / "mlflow_run.json"
        if run_file.exists():
            ids = run_file.read_json()
            run_id = self.tracker.reopen_run(ids["run_id"], self.parent_run_id)
            model_id = ids.get("model_id") or self.tracker.create_logged_model(run_id, task.name)
        else:
            run_id = self.tracker.start_run(
                f"train/{task.name}", self.parent_run_id, {"task": task.name, "stage": "train"}
            )
            model_id = self.tracker.create_logged_model(run_id, task.name)
            run_file.write_json({"run_id": run_id, "model_id": model_id})
            self.tracker.log_params(
                run_id,
                {
                    "task": task.name,
                    "hparams": hparams,
                    "model": to_dict(cfg.model),
                    "train": to_dict(cfg.train),
                    "data_version": self.store.data_version,
                },
            )
        return _Network(task, hparams, step, run_id, model_id)

    def _fit(self, networks: list[_Network]) -> None:
        cfg = self.config
        workers = [
            self.worker_config(n.task, n.hparams, n.run_id, n.model_id, n.weights.uri) for n in networks
        ]
        columns = sorted({c for n in networks for c in n.task.columns})
        names = "+".join(n.task.name for n in networks) if len(networks) <= 3 else f"{len(networks)}-networks"
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
                # The same networks, the same run: a rerun after a kill resumes its checkpoint.
                name=f"train-{names}-{config_hash([n.step.key for n in networks])}",
                storage_path=(cfg.root / "ray").uri,
                failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
            ),
            **self._trainer_datasets(columns),
        )
        set_train_report_poll(cfg.train.report_poll_s)
        trainer.fit()

    def _finish(self, network: _Network) -> TaskResult:
        """Score the final weights on the test split, register them, and mark the network done.
        Each network reads only its own task's test columns: a run's networks together may need
        more of the test split than a driver should hold at once."""
        cfg, task, hparams, step = self.config, network.task, network.hparams, network.step
        key, out, run_id, model_id = step.key, step.location, network.run_id, network.model_id
        channels = channels_for(task, self.store)
        columns = task.columns
        model = build_network(task, cfg.model, cfg.data.size, channels)
        model.load_state_dict(load_state_dict(network.weights.uri))  # onto the CPU, weights only
        test = self.store.read("test", columns)
        ids, losses = per_image_losses(model, iter_batches(test, 256), task, torch.device("cpu"))
        (out / "test_losses.parquet").write_parquet(pa.table({"image_id": ids.astype(str), "loss": losses}))
        test_loss = nanmean(losses)
        # The model's metrics are its epochs' (rank 0 logs them to the run and the model), the
        # last one's shown, plus the test loss of the saved weights at the last epoch's step.
        spec = NetworkSpec(task, cfg.model, cfg.data.size, channels)  # weights only, no pickle
        registered = f"taskatlas-{task.name}"
        version = self.tracker.log_task_network(
            run_id,
            model_id,
            model.state_dict(),
            spec,
            registered,
            metrics={"final_test_loss": test_loss},
            step=cfg.train.epochs - 1,
            version_tags={
                "task": task.name,
                "final_test_loss": f"{test_loss:.6g}",
                "data_version": self.store.data_version,
                "config_hash": key,
            },
            description=(
                f"The {task.name} network ({task.kind.value} task, {task.loss.value} loss on column "
                f"`{task.column}`), trained {cfg.train.epochs} epochs on data version "
                f"{self.store.data_version}; mean test loss {test_loss:.4g} (lower is better). "
                "Weights only: load with taskatlas' load_registered_model."
            ),
        )
        if self.tracker.alias_version(registered, CHAMPION) is None:  # a task's first version
            self.tracker.set_alias(registered, CHAMPION, version)
        self.tracker.end_run(run_id)
        done = TaskResult(task.name, key, network.weights.uri, test_loss, hparams, run_id, version)
        step.finish(asdict(done))
        return done
