"""Stage I's settings without Ray: the effective batch, and what goes into a network's key."""

from types import SimpleNamespace

import pytest

from components.data.shards import ShardStore
from components.errors import ConfigError, TaskatlasError
from pipelines.config import load_pipeline_config
from pipelines.hparams import HParams
from pipelines.stage1.plan import network_runs, worker_batch_size
from pipelines.stage1.run import Stage1
from pipelines.steps import unfenced


def stage(tmp_path, dataset, *overrides) -> Stage1:
    base = [f"storage_root={tmp_path}", f"data.path={dataset}", "data.size=32", "model.downsample=4"]
    cfg = load_pipeline_config(None, [*base, "train.use_gpu=false", *overrides])
    return Stage1(cfg, ShardStore(dataset), SimpleNamespace(tracking_uri="sqlite:///x.db"), "", unfenced)  # type: ignore[arg-type]


def test_the_effective_batch_does_not_grow_with_the_worker_count(tmp_path, tiny_dataset):
    assert [worker_batch_size(32, n) for n in (1, 2, 3, 64)] == [32, 16, 11, 1]
    hparams = HParams(lr=1e-3, weight_decay=0.0, batch_size=32)
    for workers, per_worker in ((1, 32), (2, 16), (4, 8)):
        s = stage(tmp_path, tiny_dataset, f"train.num_workers={workers}")
        config = s.worker_config(s.config.task("normal"), hparams, run_id="r")
        assert config.batch_size == per_worker and config.lr == 1e-3  # the same lr for the same batch


def test_networks_are_dealt_to_as_few_train_runs_as_keep_every_slot_busy():
    nine = list("abcdefghi")
    assert network_runs(nine, slots=2, per_run=0) == [list("acegi"), list("bdfh")]
    assert network_runs(nine, slots=4, per_run=0) == [list("aei"), list("bf"), list("cg"), list("dh")]
    assert network_runs(nine, slots=2, per_run=1) == [[n] for n in nine]  # a run per network
    assert [len(r) for r in network_runs(nine, slots=2, per_run=3)] == [3, 3, 3]
    assert network_runs(list("ab"), slots=8, per_run=0) == [["a"], ["b"]]  # never an empty run
    assert network_runs([], slots=2, per_run=0) == []


def test_networks_per_run_is_not_in_a_networks_key(tmp_path, tiny_dataset):
    hparams = HParams(lr=1e-3, weight_decay=0.0, batch_size=32)
    keys = {
        stage(tmp_path, tiny_dataset, f"train.networks_per_run={n}")
        .plan.train_step(stage(tmp_path, tiny_dataset).config.task("normal"), hparams)
        .key
        for n in (0, 1, 3)
    }
    assert len(keys) == 1
    with pytest.raises(ConfigError, match=r"train\.networks_per_run"):
        stage(tmp_path, tiny_dataset, "train.networks_per_run=-1")


def test_how_a_network_is_trained_is_in_its_key(tmp_path, tiny_dataset):
    hparams = HParams(lr=1e-3, weight_decay=0.0, batch_size=32)

    def key(*overrides):
        s = stage(tmp_path, tiny_dataset, *overrides)
        return s.plan.train_step(s.config.task("normal"), hparams)

    base = key("train.num_workers=1")
    assert key("train.num_workers=2") != base
    assert key("train.num_workers=1", "train.loader=ray_data") != base
    with_ray_data = key("train.num_workers=1", "train.loader=ray_data")
    assert key("train.num_workers=1", "train.loader=ray_data", "train.cache_in_memory=false") != with_ray_data
    # cache_in_memory is a setting of the Ray Data loader only: workers reading shards keep them anyway
    assert key("train.num_workers=1", "train.cache_in_memory=false") == base
    assert (
        key("train.num_workers=1", "train.max_failures=5", "train.report_poll_s=2.0") == base
    )  # how it runs


def test_an_unknown_loader_is_refused_naming_the_field(tmp_path, tiny_dataset):
    with pytest.raises(ConfigError, match=r"^train\.loader: 'disk' is not one of shards, ray_data$"):
        stage(tmp_path, tiny_dataset, "train.loader=disk")


def test_more_workers_than_train_images_is_refused_before_any_work(tmp_path, tiny_dataset):
    stage(tmp_path, tiny_dataset, "train.num_workers=40").plan.check_worker_rows(40)  # 40 images: one each
    with pytest.raises(
        TaskatlasError, match=r"^train\.num_workers: 41 workers, but the train split has only 40"
    ):
        stage(tmp_path, tiny_dataset, "train.num_workers=41").plan.check_worker_rows(41)
