"""Tracking at scale: 3,000 readout runs logged by the pipeline's own code to a PostgreSQL-backed
`mlflow server`, against the serial way (one run after another, as the fan-out did).

    .venv/bin/python benchmarks/tracking_scale.py                   # about 3 minutes on 2 cores
    .venv/bin/python benchmarks/tracking_scale.py --server uvicorn --server-workers 1
    .venv/bin/python benchmarks/tracking_scale.py --readouts 10000 --server-workers 4

Starts PostgreSQL 15 and `mlflow server` on loopback (tests/services.py: the same helpers as the
tests), served as cluster/kubernetes/mlflow.yaml serves it: gunicorn, 2 workers of 4 threads
(MLflow's default uvicorn costs the server about 40% more CPU a request here), warms it up, then
logs synthetic readout outcomes (`ReadoutOutcome`s of Taskonomy-like readouts, every epoch's
train loss) to two fresh experiments:
- `seconds_per_1000_readouts`: --readouts outcomes through `pipelines.stage2.readout_runs.ReadoutRunLog`
  (buffered, flushed every --batch runs with `Tracker.log_finished_runs`), reading the known runs
  first, as Stage II does; goal under 30 s on this 2-core machine.
- `serial_seconds_per_1000`: --serial outcomes the old way, the same runs one after another:
  `start_run`, `log_history`, `end_run` (MLflow's `set_terminated` also fetches the run to print
  its URL: four requests a run).
Both are checked afterwards: every readout has exactly one FINISHED run. `rerun_read_s` is how long
the next invocation takes to learn that they are all logged (`known_readout_runs`). The server,
PostgreSQL and this client share the machine's cores. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from a checkout, installed or not

from components.tasks import TASKS  # noqa: E402
from components.transfer import Readout  # noqa: E402
from components.transfer.readout_files import ReadoutOutcome  # noqa: E402
from pipelines.stage2.readout_runs import ReadoutRunLog, known_readout_runs, readout_run  # noqa: E402
from pipelines.tracking.batches import LOG_THREADS  # noqa: E402
from pipelines.tracking.runs import Tracker  # noqa: E402
from tests.services import start_mlflow_server, start_postgres  # noqa: E402

STAGE_KEY = "bench0000stage"


def synthetic_outcomes(n: int, epochs: int) -> list[tuple[str, ReadoutOutcome]]:
    """`n` (readout key, outcome) pairs: first-, then second- and third-order readouts into every
    built-in task, each with a test, validation and per-epoch train loss, as a real readout has."""
    names = sorted(TASKS)
    readouts = (
        Readout(target, sources)
        for order in (1, 2, 3)
        for sources in itertools.combinations(names, order)
        for target in names
        if target not in sources or order == 1
    )
    out = []
    now = time.time()
    for i, r in enumerate(itertools.islice(readouts, n)):
        train = tuple(1.0 / (e + 1) + 0.001 * i for e in range(epochs))
        outcome = ReadoutOutcome(r, 0.1 + i * 1e-5, 2.5, train, 0.12, now - 30, now - 1)
        out.append((f"{i:06d}{r.file_id}", outcome))
    if len(out) < n:
        raise SystemExit(f"only {len(out)} distinct readouts over {len(names)} tasks")
    return out


def log_batched(tracker: Tracker, outcomes, batch: int) -> float:
    parent = tracker.start_run("transfer")
    start = time.perf_counter()
    with ReadoutRunLog(tracker, parent, STAGE_KEY, batch=batch) as log:  # reads the known runs first
        for key, outcome in outcomes:
            log.add(outcome, key)
    return time.perf_counter() - start


def log_serially(tracker: Tracker, outcomes) -> float:
    """The fan-out's former `_run_for` + `_log`: create, one batched write, close, per readout."""
    parent = tracker.start_run("transfer")
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # set_terminated prints each run's URL
        for key, outcome in outcomes:
            run = readout_run(outcome, key, STAGE_KEY)  # the same tags, params and metrics
            run_id = tracker.start_run(run.name, parent, run.tags, start_time=run.start_time)
            tracker.log_history(run_id, list(run.metrics), run.params)
            tracker.end_run(run_id, end_time=run.end_time)
    return time.perf_counter() - start


