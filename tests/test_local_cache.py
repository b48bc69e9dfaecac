"""The local feature cache is verified: each entry records its size and SHA-256 when written, is
checked once per process when first used, and a damaged one is named, removed and made again; its
size bound never evicts what the readout being served needs."""

from __future__ import annotations

import io

import numpy as np
import pytest

from components import local_cache
from components.storage import location
from components.transfer.feature_files import FEATURES_DONE, feature_array


@pytest.fixture
def features(tmp_path, monkeypatch):
    """A complete feature folder of 3 blocks (12 images of (4, 2, 2) features), a cache of this
    test's own, and a fresh process's view of both (nothing verified or memory-mapped yet)."""
    monkeypatch.setenv("TASKATLAS_CACHE", str(tmp_path / "cache"))
    folder = location(tmp_path / "features" / "enc" / "v1" / "none")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((12, 4, 2, 2)).astype(np.float16)
    ids = np.array([f"img{i:02d}" for i in range(12)])
    for b in range(3):
        buf = io.BytesIO()
        np.savez(buf, ids=ids[b::3], x=x[b::3])
        (folder / "a1" / "test" / f"{b}.npz").write_bytes(buf.getvalue())
    (folder / FEATURES_DONE).write_json({"attempt": "a1"})
    new_process()
    yield folder.uri, ids, x
    new_process()


def new_process() -> None:
    """What a new worker process starts with: no entry verified, no array mapped."""
    feature_array.cache_clear()
    local_cache._verified.clear()


def entries(root) -> dict[str, object]:
    """The cache's entries: "ids" and "x" (the features)."""
    found = [p for p in root.glob("*/*.npy")]
    return {("ids" if np.load(p).dtype.kind == "U" else "x"): p for p in found}


def test_a_fresh_entry_reads_back_and_is_reused(features, tmp_path):
    folder, ids, x = features
    got_ids, got_x = feature_array(folder, "test")
    assert list(got_ids) == list(ids) and np.array_equal(got_x, x)
    new_process()
    made = entries(tmp_path / "cache")
    stamp = {k: p.stat().st_ino for k, p in made.items()}
    assert np.array_equal(feature_array(folder, "test")[1], x)
    assert {k: p.stat().st_ino for k, p in entries(tmp_path / "cache").items()} == stamp  # not made again


@pytest.mark.parametrize("damage", ["truncate", "zero", "record"])
def test_a_damaged_entry_is_named_removed_and_made_again(features, tmp_path, capsys, damage):
    """Cut short: "mmap length is greater than file size" on every rerun, naming no file. Zeroed:
    used silently. A record lost or unreadable: the entry cannot be checked, so it is made again."""
    folder, ids, x = features
    feature_array(folder, "test")
    new_process()
    entry = entries(tmp_path / "cache")["x"]
    data = entry.read_bytes()
    if damage == "truncate":
        entry.write_bytes(data[: len(data) - 16])
    elif damage == "zero":
        entry.write_bytes(data[:128] + bytes(len(data) - 128))  # the header kept: a valid .npy of zeros
    else:
        next(entry.parent.glob(f"{entry.name}.*")).write_text("{")
    got_ids, got_x = feature_array(folder, "test")
    assert list(got_ids) == list(ids) and np.array_equal(got_x, x)
    [line] = capsys.readouterr().err.strip().splitlines()
    assert str(entry) in line and "made again" in line
    new_process()
    feature_array(folder, "test")  # sound again: nothing said
    assert capsys.readouterr().err == ""


def test_an_entry_is_checked_once_per_process(features, monkeypatch):
    folder = features[0]
    feature_array(folder, "test")
    checked, sha256 = [], local_cache._sha256
    monkeypatch.setattr(local_cache, "_sha256", lambda p: checked.append(p) or sha256(p))
    new_process()
    feature_array(folder, "test")
    feature_array.cache_clear()  # the same process asks again: no second check
    feature_array(folder, "test")
    assert len(checked) == 2  # ids and features, once each


def test_a_bound_below_one_split_never_evicts_what_the_readout_needs(features, tmp_path, monkeypatch):
    """`TASKATLAS_CACHE_GB` smaller than one split's features: writing the features evicted the
    image ids just written (FileNotFoundError). The bound holds again for the next entry."""
    folder, ids, x = features
    monkeypatch.setenv("TASKATLAS_CACHE_GB", "1e-9")
    got_ids, got_x = feature_array(folder, "test")
    assert list(got_ids) == list(ids) and np.array_equal(got_x, x)


def test_an_entry_evicted_by_another_process_before_it_is_read_is_made_again(tmp_path):
    made = []

    def make(tmp):
        made.append(tmp)
        with open(tmp, "wb") as f:
            np.save(f, np.arange(5))

    path = local_cache.cached_file("s3://b/a.npy", make, root=tmp_path)
    path.unlink()  # another process's eviction, between its lookup and our read
    assert np.array_equal(local_cache.cached_array("s3://b/a.npy", make, root=tmp_path), np.arange(5))
    assert len(made) == 2
