"""Import any folder of images and annotations: `<root>/<column>/<stem>.(png|jpg|npy)`.

One folder per dataset column, `rgb/` among them; the files of one image share a stem. A spec
(YAML, optional) says per column how raw values become stored ones:

    depth:  {scale: 0.001, invalid: 0, bits: 16}   # millimetres in 16-bit PNGs, 0 = no measurement
    parts:  {labels: true, invalid: 0}             # class ids; 0 = unlabelled
    semantic: {labels: true}                       # colour-coded RGB: a class per colour, white unlabelled
    edges:  {}                                     # values as stored

Defaults: values as stored, no invalid value, not labels, any bit depth (but one per column;
`bits` says which, so an 8-bit file in a 16-bit column is refused rather than read in wrong
units). File stems must be safe ids, `image_id` is no column name, and no file may resolve
outside the root (all checked before anything is written). Label columns are stored as uint8
maps (255 = no label), others as float32 (NaN = no label), RGB as uint8. Splits are drawn per
stem, so a re-import of a grown folder keeps every old image's id and split.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from components.data.importing import ColumnRule, Found, ImportConfig, complete_images, write_import
from components.data.raw_files import ARRAY_SUFFIX, IMAGE_SUFFIXES
from components.data.shards import Manifest, ShardError
from components.errors import ConfigError

RGB = "rgb"


@dataclass(frozen=True)
class FolderColumn:
    """A column of the spec: stored = raw * scale + offset; raw `invalid` = no label."""

    scale: float = 1.0
    offset: float = 0.0
    invalid: float | None = None
    labels: bool = False
    bits: int | None = None  # bits per sample of the files (8 or 16); None: any, one per column


def parse_spec(data: Any, where: str = "spec") -> dict[str, FolderColumn]:
    """{column: {scale, offset, invalid, labels}} -> typed columns; one-line errors naming the field."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of column -> settings")
    names = {f.name for f in fields(FolderColumn)}
    out = {}
    for column, settings in data.items():
        settings = settings or {}
        if not isinstance(settings, Mapping):
            raise ConfigError(f"{where}.{column}: expected a mapping of settings, got {settings!r}")
        if unknown := sorted(set(settings) - names):
            raise ConfigError(
                f"{where}.{column}.{unknown[0]}: unknown field; fields are {', '.join(sorted(names))}"
            )
        for key in ("scale", "offset", "invalid"):
            value = settings.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConfigError(f"{where}.{column}.{key}: expected a number, got {value!r}")
        if not isinstance(settings.get("labels", False), bool):
            raise ConfigError(f"{where}.{column}.labels: expected true or false, got {settings['labels']!r}")
        if isinstance(settings.get("bits"), bool) or settings.get("bits") not in (None, 8, 16):
            raise ConfigError(f"{where}.{column}.bits: expected 8 or 16, got {settings['bits']!r}")
        out[str(column)] = FolderColumn(**settings)
    return out


def load_spec(path: str | Path | None) -> dict[str, FolderColumn]:
    if path is None:
        return {}
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the spec ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    return parse_spec(data, str(path))


def scan_folder(root: Path, skip_incomplete: bool = False) -> Found:
    if not (root / RGB).is_dir():
        raise ShardError(f"{root}: no 'rgb' folder; expected <root>/<column>/<stem>.(png|jpg|npy)")
    files: dict[str, dict[str, Path]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found: dict[str, Path] = {}
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in (*IMAGE_SUFFIXES, ARRAY_SUFFIX):
                continue
            if path.stem in found:
                raise ShardError(f"{path}: another file of {folder.name}/ has the stem {path.stem!r}")
            found[path.stem] = path
        files[folder.name] = found
    ids = sorted(files[RGB])
    if not ids:
        raise ShardError(f"{root / RGB}: no .png, .jpg or .npy files")

    def expected(column: str, stem: str) -> Path:
        return root / column / f"{stem}.(png|jpg|npy)"

    return complete_images(ids, files, expected, skip_incomplete)


def column_rule(column: str, spec: FolderColumn) -> ColumnRule:
    if column == RGB:
        return ColumnRule(RGB, "uint8", 3)
    dtype = "uint8" if spec.labels else "float32"
    return ColumnRule(
        column,
        dtype,
        1 if spec.labels else None,
        spec.scale,
        spec.offset,
        spec.invalid,
        spec.labels,
        bits=spec.bits,
    )


def recorded_spec(spec: FolderColumn) -> dict:
    """The spec as the manifest's settings record it; `bits` only when set, so a dataset
    imported before `bits` existed resumes and compares equal."""
    return {k: v for k, v in vars(spec).items() if k != "bits" or v is not None}


def import_folder(
    root: str | Path,
    out: str | Path,
    config: ImportConfig,
    spec: Mapping[str, FolderColumn] | None = None,
    progress: Callable[[int], None] | None = None,
    skip_incomplete: bool = False,
) -> tuple[Manifest, Found]:
    """Write shards for every column folder under `root`; returns the manifest and what was
    found (with the images skipped, and why)."""
    root = Path(root).resolve()
    spec = dict(spec or {})
    found = scan_folder(root, skip_incomplete)
    if missing := sorted(set(spec) - set(found.files)):
        raise ConfigError(f"spec.{missing[0]}: no folder {root / missing[0]}")
    if not found.ids:
        raise ShardError(f"{root}: no image has a file in every column folder")
    columns = sorted(found.files, key=lambda c: (c != RGB, c))
    rules = {c: column_rule(c, spec.get(c, FolderColumn())) for c in columns}
    settings = {
        "importer": "taskatlas.folder",
        "root": str(root),
        "columns": columns,
        "spec": {c: recorded_spec(s) for c, s in sorted(spec.items())},
        "skip_incomplete": skip_incomplete,
        **vars(config),
    }
    manifest = write_import(
        out,
        source="folder",
        settings=settings,
        found=found,
        rules=rules,
        group_of=lambda stem: stem,
        config=config,
        progress=progress,
    )
    return manifest, found
