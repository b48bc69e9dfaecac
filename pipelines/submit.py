"""Send `taskatlas run` to a Ray cluster through the Ray Jobs API (design.md section 8).

taskatlas submit --address http://127.0.0.1:8265 -c configs/taskonomy-gpu.yaml --wait
taskatlas submit --address http://127.0.0.1:8265 -c configs/taskonomy-gpu.yaml --submission-id nightly
pytest tests/test_submit.py     # smoke: a token-authenticated local cluster of its own

The job needs the project and the config on the cluster, and Ray ships exactly one folder (the
`working_dir`). So we copy the project without venvs, data, runs and git, put the config inside the
copy, and let Ray package that: a config from anywhere reaches the job at a path relative to the
working_dir, and the checkout is never written to. Ray names the package by its content hash, so an
unchanged project is uploaded once.

Ray's client sends its token only when RAY_AUTH_MODE=token is set in the client's environment; we
read the token from the same places (settings.read_ray_auth) and send the header ourselves. The
token never goes into the runtime_env.
"""

from __future__ import annotations

import asyncio
import fnmatch
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import requests
from ray.exceptions import AuthenticationError
from ray.job_submission import JobDetails, JobStatus, JobSubmissionClient

from components.errors import TaskatlasError
from pipelines.settings import RayAuth

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Left out of the shipped project: top-level folders (as in .gitignore) and names anywhere.
EXCLUDED_AT_ROOT = frozenset({".git", ".venv", "data", "taskatlas-runs", "mlruns", "mlartifacts", ".whl"})
EXCLUDED_ANYWHERE = (
    "__pycache__",
    "*.pyc",
    "*.parquet",
    "*.db",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
)
STAGED_CONFIG_DIR = ".taskatlas-submit"  # inside the working_dir: where the config travels
NIGHTLY = "nightly"  # --submission-id nightly -> taskatlas-nightly-YYYYMMDD (UTC)
_AGENT_WAIT_S = 60.0  # a cluster that has just started answers "No available agent" for a while

EntrypointFn = Callable[[str | None], str]  # config path relative to the working_dir -> command


def build_entrypoint(config: str | None, overrides: Sequence[str] = (), stages: str | None = None) -> str:
    """The job's command. `python -m` because a cluster that gets the project only through the
    working_dir has no `taskatlas` console script."""
    parts = ["python", "-m", "pipelines.cli", "run"]
    if config:
        parts += ["-c", config]
    for override in overrides:
        parts += ["--set", override]
    if stages:
        parts += ["--stages", stages]
    return shlex.join(parts)


def resolve_submission_id(value: str | None, today: date | None = None) -> str | None:
    """`nightly` becomes one id per UTC day, so a retried nightly submission finds its job."""
    if value != NIGHTLY:
        return value
    today = today or datetime.now(timezone.utc).date()
    return f"taskatlas-nightly-{today:%Y%m%d}"


@dataclass(frozen=True)
class Token:
    value: str
    source: str  # where it came from, for messages (never the value)


def find_token(auth: RayAuth) -> Token | None:
    """Ray's order: RAY_AUTH_TOKEN, then the file RAY_AUTH_TOKEN_PATH names, then ~/.ray/auth_token."""
    if auth.mode == "disabled":
        return None
    if auth.token:
        return Token(auth.token.strip(), "RAY_AUTH_TOKEN")
    if auth.token_path:
        value = _read_token_file(auth.token_path)
        if not value:
            raise TaskatlasError(f"RAY_AUTH_TOKEN_PATH names {auth.token_path}, which is missing or empty")
        return Token(value, f"RAY_AUTH_TOKEN_PATH ({auth.token_path})")
    value = _read_token_file(auth.default_token_path)
    return Token(value, str(auth.default_token_path)) if value else None


def _read_token_file(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _where_we_looked(auth: RayAuth) -> str:
    if auth.mode == "disabled":
        return "RAY_AUTH_MODE=disabled, so no token was sent"
    path = f"RAY_AUTH_TOKEN_PATH ({auth.token_path})" if auth.token_path else "RAY_AUTH_TOKEN_PATH (unset)"
    return f"looked in RAY_AUTH_TOKEN (unset), {path}, {auth.default_token_path} (missing)"


def connect(address: str, auth: RayAuth, token: Token | None) -> JobSubmissionClient:
    """A Jobs API client that sends the token if we have one; refusals become one-line errors."""
    headers = {"Authorization": f"Bearer {token.value}"} if token else None
    with cluster_errors(address, auth, token):
        return JobSubmissionClient(address, headers=headers)


@contextmanager
def cluster_errors(address: str, auth: RayAuth, token: Token | None) -> Iterator[None]:
    try:
        yield
    except AuthenticationError:
        if token is None:
            msg = f"the Ray cluster at {address} requires a token and we have none: {_where_we_looked(auth)}"
        else:
            msg = f"the Ray cluster at {address} refused the token from {token.source}: is it this cluster's?"
        raise TaskatlasError(msg) from None
    except (ConnectionError, requests.exceptions.ConnectionError):
        raise TaskatlasError(
            f"cannot reach the Ray Jobs API at {address} (is the dashboard up, the port forwarded?)"
        ) from None


@contextmanager
def staged_project(config: Path | None, root: Path = PROJECT_ROOT) -> Iterator[tuple[Path, str | None]]:
    """A temporary copy of the project with the config inside: (working_dir, config path in it)."""
    if not (root / "pyproject.toml").is_file():
        raise TaskatlasError(f"taskatlas submit ships the project folder; {root} is not a checkout")
    if config is not None and not config.is_file():
        raise TaskatlasError(f"config file not found: {config}")
    with tempfile.TemporaryDirectory(prefix="taskatlas-submit-") as tmp:
        work = Path(tmp) / "taskatlas"
        shutil.copytree(root, work, ignore=_ignore_for(root), symlinks=True)
        rel = None
        if config is not None:
            (work / STAGED_CONFIG_DIR).mkdir(exist_ok=True)
            rel = f"{STAGED_CONFIG_DIR}/{config.name}"
            shutil.copyfile(config, work / rel)
        yield work, rel


def _ignore_for(root: Path) -> Callable[[str, list[str]], set[str]]:
    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if any(fnmatch.fnmatch(n, p) for p in EXCLUDED_ANYWHERE)}
        if Path(folder) == root:
            skip |= EXCLUDED_AT_ROOT & set(names)
        return skip

    return ignore


