"""One study per storage root at a time: a lock record that names its holder (host, pid, since).

    with StudyLock(LocalLockStore(root / STUDY_LOCK), "run").held(wait=False):
        ...  # the only process working on `root`

The record lives in a `LockStore`, which needs three operations that local files and object
stores both offer: create the record only if there is none (a hard link here; a conditional PUT
with `If-None-Match: *` on S3), read it, and replace or delete it only if it is still the one
read (a guard file's `flock` here; `If-Match: <etag>` there): `LocalLockStore` and
`S3LockStore`; `lock_store` picks the one for a storage root.

A holder is alive while its heartbeat (refreshed every `heartbeat_s` by a thread of the holder)
is younger than `stale_after_s`, and, when it runs on this host, while its process exists with
the same start time (so a killed holder is taken over at once, not after the heartbeat goes
stale, and a recycled pid is not mistaken for it). A lock whose holder is dead is taken over.

A holder is fenced: when its heartbeat, or `check` (the fence each step is handed and calls
before writing its marker), finds the record no longer its own (taken over after a partition or a
pause longer than `stale_after_s`), or the heartbeat cannot refresh it for `stale_after_s`, the
lock is lost: `check` raises `LockLost` from then on and `on_lost` is called (the CLI interrupts
the run).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from components.errors import LockLost, TaskatlasError
from components.storage import Location

STUDY_LOCK = "study.lock"  # the lock record's name under a storage root


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: what the refusal names, and what liveness is judged on."""

    host: str
    pid: int
    since: str  # ISO 8601, UTC
    command: str
    token: str  # unique per acquisition: a replace or delete must name the record it read
    heartbeat: float  # time.time() of the last refresh
    started: str = ""  # the process's start time on its host (Linux: /proc/<pid>/stat field 22)

    def describe(self) -> str:
        return f"taskatlas {self.command} on host {self.host}, pid {self.pid}, since {self.since}"


class StudyLocked(TaskatlasError):
    """Another live process holds the storage root: `holder`."""

    def __init__(self, message: str, holder: Holder):
        super().__init__(message)
        self.holder = holder


class LockStore(Protocol):
    def create(self, holder: Holder) -> bool:
        """Write the record if there is none; False if there is one."""

    def read(self) -> Holder | None:
        """The record, or None if there is none."""

    def swap(self, old: Holder, new: Holder | None) -> bool:
        """Replace the record by `new` (delete it if None) only if it is still `old`."""


