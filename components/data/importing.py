"""What both importers share: reading files with one-line errors (`components.data.raw_files`), the
up-front checks, resizing that keeps invalid pixels out of valid ones, splits drawn per group, and
writing the shards.

An importer finds, per image id, one file per column (`Found`), then `write_import` checks every
file before any shard is written (`check_files`: inside the import root, a safe image id, no
reserved column name, the bit depth of the column's encoding; then the size of the image's RGB
file, which also refuses decompression bombs), and stores each column in the units and dtype its
`ColumnRule` says. "No label" is stored as NaN in float columns and as 255 in label maps
(design.md section 2); a raw `invalid` value and an optional validity mask (Taskonomy's
`mask_valid`) both mark pixels so. A label column of colour-coded RGB files (Omnidata's
`semantic`) gets one class id per colour, white meaning no label (`colour_palette`). Nothing is a finished dataset until its manifest
is written, last (`shards.write_dataset`).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from components.data.raw_files import image_size, read_raw, sample_bits
from components.data.shards import NO_LABEL, SPLITS, ColumnSpec, Manifest, ShardError, write_dataset
from components.errors import ConfigError

RESERVED_COLUMNS = frozenset({"image_id"})  # the shards' own id column
_SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # no '.', '..', separators, hidden names


@dataclass(frozen=True)
class ColumnRule:
    """How one source folder becomes one dataset column: stored = raw * scale + offset."""

    column: str
    dtype: str  # stored dtype: uint8 (RGB, label maps) or a float type
    channels: int | None = None  # channels kept from the file; None: all it has
    scale: float = 1.0
    offset: float = 0.0
    invalid: float | None = None  # raw value that means "no label"
    labels: bool = False  # class ids: nearest-neighbour resizing, 255 = no label
    masked: bool = False  # the importer's validity mask (e.g. Taskonomy's mask_valid) applies
    bits: int | None = None  # the encoding's bits per sample (8, 16); None: any, but one per column


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
            and self.transfer_fraction + self.test_fraction <= 1
        ):
            raise ConfigError("transfer_fraction and test_fraction must be >= 0 and sum to at most 1")
        if self.rows_per_shard < 1:
            raise ConfigError(f"rows_per_shard must be >= 1, got {self.rows_per_shard}")


@dataclass
class Found:
    """What an importer found: image ids, and per source folder each image's file."""

    ids: list[str]
    files: dict[str, dict[str, Path]]  # folder (domain) -> image id -> file
    skipped: Counter = field(default_factory=Counter)  # why images were skipped -> how many


def complete_images(
    ids: list[str],
    files: dict[str, dict[str, Path]],
    expected: Callable[[str, str], Path],
    skip_incomplete: bool,
) -> Found:
    """Keep the images that have a file in every folder. Without `skip_incomplete` the first
    missing file is an error naming it (`expected(folder, image id)` says where it should be)."""
    lacking = {folder: [i for i in ids if i not in found] for folder, found in files.items()}
    if not skip_incomplete:
        for folder, missing in lacking.items():
            if missing:
                raise ShardError(
                    f"{folder!r} lacks {len(missing)} of {len(ids)} images, e.g. {expected(folder, missing[0])}"
                    " (--skip-incomplete imports the images that have every domain)"
                )
    skipped: Counter = Counter()
    for i in ids:
        if gaps := [folder for folder, missing in lacking.items() if i in missing]:
            skipped[f"no {'/'.join(gaps)}"] += 1
    dropped = {i for missing in lacking.values() for i in missing}
    return Found([i for i in ids if i not in dropped], files, skipped)


def check_files(found: Found, rules: dict[str, ColumnRule], root: Path) -> None:
    """What would make the import read what it should not, or write wrong data, checked before
    anything is written; each a one-line error naming the file."""
    check_inside([files[i] for files in found.files.values() for i in found.ids], root)  # before opening
    for folder, rule in rules.items():
        if rule.column in RESERVED_COLUMNS:
            raise ShardError(f"{root / folder}: {rule.column!r} is reserved for image ids; rename the folder")
    for i in found.ids:
        if not _SAFE_ID.fullmatch(i):
            path = next(iter(found.files.values()))[i]
            raise ShardError(f"{path}: {i!r} is not a safe image id (letters, digits, _ . -, no leading dot)")
    for folder, rule in rules.items():
        check_bits([found.files[folder][i] for i in found.ids], rule)


def check_inside(paths: list[Path], root: Path) -> None:
    """A file that resolves outside the import root is refused: an import reads the folder it
    was given, not what a link in it points at (`rgb/a.png -> ../../secret.png`). A column folder
    may itself be a link (a layout assembled from links, as `taskatlas position` builds one);
    then its files must stay inside the folder it points at."""
    top = root.resolve()
    for path in paths:
        real = path.resolve()
        if not (real.is_relative_to(top) or real.is_relative_to(path.parent.resolve())):
            raise ShardError(f"{path}: resolves to {real}, outside the import root {root}")


