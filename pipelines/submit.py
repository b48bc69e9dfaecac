"""Send `taskatlas run` to a Ray cluster through the Ray Jobs API (design.md section 8).

taskatlas submit --address http://127.0.0.1:8265 -c configs/taskonomy-gpu.yaml --wait
taskatlas submit --address http://127.0.0.1:8265 -c configs/taskonomy-gpu.yaml --submission-id nightly
pytest tests/test_submit.py     # smoke: a token-authenticated local cluster of its own

The job needs the project and the config on the cluster, and Ray ships exactly one folder (the
`working_dir`). So we copy the project, put the config inside the copy, and let Ray package that:
a config from anywhere reaches the job at a path relative to the working_dir, and the checkout is
never written to. Ray names the package by its content hash, so an unchanged project is uploaded
once. What is copied is planned here (`plan_upload`), not left to Ray, so that `--dry-run` shows
exactly what goes: every `.gitignore` (git's rules, through the `pathspec` package; Ray matches the
staged copy's `.gitignore` files again with its own vendored copy, which can only leave more out),
then patterns no `.gitignore` can bring back (secrets, venvs, data, the storage root when it is
inside the project), and no symlinks (they can point anywhere).

Ray's client sends its token only when RAY_AUTH_MODE=token is set in the client's environment; we
read the token from the same places (settings.read_ray_auth) and send the header ourselves, only
over https or to loopback unless `--insecure`. The token never goes into the runtime_env. Ray's
client sets no timeouts; ours does, so an address that accepts and never answers is one line.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import aiohttp
import requests
from ray.exceptions import AuthenticationError
from ray.job_submission import JobDetails, JobStatus, JobSubmissionClient

from components.errors import TaskatlasError
from components.settings import RayAuth
from pipelines.upload import PROJECT_ROOT, checked_plan, staged_config, staged_project

NIGHTLY = "nightly"  # --submission-id nightly -> taskatlas-nightly-YYYYMMDD (UTC)
_AGENT_WAIT_S = 60.0  # a cluster that has just started answers "No available agent" for a while
CONNECT_S = 5.0  # TCP connect, every request
PROBE_S = 10.0  # the first request (Ray's version check): a Jobs API that is up answers at once
READ_S = 60.0  # every later request, the package upload among them
_SECRET_KEY = re.compile(r"secret|passw|token|access_key|api_key|private_key", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/@\s:]*:[^/@\s]+@", re.IGNORECASE)
_SECRET_PARAM = re.compile(r"[?&][^=&\s]*(secret|passw|token|access_key|api_key)[^=&\s]*=[^&\s]", re.I)
_REFERENCE = re.compile(r"\$\{?\w+\}?")  # $VAR / ${VAR}: resolved on the cluster, not a secret

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


def refuse_secrets(overrides: Sequence[str]) -> None:
    """A `--set` value travels in the job's command line, which anyone who can list jobs reads:
    refuse a password in a URL, or a literal value for a key named like a secret."""
    for item in overrides:
        key, _, value = item.partition("=")
        if _URL_PASSWORD.search(value):
            why = "holds a password in a URL (user:password@)"
        elif _SECRET_PARAM.search(value):
            why = "holds a secret in a URL parameter"
        elif _SECRET_KEY.search(key) and not _names_a_place(key, value):
            why = "looks like a secret"
        else:
            continue
        raise TaskatlasError(
            f"--set {key}: the value {why}, and would travel in clear in the job's command line; "
            "give it to the job as an environment variable on the cluster (e.g. MLFLOW_TRACKING_PASSWORD) "
            "or a mounted file"
        )


def _names_a_place(key: str, value: str) -> bool:
    """Empty, `$VAR`, or a key that names where the secret is (`token_file=/run/secrets/x`)."""
    leaf = key.rsplit(".", 1)[-1].lower()
    value = value.strip()
    return not value or bool(_REFERENCE.fullmatch(value)) or leaf.endswith(("_file", "_path", "_env"))


def refuse_plain_http(address: str, token: Token | None, insecure: bool) -> None:
    """The token is the cluster's only lock: over plain http anyone on the path can read it.
    Loopback (an SSH tunnel, a port-forward) is fine; elsewhere it needs https or `--insecure`."""
    if token is None or insecure:
        return
    url = urlsplit(address if "://" in address else f"http://{address}")  # Ray's default scheme
    if url.scheme == "http" and not _is_loopback(url.hostname or ""):
        raise TaskatlasError(
            f"refusing to send the Ray token from {token.source} over plain http to {address}: use https, "
            "a tunnel to 127.0.0.1 (ssh -L 8265:localhost:8265 HEAD), or --insecure on a network you trust"
        )


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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


class _TimedClient(JobSubmissionClient):
    """Ray's Jobs client with a timeout on every request: Ray sets none, so an address that
    accepts connections and never answers would hang `submit` forever."""

    def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", (CONNECT_S, PROBE_S if endpoint == "/api/version" else READ_S))
        return super()._do_request(method, endpoint, **kwargs)


def connect(address: str, auth: RayAuth, token: Token | None) -> JobSubmissionClient:
    """A Jobs API client that sends the token if we have one; refusals become one-line errors."""
    headers = {"Authorization": f"Bearer {token.value}"} if token else None
    with cluster_errors(address, auth, token):
        return _TimedClient(address, headers=headers)


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
    except (requests.exceptions.ReadTimeout, TimeoutError):
        raise TaskatlasError(
            f"the Ray Jobs API at {address} accepted the connection but did not answer in time "
            f"({PROBE_S:.0f} s for the first request, {READ_S:.0f} s after): is this the dashboard's port?"
        ) from None
    except (ConnectionError, requests.exceptions.ConnectionError):
        raise TaskatlasError(
            f"cannot reach the Ray Jobs API at {address} (is the dashboard up, the port forwarded?)"
        ) from None


def dry_run(
    address: str,
    *,
    entrypoint: EntrypointFn,
    config: Path | None,
    excludes: Sequence[str] | None = None,
    root: Path = PROJECT_ROOT,
    out: TextIO | None = None,
) -> int:
    """What `submit --dry-run` prints: every file that would be uploaded, what is left out, and
    the job's command. Contacts no cluster."""
    out = out or sys.stdout
    plan = checked_plan(config, root, excludes)
    rel = staged_config(config) if config is not None else None
    for name in plan.files:
        print(f"  {name}", file=out)
    if rel:
        print(f"  {rel}    (your config, {config})", file=out)
    count = len(plan.files) + (rel is not None)
    print(f"would upload {count} files from {root} to {address} (dry run: nothing sent)", file=out)
    print(f"left out: what the .gitignore files ignore, and {' '.join(plan.excluded)}", file=out)
    if plan.links:
        print(f"left out, symlinks (they can point anywhere): {' '.join(plan.links)}", file=out)
    print(f"entrypoint: {entrypoint(rel)}", file=out)
    return 0


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
    excludes: Sequence[str] | None = None,
    insecure: bool = False,
    out: TextIO | None = None,
) -> int:
    """What `taskatlas submit` does; returns the exit code (1: the followed job did not succeed).

    `entrypoint` maps the staged config path to the job's command (`build_entrypoint` for the
    pipeline); a job with `submission_id` that already exists is followed, never submitted again.
    `excludes`: see `staged_project`; `insecure` lets the token go over plain http.
    """
    out = out or sys.stdout
    token = find_token(auth)
    refuse_plain_http(address, token, insecure)
    client = connect(address, auth, token)
    with cluster_errors(address, auth, token):
        if submission_id and job_exists(client, submission_id):
            sub = Submission(submission_id, created=False)
        else:
            with staged_project(config, excludes=excludes) as (work, rel):
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