class LocalLockStore:
    """The record as a JSON file on a local (or POSIX-locking shared) filesystem."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def create(self, holder: Holder) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._write_tmp(holder)
        try:
            os.link(tmp, self.path)  # atomic, and fails if a record exists: never half-written
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def read(self) -> Holder | None:
        try:
            return Holder(**json.loads(self.path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):  # unreadable: nobody can prove they hold it
            return Holder("?", 0, "?", "?", "unreadable", 0.0)

    def swap(self, old: Holder, new: Holder | None) -> bool:
        with open(self.path.with_name(self.path.name + ".guard"), "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            current = self.read()
            if current is None or current.token != old.token:
                return False
            if new is None:
                self.path.unlink(missing_ok=True)
            else:
                os.replace(self._write_tmp(new), self.path)
            return True

    def _write_tmp(self, holder: Holder) -> Path:
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.new")
        try:
            tmp.write_text(json.dumps(asdict(holder)))
        except OSError:  # a full disk: leave no empty file behind
            tmp.unlink(missing_ok=True)
            raise
        return tmp


class S3LockStore:
    """The record as an S3 object, guarded by conditional writes: `If-None-Match: *` creates it
    only if absent, and `If-Match: <etag>` replaces or deletes only the version read (AWS S3 and
    compatible servers; credentials and endpoint from the standard AWS variables)."""

    def __init__(self, bucket: str, key: str):
        import boto3  # only object-store roots need it

        self.bucket, self.key = bucket, key
        self.client = boto3.client("s3")
        self._etags: dict[str, str] = {}  # token -> etag of the record we read or wrote

    def create(self, holder: Holder) -> bool:
        try:
            answer = self.client.put_object(
                Bucket=self.bucket, Key=self.key, Body=json.dumps(asdict(holder)), IfNoneMatch="*"
            )
        except self.client.exceptions.ClientError as err:
            if _s3_code(err) in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        self._etags[holder.token] = answer["ETag"]
        return True

    def read(self) -> Holder | None:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None
        try:
            holder = Holder(**json.loads(answer["Body"].read()))
        except (ValueError, TypeError):
            holder = Holder("?", 0, "?", "?", "unreadable", 0.0)
        self._etags[holder.token] = answer["ETag"]
        return holder

    def swap(self, old: Holder, new: Holder | None) -> bool:
        etag = self._etags.get(old.token)
        if etag is None:
            return False
        try:
            if new is None:
                self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=etag)
            else:
                answer = self.client.put_object(
                    Bucket=self.bucket, Key=self.key, Body=json.dumps(asdict(new)), IfMatch=etag
                )
                self._etags[new.token] = answer["ETag"]
        except self.client.exceptions.ClientError as err:
            if _s3_code(err) in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                return False
            raise
        return True


def _s3_code(err: Exception) -> str:
    return getattr(err, "response", {}).get("Error", {}).get("Code", "")


def process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot ('' where /proc is not readable)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def holder_alive(holder: Holder, stale_after_s: float, now: float | None = None) -> bool:
    if (now or time.time()) - holder.heartbeat > stale_after_s:
        return False
    if holder.host != socket.gethostname():
        return True  # another machine: only its heartbeat can tell
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return not holder.started or process_start(holder.pid) in ("", holder.started)


class StudyLock:
    """The lock of one storage root, for one command of this process."""

    def __init__(
        self,
        store: LockStore,
        command: str,
        where: str = "",
        heartbeat_s: float = 10.0,
        stale_after_s: float = 60.0,
        poll_s: float = 2.0,
        on_lost: Callable[[LockLost], None] | None = None,
    ):
        self.store, self.command, self.where = store, command, where
        self.heartbeat_s, self.stale_after_s, self.poll_s = heartbeat_s, stale_after_s, poll_s
        self.on_lost = on_lost  # called by the heartbeat thread when the lock is lost
        self.holder: Holder | None = None
        self.lost: LockLost | None = None  # why this process may no longer write, once it may not
        self._losing = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, wait: bool = False, on_wait=None, never_wait_for: str = "") -> None:
        """Take the lock; if a live process holds it, raise `StudyLocked` (or, with `wait`,
        poll until it is free, calling `on_wait(holder)` once; a holder running the command
        `never_wait_for` is not waited for: a second nightly has nothing to add to the first)."""
        waited = False
        while True:
            now = time.time()
            me = Holder(
                host=socket.gethostname(),
                pid=os.getpid(),
                since=datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
                command=self.command,
                token=uuid.uuid4().hex,
                heartbeat=now,
                started=process_start(os.getpid()),
            )
            if self.store.create(me):
                return self._start(me)
            current = self.store.read()
            if current is None:
                continue  # released between the two calls
            if not holder_alive(current, self.stale_after_s):
                if self.store.swap(current, me):  # a dead holder's lock is taken over
                    return self._start(me)
                continue
            if not wait or (never_wait_for and current.command == never_wait_for):
                raise StudyLocked(
                    f"{self.where or 'the storage root'} is in use by {current.describe()};"
                    " rerun with --wait-for-lock to wait for it",
                    current,
                )
            if not waited and on_wait is not None:
                on_wait(current)
            waited = True
            time.sleep(self.poll_s)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.holder is not None:
            self.store.swap(self.holder, None)  # False, and nothing deleted, if it was taken over
            self.holder = None

    @contextmanager
    def held(self, wait: bool = False, on_wait=None, never_wait_for: str = "") -> Iterator[Holder]:
        self.acquire(wait, on_wait, never_wait_for)
        try:
            yield self.holder
        finally:
            self.release()

    def _start(self, me: Holder) -> None:
        self.holder, self.lost = me, None
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="study-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            fresh = replace(self.holder, heartbeat=time.time())
            try:
                swapped = self.store.swap(self.holder, fresh)
            except Exception as err:  # unreachable or full storage: the lease runs on, try next beat
                if fresh.heartbeat - self.holder.heartbeat <= self.stale_after_s:
                    continue
                return self._lose(f"could not be refreshed for {self.stale_after_s:g} s ({err})", err)
            if swapped:
                self.holder = fresh
            elif not self._stop.is_set():  # released meanwhile: no loss
                return self._taken_over(self.store.read())

    def check(self) -> None:
        """Raise `LockLost` if the lock was lost: known from a heartbeat, or found now in the
        store (another holder's record), so a holder learns it before its next write."""
        if self.lost is None and self.holder is not None and not self._stop.is_set():
            current = self.store.read()
            if current is None or current.token != self.holder.token:
                self._taken_over(current)
        if self.lost is not None:
            raise self.lost

    def _taken_over(self, current: Holder | None) -> None:
        self._lose(
            f"was taken over by {current.describe() if current else 'a process that released it since'}"
        )

    def _lose(self, how: str, cause: BaseException | None = None) -> None:
        with self._losing:  # once, whether the heartbeat or a check finds it first
            if self.lost is not None:
                return
            lost = LockLost(
                f"the study lock of {self.where or 'the storage root'} {how}; this process stopped"
                " before its next write (rerun when the other is done, with --wait-for-lock to wait)"
            )
            lost.__cause__ = cause  # a full disk, say: what the CLI reports instead
            self.lost = lost
        if self.on_lost is not None:
            self.on_lost(lost)


def lock_store(root: Location) -> LockStore:
    """Where the lock record of a storage root lives: a local file, or an S3 object."""
    if root.is_local:
        return LocalLockStore(root.local_path / STUDY_LOCK)
    if root.scheme == "s3://":
        bucket, _, prefix = root.path.partition("/")
        return S3LockStore(bucket, f"{prefix}/{STUDY_LOCK}".lstrip("/"))
    raise TaskatlasError(
        f"storage_root: no study lock for {root.scheme} storage yet (local folders and s3:// have one)"
    )
