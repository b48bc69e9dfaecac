"""A picture of one scene with all its annotations (the README's figure)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from components.data.scenes import OBJECT_CLASSES, ROOM_LAYOUT_FIELDS

_PANELS = (
    ("rgb", "RGB"),
    ("depth_zbuffer", "z-depth"),
    ("depth_euclidean", "euclidean depth"),
    ("normal", "surface normals"),
    ("reshading", "reshading"),
    ("curvature", "curvature (k1)"),
    ("edge_texture", "texture edges"),
    ("edge_occlusion", "occlusion edges"),
    ("keypoints2d", "2D keypoints"),
    ("keypoints3d", "3D keypoints"),
    ("segment_semantic", "semantic segmentation"),
    ("instance", "object masks"),
)


def _as_image(name: str, x: np.ndarray) -> tuple[np.ndarray, str | None]:
    x = np.asarray(x, np.float32)
    if name == "rgb":
        return x.transpose(1, 2, 0) / 255.0, None
    if name == "normal":
        return (x.transpose(1, 2, 0) + 1) / 2, None
    if x.ndim == 3:
        x = x[0]
    cmap = "tab10" if name in ("segment_semantic", "instance") else "viridis"
    return x, cmap


def save_scene_figure(row: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """Draw every annotation of one image (a dict of column -> array, no batch axis)."""
    panels = [(k, label) for k, label in _PANELS if k in row]
    cols = 5
    rows = -(-(len(panels) + 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.5 * rows))
    for ax in axes.flat:
        ax.axis("off")
    for ax, (key, label) in zip(axes.flat, panels, strict=False):
        image, cmap = _as_image(key, row[key])
        ax.imshow(
            image,
            cmap=cmap,
            interpolation="nearest",
            vmin=0 if cmap == "tab10" else None,
            vmax=9 if cmap == "tab10" else None,
        )
        ax.set_title(label, fontsize=9)
    text = []
    if "class_object" in row:
        present = [c for c, v in zip(OBJECT_CLASSES, row["class_object"], strict=True) if v > 0.5]
        text.append("objects: " + (", ".join(present) or "none"))
    if "room_layout" in row:
        text += [f"{k} = {v:+.2f}" for k, v in zip(ROOM_LAYOUT_FIELDS, row["room_layout"], strict=True)]
    axes.flat[len(panels)].text(0.0, 1.0, "\n".join(text), va="top", fontsize=7, family="monospace")
    axes.flat[len(panels)].set_title("vector tasks", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