def check_bits(paths: list[Path], rule: ColumnRule) -> None:
    """A 16-bit file in an 8-bit encoding (or the reverse) would import in the wrong units
    silently: refuse it. Without a declared depth, a column's scaled values share one depth."""
    scaled = not rule.labels and np.dtype(rule.dtype) != np.uint8
    if rule.bits is None and not scaled:
        return
    want, first = rule.bits, None
    for path in paths:
        got = sample_bits(path)
        if got is None or got == want:
            continue
        if want is None:
            want, first = got, path
        elif first is None:
            raise ShardError(f"{path}: {got}-bit, but column {rule.column} is encoded in {want} bits")
        else:
            raise ShardError(
                f"{path}: {got}-bit, but {first} is {want}-bit; the files of column {rule.column} "
                "must share one encoding"
            )


def check_sizes(found: Found, rgb: str) -> None:
    """Every file of an image has the size of its RGB image (else labels would not line up)."""
    for i in found.ids:
        want = image_size(found.files[rgb][i])
        for folder, files in found.files.items():
            if folder != rgb and (got := image_size(files[i])) != want:
                raise ShardError(
                    f"{files[i]}: {got[1]}x{got[0]} pixels, but its RGB image {found.files[rgb][i].name} "
                    f"is {want[1]}x{want[0]}; every domain of an image must have the RGB image's size"
                )


WHITE = (255, 255, 255)  # "no label" in colour-coded label maps (Omnidata's `semantic`)


def colour_palette(paths: list[Path]) -> list[tuple[int, int, int]] | None:
    """The colours of a colour-coded label column (RGB files whose channels differ somewhere, as
    Omnidata writes `semantic`), white left out as "no label"; None for class-id files. Sorted, so
    a colour's class id depends only on the set of colours, never on the order files are read."""
    colours: set[tuple[int, int, int]] = set()
    coded, grey = None, None
    for path in paths:
        raw = read_raw(path)
        rgb = raw[..., :3] if raw.shape[-1] >= 3 else None
        if rgb is None or ((rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])).all():
            grey = grey or path
        else:
            coded = coded or path
        if rgb is not None:
            colours.update(map(tuple, np.unique(rgb.reshape(-1, 3), axis=0).tolist()))
    if coded is None:
        return None
    if grey is not None and read_raw(grey).shape[-1] < 3:
        raise ShardError(f"{grey}: a class-id file, but {coded} is colour-coded; one encoding per column")
    colours.discard(WHITE)
    if len(colours) >= NO_LABEL:
        raise ShardError(f"{coded}: {len(colours)} label colours; at most {NO_LABEL - 1} classes fit")
    return sorted(colours)


def colour_ids(raw: np.ndarray, palette: list[tuple[int, int, int]]) -> np.ndarray:
    """(H, W, >=3) colours -> (H, W, 1) class ids, the index of each colour in `palette`; white
    (and any colour not in it) -> NO_LABEL."""
    code = lambda rgb: (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]  # noqa: E731
    codes = code(np.asarray(palette, np.int64))
    pixels = code(raw[..., :3].astype(np.int64))
    at = np.clip(np.searchsorted(codes, pixels), 0, len(codes) - 1)
    return np.where(codes[at] == pixels, at, NO_LABEL)[..., None]


def label_count(paths: list[Path], rule: ColumnRule) -> int:
    """Classes in a label column: the largest class id found + 1 (every file read up front, so a
    corrupt label map is reported before anything is written)."""
    top = 0
    for path in paths:
        raw = read_raw(path)[..., 0]
        ids = raw[raw != rule.invalid] if rule.invalid is not None else raw
        if ids.size:
            top = max(top, int(ids.max()))
    if top >= NO_LABEL:
        raise ShardError(f"{rule.column}: class id {top} found; ids must be below {NO_LABEL}")
    return top + 1


def stored_shape(rule: ColumnRule, channels: int, size: int) -> tuple[int, ...]:
    return (size, size) if rule.labels else (channels, size, size)


