"""The one thing a study keeps on local disk: a bounded cache of immutable files from storage.

Feature caches are read many times by the readouts of a worker, memory-mapped; on object storage
each node keeps its own copy here, made once per node. Entries are named by what they hold
(a hash of their storage location, which is itself content-keyed), so an entry never goes stale;
when the cache grows past its bound the least recently used entries are deleted.

Where: `$TASKATLAS_CACHE` (default `~/.cache/taskatlas`); how big: `$TASKATLAS_CACHE_GB`
(default 20). An entry in use by a reader survives its deletion (an open memory map keeps it).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from components.settings import read_settings


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
    if path.exists():
        os.utime(path)  # most recently used
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        make(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    evict(root, cache_limit_bytes(), keep=path)
    return path


def evict(root: Path, limit: int, keep: Path | None = None) -> list[Path]:
    """Delete least recently used entries until the cache holds at most `limit` bytes."""
    entries = []
    for path in root.glob("*/*"):
        if path.name.startswith("."):
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
        total -= size
        removed.append(path)
    return removed
