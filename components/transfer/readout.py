"""The readout: frozen features of a source set -> two small conv layers -> the target's decoder.

Trained from scratch on the `transfer` split only; returns the loss of every `test` image, which
is all Stage III needs. The decoder is the target's own architecture (`build_decoder`), fed a
tensor of the representation's shape, so a readout differs from the target's `self` network only
in where its representation comes from.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from components.models import ModelConfig, channels_last, representation_shape
from components.models.network import build_decoder
from components.tasks import Loss, Task, batch_loss, view_input
from components.training import nanmean

Featurize = Callable[[torch.Tensor], torch.Tensor]  # a batch of stored inputs -> features


@dataclass(frozen=True)
class ReadoutSettings:
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    width: int = 64  # channels of the two transfer conv layers
    seed: int = 0  # this readout's initialisation and batch order (a replicate's own seed)
    val_fraction: float = 0.2  # of the transfer split, held out to rank sources (never test images)
    # The fit/validation rows: the replicate's (`split_seed`), the same for every readout of it
    split_seed: int = 0

    @classmethod
    def from_config(cls, transfer) -> ReadoutSettings:
        """Replicate 0's settings from a study's `transfer` config section (any object with its
        fields); replicate r trains with its own seed (`readout_seed`) on its own rows (`split_seed`)."""
        t = transfer
        return cls(t.epochs, t.lr, t.weight_decay, t.batch_size, t.width, t.seed, t.val_fraction, t.seed)


@dataclass(frozen=True, eq=False)
class ReadoutResult:
    image_ids: np.ndarray  # (n_test,) str
    losses: np.ndarray  # (n_test,) float32: per-image test loss
    train_losses: tuple[float, ...]  # mean training loss of each epoch
    seconds: float
    val_loss: float = float("nan")  # mean loss on the held-out part of the transfer split
    weights: dict | None = None  # the trained network's state dict, when asked to keep it (`keep`)

    @property
    def mean_loss(self) -> float:
        return nanmean(self.losses)


class ReadoutNetwork(nn.Module):
    """(B, C_in, h, w) features -> two 3x3 conv + BN layers -> (B, C_rep, h, w) -> target decoder."""

    def __init__(self, in_channels: int, rep_shape: tuple[int, int, int], width: int, decoder: nn.Module):
        super().__init__()
        self.transfer = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, rep_shape[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(rep_shape[0]),
        )
        self.decoder = decoder

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transfer(features))


def build_readout(
    task: Task, in_channels: int, model: ModelConfig, image_size: int, width: int, channels: int | None = None
) -> ReadoutNetwork:
    rep = representation_shape(model, image_size)
    return channels_last(ReadoutNetwork(in_channels, rep, width, build_decoder(task, rep, model, channels)))


def label_tensor(labels: np.ndarray, task: Task, device: torch.device) -> torch.Tensor:
    """Stored labels -> the loss's target, as the Stage I loop prepares them."""
    y = torch.from_numpy(np.ascontiguousarray(labels)).to(device)
    if task.loss is Loss.CROSS_ENTROPY:
        return y.long()
    y = y.float()
    return y / 255.0 if task.column == "rgb" else y


def train_readout(
    *,
    task: Task,
    model: ModelConfig,
    image_size: int,
    transfer_x: np.ndarray,
    transfer_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    test_ids: np.ndarray,
    settings: ReadoutSettings,
    device: torch.device,
    channels: int | None = None,
    featurize: Featurize | None = None,
    keep: bool = False,
) -> ReadoutResult:
    """Train a readout on the transfer split less its validation part, and score the validation
    part (what ranks sources for higher-order beams) and every test image (what Stage III uses).

    `*_x` are cached features (N, C, h, w). `featurize` (no gradient) maps each batch of `*_x`
    to features first: the benchmark uses it to re-encode raw images every epoch instead.
    `keep`: return the trained weights too (a positioned task's model, `ReadoutResult.weights`).
    """
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    featurize = featurize or (lambda x: x)
    fit, val = validation_split(len(transfer_x), settings.val_fraction, settings.split_seed)
    val_x, val_y = transfer_x[val], transfer_y[val]
    transfer_x, transfer_y = transfer_x[fit], transfer_y[fit]
    with torch.no_grad():
        in_channels = featurize(_floats(transfer_x[:1], device)).shape[1]
    net = build_readout(task, in_channels, model, image_size, settings.width, channels).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    rng = np.random.default_rng(settings.seed)

    def per_image(idx: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            x = featurize(_floats(transfer_x[idx], device))
        with _autocast(device):
            pred = net(x)
        return task.per_image_loss(pred.float(), label_tensor(transfer_y[idx], task, device))[None]

    order = lambda: batches(len(transfer_x), settings.batch_size, rng)  # noqa: E731
    [history] = train_epochs(net, settings.epochs, order, per_image, one_step(optimizer)) or [[]]
    val_loss = nanmean(_test_losses(net, featurize, val_x, val_y, task, device))
    losses = _test_losses(net, featurize, test_x, test_y, task, device)
    weights = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()} if keep else None
    return ReadoutResult(
        np.asarray(test_ids).astype(str),
        losses,
        tuple(history),
        time.perf_counter() - start,
        val_loss,
        weights,
    )


