"""`taskatlas run` and `taskatlas nightly` end to end on a tiny config (real Ray, real MLflow)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipelines.cli import main
from tests.study import write_study

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_config(tmp_path):
    return write_study(tmp_path / "tiny.yaml", tmp_path / "runs")


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def dry(config, capsys, *extra):
    assert main(["run", "-c", str(config), "--dry-run", *extra]) == 0
    return {
        step: status
        for status, step in (line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines())
    }


def runs_named(root, prefix):
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    return [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name.startswith(prefix)]


def readout_runs(client: MlflowClient, experiment: str) -> list:
    """The candidate runs of the study's readouts experiment."""
    found = client.get_experiment_by_name(f"{experiment}/readouts")
    return client.search_runs([found.experiment_id], "tags.candidate_key LIKE '%'", max_results=1000)


def check_the_answer_is_browsable(root, parent, taxonomy):
    """What a researcher sees in the MLflow UI (issue 13): the answer on the parent run, scored
    readouts with real durations, champion models with their last epoch's metrics."""
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run = client.get_run(parent.info.run_id)
    assert run.info.run_name.startswith("run tiny 20")  # command, config name, date
    assert run.data.params["transfer.epochs"] == "1" and run.data.params["tasks"]  # the resolved config
    assert run.data.metrics["taxonomy_objective"] == pytest.approx(taxonomy["objective"])
    assert 0 <= run.data.metrics["taxonomy_stability"] <= 1 and run.data.metrics["networks"] == 3
    note = run.data.tags["mlflow.note.content"]
    assert all(f"**{r}**" in note for r in taxonomy["roots"]) and f"{taxonomy['objective']:.4g}" in note
    assert run.data.tags["mlflow.source.git.commit"] and run.data.tags["mlflow.user"]
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [run.data.tags["data_version"]]
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "Lower loss is better" in experiment.tags["mlflow.note.content"]

    # a run per candidate in the readouts experiment, under its target's run: 9 first order + 3
    # second + 3 pixels + 3 random + 3 self; (all but self) x 3 replicates + 3 self replicates
    readouts = readout_runs(client, experiment.name)
    assert len(readouts) == 21 and sum(r.data.metrics["replicates"] for r in readouts) == 57
    targets = {
        t.data.tags["target"]: t
        for t in client.search_runs([run.info.experiment_id], "tags.stage = 'transfer_target'")
    }
    (transfer,) = client.search_runs([run.info.experiment_id], "tags.stage = 'transfer'")
    assert sorted(targets) == ["edge_texture", "normal", "reshading"]
    for t in targets.values():
        assert t.info.run_name == f"transfer/{t.data.tags['target']}" and t.info.status == "FINISHED"
        assert t.data.tags["mlflow.parentRunId"] == transfer.info.run_id
        mine = [r for r in readouts if r.data.tags["target"] == t.data.tags["target"]]
        # every candidate but pixels (gain's reference, no share) listed on its target's run
        assert (
            t.data.metrics["candidates"] == len(mine) - 1
            and "best first" in t.data.tags["mlflow.note.content"]
        )
    for r in readouts:
        target, sources = r.info.run_name.split(" <- ")  # target first
        assert (target, sources) == (r.data.tags["target"], r.data.tags["sources"])
        assert r.data.tags["mlflow.parentRunId"] == targets[target].info.run_id
        assert "pooled_affinity" in r.data.metrics or sources == "pixels"  # pixels is gain's reference
        assert "affinity" not in r.data.metrics  # pooled figures are named pooled
        n = int(r.data.metrics["replicates"])
        assert n == (1 if r.data.tags["kind"] == "self" else 3)
        duration = (r.info.end_time - r.info.start_time) / 1000
        seconds = [r.data.metrics[f"seconds/r{k}"] for k in range(n)]
        assert duration >= max(seconds) - 0.01  # the times of the Ray work itself

    for task in ("normal", "reshading", "edge_texture"):
        version = client.get_model_version_by_alias(f"tiny-{task}", "champion")
        assert str(version.version) == "1" and version.tags["task"] == task and version.description
        (model,) = [
            m
            for m in client.search_logged_models([run.info.experiment_id])
            if m.source_run_id == version.run_id
        ]
        assert model.name == task
        train_run = client.get_run(version.run_id)
        last = {
            k: client.get_metric_history(train_run.info.run_id, k)[-1] for k in ("train_loss", "test_loss")
        }
        by_model = {m.key: m for m in sorted(model.metrics, key=lambda m: m.step)}  # the newest step
        for key, metric in last.items():
            assert by_model[key].value == pytest.approx(metric.value) and by_model[key].step == metric.step

    (solved,) = runs_named(root, "taxonomy")  # the sweep by budget, each named, none as a curve
    assert solved.data.metrics[f"objective_at_budget_{taxonomy['budget']}"] == pytest.approx(
        taxonomy["objective"]
    )
    assert "sweep_objective" not in solved.data.metrics
    for r in client.search_runs([run.info.experiment_id]):  # no flat curves: constants are tags
        # system/ are MLflow's samples
        for key in {k for k in r.data.metrics if not k.startswith("system/")}:
            history = client.get_metric_history(r.info.run_id, key)
            steps = {m.step for m in history}
            assert len(steps) == 1 or len({m.value for m in history}) > 1, (r.info.run_name, key)


