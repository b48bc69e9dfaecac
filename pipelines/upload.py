"""What `taskatlas submit` ships to the cluster: the project copied by a plan made here (every
`.gitignore`, then patterns no `.gitignore` can bring back: secrets, venvs, data, the storage root
inside the project; no symlinks), with the config placed inside the copy, so `--dry-run` shows
exactly what goes and the checkout is never written to."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pathspec import GitIgnoreSpec  # git's own .gitignore semantics, git's edge cases included

from components.errors import TaskatlasError
from components.storage import is_remote

PROJECT_ROOT = Path(__file__).resolve().parents[1]


# Never uploaded, whatever a .gitignore says (gitignore syntax; a leading / anchors at the root).
SECRET_PATTERNS = (
    ".env*",
    "*.pem",
    "*.key",
    "*.p12",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    "credentials",
    "*.credentials*",
    ".aws/",
    ".netrc",
)


HEAVY_PATTERNS = (  # what the job does not need: venvs, git, data, runs, caches
    ".git",
    "/.venv/",
    "/data/",
    "/taskatlas-runs/",
    "/mlruns/",
    "/mlartifacts/",
    "/.whl/",
    "__pycache__",
    "*.pyc",
    "*.parquet",
    "*.db",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
)


STAGED_CONFIG_DIR = ".taskatlas-submit"  # inside the working_dir: where the config travels


def upload_excludes(storage_root: str | None, root: Path = PROJECT_ROOT) -> tuple[str, ...]:
    """The patterns always left out, and the storage root when it is a folder inside the project
    (its runs and MLflow store are the study's, not the job's code)."""
    patterns = SECRET_PATTERNS + HEAVY_PATTERNS
    if not storage_root or is_remote(storage_root):
        return patterns
    local, project = Path(storage_root.removeprefix("file://")).expanduser().resolve(), root.resolve()
    if local != project and local.is_relative_to(project):
        inside = f"/{local.relative_to(project).as_posix()}/"
        patterns += () if inside in patterns else (inside,)
    return patterns


@dataclass(frozen=True)
class UploadPlan:
    """What `submit` ships from `root`: `files` (relative, posix), after every .gitignore and
    `excluded`; `links` are left out too."""

    root: Path
    files: tuple[str, ...]
    excluded: tuple[str, ...]
    links: tuple[str, ...]


def plan_upload(root: Path, excludes: Sequence[str]) -> UploadPlan:
    """Walk `root` as git would: a .gitignore applies below its folder, an ignored folder is not
    entered. `excludes` win over any `!pattern` of a .gitignore."""
    always = GitIgnoreSpec.from_lines(excludes)
    files: list[str] = []
    links: list[str] = []

    def walk(folder: Path, ignores: list[tuple[Path, GitIgnoreSpec]]) -> None:
        if (folder / ".gitignore").is_file():
            ignores = [*ignores, (folder, GitIgnoreSpec.from_lines(_lines(folder / ".gitignore")))]
        for entry in sorted(folder.iterdir()):
            is_dir = entry.is_dir() and not entry.is_symlink()
            if always.match_file(_key(entry, root, is_dir)) or any(
                spec.match_file(_key(entry, base, is_dir)) for base, spec in ignores
            ):
                continue
            if entry.is_symlink():
                links.append(entry.relative_to(root).as_posix())
            elif is_dir:
                walk(entry, ignores)
            elif entry.is_file():
                files.append(entry.relative_to(root).as_posix())

    walk(root, [])
    return UploadPlan(root, tuple(files), tuple(excludes), tuple(links))


def _key(path: Path, base: Path, is_dir: bool) -> str:
    """The path as a gitignore matcher wants it: relative, posix, a trailing / for a folder."""
    return path.relative_to(base).as_posix() + ("/" if is_dir else "")


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError as err:
        raise TaskatlasError(f"{path}: cannot read ({err.strerror})") from None


@contextmanager
def staged_project(
    config: Path | None, root: Path = PROJECT_ROOT, excludes: Sequence[str] | None = None
) -> Iterator[tuple[Path, str | None]]:
    """A temporary copy of the planned files with the config inside: (working_dir, config path
    in it). `excludes` defaults to `upload_excludes(None, root)`."""
    plan = checked_plan(config, root, excludes)
    with tempfile.TemporaryDirectory(prefix="taskatlas-submit-") as tmp:
        work = Path(tmp) / "taskatlas"
        for name in plan.files:
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, work / name)
        rel = None
        if config is not None:
            rel = staged_config(config)
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(config, work / rel)
        yield work, rel


def checked_plan(config: Path | None, root: Path, excludes: Sequence[str] | None) -> UploadPlan:
    if not (root / "pyproject.toml").is_file():
        raise TaskatlasError(f"taskatlas submit ships the project folder; {root} is not a checkout")
    if config is not None and not config.is_file():
        raise TaskatlasError(f"config file not found: {config}")
    return plan_upload(root, upload_excludes(None, root) if excludes is None else excludes)


def staged_config(config: Path) -> str:
    return f"{STAGED_CONFIG_DIR}/{config.name}"