def train_epochs(
    model: nn.Module,
    epochs: int,
    batch_order: Callable[[], Iterable[Any]],
    per_image: Callable[[Any], torch.Tensor],
    update: Callable[[torch.Tensor], None],
) -> list[list[float]]:
    """The one training loop of readouts, `scratch` and stacked readouts: per epoch, each batch of
    `batch_order()` gives `per_image(batch)`, an (M, B) tensor of M members' per-image losses (1
    for a readout alone), which `update` turns into one optimizer step. Returns each member's mean
    training loss per epoch (NaN losses, unlabelled images, not counted)."""
    history: list[list[float]] = []
    for _ in range(epochs):
        model.train()
        total = count = None
        for batch in batch_order():
            loss = per_image(batch)
            update(loss)
            summed, labelled = loss.detach().nansum(1).double(), (~loss.detach().isnan()).sum(1).double()
            total = summed if total is None else total + summed
            count = labelled if count is None else count + labelled
        history.append([t / max(c, 1) for t, c in zip(total.tolist(), count.tolist(), strict=True)])
    return [list(member) for member in zip(*history, strict=True)] if history else []


def one_step(optimizer: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
    """`train_epochs`' update for one model: its batch's objective (`batch_loss`), backward, step."""

    def update(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        batch_loss(loss[0]).backward()
        optimizer.step()

    return update


def validation_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, validation) row indices of the transfer split, sorted; the same for every readout
    of a study (rows are sorted by image id and the seed is the study's)."""
    order = np.random.default_rng([seed, n]).permutation(n)
    n_val = min(max(1, round(n * fraction)), n - 2) if fraction > 0 else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


@torch.no_grad()
def score_network(
    net: nn.Module, rgb: np.ndarray, ids: np.ndarray, y: np.ndarray, task: Task, device: torch.device
) -> np.ndarray:
    """Per-image losses of a whole task network (the `self` baseline) as readouts are scored:
    the target's view of each image (noise fixed per image id, `view_input`), the same labels,
    loss and precision."""
    net.eval()
    out = []
    for i in range(0, len(rgb), 256):
        x = torch.from_numpy(np.array(rgb[i : i + 256], copy=True)).to(device).float() / 255.0
        with _autocast(device):
            pred = net(view_input(x, task.input, ids[i : i + 256]))
        out.append(
            task.per_image_loss(pred.float(), label_tensor(y[i : i + 256], task, device)).cpu().numpy()
        )
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


@torch.no_grad()
def _test_losses(
    net: nn.Module, featurize: Featurize, x: np.ndarray, y: np.ndarray, task: Task, device: torch.device
) -> np.ndarray:
    net.eval()
    out = []
    for i in range(0, len(x), 256):
        with _autocast(device):
            pred = net(featurize(_floats(x[i : i + 256], device)))
        out.append(
            task.per_image_loss(pred.float(), label_tensor(y[i : i + 256], task, device)).cpu().numpy()
        )
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches; a last batch of one image is dropped (batch norm needs two)."""
    order = rng.permutation(n)
    return [b for b in np.split(order, range(batch_size, n, batch_size)) if len(b) > 1]


def _floats(x: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(device, non_blocking=True).float()


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
