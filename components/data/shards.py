"""The Parquet shard store: one row per image, a fixed-shape tensor column per annotation.

Layout of a dataset folder::

    manifest.json                  written last: its presence means the dataset is complete
    train/part-00000.parquet ...   (and transfer/, test/)

The manifest records the generator settings, the schema, row counts, a sha256 per shard and
the data version (a hash of all of that). Readers check a shard's schema and checksum before
returning any of its rows, and name the shard and what is wrong when they fail.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from components.errors import TaskatlasError
from components.storage import Location, location

SPLITS = ("train", "transfer", "test")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
COMPRESSION = "zstd"


class ShardError(TaskatlasError):
    """A dataset folder, manifest or shard is missing, corrupt or not what the manifest says."""


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    dtype: str  # numpy dtype name: uint8, float16, float32
    shape: tuple[int, ...]  # per image

    def arrow_type(self) -> pa.DataType:
        return pa.fixed_shape_tensor(pa.from_numpy_dtype(np.dtype(self.dtype)), list(self.shape))


@dataclass(frozen=True)
class ShardInfo:
    split: str
    path: str  # relative to the dataset root
    rows: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    source: str  # "synthetic" or "taskonomy"
    settings: dict  # generator config and seed, or importer settings
    columns: tuple[ColumnSpec, ...]
    shards: tuple[ShardInfo, ...]
    label_classes: dict = field(default_factory=dict)  # column -> class names
    format_version: int = FORMAT_VERSION

    @property
    def counts(self) -> dict[str, int]:
        return {s: sum(sh.rows for sh in self.shards if sh.split == s) for s in SPLITS}

    @property
    def data_version(self) -> str:
        """Hash of everything that defines the data: settings, schema and every shard's bytes."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def column(self, name: str) -> ColumnSpec:
        for c in self.columns:
            if c.name == name:
                return c
        raise ShardError(f"dataset has no column {name!r}; it has {', '.join(c.name for c in self.columns)}")

    def to_json(self) -> dict:
        return {**asdict(self), "counts": self.counts, "data_version": self.data_version}

    @classmethod
    def from_json(cls, data: dict, where: str) -> Manifest:
        try:
            manifest = cls(
                source=str(data["source"]),
                settings=dict(data["settings"]),
                columns=tuple(ColumnSpec(c["name"], c["dtype"], tuple(c["shape"])) for c in data["columns"]),
                shards=tuple(ShardInfo(**s) for s in data["shards"]),
                label_classes=dict(data.get("label_classes", {})),
                format_version=int(data["format_version"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ShardError(f"{where}: malformed manifest ({type(err).__name__}: {err})") from None
        if manifest.format_version != FORMAT_VERSION:
            raise ShardError(f"{where}: format_version {manifest.format_version}, expected {FORMAT_VERSION}")
        if "data_version" in data and data["data_version"] != manifest.data_version:
            raise ShardError(f"{where}: data_version does not match its contents (edited by hand?)")
        return manifest


def arrow_schema(columns: tuple[ColumnSpec, ...]) -> pa.Schema:
    return pa.schema([("image_id", pa.string())] + [(c.name, c.arrow_type()) for c in columns])


def file_sha256(path: Path | Location) -> str:
    h = hashlib.sha256()
    loc = path if isinstance(path, Location) else location(path)
    with loc.fs.open_input_stream(loc.path, compression=None) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def as_location(root: str | Path | Location) -> Location:
    return root if isinstance(root, Location) else location(root)


def write_shard(path: Location, columns: tuple[ColumnSpec, ...], image_ids: list[str], arrays: dict) -> str:
    """Write one shard whole (`Location.write_bytes`) and return its sha256."""
    data = {"image_id": pa.array(image_ids, pa.string())}
    for c in columns:
        arr = np.ascontiguousarray(arrays[c.name], dtype=c.dtype)
        if arr.shape[1:] != c.shape:
            raise ShardError(f"{path}: column {c.name!r} has shape {arr.shape[1:]}, schema says {c.shape}")
        data[c.name] = pa.FixedShapeTensorArray.from_numpy_ndarray(arr)
    buf = io.BytesIO()
    pq.write_table(pa.table(data, schema=arrow_schema(columns)), buf, compression=COMPRESSION)
    path.write_bytes(buf.getvalue())
    return hashlib.sha256(buf.getvalue()).hexdigest()


ShardProducer = Callable[[str, int, int], tuple[list[str], dict]]  # (split, start, count) -> ids, arrays
PARTIAL = ".writing.json"  # settings of a write in progress: only a matching rerun may resume it


def write_dataset(
    root: str | Path | Location,
    source: str,
    settings: dict,
    columns: tuple[ColumnSpec, ...],
    counts: dict[str, int],
    produce: ShardProducer,
    rows_per_shard: int,
    label_classes: dict | None = None,
    progress: Callable[[int], None] | None = None,
) -> Manifest:
    """Write a dataset shard by shard, resuming an interrupted write with the same settings.

    A complete dataset (manifest present) with the same settings is returned as it is; one with
    other settings is never overwritten.
    """
    root = as_location(root)
    if (root / MANIFEST).exists():
        manifest = read_manifest(root)
        if manifest.settings != settings:
            raise ShardError(
                f"{root} already holds a different dataset ({_diff(manifest.settings, settings)}); "
                "choose another output folder"
            )
        return manifest
    partial = root / PARTIAL
    if partial.exists() and partial.read_json() != settings:
        raise ShardError(
            f"{root} holds an unfinished dataset with other settings; remove it or choose another folder"
        )
    partial.write_json(settings)
    shards = []
    for split in SPLITS:
        n = counts.get(split, 0)
        for k, start in enumerate(range(0, n, rows_per_shard)):
            count = min(rows_per_shard, n - start)
            rel = f"{split}/part-{k:05d}.parquet"
            if (root / rel).exists():  # written whole by the interrupted run
                digest = file_sha256(root / rel)
            else:
                ids, arrays = produce(split, start, count)
                digest = write_shard(root / rel, columns, ids, arrays)
            shards.append(ShardInfo(split, rel, count, digest))
            if progress:
                progress(count)
    manifest = Manifest(source, settings, columns, tuple(shards), label_classes or {})
    write_manifest(root, manifest)
    partial.unlink()
    return manifest


def _diff(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)} -> {new.get(k)}" for k in keys)


def write_manifest(root: str | Path | Location, manifest: Manifest) -> None:
    (as_location(root) / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=1, sort_keys=True))


def read_manifest(root: str | Path | Location) -> Manifest:
    root = as_location(root)
    path = root / MANIFEST
    if not path.is_file():
        hint = " (an interrupted write? rerun the same command to finish it)" if root.exists() else ""
        raise ShardError(f"{path}: no manifest; not a complete taskatlas dataset{hint}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ShardError(f"{path}: not valid JSON ({err})") from None
    return Manifest.from_json(data, str(path))


class ShardStore:
    """Read access to a dataset folder; every shard is verified before its rows are returned."""

    def __init__(self, root: str | Path | Location):
        self.root = as_location(root)
        self.manifest = read_manifest(self.root)
        self._verified: set[str] = set()

    @property
    def data_version(self) -> str:
        return self.manifest.data_version

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in SPLITS:
            raise ShardError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
        return [s for s in self.manifest.shards if s.split == split]

    def shard_paths(self, split: str) -> list[Location]:
        """Verified locations of a split's shards (for readers such as Ray Data). On object
        storage the check reads each shard's footer only (schema, rows), not its bytes: hashing
        would pull the whole dataset through this process, the driver; the readers that do read a
        shard's bytes here (`iter_shards`) check its checksum as they read."""
        infos = self.shards(split)
        for info in infos:
            self.verify_shard(info, checksum=self.root.is_local)
        return [self.root / info.path for info in infos]

    def verify(self) -> None:
        for info in self.manifest.shards:
            self.verify_shard(info)

    def verify_shard(self, info: ShardInfo, checksum: bool = True, data: bytes | None = None) -> None:
        """Schema, rows and (with `checksum`) sha256 against the manifest; `data`: the shard's
        bytes when the caller has read them already."""
        if info.path in self._verified:
            return
        path = self.root / info.path
        if data is None and not path.is_file():
            raise ShardError(f"shard {info.path}: file is missing")
        try:
            if data is not None:
                meta = pq.read_metadata(io.BytesIO(data))
            else:
                with path.fs.open_input_file(path.path) as f:
                    meta = pq.read_metadata(f)
            schema = meta.schema.to_arrow_schema()
        except (pa.ArrowException, OSError) as err:
            raise ShardError(f"shard {info.path}: not a readable Parquet file ({err})") from None
        for spec in self.manifest.columns:
            if spec.name not in schema.names:
                raise ShardError(f"shard {info.path}: missing column {spec.name!r}")
            got = schema.field(spec.name).type
            if got != spec.arrow_type():
                shape = getattr(got, "shape", None)
                what = f"shape {tuple(shape)}" if shape is not None else f"type {got}"
                want = f"shape {spec.shape} of {spec.dtype}"
                raise ShardError(f"shard {info.path}: column {spec.name!r} has {what}, manifest says {want}")
        if meta.num_rows != info.rows:
            raise ShardError(f"shard {info.path}: {meta.num_rows} rows, manifest says {info.rows}")
        if not checksum:
            return  # footer only: not remembered as verified, so a full check can still follow
        digest = hashlib.sha256(data).hexdigest() if data is not None else file_sha256(path)
        if digest != info.sha256:
            raise ShardError(
                f"shard {info.path}: corrupt, sha256 {digest[:12]}… does not match the manifest's {info.sha256[:12]}…"
            )
        self._verified.add(info.path)

    def iter_shards(self, split: str, columns: list[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Yield each shard of a split as {column: (rows, ...) array, 'image_id': array of str}."""
        names = self._columns(columns)
        for info in self.shards(split):
            yield self._read_shard(info, names)

    def read(self, split: str, columns: list[str] | None = None) -> dict[str, np.ndarray]:
        """A whole split in memory (fine at the sizes Stage II and the tests use)."""
        return self._concat(list(self.iter_shards(split, columns)), columns)

    def read_rows(
        self, split: str, columns: list[str] | None, start: int, stop: int
    ) -> dict[str, np.ndarray]:
        """Rows [start, stop) of a split, reading only the shards that hold them: a training
        worker's slice, without the rest of the split passing through it."""
        names, parts, first = self._columns(columns), [], 0
        for info in self.shards(split):
            lo, hi = max(start, first), min(stop, first + info.rows)
            if lo < hi:
                shard = self._read_shard(info, names)
                parts.append({k: v[lo - first : hi - first] for k, v in shard.items()})
            first += info.rows
        return self._concat(parts, columns)

    def read_shard(self, info: ShardInfo, columns: list[str] | None = None) -> dict[str, np.ndarray]:
        """One shard's rows (checked as it is read)."""
        return self._read_shard(info, self._columns(columns))

    def _read_shard(self, info: ShardInfo, names: list[str]) -> dict[str, np.ndarray]:
        try:
            data = (self.root / info.path).read_bytes()  # one read: checked, then parsed
        except FileNotFoundError:
            raise ShardError(f"shard {info.path}: file is missing") from None
        self.verify_shard(info, data=data)
        return table_to_numpy(pq.read_table(io.BytesIO(data), columns=["image_id", *names]))

    def _concat(self, parts: list[dict[str, np.ndarray]], columns: list[str] | None) -> dict[str, np.ndarray]:
        if not parts:
            return {k: np.zeros((0, *self.manifest.column(k).shape)) for k in self._columns(columns)}
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _columns(self, columns: list[str] | None) -> list[str]:
        if columns is None:
            return [c.name for c in self.manifest.columns]
        for name in columns:
            self.manifest.column(name)
        return list(columns)


NO_LABEL = 255  # "no label" in a uint8 label map; float columns use NaN (design.md section 2)


def valid_mask(column: str, values: np.ndarray) -> np.ndarray:
    """Which stored values are labels: not NaN (float columns), not 255 (uint8 label maps); RGB
    is always valid."""
    if values.dtype.kind == "f":
        return ~np.isnan(values)
    if column != "rgb" and values.dtype == np.uint8:
        return values != NO_LABEL
    return np.ones(values.shape, bool)


def valid_fractions(store: ShardStore) -> dict[str, float]:
    """Each column's fraction of valid values over every split (reads the whole dataset)."""
    valid: dict[str, int] = {}
    total: dict[str, int] = {}
    for split in SPLITS:
        for shard in store.iter_shards(split):
            for name, values in shard.items():
                if name != "image_id":
                    valid[name] = valid.get(name, 0) + int(valid_mask(name, values).sum())
                    total[name] = total.get(name, 0) + values.size
    return {name: valid[name] / max(total[name], 1) for name in valid}


def table_to_numpy(table: pa.Table) -> dict[str, np.ndarray]:
    """Arrow table with fixed-shape tensor columns -> dict of stacked numpy arrays."""
    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if isinstance(col.type, pa.FixedShapeTensorType):
            out[name] = col.to_numpy_ndarray()
        else:
            out[name] = np.asarray(col.to_pylist(), dtype=object)
    return out
