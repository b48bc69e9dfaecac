"""The Taskonomy importer, on a tiny tree of PNGs in the public layout."""

import numpy as np
import pytest
from PIL import Image

from components.data.shards import ShardError, ShardStore
from components.data.taskonomy import ImportConfig, import_taskonomy, split_of
from pipelines.cli import main

POINTS, VIEWS, H, W = 10, 2, 24, 32  # non-square on purpose: the importer centre-crops


def write_tree(root):
    rng = np.random.default_rng(0)
    for p in range(POINTS):
        for v in range(VIEWS):
            stem = f"point_{p}_view_{v}_domain_"
            arrays = {
                "rgb": rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
                "depth_zbuffer": np.full((H, W), 512 * (p + 1), np.uint16),  # (p + 1) metres
                "normal": np.full((H, W, 3), [255, 0, 128], np.uint8),
                "segment_semantic": (np.arange(W)[None, :].repeat(H, 0) // 8).astype(np.uint8),
            }
            for domain, arr in arrays.items():
                (root / domain).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(root / domain / f"{stem}{domain}.png")
    (root / "class_scene").mkdir()  # a domain we do not import (not PNG in the release)


def test_import_writes_shards_for_every_domain_found(tmp_path):
    src = tmp_path / "taskonomy"
    write_tree(src)
    config = ImportConfig(size=16, transfer_fraction=0.2, test_fraction=0.2, rows_per_shard=4)
    manifest, unknown, _ = import_taskonomy(src, tmp_path / "out", config)
    assert unknown == ["class_scene"]
    assert {c.name for c in manifest.columns} == {"rgb", "depth_zbuffer", "normal", "segment_semantic"}
    assert sum(manifest.counts.values()) == POINTS * VIEWS
    store = ShardStore(tmp_path / "out")
    for split in ("train", "transfer", "test"):
        if not manifest.counts[split]:
            continue
        data = store.read(split)
        assert data["rgb"].shape[1:] == (3, 16, 16) and data["segment_semantic"].shape[1:] == (16, 16)
        for i, image_id in enumerate(data["image_id"]):
            assert split_of(image_id.split("_view_")[0], config) == split
            point = int(image_id.split("_")[1])
            np.testing.assert_allclose(
                data["depth_zbuffer"][i], point + 1, rtol=1e-3
            )  # 16-bit / 512 = metres
        np.testing.assert_allclose(
            data["normal"][:, :, 0, 0], [[1.0, -1.0, 128 * 2 / 255 - 1]] * len(data["rgb"]), atol=1e-3
        )
        assert set(np.unique(data["segment_semantic"])) <= {0, 1, 2, 3}  # labels are resized, never blended
    points = {}
    for split in ("train", "transfer", "test"):
        for image_id in store.read(split, ["rgb"])["image_id"]:
            points.setdefault(image_id.split("_view_")[0], set()).add(split)
    assert all(len(s) == 1 for s in points.values())  # views of a point share a split
    assert manifest.label_classes["segment_semantic"] == ["class_0", "class_1", "class_2", "class_3"]


def test_a_missing_file_is_named(tmp_path):
    src = tmp_path / "taskonomy"
    write_tree(src)
    (src / "normal" / "point_3_view_1_domain_normal.png").unlink()
    with pytest.raises(
        ShardError, match=r"'normal' lacks 1 of 20 images, e.g. .*point_3_view_1_domain_normal\.png"
    ):
        import_taskonomy(src, tmp_path / "out", ImportConfig(size=16))
    assert not (tmp_path / "out").exists()


def test_cli_import_and_an_unreadable_png(tmp_path, capsys):
    src = tmp_path / "taskonomy"
    write_tree(src)
    assert (
        main(["data", "import-taskonomy", "--root", str(src), "--out", str(tmp_path / "o"), "--size", "8"])
        == 0
    )
    assert "skipped folders that are not known domains: class_scene" in capsys.readouterr().out
    (src / "rgb" / "point_0_view_0_domain_rgb.png").write_bytes(b"garbage")
    assert (
        main(["data", "import-taskonomy", "--root", str(src), "--out", str(tmp_path / "o2"), "--size", "8"])
        == 2
    )
    assert "point_0_view_0_domain_rgb.png: cannot read" in capsys.readouterr().err


def test_omnidata_colour_coded_semantic_imports_with_white_as_no_label(tmp_path):
    """Omnidata's `semantic` PNGs are colour-coded RGB, white unlabelled: each colour becomes a class
    id in sorted colour order (recorded in the manifest), white becomes "no label"."""
    src = tmp_path / "omnidata"
    red, green, white = (200, 0, 0), (0, 90, 10), (255, 255, 255)
    for p in range(6):
        stem = f"point_{p}_view_0_domain_"
        for domain in ("rgb", "semantic"):
            (src / domain).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16, 3), 40 * p, np.uint8)).save(src / "rgb" / f"{stem}rgb.png")
        sem = np.zeros((16, 16, 3), np.uint8)
        sem[:, :8], sem[:, 8:] = (red, green) if p % 2 else (green, white)
        Image.fromarray(sem).save(src / "semantic" / f"{stem}semantic.png")
    config = ImportConfig(size=16, transfer_fraction=0.0, test_fraction=0.0, rows_per_shard=8)
    manifest, _, _ = import_taskonomy(src, tmp_path / "out", config)
    assert manifest.label_classes["segment_semantic"] == ["#005a0a", "#c80000"]  # green 0, red 1
    data = ShardStore(tmp_path / "out").read("train")
    for image_id, labels in zip(data["image_id"], data["segment_semantic"], strict=True):
        odd = int(image_id.split("_")[1]) % 2
        assert (labels[:, :8] == (1 if odd else 0)).all()
        assert (labels[:, 8:] == (0 if odd else 255)).all()  # white: no label


def test_class_ids_and_colours_mixed_in_one_column_are_refused(tmp_path):
    src = tmp_path / "mixed"
    write_tree(src)
    colour = np.zeros((H, W, 3), np.uint8)
    colour[..., 0] = 7
    Image.fromarray(colour).save(src / "segment_semantic" / "point_0_view_0_domain_segment_semantic.png")
    with pytest.raises(ShardError, match="colour-coded; one encoding per column"):
        import_taskonomy(src, tmp_path / "out", ImportConfig(size=16))
    assert not (tmp_path / "out").exists()


def test_a_depth_map_saved_in_8_bits_is_refused_not_read_in_wrong_units(tmp_path):
    src = tmp_path / "eight"
    write_tree(src)
    depth = np.full((H, W), 3, np.uint8)  # 8-bit: would read as 3/512 m
    Image.fromarray(depth).save(src / "depth_zbuffer" / "point_0_view_0_domain_depth_zbuffer.png")
    with pytest.raises(ShardError, match="8-bit, but column depth_zbuffer is encoded in 16 bits"):
        import_taskonomy(src, tmp_path / "out", ImportConfig(size=16))
