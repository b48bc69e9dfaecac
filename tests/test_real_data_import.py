"""Importers on fixtures made here in the public encodings: Taskonomy's (16-bit depth with 65535
holes, 8-bit normals, a `semantic` folder, `mask_valid`) and the generic folder layout."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from components.data.folder import import_folder, parse_spec
from components.data.importing import ImportConfig, split_of
from components.data.shards import ShardError, ShardStore
from components.data.taskonomy import import_taskonomy
from components.errors import ConfigError
from components.tasks import get_task
from pipelines.cli import main

H = W = 16
POINTS = 6
DEPTH_M = 2.0  # every valid depth pixel of the fixture, in metres


def error_line(capsys) -> str:
    """The CLI's error: exactly one line (progress bars aside), no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("taskatlas: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    return lines[0]


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def taskonomy_tree(root, hole_value=65535):
    """Two views per point; depth has a hole (65535) in the top-left quarter and mask_valid marks
    the bottom row invalid; segmentation in the Omnidata folder name `semantic`."""
    rng = np.random.default_rng(0)
    for p in range(POINTS):
        for v in range(2):
            stem = f"point_{p}_view_{v}_domain_"
            depth = np.full((H, W), int(DEPTH_M * 512), np.uint16)
            depth[: H // 2, : W // 2] = hole_value
            mask = np.full((H, W), 255, np.uint8)
            mask[-2:] = 0
            save(root / "rgb" / f"{stem}rgb.png", rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
            save(root / "depth_zbuffer" / f"{stem}depth_zbuffer.png", depth)
            save(root / "normal" / f"{stem}normal.png", np.full((H, W, 3), [255, 0, 128], np.uint8))
            save(
                root / "semantic" / f"{stem}semantic.png",
                (np.arange(W)[None].repeat(H, 0) // 4).astype(np.uint8),
            )
            save(root / "mask_valid" / f"{stem}mask_valid.png", mask)


def test_taskonomy_encodings_holes_masks_aliases_and_incomplete_images(tmp_path, capsys):
    src = tmp_path / "tk"
    taskonomy_tree(src)
    (src / "normal" / "point_2_view_1_domain_normal.png").unlink()  # one image lacks a domain
    big = np.full((H * 2, W * 2), 1024, np.uint16)  # a depth map of another size than its RGB
    save(src / "depth_zbuffer" / "point_4_view_0_domain_depth_zbuffer.png", big)

    # Default: the first missing file is named; nothing is written.
    with pytest.raises(
        ShardError, match=r"'normal' lacks 1 of 12 images, e.g. .*point_2_view_1_domain_normal"
    ):
        import_taskonomy(src, tmp_path / "a", ImportConfig(size=8))
    assert not (tmp_path / "a").exists()
    # Skipping incomplete images still refuses a domain of another size, naming the file, up front.
    args = ["data", "import-taskonomy", "--root", str(src), "--out", str(tmp_path / "b"), "--size", "8"]
    assert main([*args, "--skip-incomplete"]) == 2
    assert "point_4_view_0_domain_depth_zbuffer.png: 32x32 pixels" in error_line(capsys)
    assert not (tmp_path / "b" / "manifest.json").exists()

    big_fixed = np.full((H, W), int(DEPTH_M * 512), np.uint16)
    big_fixed[: H // 2, : W // 2] = 65535
    save(src / "depth_zbuffer" / "point_4_view_0_domain_depth_zbuffer.png", big_fixed)
    assert main([*args, "--skip-incomplete"]) == 0
    assert "skipped 1 incomplete image(s): 1 no normal" in capsys.readouterr().out
    store = ShardStore(tmp_path / "b")
    assert {c.name for c in store.manifest.columns} == {"rgb", "depth_zbuffer", "normal", "segment_semantic"}
    data = {s: store.read(s) for s in ("train", "transfer", "test") if store.manifest.counts[s]}
    ids = [i for d in data.values() for i in d["image_id"]]
    assert len(ids) == 11 and "point_2_view_1" not in ids
    for d in data.values():
        depth = d["depth_zbuffer"][:, 0].astype(np.float64)
        valid = ~np.isnan(depth)
        np.testing.assert_allclose(depth[valid], DEPTH_M, rtol=1e-3)  # holes never smear into valid pixels
        assert np.isnan(depth[:, : 8 // 2 - 1, : 8 // 2 - 1]).all()  # 65535 -> no label, not 128 m
        assert np.isnan(depth[:, -1]).all()  # mask_valid's zeros (the bottom output row is all masked input)
        assert valid[:, 8 // 2 + 1 :, :].any()
        np.testing.assert_allclose(
            d["normal"][:, :, 1, 6], [[1.0, -1.0, 128 * 2 / 255 - 1]] * len(depth), atol=1e-3
        )
        assert set(np.unique(d["segment_semantic"])) <= {0, 1, 2, 3}
    assert store.manifest.label_classes["segment_semantic"] == [f"class_{k}" for k in range(4)]

    assert main(["data", "info", str(tmp_path / "b"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["valid_fraction"]["rgb"] == 1.0 and info["valid_fraction"]["segment_semantic"] == 1.0
    assert 0.5 < info["valid_fraction"]["depth_zbuffer"] < 0.8  # a quarter hole and a masked row


def test_the_depth_loss_ignores_invalid_pixels_whatever_their_value(tmp_path):
    stores = []
    for hole in (65535, 0):  # the same image, its hole under mask_valid 0 holding another raw value
        src = tmp_path / f"tk{hole}"
        taskonomy_tree(src, hole_value=hole)
        mask = np.full((H, W), 255, np.uint8)
        mask[: H // 2, : W // 2] = 0
        mask[-2:] = 0
        for p in range(POINTS):
            for v in range(2):
                save(src / "mask_valid" / f"point_{p}_view_{v}_domain_mask_valid.png", mask)
        import_taskonomy(src, tmp_path / f"out{hole}", ImportConfig(size=8, test_fraction=0.5))
        stores.append(ShardStore(tmp_path / f"out{hole}").read("test"))
    a, b = (torch.from_numpy(s["depth_zbuffer"].astype(np.float32)) for s in stores)
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    task = get_task("depth_zbuffer")
    pred = torch.rand(a.shape, requires_grad=True)
    loss = task.per_image_loss(pred, a)
    np.testing.assert_array_equal(loss.detach().numpy(), task.per_image_loss(pred, b).detach().numpy())
    noisy = pred.detach().clone()
    noisy[torch.isnan(a)] = 1e6  # whatever is predicted where there is no label
    torch.testing.assert_close(task.per_image_loss(noisy, a), loss.detach())
    loss.sum().backward()
    assert (pred.grad[torch.isnan(a)] == 0).all() and torch.isfinite(pred.grad).all()
    everything_missing = torch.full_like(a, float("nan"))
    assert torch.isnan(task.per_image_loss(pred, everything_missing)).all()  # left out of win rates


def test_a_corrupt_segmentation_png_is_one_line_naming_it(tmp_path, capsys):
    src = tmp_path / "tk"
    taskonomy_tree(src)
    bad = src / "semantic" / "point_1_view_0_domain_semantic.png"
    data = bad.read_bytes()
    bad.write_bytes(data[:33] + bytes(40))  # its header (size, mode) intact, its pixel data garbage
    args = ["data", "import-taskonomy", "--root", str(src), "--out", str(tmp_path / "o"), "--size", "8"]
    assert main(args) == 2
    assert f"{bad}: cannot read" in error_line(capsys)
    assert not (tmp_path / "o" / "manifest.json").exists()


def folder_tree(root, stems):
    rng = np.random.default_rng(1)
    for stem in stems:
        save(root / "rgb" / f"{stem}.png", rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        depth = np.full((H, W), 1500, np.uint16)  # millimetres
        depth[0, 0] = 0  # no measurement
        save(root / "depth" / f"{stem}.png", depth)
        parts = (np.arange(H)[:, None].repeat(W, 1) // 4).astype(np.uint8)  # ids 0..3, 0 = unlabelled
        save(root / "parts" / f"{stem}.png", parts)
        flow = np.stack([np.full((H, W), 0.25), np.arange(H * W).reshape(H, W) / 100], -1).astype(np.float32)
        (root / "flow").mkdir(exist_ok=True)
        np.save(root / "flow" / f"{stem}.npy", flow)


def test_the_folder_importer_round_trips_and_a_grown_folder_keeps_ids_and_splits(tmp_path, capsys):
    src = tmp_path / "mine"
    folder_tree(src, [f"img{i:02d}" for i in range(10)])
    (tmp_path / "spec.yaml").write_text(
        "depth: {scale: 0.001, invalid: 0}\nparts: {labels: true, invalid: 0}\n"
    )
    args = [
        "data",
        "import-folder",
        "--root",
        str(src),
        "--spec",
        str(tmp_path / "spec.yaml"),
        "--size",
        str(H),
    ]
    assert main([*args, "--out", str(tmp_path / "v1"), "--test-fraction", "0.3"]) == 0
    capsys.readouterr()
    store = ShardStore(tmp_path / "v1")
    columns = {c.name: (c.dtype, c.shape) for c in store.manifest.columns}
    assert columns == {
        "rgb": ("uint8", (3, H, W)),
        "depth": ("float32", (1, H, W)),
        "parts": ("uint8", (H, W)),
        "flow": ("float32", (2, H, W)),
    }
    config = ImportConfig(test_fraction=0.3)
    first = {}
    for split in ("train", "transfer", "test"):
        d = store.read(split)
        for k, stem in enumerate(d["image_id"]):
            first[stem] = split
            assert split_of(stem, config) == split
            rgb = np.asarray(Image.open(src / "rgb" / f"{stem}.png")).transpose(2, 0, 1)
            np.testing.assert_array_equal(d["rgb"][k], rgb)  # at its own size: exact
            assert np.isnan(d["depth"][k, 0, 0, 0]) and np.allclose(d["depth"][k, 0].ravel()[1:], 1.5)
            parts = d["parts"][k]
            assert (parts[:4] == 255).all() and set(np.unique(parts[4:])) == {1, 2, 3}
            np.testing.assert_allclose(d["flow"][k].transpose(1, 2, 0), np.load(src / "flow" / f"{stem}.npy"))
    assert len(first) == 10 and store.manifest.label_classes["parts"] == [f"class_{k}" for k in range(4)]

    folder_tree(src, [f"img{i:02d}" for i in range(10, 14)])  # the folder grows
    assert main([*args, "--out", str(tmp_path / "v2"), "--test-fraction", "0.3"]) == 0
    grown = ShardStore(tmp_path / "v2")
    assert grown.data_version != store.data_version and sum(grown.manifest.counts.values()) == 14
    for split in ("train", "transfer", "test"):
        for stem in grown.read(split, [])["image_id"]:
            assert first.get(stem, split) == split  # old images keep their ids and splits


def test_channel_first_npy_files_import_as_their_channel_last_twins(tmp_path):
    """`.npy` arrays (C, H, W), as numpy and torch code saves them, were read as (H=C, W=H, C=W)."""
    stores = {}
    for layout in ("hwc", "chw"):
        src = tmp_path / layout
        folder_tree(src, ["a", "b", "c"])
        if layout == "chw":
            for f in (src / "flow").iterdir():
                np.save(f, np.load(f).transpose(2, 0, 1))  # (H, W, 2) -> (2, H, W)
        import_folder(src, tmp_path / f"o-{layout}", ImportConfig(size=8, test_fraction=0.0))
        stores[layout] = ShardStore(tmp_path / f"o-{layout}")
    [flow] = [c for c in stores["chw"].manifest.columns if c.name == "flow"]
    assert flow.shape == (2, 8, 8)
    for split in ("train", "transfer"):
        chw, hwc = stores["chw"].read(split, ["flow"]), stores["hwc"].read(split, ["flow"])
        np.testing.assert_array_equal(chw["flow"], hwc["flow"])


def test_folder_spec_and_layout_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"spec.depth.scal: unknown field"):
        parse_spec({"depth": {"scal": 2}})
    with pytest.raises(ConfigError, match=r"spec.depth.invalid: expected a number"):
        parse_spec({"depth": {"invalid": "zero"}})
    src = tmp_path / "mine"
    folder_tree(src, ["a", "b"])
    with pytest.raises(ConfigError, match=r"spec.normals: no folder"):
        import_folder(src, tmp_path / "o", ImportConfig(size=8), parse_spec({"normals": {}}))
    (src / "depth" / "b.png").unlink()
    with pytest.raises(ShardError, match=r"'depth' lacks 1 of 2 images, e.g. .*depth/b\.\(png\|jpg\|npy\)"):
        import_folder(src, tmp_path / "o", ImportConfig(size=8))
    manifest, found = import_folder(src, tmp_path / "o", ImportConfig(size=8), skip_incomplete=True)
    assert sum(manifest.counts.values()) == 1 and dict(found.skipped) == {"no depth": 1}


def test_nightly_reimports_a_grown_source_folder_as_a_new_data_version(tmp_path):
    from datetime import date

    from pipelines.config import load_pipeline_config
    from pipelines.nightly import nightly_config

    src = tmp_path / "mine"
    folder_tree(src, [f"img{i:02d}" for i in range(8)])
    import_folder(
        src, tmp_path / "data", ImportConfig(size=8, test_fraction=0.3), parse_spec({"depth": {"invalid": 0}})
    )
    overrides = [
        f"storage_root={tmp_path / 'runs'}",
        f"data.path={tmp_path / 'data'}",
        "tasks=[autoencoding]",
        "task_definitions={my_depth: {column: depth, kind: pixel, loss: l1, channels: 1}}",
        "model.downsample=4",
        "data.size=8",
    ]
    cfg = load_pipeline_config(None, overrides)
    assert nightly_config(cfg, date(2026, 11, 20)) == cfg  # the source has not changed: used as it is
    before = ShardStore(tmp_path / "data")
    folder_tree(src, [f"img{i:02d}" for i in range(8, 12)])
    night = nightly_config(cfg, date(2026, 11, 21))
    assert night.data.path.startswith(str(tmp_path / "runs" / "data"))
    after = ShardStore(night.data.path)
    assert after.data_version != before.data_version and sum(after.manifest.counts.values()) == 12
    assert after.manifest.settings["spec"] == before.manifest.settings["spec"]  # the same importer settings
    old = {i: s for s in ("train", "transfer", "test") for i in before.read(s, [])["image_id"]}
    new = {i: s for s in ("train", "transfer", "test") for i in after.read(s, [])["image_id"]}
    assert all(new[i] == split for i, split in old.items())  # old images keep ids and splits
    assert nightly_config(cfg, date(2026, 11, 22)).data.path == night.data.path  # imported once


def test_the_readme_own_task_example_imports_and_its_config_loads(tmp_path, capsys):
    import subprocess
    import sys

    from pipelines.config import load_pipeline_config

    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "examples/make_photo_folder.py", str(tmp_path / "photos"), "--images", "12"],
        cwd=root,
        check=True,
        capture_output=True,
    )
    spec = root / "examples" / "photo-spec.yaml"
    out = tmp_path / "data"
    args = ["data", "import-folder", "--root", str(tmp_path / "photos"), "--spec", str(spec), "--size", "32"]
    assert main([*args, "--out", str(out)]) == 0
    capsys.readouterr()
    cfg = load_pipeline_config(root / "configs" / "own-task.yaml", [f"data.path={out}"])
    assert cfg.task("depth_zbuffer").column == "depth" and cfg.task("boundaries").loss.value == "bce"
    data = ShardStore(out).read("train", ["depth", "boundaries"])
    assert np.isnan(data["depth"]).any() and set(np.unique(data["boundaries"])) <= {0.0, 1.0}
    with pytest.raises(ConfigError, match=r"^data.size: 64, but the images at data.path .* are 32x32"):
        load_pipeline_config(root / "configs" / "own-task.yaml", [f"data.path={out}", "data.size=64"])
    with pytest.raises(
        ConfigError, match=r"task_definitions.boundaries.column: the dataset has no column 'edges'"
    ):
        load_pipeline_config(
            root / "configs" / "own-task.yaml",
            [f"data.path={out}", "task_definitions.boundaries.column=edges"],
        )