@pytest.mark.numerics  # its affinity intervals: CI runs it again under another CPU kernel path
def test_run_then_rerun_reuses_everything_and_a_transfer_change_reruns_only_stages_2_to_4(
    tiny_config, tmp_path, capsys, ray_session
):
    root = tmp_path / "runs"
    assert set(dry(tiny_config, capsys).values()) == {"run"}  # nothing exists yet, not even the data
    assert main(["run", "-c", str(tiny_config)]) == 0
    out = capsys.readouterr().out
    assert "steps: 6 ran, 0 reused" in out
    affinity = next(root.glob("affinity/*/affinity.parquet"))
    taxonomy = json.loads(next(root.glob("taxonomy/*/taxonomy.json")).read_text())
    assert set(taxonomy) == {"budget", "max_order", "objective", "roots", "transfers", "stability", "verdict"}
    said = taxonomy["verdict"]  # transfer.replicates: 3 by default, so training noise is measured
    assert said["replicates"] == 3 and said["training_noise_measured"] is True
    assert "multi-bootstrap over 3 readout replicates" in out
    stability = taxonomy["stability"]  # analysis.bootstrap: 200 resamples of seeds and test images
    assert stability["resamples"] == 200 and 0 <= stability["taxonomy"] <= 1
    assert set(taxonomy["roots"]) <= set(stability["roots"]) and set(stability["transfers"]) == {
        "normal",
        "reshading",
        "edge_texture",
    }
    assert len(taxonomy["roots"]) == 1 and "random" not in taxonomy["roots"]
    assert set(taxonomy["roots"]) | set(taxonomy["transfers"]) == {"normal", "reshading", "edge_texture"}
    import pyarrow.parquet as pq

    table = pq.read_table(affinity)
    assert set(table["target"].to_pylist()) == {"normal", "reshading", "edge_texture"}
    for row in table.to_pylist():  # the 95% interval brackets the point estimate: the resamples
        # are centred on it (each draws replicate pairs as the estimate weighs them), no slack
        assert row["affinity_lo"] <= row["affinity"] <= row["affinity_hi"], row
    for target in ("normal", "reshading", "edge_texture"):  # each target's chances of being best sum to 1
        rows = [r for r in table.to_pylist() if r["target"] == target]
        p_best = [r["p_best"] for r in rows if r["sources"] not in (["self"], [target])]
        assert sum(p_best) == pytest.approx(1.0)  # self and t <- t (the target's own encoder) never compete
        assert all(np.isnan(r["p_best"]) for r in rows if r["sources"] in (["self"], [target]))
    parent = runs_named(root, "run ")
    assert len(parent) == 1
    check_the_answer_is_browsable(root, parent[0], taxonomy)
    artifacts = {
        a.path for a in MlflowClient(f"sqlite:///{root / 'mlflow.db'}").list_artifacts(parent[0].info.run_id)
    }
    assert {
        "affinity.parquet",
        "affinity_heatmap.png",
        "taxonomy.json",
        "taxonomy.png",
        "budget_sweep.png",
    } <= artifacts

    # Second run: every step reused, no new training or transfer runs.
    assert set(dry(tiny_config, capsys).values()) == {"reuse"}
    assert main(["run", "-c", str(tiny_config)]) == 0
    assert "steps: 0 ran, 6 reused" in capsys.readouterr().out
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    readouts = readout_runs(client, "tiny")
    assert (
        len(runs_named(root, "train/")) == 3
        and len(runs_named(root, "transfer/")) == 3
        and len(readouts) == 21
        and sum(r.data.metrics["replicates"] for r in readouts) == 57
    )

    # A transfer setting changes Stages II-IV only: every trained readout again (self is reused).
    plan = dry(tiny_config, capsys, "--set", "transfer.epochs=2")
    assert {k for k, v in plan.items() if v == "run" and not k.startswith("readout")} == {
        "transfer",
        "affinity",
        "taxonomy",
    }
    # (9 first order + 6 pixels and random) x 3 replicates, and 3 lines "up to 1 higher-order"
    assert sum(k.startswith("readout ") for k in plan) == (9 + 6) * 3 + 3
    assert plan["readouts (3 stored)"] == "reuse"
    assert main(["run", "-c", str(tiny_config), "--set", "transfer.epochs=2"]) == 0
    assert "steps: 3 ran, 3 reused" in capsys.readouterr().out
    assert len(runs_named(root, "train/")) == 3


