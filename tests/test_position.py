"""`taskatlas position` and `taskatlas predict` end to end on a tiny finished study (real Ray,
real MLflow): a planted task sits next to the task it copies, a rerun reuses everything, the model
loads weights-only and predicts in the task's encoding, and bad input is refused in one line."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from components.data.scenes import SceneConfig
from components.data.synthetic import DatasetConfig, render_images
from components.errors import ConfigError
from pipelines.cli import main
from pipelines.tracking.models import (
    UnsafeModelError,
    load_registered_model,
    load_registered_weights,
    resolve_version,
)

STUDY = """
name: tiny-position
storage_root: {root}
tasks: [autoencoding, depth_euclidean, edge_texture, normal]
data: {{n_train: 80, n_transfer: 24, n_test: 16, size: 32, rows_per_shard: 64}}
model: {{encoder: small, width: 8, downsample: 4}}
train: {{epochs: 3, num_workers: 1}}
tune: {{enabled: false}}
transfer: {{orders: [2], beams: [2], epochs: 2, width: 16, replicates: 1}}
taxonomy: {{budget: 2, max_order: 2}}
analysis: {{bootstrap: 50}}
position: {{min_test_images: 6, min_steps: 40, test_fraction: 0.3}}
"""


def labelled_folder(folder, n, label=None, seed=91, column="edges"):
    """Scenes no study image comes from, labelled for one column only: `label(rgb)` (uint8
    (n, 3, S, S) -> (n, 1, S, S)), by default a copy of their `edge_texture` maps."""
    data = render_images(
        DatasetConfig(n_train=0, n_transfer=n, n_test=0, seed=seed, scene=SceneConfig(size=32)),
        "transfer",
        0,
        n,
    )
    labels = label(data["rgb"]) if label else data["edge_texture"].astype(np.float32)
    (folder / "rgb").mkdir(parents=True)
    (folder / column).mkdir()
    (folder / "depth_zbuffer").mkdir()  # labels of another task: ignored
    for i in range(n):
        Image.fromarray(data["rgb"][i].transpose(1, 2, 0)).save(folder / "rgb" / f"s{i:03d}.png")
        np.save(folder / column / f"s{i:03d}.npy", labels[i].transpose(1, 2, 0))
    return folder


def network_output(uri, task):
    """What the study's registered `task` network predicts, as labels: a planted task that is a
    function of that one source's output, however briefly it was trained."""
    net = load_registered_model(
        uri, f"tiny-position-{task}", resolve_version(uri, f"tiny-position-{task}")[1]
    )

    def label(rgb):
        with torch.no_grad():
            return net(torch.from_numpy(rgb).float() / 255.0).numpy().astype(np.float32)

    return label


@pytest.fixture(scope="module")
def study(tmp_path_factory, ray_session):
    """A finished 4-task study (trained once for the module), on the session's Ray."""
    tmp = tmp_path_factory.mktemp("position")
    config = tmp / "study.yaml"
    config.write_text(STUDY.format(root=tmp / "runs"))
    assert main(["run", "-c", str(config)]) == 0
    (tmp / "edges.yaml").write_text("edges: {column: edges, kind: pixel, loss: l1, channels: 1}\n")
    return tmp, config


def position(config, task, images, capsys, *extra):
    code = main(
        ["position", "-c", str(config), "--task", str(task), "--images", str(images), "--json", *extra]
    )
    captured = capsys.readouterr()
    out = captured.out if code == 0 else captured.err
    return code, (json.loads(out.strip().splitlines()[-1]) if code == 0 else None), out


