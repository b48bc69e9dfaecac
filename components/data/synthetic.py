"""Generate the synthetic dataset: scenes -> rendered annotations -> Parquet shards + manifest.

Each split draws from its own random stream (seed, split), so growing one split never changes
the images of another; an interrupted run resumes (see `shards.write_dataset`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from components.data.render import render
from components.data.scenes import (
    OBJECT_CLASSES,
    ROOM_LAYOUT_FIELDS,
    SEMANTIC_CLASSES,
    SceneConfig,
    sample_scenes,
)
from components.data.shards import SPLITS, ColumnSpec, Manifest, write_dataset
from components.errors import ConfigError

RENDER_BATCH = 64


@dataclass(frozen=True)
class DatasetConfig:
    n_train: int = 2000
    n_transfer: int = 500
    n_test: int = 500
    seed: int = 0
    rows_per_shard: int = 500
    scene: SceneConfig = field(default_factory=SceneConfig)

    def __post_init__(self) -> None:
        for name in ("n_train", "n_transfer", "n_test"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.rows_per_shard < 1:
            raise ConfigError(f"rows_per_shard must be >= 1, got {self.rows_per_shard}")

    def count(self, split: str) -> int:
        return {"train": self.n_train, "transfer": self.n_transfer, "test": self.n_test}[split]


def synthetic_columns(size: int) -> tuple[ColumnSpec, ...]:
    img = (size, size)
    return (
        ColumnSpec("rgb", "uint8", (3, *img)),
        ColumnSpec("depth_zbuffer", "float16", (1, *img)),
        ColumnSpec("depth_euclidean", "float16", (1, *img)),
        ColumnSpec("normal", "float16", (3, *img)),
        ColumnSpec("reshading", "float16", (1, *img)),
        ColumnSpec("curvature", "float16", (2, *img)),
        ColumnSpec("edge_texture", "float16", (1, *img)),
        ColumnSpec("edge_occlusion", "float16", (1, *img)),
        ColumnSpec("keypoints2d", "float16", (1, *img)),
        ColumnSpec("keypoints3d", "float16", (1, *img)),
        ColumnSpec("segment_semantic", "uint8", img),
        ColumnSpec("instance", "uint8", img),
        ColumnSpec("class_object", "float32", (len(OBJECT_CLASSES),)),
        ColumnSpec("room_layout", "float32", (len(ROOM_LAYOUT_FIELDS),)),
    )


def render_images(config: DatasetConfig, split: str, start: int, count: int) -> dict[str, np.ndarray]:
    """Annotations of images start .. start + count - 1 of a split (batched to bound memory)."""
    key = (config.seed, SPLITS.index(split))
    parts = []
    for s in range(start, start + count, RENDER_BATCH):
        scenes = sample_scenes(key, s, min(RENDER_BATCH, start + count - s), config.scene)
        parts.append(render(scenes, config.scene.size, config.scene.fov_deg))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def image_ids(split: str, start: int, count: int) -> list[str]:
    return [f"{split}-{i:07d}" for i in range(start, start + count)]


def generate_dataset(
    out: str | Path, config: DatasetConfig, progress: Callable[[int], None] | None = None
) -> Manifest:
    """Write the dataset to `out` (or finish an interrupted write); returns its manifest."""

    def produce(split: str, start: int, count: int) -> tuple[list[str], dict]:
        return image_ids(split, start, count), render_images(config, split, start, count)

    return write_dataset(
        out,
        source="synthetic",
        settings={"generator": "taskatlas.synthetic", **asdict(config)},
        columns=synthetic_columns(config.scene.size),
        counts={s: config.count(s) for s in SPLITS},
        produce=produce,
        rows_per_shard=config.rows_per_shard,
        label_classes={
            "segment_semantic": list(SEMANTIC_CLASSES),
            "class_object": list(OBJECT_CLASSES),
            "room_layout": list(ROOM_LAYOUT_FIELDS),
        },
        progress=progress,
    )