def to_stored(
    raw: np.ndarray,
    rule: ColumnRule,
    size: int,
    mask: np.ndarray | None = None,
    palette: list[tuple[int, int, int]] | None = None,
) -> np.ndarray:
    """(H, W, C) raw values -> the stored array: centre-cropped to a square, resized to `size`,
    in the rule's units; invalid pixels (raw `invalid`, or False in `mask`) become NaN / 255.
    A colour-coded label map becomes class ids through its `palette` first."""
    if palette is not None:
        raw = colour_ids(raw, palette)
        rule = replace(rule, channels=1, invalid=NO_LABEL)
    h, w = raw.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    channels = rule.channels or raw.shape[-1]
    if raw.shape[-1] < channels:
        raise ShardError(f"{rule.column}: a file has {raw.shape[-1]} channels, the column needs {channels}")
    raw = raw[top : top + side, left : left + side, :channels].astype(np.float64)
    valid = np.ones(raw.shape[:2], bool)
    if rule.invalid is not None:
        valid &= ~(raw == rule.invalid).any(axis=-1)
    if mask is not None:
        valid &= mask[top : top + side, left : left + side]
    if rule.labels:
        ids = np.where(valid, raw[..., 0], NO_LABEL)
        return _resize(ids, size, Image.NEAREST).astype(np.uint8)
    values = raw * rule.scale + rule.offset
    if np.dtype(rule.dtype) == np.uint8:  # RGB: no invalid value
        chans = [_resize(values[..., c], size, Image.BILINEAR) for c in range(channels)]
        return np.clip(np.rint(np.stack(chans)), 0, 255).astype(np.uint8)
    # Normalised convolution: resize(value * valid) / resize(valid), so a valid output pixel is a
    # weighted mean of valid inputs only; it is valid where most of its footprint is.
    weight = _resize(valid.astype(np.float64), size, Image.BILINEAR)
    out = []
    for c in range(channels):
        summed = _resize(np.where(valid, values[..., c], 0.0), size, Image.BILINEAR)
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(np.where(weight >= 0.5, summed / weight, np.nan))
    return np.stack(out).astype(rule.dtype)


def _resize(plane: np.ndarray, size: int, resample: int) -> np.ndarray:
    return np.asarray(Image.fromarray(plane.astype(np.float32), mode="F").resize((size, size), resample))


def split_of(group: str, config: ImportConfig) -> str:
    """The split of a group of images (a Taskonomy point, a folder stem), from its name alone:
    an image keeps its split when the source folder grows and is imported again."""
    u = int(hashlib.sha256(group.encode()).hexdigest()[:8], 16) / 2**32
    if u < config.test_fraction:
        return "test"
    return "transfer" if u < config.test_fraction + config.transfer_fraction else "train"


def write_import(
    out: str | Path,
    *,
    source: str,
    settings: dict,
    found: Found,
    rules: dict[str, ColumnRule],  # folder -> rule, every folder that becomes a column
    group_of: Callable[[str], str],
    config: ImportConfig,
    mask_folder: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> Manifest:
    """Check every file up front, then write the shards (see module docstring). Every file must
    resolve inside `settings["root"]`, the source folder the manifest records."""
    rgb = next(f for f, r in rules.items() if r.column == "rgb")
    check_files(found, rules, Path(settings["root"]))
    check_sizes(found, rgb)
    channels = {f: r.channels or read_raw(found.files[f][found.ids[0]]).shape[-1] for f, r in rules.items()}
    palettes = {
        f: colour_palette([found.files[f][i] for i in found.ids]) for f, r in rules.items() if r.labels
    }
    label_classes = {  # a colour-coded column's classes are named by colour, in its palette's order
        r.column: [f"#{c[0]:02x}{c[1]:02x}{c[2]:02x}" for c in palettes[f]]
        if palettes[f] is not None
        else [f"class_{k}" for k in range(label_count([found.files[f][i] for i in found.ids], r))]
        for f, r in rules.items()
        if r.labels
    }
    columns = tuple(
        ColumnSpec(r.column, r.dtype, stored_shape(r, channels[f], config.size)) for f, r in rules.items()
    )
    by_split = {s: [i for i in found.ids if split_of(group_of(i), config) == s] for s in SPLITS}

    def produce(split: str, start: int, count: int) -> tuple[list[str], dict]:
        chosen = by_split[split][start : start + count]
        arrays: dict[str, list] = {r.column: [] for r in rules.values()}
        for i in chosen:
            mask = read_raw(found.files[mask_folder][i])[..., 0] > 0 if mask_folder else None
            for f, r in rules.items():
                raw = read_raw(found.files[f][i])
                if raw.shape[-1] != channels[f] and r.channels is None and palettes.get(f) is None:
                    raise ShardError(
                        f"{found.files[f][i]}: {raw.shape[-1]} channels, other files have {channels[f]}"
                    )
                stored = to_stored(raw, r, config.size, mask if r.masked else None, palettes.get(f))
                arrays[r.column].append(stored)
        return chosen, {k: np.stack(v) for k, v in arrays.items()}

    return write_dataset(
        out,
        source=source,
        settings=settings,
        columns=columns,
        counts={s: len(v) for s, v in by_split.items()},
        produce=produce,
        rows_per_shard=config.rows_per_shard,
        label_classes=label_classes,
        progress=progress,
    )


def describe_skipped(skipped: Counter) -> str:
    """'skipped 3 incomplete image(s): 2 no normal, 1 no depth_zbuffer/normal'."""
    total = sum(skipped.values())
    reasons = ", ".join(f"{n} {why}" for why, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"skipped {total} incomplete image(s): {reasons}"
