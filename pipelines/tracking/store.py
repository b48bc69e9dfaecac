"""Where the tracking store is and whether it can be used: its URI, its SQLite file's health, and
the UI link of a run."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from urllib.parse import quote

from components.errors import TaskatlasError


def default_tracking_uri(storage_root: str | Path) -> str:
    """SQLite under the storage root, as an absolute URI (relative ones resolve per process)."""
    return f"sqlite:///{Path(storage_root).resolve() / 'mlflow.db'}"


def scheme(uri: str) -> str:
    """`s3` of `s3://b/p`, `sqlite` of `sqlite:///x.db`; `` for a plain path."""
    return uri.split("://", 1)[0].lower() if "://" in uri else ""


def is_server(tracking_uri: str) -> bool:
    return scheme(tracking_uri) in ("http", "https")


_SQLITE_MAGIC = b"SQLite format 3\x00"


def sqlite_store_damage(path: Path) -> str | None:
    """Why the SQLite file at `path` is not a whole database (not SQLite, or shorter than its
    header says: cut short by a full disk or a killed copy), or None. Reads its 100-byte header
    only: the check costs nothing on a store of any size."""
    try:
        with open(path, "rb") as f:
            header = f.read(100)
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    if size == 0:
        return None  # a new, empty store
    if any(path.with_name(path.name + suffix).exists() for suffix in ("-journal", "-wal")):
        return None  # a writer's journal beside it: SQLite itself rolls back or replays it on open
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        return "not an SQLite database"
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    header_size_valid = header[24:28] == header[92:96]  # SQLite's rule for the in-header size
    if header_size_valid and pages and size < pages * page_size:
        return f"cut short: {size} of {pages * page_size} bytes"
    return None


def sqlite_store_refusal(path: Path, why: str) -> str:
    """The one line that refuses a damaged SQLite store and says what to do."""
    return (
        f"tracking_uri: the MLflow store {path} is damaged ({why}); move it aside"
        f" (mv {path} {path}.damaged) and rerun: the study's outputs under the storage root are kept"
        " and reused, in a new store (`sqlite3 FILE .recover` may save the old one's runs)"
    )


def check_sqlite_store(tracking_uri: str) -> None:
    """A damaged SQLite store refused in one line (`sqlite_store_refusal`); anything else passes."""
    if scheme(tracking_uri) == "sqlite":
        path = Path(tracking_uri.removeprefix("sqlite:///"))
        if why := sqlite_store_damage(path):
            raise TaskatlasError(sqlite_store_refusal(path, why))


def create_private_sqlite_store(tracking_uri: str) -> None:
    """A new SQLite store is created empty and readable by its owner only (0600; SQLite gives its
    journal the same mode): it holds every run's params and tags, whatever the umask. An existing
    store keeps the mode it has."""
    if scheme(tracking_uri) == "sqlite":
        path = Path(tracking_uri.removeprefix("sqlite:///"))
        with contextlib.suppress(FileExistsError, FileNotFoundError):  # no folder: MLflow says so
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def damaged_sqlite_error(err: BaseException) -> bool:
    """Whether an error is SQLite finding its file damaged (rather than locked, or missing)."""
    text = str(err).lower()
    return "database disk image is malformed" in text or "file is not a database" in text


# MLflow 3.17's UI opens every experiment on its GenAI view: a sidebar switch it keeps in the
# browser (localStorage `mlflow.workflowType`, default `genai`) overrides the experiment's
# `mlflow.experimentKind` tag, and no server setting changes that default. A link that names the
# view (`?workflowType=machine_learning`) opens on runs and models.
_UI_VIEW = "workflowType=machine_learning"


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI of a tracking server; None for a local store (no UI runs)."""
    if not is_server(tracking_uri):
        return None
    base = tracking_uri.rstrip("/")
    return f"{base}/#/experiments/{experiment_id}/runs/{quote(run_id)}?{_UI_VIEW}"


def remote_storage_refusal(tracking_uri: str, storage_uri: str, shared: bool) -> str | None:
    """Why a study may not track to `tracking_uri`, in one line, or None if it may.

    A local store (SQLite, or a folder: MLflow's file store) is a file on one machine: refused
    when the storage root is remote (`s3://`, `gs://`, any scheme but `file`) or `shared` by the
    nodes of a cluster, whose workers would write it from several machines (SQLite over NFS)."""
    if scheme(tracking_uri) not in ("", "file", "sqlite"):
        return None
    remote = scheme(storage_uri) not in ("", "file")
    if not (remote or shared):
        return None
    why = "is remote" if remote else "is shared by the nodes of a cluster"
    return (
        f"tracking_uri {tracking_uri} is a local store, but storage_root {storage_uri} {why}: run an"
        " MLflow server with a PostgreSQL backend (mlflow server --backend-store-uri"
        " postgresql+psycopg2://USER@DBHOST:5432/mlflow --artifacts-destination s3://BUCKET/mlartifacts"
        " --app-name basic-auth --host MLFLOW_HOST --port 5000, MLFLOW_HOST the cluster-internal"
        " address, never 0.0.0.0) and set tracking_uri: http://MLFLOW_HOST:5000, with"
        " MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment"
    )
