"""Step folders: `<storage_root>/<step>/<key>/`, complete once the marker `done.json` exists
and the files it lists are those it recorded.

The one convention every stage uses to say "finished" (design.md section 1). Object stores have
no rename, so the rule is the same on both kinds of storage: write the outputs, then the marker,
last. A killed step leaves outputs without a marker, which a rerun overwrites; a step whose
marker reads is skipped (an empty or invalid marker is named, removed and its step done again). The marker holds the step's summary (what a rerun returns) and the
size and SHA-256 of every file of the step, checked before a rerun reuses it (once per file
version and process): a step whose files were damaged or removed is done again, and the run
says which file, in one line.

Outputs are made in a local scratch folder (plots, MLflow artifacts and torch want local files)
and uploaded by `finish`; outputs a worker writes itself go straight to `step.location`.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.data.shards import file_sha256
from components.storage import Location, location

if TYPE_CHECKING:  # annotations only: importing the steps loads no MLflow
    from pipelines.tracking.runs import Tracker


class StepStatus(str, Enum):
    """What a step does in a run, or would do (`--dry-run`): one spelling for every step."""

    RUN = "run"  # it runs (in a report: it ran)
    REUSE = "reuse"  # finished before: read back
    SKIP = "skip"  # its stage was not asked for
    MISSING = "missing"  # not asked for and not finished: the stages after it cannot run


# Raises `LockLost` once this process lost the study lock over the storage root (`StudyLock.check`):
# called before a marker is written, so a fenced holder's work is never taken for finished.
Fence = Callable[[], None]


def unfenced() -> None:
    """The fence of steps written under no study lock (tests, benchmarks): nothing to lose."""


DONE = "done.json"
FILES = "files"  # the marker's record of the step's files: relative path -> [size, sha256]
ROOT = "storage_root"  # the marker's record of the storage root it was written under


@functools.cache
def code_digest(*modules: str) -> str:
    """SHA-256 of the code of `modules` (dotted names) without comments and docstrings: a step
    whose outputs are computed by them keys by it, so new math is never answered from a step the
    old math wrote, and a change to a docstring keeps the step."""
    digest = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ValueError(f"code_digest: no source for module {name}")
        tree = ast.parse(Path(spec.origin).read_text())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (
                isinstance(body, list)
                and body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
        digest.update(f"{name}\n{ast.dump(tree)}\n".encode())
    return digest.hexdigest()


def sha256_of(file: Location, info=None) -> str:
    """A file's SHA-256, computed once per version (uri, size, mtime) in this process; `info`:
    its `pyarrow.fs.FileInfo`, when the caller has it already."""
    info = info or file.fs.get_file_info(file.path)
    return _sha256(file.uri, info.size, info.mtime_ns or 0)


@functools.lru_cache(maxsize=4096)
def _sha256(uri: str, size: int, mtime_ns: int) -> str:
    return file_sha256(location(uri))


def _file_problem(file: Location, size: int, digest: str) -> str:
    """Why a step's file is not as its marker recorded it ("" when it is)."""
    info = file.fs.get_file_info(file.path)
    if info.type.name == "NotFound":
        return "is missing"
    if info.size != size:
        return f"has {info.size} bytes, its step recorded {size}"
    if sha256_of(file, info) != digest:
        return "does not match the checksum its step recorded"
    return ""


def _is_record(entry: Any) -> bool:
    """A marker's record of one file: [size, sha256]."""
    return isinstance(entry, list) and len(entry) == 2 and type(entry[0]) is int and isinstance(entry[1], str)


@dataclass(frozen=True)
class Step:
    root: Location  # the storage root
    name: str  # may nest: "stage1/normal"
    key: str

    @property
    def location(self) -> Location:
        return self.root / self.name / self.key

    @property
    def marker(self) -> Location:
        return self.location / DONE

    @property
    def complete(self) -> bool:
        """The marker exists, reads, and every file it lists is as recorded. A step found damaged
        loses its marker (it is done again) and says so on stderr."""
        if not self.marker.exists():
            return False
        try:
            info = self.marker.read_json()
            if not isinstance(info, dict):
                raise ValueError("not a JSON object")
            recorded = info.get(FILES, {})
            if not (isinstance(recorded, dict) and all(map(_is_record, recorded.values()))):
                raise ValueError(f"its {FILES!r} is not path -> [size, sha256]")
        except (OSError, ValueError) as err:
            return self._damaged(self.marker, f"cannot be read ({err})")
        for name, (size, digest) in recorded.items():
            problem = _file_problem(self.location / name, size, digest)
            if problem:
                return self._damaged(self.location / name, problem)
        return True

    def info(self) -> dict:
        """The summary the finished step wrote into its marker, its paths under the storage root
        where the root is now: a copied or moved root reads its own files, never the old root's."""
        info = self.marker.read_json()
        return rebased(
            {k: v for k, v in info.items() if k not in (FILES, ROOT)}, info.get(ROOT), self.root.uri
        )

    def _damaged(self, file: Location, problem: str) -> bool:
        """Marker and damaged file removed, so nothing reuses either (a network's damaged weights
        are trained again, not loaded)."""
        print(f"taskatlas: {file} {problem}; the step {self.name} is done again", file=sys.stderr, flush=True)
        file.unlink(missing_ok=True)
        self.marker.unlink(missing_ok=True)
        return False

    @contextmanager
    def scratch(self) -> Iterator[Path]:
        """A fresh local folder for outputs made locally; removed afterwards."""
        with tempfile.TemporaryDirectory(prefix=f"taskatlas-{self.name.replace('/', '-')}-") as d:
            yield Path(d)

    def finish(self, info: dict[str, Any], scratch: Path | None = None, *, fence: Fence) -> dict[str, Any]:
        """Upload the scratch folder's files (if any), then write the marker, last, with the size
        and SHA-256 of every file in the step folder (those workers wrote there too). Nothing,
        if `fence` says this process lost its study lock (`LockLost`): another owns the root."""
        fence()
        if scratch is not None:
            for path in sorted(p for p in scratch.rglob("*") if p.is_file()):
                (self.location / path.relative_to(scratch).as_posix()).upload(path)
        prefix = len(self.location.path) + 1
        files = {
            f.path[prefix:]: [f.size(), sha256_of(f)]
            for f in sorted(self.location.files(recursive=True), key=lambda f: f.path)
            if f.path[prefix:] != DONE
        }
        self.marker.write_json({**info, ROOT: self.root.uri, FILES: files})
        return info


def rebased(value: Any, old: str | None, new: str) -> Any:
    """`value` (a marker's JSON) with every string under the storage root `old` moved under `new`
    (nothing without `old`: a marker from before the root was recorded)."""
    if old is None or old == new:
        return value
    if isinstance(value, str):
        return new + value[len(old) :] if value == old or value.startswith(old + "/") else value
    if isinstance(value, list):
        return [rebased(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: rebased(v, old, new) for k, v in value.items()}
    return value


def log_stored_artifact(tracker: Tracker, run_id: str, stored: Location) -> None:
    """Log a stored file to MLflow (which wants a local file): a local one as it is, a remote one
    through a temporary download."""
    if stored.is_local:
        tracker.log_artifact(run_id, stored.local_path)
        return
    with tempfile.TemporaryDirectory(prefix="taskatlas-artifact-") as d:
        tracker.log_artifact(run_id, stored.download(Path(d) / stored.name))