def check(tracker: Tracker, outcomes) -> float:
    """Every readout has one FINISHED run; returns how long reading them back took."""
    start = time.perf_counter()
    known = known_readout_runs(tracker)
    seconds = time.perf_counter() - start
    runs, token = 0, None
    while True:  # every run, duplicates included (the known runs keep one per readout)
        page = tracker.client.search_runs([tracker.experiment_id], "", max_results=1000, page_token=token)
        runs += sum("readout_key" in run.data.tags for run in page)
        if not (token := page.token):
            break
    assert runs == len(outcomes), (runs, len(outcomes))
    assert set(known) == {k for k, _ in outcomes}
    assert {status for _, status in known.values()} == {"FINISHED"}
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--readouts", type=int, default=3000)
    parser.add_argument("--serial", type=int, default=300, help="readouts logged the old way")
    parser.add_argument("--epochs", type=int, default=10, help="train_loss rows per readout run")
    parser.add_argument("--batch", type=int, default=100, help="ReadoutRunLog's batch size")
    parser.add_argument("--server", choices=["gunicorn", "uvicorn"], default="gunicorn")
    parser.add_argument("--server-workers", type=int, default=2, help="mlflow server --workers")
    parser.add_argument("--server-threads", type=int, default=4, help="threads per gunicorn worker")
    args = parser.parse_args()

    outcomes = synthetic_outcomes(args.readouts + args.serial, args.epochs)
    batched_outcomes, serial_outcomes = outcomes[: args.readouts], outcomes[args.readouts :]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp, start_postgres() as pg:
        database = pg.create_database("mlflow")
        started = time.perf_counter()
        extra = [f"--gunicorn-opts=--threads {args.server_threads}"] if args.server == "gunicorn" else []
        with start_mlflow_server(
            Path(tmp), database, Path(tmp) / "art", workers=args.server_workers, extra_args=extra
        ) as server:
            server_start_s = time.perf_counter() - started
            log_batched(Tracker(server.url, "warm-up"), synthetic_outcomes(60, args.epochs), args.batch)
            serial = Tracker(server.url, "serial")
            batched = Tracker(server.url, "batched")
            serial_s = log_serially(serial, serial_outcomes)
            check(serial, serial_outcomes)
            cpu = time.process_time()
            batched_s = log_batched(batched, batched_outcomes, args.batch)
            client_cpu_s = time.process_time() - cpu
            rerun_read_s = check(batched, batched_outcomes)

    per_1000 = batched_s / args.readouts * 1000
    serial_per_1000 = serial_s / args.serial * 1000
    print(
        f"{args.readouts} readout runs in {batched_s:.1f} s batched ({per_1000:.1f} s per 1000, "
        f"{LOG_THREADS} at a time); {args.serial} serially in {serial_s:.1f} s ({serial_per_1000:.1f} s per "
        f"1000): {serial_per_1000 / per_1000:.1f}x. Reading {args.readouts} known runs back: {rerun_read_s:.1f} s. "
        f"Load average before: {load_before:.1f} on {os.cpu_count()} cores."
    )
    print(
        json.dumps(
            {
                "seconds_per_1000_readouts": round(per_1000, 2),
                "serial_seconds_per_1000": round(serial_per_1000, 2),
                "speedup": round(serial_per_1000 / per_1000, 2),
                "readouts": args.readouts,
                "serial_readouts": args.serial,
                "batched_s": round(batched_s, 2),
                "serial_s": round(serial_s, 2),
                "rerun_read_s": round(rerun_read_s, 2),
                "client_cpu_s": round(client_cpu_s, 2),
                "server_start_s": round(server_start_s, 2),
                "threads": LOG_THREADS,
                "batch": args.batch,
                "server": args.server,
                "server_workers": args.server_workers,
                "server_threads": args.server_threads if args.server == "gunicorn" else None,
                "epochs": args.epochs,
                "load_avg_1m_before": round(load_before, 2),
                "cores": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
