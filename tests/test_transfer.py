"""Stage II: the readout and feature parts alone, then the Ray fan-out on a real local Ray.

The fan-out tests run on `tiny_dataset` (16 transfer / 16 test images, 32x32) with stand-in
Stage I outputs: seeded, untrained task networks and their per-image test losses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from components.data.shards import ShardStore
from components.models import ModelConfig, build_network
from components.storage import location
from components.tasks import InputTransform, get_task
from components.training import iter_batches, per_image_losses
from components.transfer import (
    FeatureKind,
    FeatureSource,
    Readout,
    ReadoutKind,
    ReadoutSettings,
    baseline,
    build_readout,
    plan_transfers,
    random_encoder,
    train_readout,
    trained_encoder,
    view_input,
)
from components.transfer.feature_files import FeatureEncoder
from components.transfer.features import PixelFeatures
from components.transfer.jobs import ReadoutJob, calibrate_readout
from components.transfer.readout import score_network
from components.transfer.readout_files import ReadoutOutcome, attempt_events, read_readout
from pipelines.config import load_pipeline_config
from pipelines.hparams import HParams
from pipelines.invocation import open_tracker
from pipelines.results import TaskResult
from pipelines.stage2.fanout import validation_losses
from pipelines.stage2.readout_runs import readout_run_name
from pipelines.stage2.run import Stage2
from pipelines.steps import unfenced

pytestmark = pytest.mark.numerics  # CI runs these again under another CPU kernel path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ModelConfig(width=8, downsample=4)
TASKS = ("normal", "reshading", "edge_texture")
BASE = [
    "data.size=32",
    "model.width=8",
    "model.downsample=4",
    "transfer.orders=[2]",
    "transfer.beams=[2]",
    "transfer.batch_size=8",
    "transfer.width=16",
    "transfer.epochs=2",
    "transfer.replicates=1",  # the fan-out tests count readouts; test_replicates_* set their own
]


# ---------------------------------------------------------------- the plain parts


@pytest.mark.parametrize(("task", "shape"), [("normal", (3, 32, 32)), ("class_object", (3,))])
def test_readout_network_maps_concatenated_features_to_the_targets_output(task, shape):
    net = build_readout(get_task(task), in_channels=24, model=MODEL, image_size=32, width=16)
    out = net(torch.randn(2, 24, 8, 8))  # three sources of 8 channels at 32 / 4
    assert out.shape == (2, *shape)
    convs = [m for m in net.transfer if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3), (3, 3)] and convs[-1].out_channels == 8


def test_train_readout_learns_and_scores_every_test_image():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8, 8, 8)).astype(np.float16)
    y = torch.sigmoid(F.interpolate(torch.from_numpy(x[:, :1]).float(), scale_factor=4)).numpy()
    ids = np.array([f"img-{i}" for i in range(64)])
    kwargs = {"task": get_task("reshading"), "model": MODEL, "image_size": 32, "device": torch.device("cpu")}
    result = train_readout(
        **kwargs,
        transfer_x=x,
        transfer_y=y,
        test_x=x,
        test_y=y,
        test_ids=ids,
        settings=ReadoutSettings(epochs=15, batch_size=16, width=16, lr=3e-3),
    )
    assert result.losses.shape == (64,) and list(result.image_ids) == list(ids)
    assert result.train_losses[-1] < 0.5 * result.train_losses[0]
    assert np.isfinite(result.losses).all() and result.seconds > 0


def test_pixel_features_rearrange_the_image_to_the_representations_shape():
    rgb = torch.rand(2, 3, 32, 32)
    features = PixelFeatures(4)(rgb)
    assert features.shape == (2, 48, 8, 8)
    assert torch.allclose(F.pixel_shuffle(features, 4) * 0.25 + 0.5, rgb, atol=1e-6)


def test_views_are_the_targets_input_and_noise_depends_only_on_seed_and_image():
    rgb = torch.rand(3, 3, 32, 32)
    ids = ["a", "b", "c"]
    assert torch.equal(view_input(rgb, InputTransform.NONE, ids), rgb)
    noisy = view_input(rgb, InputTransform.NOISE, ids, seed=1)
    assert torch.equal(view_input(rgb[1:], InputTransform.NOISE, ids[1:], seed=1), noisy[1:])  # any batching
    assert not torch.equal(view_input(rgb, InputTransform.NOISE, ids, seed=2), noisy)
    gray = view_input(rgb, InputTransform.GRAYSCALE, ids)
    assert torch.equal(gray[:, 0], gray[:, 2])


def test_random_encoder_is_fixed_by_its_seed_and_trained_encoder_matches_the_network():
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(random_encoder(MODEL, 3)(x), random_encoder(MODEL, 3)(x))
    assert not torch.equal(random_encoder(MODEL, 3)(x), random_encoder(MODEL, 4)(x))
    torch.manual_seed(0)
    net = build_network(get_task("normal"), MODEL, 32).eval()
    encoder = trained_encoder(net.state_dict(), MODEL)
    assert torch.equal(encoder(x), net.encode(x))
    assert not any(p.requires_grad for p in encoder.parameters())


def test_feature_encoder_runs_every_source_and_view_on_one_batch(tmp_path):
    torch.manual_seed(0)
    torch.save(build_network(get_task("normal"), MODEL, 32).state_dict(), tmp_path / "normal.pt")
    normal = FeatureSource("normal", FeatureKind.ENCODER, "k-normal", str(tmp_path / "normal.pt"))
    pairs = [
        (normal, InputTransform.NONE),
        (normal, InputTransform.NOISE),
        (FeatureSource("pixels", FeatureKind.PIXELS, "k-pixels"), InputTransform.NONE),
        (FeatureSource("random", FeatureKind.RANDOM, "k-random"), InputTransform.NONE),
    ]
    encoder = FeatureEncoder(pairs, MODEL, use_gpu=False, log=str(tmp_path / "log"))
    assert len(encoder.modules) == 3  # normal's encoder is loaded once for both views
    rgb = np.random.default_rng(0).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    out = encoder({"image_id": np.array([f"i{k}" for k in range(5)]), "rgb": rgb})
    assert [out[f"f{i}"].shape for i in range(4)] == [(5, 8, 8, 8), (5, 8, 8, 8), (5, 48, 8, 8), (5, 8, 8, 8)]
    assert out["f0"].dtype == np.float16 and not np.array_equal(out["f0"], out["f1"])
    assert len((tmp_path / "log").read_text().splitlines()) == 4


def test_self_and_the_t_to_t_readout_of_denoising_see_identical_inputs(tmp_path, tiny_dataset):
    """`self` is scored on the readouts' inputs: noise fixed per image id (not per batch), the
    same labels, loss and precision; so its network's encoder reproduces the cached features."""
    store = ShardStore(tiny_dataset)
    task = get_task("denoising")
    torch.manual_seed(0)
    net = build_network(task, MODEL, 32).eval()
    torch.save(net.state_dict(), tmp_path / "denoising.pt")
    source = FeatureSource("denoising", FeatureKind.ENCODER, "k", str(tmp_path / "denoising.pt"))
    test = store.read("test", ["rgb"])
    ids = test["image_id"].astype(str)
    cached = FeatureEncoder([(source, InputTransform.NOISE)], MODEL, use_gpu=False)(
        {"image_id": ids, "rgb": test["rgb"]}
    )["f0"]
    seen = []
    net.encode = lambda x: seen.append(x) or x  # record what the scored network is fed
    net.forward = lambda x: torch.zeros(len(x), 3, 32, 32) + net.encode(x).mean()
    score_network(net, test["rgb"], ids, test["rgb"], task, torch.device("cpu"))
    restored = build_network(task, MODEL, 32).eval()
    restored.load_state_dict(torch.load(tmp_path / "denoising.pt", weights_only=True))
    with torch.no_grad():
        features = restored.encode(torch.cat(seen)).numpy().astype(np.float16)
    np.testing.assert_array_equal(features, cached)
    # In a different batching the same images get the same noise.
    seen.clear()
    score_network(net, test["rgb"][3:], ids[3:], test["rgb"][3:], task, torch.device("cpu"))
    with torch.no_grad():
        np.testing.assert_array_equal(restored.encode(torch.cat(seen)).numpy().astype(np.float16), cached[3:])


