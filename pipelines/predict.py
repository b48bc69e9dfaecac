"""`taskatlas predict`: a registered model's predictions for a folder of images.

    taskatlas predict -c configs/quickstart.yaml --model taskatlas-quickstart-near-transfer --images photos/ --out preds/

The model is a positioned task's transfer model (`taskatlas position`), or any study network
(`<study>-<task>`, `pipelines/tracking/registry.py`); `NAME` is its champion, `NAME@alias` or
`NAME/version` another. Both are rebuilt with this project's code from weights-only files; a
transfer model's encoders are the registered versions it records. Images (`DIR/rgb/*` or `DIR/*`:
PNG, JPEG or .npy) are centre-cropped and resized as the importers do; predictions go to
`OUT/<column>/<stem>.<ext>` in the task's stored encoding
(`components.transfer.model.write_prediction`), the generic import layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from components.data.folder import RGB
from components.data.importing import ColumnRule, to_stored
from components.data.raw_files import ARRAY_SUFFIX, IMAGE_SUFFIXES, read_raw
from components.errors import ConfigError
from components.models import TaskNetwork
from components.tasks import Task, view_input
from components.transfer.features import trained_encoder
from components.transfer.model import TRANSFER_FORMAT, TransferModel, TransferSpec, write_prediction
from pipelines.progress import progress_bar
from pipelines.tracking.models import (
    load_registered_model,
    load_registered_weights,
    network_spec,
    resolve_version,
)

_NETWORK_FORMAT = "taskatlas-weights-v1"
BATCH = 64


@dataclass(frozen=True)
class Predicted:
    model: str  # name/version
    task: str
    files: int
    out: str


def load_model(tracking_uri: str, model: str) -> tuple[str, str, Task, int, torch.nn.Module, bool]:
    """(name, version, task, image size, module, is a transfer model): the module maps uint8 RGB
    and image ids to the task's output."""
    name, version = resolve_version(tracking_uri, model)
    architecture, state = load_registered_weights(
        tracking_uri, name, version, formats=(_NETWORK_FORMAT, TRANSFER_FORMAT)
    )
    if architecture["format"] == TRANSFER_FORMAT:
        spec = TransferSpec.from_architecture(architecture)
        encoders = [
            trained_encoder(
                load_registered_model(tracking_uri, e.registered, e.version).state_dict(), spec.model
            )
            for e in spec.encoders
        ]
        readout = spec.build_readout()
        readout.load_state_dict(state)
        return name, version, spec.task, spec.image_size, TransferModel(spec, encoders, readout.eval()), True
    spec = network_spec(architecture)
    net = spec.build()
    net.load_state_dict(state)
    return name, version, spec.task, spec.image_size, _Network(spec.task, net.eval()), False


class _Network(torch.nn.Module):
    """A study network with the transfer model's call: uint8 RGB and ids -> output."""

    def __init__(self, task: Task, net: TaskNetwork):
        super().__init__()
        self.task, self.net = task, net

    @torch.no_grad()
    def forward(self, rgb: torch.Tensor, image_ids) -> torch.Tensor:
        return self.net(view_input(rgb.float() / 255.0, self.task.input, np.asarray(image_ids)))


def image_files(folder: Path) -> list[Path]:
    """`folder/rgb/*` if there is such a folder, else `folder/*`: the images, by name."""
    if not folder.is_dir():
        raise ConfigError(f"--images {folder}: no such folder")
    source = folder / RGB if (folder / RGB).is_dir() else folder
    files = sorted(p for p in source.iterdir() if p.suffix.lower() in (*IMAGE_SUFFIXES, ARRAY_SUFFIX))
    if not files:
        raise ConfigError(f"--images {source}: no .png, .jpg or .npy images")
    return files


def check_out(images: Path, out: Path) -> None:
    """Predictions never go into their inputs nor over a file: an `out` that is, contains or is
    inside `images` (resolved, links followed), or is a file, is refused naming both."""
    source, target = images.resolve(), out.resolve()
    if target == source or source.is_relative_to(target) or target.is_relative_to(source):
        raise ConfigError(
            f"--out {out} and --images {images} overlap: predictions (OUT/<column>/<stem>) could "
            "overwrite the images; give an --out outside --images"
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder (--images {images})")


def predict(tracking_uri: str, model: str, images: Path, out: Path) -> Predicted:
    check_out(images, out)
    files = image_files(images)  # before loading anything
    name, version, task, size, module, _ = load_model(tracking_uri, model)
    rule = ColumnRule(RGB, "uint8", 3)
    folder = out / task.column
    with progress_bar(len(files), f"predicting {task.name}") as update:
        for i in range(0, len(files), BATCH):
            chunk = files[i : i + BATCH]
            rgb = np.stack([to_stored(read_raw(p), rule, size) for p in chunk])
            pred = module(torch.from_numpy(rgb), [p.stem for p in chunk]).float().numpy()
            for p, y in zip(chunk, pred, strict=True):
                write_prediction(folder, p.stem, task, y)
            update(len(chunk))
    return Predicted(f"{name}/{version}", task.name, len(files), str(folder))
