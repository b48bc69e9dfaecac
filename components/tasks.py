"""Tasks as data: what each task predicts, from which dataset column, and how it is scored.

A task is declared in YAML (design.md sections 2 and 9): the built-in catalog is
`components/tasks.yaml`, and a pipeline config adds or overrides tasks in the same form under
`task_definitions:`. Every loss reduces over everything but the batch axis, because Stage III
compares sources image by image, and averages over *valid* label pixels only: float labels mark
"no label" as NaN, label maps as 255. An image with no valid pixel gets a NaN loss.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from components.config import config_hash, to_dict
from components.data.shards import NO_LABEL, ShardStore
from components.errors import ConfigError


class TaskKind(str, Enum):
    PIXEL = "pixel"
    VECTOR = "vector"


class Loss(str, Enum):
    L1 = "l1"
    L2 = "l2"
    CROSS_ENTROPY = "cross_entropy"
    BCE = "bce"


class InputTransform(str, Enum):
    """What the network sees instead of the clean RGB image (the self-supervised tasks)."""

    NONE = "none"
    NOISE = "noise"
    GRAYSCALE = "grayscale"
    MASK = "mask"


NOISE_STD = 0.1
NOISE_SEED = 0  # evaluation noise: per (seed, image id)
MASK_FRACTION = 0.5  # side of the inpainting hole, as a fraction of the image side


@dataclass(frozen=True)
class Task:
    name: str
    column: str  # dataset column with the label
    kind: TaskKind
    loss: Loss
    channels: int  # output channels (pixel task) or length (vector task); classes for CE
    input: InputTransform = InputTransform.NONE
    source_only: bool = False

    @property
    def columns(self) -> list[str]:
        """Dataset columns a batch needs: the RGB input and the label (once, for RGB targets)."""
        return ["rgb"] if self.column == "rgb" else ["rgb", self.column]

    def output_shape(self, size: int, channels: int | None = None) -> tuple[int, ...]:
        """Network output shape for one image; `channels` overrides (e.g. an imported label set)."""
        c = channels or self.channels
        return (c, size, size) if self.kind is TaskKind.PIXEL else (c,)

    def per_image_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of each image in the batch over its valid label elements: shape (B,), NaN where
        an image has none. Invalid elements get no gradient, whatever value they hold."""
        if self.loss is Loss.CROSS_ENTROPY:
            valid = target != NO_LABEL
            per_elem = F.cross_entropy(pred, target.masked_fill(~valid, 0).long(), reduction="none")
        else:
            valid = ~torch.isnan(target)
            safe = torch.where(valid, target, torch.zeros_like(target))
            if self.loss is Loss.L1:
                per_elem = (pred - safe).abs()
            elif self.loss is Loss.L2:
                per_elem = (pred - safe).square()
            else:
                per_elem = F.binary_cross_entropy_with_logits(pred, safe, reduction="none")
        valid, per_elem = valid.flatten(1), per_elem.flatten(1)
        count = valid.sum(1)
        mean = torch.where(valid, per_elem, torch.zeros_like(per_elem)).sum(1) / count.clamp(min=1)
        return torch.where(count > 0, mean, torch.full_like(mean, float("nan")))

    def transform_input(self, rgb: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) float RGB in [0, 1] -> what this task's network takes as input."""
        return apply_input_transform(self.input, rgb, generator)

    def definition(self) -> dict[str, Any]:
        """The YAML form (everything but the name): part of every cache key that uses the task."""
        return {k: v for k, v in to_dict(self).items() if k != "name"}

    @property
    def definition_hash(self) -> str:
        """The definition's short hash (`config_hash`, as step keys hash it): two tasks of one
        name but another loss, column or channels differ here. A registered network carries it
        as a version tag, so a champion is only ever compared with a model of its definition."""
        return config_hash(self.definition())


def batch_loss(per_image: torch.Tensor) -> torch.Tensor:
    """The training objective of a batch: the mean over images that have a valid label (0 with a
    gradient of 0 when none has), so a hole in the labels never puts NaN into the weights."""
    ok = ~torch.isnan(per_image)
    return torch.where(ok, per_image, torch.zeros_like(per_image)).sum() / ok.sum().clamp(min=1)


def view_input(
    rgb: torch.Tensor, view: InputTransform, image_ids: Sequence[str], seed: int = NOISE_SEED
) -> torch.Tensor:
    """The task's view of float RGB (B, 3, S, S) for evaluation and features: its noise is drawn
    per image from (seed, image id), so every network, batching and run sees the same noisy image
    (training draws fresh noise instead: `apply_input_transform`)."""
    if view is not InputTransform.NOISE:
        return apply_input_transform(view, rgb)
    noise = np.stack(
        [
            np.random.default_rng([seed, zlib.crc32(str(i).encode())]).standard_normal(rgb.shape[1:])
            for i in image_ids
        ]
    )
    out = rgb + NOISE_STD * torch.from_numpy(noise).to(rgb)
    return out.clamp(0.0, 1.0)