def test_calibration_times_a_readout_shaped_like_the_plan():
    job = ReadoutJob(
        readout=Readout("segment_semantic", ("normal",)),
        task=get_task("segment_semantic"),
        feature_dirs=("",),
        data_root="",
        model=MODEL,
        image_size=32,
        channels=6,
        settings=ReadoutSettings(epochs=10, batch_size=8, width=8),
        path="",
        use_gpu=False,
        threads=1,
    )
    seconds = calibrate_readout(job, n_images=8, n_transfer=80, n_test=16)
    assert 0 < seconds < 60


# ---------------------------------------------------------------- Ray fan-out


def fake_stage1(root: Path, store: ShardStore, tasks=TASKS) -> dict[str, TaskResult]:
    """Stand-ins for Stage I's outputs: seeded untrained networks and their test losses."""
    results = {}
    test = store.read("test", list(dict.fromkeys(["rgb", *(get_task(t).column for t in tasks)])))
    for i, name in enumerate(tasks):
        task = get_task(name)
        torch.manual_seed(100 + i)
        net = build_network(task, MODEL, 32)
        out = root / "stage1" / name / "fake"
        out.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), out / "model.pt")
        ids, losses = per_image_losses(net, iter_batches(test, 64), task, torch.device("cpu"))
        pq.write_table(pa.table({"image_id": ids.astype(str), "loss": losses}), out / "test_losses.parquet")
        results[name] = TaskResult(
            name, f"fake{i}", str(out / "model.pt"), float(losses.mean()), HParams(1e-3, 1e-4, 32), "", "1"
        )
    return results