# Slow (make test-all): promotion is in test_weights_only, the lock that refuses a second run in test_study_lock.
@pytest.mark.slow
def test_nightly_promotes_at_most_once_and_a_concurrent_nightly_is_refused(
    tiny_config, tmp_path, capsys, ray_session
):
    root = tmp_path / "runs"
    args = ["nightly", "-c", str(tiny_config), "--stages", "train", "--date", "2026-11-20"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(first["promoted"]) == ["edge_texture", "normal", "reshading"]  # no champion yet
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["retrained"] == [] and second["promoted"] == []
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    for task in ("normal", "reshading", "edge_texture"):
        assert str(client.get_model_version_by_alias(f"tiny-{task}", "champion").version) == "1"
    # The next night has new data: new models, promoted only where not worse than the champion.
    assert main(["nightly", "-c", str(tiny_config), "--stages", "train", "--date", "2026-11-21"]) == 0
    third = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert third["data_version"] != first["data_version"]
    assert sorted(third["retrained"]) == ["edge_texture", "normal", "reshading"]
    for task in ("normal", "reshading", "edge_texture"):
        champion = str(client.get_model_version_by_alias(f"tiny-{task}", "champion").version)
        assert champion == ("2" if task in third["promoted"] else "1")
    latest = max(runs_named(root, "nightly"), key=lambda r: r.info.start_time)
    summary = (
        json.loads((tmp_path / "dl" / "nightly_summary.json").read_text())
        if client.download_artifacts(latest.info.run_id, "nightly_summary.json", str(_mkdir(tmp_path / "dl")))
        else None
    )
    for p in summary["promotions"]:
        assert p["champion_version"] == "1" and p["promoted"] == (p["test_loss"] <= p["champion_loss"])

    # Another nightly holds the study's lock: a second nightly exits cleanly and does nothing,
    # even when told to wait for the lock.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from components.study_lock import StudyLock; "
            "from components.storage import location; from components.study_lock import lock_store; "
            "lock = StudyLock(lock_store(location(sys.argv[1])), 'nightly (tiny)'); lock.acquire(); "
            "print('locked', flush=True); time.sleep(60)",
            str(root),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = len(runs_named(root, "nightly"))
        argv = [
            "nightly",
            "-c",
            str(tiny_config),
            "--stages",
            "train",
            "--date",
            "2026-11-22",
            "--wait-for-lock",
        ]
        assert main(argv) == 0
        assert "another nightly run holds" in capsys.readouterr().out
        assert len(runs_named(root, "nightly")) == before
    finally:
        holder.kill()
        holder.wait()
