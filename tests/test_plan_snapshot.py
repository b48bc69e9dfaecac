"""The quickstart's plan, before and after any refactor: the same step keys, readout keys, seeds,
settings and stack sizes. The golden file was written by the code before the plan/run/record
split (issue 23); a change to it is a change to every stored study's keys, so it is deliberate:
regenerate with `TASKATLAS_WRITE_SNAPSHOT=1` and say why in the commit."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path

from components.config import to_dict
from components.data.shards import ShardStore
from pipelines.config import load_pipeline_config
from pipelines.results import TaskResult
from pipelines.stage1.plan import Stage1Plan, network_name
from pipelines.stage2.plan import Stage2Plan

GOLDEN = Path(__file__).parent / "data" / "quickstart_plan.json"
QUICKSTART = Path(__file__).parents[1] / "configs" / "quickstart.yaml"


def plan_snapshot(tiny_dataset: Path, weights: Path) -> dict:
    cfg = load_pipeline_config(
        QUICKSTART, ["storage_root=/nonexistent/taskatlas-root", "transfer.use_gpu=false"]
    )
    store = ShardStore(tiny_dataset)
    stage1 = Stage1Plan(cfg, store)
    hparams = stage1.default_hparams()
    tasks = cfg.study_tasks()
    results = {}
    for task in tasks:
        networks = []
        for n in range(stage1.replicates):  # network replicate 0 keeps the weights' name it had
            name = network_name(task.name, n).replace("#", ".r")
            (weights / f"{name}.pt").write_bytes(f"{name}-weights".encode())
            key = stage1.train_step(task, hparams, n).key
            networks.append(
                TaskResult(task.name, key, str(weights / f"{name}.pt"), 0.0, hparams, "", "1", replicate=n)
            )
        results[task.name] = replace(networks[0], replicas=tuple(networks[1:]))
    stage2 = Stage2Plan(cfg, store, use_gpu=False)
    plan = stage2.plan(list(cfg.tasks))
    keys = stage2.readout_keys(results)

    def row(x):
        job = stage2.job(x, (), keys.path(x).uri)
        return {
            "name": x.name,
            "key": keys.key(x),
            "path": keys.path(x).uri,
            "settings": to_dict(asdict(job.settings)),
            "channels": job.channels,
            "threads": job.threads,
        }

    readouts = [row(x) for r in (*plan.first_order, *plan.baselines) for x in plan.replicas(r)]
    for target in plan.targets:  # higher orders from made-up validation losses
        losses = {
            r.sources[0]: [((i * 7) % 5) + 0.1 * rep for rep in range(plan.replicates)]
            for i, r in enumerate(plan.first_order_of(target))
        }
        readouts += [row(x) for r in plan.higher_order(target, losses) for x in plan.replicas(r)]
    return {
        "data_version": store.data_version,
        "search": {
            network_name(t.name, n): stage1.search_step(t, n).key for t in tasks for n in stage1.searches()
        },
        "train": {
            network_name(name, n): r.network(n).key
            for name, r in results.items()
            for n in range(stage1.replicates)
        },
        "stage2": stage2.key(results),
        "counts": plan.counts(),
        "stack": {t: stage2.stack_size(t) for t in plan.targets},
        "readouts": readouts,
    }


def test_the_quickstart_plan_is_unchanged(tiny_dataset, tmp_path):
    got = plan_snapshot(tiny_dataset, tmp_path)
    if os.environ.get("TASKATLAS_WRITE_SNAPSHOT"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(GOLDEN.read_text())
    assert got["data_version"] == want["data_version"]  # the fixture's data, not the code, changed
    for part in ("search", "train", "stage2", "counts", "stack"):
        assert got[part] == want[part], part
    assert len(got["readouts"]) == len(want["readouts"])
    for g, w in zip(got["readouts"], want["readouts"], strict=True):
        assert g == w, w["name"]


def test_pixel_readouts_stack_on_cpus_only_where_a_step_is_one_small_batch(tiny_dataset):
    """`transfer.stack: 0` on CPUs: pixel readouts whose training images fit in one batch (a task
    positioned from a few labels) train in stacks of 4, where a step is overhead-bound; with more
    images than a batch they train one by one (their convolutions are compute-bound)."""
    store = ShardStore(tiny_dataset)
    fit = store.manifest.counts["transfer"] - round(store.manifest.counts["transfer"] * 0.2)

    def sizes(batch_size: int) -> dict[str, int]:
        cfg = load_pipeline_config(
            QUICKSTART, [f"transfer.batch_size={batch_size}", "tasks=[normal,class_object]"]
        )
        plan = Stage2Plan(cfg, store, use_gpu=False)
        return {t: plan.stack_size(t) for t in ("normal", "class_object")}

    assert sizes(fit) == {"normal": 4, "class_object": 16}
    assert sizes(fit - 1) == {"normal": 1, "class_object": 16}
    cfg = load_pipeline_config(QUICKSTART, ["tasks=[normal,class_object]"])
    assert Stage2Plan(cfg, store, use_gpu=True).stack_size("normal") == 16