def make_stage2(root: Path, store: ShardStore, *overrides: str, tasks=TASKS, **kwargs) -> Stage2:
    cfg = load_pipeline_config(
        None, [f"storage_root={root}", f"tasks=[{','.join(tasks)}]", *BASE, *overrides]
    )
    tracker = open_tracker(cfg)
    return Stage2(cfg, store, tracker, tracker.start_run("test"), unfenced, **kwargs)


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_dataset, ray_session):
    """One storage root for the fan-out tests: features are encoded once, then shared."""
    root = tmp_path_factory.mktemp("stage2")
    store = ShardStore(tiny_dataset)
    return root, store, fake_stage1(root, store)


def _done_counts(keys, readouts) -> Counter:
    return Counter(
        {r: attempt_events(keys.path(r)).count("done") for r in readouts if r.kind.value != "self"}
    )


def _candidate_runs(stage: Stage2, key: str) -> list:
    """The candidate runs (in the readouts experiment) under the target runs of Stage II key `key`."""
    client = stage.tracker.client
    query = f"tags.stage = 'transfer_target' and tags.key = '{key}'"
    targets = {r.info.run_id for r in client.search_runs([stage.tracker.experiment_id], query)}
    runs = client.search_runs([stage.tracker.companion("readouts")], "", max_results=5000)
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") in targets]


def _readout_runs(stage: Stage2, key: str) -> Counter:
    """Names of the candidate runs of Stage II key `key`: how many runs each."""
    return Counter(r.info.run_name for r in _candidate_runs(stage, key))


def test_features_are_encoded_once_per_encoder_and_reused(tmp_path, tiny_dataset, ray_session):
    store = ShardStore(tiny_dataset)
    tasks = (*TASKS, "denoising")  # a target whose input is noisy: its readouts see that view
    results = fake_stage1(tmp_path, store, tasks)
    log = tmp_path / "encode.log"
    overrides = ("transfer.orders=[]", "transfer.beams=[]", "transfer.epochs=1")
    make_stage2(tmp_path, store, *overrides, tasks=tasks, encode_log=log).run(results)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    by_source = {}
    for line in lines:
        by_source.setdefault((line["source"], line["view"]), []).extend(line["ids"])
    assert len(by_source) == (len(tasks) + 2) * 2  # each encoder, random, pixels; views none and noise
    all_ids = set(store.read("transfer", [])["image_id"]) | set(store.read("test", [])["image_id"])
    for ids in by_source.values():
        assert len(ids) == len(all_ids) and set(ids) == all_ids  # every image exactly once
    # another Stage II config (new key) over the same encoders and data: nothing is encoded again
    make_stage2(tmp_path, store, *overrides[:2], "transfer.epochs=2", tasks=tasks, encode_log=log).run(
        results
    )
    assert len(log.read_text().splitlines()) == len(lines)


