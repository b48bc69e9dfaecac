"""The one thing a study keeps on local disk: a bounded cache of immutable files from storage.

Feature caches are read many times by the readouts of a worker, memory-mapped; on object storage
each node keeps its own copy here, made once per node. Entries are named by what they hold
(a hash of their storage location, which is itself content-keyed), so an entry never goes stale;
when the cache grows past its bound the least recently used entries are deleted.

Where: `$TASKATLAS_CACHE` (default `~/.cache/taskatlas`); how big: `$TASKATLAS_CACHE_GB`
(default 20). An entry in use by a reader survives its deletion (an open memory map keeps it).
The bound never evicts the entry just made or used, even one larger than the bound; an entry
another process evicts before it is read is made again (`cached_array`).

Each entry has a record beside it (`<entry>.json`: its size and SHA-256 when written), checked
once per process when the entry is first used: an entry cut short, changed or without its record
is named in one line, removed and made again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from components.settings import read_settings

_RECORD = ".json"  # `<entry>.json` beside each entry: {"size", "sha256"} when written
_verified: set[tuple[str, int, int]] = set()  # (path, inode, size) of entries checked in this process


def cache_root() -> Path:
    return read_settings().cache_dir


def cache_limit_bytes() -> int:
    return int(read_settings().cache_gb * 2**30)


def cached_file(name: str, make: Callable[[Path], None], root: Path | None = None) -> Path:
    """The cache entry for `name`, made by `make(tmp_path)` if absent (atomically: a temp file
    renamed into place, so concurrent readers race harmlessly)."""
    root = root or cache_root()
    digest = hashlib.sha256(name.encode()).hexdigest()[:24]
    path = root / digest[:2] / f"{digest}{Path(name).suffix}"
    if path.exists() and _sound(path, name):
        os.utime(path)  # most recently used
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    record = path.with_name(f"{tmp.name}{_RECORD}")
    try:
        make(tmp)
        record.write_text(json.dumps({"size": tmp.stat().st_size, "sha256": _sha256(tmp)}))
        os.replace(record, _record(path))  # the record first: an entry never lacks its own
        os.replace(tmp, path)
        _verified.add(_version(path))
    finally:
        tmp.unlink(missing_ok=True)
        record.unlink(missing_ok=True)
    evict(root, cache_limit_bytes(), keep=path)
    return path


def cached_array(name: str, make: Callable[[Path], None], root: Path | None = None, mmap: bool = False):
    """The `.npy` entry for `name` loaded (memory-mapped with `mmap`): `cached_file`, made again
    if another process's eviction removes it before it is opened (once open, it stays readable)."""
    for _ in range(3):
        path = cached_file(name, make, root)
        try:
            return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except FileNotFoundError:
            continue
    raise RuntimeError(f"the local cache {path.parent.parent} evicts {path.name} ({name}) before it is read")


def _record(entry: Path) -> Path:
    return entry.with_name(entry.name + _RECORD)


def _version(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path), stat.st_ino, stat.st_size


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sound(path: Path, name: str) -> bool:
    """The entry is as its record says (checked once per process and entry version); a damaged
    one is named in one line and removed. False also when it is gone (evicted meanwhile)."""
    try:
        version = _version(path)
        if version in _verified:
            return True
        problem = _problem(path, version[2])
    except FileNotFoundError:
        return False
    if not problem:
        _verified.add(version)
        return True
    if path.exists():  # an entry evicted meanwhile is made again without a word
        said = f"taskatlas: cached file {path} ({name}) {problem}; it is made again"
        print(said, file=sys.stderr, flush=True)
        path.unlink(missing_ok=True)
        _record(path).unlink(missing_ok=True)
    return False


def _problem(path: Path, size: int) -> str:
    """Why the entry is not as written ("" when it is)."""
    try:
        record = json.loads(_record(path).read_text())
        recorded, digest = int(record["size"]), str(record["sha256"])
    except FileNotFoundError:
        return "has no record of its size and SHA-256"
    except (OSError, ValueError, TypeError, KeyError) as err:
        return f"has a record that cannot be read ({type(err).__name__})"
    if size != recorded:
        return f"has {size} bytes, {recorded} when written"
    if _sha256(path) != digest:
        return "does not match the SHA-256 recorded when written"
    return ""


def evict(root: Path, limit: int, keep: Path | None = None) -> list[Path]:
    """Delete least recently used entries until the cache holds at most `limit` bytes."""
    entries = []
    for path in root.glob("*/*"):
        if path.name.startswith(".") or path.name.endswith(_RECORD):
            continue
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        entries.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, path in sorted(entries):
        if total <= limit:
            break
        if path == keep:
            continue
        path.unlink(missing_ok=True)
        _record(path).unlink(missing_ok=True)
        total -= size
        removed.append(path)
    return removed
