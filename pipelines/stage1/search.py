"""Stage I's search: one Ray Tune Tuner for every pending task (see `pipelines.stage1.trial` for why
one), each task's best hyperparameters then a step of its own (`tune/<task>/<key>/`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from ray import tune
from ray.tune.search import BasicVariantGenerator

from components.config import config_hash, to_dict
from components.errors import TaskatlasError
from components.tasks import Task, channels_for
from pipelines.hparams import HParams
from pipelines.progress import progress_bar
from pipelines.ray_runtime import interrupts_kept
from pipelines.stage1.plan import Stage1Plan
from pipelines.stage1.record import NetworkRecord, record_search
from pipelines.stage1.trial import TASK_KEY, PerTaskASHA, tune_trial
from pipelines.steps import Step


class TrialProgress(tune.Callback):
    """Ticks the console's bar as each search trial ends (finished, stopped early or failed), and
    notes when each trial started and ended (epoch seconds, by trial id): its run's times."""

    def __init__(self, update: Callable[[int], None]):
        self.update = update
        self.started: dict[str, float] = {}
        self.ended: dict[str, float] = {}

    def __getstate__(self) -> dict:  # Tune saves its callbacks with the experiment: not the console
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__(lambda n: None)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.started.setdefault(trial.trial_id, time.time())

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.ended[trial.trial_id] = time.time()
        self.update(1)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.ended[trial.trial_id] = time.time()
        self.update(1)

    def span(self, result) -> tuple[float, float]:
        """When a trial's work started and ended: as seen here, else (a trial that finished before
        a restore) from what it reported: its last report's time less its total time."""
        trial_id = result.metrics.get("trial_id")
        end = self.ended.get(trial_id) or float(result.metrics.get("timestamp") or time.time())
        start = self.started.get(trial_id) or end - float(result.metrics.get("time_total_s") or 0.0)
        return start, max(end, start)


def final_val_loss(result) -> float | None:
    """A trial's validation loss at its last report, what its run shows; None if it reported
    none, or a NaN or infinite one."""
    loss = result.metrics.get("val_loss")
    return float(loss) if loss is not None and math.isfinite(loss) else None


def best_trial(results: list) -> tuple[Any, float] | None:
    """The trial that ended with the lowest validation loss, and that loss; None if none
    reported one. Tune's `ResultGrid.get_best_result("val_loss", "min", scope="last")`, per task
    (one grid holds every task's trials). Not scope "all" (the lowest at any epoch): a trial best
    at epoch 1 that ended worse was taken over one that ended lower, though networks are trained
    to their last epoch and the run table shows each trial's last value."""
    scored = [(loss, r) for r in results if (loss := final_val_loss(r)) is not None]
    if not scored:
        return None
    loss, best = min(scored, key=lambda pair: pair[0])
    return best, loss


def search_tasks(
    plan: Stage1Plan,
    record: NetworkRecord,
    tasks: list[Task],
    use_gpu: bool,
    search: int = 0,
    verbose: bool = False,
) -> dict[str, dict]:
    """Each task's best hyperparameters of its search `search` (`Stage1Plan.searches`): from the
    finished search, or from one Tuner that searches all the others at once, sampling with network
    replicate `search`'s seed; each task's search is then its own step."""
    cfg = plan.config
    found = {t.name: h for t in tasks if (h := plan.searched_hparams(t, search)) is not None}
    pending = [t for t in tasks if t.name not in found]
    if not pending:
        return found
    steps = {t.name: plan.search_step(t, search) for t in pending}
    storage = (cfg.root / "ray").uri
    name = f"tune-{config_hash(sorted((n, step.key) for n, step in steps.items()))}"
    resources = {"cpu": cfg.tune.cpus_per_trial, "gpu": cfg.tune.gpus_per_trial if use_gpu else 0}
    jobs = {t.name: {"task": to_dict(t), "channels": channels_for(t, plan.store)} for t in pending}
    trainable = tune.with_resources(tune.with_parameters(tune_trial, jobs=jobs), resources)
    with progress_bar(len(pending) * cfg.tune.num_samples, "search trials", unit="trial") as update:
        progress = TrialProgress(update)
        started = time.time()
        if tune.Tuner.can_restore(f"{storage}/{name}"):  # an interrupted search resumes
            tuner = tune.Tuner.restore(f"{storage}/{name}", trainable, resume_errored=True)
        else:
            tuner = _tuner(
                plan, pending, trainable, name, storage, use_gpu, progress, plan.seed(search), verbose
            )
        with interrupts_kept():
            grid = tuner.fit()
        ended = time.time()
    for task in pending:
        results = [r for r in grid if r.config[TASK_KEY] == task.name]
        spans = [progress.span(r) for r in results]
        search_span = (min([started, *(s for s, _ in spans)]), ended)
        found[task.name] = finish_search(steps[task.name], record, task, results, spans, search_span, search)
    return found