def test_fanout_runs_the_plan_and_logs_a_run_per_candidate(env):
    root, store, results = env
    stage = make_stage2(root, store)
    seconds, slots = stage.estimate(stage.jobs.plan(list(TASKS)))  # what the CLI prints before running
    assert seconds > 0 and slots == 2
    result = stage.run(results)
    assert result.failed == () and result.ran == 9 + 3 + 3 + 3  # `self` is read, not trained
    assert result.counts == {"order 1": 9, "order 2": 3, "self": 3, "pixels": 3, "random": 3}

    losses = result.all_losses()
    assert losses.column_names == ["target", "sources", "image_id", "loss", "replicate"]
    assert losses.num_rows == 21 * 16
    keys = pc.binary_join_element_wise(
        losses["target"], pc.binary_join(losses["sources"], "+"), losses["image_id"], "|"
    )
    assert len(pc.unique(keys)) == losses.num_rows  # no duplicated (target, sources, image)

    summary = result.summary().to_pylist()
    assert {"target", "sources", "order", "replicate", "mean_loss", "seconds"} <= set(summary[0])

    runs = _readout_runs(stage, result.key)
    assert len(runs) == 21 and set(runs.values()) == {1}
    assert (
        "edge_texture <- normal+reshading" in runs
        or "normal <- edge_texture+reshading" in runs  # target first
    )
    plan_readouts = [Readout(r["target"], tuple(r["sources"]), ReadoutKind(r["kind"])) for r in summary]
    assert set(_done_counts(stage.jobs.readout_keys(results), plan_readouts).values()) == {1}

    again = make_stage2(root, store).run(results)  # complete: skipped as a whole
    assert again.ran == 0 and again.key == result.key and again.losses_dir == result.losses_dir


def test_beams_are_chosen_on_validation_losses_averaged_over_replicates_never_on_test_losses():
    plan = plan_transfers(["t"], ["a", "b", "c", "t"], orders=(2,), beams=(2,), replicates=2)
    val = {"a": (0.1, 0.1), "b": (0.2, 0.9), "c": (0.5, 0.5), "t": (0.0, 0.0)}  # means: a, c, b
    test = {"a": 0.1, "b": 0.2, "c": 0.9, "t": 0.0}  # test losses (and replicate 0 alone) rank b second
    outcomes = {
        x: ReadoutOutcome(
            x, mean_loss=test[x.sources[0]], seconds=1.0, val_loss=val[x.sources[0]][x.replicate]
        )
        for r in plan.first_order
        for x in plan.replicas(r)
    }
    losses = validation_losses(plan, "t", outcomes)
    assert losses == {s: list(v) for s, v in val.items()}
    assert [r.sources for r in plan.higher_order("t", losses)] == [("a", "c")]


def test_replicates_add_only_the_new_readouts_and_carry_a_replicate_column(env):
    root, store, results = env
    make_stage2(root, store).run(results)  # one replicate (shared with the other tests of `env`)
    first_keys = make_stage2(root, store).jobs.readout_keys(results)
    stage = make_stage2(root, store, "transfer.replicates=2", "transfer.stack=8")  # stacked: one model
    result = stage.run(results)
    # every trained readout once more (pairs: 3 targets x 1 beam pair); `self` is not replicated
    assert result.failed == () and result.ran == 9 + 3 + 3 + 3
    assert result.counts == {"order 1": 18, "order 2": 6, "self": 3, "pixels": 6, "random": 6}
    losses = result.all_losses()
    assert sorted(set(losses["replicate"].to_pylist())) == [0, 1]
    keys = stage.jobs.readout_keys(results)
    one = Readout("normal", ("reshading",))
    assert keys.key(one) == first_keys.key(one)  # replicate 0 is the readout already stored
    assert attempt_events(keys.path(one)).count("done") == 1  # ... and was not trained again
    second = Readout("normal", ("reshading",), replicate=1)
    assert keys.key(second) != keys.key(one) and keys.path(second).exists()
    a, b = (read_readout(keys.path(r)).to_pydict()["loss"] for r in (one, second))
    assert a != b  # another seed, another readout


