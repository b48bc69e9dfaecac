"""The task dictionary: coverage, per-image losses, input transforms."""

import pytest
import torch

from components.errors import ConfigError
from components.tasks import TASKS, InputTransform, TaskKind, get_task, parse_tasks

REQUIRED = {
    "autoencoding", "denoising", "colorization", "inpainting", "depth_zbuffer", "depth_euclidean", "normal",
    "reshading", "curvature", "edge_texture", "edge_occlusion", "keypoints2d", "keypoints3d",
    "segment_semantic", "class_object", "room_layout",
}  # fmt: skip


def test_all_required_tasks_exist_with_their_roles():
    assert set(TASKS) >= REQUIRED and len(TASKS) >= 14
    assert {t.name for t in TASKS.values() if t.source_only} == {"colorization", "inpainting"}
    assert {t.name for t in TASKS.values() if t.kind is TaskKind.VECTOR} == {"class_object", "room_layout"}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_loss_is_one_value_per_image(name):
    task = TASKS[name]
    shape = task.output_shape(16)
    pred = torch.randn(5, *shape, requires_grad=True)
    if name == "segment_semantic":
        target = torch.randint(0, shape[0], (5, 16, 16))
    elif name == "class_object":
        target = torch.randint(0, 2, (5, *shape)).float()
    else:
        target = torch.randn(5, *shape)
    loss = task.per_image_loss(pred, target)
    assert loss.shape == (5,)
    loss.sum().backward()
    # Each image's loss depends on that image alone.
    assert torch.allclose(task.per_image_loss(pred[2:3], target[2:3]), loss[2:3])


def test_input_transforms():
    rgb = torch.rand(2, 3, 16, 16)
    assert torch.equal(get_task("autoencoding").transform_input(rgb), rgb)
    gray = get_task("colorization").transform_input(rgb)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    masked = get_task("inpainting").transform_input(rgb)
    assert (masked[..., 4:12, 4:12] == 0).all() and torch.equal(masked[..., :4, :], rgb[..., :4, :])
    noisy = get_task("denoising").transform_input(rgb, torch.Generator().manual_seed(0))
    assert 0.05 < (noisy - rgb).abs().mean() < 0.1 and noisy.min() >= 0 and noisy.max() <= 1
    assert get_task("denoising").input is InputTransform.NOISE


def test_unknown_task_is_named():
    with pytest.raises(ConfigError, match="unknown task 'depht'"):
        parse_tasks("normal, depht")
    assert [t.name for t in parse_tasks("normal,reshading")] == ["normal", "reshading"]


def test_batches_need_each_column_once():
    assert get_task("autoencoding").columns == ["rgb"]
    assert get_task("normal").columns == ["rgb", "normal"]
