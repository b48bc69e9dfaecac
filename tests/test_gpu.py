"""GPU paths (auto-skipped without CUDA): bf16 autocast + channels_last in the plain loop, and
DDP over every GPU with Ray Train."""

import pytest
import torch

from components.models import ModelConfig, build_network
from components.tasks import get_task
from components.training import OptimConfig, iter_batches, make_optimizer, per_image_losses, train_one_epoch
from pipelines.steps import unfenced

pytestmark = pytest.mark.gpu


def test_amp_training_on_one_gpu(tiny_dataset):
    from components.data.shards import ShardStore

    task = get_task("normal")
    device = torch.device("cuda")
    data = ShardStore(tiny_dataset).read("train", ["rgb", "normal"])  # image_id comes with every read
    model = (
        build_network(task, ModelConfig(downsample=4), 32).to(device).to(memory_format=torch.channels_last)
    )
    opt = make_optimizer(model, OptimConfig(lr=3e-3))
    first = train_one_epoch(model, opt, iter_batches(data, 16, shuffle=True), task, device)
    for seed in range(1, 4):
        last = train_one_epoch(model, opt, iter_batches(data, 16, shuffle=True, seed=seed), task, device)
    assert last < first
    _, losses = per_image_losses(model, iter_batches(data, 16), task, device)
    assert torch.isfinite(torch.from_numpy(losses)).all()


def test_ddp_over_all_gpus(tmp_path, tiny_dataset, ray_session):
    from components.data.shards import ShardStore
    from pipelines.config import load_pipeline_config
    from pipelines.invocation import open_tracker
    from pipelines.stage1.run import Stage1

    cfg = load_pipeline_config(
        "configs/quickstart.yaml",
        [
            f"storage_root={tmp_path}",
            f"data.path={tiny_dataset}",
            "train.epochs=2",
            "train.use_gpu=true",
            "train.num_workers=0",
        ],
    )
    tracker = open_tracker(cfg)
    stage = Stage1(cfg, ShardStore(tiny_dataset), tracker, tracker.start_run("gpu"), unfenced)
    result = stage.train(get_task("reshading"), stage.plan.default_hparams())
    sizes = [float(tracker.client.get_run(result.run_id).data.tags["world_size"])]
    assert sizes[-1] == torch.cuda.device_count()