def apply_input_transform(
    transform: InputTransform, rgb: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    if transform is InputTransform.NONE:
        return rgb
    if transform is InputTransform.NOISE:
        noise = torch.randn(rgb.shape, generator=generator, device=rgb.device, dtype=rgb.dtype)
        return (rgb + NOISE_STD * noise).clamp(0.0, 1.0)
    if transform is InputTransform.GRAYSCALE:
        gray = (rgb * rgb.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        return gray.expand_as(rgb).contiguous()
    h, w = rgb.shape[-2:]
    mh, mw = int(h * MASK_FRACTION), int(w * MASK_FRACTION)
    top, left = (h - mh) // 2, (w - mw) // 2
    out = rgb.clone()
    out[..., top : top + mh, left : left + mw] = 0.0
    return out


# ---------------------------------------------------------------- definitions (YAML)

_REQUIRED = ("column", "kind", "loss", "channels")
_FIELDS = {f.name for f in dataclasses.fields(Task)} - {"name"}


def task_from_definition(name: str, definition: Any, base: Task | None = None, where: str = "") -> Task:
    """One task from its YAML mapping; over `base` (a task being overridden) fields are optional.
    Errors are one line naming the task and the field (`where` prefixes it, e.g. the config key)."""
    at = f"{where}{name}"
    if not isinstance(definition, Mapping):
        raise ConfigError(f"{at}: a task definition is a mapping of fields, got {definition!r}")
    if unknown := sorted(set(definition) - _FIELDS):
        raise ConfigError(f"{at}.{unknown[0]}: unknown field; fields are {', '.join(sorted(_FIELDS))}")
    if base is None and (missing := [f for f in _REQUIRED if f not in definition]):
        raise ConfigError(f"{at}.{missing[0]}: required for a new task ({', '.join(_REQUIRED)} are)")
    fields = {**(base.definition() if base else {}), **definition}
    enums = {"kind": TaskKind, "loss": Loss, "input": InputTransform}
    for key, enum in enums.items():
        if key in fields:
            try:
                fields[key] = enum(fields[key])
            except ValueError:
                choices = ", ".join(m.value for m in enum)
                raise ConfigError(f"{at}.{key}: {fields[key]!r} is not one of {choices}") from None
    if not isinstance(fields["column"], str) or not fields["column"]:
        raise ConfigError(f"{at}.column: expected a dataset column name, got {fields['column']!r}")
    if not _is_column_name(fields["column"]):  # a column is a folder of imports and predictions
        raise ConfigError(
            f"{at}.column: {fields['column']!r} is not a column name (one folder name: no / or \\, "
            "not . or ..)"
        )
    channels = fields["channels"]
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ConfigError(f"{at}.channels: expected a positive integer, got {channels!r}")
    if fields["loss"] is Loss.CROSS_ENTROPY and (fields["kind"] is not TaskKind.PIXEL or channels < 2):
        raise ConfigError(f"{at}.loss: cross_entropy needs kind pixel and channels >= 2 (the classes)")
    if not isinstance(fields.get("source_only", False), bool):
        raise ConfigError(f"{at}.source_only: expected true or false, got {fields['source_only']!r}")
    return Task(name=name, **fields)


def _is_column_name(column: str) -> bool:
    """One folder name, so `DIR/<column>` stays inside DIR: no separator, not `.` or `..`."""
    return not any(sep in column for sep in "/\\") and column not in (".", "..") and "\0" not in column


def define_tasks(
    definitions: Mapping[str, Any], base: Mapping[str, Task], where: str = ""
) -> dict[str, Task]:
    """`base` with `definitions` added or overriding (an override changes only the fields it names)."""
    out = dict(base)
    for name, definition in definitions.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"{where}{name}: a task name is letters, digits and underscores")
        out[name] = task_from_definition(name, definition, base.get(name), where)
    return out


def load_catalog(path: Path) -> dict[str, Task]:
    return define_tasks(yaml.safe_load(path.read_text()) or {}, {}, where=f"{path.name}: ")


TASKS: dict[str, Task] = load_catalog(Path(__file__).with_name("tasks.yaml"))  # the built-in catalog


def get_task(name: str, catalog: Mapping[str, Task] = TASKS) -> Task:
    try:
        return catalog[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(catalog)}") from None


def parse_tasks(names: str | Iterable[str], catalog: Mapping[str, Task] = TASKS) -> list[Task]:
    """'a,b' or ['a', 'b'] -> tasks, in the given order, each name checked."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    return [get_task(n, catalog) for n in names]


def check_column(task: Task, dtype: str, shape: tuple[int, ...], where: str) -> None:
    """A definition against the column it learns (its dtype and per-image shape), before any
    work: a mismatch would otherwise surface as a shape error after Stage I's training."""
    integer = np.issubdtype(np.dtype(dtype), np.integer)
    said = f"column {task.column!r} holds {dtype} of shape {tuple(shape)}"
    if task.loss is Loss.CROSS_ENTROPY:
        if not integer:
            raise ConfigError(f"{where}.loss: cross_entropy needs integer class labels, but {said}")
        if task.kind is TaskKind.PIXEL and len(shape) != 2:
            raise ConfigError(f"{where}.kind: a pixel class map is one label per pixel, but {said}")
        return
    if task.kind is TaskKind.VECTOR and len(shape) != 1:
        raise ConfigError(f"{where}.kind: vector, but {said} (a vector column has one axis)")
    if task.kind is TaskKind.PIXEL and len(shape) != 3:
        raise ConfigError(f"{where}.kind: pixel, but {said} (channels, height, width)")
    if shape[0] != task.channels:
        raise ConfigError(f"{where}.channels: {task.channels}, but {said}")


def channels_for(task: Task, store: ShardStore) -> int:
    """Output channels: the task's own, or the dataset's class count (imported label sets)."""
    classes = store.manifest.label_classes.get(task.column)
    return len(classes) if classes and task.loss is Loss.CROSS_ENTROPY else task.channels
