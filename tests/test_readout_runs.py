"""Readout runs logged in batches (pipelines/stage2/readout_runs.py) and the tracker's batched API.

Against a real local SQLite store; the `slow` tests against a real `mlflow server` on PostgreSQL
(the `mlflow_pg_server` fixture), where runs go several at a time.

    .venv/bin/python -m pytest tests/test_readout_runs.py            # -m "not slow": SQLite only
"""

from __future__ import annotations

import math

import pytest

from components.transfer import Readout, ReadoutKind
from components.transfer.readout_files import ReadoutOutcome
from pipelines.stage2.readout_runs import ReadoutRunLog, known_readout_runs, readout_run, readout_run_name
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


def _outcome(target: str = "normal", sources: tuple[str, ...] = ("depth",), epochs: int = 3, val=0.4):
    r = Readout(target, sources)
    train = tuple(1.0 / (e + 1) for e in range(epochs))
    return ReadoutOutcome(r, 0.25, 3.5, train, val, STARTED, FINISHED)


def _readout_runs(tracker: Tracker) -> list:
    return tracker.client.search_runs([tracker.experiment_id], "tags.readout_key LIKE '%'", max_results=1000)


def _history(tracker: Tracker, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in tracker.client.get_metric_history(run_id, key))


# ---------------------------------------------------------------- readout_run: what a readout's run holds


def test_a_readout_run_holds_the_tags_params_metrics_and_times_of_the_fan_out():
    run = readout_run(_outcome("normal", ("depth", "edge_texture")), "rk1", "stage9")
    assert (
        run.name
        == "normal <- depth+edge_texture"
        == readout_run_name(Readout("normal", ("depth", "edge_texture")))
    )
    assert dict(run.tags) == {
        "stage": "transfer",
        "key": "stage9",
        "readout_key": "rk1",
        "readout": "normal <- depth+edge_texture",  # as the run is named (regression: source first)
        "target": "normal",
        "sources": "depth+edge_texture",
        "kind": "transfer",
        "replicate": "0",
    }
    assert dict(run.params) == {
        "target": "normal",
        "sources": "depth+edge_texture",
        "order": "2",
        "kind": "transfer",
        "replicate": "0",
    }
    assert list(run.metrics) == [
        ("test_loss", 0.25, 2),  # scores at the last epoch (0-based)
        ("seconds", 3.5, 2),
        ("val_loss", 0.4, 2),
        ("train_loss", 1.0, 0),
        ("train_loss", 0.5, 1),
        ("train_loss", 1 / 3, 2),
    ]
    assert (run.start_time, run.end_time, run.status, run.run_id) == (
        STARTED,
        FINISHED,
        FinalStatus.FINISHED,
        None,
    )


def test_a_replicates_run_is_named_and_tagged_with_its_replicate():
    r = Readout("normal", ("depth",), replicate=2)
    run = readout_run(ReadoutOutcome(r, 0.5, 1.0, (0.9,), 0.4), "rk", "s")
    assert run.name == "normal <- depth #2" == readout_run_name(r)
    assert run.tags["replicate"] == run.params["replicate"] == "2" and run.tags["readout"] == run.name


def test_a_readout_run_leaves_out_a_nan_val_loss_and_a_baseline_is_its_kind():
    r = Readout("normal", ("pixels",), ReadoutKind.PIXELS)
    run = readout_run(ReadoutOutcome(r, 0.5, 1.0, (0.9,), float("nan")), "rk", "s")
    assert [m[0] for m in run.metrics] == ["test_loss", "seconds", "train_loss"]
    assert run.tags["kind"] == run.params["kind"] == "pixels" and run.params["order"] == "1"
    assert run.start_time > 0 and run.end_time > 0  # no times in the outcome: now


def test_a_failed_readout_run_carries_the_error_and_no_metrics():
    run = readout_run(_outcome(), "rk", "s", error="ValueError: boom")
    assert run.status is FinalStatus.FAILED and run.tags["error"] == "ValueError: boom"
    assert not run.metrics and not run.params and run.tags["readout_key"] == "rk"


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
    assert run_id == earlier and len(_readout_runs(tracker)) == 1
    run = tracker.client.get_run(earlier)
    assert run.info.status == "FINISHED" and run.info.start_time == int(STARTED * 1000)  # its start stays
    assert run.info.end_time == int(FINISHED * 1000) and run.data.params == {"p": "1"}


