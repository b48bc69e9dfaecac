"""Imports refuse what would read outside the source or store wrong data, in one line naming the
file, before anything is written (issue 27, part 7): decompression bombs, the reserved `image_id`
column, bit depths that do not match the column's encoding, links out of the root, unsafe stems.
Every fixture is made here with numpy and PIL."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.data.shards import ShardError
from pipelines.cli import main

H = W = 8
STEMS = ("a", "b", "c")


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")  # by name: PIL sees no suffix in "..png"
    return path


def photo_folder(root: Path, stems=STEMS) -> Path:
    """rgb/ (8-bit RGB) and depth/ (16-bit millimetres): a folder that imports cleanly."""
    rng = np.random.default_rng(0)
    for stem in stems:
        save(root / "rgb" / f"{stem}.png", rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        save(root / "depth" / f"{stem}.png", np.full((H, W), 1500, np.uint16))
    return root


def import_folder_cli(root: Path, out: Path, spec: str | None = None) -> int:
    args = ["data", "import-folder", "--root", str(root), "--out", str(out), "--size", str(H)]
    if spec is not None:
        (root.parent / "spec.yaml").write_text(spec)
        args += ["--spec", str(root.parent / "spec.yaml")]
    return main(args)


def refused(capsys, out: Path, *names: str) -> str:
    """The CLI's one error line, naming `names`; nothing written to `out`."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("taskatlas: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(name in lines[0] for name in names), lines[0]
    assert not out.exists(), f"{out} was written to: {sorted(p.name for p in out.rglob('*'))}"
    return lines[0]


