"""Random scene descriptions: a room, 1-5 textured primitives, a point light, a camera.

Sampling is per image from `default_rng([seed, image_index])`, so an image depends only on the
seed and its index: shards come out identical whatever the batch size or number of workers.
The arrays are batched (leading axis = image) so the renderer can stay vectorized.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from components.errors import ConfigError

# The synthetic scenes' label sets: class ids are positions in these tuples.
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


class Shape(IntEnum):
    NONE = -1
    SPHERE = 0
    BOX = 1
    CYLINDER = 2


class Pattern(IntEnum):
    PLAIN = 0
    CHECKER = 1
    STRIPES = 2


ROOM_MATERIALS = 3  # floor, walls, ceiling come before the object slots in the material table


@dataclass(frozen=True)
class SceneConfig:
    """What the generator draws from; part of the data version."""

    size: int = 64
    min_objects: int = 1
    max_objects: int = 5
    fov_deg: float = 60.0

    def __post_init__(self) -> None:
        if not 8 <= self.size <= 1024:
            raise ConfigError(f"size must be in [8, 1024], got {self.size}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ConfigError(
                f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}"
            )
        if not 10.0 <= self.fov_deg <= 120.0:
            raise ConfigError(f"fov_deg must be in [10, 120], got {self.fov_deg}")


@dataclass
class Scenes:
    """A batch of N scenes with S = max_objects object slots (unused slots have shape NONE)."""

    room: np.ndarray  # (N, 3) width (x), height (y), depth (z)
    cam_pos: np.ndarray  # (N, 3)
    cam_rot: np.ndarray  # (N, 3, 3) camera-to-world; columns right, up, forward
    yaw: np.ndarray  # (N,)
    pitch: np.ndarray  # (N,)
    light_pos: np.ndarray  # (N, 3)
    light_color: np.ndarray  # (N, 3)
    shape: np.ndarray  # (N, S) Shape codes
    center: np.ndarray  # (N, S, 3) sphere centre / box centre / cylinder base centre
    extent: np.ndarray  # (N, S, 3) sphere (r, r, r); box half sizes; cylinder (r, height, r)
    angle: np.ndarray  # (N, S) rotation about the vertical axis (boxes)
    # Materials: index 0 floor, 1 walls, 2 ceiling, 3 + s object slot s.
    pattern: np.ndarray  # (N, 3 + S) Pattern codes
    frequency: np.ndarray  # (N, 3 + S) pattern cycles per metre
    stripe_dir: np.ndarray  # (N, 3 + S, 3) unit vector
    color_a: np.ndarray  # (N, 3 + S, 3)
    color_b: np.ndarray  # (N, 3 + S, 3)

    def __len__(self) -> int:
        return len(self.room)


def sample_scenes(key: tuple[int, ...], start: int, count: int, config: SceneConfig) -> Scenes:
    """Scenes for image indices start .. start + count - 1 of the random stream `key`."""
    one = [_sample_one(np.random.default_rng([*key, start + i]), config) for i in range(count)]
    return Scenes(**{k: np.stack([s[k] for s in one]).astype(_dtype(k)) for k in one[0]})


def _dtype(key: str) -> type:
    return np.int8 if key in ("shape", "pattern") else np.float32


def _footprint(shape: Shape, extent: np.ndarray) -> float:
    return float(np.hypot(extent[0], extent[2])) if shape is Shape.BOX else float(extent[0])


def _sample_one(rng: np.random.Generator, config: SceneConfig) -> dict[str, np.ndarray]:
    slots = config.max_objects
    width, height, depth = rng.uniform(4.0, 7.0), rng.uniform(2.5, 3.5), rng.uniform(4.0, 7.0)
    phi = rng.uniform(0, 2 * np.pi)
    cam = np.array([0.42 * width * np.cos(phi), rng.uniform(1.2, 2.0), 0.42 * depth * np.sin(phi)])
    yaw = np.arctan2(-cam[0], -cam[2]) + rng.uniform(-0.35, 0.35)
    pitch = rng.uniform(-0.4, -0.05)
    forward = np.array([np.cos(pitch) * np.sin(yaw), np.sin(pitch), np.cos(pitch) * np.cos(yaw)])
    right = np.cross([0.0, 1.0, 0.0], forward)
    right /= np.linalg.norm(right)
    rot = np.stack([right, np.cross(forward, right), forward], axis=1)

    shape = np.full(slots, Shape.NONE)
    center = np.zeros((slots, 3))
    extent = np.ones((slots, 3))
    angle = np.zeros(slots)
    for s in range(rng.integers(config.min_objects, config.max_objects + 1)):
        kind = Shape(rng.integers(0, 3))
        if kind is Shape.SPHERE:
            ext = np.full(3, rng.uniform(0.3, 0.7))
        elif kind is Shape.BOX:
            ext = rng.uniform([0.25, 0.2, 0.25], [0.6, 0.7, 0.6])
        else:
            r = rng.uniform(0.2, 0.5)
            ext = np.array([r, rng.uniform(0.4, 1.6), r])
        for _ in range(20):  # keep the camera outside every object
            xz = rng.uniform(-0.3, 0.3, 2) * [width, depth]
            if np.hypot(xz[0] - cam[0], xz[1] - cam[2]) > _footprint(kind, ext) + 0.3:
                break
        else:
            continue
        base_y = ext[1] if kind is not Shape.CYLINDER else 0.0  # everything rests on the floor
        shape[s], extent[s], angle[s] = kind, ext, rng.uniform(0, np.pi)
        center[s] = [xz[0], base_y, xz[1]]

    materials = 3 + slots
    pattern = rng.integers(0, 3, materials)
    pattern[0] = rng.choice([Pattern.CHECKER, Pattern.STRIPES])  # floors are tiled or planked
    pattern[2] = Pattern.PLAIN
    direction = rng.normal(size=(materials, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    color_a = rng.uniform(0.15, 0.95, (materials, 3))
    color_a[1] = rng.uniform(0.55, 0.95) + rng.uniform(-0.05, 0.05, 3)  # pale walls
    color_a[2] = rng.uniform(0.8, 0.95)  # near-white ceiling
    color_b = color_a * rng.uniform(0.3, 0.7, (materials, 1))
    return {
        "room": np.array([width, height, depth]),
        "cam_pos": cam,
        "cam_rot": rot,
        "yaw": np.array(yaw),
        "pitch": np.array(pitch),
        "light_pos": np.array(
            [rng.uniform(-0.4, 0.4) * width, 0.92 * height, rng.uniform(-0.4, 0.4) * depth]
        ),
        "light_color": 1.0 + rng.uniform(-0.15, 0.15, 3),
        "shape": shape,
        "center": center,
        "extent": extent,
        "angle": angle,
        "pattern": pattern,
        "frequency": rng.uniform(1.5, 5.0, materials),
        "stripe_dir": direction,
        "color_a": np.clip(color_a, 0.0, 1.0),
        "color_b": color_b,
    }
