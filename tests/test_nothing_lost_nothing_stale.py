"""Issue 39, "Nothing lost, nothing stale", end to end on the tiny study (real Ray, real MLflow
SQLite stores, the real CLI):

- a derived step is keyed by what it read, not only by the plan: a readout done again with other
  losses makes the affinity and the taxonomy again (they were reused, `affinity.parquet`
  unchanged, though the loss table had changed);
- a tracking store moved aside, as the refusal of a damaged `mlflow.db` advises, loses no
  registered model: the rerun registers every network again from its stored weights (the markers
  said "registered" and it registered nothing), `position` refuses in one line until then, and
  registers its model again from its stored weights after.

    .venv/bin/python -m pytest tests/test_nothing_lost_nothing_stale.py -q     # slow: ~2 x 1 min
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from components.storage import location
from components.transfer import Readout
from components.transfer.readout_files import stored_outcome, write_readout
from pipelines.cli import main
from pipelines.position.run import POSITION
from pipelines.tracking.models import load_registered_model, load_registered_weights, resolve_version
from tests.services import cli_process
from tests.study import write_study

TASKS = ["normal", "reshading"]


def _config(tmp_path: Path) -> Path:
    return write_study(
        tmp_path / "tiny.yaml",
        tmp_path / "runs",
        tasks=TASKS,
        transfer={"orders": [], "beams": [], "epochs": 1, "width": 16, "replicates": 1},
        taxonomy={"budget": 1, "max_order": 1},
        analysis={"bootstrap": 20},
        position={"min_test_images": 4, "min_steps": 4, "test_fraction": 0.3},
    )


def _run(config: Path, capsys) -> dict:
    code = main(["run", "-c", str(config), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return json.loads(captured.out.strip().splitlines()[-1]) | {"stderr": captured.err}


def _markers(folder: Path) -> dict[str, dict]:
    """Step key -> its marker, of the steps in `folder` (`<root>/affinity`, `<root>/taxonomy`)."""
    return {p.parent.name: json.loads(p.read_text()) for p in folder.glob("*/done.json")}


@pytest.mark.slow  # a study of its own, run twice: about a minute
def test_a_readout_done_again_with_other_losses_makes_the_affinity_and_taxonomy_again(
    tmp_path, capsys, ray_session
):
    config, root = _config(tmp_path), tmp_path / "runs"
    _run(config, capsys)
    affinities, taxonomies = _markers(root / "affinity"), _markers(root / "taxonomy")
    [(old_key, old)] = affinities.items()
    assert set(old["inputs"]) == set(TASKS)  # what it read: each target's loss table, by SHA-256

    # reshading -> normal done again (its cached features were damaged) and, this time, better on
    # every test image; Stage II's table of normal is damaged too, so Stage II is done again
    # (every readout stored: joined, not trained) and its marker records the new table.
    [path] = (root / "readouts" / "normal").glob("reshading.*.parquet")
    readout = Readout("normal", ("reshading",))
    outcome = stored_outcome(location(path), readout)
    table = pq.read_table(path)
    losses = table["loss"].to_numpy(zero_copy_only=False)
    better = np.where(np.isnan(losses), np.nan, 0.0).astype(np.float32)
    ids = np.asarray(table["image_id"].to_pylist())
    write_readout(location(path), outcome, ids, better)
    [stage2] = (root / "stage2").glob("*/done.json")
    (stage2.parent / "losses" / "normal.parquet").unlink()

    again = _run(config, capsys)
    assert again["readouts_ran"] == 0 and again["networks_trained"] == []  # the plan is unchanged
    [new_key] = set(_markers(root / "affinity")) - set(affinities)  # before the fix: reused
    new = _markers(root / "affinity")[new_key]
    assert new["transfer_key"] == old["transfer_key"]  # the same plan, another input
    assert new["inputs"]["normal"] != old["inputs"]["normal"]
    assert new["inputs"]["reshading"] == old["inputs"]["reshading"]
    assert new["inputs"]["normal"] == json.loads(stage2.read_text())["files"]["losses/normal.parquet"][1]

    def row(key: str) -> dict:
        rows = pq.read_table(root / "affinity" / key / "affinity.parquet").to_pylist()
        [found] = [r for r in rows if r["target"] == "normal" and r["sources"] == ["reshading"]]
        return found

    assert row(new_key)["quality"] == 1.0  # it beats `self` on every test image now
    assert row(new_key) != row(old_key)
    [taxonomy] = [m for k, m in _markers(root / "taxonomy").items() if k not in taxonomies]
    assert taxonomy["affinity_key"] == new_key  # Stage IV on the new affinity, not the old


def _rgb_folder(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(5)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def _predict(config: Path, model: str, images: Path, out: Path) -> int:
    return main(["predict", "-c", str(config), "--model", model, "--images", str(images), "--out", str(out)])


def _versions(uri: str, name: str) -> list[str]:
    return [str(v.version) for v in MlflowClient(uri).search_model_versions(f"name = '{name}'")]


@pytest.mark.slow  # a study of its own, a positioned task, each run again: about two minutes
def test_a_store_moved_aside_gets_every_model_registered_again_from_its_stored_weights(
    tmp_path, capsys, ray_session
):
    from test_position import labelled_folder

    config, root = _config(tmp_path), tmp_path / "runs"
    db, uri = root / "mlflow.db", f"sqlite:///{root / 'mlflow.db'}"
    (tmp_path / "edges.yaml").write_text("edges: {column: edges, kind: pixel, loss: l1, channels: 1}\n")
    images = labelled_folder(tmp_path / "edges", 30)
    position = [
        "position",
        "-c",
        str(config),
        "--task",
        str(tmp_path / "edges.yaml"),
        "--images",
        str(images),
    ]
    # The study and the task's position, each in a process of its own, as the store is then moved
    # aside between commands (in one process, MLflow would keep its connection to the moved file).
    for command in (["run", "-c", str(config)], position):
        _, stderr = (done := cli_process(*command)).communicate(timeout=600)
        assert done.returncode == 0, stderr[-3000:]
    [answer] = (root / "position" / "edges").glob(f"*/{POSITION}")
    first = json.loads(answer.read_text())

    db.rename(root / "mlflow.db.damaged")  # what the refusal of a damaged store says to do

    # position before the study is run again: its encoders are not in the new store
    assert main(position) == 2
    err = capsys.readouterr().err
    [line] = [x for x in err.splitlines() if x.startswith("taskatlas: error:")]
    assert "normal, reshading are not registered at" in line and "taskatlas run" in line, line
    assert _versions(uri, "tiny-edges-transfer") == []  # nothing registered on missing encoders

    again = _run(config, capsys)
    assert again["networks_trained"] == [] and again["readouts_ran"] == 0  # every output reused
    for task in TASKS:
        assert f"network {task} (tiny-{task} v1) is not in the registry" in again["stderr"]
        name, version = resolve_version(uri, f"tiny-{task}")  # its champion
        [weights] = (root / "stage1" / task).glob("*/model.pt")
        stored = torch.load(weights, weights_only=True)
        loaded = load_registered_model(uri, name, version).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in stored.items()), task
        marker = json.loads((weights.parent / "done.json").read_text())
        assert (marker["registered"], marker["model_version"]) == (name, version)  # the store's own
        assert MlflowClient(uri).get_model_version(name, version).tags["config_hash"] == marker["key"]
    out = tmp_path / "predicted"
    assert _predict(config, "tiny-normal", _rgb_folder(tmp_path / "rgb"), out) == 0
    assert len(list((out / "normal").iterdir())) == 3
    assert _run(config, capsys)["stderr"].count("is not in the registry") == 0  # once
    assert all(_versions(uri, f"tiny-{t}") == ["1"] for t in TASKS)

    # the positioned model: registered again from the readout weights its step kept
    assert main([*position, "--json"]) == 0, capsys.readouterr().err[-3000:]
    captured = capsys.readouterr()
    second = json.loads(captured.out.strip().splitlines()[-1])
    assert second["readouts_ran"] == 0 and second["candidates"] == first["candidates"]
    assert "tiny-edges-transfer v1 is not in the registry" in captured.err
    name, version = resolve_version(uri, "tiny-edges-transfer")
    assert version == second["model_version"] and second["model_sources"] == first["model_sources"]
    architecture, _ = load_registered_weights(uri, name, version, formats=("taskatlas-transfer-v1",))
    assert {(e["registered"], e["version"]) for e in architecture["encoders"]} <= {
        (f"tiny-{t}", "1") for t in TASKS
    }
    out = tmp_path / "predicted-edges"
    assert _predict(config, name, images, out) == 0
    assert len(list((out / "edges").iterdir())) == 30


@pytest.mark.slow  # a study of its own, copied and run again: about a minute
def test_a_copied_storage_root_is_a_study_of_its_own_and_never_writes_into_the_original(
    tmp_path, capsys, ray_session
):
    """Regression: `cp -a root backup`, the original deleted, and a run on the backup recreated the
    original's `mlartifacts/` and logged there (markers held absolute paths, the MLflow experiment
    its artifact location), and its registered versions' files were the deleted root's."""
    import shutil

    config = _config(tmp_path)
    first = _run(config, capsys)
    copy = tmp_path / "backup"
    shutil.copytree(tmp_path / "runs", copy, symlinks=True)
    shutil.rmtree(tmp_path / "runs")
    moved = write_study(
        tmp_path / "moved.yaml",
        copy,
        tasks=TASKS,
        transfer={"orders": [], "beams": [], "epochs": 1, "width": 16, "replicates": 1},
        taxonomy={"budget": 1, "max_order": 1},
        analysis={"bootstrap": 20},
    )
    again = _run(moved, capsys)
    assert again["networks_trained"] == [] and again["readouts_ran"] == 0  # every output reused, in place
    assert again["taxonomy"]["roots"] == first["taxonomy"]["roots"]
    assert not (tmp_path / "runs").exists()  # nothing written into, or recreated at, the old root
    assert "its runs are now the experiment" in again["stderr"]
    assert "registered again from" in again["stderr"] and str(copy) in again["stderr"]
    markers = [json.loads(p.read_text()) for p in (copy / "stage1").glob("*/*/done.json")]
    assert markers and all(m["model_path"].startswith(str(copy)) for m in markers)
    out = tmp_path / "predicted"
    assert _predict(moved, "tiny-normal", _rgb_folder(tmp_path / "photos"), out) == 0  # the copy's own files
    assert len(list(out.rglob("*.npy")) + list(out.rglob("*.png"))) == 3
