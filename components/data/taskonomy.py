"""Import the public Taskonomy folder layout into the same Parquet shards as the synthetic data.

Layout: `<root>/<domain>/point_<i>_view_<j>_domain_<domain>.png`, one folder per domain. Every
domain found must have a file for every RGB image. Images are centre-cropped to a square and
resized to `size`; label maps (segmentation) use nearest-neighbour resizing. Splits are drawn
per *point* (hash of the point id), so the views of one 3D point never straddle two splits.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from components.data.shards import SPLITS, ColumnSpec, Manifest, ShardError, write_dataset
from components.errors import ConfigError

_NAME = re.compile(r"^point_(\d+)_view_(\d+)_domain_(\w+)\.png$")


@dataclass(frozen=True)
class Domain:
    column: str
    channels: int  # channels kept from the PNG
    dtype: str  # stored dtype
    scale: float  # stored value = raw * scale + offset
    offset: float = 0.0
    labels: bool = False  # class ids: nearest-neighbour resizing, stored as they are


# Taskonomy's encodings: 16-bit depth in 1/512 m, 8-bit normals in [-1, 1], 16-bit edge and
# keypoint responses, 8-bit reshading, curvature centred on 128, 8-bit class ids.
DOMAINS: dict[str, Domain] = {
    "rgb": Domain("rgb", 3, "uint8", 1.0),
    "depth_zbuffer": Domain("depth_zbuffer", 1, "float16", 1 / 512),
    "depth_euclidean": Domain("depth_euclidean", 1, "float16", 1 / 512),
    "normal": Domain("normal", 3, "float16", 2 / 255, -1.0),
    "reshading": Domain("reshading", 1, "float16", 1 / 255),
    "principal_curvature": Domain("curvature", 2, "float16", 1 / 128, -1.0),
    "edge_texture": Domain("edge_texture", 1, "float16", 1 / 65535),
    "edge_occlusion": Domain("edge_occlusion", 1, "float16", 1 / 65535),
    "keypoints2d": Domain("keypoints2d", 1, "float16", 1 / 65535),
    "keypoints3d": Domain("keypoints3d", 1, "float16", 1 / 65535),
    "segment_semantic": Domain("segment_semantic", 1, "uint8", 1.0, labels=True),
}


@dataclass(frozen=True)
class ImportConfig:
    size: int = 64
    transfer_fraction: float = 0.1
    test_fraction: float = 0.1
    rows_per_shard: int = 500

    def __post_init__(self) -> None:
        if not 8 <= self.size <= 1024:
            raise ConfigError(f"size must be in [8, 1024], got {self.size}")
        if not (
            self.transfer_fraction >= 0
            and self.test_fraction >= 0
            and self.transfer_fraction + self.test_fraction < 1
        ):
            raise ConfigError("transfer_fraction and test_fraction must be >= 0 and sum to less than 1")


def scan(root: Path) -> tuple[list[str], dict[str, dict[str, Path]], list[str]]:
    """Image ids (`point_i_view_j`), {domain: {image id: file}}, and folders that are not known domains."""
    if not (root / "rgb").is_dir():
        raise ShardError(
            f"{root}: no 'rgb' folder; expected <root>/<domain>/point_<i>_view_<j>_domain_<domain>.png"
        )
    files: dict[str, dict[str, Path]] = {}
    unknown = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name not in DOMAINS:
            unknown.append(folder.name)
            continue
        found = {}
        for path in folder.iterdir():
            m = _NAME.match(path.name)
            if m and m.group(3) == folder.name:
                found[f"point_{m.group(1)}_view_{m.group(2)}"] = path
        files[folder.name] = found
    ids = sorted(files["rgb"], key=lambda s: tuple(int(x) for x in re.findall(r"\d+", s)))
    if not ids:
        raise ShardError(f"{root / 'rgb'}: no files named point_<i>_view_<j>_domain_rgb.png")
    for domain, found in files.items():
        missing = [i for i in ids if i not in found]
        if missing:
            example = root / domain / f"{missing[0]}_domain_{domain}.png"
            raise ShardError(f"domain {domain!r} lacks {len(missing)} of {len(ids)} images, e.g. {example}")
    return ids, files, unknown


def split_of(image_id: str, config: ImportConfig) -> str:
    point = image_id.split("_view_")[0]
    u = int(hashlib.sha256(point.encode()).hexdigest()[:8], 16) / 2**32
    if u < config.test_fraction:
        return "test"
    return "transfer" if u < config.test_fraction + config.transfer_fraction else "train"


def load_png(path: Path, domain: Domain, size: int) -> np.ndarray:
    """One PNG -> (channels, size, size) array in the stored dtype and units."""
    try:
        with Image.open(path) as img:
            raw = np.asarray(img)
    except (OSError, ValueError) as err:
        raise ShardError(f"{path}: cannot read PNG ({err})") from None
    raw = raw[..., None] if raw.ndim == 2 else raw
    if raw.shape[-1] < domain.channels:
        raise ShardError(f"{path}: has {raw.shape[-1]} channels, domain needs {domain.channels}")
    h, w = raw.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    raw = raw[top : top + side, left : left + side, : domain.channels].astype(np.float32)
    resample = Image.NEAREST if domain.labels else Image.BILINEAR
    chans = [
        np.asarray(Image.fromarray(raw[..., c], mode="F").resize((size, size), resample))
        for c in range(domain.channels)
    ]
    out = np.stack(chans) * domain.scale + domain.offset
    if domain.dtype == "uint8":
        out = np.clip(np.rint(out), 0, 255)
    return out.astype(domain.dtype)


def import_taskonomy(
    root: str | Path, out: str | Path, config: ImportConfig, progress: Callable[[int], None] | None = None
) -> tuple[Manifest, list[str]]:
    """Write shards for every known domain found under `root`; returns the manifest and the
    folder names that were skipped as unknown domains."""
    root = Path(root).resolve()
    ids, files, unknown = scan(root)
    domains = [d for d in DOMAINS if d in files]
    by_split = {s: [i for i in ids if split_of(i, config) == s] for s in SPLITS}
    columns = []
    for d in domains:
        spec = DOMAINS[d]
        shape = (config.size, config.size) if spec.labels else (spec.channels, config.size, config.size)
        columns.append(ColumnSpec(spec.column, spec.dtype, shape))

    def produce(split: str, start: int, count: int) -> tuple[list[str], dict]:
        chosen = by_split[split][start : start + count]
        arrays = {}
        for d in domains:
            stack = np.stack([load_png(files[d][i], DOMAINS[d], config.size) for i in chosen])
            arrays[DOMAINS[d].column] = stack[:, 0] if DOMAINS[d].labels else stack
        return chosen, arrays

    label_classes = {}
    if "segment_semantic" in files:  # class ids present anywhere; names are Taskonomy's ids
        top = max(int(np.asarray(Image.open(p)).max()) for p in files["segment_semantic"].values())
        label_classes["segment_semantic"] = [f"class_{k}" for k in range(top + 1)]
    settings = {"importer": "taskatlas.taskonomy", "root": str(root), "domains": domains, **vars(config)}
    manifest = write_dataset(
        out,
        source="taskonomy",
        settings=settings,
        columns=tuple(columns),
        counts={s: len(v) for s, v in by_split.items()},
        produce=produce,
        rows_per_shard=config.rows_per_shard,
        label_classes=label_classes,
        progress=progress,
    )
    return manifest, unknown
