"""Import the public Taskonomy folder layout into the same Parquet shards as the synthetic data.

Layout: `<root>/<domain>/point_<i>_view_<j>_domain_<domain>.png`, one folder per domain; the
Omnidata annotator's `semantic` folder is read as `segment_semantic` (its colour-coded PNGs become
class ids in sorted colour order, recorded in the manifest, white "no label"). Values are converted from
Taskonomy's encodings (below), with 65535 in the 16-bit depth maps and the zeros of `mask_valid`
(where present) stored as "no label". Splits are drawn per *point* (hash of the point id), so the
views of one 3D point never straddle two splits, and a re-import of a grown folder keeps every
old image's split. The checks and the writing are `components.data.importing`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from components.data.importing import ColumnRule, Found, ImportConfig, complete_images, split_of, write_import
from components.data.shards import Manifest, ShardError

__all__ = ["DOMAINS", "ImportConfig", "import_taskonomy", "scan", "split_of"]

_NAME = re.compile(r"^point_(\d+)_view_(\d+)_domain_(\w+)\.png$")
MASK = "mask_valid"  # 0 where the mesh has no geometry; applies to the `masked` domains
ALIASES = {"semantic": "segment_semantic"}  # folder (and file) names other annotators write
_DEPTH_INVALID = 65535  # Taskonomy's 16-bit depth: no geometry (would read as 128 m)

# Taskonomy's encodings: 16-bit depth in 1/512 m, 8-bit normals in [-1, 1], 16-bit edge and
# keypoint responses, 8-bit reshading, curvature centred on 128, 8-bit class ids. A file in
# another bit depth would import in wrong units: it is refused (`bits`).
DOMAINS: dict[str, ColumnRule] = {
    "rgb": ColumnRule("rgb", "uint8", 3, bits=8),
    "depth_zbuffer": ColumnRule(
        "depth_zbuffer", "float16", 1, 1 / 512, invalid=_DEPTH_INVALID, masked=True, bits=16
    ),
    "depth_euclidean": ColumnRule(
        "depth_euclidean", "float16", 1, 1 / 512, invalid=_DEPTH_INVALID, masked=True, bits=16
    ),
    "normal": ColumnRule("normal", "float16", 3, 2 / 255, -1.0, masked=True, bits=8),
    "reshading": ColumnRule("reshading", "float16", 1, 1 / 255, masked=True, bits=8),
    "principal_curvature": ColumnRule("curvature", "float16", 2, 1 / 128, -1.0, masked=True, bits=8),
    "edge_texture": ColumnRule("edge_texture", "float16", 1, 1 / 65535, bits=16),
    "edge_occlusion": ColumnRule("edge_occlusion", "float16", 1, 1 / 65535, bits=16),
    "keypoints2d": ColumnRule("keypoints2d", "float16", 1, 1 / 65535, bits=16),
    "keypoints3d": ColumnRule("keypoints3d", "float16", 1, 1 / 65535, bits=16),
    "segment_semantic": ColumnRule("segment_semantic", "uint8", 1, labels=True, bits=8),
}


def scan(root: Path, skip_incomplete: bool = False) -> tuple[Found, list[str]]:
    """(what was found, folders that are not known domains)."""
    if not (root / "rgb").is_dir():
        raise ShardError(
            f"{root}: no 'rgb' folder; expected <root>/<domain>/point_<i>_view_<j>_domain_<domain>.png"
        )
    files: dict[str, dict[str, Path]] = {}
    folders: dict[str, str] = {}
    unknown = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        domain = ALIASES.get(folder.name, folder.name)
        if domain not in DOMAINS and domain != MASK:
            unknown.append(folder.name)
            continue
        if domain in folders:
            raise ShardError(f"{root}: both {folders[domain]}/ and {folder.name}/ hold {domain}; keep one")
        folders[domain] = folder.name
        found = {}
        for path in folder.iterdir():
            m = _NAME.match(path.name)
            if m and m.group(3) in (folder.name, domain):
                found[f"point_{m.group(1)}_view_{m.group(2)}"] = path
        files[domain] = found
    ids = sorted(files["rgb"], key=lambda s: tuple(int(x) for x in re.findall(r"\d+", s)))
    if not ids:
        raise ShardError(f"{root / 'rgb'}: no files named point_<i>_view_<j>_domain_rgb.png")

    def expected(domain: str, image_id: str) -> Path:
        return root / folders[domain] / f"{image_id}_domain_{folders[domain]}.png"

    return complete_images(ids, files, expected, skip_incomplete), unknown


def import_taskonomy(
    root: str | Path,
    out: str | Path,
    config: ImportConfig,
    progress: Callable[[int], None] | None = None,
    skip_incomplete: bool = False,
) -> tuple[Manifest, list[str], Found]:
    """Write shards for every known domain found under `root`; returns the manifest, the folder
    names skipped as unknown domains, and what was found (with the images skipped, and why)."""
    root = Path(root).resolve()
    found, unknown = scan(root, skip_incomplete)
    if not found.ids:
        raise ShardError(f"{root}: no image has every domain ({', '.join(found.skipped)})")
    domains = [d for d in DOMAINS if d in found.files]
    settings = {
        "importer": "taskatlas.taskonomy",
        "root": str(root),
        "domains": domains,
        "skip_incomplete": skip_incomplete,
        **vars(config),
    }
    manifest = write_import(
        out,
        source="taskonomy",
        settings=settings,
        found=found,
        rules={d: DOMAINS[d] for d in domains},
        group_of=lambda image_id: image_id.split("_view_")[0],
        config=config,
        mask_folder=MASK if MASK in found.files else None,
        progress=progress,
    )
    return manifest, unknown, found
