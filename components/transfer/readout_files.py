"""A readout's files: its per-image test losses with its summary in the file's metadata (written
once, verified on read), the log of its attempts, and the per-target loss tables Stage III reads."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from components.storage import Location, location
from components.transfer.plan import Readout
from components.vocabulary import IMAGE_ID, LOSS, REPLICATE, SOURCES, TARGET

LOSS_SCHEMA = pa.schema(
    [
        (TARGET, pa.string()),
        (SOURCES, pa.list_(pa.string())),
        (IMAGE_ID, pa.string()),
        (LOSS, pa.float32()),
        (REPLICATE, pa.int32()),  # which training of the readout (design.md section 10)
    ]
)


READOUT_META = b"taskatlas"  # readout file metadata: mean loss, seconds, training history


@dataclass(frozen=True)
class ReadoutOutcome:
    readout: Readout
    mean_loss: float  # over the test images
    seconds: float
    train_losses: tuple[float, ...] = ()
    val_loss: float = float("nan")  # over the transfer split's validation part: ranks beams
    started: float = 0.0  # when the job began and ended (epoch seconds): the MLflow run's times
    finished: float = 0.0


def readout_path(root: Location, readout: Readout, key: str) -> Location:
    """Where the readout with this key stores its per-image losses, under the storage root."""
    return root / "readouts" / readout.target / f"{'+'.join(readout.sources)}.{key}.parquet"


def attempts_path(path: str | Location) -> Location:
    """The attempt log beside a readout's loss file: a file locally, a folder of one object per
    event on object storage (which cannot append)."""
    loc = path if isinstance(path, Location) else location(path)
    return loc.with_name(loc.name.removesuffix(".parquet") + ".attempts.log")


def attempt_events(path: str | Location) -> list[str]:
    """The events (`start`, `done`) noted for a readout, in order."""
    log = attempts_path(path)
    if log.is_local:
        return log.read_text().split()[::3] if log.exists() else []
    return [f.name.split("-")[-1] for f in sorted(log.files(), key=lambda f: f.name)]


def note_attempt(readout_file: str, event: str) -> None:
    log = attempts_path(readout_file)
    if log.is_local:
        log.local_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(log.local_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)  # a log: owner only
        with os.fdopen(fd, "a") as f:
            f.write(f"{event} {os.getpid()} {time.time():.3f}\n")
    else:
        (log / f"{time.time():.6f}-{os.getpid()}-{event}").write_bytes(b"")


def write_readout(path: Location, outcome: ReadoutOutcome, ids: np.ndarray, losses: np.ndarray) -> None:
    """Whole: a stored readout is always a complete one."""
    r, n = outcome.readout, len(ids)
    table = pa.table(
        {
            "target": [r.target] * n,
            "sources": [list(r.sources)] * n,
            "image_id": np.asarray(ids).astype(str),
            "loss": np.asarray(losses, np.float32),
            "replicate": np.full(n, r.replicate, np.int32),
        },
        schema=LOSS_SCHEMA,
    )
    meta = {"kind": r.kind.value, **{k: v for k, v in asdict(outcome).items() if k != "readout"}}
    meta["digest"] = loss_digest(table)
    path.write_parquet(table.replace_schema_metadata({READOUT_META: json.dumps(meta).encode()}))


def loss_digest(table: pa.Table) -> str:
    """SHA-256 of a readout's image ids and losses: what its file must still hold when reused."""
    h = hashlib.sha256()
    h.update("\0".join(table["image_id"].to_pylist()).encode())
    h.update(np.ascontiguousarray(table["loss"].to_numpy(zero_copy_only=False), np.float32).tobytes())
    return h.hexdigest()


def stored_outcome(path: Location, readout: Readout, known: set[str] | None = None) -> ReadoutOutcome | None:
    """The summary of a stored readout (from the file's metadata), or None if not stored.
    `known`: the file names already listed in its folder (one listing per target, not a request
    per readout)."""
    if (path.name not in known) if known is not None else not path.exists():
        return None
    try:
        meta = verified_meta(path)
    except (OSError, ValueError, KeyError, pa.ArrowException) as err:  # truncated, or bytes changed
        print(
            f"taskatlas: readout file {path} is damaged ({err}); it is trained again",
            file=sys.stderr,
            flush=True,
        )
        path.unlink(missing_ok=True)
        return None
    return ReadoutOutcome(
        readout,
        meta["mean_loss"],
        meta["seconds"],
        tuple(meta["train_losses"]),
        meta["val_loss"],
        meta.get("started", 0.0),
        meta.get("finished", 0.0),
    )


def verified_meta(path: Location) -> dict:
    """A readout file's metadata, once its losses are checked against the digest written with
    them (files from before digests are taken as they are); once per file version and process."""
    info = path.fs.get_file_info(path.path)
    return verified_meta_of(path.uri, info.size, info.mtime_ns or 0)


@functools.lru_cache(maxsize=65536)
def verified_meta_of(uri: str, size: int, mtime_ns: int) -> dict:
    table = location(uri).read_parquet()
    meta = json.loads(table.schema.metadata[READOUT_META])
    if "digest" in meta and loss_digest(table) != meta["digest"]:
        raise ValueError("its losses do not match the digest written with them")
    return meta


def read_readout(path: Location) -> pa.Table:
    """A stored readout's losses (a file written before replicates existed is replicate 0)."""
    table = path.read_parquet().replace_schema_metadata(None)
    if "replicate" not in table.column_names:
        table = table.append_column(LOSS_SCHEMA.field("replicate"), pa.array(np.zeros(len(table), np.int32)))
    return table


def write_target_losses(readout_files: Sequence[str], out: str) -> int:
    """One target's loss table (every readout into it, concatenated): what Stage III reads, one
    target at a time. Run where the work is (a Ray task), not in the driver. Returns its rows."""
    tables = [read_readout(location(f)) for f in readout_files]
    table = pa.concat_tables(tables) if tables else LOSS_SCHEMA.empty_table()
    location(out).write_parquet(table)
    return table.num_rows