def finish_search(
    step: Step,
    record: NetworkRecord,
    task: Task,
    results: list,
    spans: list[tuple[float, float]],
    search_span: tuple[float, float],
    search: int = 0,
) -> HParams:
    """A task's search done: its trials (Tune's `results`, with their `spans`) and its best trial
    (`best_trial`) in its tune run, then in its step's marker (`done.json`, which a later run
    reuses as it is); its best hyperparameters, which its networks train with."""
    if (chosen := best_trial(results)) is None:
        raise TaskatlasError(f"every Ray Tune trial for {task.name} failed; the first: {results[0].error}")
    best, best_loss = chosen
    hparams = HParams.from_json(best.config)
    record_search(
        record.tracker,
        record.parent_run_id,
        record.config.tune,
        task,
        results,
        spans,
        best,
        best_loss,
        search_span,
        hparams,
        search,
    )
    trials = [
        {
            k: r.metrics.get(m)
            for k, m in (("trial_id", "trial_id"), ("epochs", "epoch"), ("val_loss", "val_loss"))
        }
        for r in results
    ]
    best_id = str(best.metrics.get("trial_id"))
    step.finish(
        {"hparams": hparams.to_json(), "best_trial": best_id, "best_val_loss": best_loss, "trials": trials},
        fence=record.fence,
    )
    return hparams


def _tuner(
    plan: Stage1Plan,
    pending: list[Task],
    trainable,
    name: str,
    storage: str,
    use_gpu: bool,
    progress: tune.Callback,
    seed: int,
    verbose: bool,
) -> tune.Tuner:
    cfg = plan.config
    space = {
        TASK_KEY: tune.grid_search([t.name for t in pending]),
        "lr": tune.loguniform(cfg.tune.lr_min, cfg.tune.lr_max),
        "weight_decay": tune.loguniform(cfg.tune.weight_decay_min, cfg.tune.weight_decay_max),
        "batch_size": tune.choice(list(cfg.tune.batch_sizes)),
        "model": to_dict(cfg.model),
        "image_size": cfg.data.size,
        "data_root": plan.store.root.uri,
        "holdout_fraction": cfg.tune.holdout_fraction,
        "max_train_images": cfg.tune.max_train_images,
        "max_epochs": cfg.tune.max_epochs,
        "seed": seed,
        "use_gpu": use_gpu,
    }
    scheduler = PerTaskASHA(
        time_attr="epoch",
        max_t=cfg.tune.max_epochs,
        grace_period=cfg.tune.grace_period,
        reduction_factor=cfg.tune.reduction_factor,
    )
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric="val_loss",
            mode="min",
            scheduler=scheduler,
            num_samples=cfg.tune.num_samples,
            # Seeded sampling: the same config searches the same points on a rerun.
            search_alg=BasicVariantGenerator(random_state=seed),
            reuse_actors=True,
        ),
        # Tune's trial tables only with -v: the console shows the answer, not the search
        run_config=tune.RunConfig(
            name=name, storage_path=storage, verbose=int(verbose), callbacks=[progress]
        ),
    )
