"""Storage addressed one way (`components.storage`), on a local folder and on a real S3-protocol
server (moto's, on loopback); the step marker; the S3 study lock; the bounded local cache."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pyarrow as pa
import pytest

from components.errors import ConfigError
from components.local_cache import cached_file, evict
from components.storage import is_remote, location
from components.study_lock import StudyLock, StudyLocked, lock_store
from pipelines.steps import Step, unfenced


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The S3 server's variables in this process (pyarrow and boto3 read them), and a fresh prefix."""
    from tests.services import s3_env

    for k, v in s3_env(s3_server).items():
        monkeypatch.setenv(k, v)
    return location(f"s3://{s3_server.bucket}/t-{os.urandom(4).hex()}")


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    return location(tmp_path / "root") if request.param == "local" else request.getfixturevalue("s3")


def test_files_round_trip_and_list_the_same_on_both_stores(root):
    (root / "a" / "x.json").write_json({"k": 1})
    (root / "a" / "b" / "y.bin").write_bytes(b"\x00\x01")
    table = pa.table({"v": [1, 2, 3]})
    (root / "t.parquet").write_parquet(table)
    (root / "arr.npy").write_array(np.arange(6, dtype=np.float16).reshape(2, 3))

    assert (root / "a" / "x.json").read_json() == {"k": 1}
    assert (root / "a" / "b" / "y.bin").read_bytes() == b"\x00\x01"
    assert (root / "t.parquet").read_parquet().equals(table)
    assert (root / "t.parquet").parquet_schema().names == ["v"]
    np.testing.assert_array_equal((root / "arr.npy").read_array(), np.arange(6).reshape(2, 3))
    assert sorted(f.name for f in (root / "a").files()) == ["x.json"]
    assert sorted(f.name for f in (root / "a").files(recursive=True)) == ["x.json", "y.bin"]
    assert list((root / "nothing").files()) == []
    assert (root / "a" / "x.json").is_file() and not (root / "missing").exists()

    copy = pickle.loads(pickle.dumps(root / "a"))  # what a Ray task receives
    assert copy == root / "a" and (copy / "x.json").read_json() == {"k": 1}

    (root / "a").rmtree()
    assert not (root / "a" / "x.json").exists() and (root / "t.parquet").exists()
    (root / "t.parquet").unlink()
    (root / "t.parquet").unlink()  # missing is fine
    assert not (root / "t.parquet").exists()


def test_a_local_write_leaves_no_partial_file(tmp_path):
    target = location(tmp_path) / "f.bin"
    target.write_bytes(b"old")
    target.write_bytes(b"new")
    assert target.read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["f.bin"]


def test_uris_are_told_apart_and_bad_ones_are_refused():
    assert is_remote("s3://b/p") and is_remote("gs://b/p")
    assert not is_remote("/tmp/x") and not is_remote("relative/dir") and not is_remote("file:///tmp/x")
    assert location("file:///tmp/x") == location("/tmp/x")
    with pytest.raises(ConfigError, match=r"^storage_root: cannot open 'nosuch://b/p'"):
        location("nosuch://b/p")


def test_a_step_is_complete_only_once_its_marker_is_written_after_its_outputs(root):
    step = Step(root, "stage1/normal", "k1")
    assert not step.complete
    with step.scratch() as scratch:
        (scratch / "sub").mkdir()
        (scratch / "sub" / "table.csv").write_text("a,b\n")
        (scratch / "plot.png").write_bytes(b"png")
        assert not step.complete
        step.finish({"rows": 2}, scratch, fence=unfenced)
    assert step.complete and step.info() == {"rows": 2}
    assert (step.location / "sub" / "table.csv").read_text() == "a,b\n"
    assert (step.location / "plot.png").read_bytes() == b"png"


def test_the_study_lock_on_s3_refuses_a_second_holder_and_frees_on_release(s3):
    first = StudyLock(lock_store(s3), "run", heartbeat_s=0.2)
    second = StudyLock(lock_store(s3), "transfer")
    with first.held():
        with pytest.raises(StudyLocked, match="in use by taskatlas run on host"):
            second.acquire()
        beat = lock_store(s3).read().heartbeat
        import time

        time.sleep(0.6)
        assert lock_store(s3).read().heartbeat > beat  # the heartbeat replaces the record
    assert lock_store(s3).read() is None
    with second.held():
        assert lock_store(s3).read().command == "transfer"


def test_the_s3_lock_record_is_replaced_only_if_unchanged(s3):
    from components.study_lock import Holder

    a, b = (lock_store(s3) for _ in range(2))
    me = Holder("h", 1, "now", "run", "t1", 0.0)
    assert a.create(me) and not b.create(Holder("h", 2, "now", "run", "t2", 0.0))
    seen = b.read()
    assert a.swap(me, Holder("h", 1, "now", "run", "t1", 5.0))  # a heartbeat
    assert not b.swap(seen, None)  # b read the record before it changed: no delete
    assert lock_store(s3).read().heartbeat == 5.0


def test_the_local_cache_makes_an_entry_once_and_evicts_least_recently_used(tmp_path):
    made = []

    def make(content: bytes):
        def write(tmp):
            made.append(content)
            tmp.write_bytes(content)

        return write

    a = cached_file("s3://b/a.npy", make(b"a" * 100), root=tmp_path)
    assert cached_file("s3://b/a.npy", make(b"other"), root=tmp_path).read_bytes() == b"a" * 100
    assert made == [b"a" * 100]
    b = cached_file("s3://b/b.npy", make(b"b" * 100), root=tmp_path)
    os.utime(a, (1, 1))  # a: least recently used
    assert evict(tmp_path, limit=150) == [a]
    assert b.exists() and not a.exists()


def test_a_dataset_written_to_s3_reads_back_and_a_corrupt_shard_is_named(s3):
    from components.data.scenes import SceneConfig
    from components.data.shards import ShardError, ShardStore
    from components.data.synthetic import DatasetConfig, generate_dataset

    config = DatasetConfig(
        n_train=4, n_transfer=4, n_test=4, seed=1, rows_per_shard=2, scene=SceneConfig(size=16)
    )
    generate_dataset(s3 / "data", config)
    store = ShardStore((s3 / "data").uri)
    assert len(store.read("test", ["rgb"])["rgb"]) == 4

    first, second = store.shards("train")[:2]
    (s3 / "data" / first.path).write_bytes((s3 / "data" / second.path).read_bytes())  # same schema, rows
    fresh = ShardStore((s3 / "data").uri)
    assert [p.name for p in fresh.shard_paths("train")] == ["part-00000.parquet", "part-00001.parquet"]
    with pytest.raises(ShardError, match=r"^shard train/part-00000.parquet: corrupt, sha256"):
        fresh.read("train", ["rgb"])  # the reader of the bytes checks them