def test_end_runs_ends_runs_created_earlier(tracker):
    ids = [tracker.start_run(f"r{i}") for i in range(3)]
    tracker.batches.end_runs(ids, FinalStatus.KILLED, end_time=FINISHED)
    for run_id in ids:
        info = tracker.client.get_run(run_id).info
        assert (info.status, info.end_time) == ("KILLED", int(FINISHED * 1000))


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
        log.add(o, f"rk{i}")
    assert log.pending == 2 and len(_readout_runs(tracker)) == 3  # one batch of 3 went out
    log.add(outcomes[5], "rk5")
    assert log.pending == 0 and len(_readout_runs(tracker)) == 6
    with log:
        log.add(outcomes[6], "rk6")
        assert log.pending == 1
    assert log.pending == 0  # closed: flushed
    runs = {r.data.tags["readout_key"]: r for r in _readout_runs(tracker)}
    assert sorted(runs) == [f"rk{i}" for i in range(7)] and all(log.logged(k) for k in runs)
    one = runs["rk4"]
    assert one.info.run_name == "normal <- s4" and one.info.status == "FINISHED"
    assert one.data.tags["mlflow.parentRunId"] == parent and one.data.tags["key"] == "stage1"
    assert one.data.metrics == {"test_loss": 0.25, "seconds": 3.5, "val_loss": 0.4, "train_loss": 1 / 3}
    assert _history(tracker, one.info.run_id, "train_loss") == [(0, 1.0), (1, 0.5), (2, 1 / 3)]
    assert one.data.params == {
        "target": "normal",
        "sources": "s4",
        "order": "1",
        "kind": "transfer",
        "replicate": "0",
    }
    assert (one.info.start_time, one.info.end_time) == (int(STARTED * 1000), int(FINISHED * 1000))


def test_the_log_flushes_when_its_oldest_run_waited_long_enough(tracker):
    clock = _Clock()
    log = ReadoutRunLog(tracker, tracker.start_run("transfer"), "s", batch=100, seconds=5, clock=clock)
    log.add(_outcome(sources=("a",)), "ka")
    clock.now = 4.9
    assert not log.flush_if_due() and log.pending == 1
    clock.now = 5.0
    log.add(_outcome(sources=("b",)), "kb")  # the oldest waited 5 s: both go
    assert log.pending == 0 and len(_readout_runs(tracker)) == 2


def test_a_failed_readout_is_logged_failed_with_its_error(tracker):
    parent = tracker.start_run("transfer")
    with ReadoutRunLog(tracker, parent, "s") as log:
        log.add_failure(Readout("normal", ("depth",)), "kf", "RuntimeError: injected")
    [run] = _readout_runs(tracker)
    assert run.info.status == "FAILED" and run.data.tags["error"] == "RuntimeError: injected"
    assert run.info.run_name == "normal <- depth" and not run.data.metrics
    assert known_readout_runs(tracker) == {"kf": (run.info.run_id, "FAILED")}


def test_a_rerun_logs_nothing_twice_and_finishes_what_a_killed_driver_left(tracker):
    """First driver: logs rk0 and rk1, creates rk2's run and dies before ending it (RUNNING), and
    rk3's run was marked KILLED by the next driver's start; rk4 failed. The rerun logs all five
    again: rk0 and rk1 are skipped, rk2, rk3 and rk4 are completed in their runs, rk5 is new."""
    first = tracker.start_run("transfer")
    with ReadoutRunLog(tracker, first, "s") as log:
        log.add(_outcome(sources=("s0",)), "rk0")
        log.add(_outcome(sources=("s1",)), "rk1")
        log.add_failure(Readout("normal", ("s4",)), "rk4", "boom")
    left = {
        k: tracker.start_run(f"normal <- {s}", first, {"readout_key": k})
        for k, s in [("rk2", "s2"), ("rk3", "s3")]
    }
    tracker.batches.end_runs([left["rk3"]], FinalStatus.KILLED)
    before = {r.data.tags["readout_key"]: r.info.run_id for r in _readout_runs(tracker)}

    second = tracker.start_run("transfer")
    log = ReadoutRunLog(tracker, second, "s")
    assert log.logged("rk0") and log.logged("rk1") and not log.logged("rk2") and not log.logged("rk4")
    for i in range(6):
        log.add(_outcome(sources=(f"s{i}",)), f"rk{i}")
    assert log.pending == 4  # rk0 and rk1 are FINISHED already
    log.close()

    runs = {r.data.tags["readout_key"]: r for r in _readout_runs(tracker)}
    assert len(_readout_runs(tracker)) == 6  # one run per readout
    assert all(r.info.status == "FINISHED" for r in runs.values())
    for key in ("rk0", "rk1", "rk2", "rk3", "rk4"):
        assert runs[key].info.run_id == before[key]
    assert runs["rk0"].data.tags["mlflow.parentRunId"] == first  # not logged again
    assert runs["rk2"].data.tags["mlflow.parentRunId"] == second  # completed by the rerun
    assert (
        runs["rk2"].data.metrics["test_loss"] == 0.25
        and runs["rk5"].data.tags["mlflow.parentRunId"] == second
    )
    assert log.known == {k: (r.info.run_id, "FINISHED") for k, r in runs.items()}


