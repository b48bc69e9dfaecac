"""`taskatlas data ...` end to end, in-process, and the Ray Data reader."""

import json

import numpy as np

from components.data.shards import ShardStore
from pipelines.cli import main


def test_generate_info_and_preview(tmp_path, capsys):
    out = tmp_path / "ds"
    args = [
        "data",
        "generate",
        "--out",
        str(out),
        "--n-train",
        "6",
        "--n-transfer",
        "3",
        "--n-test",
        "3",
        "--size",
        "32",
    ]
    assert main(args) == 0
    assert "images       12 (train 6, transfer 3, test 3)" in capsys.readouterr().out
    assert main(["data", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["counts"] == {"train": 6, "transfer": 3, "test": 3}
    assert info["columns"]["normal"] == ["float16", [3, 32, 32]]
    assert main(args) == 0  # a rerun reuses the finished dataset
    png = tmp_path / "scene.png"
    assert main(["data", "preview", "--out", str(png), "--dataset", str(out), "--index", "1"]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["data", "generate", "--out", str(tmp_path / "x"), "--size", "4"]) == 2
    assert "size must be in [8, 1024], got 4" in capsys.readouterr().err
    assert main(["data", "info", str(tmp_path / "nowhere")]) == 2
    assert "no manifest" in capsys.readouterr().err


def test_ray_data_reads_verified_shards(tiny_dataset, ray_session):
    from pipelines.stage1.ray_data import ray_dataset

    store = ShardStore(tiny_dataset)
    ds = ray_dataset(store, "train", ["rgb", "depth_zbuffer"])
    batches = list(ds.iter_batches(batch_size=16, batch_format="numpy"))
    rgb = np.concatenate([b["rgb"] for b in batches])
    ids = np.concatenate([b["image_id"] for b in batches])
    expected = store.read("train", ["rgb"])
    order = np.argsort(ids)
    np.testing.assert_array_equal(rgb[order], expected["rgb"][np.argsort(expected["image_id"])])
    assert batches[0]["depth_zbuffer"].shape[1:] == (1, 32, 32)
