"""The scheduler that lets every task's search share one Tuner (ASHA within each task only), and
which trial a search takes as its best."""

import time
from types import SimpleNamespace

import pandas as pd
from mlflow.tracking import MlflowClient
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from components.data.shards import ShardStore
from pipelines.config import load_pipeline_config
from pipelines.hparams import HParams
from pipelines.invocation import open_tracker
from pipelines.stage1.plan import Stage1Plan
from pipelines.stage1.record import NetworkRecord
from pipelines.stage1.search import finish_search
from pipelines.stage1.trial import TASK_KEY, PerTaskASHA
from pipelines.steps import unfenced
from tests.study import write_study


def trial(task: str, n: int):
    return SimpleNamespace(trial_id=f"{task}{n}", config={TASK_KEY: task})  # what ASHA reads of a Trial


def decisions(scheduler, results):
    scheduler.set_search_properties("val_loss", "min")
    out = {}
    for t, _ in results:
        scheduler.on_trial_add(None, t)
    for t, loss in results:
        out[t.trial_id] = scheduler.on_trial_result(None, t, {"epoch": 1, "val_loss": loss})
    return out


def test_each_tasks_trials_race_only_each_other():
    # Task a's losses are around 100, task b's around 1: the worse of each pair is stopped at the
    # first rung. One ASHA over both would keep b's worse trial (2 beats a's median of 100).
    results = [(trial("a", 1), 100.0), (trial("b", 1), 1.0), (trial("a", 2), 200.0), (trial("b", 2), 2.0)]
    args = {"time_attr": "epoch", "max_t": 4, "grace_period": 1, "reduction_factor": 2}
    per_task = decisions(PerTaskASHA(**args), results)
    assert per_task == {
        "a1": TrialScheduler.CONTINUE,
        "b1": TrialScheduler.CONTINUE,
        "a2": TrialScheduler.STOP,
        "b2": TrialScheduler.STOP,
    }
    shared = decisions(AsyncHyperBandScheduler(**args), results)
    assert shared["b2"] == TrialScheduler.CONTINUE


def test_metric_and_mode_are_taken_once():
    scheduler = PerTaskASHA(time_attr="epoch", max_t=2, grace_period=1, reduction_factor=2)
    assert scheduler.set_search_properties("val_loss", "min")
    assert not scheduler.set_search_properties("val_loss", "min")  # Tune refuses a second setting


def tune_result(trial_id: str, lr: float, val_losses: list[float]):
    """A finished Tune trial as `ResultGrid` gives it: `metrics` is its last report."""
    epochs = list(range(1, len(val_losses) + 1))
    return SimpleNamespace(
        metrics={"trial_id": trial_id, "epoch": epochs[-1], "val_loss": val_losses[-1]},
        config={"lr": lr, "weight_decay": 1e-5, "batch_size": 16},
        metrics_dataframe=pd.DataFrame(
            {"epoch": epochs, "val_loss": val_losses, "train_loss": [1.0] * len(epochs)}
        ),
        error=None,
    )


def test_the_best_trial_is_the_one_that_ended_lowest_in_done_json_and_the_tune_run(tmp_path, tiny_dataset):
    # Regression (issue 40): tune/curvature took trial 00015, best at epoch 1 (0.1816) but ending
    # at 0.1916, over 00006, which ended at 0.1840; the run table showed the finals.
    cfg = load_pipeline_config(str(write_study(tmp_path / "tiny.yaml", tmp_path / "runs")), [])
    store = ShardStore(tiny_dataset)
    tracker = open_tracker(cfg)
    record = NetworkRecord(cfg, store, tracker, tracker.start_run("run tiny"), unfenced)
    plan, task = Stage1Plan(cfg, store), cfg.task("normal")
    results = [
        tune_result("00015", 1e-3, [0.1816, 0.1916]),  # the lowest at any epoch, not at its end
        tune_result("00006", 2e-3, [0.2500, 0.1840]),
        tune_result("00003", 3e-3, [0.3000]),  # stopped early by ASHA
        tune_result("00009", 4e-3, [float("nan"), float("nan")]),  # diverged: never the best
    ]
    now = time.time()
    hparams = finish_search(
        plan.search_step(task), record, task, results, [(now - 2, now - 1)] * 4, (now - 3, now)
    )

    assert hparams == HParams(lr=2e-3, weight_decay=1e-5, batch_size=16)
    done = plan.search_step(task).info()
    assert (
        done["hparams"] == hparams.to_json() and plan.cached_hparams(task) == hparams
    )  # what training reads
    client = MlflowClient(tracker.tracking_uri)
    ids = [tracker.experiment_id, tracker.companion("trials")]  # a search, its trials
    runs = {r.info.run_name: r for r in client.search_runs(ids)}
    search = runs["tune/normal"]
    finals = {  # what the run table shows of each trial: its last val_loss
        name.rsplit("/", 1)[1]: run.data.metrics["val_loss"]
        for name, run in runs.items()
        if name.startswith("tune/normal/") and run.data.metrics["val_loss"] == run.data.metrics["val_loss"]
    }
    assert search.data.tags["best_trial"] == min(finals, key=finals.get) == "00006"
    assert search.data.metrics["best_val_loss"] == finals["00006"] == 0.1840
    assert float(search.data.params["best.lr"]) == 2e-3
