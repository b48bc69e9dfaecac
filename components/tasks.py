"""The task dictionary: what each task predicts, from which shard column, and how it is scored.

Every loss reduces over everything but the batch axis, because Stage III compares sources
image by image (design.md section 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F


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
MASK_FRACTION = 0.5  # side of the inpainting hole, as a fraction of the image side


@dataclass(frozen=True)
class Task:
    name: str
    kind: TaskKind
    target: str  # shard column with the label
    loss: Loss
    channels: int  # output channels (pixel task) or length (vector task); classes for CE
    input_transform: InputTransform = InputTransform.NONE
    source_only: bool = False

    @property
    def columns(self) -> list[str]:
        """Shard columns a batch needs: the RGB input and the label (once, for RGB targets)."""
        return ["rgb"] if self.target == "rgb" else ["rgb", self.target]

    def output_shape(self, size: int, channels: int | None = None) -> tuple[int, ...]:
        """Network output shape for one image; `channels` overrides (e.g. an imported label set)."""
        c = channels or self.channels
        return (c, size, size) if self.kind is TaskKind.PIXEL else (c,)

    def per_image_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of each image in the batch: shape (B,)."""
        if self.loss is Loss.L1:
            per_elem = (pred - target).abs()
        elif self.loss is Loss.L2:
            per_elem = (pred - target).square()
        elif self.loss is Loss.CROSS_ENTROPY:
            per_elem = F.cross_entropy(pred, target.long(), reduction="none")
        else:
            per_elem = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
        return per_elem.flatten(1).mean(1)

    def transform_input(self, rgb: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) float RGB in [0, 1] -> what this task's network takes as input."""
        return apply_input_transform(self.input_transform, rgb, generator)


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


SEMANTIC_CLASSES = ("floor", "wall", "ceiling", "sphere", "box", "cylinder")
OBJECT_CLASSES = ("sphere", "box", "cylinder")
ROOM_LAYOUT_FIELDS = (
    "cam_x",
    "cam_y",
    "cam_z",
    "yaw_sin",
    "yaw_cos",
    "pitch",
    "room_width",
    "room_height",
    "room_depth",
)

_P, _V = TaskKind.PIXEL, TaskKind.VECTOR
_TASK_LIST = (
    Task("autoencoding", _P, "rgb", Loss.L1, 3),
    Task("denoising", _P, "rgb", Loss.L1, 3, InputTransform.NOISE),
    Task("colorization", _P, "rgb", Loss.L1, 3, InputTransform.GRAYSCALE, source_only=True),
    Task("inpainting", _P, "rgb", Loss.L1, 3, InputTransform.MASK, source_only=True),
    Task("depth_zbuffer", _P, "depth_zbuffer", Loss.L1, 1),
    Task("depth_euclidean", _P, "depth_euclidean", Loss.L1, 1),
    Task("normal", _P, "normal", Loss.L1, 3),
    Task("reshading", _P, "reshading", Loss.L1, 1),
    Task("curvature", _P, "curvature", Loss.L1, 2),
    Task("edge_texture", _P, "edge_texture", Loss.L1, 1),
    Task("edge_occlusion", _P, "edge_occlusion", Loss.L1, 1),
    Task("keypoints2d", _P, "keypoints2d", Loss.L1, 1),
    Task("keypoints3d", _P, "keypoints3d", Loss.L1, 1),
    Task("segment_semantic", _P, "segment_semantic", Loss.CROSS_ENTROPY, len(SEMANTIC_CLASSES)),
    Task("class_object", _V, "class_object", Loss.BCE, len(OBJECT_CLASSES)),
    Task("room_layout", _V, "room_layout", Loss.L2, len(ROOM_LAYOUT_FIELDS)),
)
TASKS: dict[str, Task] = {t.name: t for t in _TASK_LIST}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def parse_tasks(names: str | list[str] | tuple[str, ...]) -> list[Task]:
    """'a,b' or ['a', 'b'] -> tasks, in the given order, each name checked."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    return [get_task(n) for n in names]
