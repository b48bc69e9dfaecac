"""Where a study's files live, addressed one way: a local folder or an object store.

    root = location("s3://bucket/studies/demo")      # or "taskatlas-runs", "/abs/path", "gs://..."
    (root / "affinity" / key / "done.json").write_json({...})

A `Location` is a path under a `pyarrow.fs` filesystem with the few operations a study needs
(read, write whole files, list, delete). Writes are whole-object and atomic on both kinds of
store: an object store shows an object only once its upload completes; locally the bytes go to
a temporary sibling renamed into place. Object stores have no rename and no append, so nothing
here offers them: a step writes its outputs, then its marker (`pipelines.steps`).

S3 endpoint and credentials come from the standard AWS variables (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`), read by pyarrow and boto3
on every node; a config never holds them.
"""

from __future__ import annotations

import errno
import io
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from components.errors import ConfigError
from components.settings import read_settings


def is_remote(uri: str | os.PathLike) -> bool:
    """True for an object-store URI (`s3://`, `gs://`, ...); False for a local path or `file://`."""
    text = str(uri)
    return "://" in text and not text.startswith("file://")


def location(uri: str | os.PathLike) -> Location:
    """The Location of a local path (made absolute) or of a `pyarrow.fs` URI."""
    text = str(uri)
    if not is_remote(text):
        path = Path(text.removeprefix("file://")).expanduser().resolve()
        return Location(pafs.LocalFileSystem(), path.as_posix(), "")
    scheme, path = text.split("://", 1)
    try:
        if scheme == "s3":  # not from_uri, which asks AWS for the bucket's region: no network here
            settings = read_settings()
            fs = pafs.S3FileSystem(region=settings.aws_region, endpoint_override=settings.aws_endpoint)
        else:
            fs, path = pafs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
        raise ConfigError(f"storage_root: cannot open {text!r}: {err}") from err
    return Location(fs, path.rstrip("/"), f"{scheme}://")


class Location:
    """A file or folder under a filesystem. Immutable; `/` makes a child; picklable (the
    filesystem is rebuilt from the URI in each process, so credentials come from its env)."""

    __slots__ = ("fs", "path", "scheme")

    def __init__(self, fs: pafs.FileSystem, path: str, scheme: str):
        self.fs, self.path, self.scheme = fs, path, scheme

    def __reduce__(self):
        return (location, (self.uri,))

    # -- naming
    @property
    def uri(self) -> str:
        return f"{self.scheme}{self.path}"

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __truediv__(self, part: str) -> Location:
        return Location(self.fs, f"{self.path}/{str(part).strip('/')}", self.scheme)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        return Location(self.fs, self.path.rsplit("/", 1)[0], self.scheme)

    def with_name(self, name: str) -> Location:
        return self.parent / name

    @property
    def is_local(self) -> bool:
        return not self.scheme

    @property
    def local_path(self) -> Path:
        """The local path (local storage only): for code that must hand a path to a library."""
        if not self.is_local:
            raise ValueError(f"{self.uri} is not on the local filesystem")
        return Path(self.path)

    # -- queries
    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.File

    def size(self) -> int:
        return self.fs.get_file_info(self.path).size

    def files(self, recursive: bool = False) -> Iterator[Location]:
        """Files below this folder (none if it does not exist)."""
        selector = pafs.FileSelector(self.path, allow_not_found=True, recursive=recursive)
        for info in self.fs.get_file_info(selector):
            if info.type == pafs.FileType.File:
                yield Location(self.fs, info.path, self.scheme)

    # -- whole-file reads and writes
    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path, compression=None) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def read_json(self) -> Any:
        return json.loads(self.read_bytes())

    def write_bytes(self, data: bytes) -> None:
        """Whole and atomic: readers see the old object or the new one, never a part."""
        if self.is_local:
            path = Path(self.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            try:
                tmp.write_bytes(data)
            except OSError as err:  # a full disk: no part left, and the error names the file
                tmp.unlink(missing_ok=True)
                if err.errno == errno.ENOSPC and not err.filename:
                    raise OSError(err.errno, err.strerror, str(path)) from err
                raise
            os.replace(tmp, path)
            return
        with self.fs.open_output_stream(self.path, compression=None) as f:
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def write_json(self, data: Any) -> None:
        self.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))

    def read_parquet(self, columns: list[str] | None = None, **kwargs: Any) -> pa.Table:
        return pq.read_table(self.path, columns=columns, filesystem=self.fs, **kwargs)

    def parquet_schema(self) -> pa.Schema:
        with self.fs.open_input_file(self.path) as f:
            return pq.read_schema(f)

    def write_parquet(self, table: pa.Table, **kwargs: Any) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, **kwargs)
        self.write_bytes(buf.getvalue())

    def read_array(self) -> np.ndarray:
        return np.load(io.BytesIO(self.read_bytes()), allow_pickle=False)

    def write_array(self, array: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        self.write_bytes(buf.getvalue())

    def upload(self, local: Path) -> None:
        """Copy a local file here (MLflow, plots and torch write local files first)."""
        if self.is_local and Path(self.path) == Path(local).resolve():
            return
        self.write_bytes(Path(local).read_bytes())

    def download(self, local: Path) -> Path:
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex}.tmp")
        with self.fs.open_input_stream(self.path, compression=None) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
        os.replace(tmp, local)
        return local

    # -- deletion
    def unlink(self, missing_ok: bool = True) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmtree(self) -> None:
        """Delete this folder and everything below it (nothing if absent)."""
        if self.fs.get_file_info(self.path).type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
