"""Stage I's record: each network's MLflow run, its score on the test split, its registration.

One MLflow run (and logged model) per network, continued when an earlier attempt was killed.
`open` describes it and Ray Train's rank 0 makes it at its first batch, then logs the epochs
into it (`pipelines.stage1.worker`): so the run spans the network's work, not its wait for a
worker (logged as `queue_seconds`). `finish` adds the test loss of the final weights, registers
them, ends the run at its last report and writes the step's marker, last. Network
replicates n > 0 (`train.replicates`) are runs of their own, `train/<task>#<n>`, kept simple:
no logged model and no registration; the registered model stays replicate 0's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
from mlflow.entities import Metric

from components.config import to_dict
from components.data.shards import ShardStore
from components.models import TaskNetwork
from components.storage import Location
from components.tasks import Task, channels_for
from pipelines.config import PipelineConfig
from pipelines.hparams import HParams
from pipelines.invocation import dataset_ref
from pipelines.results import TaskResult
from pipelines.sections import TuneConfig
from pipelines.stage1.plan import network_name, network_seed
from pipelines.steps import Fence, Step
from pipelines.tracking.entities import FinalStatus, FinishedRun, RunToStart
from pipelines.tracking.models import CHAMPION, NetworkSpec, Registration, tensor_signature
from pipelines.tracking.registry import network_model, registered_definition, version_tags
from pipelines.tracking.runs import Tracker

EPOCH_METRICS = ("train_loss", "test_loss")  # what rank 0 logs each epoch (`pipelines.stage1.worker`)


@dataclass(frozen=True)
class Network:
    """A network being trained: its step, its MLflow run and logged model ("" for replicates
    n > 0, which are not registered). A network not begun yet has no run: `new_run` says what
    its rank-0 worker makes (`started` reads it back); its logged model is made with it."""

    task: Task
    hparams: HParams
    step: Step
    run_id: str
    model_id: str
    replicate: int = 0
    new_run: RunToStart | None = None

    @property
    def file_id(self) -> str:
        """`normal`, `normal.r1`: its name without `#`, safe in a Ray Train run's folder name."""
        return f"{self.task.name}.r{self.replicate}" if self.replicate else self.task.name

    @property
    def run_file(self) -> Location:
        """Its run's id and logged model's: written when each is made, read when it is continued."""
        return self.step.location / "mlflow_run.json"

    @property
    def weights(self) -> Location:
        """Its final weights: written by rank 0 after the last epoch, so they exist only once the
        network is trained."""
        return self.step.location / "model.pt"


