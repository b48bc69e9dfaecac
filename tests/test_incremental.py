"""Own tasks and incremental studies, end to end: a task defined only in YAML joins a finished
study, and only its network and the readouts that involve it are trained (real Ray, real MLflow)."""

import json

import pyarrow.parquet as pq
import pytest
import yaml

from components.transfer import plan_transfers, rank_sources
from pipelines.cli import main
from tests.study import write_study

BASE = ["normal", "reshading", "edge_texture"]
MY_TASK = "task_definitions: {my_edges: {column: edge_occlusion, kind: pixel, loss: l1, channels: 1}}"


def write_config(tmp_path, tasks, extra=""):
    sections = {"transfer": {"replicates": 1}} | (yaml.safe_load(extra) or {})
    return write_study(
        tmp_path / f"study-{len(tasks)}.yaml",
        tmp_path / "runs",
        name="own-tasks",
        tasks=list(tasks),
        **sections,
    )


def run_json(config, capsys) -> dict:
    assert main(["run", "-c", str(config), "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def dry_run(config, capsys) -> dict[str, str]:
    assert main(["run", "-c", str(config), "--dry-run"]) == 0
    return {
        step: status
        for status, step in (line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines())
    }


def first_order_losses(summary_path) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for r in pq.read_table(summary_path).to_pylist():
        if r["kind"] == "transfer" and r["order"] == 1:
            out.setdefault(r["target"], {})[r["sources"][0]] = r["val_loss"]  # what beams rank by
    return out


# Slow (make test-all): which keys a task definition changes is in test_task_definitions.
@pytest.mark.slow
def test_a_yaml_task_joins_a_finished_study_training_only_what_involves_it(tmp_path, capsys, ray_session):
    first = run_json(write_config(tmp_path, BASE), capsys)
    assert sorted(first["networks_trained"]) == sorted(BASE) and first["networks_reused"] == []
    assert first["readouts_ran"] == 18 and first["readouts_reused"] == 0  # 9 + 3 pairs + 6 baselines

    grown = write_config(tmp_path, [*BASE, "my_edges"], MY_TASK)
    plan = dry_run(grown, capsys)
    first_order = plan_transfers([*BASE, "my_edges"], [*BASE, "my_edges"], (2,), (2,)).first_order
    involving = {r.name for r in first_order if "my_edges" in (r.target, *r.sources)}
    baselines = {f"{b}->my_edges" for b in ("self", "pixels", "random")}
    readouts_to_run = {s.removeprefix("readout ") for s, v in plan.items() if s.startswith("readout ")}
    assert {r for r in readouts_to_run if "higher-order" not in r} == involving | baselines  # 7 + 3
    assert plan["train/my_edges"] == "run" and all(plan[f"train/{t}"] == "reuse" for t in BASE)
    assert plan["readouts (18 stored)"] == "reuse"  # 9 first order + 9 baselines of the first study

    second = run_json(grown, capsys)
    assert second["networks_trained"] == ["my_edges"] and sorted(second["networks_reused"]) == sorted(BASE)
    # Expected: 7 first-order readouts into or out of my_edges, its pixels and random baselines,
    # its own pair, and a new pair for each old target whose beam of 2 now includes my_edges.
    stage2 = json.loads(_newest(tmp_path / "runs" / "stage2", "done.json").read_text())
    losses = first_order_losses(stage2["summary_path"])
    changed = sum(
        set(rank_sources({s: v for s, v in losses[t].items() if s != "my_edges"}, exclude=t)[:2])
        != set(rank_sources(losses[t], exclude=t)[:2])
        for t in BASE
    )
    assert second["readouts_ran"] == 7 + 2 + 1 + changed
    assert second["readouts_ran"] + second["readouts_reused"] == 16 + 4 + 4 + 4  # the whole plan
    rows = pq.read_table(_newest(tmp_path / "runs" / "affinity", "affinity.parquet")).to_pylist()
    assert "my_edges" in {r["target"] for r in rows}
    assert any(r["sources"] == ["my_edges"] for r in rows if r["target"] == "normal")
    taxonomy = second["taxonomy"]
    assert "my_edges" in set(taxonomy["roots"]) | set(taxonomy["transfers"])

    # Removing tasks reuses every network and readout (two tasks: no pair fits a beam of one).
    smaller = run_json(write_config(tmp_path, ["normal", "reshading"]), capsys)
    assert smaller["networks_trained"] == [] and smaller["readouts_ran"] == 0


def _newest(folder, name):
    return max(folder.glob(f"*/{name}"), key=lambda p: p.stat().st_mtime)