class _FailingOnce(RunBatches):
    """Logs the first run of its first batch, then the tracking server 'goes away'."""

    failed = False

    def log_finished_runs(self, parent_run_id, runs, threads=8):
        if not self.failed:
            self.failed = True
            super().log_finished_runs(parent_run_id, runs[:1])
            raise ConnectionError("tracking server unreachable")
        return super().log_finished_runs(parent_run_id, runs, threads)


def test_a_failed_flush_keeps_its_runs_and_the_retry_duplicates_none(store, request):
    tracker = _tracker(store, request)
    tracker.batches = _FailingOnce(tracker)
    log = ReadoutRunLog(tracker, tracker.start_run("transfer"), "s", batch=3)
    log.add(_outcome(sources=("a",)), "ka")
    log.add(_outcome(sources=("b",)), "kb")
    with pytest.raises(ConnectionError):
        log.add(_outcome(sources=("c",)), "kc")
    assert log.pending == 3
    log.flush()
    runs = _readout_runs(tracker)
    assert sorted(r.data.tags["readout_key"] for r in runs) == ["ka", "kb", "kc"]
    assert all(r.info.status == "FINISHED" for r in runs)


# ---------------------------------------------------------------- against a PostgreSQL-backed server


@pytest.mark.timeout(300)
def test_hundreds_of_readouts_reach_a_postgres_backed_server_whole(mlflow_pg_server):
    tracker = Tracker(mlflow_pg_server.url, "readouts-pg")
    parent = tracker.start_run("transfer")
    targets = ("normal", "depth", "reshading", "edge_texture")
    outcomes = {f"{t}-{i}": _outcome(t, (f"src{i:03d}",), epochs=4) for t in targets for i in range(60)}
    with ReadoutRunLog(tracker, parent, "stage-pg", batch=100) as log:
        for key, outcome in outcomes.items():
            log.add(outcome, key)
        log.add_failure(Readout("normal", ("broken",)), "failed-one", "RuntimeError: injected")

    known = known_readout_runs(tracker)
    assert len(known) == len(outcomes) + 1 == len({run_id for run_id, _ in known.values()})
    assert known["failed-one"][1] == "FAILED"
    assert {status for key, (_, status) in known.items() if key != "failed-one"} == {"FINISHED"}
    runs = tracker.client.search_runs(
        [tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=1000
    )
    assert len(runs) == len(outcomes) + 1
    for run in runs:
        key = run.data.tags["readout_key"]
        if key == "failed-one":
            continue
        o = outcomes[key]
        assert run.info.run_name == readout_run_name(o.readout) and run.data.tags["key"] == "stage-pg"
        assert run.data.params["sources"] == o.readout.sources[0]
        assert run.data.metrics["test_loss"] == 0.25 and math.isclose(run.data.metrics["train_loss"], 0.25)
        assert (run.info.start_time, run.info.end_time) == (int(STARTED * 1000), int(FINISHED * 1000))

    # A rerun logs nothing: every run is FINISHED (the failed one is completed in its run).
    rerun = ReadoutRunLog(tracker, parent, "stage-pg")
    for key, outcome in outcomes.items():
        rerun.add(outcome, key)
    assert rerun.pending == 0
    rerun.add(_outcome("normal", ("broken",)), "failed-one")
    rerun.close()
    assert known_readout_runs(tracker)["failed-one"] == (known["failed-one"][0], "FINISHED")