@dataclass(frozen=True)
class NetworkRecord:
    """Where Stage I's networks are recorded: the tracker and the invocation's parent run."""

    config: PipelineConfig
    store: ShardStore
    tracker: Tracker
    parent_run_id: str
    fence: Fence  # the study lock's check, before each network's marker

    def open(self, task: Task, hparams: HParams, step: Step, replicate: int = 0) -> Network:
        """The network's MLflow run: an earlier attempt's (KILLED or FAILED by now) continued,
        else one for its rank-0 worker to make when its training begins (`Network.new_run`)."""
        network = Network(task, hparams, step, "", "", replicate)
        if network.run_file.exists():
            ids = network.run_file.read_json()
            run_id = self.tracker.reopen_run(ids["run_id"], self.parent_run_id)
            return self._with_logged_model(replace(network, run_id=run_id, model_id=ids.get("model_id", "")))
        tags = {"task": task.name, "stage": "train"} | ({"replicate": str(replicate)} if replicate else {})
        searched = self.config.tune.enabled
        # Replicate n > 0: the seed it trained with, and which replicate it is, in place of train.seed
        trained_with = self.trained_with(hparams, replicate)
        mine = {"seed": trained_with["seed"], "replicate": replicate} if replicate else {}
        params = {
            "task": task.name,
            # One name per setting: train.lr, train.weight_decay and train.batch_size are the
            # ones it trained with, the search's best where it searched (tune/<task> has the
            # search), and train.hparams_from says which.
            "train": to_dict(self.config.train)
            | hparams.to_json()
            | {"hparams_from": "tune" if searched else "config"}
            | mine,
            "model": to_dict(self.config.model),
            "data_version": self.store.data_version,
        }
        new_run = self.tracker.run_to_start(
            f"train/{network_name(task.name, replicate)}",
            self.parent_run_id,
            tags,
            params,
            id_file=network.run_file.uri,
            dataset=dataset_ref(self.config, self.store),
            dataset_context="train",
        )
        return replace(network, new_run=new_run)

    def started(self, network: Network) -> Network:
        """The network with its run, once its training began: the run its rank-0 worker made, or
        (that worker could not reach the tracking store) one made now; and its logged model."""
        if network.run_id:
            return network
        if network.run_file.exists():
            run_id = network.run_file.read_json()["run_id"]
        else:
            run_id = self.tracker.start_planned(network.new_run)
        return self._with_logged_model(replace(network, run_id=run_id))

    def _with_logged_model(self, network: Network) -> Network:
        """Replicate 0's logged model (registered by `finish`), made if its run has none yet;
        replicates n > 0 have none."""
        if network.model_id or network.replicate:
            return network
        trained_with = self.trained_with(network.hparams, network.replicate)
        model_id = self.tracker.models.create_logged_model(network.run_id, network.task.name, trained_with)
        network.run_file.write_json({"run_id": network.run_id, "model_id": model_id})
        return replace(network, model_id=model_id)

    def trained_with(self, hparams: HParams, replicate: int = 0) -> dict:
        """The logged model's parameters: what its network was trained with."""
        seed = network_seed(self.config.train.seed, replicate)
        return hparams.to_json() | {"epochs": self.config.train.epochs, "seed": seed}

    def fail(self, network: Network) -> None:
        """Its run FAILED, if its training made one."""
        made = network.run_file.read_json()["run_id"] if network.run_file.exists() else ""
        if run_id := network.run_id or made:
            self.tracker.end_run(run_id, failed=True)

    def finish(self, network: Network, model: TaskNetwork, test_loss: float) -> TaskResult:
        """A trained and scored network (`model`, its final weights; `test_loss`, its mean over the
        test split): registered (replicate 0), its run ended at the network's last report (its
        work; scoring and registering are the driver's), and the network marked done."""
        network = self.started(network)
        cfg, task, step = self.config, network.task, network.step
        channels = channels_for(task, self.store)
        last_epoch = self.tracker.models.last_metrics(network.run_id, EPOCH_METRICS)  # as rank 0 logged it
        reported = max((m.timestamp / 1000 for m in last_epoch), default=None)  # None: no epoch logged
        if network.replicate:  # another training of the network: scored, not registered
            n = network
            self.tracker.log_metrics(n.run_id, {"final_test_loss": test_loss}, step=cfg.train.epochs - 1)
            self.tracker.end_run(n.run_id, end_time=reported)
            done = TaskResult(
                task.name, step.key, n.weights.uri, test_loss, n.hparams, n.run_id, "", "", n.replicate
            )
            step.finish(done.marker(), fence=self.fence)
            return done
        # The logged model's metrics: the last epoch's (as rank 0 logged them to the run) and the
        # test loss of the saved weights at that step, one value per key.
        last = cfg.train.epochs - 1
        data = dataset_ref(cfg, self.store)  # the Models tab shows each metric under its dataset
        metrics = [
            Metric(m.key, m.value, m.timestamp, m.step, dataset_name=data.name, dataset_digest=data.digest)
            for m in last_epoch
        ]
        now = int(time.time() * 1000)
        metrics.append(Metric("final_test_loss", test_loss, now, last, None, data.name, data.digest))
        spec = NetworkSpec(task, cfg.model, cfg.data.size, channels)  # weights only, no pickle
        registration = self.registration(task, test_loss, step.key)
        registered = registration.name
        example = torch.rand(1, 3, cfg.data.size, cfg.data.size)  # RGB in [0, 1]
        version = self.tracker.models.log_task_network(
            network.run_id,
            network.model_id,
            model.state_dict(),
            spec,
            registration,
            metrics,
            signature=tensor_signature(model, example),
        )
        if self.first_of_its_definition(registered, task):
            self.tracker.models.set_alias(registered, CHAMPION, version)
        self.tracker.end_run(network.run_id, end_time=reported)
        done = TaskResult(
            task.name,
            step.key,
            network.weights.uri,
            test_loss,
            network.hparams,
            network.run_id,
            version,
            registered,
        )
        step.finish(done.marker(), fence=self.fence)
        return done

    def registration(self, task: Task, test_loss: float, key: str) -> Registration:
        """Where and how the study registers its network for `task` (step `key`)."""
        cfg = self.config
        about = f"{task.kind.value} task, {task.loss.value} loss on column `{task.column}`"
        return Registration(
            network_model(cfg.name, task.name),
            description=(
                f"The {task.name} network of the taskatlas study {cfg.name} ({about}): one version per "
                f"training, `@{CHAMPION}` the one in use; tag `definition` tells the task's definitions "
                "apart. Weights only: load with taskatlas' load_registered_model."
            ),
            version_description=(
                f"The {task.name} network ({about}), trained {cfg.train.epochs} epochs on data version "
                f"{self.store.data_version}; mean test loss {test_loss:.4g} (lower is better). "
                "Weights only: load with taskatlas' load_registered_model. Task definition "
                f"`{task.definition_hash}`, step `{key}` (tags `definition`, `config_hash`: the UI "
                "shows a logged model's description, not its tags)."
            ),
            tags={"task": task.name, "study": cfg.name, "kind": task.kind.value, "loss": task.loss.value},
            version_tags={
                **version_tags(cfg.name, task),
                "final_test_loss": f"{test_loss:.6g}",
                "data_version": self.store.data_version,
                "config_hash": key,
            },
        )

    def adopt(self, task: Task, result: TaskResult) -> TaskResult:
        """A finished network as a version of this study's own registered model. Networks are
        steps keyed by content, so a study reuses one another study trained alike on the same root;
        its logged model is then registered under this study's name too (once: found again by its
        `config_hash` tag), and becomes the champion if it is the first of its definition here."""
        ours = network_model(self.config.name, task.name)
        if result.registered in ("", ours):
            return result
        version = self.tracker.models.find_version(ours, {"config_hash": result.key})
        if version is None:
            model_id = self.tracker.models.version_model_id(result.registered, result.model_version)
            if model_id is None:  # registered from a path, before logged models: nothing to link
                return result
            version = self.tracker.models.register_version(
                self.registration(task, result.test_loss, result.key), model_id, result.run_id
            )
        if self.first_of_its_definition(ours, task):
            self.tracker.models.set_alias(ours, CHAMPION, version)
        return replace(result, model_version=version, registered=ours)

    def first_of_its_definition(self, registered: str, task: Task) -> bool:
        """No champion yet (or only one made under the root this one was copied from), or one of
        another definition of the task (the study redefined it):
        this version is the first of its definition, so it becomes the champion. A champion
        without the tag (registered before it) is left to nightly, which reads its definition."""
        champion = self.tracker.models.alias_version(registered, CHAMPION)
        if champion is None or not self.tracker.models.made_here(registered, champion):
            return True  # none, or its files are under a storage root this one was copied from
        return registered_definition(self.tracker, registered, champion) not in (None, task.definition_hash)


