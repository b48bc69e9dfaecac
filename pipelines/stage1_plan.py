"""Stage I's plan: where each task's search and network live, and which are already done.

Pure reads of the config, the data version and the step markers: no tracker and no Ray. `run`,
`--dry-run`, `nightly` and `position` all ask these same questions (design.md section 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from components.config import config_hash
from components.data.shards import ShardStore
from components.errors import TaskatlasError
from components.tasks import Task
from pipelines.config import Loader, PipelineConfig
from pipelines.results import TaskResult
from pipelines.steps import Step


@dataclass(frozen=True)
class Stage1Plan:
    config: PipelineConfig
    store: ShardStore

    def search_step(self, task: Task) -> Step:
        cfg = self.config
        key = config_hash(task, cfg.model, cfg.tune, cfg.train.seed, self.store.data_version)
        return Step(cfg.root, f"tune/{task.name}", key)

    def cached_hparams(self, task: Task) -> dict | None:
        step = self.search_step(task)
        return step.info()["hparams"] if step.complete else None

    def default_hparams(self) -> dict:
        t = self.config.train
        return {"lr": t.lr, "weight_decay": t.weight_decay, "batch_size": t.batch_size}

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
            "loader": t.loader.value,
            "cache_in_memory": t.cache_in_memory and t.loader is Loader.RAY_DATA,
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

    def check_worker_rows(self, num_workers: int) -> None:
        """Before any work: every DDP worker trains on an equal share of the train split
        (`rank_rows`), so a split smaller than the worker count would leave a worker nothing."""
        rows = self.store.manifest.counts["train"]
        if rows < num_workers:
            raise TaskatlasError(
                f"train.num_workers: {num_workers} workers, but the train split has only {rows} "
                "images; every worker needs at least one"
            )


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