def test_a_failing_readout_is_retried_then_reported_by_name_without_stopping_the_others(env):
    root, store, results = env
    failing = "reshading->normal"
    overrides = ("transfer.epochs=1", "transfer.max_retries=1")
    result = make_stage2(root, store, *overrides, fail_readouts=(failing,)).run(results)
    assert result.failed == (failing,)
    bad = Readout("normal", ("reshading",))
    bad_path = make_stage2(root, store, *overrides).jobs.readout_keys(results).path(bad)
    attempts = attempt_events(bad_path)
    assert attempts.count("start") == 2 and attempts.count("done") == 0  # one try + one retry
    assert not bad_path.exists()
    assert not (location(result.out_dir) / "done.json").exists()  # incomplete: the rerun retries
    assert failing in (location(result.out_dir) / "failed.json").read_json()
    # every other readout ran; normal's beam of 2 has one source left, so it has no pair
    assert result.counts == {"order 1": 8, "order 2": 2, "self": 3, "pixels": 3, "random": 3}

    rerun = make_stage2(root, store, *overrides)
    fixed = rerun.run(results)  # same key: the seam is not part of it
    assert fixed.key == result.key and fixed.failed == ()
    assert attempt_events(bad_path).count("done") == 1
    assert fixed.summary().num_rows == 21
    assert (location(fixed.out_dir) / "done.json").exists()
    assert not (location(fixed.out_dir) / "failed.json").exists()
    runs = _readout_runs(rerun, fixed.key)  # the failed readout's run was finished, not duplicated
    trained = {name: n for name, n in runs.items() if not name.endswith(" <- self")}
    assert len(trained) == 18 and set(runs.values()) == {1}  # `self` may be logged by another study


_DRIVER = """
import json, sys
import ray
from components.data.shards import ShardStore
from pipelines.results import TaskResult
sys.path.insert(0, {tests!r})
from test_transfer import make_stage2
spec = json.load(open(sys.argv[1]))
ray.init(address=spec["address"])
results = {{k: TaskResult.from_marker(v) for k, v in spec["results"].items()}}
make_stage2(__import__("pathlib").Path(spec["root"]), ShardStore(spec["data"]), *spec["overrides"]).run(results)
"""


