"""The shard store: determinism, verification with clear errors, and resumable writes."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from components.data.shards import (
    MANIFEST,
    ShardError,
    ShardStore,
    file_sha256,
    read_manifest,
    write_manifest,
)
from components.data.synthetic import DatasetConfig, generate_dataset, render_images
from components.training import rank_rows
from tests.conftest import TINY


def copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_same_seed_gives_byte_identical_shards(tiny_dataset, tmp_path):
    generate_dataset(tmp_path / "again", TINY)
    again, first = read_manifest(tmp_path / "again"), read_manifest(tiny_dataset)
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in first.shards]
    assert again.data_version == first.data_version
    other = generate_dataset(tmp_path / "other", DatasetConfig(**{**TINY.__dict__, "seed": TINY.seed + 1}))
    assert other.data_version != first.data_version


def test_store_reads_back_exactly_what_was_rendered(tiny_dataset):
    store = ShardStore(tiny_dataset)
    assert store.manifest.counts == {"train": 40, "transfer": 16, "test": 16}
    data = store.read("transfer")
    expected = render_images(TINY, "transfer", 0, 16)
    assert list(data["image_id"][:2]) == ["transfer-0000000", "transfer-0000001"]
    for name, arr in expected.items():
        np.testing.assert_array_equal(data[name], arr)
        assert data[name].dtype == arr.dtype


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_ranks_read_equal_disjoint_slices_opening_only_their_shards(tiny_dataset, tmp_path, world_size):
    # 40 train rows in shards of 16, 16, 8: a rank's rows may span two shards.
    whole = ShardStore(tiny_dataset).read("train", ["normal"])
    slices = []
    for rank in range(world_size):
        start, stop = rank_rows(40, rank, world_size)
        store = ShardStore(tiny_dataset)
        part = store.read_rows("train", ["normal"], start, stop)
        assert len(part["image_id"]) == 40 // world_size  # equal: every DDP rank takes as many steps
        np.testing.assert_array_equal(part["normal"], whole["normal"][start:stop])
        opened = {info.path for info in store.shards("train") if info.path in store._verified}
        first_shard, last_shard = start // 16, (stop - 1) // 16
        assert len(opened) == last_shard - first_shard + 1  # the others were never read
        slices.extend(part["image_id"])
    assert len(set(slices)) == len(slices) == 40 - 40 % world_size


def test_corrupted_shard_is_named_and_nothing_is_returned(tiny_dataset, tmp_path):
    root = copy(tiny_dataset, tmp_path)
    shard = root / "test/part-00000.parquet"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte inside the data pages
    shard.write_bytes(bytes(raw))
    store = ShardStore(root)
    with pytest.raises(ShardError, match=r"test/part-00000\.parquet.*corrupt"):
        store.read("test")
    shard.write_bytes(b"not parquet at all")
    with pytest.raises(ShardError, match=r"test/part-00000\.parquet: not a readable Parquet"):
        ShardStore(root).read("test")


def _rewrite(root, rel, table):
    pq.write_table(table, root / rel)
    manifest = read_manifest(root)
    shards = tuple(
        s if s.path != rel else type(s)(s.split, s.path, s.rows, file_sha256(root / rel))
        for s in manifest.shards
    )
    write_manifest(root, type(manifest)(**{**manifest.__dict__, "shards": shards}))


def test_missing_column_is_named(tiny_dataset, tmp_path):
    root = copy(tiny_dataset, tmp_path)
    rel = "train/part-00001.parquet"
    _rewrite(root, rel, pq.read_table(root / rel).drop_columns(["normal"]))
    store = ShardStore(root)
    store.read("test")  # other splits are fine
    with pytest.raises(ShardError, match=r"train/part-00001\.parquet: missing column 'normal'"):
        store.read("train")


def test_wrong_shape_is_named(tiny_dataset, tmp_path):
    import pyarrow as pa

    root = copy(tiny_dataset, tmp_path)
    rel = "test/part-00000.parquet"
    table = pq.read_table(root / rel)
    depth = table.column("depth_zbuffer").combine_chunks().to_numpy_ndarray()[:, :, :16, :16].copy()
    i = table.schema.get_field_index("depth_zbuffer")
    _rewrite(
        root, rel, table.set_column(i, "depth_zbuffer", pa.FixedShapeTensorArray.from_numpy_ndarray(depth))
    )
    with pytest.raises(
        ShardError, match=r"column 'depth_zbuffer' has shape \(1, 16, 16\), manifest says shape \(1, 32, 32\)"
    ):
        ShardStore(root).read("test", ["depth_zbuffer"])


def test_missing_or_edited_manifest_is_an_error(tiny_dataset, tmp_path):
    root = copy(tiny_dataset, tmp_path)
    data = json.loads((root / MANIFEST).read_text())
    data["shards"][0]["rows"] += 1
    (root / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ShardError, match="data_version does not match"):
        ShardStore(root)
    (root / MANIFEST).unlink()
    with pytest.raises(ShardError, match="no manifest"):
        ShardStore(root)


def test_interrupted_generation_resumes_without_redoing_shards(tiny_dataset, tmp_path):
    out = tmp_path / "resumed"
    written = []

    def die_after_two(n):
        written.append(n)
        if len(written) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_dataset(out, TINY, progress=die_after_two)
    assert not (out / MANIFEST).exists()
    kept = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    assert len(kept) == 2
    manifest = generate_dataset(out, TINY)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # not rewritten
    assert manifest.data_version == read_manifest(tiny_dataset).data_version


def test_other_settings_never_overwrite_a_finished_dataset(tiny_dataset, tmp_path):
    root = copy(tiny_dataset, tmp_path)
    before = (root / MANIFEST).read_text()
    with pytest.raises(ShardError, match=r"already holds a different dataset.*seed"):
        generate_dataset(root, DatasetConfig(**{**TINY.__dict__, "seed": 99}))
    assert (root / MANIFEST).read_text() == before
    assert generate_dataset(root, TINY).data_version == read_manifest(root).data_version
