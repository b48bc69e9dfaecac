"""Stage I's plan: where each task's search and networks live, and which are already done.

Pure reads of the config, the data version and the step markers: no tracker and no Ray. `run`,
`--dry-run`, `nightly` and `position` all ask these same questions (design.md section 1).

A task has `train.replicates` N networks: replicate 0 is the network of a study without
replicates (its key and seed, the one registered), replicate n > 0 the same network
trained again with a seed of its own (`network_seed`), a step of its own. Each replicate n has
a search of its own with that seed too (`tune.each_replicate`, the default), so the replicates
vary as whole reruns of Stage I do; otherwise all read replicate 0's search.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from components.config import config_hash
from components.data.shards import ShardStore
from components.errors import TaskatlasError
from components.seeds import replicate_seed
from components.tasks import Task
from pipelines.config import PipelineConfig
from pipelines.hparams import HParams
from pipelines.results import TaskResult
from pipelines.sections import PLAN, Loader, key_fields
from pipelines.steps import Step


@dataclass(frozen=True)
class Stage1Plan:
    config: PipelineConfig
    store: ShardStore

    def searches(self) -> range:
        """The searches each task has: one per network replicate (`tune.each_replicate`), or one."""
        return self.searches_of(self.config)

    @staticmethod
    def searches_of(config: PipelineConfig) -> range:
        return range(config.train.replicates if config.tune.each_replicate else 1)

    def search_of(self, replicate: int) -> int:
        """Which search network replicate `replicate` trains with."""
        return replicate if self.config.tune.each_replicate else 0

    def search_step(self, task: Task, search: int = 0) -> Step:
        """Search 0 keeps the key of a study without replicates; search n > 0 samples with
        replicate n's seed, and its number is in its key."""
        cfg = self.config
        parts = [task, cfg.model, key_fields(cfg.tune, PLAN), cfg.train.seed, self.store.data_version]
        if search:
            parts.append({"replicate": search, "seed": self.seed(search)})
        return Step(cfg.root, f"tune/{task.name}", config_hash(*parts))

    def searched_hparams(self, task: Task, search: int = 0) -> HParams | None:
        """What the task's search `search` chose, None while it has not run."""
        step = self.search_step(task, search)
        return HParams.from_json(step.info()["hparams"]) if step.complete else None

    def cached_hparams(self, task: Task, replicate: int = 0) -> HParams | None:
        """What network replicate `replicate` trains with, None while its search has not run."""
        return self.searched_hparams(task, self.search_of(replicate))

    def default_hparams(self) -> HParams:
        t = self.config.train
        return HParams(t.lr, t.weight_decay, t.batch_size)

    def hparams_if_known(self, task: Task, search: bool, replicate: int = 0) -> HParams | None:
        """The hyperparameters network replicate `replicate` would train with, or None while its
        search has not run."""
        if search and self.config.tune.enabled:
            return self.cached_hparams(task, replicate)
        return self.default_hparams()

    @property
    def replicates(self) -> int:
        return self.config.train.replicates

    def seed(self, replicate: int = 0) -> int:
        """The seed network replicate `replicate` trains with (`network_seed`)."""
        return network_seed(self.config.train.seed, replicate)

    def train_step(self, task: Task, hparams: HParams, replicate: int = 0) -> Step:
        """Keyed by everything that changes the trained model: the task's definition, model,
        hyperparameters, epochs, seed, data, and how it is trained (workers as configured, 0 for
        "one per GPU"; GPU or not; batches cached in memory or streamed). Replicate n > 0: its
        own seed, and its number (so it never shares a step with another study's replicate 0)."""
        cfg, t = self.config, self.config.train
        how = {
            "num_workers": t.num_workers,
            "use_gpu": t.use_gpu,
            "loader": t.loader.value,
            "cache_in_memory": t.cache_in_memory and t.loader is Loader.RAY_DATA,
        }
        parts = [task, cfg.model, hparams, t.epochs, self.seed(replicate), self.store.data_version, how]
        if replicate:  # replicate 0: the key of a study without replicates
            parts.append({"replicate": replicate})
        return Step(cfg.root, f"stage1/{task.name}", config_hash(*parts))

    def cached_result(self, task: Task, hparams: HParams, replicate: int = 0) -> TaskResult | None:
        step = self.train_step(task, hparams, replicate)
        return TaskResult.from_marker(step.info()) if step.complete else None

    def finished_networks(self, task: Task, search: bool = True) -> tuple[TaskResult | None, ...]:
        """Each of the task's N network replicates for the current settings, None where no run
        has made it yet (as while its search has not run)."""
        return tuple(
            None
            if (hparams := self.hparams_if_known(task, search, n)) is None
            else self.cached_result(task, hparams, n)
            for n in range(self.replicates)
        )

    def finished(self, task: Task, search: bool = True) -> TaskResult | None:
        """The task's trained network for the current settings (replicate 0, its replicates
        1..N-1 as `replicas`), if runs already made all N."""
        first, *rest = self.finished_networks(task, search)
        if first is None or None in rest:
            return None
        return replace(first, replicas=tuple(rest))

    def check_worker_rows(self, num_workers: int) -> None:
        """Before any work: every DDP worker trains on an equal share of the train split
        (`rank_rows`), so a split smaller than the worker count would leave a worker nothing."""
        rows = self.store.manifest.counts["train"]
        if rows < num_workers:
            raise TaskatlasError(
                f"train.num_workers: {num_workers} workers, but the train split has only {rows} "
                "images; every worker needs at least one"
            )


def network_seed(seed: int, replicate: int) -> int:
    """The seed of a task network's initialisation and batch order: `train.seed` for replicate 0
    (as in a study without replicates), one drawn from (seed, replicate) for the others, in a
    stream of its own (not the readouts' `readout_seed`, nor another task's: every task's
    replicate n shares it, as every task's replicate 0 shares `train.seed`)."""
    return replicate_seed(seed, replicate, "stage1-network")


def network_name(task: str, replicate: int = 0) -> str:
    """`normal` (replicate 0), `normal#1`: how logs, MLflow (`train/<name>`) and `--dry-run` call
    a network, as `Readout.name` calls a readout replicate."""
    return f"{task}#{replicate}" if replicate else task


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