def record_search(
    tracker: Tracker,
    parent_run_id: str,
    tune: TuneConfig,
    task: Task,
    results: list,
    spans: list[tuple[float, float]],
    best,
    best_loss: float,
    span: tuple[float, float],
    chosen: HParams,
    search: int = 0,
) -> None:
    """A task's search as a run spanning the search (`span`, epoch seconds) with its space
    (`tune.*`), its best trial (`best`, tag `best_trial`) and what it chose (`chosen`, params
    `best.*`), and a run per trial (Tune's `results`, in the study's trials experiment, under
    this run) spanning its own work (`spans`), with its epochs' losses. Search n > 0 (network
    replicate n's) is `tune/<task>#n`, as its network is `train/<task>#n`."""
    best_id = str(best.metrics.get("trial_id"))
    name = network_name(task.name, search)
    run = tracker.start_run(
        f"tune/{name}",
        parent_run_id,
        {"task": task.name, "stage": "tune", "best_trial": best_id, "replicate": str(search)},
        start_time=span[0],
    )
    tracker.log_params(run, {"best": chosen.to_json(), "tune": to_dict(tune)})
    trials = []
    for result, (start, end) in zip(results, spans, strict=True):
        df = result.metrics_dataframe
        rows = []
        if df is not None:
            for _, row in df.iterrows():
                rows += [(m, float(row[m]), int(row["epoch"])) for m in ("val_loss", "train_loss")]
        stopped = int(result.metrics.get("epoch", 0)) < tune.max_epochs
        trial_id = str(result.metrics.get("trial_id"))
        trials.append(
            FinishedRun(
                f"tune/{name}/{trial_id}",
                tags={"task": task.name, "stopped_early": str(stopped).lower(), "trial_id": trial_id},
                params={k: str(result.config[k]) for k in HParams.names()},
                metrics=tuple(rows),
                start_time=start,
                end_time=end,
                status=FinalStatus.FAILED if result.error is not None else FinalStatus.FINISHED,
            )
        )
    tracker.batches.log_finished_runs(run, trials, experiment_id=tracker.companion("trials"))
    tracker.log_metrics(run, {"best_val_loss": best_loss})  # the best trial's last val_loss
    tracker.end_run(run, end_time=span[1])
