"""The per-worker training loop as plain functions: device-agnostic, no Ray, no MLflow.

Ray Train workers, Ray Tune trials and plain scripts all call these; batches are dicts of numpy
arrays as the shard store and Ray Data produce them (`rgb` uint8, labels float16/uint8/float32).
On CUDA the loop uses bf16 autocast and channels_last.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from components.tasks import Loss, Task, batch_loss, view_input

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 32


def make_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def to_tensors(
    batch: Batch,
    task: Task,
    device: torch.device,
    generator: torch.Generator | None = None,
    image_ids: np.ndarray | None = None,
):
    """numpy batch -> (network input, target) on `device`, with the task's input transform: fresh
    noise from `generator` for training, or, given `image_ids`, the per-image view every
    evaluation uses (`view_input`), so a score never depends on batching."""
    rgb = torch.from_numpy(np.ascontiguousarray(batch["rgb"])).to(device, non_blocking=True).float() / 255.0
    target = torch.from_numpy(np.ascontiguousarray(batch[task.column])).to(device, non_blocking=True)
    target = target.long() if task.loss is Loss.CROSS_ENTROPY else target.float()
    if task.column == "rgb":
        target = target / 255.0
    if image_ids is not None:
        inputs = view_input(rgb, task.input, [str(i) for i in image_ids])
    else:
        inputs = task.transform_input(rgb, generator)
    if device.type == "cuda":
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return inputs, target


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Batch],
    task: Task,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> float:
    """One pass over `batches`; returns the mean per-image training loss (labelled images only)."""
    model.train()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for batch in batches:
        inputs, target = to_tensors(batch, task, device, generator)
        with _autocast(device):
            pred = model(inputs)
        loss = task.per_image_loss(pred.float(), target)
        optimizer.zero_grad(set_to_none=True)
        batch_loss(loss).backward()
        optimizer.step()
        total += loss.detach().nansum()
        count += (~loss.detach().isnan()).sum()
    return float(total) / max(float(count), 1.0)


@torch.no_grad()
def per_image_losses(
    model: nn.Module, batches: Iterable[Batch], task: Task, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """(image ids, loss of each image): what Stage III compares."""
    model.eval()
    ids, losses = [], []
    for batch in batches:
        inputs, target = to_tensors(batch, task, device, image_ids=batch["image_id"])
        with _autocast(device):
            pred = model(inputs)
        losses.append(task.per_image_loss(pred.float(), target).cpu().numpy())
        ids.append(np.asarray(batch["image_id"]))
    if not losses:
        return np.zeros(0, object), np.zeros(0, np.float32)
    return np.concatenate(ids), np.concatenate(losses).astype(np.float32)


def evaluate(model: nn.Module, batches: Iterable[Batch], task: Task, device: torch.device) -> float:
    """Mean per-image loss over the images that have a valid label."""
    _, losses = per_image_losses(model, batches, task, device)
    return nanmean(losses)


def nanmean(losses: np.ndarray) -> float:
    """Mean of per-image losses, leaving out unlabelled images (NaN); NaN if none is labelled."""
    labelled = losses[~np.isnan(losses)]
    return float(labelled.mean()) if len(labelled) else float("nan")


def iter_batches(
    data: Batch, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False
) -> Iterator[Batch]:
    """Batches of an in-memory split (a dict of equal-length arrays)."""
    n = len(next(iter(data.values())))
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield {k: v[idx] for k, v in data.items()}


def rank_rows(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous rows [start, stop) of an n-row split that DDP rank `rank` trains on. Every
    rank gets n // world_size rows, so all take the same number of steps (a rank with one batch
    more would wait forever in its extra all-reduce); the remainder, under world_size rows, is
    left out, as Ray Data's equal split does."""
    per = n // world_size
    return rank * per, (rank + 1) * per


def holdout_split(data: Batch, fraction: float, seed: int = 0) -> tuple[Batch, Batch]:
    """Split the `train` split into (fit, validation) for hyperparameter search, so the
    search never looks at `test`, whose per-image losses Stage III compares."""
    n = len(data["image_id"])
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(n * fraction))
    val, fit = np.sort(order[:n_val]), np.sort(order[n_val:])
    return {k: v[fit] for k, v in data.items()}, {k: v[val] for k, v in data.items()}


def pick_device(use_gpu: bool) -> torch.device:
    return torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (for state dicts that load anywhere)."""
    return model.module if hasattr(model, "module") else model
