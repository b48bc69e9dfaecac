"""Real services on loopback for tests and benchmarks: PostgreSQL 15, `mlflow server`, an S3 server.

    with start_postgres() as pg, start_s3_server() as s3:          # 127.0.0.1, free ports
        db = pg.create_database("mlflow")                         # postgresql+psycopg2://postgres@...
        art = f"s3://{s3.bucket}/mlartifacts"
        with start_mlflow_server(tmp, db, art, env=s3_env(s3)) as server:
            Tracker(server.url, "experiment")                     # http://127.0.0.1:<port>

The session fixtures in `tests/conftest.py` (`postgres`, `s3_server`, `mlflow_pg_server`) wrap
these; `benchmarks/tracking_scale.py` uses them directly. Everything binds 127.0.0.1. Every
process is started in a session of its own and ended with its process group on exit (PostgreSQL
by `pg_ctl stop`), and a watchdog ends a service whose starter died without ending it. Nothing here
sets a process-wide variable: a server's environment is passed to that server alone.

PostgreSQL runs with trust authentication (tests only) from `initdb`/`pg_ctl` of PostgreSQL 15
(`/usr/lib/postgresql/15/bin`, else on PATH); `PostgresUnavailable` says when they are absent. It
refuses to run as root, so as root the cluster runs as the `postgres` user, in a folder it owns.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import requests

PG_BIN = Path("/usr/lib/postgresql/15/bin")
_PG_USER = "postgres"  # the database superuser initdb creates (and, as root, the OS user it runs as)


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries on this machine: a test skips with this message."""


# ---------------------------------------------------------------- processes


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_process(*args: str) -> subprocess.Popen:
    """`taskatlas ARGS` in a fresh process, from the repository root; its stderr piped (text)."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", *args],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


# The parent of every service: runs it (as `user`, if given) in the process group it leads. A
# stop signal sent to it goes to the whole group (the service and its workers). If the process that
# started it dies without ending it (a test run killed by a timeout), it stops the group itself
# (`stop_signal`, then SIGKILL after 15 s): a service never outlives whoever started it.
_WATCHDOG = """
import os, shutil, signal, subprocess, sys, time
parent, stop_signal, user, folder, args = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
service = subprocess.Popen(args, user=user or None)
def stop(sig, frame=None):
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(s, signal.SIG_IGN)  # the group's signal reaches this process too
    os.killpg(0, sig)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
while service.poll() is None:
    if os.getppid() != parent:  # orphaned: stop the service, remove its folder, end the group
        stop(stop_signal)
        try:
            service.wait(15)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
        os.killpg(0, signal.SIGKILL)
    time.sleep(0.5)
sys.exit(service.returncode)
"""


def start_process(
    args: list[str],
    log: Path,
    env: Mapping[str, str] | None = None,
    user: str | None = None,
    stop_signal: int = signal.SIGTERM,
    orphan_folder: Path | None = None,
) -> subprocess.Popen:
    """`args` (as `user`, if given) under a watchdog in a new session (its own process group),
    stdout and stderr appended to `log`. End it with `end_group`; should this process die first,
    the watchdog stops the service with `stop_signal`, removes `orphan_folder` (if given) and kills
    the group."""
    watchdog = [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(int(stop_signal)), user or ""]
    watchdog += [str(orphan_folder or ""), *args]
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            watchdog,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def end_group(process: subprocess.Popen, stop_signal: int = signal.SIGTERM, grace_s: float = 15) -> None:
    """End a process from `start_process` and everything in its group: `stop_signal` to the group,
    then SIGKILL to whatever is left after `grace_s`."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, stop_signal)  # the watchdog passes it on to its whole group
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)


