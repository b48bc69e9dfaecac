"""Readout runs logged in batches (pipelines/stage2/readout_runs.py) and the tracker's batched API:
a run per candidate (its replicates as metrics) in the study's readouts experiment, under a run
per target in the study's experiment.

Against a real local SQLite store; the `slow` tests against a real `mlflow server` on PostgreSQL
(the `mlflow_pg_server` fixture), where runs go several at a time.

    .venv/bin/python -m pytest tests/test_readout_runs.py            # -m "not slow": SQLite only
"""

from __future__ import annotations

import math

import pytest

from components.transfer import Readout, ReadoutKind
from components.transfer.readout_files import ReadoutOutcome
from pipelines.analysis.record import candidates_markdown
from pipelines.stage2.readout_runs import (
    ReadoutRunLog,
    Replicate,
    candidate_run,
    known_readout_runs,
    readout_run_name,
)
from pipelines.tracking.batches import RunBatches
from pipelines.tracking.entities import FinalStatus, FinishedRun
from pipelines.tracking.runs import Tracker

STARTED, FINISHED = 1_700_000_000.25, 1_700_000_042.5  # epoch seconds


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (made once: its schema takes seconds); an experiment per test."""
    folder = tmp_path_factory.mktemp("readout-runs")
    Tracker(f"sqlite:///{folder / 'mlflow.db'}", "first", artifact_location=(folder / "art").as_uri())
    return folder


def _tracker(store, request) -> Tracker:
    return Tracker(
        f"sqlite:///{store / 'mlflow.db'}",
        request.node.name,
        artifact_location=(store / "art").as_uri(),
        run_tags={"taskatlas.storage_root": str(store)},
    )


@pytest.fixture
def tracker(store, request):
    return _tracker(store, request)


def _outcome(
    target: str = "normal",
    sources: tuple[str, ...] = ("depth",),
    epochs: int = 3,
    val=0.4,
    replicate=0,
    late=0.0,
):
    r = Readout(target, sources, replicate=replicate)
    train = tuple(1.0 / (e + 1) for e in range(epochs))
    return ReadoutOutcome(r, 0.25 + replicate, 3.5, train, val, STARTED + late, FINISHED + late)


def _readout_runs(tracker: Tracker) -> list:
    """The candidate runs, in the readouts experiment."""
    return tracker.client.search_runs(
        [tracker.companion("readouts")], "tags.candidate_key LIKE '%'", max_results=1000
    )


def _candidates(tracker: Tracker) -> dict:
    return {r.data.tags["candidate_key"]: r for r in _readout_runs(tracker)}


def _history(tracker: Tracker, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in tracker.client.get_metric_history(run_id, key))


# ---------------------------------------------------------------- candidate_run: what a candidate's run holds


def test_a_candidate_run_holds_each_replicates_figures_as_its_own_metrics():
    reps = [
        Replicate(_outcome("normal", ("depth", "edge_texture"), replicate=k, late=k), f"rk{k}", "ck")
        for k in (0, 1)
    ]
    run = candidate_run(reps, "stage9", "target-run")
    assert run.name == "normal <- depth+edge_texture" == readout_run_name(reps[1].outcome.readout)
    assert dict(run.tags) == {
        "stage": "transfer",
        "key": "stage9",
        "candidate_key": "ck",
        "readout": "normal <- depth+edge_texture",  # as the run is named (regression: source first)
        "target": "normal",
        "sources": "depth+edge_texture",
        "kind": "transfer",
        "readout_key.r0": "rk0",
        "readout_key.r1": "rk1",
    }
    assert dict(run.params) == {
        "target": "normal",
        "sources": "depth+edge_texture",
        "order": "2",
        "kind": "transfer",
    }
    assert run.parent_run_id == "target-run"  # its target's run
    assert list(run.metrics) == [
        ("test_loss/r0", 0.25, 2),  # scores at the last epoch (0-based)
        ("seconds/r0", 3.5, 2),
        ("val_loss/r0", 0.4, 2),
        ("train_loss/r0", 1.0, 0),
        ("train_loss/r0", 0.5, 1),
        ("train_loss/r0", 1 / 3, 2),
        ("test_loss/r1", 1.25, 2),
        ("seconds/r1", 3.5, 2),
        ("val_loss/r1", 0.4, 2),
        ("train_loss/r1", 1.0, 0),
        ("train_loss/r1", 0.5, 1),
        ("train_loss/r1", 1 / 3, 2),
        ("replicates", 2, 2),
    ]
    # the run spans its replicates' work: the first's start to the last's end
    assert (run.start_time, run.end_time, run.status, run.run_id) == (
        STARTED,
        FINISHED + 1,
        FinalStatus.FINISHED,
        None,
    )


def test_a_later_replicate_adds_to_its_candidates_run_and_counts_what_it_held():
    run = candidate_run(
        [Replicate(_outcome(replicate=2), "rk2", "ck")], "s", "t", finished_before=2, run_id="r9"
    )
    assert run.run_id == "r9" and ("replicates", 3, 3) in run.metrics
    assert run.tags["readout_key.r2"] == "rk2" and "test_loss/r2" in {m[0] for m in run.metrics}


def test_a_candidate_run_leaves_out_a_nan_val_loss_and_a_baseline_is_its_kind():
    r = Readout("normal", ("pixels",), ReadoutKind.PIXELS)
    run = candidate_run([Replicate(ReadoutOutcome(r, 0.5, 1.0, (0.9,), float("nan")), "rk", "ck")], "s", "t")
    assert [m[0] for m in run.metrics] == ["test_loss/r0", "seconds/r0", "train_loss/r0", "replicates"]
    assert run.tags["kind"] == run.params["kind"] == "pixels" and run.params["order"] == "1"
    assert run.start_time > 0 and run.end_time > 0  # no times in the outcome: now


def test_a_failed_replicate_carries_its_error_and_no_metrics_and_a_candidate_with_none_finished_fails():
    failed = candidate_run([Replicate(_outcome(), "rk", "ck", error="ValueError: boom")], "s", "t")
    assert failed.status is FinalStatus.FAILED and failed.tags["error.r0"] == "ValueError: boom"
    assert list(failed.metrics) == [("replicates", 0, 0)] and failed.tags["readout_key.r0"] == "rk"
    mixed = candidate_run(
        [Replicate(_outcome(), "rk0", "ck"), Replicate(_outcome(replicate=1), "rk1", "ck", error="x")],
        "s",
        "t",
    )
    assert mixed.status is FinalStatus.FINISHED and mixed.tags["error.r1"] == "x"
    assert ("replicates", 1, 1) in mixed.metrics and "test_loss/r1" not in {m[0] for m in mixed.metrics}


# ---------------------------------------------------------------- RunBatches.log_finished_runs


def test_log_finished_runs_logs_every_run_whole_under_its_parent(tracker):
    parent = tracker.start_run("transfer")
    runs = [
        FinishedRun(
            f"t <- s{i}",
            {"i": str(i)},
            {"p": f"v{i}"},
            [("loss", 0.1 * i, 0), ("loss", 0.05 * i, 1)],
            STARTED,
            FINISHED,
        )
        for i in range(5)
    ] + [
        FinishedRun(
            "t <- bad", {"error": "x"}, start_time=STARTED, end_time=FINISHED, status=FinalStatus.FAILED
        )
    ]
    ids = tracker.batches.log_finished_runs(parent, runs)
    assert len(set(ids)) == 6
    for i, run_id in enumerate(ids[:5]):
        run = tracker.client.get_run(run_id)
        assert run.info.run_name == f"t <- s{i}" and run.info.status == "FINISHED"
        assert (run.info.start_time, run.info.end_time) == (int(STARTED * 1000), int(FINISHED * 1000))
        assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["i"] == str(i)
        assert run.data.tags["taskatlas.storage_root"] == tracker.run_tags["taskatlas.storage_root"]
        assert run.data.params == {"p": f"v{i}"}
        assert _history(tracker, run_id, "loss") == [(0, 0.1 * i), (1, 0.05 * i)]
    bad = tracker.client.get_run(ids[5])
    assert bad.info.status == "FAILED" and bad.data.tags["error"] == "x" and not bad.data.metrics


def test_log_finished_runs_completes_a_run_created_earlier_instead_of_making_another(tracker):
    parent = tracker.start_run("transfer")
    earlier = tracker.start_run("t <- s", parent, {"readout_key": "k"}, start_time=STARTED)
    [run_id] = tracker.batches.log_finished_runs(
        parent,
        [
            FinishedRun(
                "t <- s", {"readout_key": "k"}, {"p": "1"}, [("loss", 0.5, 0)], 0, FINISHED, run_id=earlier
            )
        ],
    )
    found = tracker.client.search_runs([tracker.experiment_id], "tags.readout_key = 'k'")
    assert run_id == earlier and len(found) == 1
    run = tracker.client.get_run(earlier)
    assert run.info.status == "FINISHED" and run.info.start_time == int(STARTED * 1000)  # its start stays
    assert run.info.end_time == int(FINISHED * 1000) and run.data.params == {"p": "1"}


def test_end_runs_ends_runs_created_earlier(tracker):
    ids = [tracker.start_run(f"r{i}") for i in range(3)]
    tracker.batches.end_runs(ids, FinalStatus.KILLED, end_time=FINISHED)
    for run_id in ids:
        info = tracker.client.get_run(run_id).info
        assert (info.status, info.end_time) == ("KILLED", int(FINISHED * 1000))


def test_log_finished_runs_makes_new_runs_in_the_experiment_it_is_given(tracker):
    [run_id] = tracker.batches.log_finished_runs(
        None,
        [FinishedRun("t <- s", start_time=STARTED, end_time=FINISHED)],
        experiment_id=tracker.companion("readouts"),
    )
    run = tracker.client.get_run(run_id)
    assert run.info.experiment_id == tracker.companion("readouts")
    experiment = tracker.client.get_experiment(tracker.companion("readouts"))
    assert experiment.name == f"{tracker.experiment_name}/readouts"
    assert "one run per candidate" in experiment.tags["mlflow.note.content"]


# ---------------------------------------------------------------- ReadoutRunLog


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_log_buffers_readouts_and_logs_them_every_batch_and_at_close(tracker):
    parent = tracker.start_run("transfer")
    clock = _Clock()
    log = ReadoutRunLog(tracker, parent, "stage1", batch=3, seconds=60, clock=clock)
    outcomes = [_outcome("normal", (f"s{i}",)) for i in range(7)]
    for i, o in enumerate(outcomes[:5]):
        log.add(o, f"rk{i}", f"c{i}")
    assert log.pending == 2 and len(_readout_runs(tracker)) == 3  # one batch of 3 went out
    log.add(outcomes[5], "rk5", "c5")
    assert log.pending == 0 and len(_readout_runs(tracker)) == 6
    with log:
        log.add(outcomes[6], "rk6", "c6")
        assert log.pending == 1
    assert log.pending == 0  # closed: flushed
    runs = _candidates(tracker)
    assert sorted(runs) == [f"c{i}" for i in range(7)] and all(log.logged(f"rk{i}") for i in range(7))
    one = runs["c4"]
    assert one.info.run_name == "normal <- s4" and one.info.status == "FINISHED"
    assert one.info.experiment_id == tracker.companion("readouts") != tracker.experiment_id
    assert one.data.tags["key"] == "stage1" and one.data.tags["readout_key.r0"] == "rk4"
    assert one.data.metrics == {
        "test_loss/r0": 0.25,
        "seconds/r0": 3.5,
        "val_loss/r0": 0.4,
        "train_loss/r0": 1 / 3,
        "replicates": 1,
    }
    assert _history(tracker, one.info.run_id, "train_loss/r0") == [(0, 1.0), (1, 0.5), (2, 1 / 3)]
    assert one.data.params == {"target": "normal", "sources": "s4", "order": "1", "kind": "transfer"}
    assert (one.info.start_time, one.info.end_time) == (int(STARTED * 1000), int(FINISHED * 1000))
    # its parent: the target's run, a child of the stage run in the study's experiment, ended at
    # the last readout's end; one target run however many batches
    target = tracker.client.get_run(one.data.tags["mlflow.parentRunId"])
    assert target.info.run_name == "transfer/normal" and target.info.experiment_id == tracker.experiment_id
    assert target.data.tags["mlflow.parentRunId"] == parent and target.data.tags["stage"] == "transfer_target"
    assert target.info.status == "FINISHED" and target.info.end_time == int(FINISHED * 1000)
    assert {r.data.tags["mlflow.parentRunId"] for r in runs.values()} == {target.info.run_id}
    assert log.targets == {"normal": target.info.run_id}


def test_every_replicate_of_a_candidate_lands_on_its_one_run_across_batches_and_logs(tracker):
    """Replicate 0 in one batch, replicates 1 and 2 (a racing round) in a later log: one run,
    three replicates' metrics, its end time the last replicate's."""
    parent = tracker.start_run("transfer")
    with ReadoutRunLog(tracker, parent, "s") as log:
        log.add(_outcome(sources=("depth",)), "rk0", "c")
        log.add(_outcome("depth", ("normal",)), "other", "d")
    with ReadoutRunLog(tracker, parent, "s") as log:
        log.add(_outcome(sources=("depth",), replicate=1, late=10), "rk1", "c")
        log.add(_outcome(sources=("depth",), replicate=2, late=20), "rk2", "c")
    runs = _candidates(tracker)
    assert len(runs) == 2
    run = runs["c"]
    assert run.data.metrics["replicates"] == 3
    assert [run.data.metrics[f"test_loss/r{k}"] for k in range(3)] == [0.25, 1.25, 2.25]
    assert {run.data.tags[f"readout_key.r{k}"] for k in range(3)} == {"rk0", "rk1", "rk2"}
    assert (run.info.start_time, run.info.end_time) == (int(STARTED * 1000), int((FINISHED + 20) * 1000))
    targets = tracker.client.search_runs([tracker.experiment_id], "tags.stage = 'transfer_target'")
    assert sorted(t.info.run_name for t in targets) == ["transfer/depth", "transfer/normal"]
    assert known_readout_runs(tracker).replicates == {
        "rk0": (run.info.run_id, "FINISHED"),
        "rk1": (run.info.run_id, "FINISHED"),
        "rk2": (run.info.run_id, "FINISHED"),
        "other": (runs["d"].info.run_id, "FINISHED"),
    }


def test_the_log_flushes_when_its_oldest_run_waited_long_enough(tracker):
    clock = _Clock()
    log = ReadoutRunLog(tracker, tracker.start_run("transfer"), "s", batch=100, seconds=5, clock=clock)
    log.add(_outcome(sources=("a",)), "ka", "ca")
    clock.now = 4.9
    assert not log.flush_if_due() and log.pending == 1
    clock.now = 5.0
    log.add(_outcome(sources=("b",)), "kb", "cb")  # the oldest waited 5 s: both go
    assert log.pending == 0 and len(_readout_runs(tracker)) == 2


def test_a_failed_readout_is_logged_failed_with_its_error_and_a_rerun_completes_it(tracker):
    parent = tracker.start_run("transfer")
    with ReadoutRunLog(tracker, parent, "s") as log:
        log.add_failure(Readout("normal", ("depth",)), "kf", "cf", "RuntimeError: injected")
    [run] = _readout_runs(tracker)
    assert run.info.status == "FAILED" and run.data.tags["error.r0"] == "RuntimeError: injected"
    assert run.info.run_name == "normal <- depth" and run.data.metrics == {"replicates": 0}
    assert known_readout_runs(tracker).replicates == {"kf": (run.info.run_id, "FAILED")}
    with ReadoutRunLog(tracker, parent, "s") as log:
        assert not log.logged("kf")
        log.add(_outcome(), "kf", "cf")
    [again] = _readout_runs(tracker)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert again.data.metrics["replicates"] == 1 and again.data.metrics["test_loss/r0"] == 0.25


def test_a_rerun_logs_nothing_twice_and_finishes_what_a_killed_driver_left(tracker):
    """First driver: logs c0 and c1, made c2's run and died before its metrics went (RUNNING), and
    c3's run was marked KILLED by the next driver's start. The rerun logs all of them again: c0 and
    c1 are skipped, c2 and c3 are completed in their runs, c4 is new; the target run is reused."""
    first = tracker.start_run("transfer")
    with ReadoutRunLog(tracker, first, "s") as log:
        log.add(_outcome(sources=("s0",)), "rk0", "c0")
        log.add(_outcome(sources=("s1",)), "rk1", "c1")
    target = log.targets["normal"]
    left = {
        c: tracker.client.create_run(
            tracker.companion("readouts"),
            tags={"candidate_key": c, "readout_key.r0": k, "mlflow.parentRunId": target},
        ).info.run_id
        for c, k in [("c2", "rk2"), ("c3", "rk3")]
    }
    tracker.batches.end_runs([left["c3"]], FinalStatus.KILLED)
    before = {c: r.info.run_id for c, r in _candidates(tracker).items()}

    log = ReadoutRunLog(tracker, first, "s")
    assert log.logged("rk0") and log.logged("rk1") and not log.logged("rk2") and not log.logged("rk3")
    for i in range(5):
        log.add(_outcome(sources=(f"s{i}",)), f"rk{i}", f"c{i}")
    assert log.pending == 3  # rk0 and rk1 are on their runs already
    log.close()

    runs = _candidates(tracker)
    assert len(_readout_runs(tracker)) == 5  # one run per candidate
    assert all(r.info.status == "FINISHED" and r.data.metrics["replicates"] == 1 for r in runs.values())
    for c in ("c0", "c1", "c2", "c3"):
        assert runs[c].info.run_id == before[c]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs.values()} == {target}
    assert log.targets == {"normal": target}
    assert log.known == {f"rk{i}": (runs[f"c{i}"].info.run_id, "FINISHED") for i in range(5)}


class _FailingOnce(RunBatches):
    """Logs the first run of its first batch, then the tracking server 'goes away'."""

    failed = False

    def log_finished_runs(self, parent_run_id, runs, threads=8, experiment_id=None):
        if not self.failed:
            self.failed = True
            super().log_finished_runs(parent_run_id, runs[:1], experiment_id=experiment_id)
            raise ConnectionError("tracking server unreachable")
        return super().log_finished_runs(parent_run_id, runs, threads, experiment_id)


def test_a_failed_flush_keeps_its_runs_and_the_retry_duplicates_none(store, request):
    tracker = _tracker(store, request)
    tracker.batches = _FailingOnce(tracker)
    log = ReadoutRunLog(tracker, tracker.start_run("transfer"), "s", batch=3)
    log.add(_outcome(sources=("a",)), "ka", "ca")
    log.add(_outcome(sources=("b",)), "kb", "cb")
    with pytest.raises(ConnectionError):
        log.add(_outcome(sources=("c",)), "kc", "cc")
    assert log.pending == 3
    log.flush()
    runs = _readout_runs(tracker)
    assert sorted(r.data.tags["readout_key.r0"] for r in runs) == ["ka", "kb", "kc"]
    assert all(r.info.status == "FINISHED" for r in runs)


# ---------------------------------------------------------------- against a PostgreSQL-backed server


@pytest.mark.timeout(300)
def test_hundreds_of_readouts_reach_a_postgres_backed_server_whole(mlflow_pg_server):
    tracker = Tracker(mlflow_pg_server.url, "readouts-pg")
    parent = tracker.start_run("transfer")
    targets = ("normal", "depth", "reshading", "edge_texture")
    outcomes = {
        (f"{t}-{i}-r{k}", f"{t}-{i}"): _outcome(t, (f"src{i:03d}",), epochs=4, replicate=k)
        for t in targets
        for i in range(40)
        for k in range(2)
    }
    with ReadoutRunLog(tracker, parent, "stage-pg", batch=100) as log:
        for (key, candidate), outcome in outcomes.items():
            log.add(outcome, key, candidate)
        log.add_failure(Readout("normal", ("broken",)), "failed-one", "broken", "RuntimeError: injected")

    known = known_readout_runs(tracker)
    assert len(known.replicates) == len(outcomes) + 1 and len(known.candidates) == len(outcomes) // 2 + 1
    assert known.replicates["failed-one"][1] == "FAILED"
    assert {status for key, (_, status) in known.replicates.items() if key != "failed-one"} == {"FINISHED"}
    runs = {r.data.tags["candidate_key"]: r for r in _readout_runs(tracker)}
    assert len(runs) == len(outcomes) // 2 + 1
    for (_key, candidate), o in outcomes.items():
        run = runs[candidate]
        assert run.info.run_name == readout_run_name(o.readout) and run.data.tags["key"] == "stage-pg"
        assert run.data.params["sources"] == o.readout.sources[0] and run.data.metrics["replicates"] == 2
        k = o.readout.replicate
        assert run.data.metrics[f"test_loss/r{k}"] == 0.25 + k
        assert math.isclose(run.data.metrics[f"train_loss/r{k}"], 0.25)
        assert (run.info.start_time, run.info.end_time) == (int(STARTED * 1000), int(FINISHED * 1000))
    assert len(log.targets) == len(targets)

    # A rerun logs nothing: every replicate is on its run (the failed one is completed in its run).
    rerun = ReadoutRunLog(tracker, parent, "stage-pg")
    for (key, candidate), outcome in outcomes.items():
        rerun.add(outcome, key, candidate)
    assert rerun.pending == 0
    rerun.add(_outcome("normal", ("broken",)), "failed-one", "broken")
    rerun.close()
    assert known_readout_runs(tracker).replicates["failed-one"] == (
        known.replicates["failed-one"][0],
        "FINISHED",
    )


# ---------------------------------------------------------------- the target run's list


def test_a_target_runs_description_lists_its_candidates_best_first_linked_to_their_runs():
    nan = float("nan")
    rows = [
        (
            {"sources": ["normal"], "affinity": 0.2, "affinity_lo": 0.1, "affinity_hi": 0.3, "p_best": nan},
            "r1",
        ),
        ({"sources": ["depth", "edge"], "affinity": 0.5, "p_best": 0.75, "quality": 0.25, "gain": 1.0}, "r2"),
        ({"sources": ["self"], "affinity": 0.3, "quality": 0.5}, None),
    ]
    text = candidates_markdown("normal", rows, "7")
    table = [line for line in text.splitlines() if line.startswith("| ") and "sources" not in line]
    assert table == [
        "| [depth+edge](#/experiments/7/runs/r2) | 0.500 |  | 0.750 | 0.250 | 1.000 |",
        "| self | 0.300 |  |  | 0.500 |  |",  # no run named: no link; missing figures blank
        "| [normal (own encoder)](#/experiments/7/runs/r1) | 0.200 | 0.100-0.300 |  |  |  |",
    ]