@pytest.mark.slow  # a study of its own: about a minute (CI runs it)
def test_a_planted_task_sits_next_to_its_source_and_a_rerun_reuses_everything(study, capsys, tmp_path):
    tmp, config = study
    uri = f"sqlite:///{tmp / 'runs' / 'mlflow.db'}"
    images = labelled_folder(tmp_path / "edges", 60, network_output(uri, "edge_texture"))
    code, answer, out = position(config, tmp / "edges.yaml", images, capsys)
    assert code == 0, out
    first = [
        c
        for c in answer["candidates"]
        if len(c["sources"]) == 1 and c["sources"][0] not in ("random", "pixels")
    ]
    assert first[0]["sources"] == ["edge_texture"], first  # the source whose output the labels are
    assert "edge_texture" in answer["best"][0]["sources"]  # the best source set has it
    assert "edge_texture" in answer["model_sources"] and answer["model"] == "tiny-position-edges-transfer"
    assert {"sources", "affinity", "gain", "p_best", "affinity_lo", "affinity_hi"} <= set(first[0])
    assert set(answer["nearest"]) == {"autoencoding", "depth_euclidean", "edge_texture", "normal"}
    assert answer["images"]["test"] >= 6 and answer["replicates"] == 1
    assert not any(c["sources"] == ["self"] for c in answer["candidates"])  # the study has no `edges` network
    assert any(c["sources"] == ["random"] for c in answer["candidates"])
    assert all(0 <= c["gain"] <= 1 for c in answer["candidates"])  # against `scratch`, trained beside them
    assert not any(c["sources"] in (["scratch"], ["pixels"]) for c in answer["candidates"])  # references only
    assert "where edges sits" in out and "taskatlas predict" in out
    # the model is chosen on validation images (held out of the transfer images), not on the test
    # images its figures are read on: the lowest validation loss
    summary = [row for f in (tmp / "runs").rglob("summary.parquet") for row in pq.read_table(f).to_pylist()]
    val = {}
    for row in summary:
        if row["kind"] == "transfer" and row["target"] == "edges":
            val.setdefault(tuple(row["sources"]), []).append(row["val_loss"])
    lowest = min(np.mean(v) for v in val.values())
    assert np.mean(val[tuple(answer["model_sources"])]) <= lowest * 1.01 + 1e-12
    assert "(chosen on validation images)" in out
    assert (tmp / "runs" / "position" / "edges").is_dir()

    code, again, out = position(config, tmp / "edges.yaml", images, capsys)
    assert code == 0 and again["readouts_ran"] == 0  # nothing trained again
    assert again["model_version"] == answer["model_version"]  # nor registered again
    assert again["candidates"] == answer["candidates"]

    # the study's answer changes (another budget: Stage IV again): where the task sits follows it,
    # with nothing of the task's own trained or registered again
    assert main(["run", "-c", str(config), "--set", "taxonomy.budget=1"]) == 0
    code, moved, out = position(config, tmp / "edges.yaml", images, capsys, "--set", "taxonomy.budget=1")
    assert code == 0 and moved["readouts_ran"] == 0, out
    assert len(moved["roots"]) == 1 and len(answer["roots"]) == 2, (moved["roots"], answer["roots"])
    assert moved["model_version"] == answer["model_version"] and moved["candidates"] == answer["candidates"]

    # the registered model: weights only, rebuilt by our code; predict writes the task's encoding
    name, version = resolve_version(uri, "tiny-position-edges-transfer")
    assert version == answer["model_version"]
    architecture, state = load_registered_weights(uri, name, version, formats=("taskatlas-transfer-v1",))
    assert architecture["encoders"][0]["registered"].startswith("tiny-position-")
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    with pytest.raises(UnsafeModelError, match="format"):  # a task network's loader refuses it
        load_registered_weights(uri, name, version)
    out_dir = tmp_path / "preds"
    assert (
        main(
            [
                "predict",
                "-c",
                str(config),
                "--model",
                "tiny-position-edges-transfer",
                "--images",
                str(images),
                "--out",
                str(out_dir),
            ]
        )
        == 0
    )
    files = sorted((out_dir / "edges").iterdir())
    assert len(files) == 60 and files[0].suffix == ".npy"
    pred = np.load(files[0])
    assert pred.shape == (32, 32, 1) and pred.dtype == np.float32 and np.isfinite(pred).all()
    # a study network predicts too (normals: an (H, W, 3) array)
    assert (
        main(
            [
                "predict",
                "-c",
                str(config),
                "--model",
                "tiny-position-normal@champion",
                "--images",
                str(images / "rgb"),
                "--out",
                str(out_dir),
            ]
        )
        == 0
    )
    assert np.load(next((out_dir / "normal").iterdir())).shape == (32, 32, 3)