def _tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def wait_until(
    ready: Callable[[], bool], process: subprocess.Popen, what: str, log: Path, timeout_s: float = 120
) -> None:
    """Poll `ready()` until it is true; raise with the log's tail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{_tail(log)}")
        if ready():
            return
        time.sleep(0.3)
    raise RuntimeError(f"{what} not ready within {timeout_s:.0f} s:\n{_tail(log)}")


def answers_http(url: str) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            return requests.get(url, timeout=2).status_code == 200
        except (requests.ConnectionError, requests.Timeout):
            return False

    return ready


# ---------------------------------------------------------------- PostgreSQL


PG_PROGRAMS = ("initdb", "postgres", "pg_ctl", "pg_isready", "createdb")


def require_postgres() -> None:
    """Raise PostgresUnavailable unless every PostgreSQL program used here is installed."""
    for name in PG_PROGRAMS:
        pg_bin(name)


def pg_bin(name: str) -> Path:
    """A PostgreSQL 15 program (`initdb`, `pg_ctl`, `createdb`); PostgresUnavailable if absent."""
    path = PG_BIN / name
    if path.is_file():
        return path
    found = shutil.which(name)
    if found is None:
        raise PostgresUnavailable(f"PostgreSQL's {name} is not in {PG_BIN} or on PATH")
    return Path(found)


@dataclass(frozen=True)
class Postgres:
    """A running PostgreSQL cluster on 127.0.0.1:`port` (trust auth, superuser `postgres`)."""

    port: int
    folder: Path  # data/, the unix socket, the server log
    user: str | None  # the OS user it runs as (None: this process's)

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy's URL of `database`, with the psycopg2 driver named: SQLAlchemy 2.1 reads a
        bare `postgresql://` as psycopg 3, which is not installed."""
        return f"postgresql+psycopg2://{_PG_USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create database `name` and return its SQLAlchemy URL (`postgresql+psycopg2://...`)."""
        args = [str(pg_bin("createdb")), "-h", "127.0.0.1", "-p", str(self.port), "-U", _PG_USER, name]
        done = subprocess.run(args, capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise RuntimeError(f"createdb {name}: {done.stderr.strip()}")
        return self.url(name)


@contextlib.contextmanager
def start_postgres() -> Iterator[Postgres]:
    """A fresh PostgreSQL cluster (`initdb`) in a new temporary folder, served on 127.0.0.1 until
    exit, then stopped (`pg_ctl stop -m fast`) and removed.

    The postmaster runs in the foreground under the watchdog rather than daemonized by `pg_ctl
    start`, so a killed test run cannot leave it behind. The folder is made directly under the
    system temp dir: a unix socket path must stay short, and as root the `postgres` user must be
    able to reach it."""
    initdb, pg_ctl, postgres, ready = (pg_bin(p) for p in ("initdb", "pg_ctl", "postgres", "pg_isready"))
    user = _PG_USER if os.geteuid() == 0 else None
    folder = Path(tempfile.mkdtemp(prefix="taskatlas-pg-"))
    try:
        if user:
            entry = pwd.getpwnam(user)
            os.chown(folder, entry.pw_uid, entry.pw_gid)
        data, log, port = folder / "data", folder / "server.log", free_port()
        init = [str(initdb), "-D", str(data), "-U", _PG_USER, "-A", "trust", "--no-sync", "-E", "UTF8"]
        _run_as([*init, "--locale=C"], user, folder)
        serve = [str(postgres), "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", str(folder)]
        serve += ["-c", "fsync=off", "-c", "full_page_writes=off"]  # throwaway data: no durability
        # SIGINT: PostgreSQL's fast shutdown
        process = start_process(serve, log, user=user, stop_signal=signal.SIGINT, orphan_folder=folder)
        try:
            probe = [str(ready), "-h", "127.0.0.1", "-p", str(port), "-t", "1"]
            wait_until(
                lambda: subprocess.run(probe, capture_output=True).returncode == 0, process, "postgres", log
            )
            yield Postgres(port, folder, user)
        finally:
            stop = [str(pg_ctl), "-D", str(data), "-m", "fast", "-w", "-t", "30", "stop"]
            with contextlib.suppress(subprocess.SubprocessError):
                subprocess.run(stop, capture_output=True, timeout=40, user=user, cwd=folder)
            end_group(process, signal.SIGINT)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run_as(args: list[str], user: str | None, folder: Path) -> None:
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, user=user, cwd=folder)
    if done.returncode:
        raise RuntimeError(f"{Path(args[0]).name} failed: {done.stderr.strip()}")


# ---------------------------------------------------------------- S3 (moto)


@dataclass(frozen=True)
class S3Server:
    """An S3-protocol server on loopback with one bucket made; `.server` is moto's ThreadedMotoServer."""

    endpoint_url: str
    bucket: str
    server: object


def s3_env(server: S3Server) -> dict[str, str]:
    """The standard AWS variables that point boto3, pyarrow and MLflow at `server` (pass them to a
    subprocess, or to `os.environ` yourself: nothing here sets them)."""
    return {
        "AWS_ENDPOINT_URL": server.endpoint_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def s3_client(server: S3Server):
    """A boto3 S3 client of `server`, configured explicitly (this process's variables untouched)."""
    import boto3

    env = s3_env(server)
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )


@contextlib.contextmanager
def start_s3_server(bucket: str = "taskatlas-test") -> Iterator[S3Server]:
    """moto's threaded S3 server on 127.0.0.1 (a free port), with `bucket` created; stopped on exit.
    Its state lives in this process: it is gone when the server stops."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        s3 = S3Server(f"http://127.0.0.1:{port}", bucket, server)
        s3_client(s3).create_bucket(Bucket=bucket)
        yield s3
    finally:
        server.stop()


# ---------------------------------------------------------------- mlflow server


@dataclass(frozen=True)
class MlflowServer:
    url: str  # http://127.0.0.1:<port>: the tracking URI
    backend_store_uri: str
    artifacts_destination: str
    log: Path


@contextlib.contextmanager
def start_mlflow_server(
    folder: Path,
    backend_store_uri: str,
    artifacts_destination: str | Path,
    env: Mapping[str, str] | None = None,
    workers: int = 1,
    extra_args: Sequence[str] = (),
) -> Iterator[MlflowServer]:
    """`mlflow server` on 127.0.0.1 (a free port) proxying artifacts to `artifacts_destination` (a
    folder, or `s3://...` with the AWS variables in `env`); ended with its process group on exit.
    Its log is `folder/mlflow-server-<port>.log`."""
    port = free_port()
    log = folder / f"mlflow-server-{port}.log"
    args = [
        str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", backend_store_uri, "--artifacts-destination", str(artifacts_destination),
        "--workers", str(workers), *extra_args,
    ]  # fmt: skip
    # No job runner: the server answers in ~8 s instead of ~23 s.
    server_env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"} | dict(env or {})
    process = start_process(args, log, server_env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(answers_http(f"{url}/health"), process, "mlflow server", log)
        yield MlflowServer(url, backend_store_uri, str(artifacts_destination), log)
    finally:
        end_group(process)
