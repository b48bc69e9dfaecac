"""Every config in configs/ loads, plans and runs: a new file there is covered by being there.

Each one loads and validates as shipped, `taskatlas run --dry-run` plans every stage on a fresh
storage root, and (slow) a scaled-down real run on CPU goes through the same code paths to an
affinity table and a taxonomy: a few images, one epoch, a one-trial search, no GPUs, fewer tasks,
but the config's encoder, data loader, transfer orders and task definitions kept (checked).

A config that reads a dataset (`data.path`) needs the test to make one: see DATA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.cli import main
from pipelines.config import dataset_columns, load_pipeline_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
STAGES = ["data", "train", "transfer", "affinity", "taxonomy"]

# What every scaled-down run changes: the size of everything, and GPUs off (the test Ray has 2
# CPUs: a trial asking for more, as taskonomy-gpu's 4, would wait for ever).
SCALED = [
    "data.n_train=40",
    "data.n_transfer=16",
    "data.n_test=16",
    "data.rows_per_shard=16",
    "data.size=32",  # divisible by every shipped model.downsample (16 at most)
    "train.epochs=1",
    "train.use_gpu=false",
    "tune.num_samples=1",
    "tune.max_epochs=1",
    "tune.grace_period=1",
    "tune.cpus_per_trial=1",
    "tune.gpus_per_trial=0",
    "transfer.epochs=1",
    "train.replicates=1",  # 3 in the quickstart: test_network_replicates covers them
    "transfer.replicates=1",  # 3 by default: test_pipeline covers the replicates
    "transfer.use_gpu=false",
]
# Tasks kept per config: a few, one of each kind the config has (source-only, vector, its own
# task definitions), and enough sources for its highest transfer order. A config not named here
# runs with all of its tasks.
TASKS = {
    "quickstart.yaml": "autoencoding,colorization,normal,segment_semantic",
    "own-task.yaml": "colorization,denoising,depth_zbuffer,boundaries",
    "taskonomy-gpu.yaml": "autoencoding,colorization,segment_semantic,class_object",
}


def _own_task_photos(folder: Path) -> None:
    """The README's worked example: examples/make_photo_folder.py, imported at 32x32 into
    data/my-photos-32 under `folder` (own-task.yaml's data.path, relative to where it runs)."""
    photos = folder / "photos"
    subprocess.run(
        [sys.executable, "examples/make_photo_folder.py", str(photos), "--images", "72"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    args = [
        "data",
        "import-folder",
        "--root",
        str(photos),
        "--spec",
        str(ROOT / "examples" / "photo-spec.yaml"),
    ]
    out = folder / "data" / "my-photos-32"
    args += ["--out", str(out), "--size", "32", "--transfer-fraction", "0.2", "--test-fraction", "0.2"]
    assert main(args) == 0


# config file -> how to make the dataset its data.path names, relative to the folder it runs in
DATA = {"own-task.yaml": _own_task_photos}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Where the configs run: every dataset of DATA made inside, at its config's relative path."""
    folder = tmp_path_factory.mktemp("configs-workdir")
    for make in DATA.values():
        make(folder)
    return folder


@pytest.fixture
def in_workdir(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    capsys.readouterr()  # the imports' output
    return workdir


def _ids(paths):
    return [p.name for p in paths]


def test_every_config_is_found():
    assert {"quickstart.yaml", "own-task.yaml", "taskonomy-gpu.yaml"} <= {p.name for p in CONFIGS}
    assert set(TASKS) <= {p.name for p in CONFIGS} and set(DATA) <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=_ids(CONFIGS))
def test_the_config_loads_and_validates_against_its_data(config, in_workdir):
    cfg = load_pipeline_config(config)
    assert cfg.study_tasks() and cfg.root
    # its dataset was there to check tasks and image size against (generated scenes always are)
    assert dataset_columns(cfg.data) is not None, (
        f"{config.name}: data.path {cfg.data.path!r} cannot be read; add how to make it to DATA"
    )


@pytest.mark.parametrize("config", CONFIGS, ids=_ids(CONFIGS))
def test_dry_run_on_a_fresh_root_plans_every_stage(config, in_workdir, tmp_path, capsys):
    root = tmp_path / "runs"
    assert main(["run", "-c", str(config), "--dry-run", "--set", f"storage_root={root}"]) == 0
    plan = {
        step: status
        for status, step in (line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines())
    }
    # With no dataset yet the plan is one line a stage. Where the config's dataset exists (DATA made
    # it), `data` is reused and Stage I is listed per task (`tune/<task>`, `train/<task>`), Stage II
    # per readout; every stage after it still one line.
    assert next(iter(plan)) == "data" and plan["data"] in {"run", "reuse"}, plan
    assert all(status == "run" for step, status in plan.items() if step != "data"), plan
    assert [step for step in plan if step in STAGES[2:]] == STAGES[2:], plan
    trained = {step.removeprefix("train/") for step in plan if step.startswith("train/")}
    assert "train" in plan or trained == set(load_pipeline_config(config).tasks), plan
    assert not root.exists() or not any(root.iterdir())  # nothing written


@pytest.mark.slow  # about a minute each on 2 CPUs
@pytest.mark.timeout(900)
@pytest.mark.parametrize("config", CONFIGS, ids=_ids(CONFIGS))
def test_a_scaled_down_run_ends_in_an_affinity_table_and_a_taxonomy(
    config, in_workdir, tmp_path, capsys, ray_session
):
    root = tmp_path / "runs"
    overrides = [f"storage_root={root}", *SCALED]
    if config.name in TASKS:
        overrides.append(f"tasks={TASKS[config.name]}")
    shipped, scaled = load_pipeline_config(config), load_pipeline_config(config, overrides)
    # what is kept: the code paths the config chose
    assert scaled.model == shipped.model
    assert scaled.train.loader == shipped.train.loader
    assert (scaled.transfer.orders, scaled.transfer.beams) == (
        shipped.transfer.orders,
        shipped.transfer.beams,
    )
    assert scaled.task_definitions == shipped.task_definitions and set(scaled.tasks) <= set(shipped.tasks)
    assert scaled.taxonomy.max_order == shipped.taxonomy.max_order

    argv = ["run", "-c", str(config), "--json"]
    for item in overrides:
        argv += ["--set", item]
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert sorted(summary["networks_trained"]) == sorted(scaled.tasks)

    (affinity,) = root.glob("affinity/*/affinity.parquet")
    table = pq.read_table(affinity).to_pylist()
    targets = {t.name for t in scaled.study_tasks() if not t.source_only}
    assert {row["target"] for row in table} == targets
    orders = {len(row["sources"]) for row in table}
    assert {1, *scaled.transfer.orders} <= orders  # every order trained and scored
    (taxonomy_file,) = root.glob("taxonomy/*/taxonomy.json")
    taxonomy = json.loads(taxonomy_file.read_text())
    assert taxonomy["roots"] and set(taxonomy["roots"]) <= set(scaled.tasks)
    assert set(taxonomy["roots"]) | set(taxonomy["transfers"]) >= targets
    assert taxonomy["max_order"] == scaled.taxonomy.max_order
    assert summary["taxonomy"]["roots"] == taxonomy["roots"]