def test_bad_input_is_refused_in_one_line_before_any_work(capsys, tmp_path):
    """Each refused before anything is imported or trained; the study need not exist for the
    checks of the task and the folder, and an unfinished study is the last one."""
    config = tmp_path / "study.yaml"
    config.write_text(STUDY.format(root=tmp_path / "runs"))
    task = tmp_path / "edges.yaml"
    task.write_text("edges: {column: edges, kind: pixel, loss: l1, channels: 1}\n")

    def refused(task, images, *extra):
        code = main(["position", "-c", str(config), "--task", str(task), "--images", str(images), *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        return err

    few = labelled_folder(tmp_path / "few", 12)
    assert "positioning needs at least 6 test" in refused(task, few)
    assert "no edges/ folder" in refused(task, tmp_path / "few" / "rgb")
    assert "no such folder" in refused(task, tmp_path / "nowhere")
    bad = tmp_path / "bad.yaml"
    bad.write_text("edges: {column: edges, kind: pixel, loss: l1}\n")
    assert "edges.channels: required" in refused(bad, few)
    bad.write_text("- a list\n")
    assert "expected one task" in refused(bad, few)
    ok = labelled_folder(tmp_path / "ok", 60)
    bad.write_text("edges: {column: edges, kind: pixel, loss: l1, channels: 3}\n")
    assert "1 channel(s), but task edges has channels: 3" in refused(bad, ok)
    bad.write_text("normal: {column: edges, kind: pixel, loss: l1, channels: 1}\n")
    assert "the study has a task of that name with another column" in refused(bad, ok)
    assert "is not finished" in refused(task, ok)  # nothing was run for this config
    # a new task learns a column of its own: not the images (`rgb`), not a path out of --images
    for column in ("rgb", "../x", "/etc", "x/../../y"):
        bad.write_text(f"mine: {{column: {column}, kind: pixel, loss: l1, channels: 3}}\n")
        assert f"bad.yaml: mine.column: '{column}'" in refused(bad, ok)
    assert not (tmp_path / "runs" / "position").exists()  # nothing imported


def test_channel_first_npy_labels_are_read_as_their_task_channels(tmp_path):
    """An (1, H, W) `.npy` label was read as (H=1, W, 32 channels): "32 channel(s), but task edges
    has channels: 1". (C, H, W) is accepted where C is less than H and W; any other layout is
    refused naming the layouts accepted."""
    from components.data.raw_files import read_raw
    from pipelines.config import load_pipeline_config
    from pipelines.position.inputs import check_images, load_task

    config = tmp_path / "study.yaml"
    config.write_text(STUDY.format(root=tmp_path / "runs"))
    cfg = load_pipeline_config(config)
    (tmp_path / "edges.yaml").write_text("edges: {column: edges, kind: pixel, loss: l1, channels: 1}\n")
    task = load_task(tmp_path / "edges.yaml")
    folder = labelled_folder(tmp_path / "ok", 60)
    for f in sorted((folder / "edges").iterdir()):
        np.save(f, np.load(f).transpose(2, 0, 1))  # (H, W, 1) -> (1, H, W)
    assert set(check_images(folder, task, cfg, None)) == {"edges"}
    hwc = np.arange(32 * 32 * 2, dtype=np.float32).reshape(32, 32, 2)
    np.save(tmp_path / "chw.npy", hwc.transpose(2, 0, 1))
    np.testing.assert_array_equal(read_raw(tmp_path / "chw.npy"), hwc)
    np.save(tmp_path / "hwc.npy", hwc)
    np.testing.assert_array_equal(read_raw(tmp_path / "hwc.npy"), hwc)
    (tmp_path / "edges3.yaml").write_text("edges: {column: edges, kind: pixel, loss: l1, channels: 3}\n")
    with pytest.raises(ConfigError, match=r"1 channel\(s\), but task edges has channels: 3.*\(C, H, W\)"):
        check_images(folder, load_task(tmp_path / "edges3.yaml"), cfg, None)


def test_predict_never_writes_into_its_images_nor_over_a_file(capsys, tmp_path):
    """`--out` that is, contains or is inside `--images` (resolved: a link counts), or an existing
    file, is refused in one line naming both, before any model is loaded; the photos are untouched
    (an RGB-output task's predictions, `OUT/rgb/<stem>.png`, once went over them)."""
    config = tmp_path / "study.yaml"
    config.write_text(STUDY.format(root=tmp_path / "runs"))
    photos = tmp_path / "photos"
    (photos / "rgb").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photos / "rgb" / "a.png")
    before = (photos / "rgb" / "a.png").read_bytes()
    (tmp_path / "link").symlink_to(photos)

    def refused(images, out):
        code = main(
            ["predict", "-c", str(config), "--model", "m", "--images", str(images), "--out", str(out)]
        )
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        return err

    for images, out in [
        (photos, photos),
        (photos, photos / "preds"),
        (photos / "rgb", photos),
        (photos, tmp_path / "link"),
        (tmp_path / "link" / "rgb", photos / "rgb" / "."),
    ]:
        err = refused(images, out)
        assert f"--out {out}" in err and f"--images {images}" in err, err
    assert "overlap" in refused(photos, photos / "rgb" / "a.png")  # a photo itself
    elsewhere = tmp_path / "notes.txt"
    elsewhere.write_text("mine")
    err = refused(photos, elsewhere)
    assert f"--out {elsewhere}" in err and "is a file" in err
    assert (photos / "rgb" / "a.png").read_bytes() == before and elsewhere.read_text() == "mine"
    assert sorted(p.name for p in photos.rglob("*")) == ["a.png", "rgb"]
    assert not (tmp_path / "runs").exists()  # no tracking store opened, no model loaded
