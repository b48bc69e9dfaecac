"""Stage I network replicates (`train.replicates`): which network each readout replicate reads,
the keys that stay what they were, and a tiny study that raises N from 1 to 2 (real Ray, real
MLflow)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from components.data.shards import ShardStore
from components.transfer import Readout, ReadoutKind, baseline
from components.transfer.features import build_feature_module
from pipelines.cli import main
from pipelines.config import load_pipeline_config
from pipelines.hparams import HParams
from pipelines.results import TaskResult
from pipelines.stage1.plan import Stage1Plan, network_name, network_seed
from pipelines.stage2.plan import Stage2Plan, feature_sources, random_seed
from pipelines.steps import unfenced
from tests.study import write_study

TASKS = ["normal", "reshading", "edge_texture"]


def _config(root, networks: int, readouts: int = 3):
    return load_pipeline_config(
        None,
        [
            f"storage_root={root}",
            f"tasks=[{','.join(TASKS)}]",
            "data.size=32",
            "model.downsample=4",
            f"train.replicates={networks}",
            f"transfer.replicates={readouts}",
        ],
    )


def _networks(tmp_path, stage1: Stage1Plan, networks: int) -> dict[str, TaskResult]:
    """Made-up trained networks (weights files of their own bytes: their hashes key the features)."""
    hparams = stage1.default_hparams()
    out = {}
    for task in stage1.config.study_tasks():
        made = []
        for n in range(networks):
            weights = tmp_path / f"{network_name(task.name, n).replace('#', '.r')}.pt"
            weights.write_bytes(f"{task.name} network {n}".encode())
            key = stage1.train_step(task, hparams, n).key
            made.append(TaskResult(task.name, key, str(weights), 0.0, hparams, "", "", replicate=n))
        out[task.name] = TaskResult.from_marker({**made[0].marker(), "replicas": tuple(made[1:])})
    return out


def test_readout_replicate_r_reads_network_replicate_r_mod_n_and_replicate_0_keeps_its_keys(
    tiny_dataset, tmp_path
):
    store = ShardStore(tiny_dataset)
    one, two = _config(tmp_path, 1), _config(tmp_path, 2)
    s1, s2 = Stage1Plan(one, store), Stage1Plan(two, store)
    hparams = s1.default_hparams()
    # Stage I: replicate 0 is the network a study always had (key and seed); replicate 1 has its own.
    for task in one.study_tasks():
        assert s2.train_step(task, hparams, 0) == s1.train_step(task, hparams)
        assert s2.train_step(task, hparams, 1).key != s1.train_step(task, hparams).key
    assert s2.seed(0) == one.train.seed == 0 and network_seed(0, 1) == s2.seed(1) != 0
    assert network_seed(0, 1) != network_seed(0, 2) and network_seed(5, 1) != network_seed(0, 1)

    networks = _networks(tmp_path, s2, 2)
    replicate_0 = {t: TaskResult.from_marker(r.marker()) for t, r in networks.items()}  # a study with N = 1
    replicate_1 = {t: r.network(1) for t, r in networks.items()}
    plan1, plan2 = Stage2Plan(one, store), Stage2Plan(two, store)
    keys1, keys2 = plan1.readout_keys(replicate_0), plan2.readout_keys(networks)
    # ... and a study whose only networks are the replicates 1: the keys of readouts that read them
    only_1 = plan1.readout_keys(replicate_1)

    readout, own = Readout("normal", ("reshading",)), baseline("normal", ReadoutKind.SELF)
    plan = plan2.plan(TASKS)
    for x in (*plan.replicas(readout), *plan.replicas(own)):
        assert keys2.network_of(x) == x.replicate % 2
        reads = keys1 if x.replicate % 2 == 0 else only_1  # network r mod 2 of the source (or target)
        assert keys2.key(x) == reads.key(x), x.name
    assert len(plan.replicas(own)) == 3 and len(plan1.plan(TASKS).replicas(own)) == 1
    # Replicate 0 of every readout and baseline: the key it had with one network per task.
    for r in (*plan.first_order, *plan.baselines):
        assert keys2.key(r) == keys1.key(r), r.name
    # `pixels` reads no network: every replicate keeps its key. `random` replicate r reads network
    # replicate r mod N's random encoder, of a seed of its own (replicate 0: transfer.seed).
    for x in plan.replicas(baseline("normal", ReadoutKind.PIXELS)):
        assert keys2.key(x) == keys1.key(x)
    for x in plan.replicas(baseline("normal", ReadoutKind.RANDOM)):
        assert (keys2.key(x) == keys1.key(x)) == (keys2.network_of(x) == 0), x.name
    randoms = [feature_sources(two, networks, n)["random"] for n in range(2)]
    assert [r.seed for r in randoms] == [two.transfer.seed, random_seed(two.transfer.seed, 1)]
    assert randoms[0].seed != randoms[1].seed and randoms[0].key != randoms[1].key
    assert random_seed(5, 1) != random_seed(0, 1) != network_seed(0, 1)
    weights = [next(build_feature_module(r, two.model).parameters()) for r in randoms]
    assert not torch.equal(*weights)  # another random encoder, not another name for the same one
    # The stage's key changes only where there are network replicates to read.
    assert plan1.key(replicate_0) != plan2.key(networks)


def _run(config, capsys) -> dict:
    assert main(["run", "-c", str(config), "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _dry_run(config, capsys) -> dict[str, str]:
    assert main(["run", "-c", str(config), "--dry-run"]) == 0
    return {
        step: status
        for status, step in (line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines())
    }


# Slow (make test-all): two tiny studies on one root, 75-130 s on 2 shared cores.
@pytest.mark.slow
def test_raising_train_replicates_trains_only_the_new_networks_and_their_readouts(
    tmp_path, capsys, ray_session
):
    root = tmp_path / "runs"

    def config(networks: int):
        sections = {"train": {"replicates": networks}, "transfer": {"replicates": 2}}
        return write_study(tmp_path / f"study-{networks}.yaml", root, **sections)

    first = _run(config(1), capsys)
    assert sorted(first["networks_trained"]) == sorted(TASKS) and first["readouts_ran"] == 36
    said = first["taxonomy"]["verdict"]
    assert said["networks"] == 1 and not said["network_noise_measured"]  # the report says so
    features = {p.name for p in (root / "features").iterdir()}
    assert len(features) == 3 + 2  # each task's network, `random`, `pixels`

    plan = _dry_run(config(2), capsys)
    assert all(plan[f"train/{t}"] == "reuse" and plan[f"train/{t}#1"] == "run" for t in TASKS)
    second = _run(config(2), capsys)
    assert sorted(second["networks_trained"]) == sorted(f"{t}#1" for t in TASKS)
    assert sorted(second["networks_reused"]) == sorted(TASKS)
    # Readout replicate 1 reads network 1: 9 first order, 3 pairs and `random` (network 1's random
    # encoder) into each of the 3 targets again; replicate 0 is stored, as is `pixels` (it reads no
    # network); `self` replicate 1 is scored, not trained.
    assert second["readouts_ran"] == 9 + 3 + 3 and second["readouts_reused"] == 36 - 15
    assert (
        second["taxonomy"]["verdict"]["networks"] == 2
        and second["taxonomy"]["verdict"]["network_noise_measured"]
    )
    new = {p.name for p in (root / "features").iterdir()} - features
    assert len(new) == 3 + 1  # network 1 of each task, and network 1's random encoder

    for task in TASKS:  # two networks per task, trained with different seeds; replicate 0 registered
        markers = [json.loads(p.read_text()) for p in (root / "stage1" / task).glob("*/done.json")]
        assert sorted(m.get("replicate", 0) for m in markers) == [0, 1]
        weights = [torch.load(m["model_path"], weights_only=True) for m in markers]
        assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
        assert {m["model_version"] for m in markers if m.get("replicate")} == {""}
        assert all(m["model_version"] for m in markers if not m.get("replicate"))
        # `self` has a replicate per readout replicate, each its own network's losses
        losses = pq.read_table(root / "stage2" / _newest(root / "stage2") / "losses" / f"{task}.parquet")
        own = [r for r in losses.to_pylist() if r["sources"] == ["self"]]
        by_replicate = {rep: [r["loss"] for r in own if r["replicate"] == rep] for rep in (0, 1)}
        assert len(own) == 2 * 16 and not np.allclose(by_replicate[0], by_replicate[1])
    assert (root / "affinity").exists() and second["taxonomy"]["roots"]


def _newest(folder) -> str:
    return max(folder.glob("*/done.json"), key=lambda p: p.stat().st_mtime).parent.name


def test_each_network_replicate_trains_with_a_search_of_its_own_unless_told_otherwise(tiny_dataset, tmp_path):
    """A rerun of the study searches again (the search samples with train.seed), and reruns chose
    learning rates 5x apart: network replicate n searches with its own seed, so the replicates vary
    as reruns do. Search 0 keeps its key; `tune.each_replicate: false` searches once per task."""
    store = ShardStore(tiny_dataset)
    one, two = _config(tmp_path, 1), _config(tmp_path, 2)
    once = load_pipeline_config(
        None, [f"storage_root={tmp_path}", "train.replicates=2", "tune.each_replicate=false"]
    )
    s1, s2, s_once = Stage1Plan(one, store), Stage1Plan(two, store), Stage1Plan(once, store)
    task = one.task("normal")
    assert list(s1.searches()) == [0] and list(s2.searches()) == [0, 1] and list(s_once.searches()) == [0]
    assert s2.search_step(task, 0) == s1.search_step(task) != s2.search_step(task, 1)
    assert s_once.search_of(1) == 0 and s2.search_of(1) == 1

    assert s2.finished_networks(task) == (None, None)  # no search has run
    chosen = [
        HParams(lr=0.001, weight_decay=1e-5, batch_size=16),
        HParams(lr=0.002, weight_decay=1e-4, batch_size=32),
    ]
    for n, hparams in enumerate(chosen):
        s2.search_step(task, n).finish({"hparams": hparams.to_json()}, fence=unfenced)
        assert s2.cached_hparams(task, n) == hparams
    # network replicate 1 is keyed by (and trains with) search 1's choice, not search 0's
    assert s2.train_step(task, chosen[1], 1) != s2.train_step(task, chosen[0], 1)
    s2.train_step(task, chosen[1], 1).finish(
        TaskResult(
            "normal", s2.train_step(task, chosen[1], 1).key, "w.pt", 0.5, chosen[1], "", "", replicate=1
        ).marker(),
        fence=unfenced,
    )
    assert s2.finished_networks(task)[1] is not None and s2.finished_networks(task)[0] is None


def test_the_dry_run_states_the_plans_size_from_the_config_alone(tmp_path, capsys):
    """A fresh root has no data to plan readouts on, but the config says what the study holds: 9
    tasks x 3 network replicates, a search per replicate of 2 trials; 8 targets (colorization is
    source-only) x 9 sources x 3 replicates first order, at most C(3, 2) pairs per target."""
    args = [
        "run",
        "-c",
        "configs/quickstart.yaml",
        "--set",
        f"storage_root={tmp_path / 'fresh'}",
        "--dry-run",
    ]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert {line.split()[0] for line in out.splitlines()} == {"run"}  # stdout: (status, step) lines only
    said = [line.removeprefix("plan size: ") for line in err.splitlines() if line.startswith("plan size: ")]
    assert said[0] == "networks: 27 (9 tasks x 3 replicates), search trials: 54"
    assert said[1].startswith("readouts: order 1 216, order 2 at most 72, self 24, pixels 24, random 24")
    assert len(said) == 2  # a fresh root measured no readout: no projection without a given rate
    # 216 + 72 + 24 + 24 trained (self is scored); at 30 s each, 336 x 30 / 3600 = 2.8 hours
    assert main([*args, "--readout-seconds", "30", "--set", "transfer.race.enabled=true"]) == 0
    said = [
        line.removeprefix("plan size: ")
        for line in capsys.readouterr().err.splitlines()
        if "plan size" in line
    ]
    assert said[2].startswith("racing: round 0 trains 112 of the 336;")
    assert said[3].startswith(
        "projected: 2.8 device-hours of readouts (at most), at 30 s per readout (given)"
    )
    assert main([*args, "--readout-seconds", "0"]) == 2  # one line, before any work
    assert capsys.readouterr().err.strip() == "taskatlas: error: --readout-seconds must be > 0, got 0.0"


def test_the_projection_reads_the_newest_finished_stage_ii_on_the_root(tmp_path):
    """The median of the trained readouts' seconds (`self` is scored, not trained) of the newest
    Stage II with a marker; an unfinished one (no marker) is not a measurement."""
    import os

    import pyarrow as pa

    from components.storage import location
    from pipelines.pipeline import measured_readout_seconds

    root = location(str(tmp_path))
    assert measured_readout_seconds(root) is None
    for n, (key, seconds, done) in enumerate([("old", [9.0, 9.0], True), ("new", [1.0, 3.0, 2.0], True)]):
        folder = tmp_path / "stage2" / key
        folder.mkdir(parents=True)
        kinds = ["transfer"] * len(seconds) + ["self"]
        pa.parquet.write_table(
            pa.table({"kind": kinds, "seconds": [*seconds, 100.0]}), folder / "summary.parquet"
        )
        if done:
            (folder / "done.json").write_text("{}")
        os.utime(folder / "summary.parquet", (n, n))  # the newer one written last
    assert measured_readout_seconds(root) == 2.0
    (tmp_path / "stage2" / "new" / "done.json").unlink()  # unfinished: the old one is the measurement
    assert measured_readout_seconds(root) == 9.0
