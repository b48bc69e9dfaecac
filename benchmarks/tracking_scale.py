"""Tracking at Taskonomy's scale: a study of 9,000 readouts logged by the pipeline's own code to a
PostgreSQL-backed `mlflow server`, then listed and opened in the MLflow UI as a researcher would.

    .venv/bin/python benchmarks/tracking_scale.py                   # about 4 minutes on 2 cores
    .venv/bin/python benchmarks/tracking_scale.py --readouts 3000 --no-browser

Starts PostgreSQL 15 and `mlflow server` on loopback (tests/services.py: the same helpers as the
tests), served as cluster/kubernetes/mlflow.yaml serves it: gunicorn, 2 workers of 4 threads. Then
logs, in the order a study runs, runs shaped like a Taskonomy study's (--tasks 26, one network a
task as configs/taskonomy-gpu.yaml trains, --network-replicates for more): a parent; per network a search
(`tune/<task>`, --trials trial runs under it in the trials experiment, as `record_search` logs
them) and a network (`train/<task>`); the `transfer`
stage; --readouts readout replicates (3 per candidate, first- then second- and third-order
candidates into every task) through `pipelines.stage2.readout_runs.ReadoutRunLog`, each candidate
one run in the readouts experiment under its `transfer/<target>` run; `affinity` and `taxonomy`.
Figures:
- `seconds_per_1000_readouts`: the readouts' logging (goal under 30 s on this 2-core machine).
- `rerun_read_s`: how long the next invocation takes to learn what is logged (`known_readout_runs`).
- `study_runs`, `candidate_runs`: runs in the study's experiment and in its readouts experiment.
- `first_page_stage_runs` of `stage_runs`: the stage runs (`tune/*`, `train/*`, `transfer/*`,
  `affinity`, `taxonomy`) among the runs the UI's first page loads, as its own request asks for
  them (the 100 newest, plus the parents of those; MLflow 3.17's bundle, `searchRuns`).
- `ui_study_first_page_s`, `ui_readouts_first_page_s`: headless Chromium (Debian `chromium`), from
  navigating to the experiment's page until its run table shows the parent run (the study) or a
  readout (the readouts experiment); skipped with --no-browser or without Chromium.
Everything is checked afterwards: every replicate on one FINISHED candidate run. The server,
PostgreSQL, Chromium and this client share the machine's cores. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from a checkout, installed or not

from components.tasks import TASKS  # noqa: E402
from components.transfer import Readout  # noqa: E402
from components.transfer.readout_files import ReadoutOutcome  # noqa: E402
from pipelines.stage2.readout_runs import ReadoutRunLog, known_readout_runs  # noqa: E402
from pipelines.tracking.batches import LOG_THREADS  # noqa: E402
from pipelines.tracking.entities import FinishedRun  # noqa: E402
from pipelines.tracking.runs import Tracker  # noqa: E402
from tests.services import start_mlflow_server, start_postgres  # noqa: E402

STAGE_KEY = "bench0000stage"
REPLICATES = 3
PAGE = 100  # runs MLflow's UI loads a page (its bundle's searchRuns default)


def task_names(n: int) -> list[str]:
    """`n` task names: the built-in tasks, then `extra_<i>` (Taskonomy studied 26)."""
    names = sorted(TASKS)
    return (names + [f"extra_{i:02d}" for i in range(n - len(names))])[:n]


def candidates(n: int, names: list[str]) -> list[Readout]:
    """`n` candidates: first-, then second- and third-order readouts into every task."""
    readouts = (
        Readout(target, sources)
        for order in (1, 2, 3)
        for sources in itertools.combinations(names, order)
        for target in names
        if target not in sources or order == 1
    )
    out = list(itertools.islice(readouts, n))
    if len(out) < n:
        raise SystemExit(f"only {len(out)} distinct candidates over {len(names)} tasks")
    return out


def replicates(readouts: list[Readout], epochs: int) -> list[tuple[str, str, ReadoutOutcome]]:
    """(readout key, candidate key, outcome) of every replicate, as the fan-out hands them over
    (a stack's replicates together), with times of now: they ran after the networks."""
    now, out = time.time(), []
    for i, r in enumerate(readouts):
        for k in range(REPLICATES):
            x = Readout(r.target, r.sources, replicate=k)
            train = tuple(1.0 / (e + 1) + 0.001 * i for e in range(epochs))
            outcome = ReadoutOutcome(x, 0.1 + i * 1e-5 + k * 1e-3, 2.5, train, 0.12, now, now + 30)
            out.append((f"{i:06d}{x.file_id}", f"{i:06d}", outcome))
    return out


def log_networks(
    tracker: Tracker, parent: str, tasks: list[str], replicates: int, trials: int, epochs: int
) -> list[str]:
    """Per network (a task's replicate n: `<task>#n`, n > 0) a search with `trials` trial runs
    under it, then the network: the runs Stage I leaves, in its order. Returns the stage runs'
    names."""
    networks = [f"{t}#{n}" if n else t for t in tasks for n in range(replicates)]
    names = []
    for task in networks:
        search = tracker.start_run(f"tune/{task}", parent, {"stage": "tune"})
        now = time.time() + 0.01  # its trials start after it
        rows = tuple(("val_loss", 1.0 / (e + 1), e + 1) for e in range(epochs))
        runs = [
            FinishedRun(f"tune/{task}/t{t}", {"stage": "trial"}, {"lr": "0.001"}, rows, now, now + 5)
            for t in range(trials)
        ]
        tracker.batches.log_finished_runs(search, runs, experiment_id=tracker.companion("trials"))
        tracker.end_run(search)
        names.append(f"tune/{task}")
    for task in networks:
        rows = tuple(("train_loss", 1.0 / (e + 1), e) for e in range(epochs))
        tracker.batches.log_finished_runs(
            parent, [FinishedRun(f"train/{task}", {"stage": "train"}, {}, rows)]
        )
        names.append(f"train/{task}")
    return names


def first_page(tracker: Tracker) -> list[str]:
    """The names the UI's first page holds: the 100 newest runs and the parents they name."""
    page = tracker.client.search_runs(
        [tracker.experiment_id], "", max_results=PAGE, order_by=["attributes.start_time DESC"]
    )
    ids = {r.info.run_id for r in page}
    parents = {r.data.tags.get("mlflow.parentRunId") for r in page} - ids - {None}
    return [r.info.run_name for r in page] + [tracker.client.get_run(p).info.run_name for p in parents]


async def page_load_seconds(url: str, expect: str, tmp: Path) -> float:
    """Seconds from navigating a fresh headless Chromium tab to `url` until it shows `expect`."""
    from tools.mlflow_screenshots import headless_page

    async with headless_page(tmp) as page:
        size = {"width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": False}
        await page.call("Emulation.setDeviceMetricsOverride", **size)
        start_s = time.perf_counter()
        await page.call("Page.navigate", url=url)
        shown = f"document.body && document.body.innerText.includes({json.dumps(expect)})"
        while not await page.js(shown):
            if time.perf_counter() - start_s > 120:
                raise TimeoutError(f"{url} never showed {expect!r}")
            await asyncio.sleep(0.05)
        return time.perf_counter() - start_s


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--readouts", type=int, default=9000, help="readout replicates (3 per candidate)")
    parser.add_argument("--tasks", type=int, default=26, help="tasks (Taskonomy: 26)")
    parser.add_argument("--network-replicates", type=int, default=1, help="train.replicates")
    parser.add_argument("--trials", type=int, default=16, help="trials a search (configs/taskonomy-gpu.yaml)")
    parser.add_argument("--epochs", type=int, default=10, help="train_loss rows per replicate")
    parser.add_argument("--batch", type=int, default=100, help="ReadoutRunLog's batch size")
    parser.add_argument("--server-workers", type=int, default=2, help="mlflow server --workers")
    parser.add_argument("--server-threads", type=int, default=4, help="threads per gunicorn worker")
    parser.add_argument("--no-browser", action="store_true", help="skip the Chromium timings")
    args = parser.parse_args()
    chromium = None if args.no_browser else shutil.which("chromium") or shutil.which("chromium-browser")

    tasks = task_names(args.tasks)
    readouts = candidates(args.readouts // REPLICATES, tasks)
    load_before = os.getloadavg()[0]
    ui: dict[str, float | None] = {"ui_study_first_page_s": None, "ui_readouts_first_page_s": None}
    with tempfile.TemporaryDirectory() as folder, start_postgres() as pg:
        tmp = Path(folder)
        database = pg.create_database("mlflow")
        extra = [f"--gunicorn-opts=--threads {args.server_threads}"]
        with start_mlflow_server(
            tmp, database, tmp / "art", workers=args.server_workers, extra_args=extra
        ) as server:
            tracker = Tracker(server.url, "scale")
            parent = tracker.start_run("run scale study")
            stage_names = log_networks(
                tracker, parent, tasks, args.network_replicates, args.trials, args.epochs
            )
            transfer = tracker.start_run("transfer", parent, {"stage": "transfer", "key": STAGE_KEY})
            outcomes = replicates(readouts, args.epochs)
            cpu, start = time.process_time(), time.perf_counter()
            with ReadoutRunLog(tracker, transfer, STAGE_KEY, batch=args.batch) as log:
                for key, candidate, outcome in outcomes:
                    log.add(outcome, key, candidate)
            logged_s, client_cpu_s = time.perf_counter() - start, time.process_time() - cpu
            tracker.end_run(transfer)
            stage_names += [f"transfer/{t}" for t in log.targets]
            for stage in ("affinity", "taxonomy"):
                tracker.end_run(tracker.start_run(stage, parent, {"stage": stage}))
                stage_names.append(stage)
            tracker.end_run(parent)

            start = time.perf_counter()
            known = known_readout_runs(tracker)
            rerun_read_s = time.perf_counter() - start
            assert set(known.replicates) == {k for k, _, _ in outcomes}
            assert {s for _, s in known.replicates.values()} == {"FINISHED"}
            assert len(known.candidates) == len(readouts) == len({r for r, _ in known.replicates.values()})
            study_runs = len(tracker.client.search_runs([tracker.experiment_id], "", max_results=5000))
            shown = set(first_page(tracker))
            on_first_page = sum(name in shown for name in stage_names)
            if chromium:
                base = f"{server.url}/#/experiments"
                ui["ui_study_first_page_s"] = asyncio.run(
                    page_load_seconds(f"{base}/{tracker.experiment_id}/runs", "run scale study", tmp)
                )
                ui["ui_readouts_first_page_s"] = asyncio.run(
                    page_load_seconds(f"{base}/{tracker.companion('readouts')}/runs", " <- ", tmp)
                )

    per_1000 = logged_s / len(outcomes) * 1000
    print(
        f"{len(outcomes)} readouts ({len(readouts)} candidate runs) in {logged_s:.1f} s ({per_1000:.1f} s per 1000, "
        f"{LOG_THREADS} at a time); reading them back {rerun_read_s:.1f} s. The study's experiment holds "
        f"{study_runs} runs; {on_first_page} of its {len(stage_names)} stage runs are on the UI's first page. "
        f"Load average before: {load_before:.1f} on {os.cpu_count()} cores."
    )
    figures = {
        "seconds_per_1000_readouts": round(per_1000, 2),
        "readouts": len(outcomes),
        "candidate_runs": len(readouts),
        "logged_s": round(logged_s, 2),
        "client_cpu_s": round(client_cpu_s, 2),
        "rerun_read_s": round(rerun_read_s, 2),
        "study_runs": study_runs,
        "stage_runs": len(stage_names),
        "first_page_stage_runs": on_first_page,
        "tasks": args.tasks,
        "network_replicates": args.network_replicates,
        "trials_per_search": args.trials,
    }
    figures |= {k: (round(v, 2) if v is not None else None) for k, v in ui.items()}
    figures |= {"threads": LOG_THREADS, "batch": args.batch, "server_workers": args.server_workers}
    figures |= {"load_avg_1m_before": round(load_before, 2), "cores": os.cpu_count()}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
