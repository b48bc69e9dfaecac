"""Make a stand-in for your own photos and annotation (README: "Studying your own tasks and data").

    .venv/bin/python examples/make_photo_folder.py my-photos [--images 600]

Writes 600 synthetic 32x32 scenes as plain files, as a camera and an annotator would:
`rgb/<stem>.png`, `depth/<stem>.png` (16-bit millimetres, 0 beyond the sensor's 5 m range) and
`boundaries/<stem>.png` (0/255, your own labels: here, the scenes' occlusion edges).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from components.data.scenes import SceneConfig
from components.data.synthetic import DatasetConfig, render_images

SENSOR_RANGE_MM = 5000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=600)
    args = parser.parse_args()
    scenes = render_images(DatasetConfig(seed=11, scene=SceneConfig(size=32)), "train", 0, args.images)
    for name in ("rgb", "depth", "boundaries"):
        (args.out / name).mkdir(parents=True, exist_ok=True)
    for i in range(args.images):
        stem = f"img{i:04d}"
        Image.fromarray(scenes["rgb"][i].transpose(1, 2, 0)).save(args.out / "rgb" / f"{stem}.png")
        mm = (scenes["depth_zbuffer"][i, 0].astype(np.float32) * 1000).astype(np.uint16)
        mm[mm > SENSOR_RANGE_MM] = 0  # no reading
        Image.fromarray(mm).save(args.out / "depth" / f"{stem}.png")
        edges = (scenes["edge_occlusion"][i, 0] > 0.5).astype(np.uint8) * 255
        Image.fromarray(edges).save(args.out / "boundaries" / f"{stem}.png")
    print(f"wrote {args.images} images to {args.out}")


if __name__ == "__main__":
    main()
