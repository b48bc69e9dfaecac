"""The scheduler that lets every task's search share one Tuner: ASHA within each task only."""

from types import SimpleNamespace

from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from pipelines.search import TASK_KEY, PerTaskASHA


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
