"""End to end on the quickstart config (smaller splits): task networks -> Stage II -> Stage III.

The synthetic scenes share geometry the way real ones do (design.md section 2), so readouts from
geometric encoders should serve geometric targets better than texture edges do. The task
networks are trained with the plain loop (not Ray Train) to keep this to a couple of minutes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from components.affinity import compute_affinity
from components.data.shards import ShardStore
from components.models import build_network
from components.tasks import get_task
from components.training import OptimConfig, iter_batches, make_optimizer, per_image_losses, train_one_epoch
from pipelines.config import PipelineConfig, load_pipeline_config
from pipelines.hparams import HParams
from pipelines.invocation import open_tracker, prepare_dataset
from pipelines.results import TaskResult
from pipelines.stage2.run import Stage2
from pipelines.steps import unfenced

ROOT = Path(__file__).resolve().parents[1]
GEOMETRIC = ("depth_zbuffer", "depth_euclidean", "normal", "reshading", "curvature")
TARGETS = ("normal", "reshading", "depth_euclidean")


def _train(cfg: PipelineConfig, store: ShardStore, name: str) -> TaskResult:
    """A Stage I stand-in with the same outputs: model.pt and the per-image test losses."""
    task = get_task(name)
    torch.manual_seed(cfg.train.seed)
    net = build_network(task, cfg.model, cfg.data.size)
    optimizer = make_optimizer(net, OptimConfig(2e-3, cfg.train.weight_decay, cfg.train.batch_size))
    train = store.read("train", ["rgb", task.column])
    for epoch in range(cfg.train.epochs):
        batches = iter_batches(train, cfg.train.batch_size, shuffle=True, seed=epoch)
        train_one_epoch(net, optimizer, batches, task, torch.device("cpu"))
    test = store.read("test", ["rgb", task.column])
    ids, losses = per_image_losses(net, iter_batches(test, 128), task, torch.device("cpu"))
    out = cfg.root.local_path / "stage1" / name / "plain"
    out.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), out / "model.pt")
    pq.write_table(pa.table({"image_id": ids.astype(str), "loss": losses}), out / "test_losses.parquet")
    return TaskResult(
        name, f"plain-{name}", str(out / "model.pt"), float(losses.mean()), HParams(1e-3, 1e-4, 32), "", "0"
    )


# Slow (make test-all): a science check on 6 trained networks; Stages II-III run in test_pipeline.
@pytest.mark.slow
def test_geometric_sources_have_more_affinity_than_texture_edges_for_geometric_targets(tmp_path, ray_session):
    tasks = [*GEOMETRIC, "edge_texture"]
    cfg = load_pipeline_config(
        ROOT / "configs" / "quickstart.yaml",
        [
            f"storage_root={tmp_path}",
            f"tasks=[{','.join(tasks)}]",
            "data.n_train=400",
            "data.n_transfer=200",
            "data.n_test=100",
            f"transfer.targets=[{','.join(TARGETS)}]",
            "transfer.orders=[]",
            "transfer.beams=[]",
            "transfer.epochs=8",
            "train.replicates=1",  # one network per task: the science check reads replicate 0
        ],
    )
    store = prepare_dataset(cfg)
    results = {name: _train(cfg, store, name) for name in tasks}
    tracker = open_tracker(cfg)
    result = Stage2(cfg, store, tracker, tracker.start_run("quickstart-test"), unfenced).run(results)
    assert result.failed == ()

    affinity = compute_affinity(result.all_losses()).to_pylist()
    first_order = {(r["target"], r["sources"][0]): r["affinity"] for r in affinity if r["order"] == 1}
    for target in TARGETS:
        geometric = np.mean([first_order[target, s] for s in GEOMETRIC if s != target])
        edges = first_order[target, "edge_texture"]
        assert geometric > edges, f"{target}: geometric sources {geometric:.3f} <= edge_texture {edges:.3f}"