@pytest.mark.slow  # kills a real driver mid-run: 30 s (CI runs it)
def test_killing_the_driver_half_way_then_rerunning_runs_every_readout_exactly_once(
    env, ray_session, tmp_path
):
    """With stacks of 4 and 2 replicates: a stack killed half-way is rerun for its members whose
    losses are not written, and no member is trained twice."""
    root, store, results = env
    overrides = ["transfer.epochs=15", "transfer.seed=5", "transfer.stack=4", "transfer.replicates=2"]
    probe = make_stage2(root, store, *overrides)
    spec = {
        "address": ray_session.get_runtime_context().gcs_address,
        "root": str(root),
        "data": str(store.root),
        "results": {k: v.marker() for k, v in results.items()},
        "overrides": overrides,
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    driver = subprocess.Popen(
        [sys.executable, "-c", _DRIVER.format(tests=str(ROOT / "tests")), str(tmp_path / "spec.json")],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stored = lambda: {p for p in (root / "readouts").glob("*/*.parquet") if not p.name.startswith("self.")}  # noqa: E731
    before = stored()  # readouts of the other tests in this storage root
    trained = lambda: stored() - before  # noqa: E731
    deadline = time.monotonic() + 180
    while len(trained()) < 8:
        assert driver.poll() is None, "the driver finished or died before it could be killed"
        assert time.monotonic() < deadline, "no readouts were stored in time"
        time.sleep(0.02)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    stored_at_kill = len(trained())
    _wait_for_workers_to_go(root)

    result = probe.run(results)
    summary = result.summary().to_pylist()
    plan_readouts = [
        Readout(r["target"], tuple(r["sources"]), ReadoutKind(r["kind"]), r["replicate"]) for r in summary
    ]
    assert result.failed == () and len(summary) == 39  # (9 + 3 + 3 + 3) x 2 replicates + 3 self
    # the rest were stored; up to 2 stacks of 4 were in flight at the kill
    assert 0 < result.ran <= 36 - stored_at_kill + 8
    done = _done_counts(probe.jobs.readout_keys(results), plan_readouts)
    assert set(done.values()) == {1}  # none lost, none twice
    losses = result.all_losses()
    assert losses.num_rows == 39 * 16
    keys = pc.binary_join_element_wise(
        losses["target"],
        pc.binary_join(losses["sources"], "+"),
        losses["image_id"],
        pc.cast(losses["replicate"], "string"),
        "|",
    )
    assert len(pc.unique(keys)) == losses.num_rows
    runs = _readout_runs(probe, result.key)  # `self` runs may belong to another study that scored them
    trained = [r for r in plan_readouts if r.kind.value != "self"]
    assert len(trained) == 36 and all(runs[readout_run_name(r)] == 1 for r in trained)
    replicates = {r.info.run_name: r.data.metrics["replicates"] for r in _candidate_runs(probe, result.key)}
    assert all(replicates[readout_run_name(r)] == 2 for r in trained)  # both logged, once


def _wait_for_workers_to_go(root: Path, timeout: float = 60) -> None:
    """Ray ends a dead driver's workers; until then one could still finish a readout."""
    logs = (root / "readouts").glob("*/*.attempts.log")
    pids = {int(line.split()[1]) for p in logs for line in p.read_text().splitlines()}
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, "the killed driver's workers are still running"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has finished


def test_readouts_keyed_anew_make_a_new_stage2_step(env, monkeypatch):
    """The step holds its readouts' loss table, so it keys by their keys: once replicates fit on
    rows of their own, a study on a root of the old scheme got the old table back."""
    root, store, results = env
    stage = make_stage2(root, store, "transfer.replicates=2")
    before = stage.jobs.key(results)
    assert stage.jobs.key(results) == before
    monkeypatch.setattr("pipelines.stage2.plan.split_seed", lambda seed, replicate: seed + replicate)
    assert stage.jobs.key(results) != before


def test_a_scratch_baseline_trains_a_whole_network_and_leaves_a_study_without_it_keyed_as_before(env):
    """`transfer.scratch_epochs` enters no key of a study without the `scratch` baseline (its stored
    readouts and steps stay valid); with it, `scratch` trains on raw images beside the readouts."""
    root, store, results = env
    plain, other = make_stage2(root, store), make_stage2(root, store, "transfer.scratch_epochs=7")
    one = Readout("normal", ("reshading",))
    assert plain.jobs.key(results) == other.jobs.key(results)
    assert plain.jobs.readout_keys(results).key(one) == other.jobs.readout_keys(results).key(one)
    stage = make_stage2(root, store, "transfer.baselines=[scratch,pixels]", "transfer.scratch_epochs=2")
    assert stage.jobs.key(results) != plain.jobs.key(results)
    result = stage.run(results)
    assert result.failed == () and result.counts["scratch"] == 3
    losses = result.all_losses().to_pydict()
    scratch = [loss for s, loss in zip(losses["sources"], losses["loss"], strict=True) if s == ["scratch"]]
    assert len(scratch) == 3 * len(store.read("test", ["rgb"])["image_id"]) and all(np.isfinite(scratch))
    keys = stage.jobs.readout_keys(results)
    s2 = make_stage2(root, store, "transfer.baselines=[scratch,pixels]", "transfer.scratch_epochs=3")
    assert keys.key(baseline("normal", ReadoutKind.SCRATCH)) != s2.jobs.readout_keys(results).key(
        baseline("normal", ReadoutKind.SCRATCH)
    )
