"""Stage I's record: each network's MLflow run, its score on the test split, its registration.

One MLflow run (and logged model) per network, continued when an earlier attempt was killed;
Ray Train's rank 0 logs the epochs into it (`pipelines.train_worker`), and `finish` adds the
test loss of the final weights, registers them and writes the step's marker, last.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pyarrow as pa
import torch

from components.config import to_dict
from components.data.shards import ShardStore
from components.models import build_network
from components.storage import Location
from components.tasks import Task, channels_for
from components.training import iter_batches, nanmean, per_image_losses
from components.transfer.features import load_state_dict
from pipelines.config import PipelineConfig
from pipelines.results import TaskResult
from pipelines.steps import Step
from pipelines.tracking import CHAMPION, NetworkSpec, Tracker


@dataclass(frozen=True)
class Network:
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


@dataclass(frozen=True)
class NetworkRecord:
    """Where Stage I's networks are recorded: the tracker and the invocation's parent run."""

    config: PipelineConfig
    store: ShardStore
    tracker: Tracker
    parent_run_id: str

    def open(self, task: Task, hparams: dict, step: Step) -> Network:
        """The network's MLflow run: an earlier attempt's (KILLED or FAILED by now) continued."""
        run_file = step.location / "mlflow_run.json"
        if run_file.exists():
            ids = run_file.read_json()
            run_id = self.tracker.reopen_run(ids["run_id"], self.parent_run_id)
            model_id = ids.get("model_id") or self.tracker.create_logged_model(run_id, task.name)
            return Network(task, hparams, step, run_id, model_id)
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
                "model": to_dict(self.config.model),
                "train": to_dict(self.config.train),
                "data_version": self.store.data_version,
            },
        )
        return Network(task, hparams, step, run_id, model_id)

    def fail(self, network: Network) -> None:
        self.tracker.end_run(network.run_id, failed=True)

    def finish(self, network: Network) -> TaskResult:
        """Score the final weights on the test split, register them, and mark the network done.
        Each network reads only its own task's test columns: a run's networks together may need
        more of the test split than a driver should hold at once."""
        cfg, task, step = self.config, network.task, network.step
        channels = channels_for(task, self.store)
        model = build_network(task, cfg.model, cfg.data.size, channels)
        model.load_state_dict(load_state_dict(network.weights.uri))  # onto the CPU, weights only
        test = self.store.read("test", task.columns)
        ids, losses = per_image_losses(model, iter_batches(test, 256), task, torch.device("cpu"))
        (step.location / "test_losses.parquet").write_parquet(
            pa.table({"image_id": ids.astype(str), "loss": losses})
        )
        test_loss = nanmean(losses)
        # The model's metrics are its epochs' (rank 0 logs them to the run and the model), the
        # last one's shown, plus the test loss of the saved weights at the last epoch's step.
        spec = NetworkSpec(task, cfg.model, cfg.data.size, channels)  # weights only, no pickle
        registered = f"taskatlas-{task.name}"
        version = self.tracker.log_task_network(
            network.run_id,
            network.model_id,
            model.state_dict(),
            spec,
            registered,
            metrics={"final_test_loss": test_loss},
            step=cfg.train.epochs - 1,
            version_tags={
                "task": task.name,
                "final_test_loss": f"{test_loss:.6g}",
                "data_version": self.store.data_version,
                "config_hash": step.key,
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
        self.tracker.end_run(network.run_id)
        done = TaskResult(
            task.name, step.key, network.weights.uri, test_loss, network.hparams, network.run_id, version
        )
        step.finish(asdict(done))
        return done

    def log_search(self, task: Task, results: list, hparams: dict, best_loss: float) -> None:
        """A task's search as a run with a nested run per trial (its epochs' losses)."""
        tracker = self.tracker
        run = tracker.start_run(f"tune/{task.name}", self.parent_run_id, {"task": task.name, "stage": "tune"})
        tracker.log_params(run, {"best": hparams, "tune": to_dict(self.config.tune)})
        for result in results:
            trial = tracker.start_run(
                f"tune/{task.name}/{result.metrics.get('trial_id')}", run, {"task": task.name}
            )
            tracker.log_params(trial, {k: result.config[k] for k in ("lr", "weight_decay", "batch_size")})
            df = result.metrics_dataframe
            rows = []
            if df is not None:
                for _, row in df.iterrows():
                    rows += [(m, float(row[m]), int(row["epoch"])) for m in ("val_loss", "train_loss")]
            tracker.log_history(trial, rows)
            stopped = int(result.metrics.get("epoch", 0)) < self.config.tune.max_epochs
            tracker.set_tags(trial, {"stopped_early": str(stopped).lower()})
            tracker.end_run(trial, failed=result.error is not None)
        tracker.log_metrics(run, {"best_val_loss": best_loss})
        tracker.end_run(run)
