"""A positioned task's model: the study's frozen source encoders and the readout trained on them,
stored weights-only (design.md section 12).

The registry holds the readout's state dict and `TransferSpec` (what rebuilds it, and which
registered encoder versions feed it); the encoders stay where the study registered them. So a
model is small, and it is rebuilt with this project's code, never unpickled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from components.config import from_dict, to_dict
from components.models import ModelConfig
from components.tasks import Loss, Task, TaskKind, view_input
from components.transfer.readout import ReadoutNetwork, build_readout

TRANSFER_FORMAT = "taskatlas-transfer-v1"


@dataclass(frozen=True)
class EncoderRef:
    """One source of the model: a registered task network's encoder."""

    task: str
    registered: str  # registered model name
    version: str


@dataclass(frozen=True)
class TransferSpec:
    """Everything that rebuilds a transfer model except its weights."""

    task: Task
    model: ModelConfig
    image_size: int
    channels: int
    width: int  # the readout's transfer layers
    in_channels: int  # features of every source, concatenated in `encoders` order
    encoders: tuple[EncoderRef, ...]

    def architecture(self) -> dict[str, Any]:
        return {"format": TRANSFER_FORMAT, **to_dict(self.__dict__)}

    @classmethod
    def from_architecture(cls, data: Mapping[str, Any]) -> TransferSpec:
        return cls(
            task=from_dict(Task, data["task"], "task."),
            model=from_dict(ModelConfig, data["model"], "model."),
            image_size=int(data["image_size"]),
            channels=int(data["channels"]),
            width=int(data["width"]),
            in_channels=int(data["in_channels"]),
            encoders=tuple(EncoderRef(**e) for e in data["encoders"]),
        )

    def build_readout(self) -> ReadoutNetwork:
        return build_readout(
            self.task, self.in_channels, self.model, self.image_size, self.width, self.channels
        )


class TransferModel(nn.Module):
    """uint8 RGB -> the task's prediction: the target's view of the image, every source encoder
    (frozen), their features concatenated, the readout."""

    def __init__(self, spec: TransferSpec, encoders: Sequence[nn.Module], readout: nn.Module):
        super().__init__()
        self.spec = spec
        self.encoders = nn.ModuleList(encoders)
        self.readout = readout

    @torch.no_grad()
    def forward(self, rgb: torch.Tensor, image_ids: Sequence[str]) -> torch.Tensor:
        x = view_input(rgb.float() / 255.0, self.spec.task.input, np.asarray(image_ids))
        return self.readout(torch.cat([e(x).float() for e in self.encoders], dim=1))


def write_prediction(out: Path, stem: str, task: Task, pred: np.ndarray) -> Path:
    """One image's network output (C, H, W) or (C,) -> a file in the task's stored encoding, the
    generic import layout's (so predictions import back as a column): class maps as PNGs of class
    ids, RGB outputs as PNGs, other pixel outputs (probabilities for BCE) as (H, W, C) float32 `.npy`, vectors as `.npy`."""
    out.mkdir(parents=True, exist_ok=True)
    if task.loss is Loss.BCE:  # the network gives logits
        pred = 1.0 / (1.0 + np.exp(-pred))
    if task.kind is TaskKind.VECTOR:
        path = out / f"{stem}.npy"
        np.save(path, pred.astype(np.float32))
    elif task.loss is Loss.CROSS_ENTROPY:
        path = out / f"{stem}.png"
        Image.fromarray(pred.argmax(axis=0).astype(np.uint8)).save(path)
    elif task.column == "rgb":
        path = out / f"{stem}.png"
        Image.fromarray(np.clip(np.rint(pred * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0)).save(path)
    else:
        path = out / f"{stem}.npy"
        np.save(path, pred.transpose(1, 2, 0).astype(np.float32))
    return path