def bomb_png(path: Path, side: int = 60_000) -> Path:
    """A valid PNG header for side x side 8-bit grey pixels (3.6 G of them) and one row of data:
    what a decompression bomb looks like to the decoder, in 100 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (side + 1))) + chunk(b"IEND", b"")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def test_a_decompression_bomb_is_refused_in_one_line(tmp_path, capsys):
    root = photo_folder(tmp_path / "src")
    bomb_png(root / "rgb" / "b.png")
    assert import_folder_cli(root, tmp_path / "out") == 2
    assert "decompression bomb" in refused(capsys, tmp_path / "out", "rgb/b.png")


def test_a_column_folder_named_image_id_is_refused(tmp_path, capsys):
    root = photo_folder(tmp_path / "src")
    for stem in STEMS:
        save(root / "image_id" / f"{stem}.png", np.zeros((H, W), np.uint8))
    assert import_folder_cli(root, tmp_path / "out") == 2
    assert "reserved" in refused(capsys, tmp_path / "out", "image_id")


@pytest.mark.parametrize(
    ("spec", "column", "dtype", "expected"),
    [
        ("depth: {scale: 0.001, invalid: 0, bits: 16}", "depth", np.uint8, "16 bits"),  # 8-bit depth
        ("edges: {scale: 0.00392156862745098, bits: 8}", "edges", np.uint16, "8 bits"),  # 16-bit edges
    ],
)
def test_a_file_whose_bit_depth_is_not_the_columns_encoding_is_refused(
    tmp_path, capsys, spec, column, dtype, expected
):
    root = photo_folder(tmp_path / "src")
    for stem in STEMS:
        good = np.uint16 if dtype is np.uint8 else np.uint8
        save(root / column / f"{stem}.png", np.full((H, W), 200, dtype if stem == "b" else good))
    assert import_folder_cli(root, tmp_path / "out", spec) == 2
    refused(capsys, tmp_path / "out", f"{column}/b.png", expected)


def test_without_a_declared_depth_a_column_must_not_mix_8_and_16_bit(tmp_path, capsys):
    root = photo_folder(tmp_path / "src")
    save(root / "depth" / "c.png", np.full((H, W), 150, np.uint8))  # the others are 16-bit millimetres
    assert import_folder_cli(root, tmp_path / "out", "depth: {scale: 0.001}") == 2
    refused(capsys, tmp_path / "out", "depth/c.png", "16-bit", "depth/a.png")


def test_bits_in_the_spec_must_be_8_or_16(tmp_path, capsys):
    root = photo_folder(tmp_path / "src")
    assert import_folder_cli(root, tmp_path / "out", "depth: {bits: 12}") == 2
    refused(capsys, tmp_path / "out", "depth.bits", "8 or 16")


def test_a_link_out_of_the_root_is_refused(tmp_path, capsys):
    root = photo_folder(tmp_path / "src")
    outside = save(tmp_path / "private" / "b.png", np.zeros((H, W, 3), np.uint8))
    (root / "rgb" / "b.png").unlink()
    (root / "rgb" / "b.png").symlink_to(Path("..") / ".." / "private" / "b.png")  # relative, as in a tarball
    assert import_folder_cli(root, tmp_path / "out") == 2
    refused(capsys, tmp_path / "out", "rgb/b.png", str(outside), "outside the import root")


def test_a_column_folder_that_is_a_link_still_imports(tmp_path, capsys):
    """How `taskatlas position` assembles its view: links to whole column folders elsewhere."""
    src = photo_folder(tmp_path / "src")
    view = tmp_path / "view"
    view.mkdir()
    for column in ("rgb", "depth"):
        (view / column).symlink_to(src / column, target_is_directory=True)
    assert import_folder_cli(view, tmp_path / "out") == 0, capsys.readouterr().err


def test_a_taskonomy_link_out_of_the_root_is_refused(tmp_path, capsys):
    root = tmp_path / "tk"
    for p in range(2):
        stem = f"point_{p}_view_0_domain_"
        save(root / "rgb" / f"{stem}rgb.png", np.zeros((H, W, 3), np.uint8))
        save(root / "depth_zbuffer" / f"{stem}depth_zbuffer.png", np.full((H, W), 1024, np.uint16))
    link = root / "depth_zbuffer" / "point_1_view_0_domain_depth_zbuffer.png"
    link.unlink()
    link.symlink_to(save(tmp_path / "elsewhere.png", np.full((H, W), 1024, np.uint16)))
    out = tmp_path / "out"
    assert main(["data", "import-taskonomy", "--root", str(root), "--out", str(out), "--size", str(H)]) == 2
    refused(capsys, out, link.name, "outside the import root")


@pytest.mark.parametrize("name", ["..png", "...png", ".hidden.png", "a b.png", "a\\b.png", "é.png"])
def test_a_stem_that_is_not_a_safe_id_is_refused(tmp_path, capsys, name):
    root = photo_folder(tmp_path / "src")
    save(root / "rgb" / name, np.zeros((H, W, 3), np.uint8))
    save(root / "depth" / name, np.full((H, W), 1500, np.uint16))
    assert import_folder_cli(root, tmp_path / "out") == 2
    assert "not a safe image id" in refused(capsys, tmp_path / "out", name)


def test_ids_the_filesystem_cannot_spell_are_refused_too(tmp_path):
    from components.data.importing import ColumnRule, Found, check_files

    rgb = save(tmp_path / "rgb" / "x.png", np.zeros((H, W, 3), np.uint8))
    for image_id in ("", "a/b", "."):
        with pytest.raises(ShardError, match="not a safe image id"):
            check_files(
                Found([image_id], {"rgb": {image_id: rgb}}), {"rgb": ColumnRule("rgb", "uint8", 3)}, tmp_path
            )


def test_a_spec_without_bits_records_what_it_recorded_before_bits_existed():
    # Every stored import (and `taskatlas position`'s import key) hashes the recorded spec: a
    # field added with its default must not change it, or every finished import is redone.
    from components.data.folder import FolderColumn, recorded_spec

    assert recorded_spec(FolderColumn(scale=0.001, invalid=0)) == {
        "scale": 0.001,
        "offset": 0.0,
        "invalid": 0,
        "labels": False,
    }
    assert recorded_spec(FolderColumn(scale=0.001, bits=16))["bits"] == 16


def test_the_position_import_key_is_the_one_it_was_before_bits_existed():
    from components.config import config_hash
    from components.data.folder import FolderColumn
    from pipelines.config import load_pipeline_config
    from pipelines.position.inputs import _import_config, import_key

    cfg = load_pipeline_config(None, ["data.size=32", "model.downsample=4"])
    listing = [("rgb/a.png", 10, 1), ("edges/a.png", 5, 1)]
    before = {"edges": {"scale": 1.0, "offset": 0.0, "invalid": None, "labels": False}}
    assert import_key(cfg, listing, {"edges": FolderColumn()}) == config_hash(
        "position-data-v1", listing, before, _import_config(cfg)
    )
