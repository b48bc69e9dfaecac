"""Out of disk space: found in an error however deep (a cause, a Ray worker's error, its text),
and a small reserve file that, freed, leaves room to record the failure on a full disk.

    if (writing := no_space(err)) is not None:  # "" when no file is named
        free_reserve(root)                      # room for the tracking store's last writes
"""

from __future__ import annotations

import errno
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from components.errors import OutOfSpace

RESERVE = ".taskatlas-space-reserve"  # under a local storage root while a study holds it
RESERVE_BYTES = 256 * 1024  # SQLite's journal for marking a few runs FAILED needs a few pages
# How a full disk reads in an error's text (a remote worker's, MLflow's, SQLite's, pyarrow's).
_TEXTS = ("no space left on device", "database or disk is full", "[errno 28]")
_NAMED = re.compile(r"No space left on device: '([^']+)'")


def no_space(err: BaseException) -> str | None:
    """What was being written when `err`, or an error it came from, found the disk full: a path
    or a step if one is named, else ""; None if no error of the chain is about a full disk."""
    found = None
    for e in _chain(err):
        if isinstance(e, OutOfSpace):
            return e.writing
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            if e.filename:
                return str(e.filename)
            found = ""
        elif isinstance(e, sqlite3.OperationalError) and "disk is full" in str(e):
            found = found or "the MLflow store (SQLite)"
        elif (said := no_space_text(str(e))) is not None:
            if said.startswith("/"):
                return said
            found = found or said
    return found


def no_space_text(text: str) -> str | None:
    """`no_space` for an error known only as text (a remote worker's traceback or summary)."""
    if not any(t in text.lower() for t in _TEXTS):
        return None
    if named := _NAMED.search(text):
        return named.group(1)
    return "the MLflow store (SQLite)" if "disk is full" in text else ""


def _chain(err: BaseException) -> Iterator[BaseException]:
    """`err` and every error it came from: causes, contexts, a Ray task's `cause`, an exception
    group's members, a Ray Train run's worker failures."""
    todo, seen = [err], set()
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        more = [e.__cause__, e.__context__, getattr(e, "cause", None)]
        more += list(getattr(e, "exceptions", None) or ())
        failures = getattr(e, "worker_failures", None)
        more += list(failures.values()) if isinstance(failures, dict) else []
        todo += [m for m in more if isinstance(m, BaseException)]


def reserve_space(folder: Path, nbytes: int = RESERVE_BYTES) -> bool:
    """Set `nbytes` aside in `folder` (False, and nothing left behind, if they are not free)."""
    path = folder / RESERVE
    try:
        with open(path, "wb") as f:
            f.write(bytes(nbytes))
            f.flush()
        return True
    except OSError:
        path.unlink(missing_ok=True)
        return False


def free_reserve(folder: Path) -> None:
    """Give back what `reserve_space` set aside."""
    (folder / RESERVE).unlink(missing_ok=True)
