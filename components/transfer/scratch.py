"""The `scratch` baseline: a whole task network, encoder included, trained from random weights on
the same labelled images as the readouts (design.md section 12).

It answers what the labels alone buy. A readout on a frozen source encoder that beats it on most
test images is worth its source (Taskonomy's Gain). It sees what a readout sees: the readouts'
fit rows of the transfer split (`validation_split`, the same held-out rows), the target's view of
each image (noise fixed per image id), and it is scored with the same loss on the same test images
(`score_network`, as `self` is).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from components.models import ModelConfig, build_network, channels_last
from components.tasks import Task, view_input
from components.training import nanmean
from components.transfer.readout import (
    ReadoutResult,
    ReadoutSettings,
    batches,
    label_tensor,
    one_step,
    score_network,
    train_epochs,
    validation_split,
)


def train_scratch(
    *,
    task: Task,
    model: ModelConfig,
    image_size: int,
    transfer_rgb: np.ndarray,
    transfer_ids: np.ndarray,
    transfer_y: np.ndarray,
    test_rgb: np.ndarray,
    test_ids: np.ndarray,
    test_y: np.ndarray,
    settings: ReadoutSettings,
    device: torch.device,
    channels: int | None = None,
) -> ReadoutResult:
    """Train the study's architecture for `task` from scratch on the transfer split's fit rows
    (uint8 RGB (N, 3, S, S)); score the validation rows and every test image."""
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    fit, val = validation_split(len(transfer_rgb), settings.val_fraction, settings.split_seed)
    net = channels_last(build_network(task, model, image_size, channels)).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    rng = np.random.default_rng(settings.seed)

    def per_image(idx: np.ndarray) -> torch.Tensor:
        rows = fit[idx]
        x = torch.from_numpy(np.array(transfer_rgb[rows], copy=True)).to(device).float() / 255.0
        pred = net(view_input(x, task.input, transfer_ids[rows]))
        return task.per_image_loss(pred.float(), label_tensor(transfer_y[rows], task, device))[None]

    order = lambda: batches(len(fit), settings.batch_size, rng)  # noqa: E731
    [history] = train_epochs(net, settings.epochs, order, per_image, one_step(optimizer)) or [[]]
    val_loss = nanmean(
        score_network(net, transfer_rgb[val], transfer_ids[val], transfer_y[val], task, device)
    )
    losses = score_network(net, test_rgb, test_ids, test_y, task, device)
    return ReadoutResult(
        np.asarray(test_ids).astype(str), losses, tuple(history), time.perf_counter() - start, val_loss
    )