@dataclass(frozen=True)
class Submission:
    submission_id: str
    created: bool  # False: a job with this id already existed and was left alone


def submit_job(
    client: JobSubmissionClient,
    *,
    entrypoint: str,
    runtime_env: dict[str, Any],
    submission_id: str | None,
    agent_wait_s: float = _AGENT_WAIT_S,
    retry_s: float = 2.0,
) -> Submission:
    """Submit; a duplicate id is reported, not an error (two retries racing each other are fine)."""
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            job_id = client.submit_job(
                entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id
            )
            return Submission(job_id, created=True)
        except RuntimeError as err:
            if submission_id and "already exists" in str(err):
                return Submission(submission_id, created=False)
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(retry_s)


def job_exists(client: JobSubmissionClient, submission_id: str) -> bool:
    try:
        client.get_job_info(submission_id)
    except RuntimeError as err:
        if "status code 404" in str(err):
            return False
        raise
    return True


def follow(client: JobSubmissionClient, job_id: str, out: TextIO, poll_s: float = 2.0) -> JobDetails:
    """Stream the job's logs until it ends; poll instead if the log websocket is not available."""
    try:
        asyncio.run(_stream_logs(client, job_id, out))
    except (RuntimeError, OSError, aiohttp.ClientError) as err:  # e.g. a proxy that drops websockets
        print(f"(log stream unavailable: {err}; polling)", file=out)
        _poll_logs(client, job_id, out, poll_s)
    info = client.get_job_info(job_id)
    while not info.status.is_terminal():  # the stream ends with the job, but do not trust a proxy
        time.sleep(poll_s)
        info = client.get_job_info(job_id)
    return info


async def _stream_logs(client: JobSubmissionClient, job_id: str, out: TextIO) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def _poll_logs(client: JobSubmissionClient, job_id: str, out: TextIO, poll_s: float) -> None:
    shown = 0
    while True:
        done = client.get_job_status(job_id).is_terminal()
        logs = client.get_job_logs(job_id)
        out.write(logs[shown:])
        out.flush()
        shown = len(logs)
        if done:
            return
        time.sleep(poll_s)


def submit(
    address: str,
    *,
    entrypoint: EntrypointFn,
    config: Path | None,
    submission_id: str | None,
    wait: bool,
    auth: RayAuth,
    out: TextIO | None = None,
) -> int:
    """What `taskatlas submit` does; returns the exit code (1: the followed job did not succeed).

    `entrypoint` maps the staged config path to the job's command (`build_entrypoint` for the
    pipeline); a job with `submission_id` that already exists is followed, never submitted again.
    """
    out = out or sys.stdout
    token = find_token(auth)
    client = connect(address, auth, token)
    with cluster_errors(address, auth, token):
        if submission_id and job_exists(client, submission_id):
            sub = Submission(submission_id, created=False)
        else:
            with staged_project(config) as (work, rel):
                command = entrypoint(rel)
                sub = submit_job(
                    client,
                    entrypoint=command,
                    runtime_env={"working_dir": str(work)},
                    submission_id=submission_id,
                )
            if sub.created:
                print(f"submitted job {sub.submission_id} to {address}: {command}", file=out)
        if not sub.created:
            status = client.get_job_status(sub.submission_id)
            print(f"job {sub.submission_id} already exists ({status}): not submitting it again", file=out)
        if not wait:
            print(
                f"follow it: taskatlas submit --address {address} --submission-id {sub.submission_id} --wait",
                file=out,
            )
            return 0
        try:
            info = follow(client, sub.submission_id, out)
        except KeyboardInterrupt:
            print(f"\nstopped following; job {sub.submission_id} keeps running on the cluster", file=out)
            return 130
    reason = (info.message or "").strip().splitlines()[:1]  # Ray appends the log tail: shown already
    print(f"job {sub.submission_id} {info.status}" + "".join(f": {r}" for r in reason), file=out)
    return 0 if info.status == JobStatus.SUCCEEDED else 1
