"""`taskatlas submit`: Jobs API submission, token auth, deterministic ids.

The cluster tests start a token-authenticated local Ray of their own (`ray start --head --block`,
temporary HOME holding the token, every port picked free, all on 127.0.0.1) and end it by process
id. Not `ray stop`: that kills every Ray process on the machine, other people's included.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import date, datetime, timezone
from pathlib import Path

import pytest
import requests

from components.errors import TaskatlasError
from components.settings import RayAuth
from pipelines import cli
from pipelines.submit import build_entrypoint, find_token, resolve_submission_id, submit, submit_job
from pipelines.upload import STAGED_CONFIG_DIR, staged_project
from tests.conftest import pids_carrying

VENV_BIN = Path(sys.executable).parent
TINY_ID = "taskatlas-test-tiny"


def tiny_job(config: str | None) -> str:
    """The job the cluster tests run: the real `taskatlas run` command with the staged config,
    as a dry run (loads the config, plans the steps, trains nothing)."""
    return build_entrypoint(config, ["data.seed=3"], "train") + " --dry-run"


# ---------------------------------------------------------------- no cluster needed


def test_entrypoint_runs_the_pipeline_module_with_quoted_overrides():
    cmd = build_entrypoint(".taskatlas-submit/x.yaml", ["name=a b", "train.epochs=2"], "train,transfer")
    assert cmd == (
        "python -m pipelines.cli run -c .taskatlas-submit/x.yaml --set 'name=a b' --set train.epochs=2"
        " --stages train,transfer"
    )
    assert build_entrypoint(None) == "python -m pipelines.cli run"


def test_nightly_id_is_one_per_utc_day():
    assert resolve_submission_id("nightly", date(2026, 1, 2)) == "taskatlas-nightly-20260102"
    today = datetime.now(timezone.utc).strftime("%Y%m%d")
    assert resolve_submission_id("nightly") == f"taskatlas-nightly-{today}"
    assert resolve_submission_id("my-id") == "my-id"
    assert resolve_submission_id(None) is None


def test_token_is_found_in_rays_order(tmp_path):
    home_token, path_token = tmp_path / "home_token", tmp_path / "path_token"
    home_token.write_text("from-home\n")
    path_token.write_text("from-path\n")

    def auth(**kw):
        return RayAuth(
            **{"mode": None, "token": None, "token_path": None, "default_token_path": home_token} | kw
        )

    assert find_token(auth(token="from-env", token_path=path_token)).value == "from-env"
    assert find_token(auth(token_path=path_token)).value == "from-path"
    assert find_token(auth()).value == "from-home"
    assert find_token(auth(default_token_path=tmp_path / "missing")) is None
    assert find_token(auth(mode="disabled")) is None
    with pytest.raises(TaskatlasError, match="RAY_AUTH_TOKEN_PATH"):
        find_token(auth(token_path=tmp_path / "missing"))


def test_staged_project_carries_code_and_config_but_not_venv_or_git(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text("name: x\n")
    with staged_project(config) as (work, rel):
        assert rel == f"{STAGED_CONFIG_DIR}/tiny.yaml"
        assert (work / rel).read_text() == "name: x\n"
        assert (work / "pipelines" / "cli.py").is_file()
        assert (work / "components" / "data" / "shards.py").is_file()  # `data` is excluded at the top only
        assert not (work / ".venv").exists() and not (work / ".git").exists()
        assert not list(work.rglob("__pycache__"))
    assert not work.exists()
    with pytest.raises(TaskatlasError, match="config file not found"), staged_project(tmp_path / "nope.yaml"):
        pass


class _FakeClient:
    """Answers submit_job from a script of results (an exception or a job id), in order."""

    def __init__(self, *results):
        self.results, self.calls = list(results), 0

    def submit_job(self, **_):
        self.calls += 1
        result = self.results.pop(0)
        if isinstance(result, Exception):
            raise result
        return result


def test_submit_job_waits_for_the_agent_and_treats_a_duplicate_as_existing():
    client = _FakeClient(RuntimeError("status code 500: No available agent to submit job"), "job-1")
    assert submit_job(client, entrypoint="true", runtime_env={}, submission_id=None, retry_s=0).created
    assert client.calls == 2
    raced = _FakeClient(RuntimeError("Job with submission_id x already exists. Please use..."))
    sub = submit_job(raced, entrypoint="true", runtime_env={}, submission_id="x")
    assert (sub.submission_id, sub.created) == ("x", False)
    with pytest.raises(RuntimeError, match="boom"):
        submit_job(_FakeClient(RuntimeError("boom")), entrypoint="true", runtime_env={}, submission_id="x")


# ---------------------------------------------------------------- a real token-authenticated cluster


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class _Cluster:
    def __init__(self, address: str, token_file: Path, tmp: Path):
        self.address, self.token_file, self.tmp = address, token_file, tmp

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {self.token}"})

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    def auth(self) -> RayAuth:
        return RayAuth(
            mode=None, token=None, token_path=self.token_file, default_token_path=self.tmp / "none"
        )


def _cluster_pids(tmp: str) -> set[int]:
    """Every process of this cluster, and nobody else's: its temp dir is in their environment
    (HOME), command line or working directory."""
    return pids_carrying(tmp, cwd_prefix=tmp)


def _end_cluster(head: subprocess.Popen, tmp: str) -> None:
    """SIGTERM to `ray start --block` shuts its node down; then SIGKILL, by pid, whatever is left."""
    head.terminate()
    try:
        head.wait(30)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait(10)
    deadline = time.monotonic() + 15
    while (left := _cluster_pids(tmp)) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    assert not left, f"processes of the test cluster still running: {sorted(left)}"


@pytest.fixture(scope="module")
def cluster():
    if not Path("/proc").is_dir():
        pytest.skip("finds the cluster's processes through /proc (Linux)")
    tmp = Path(tempfile.mkdtemp(prefix="tasr-", dir="/tmp"))  # short: Ray's socket paths live under it
    home = tmp / "home"
    (home / ".ray").mkdir(parents=True)
    token_file = home / ".ray" / "auth_token"  # `ray start` needs one when RAY_AUTH_MODE=token
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    gcs, dash, agent, client, metrics, dash_metrics = _free_ports(6)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env |= {
        "HOME": str(home),
        "RAY_AUTH_MODE": "token",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "DASHBOARD_METRIC_PORT": str(dash_metrics),
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `python` is the venv's
    }
    args = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
        f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
        f"--metrics-export-port={metrics}", "--num-cpus=2", "--include-dashboard=true",
        f"--temp-dir={tmp / 'ray'}", f"--object-store-memory={200 * 1024**2}", "--disable-usage-stats",
    ]  # fmt: skip
    log = (tmp / "ray-start.log").open("w")
    head = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_jobs_api(head, address, token_file.read_text(), tmp / "ray-start.log")
        yield _Cluster(address, token_file, tmp)
    finally:
        _end_cluster(head, str(tmp))
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_for_jobs_api(head: subprocess.Popen, address: str, token: str, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited:\n{log.read_text()[-3000:]}")
        try:
            r = requests.get(f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=5)
            if r.status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the Jobs API at {address} did not come up:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def tiny_config(cluster):
    path = cluster.tmp / "tiny.yaml"
    path.write_text(
        f"name: taskatlas-submit-test\nstorage_root: {cluster.tmp / 'runs'}\ntasks: [normal]\n"
        "data: {n_train: 4, n_transfer: 2, n_test: 2, size: 16}\n"
    )
    return path


@pytest.fixture
def token_env(cluster, monkeypatch):
    """The CLI finds this cluster's token through RAY_AUTH_TOKEN_PATH, as on a real client."""
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(cluster.token_file))


def _jobs(cluster, submission_id: str | None = None) -> list:
    return [j for j in cluster.client().list_jobs() if submission_id in (None, j.submission_id)]


@pytest.fixture(scope="module")
def finished_tiny_job(cluster, tiny_config):
    """`submit --wait` of the tiny job, through the same function the command calls: (exit code, output)."""
    out = io.StringIO()
    rc = submit(
        cluster.address,
        entrypoint=tiny_job,
        config=tiny_config,
        submission_id=TINY_ID,
        wait=True,
        auth=cluster.auth(),
        out=out,
    )
    return rc, out.getvalue()


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_wait_streams_logs_and_succeeds(cluster, finished_tiny_job):
    rc, out = finished_tiny_job
    assert rc == 0, out
    assert f"submitted job {TINY_ID}" in out
    assert "run      train" in out and "skip     transfer" in out  # the job's own output, streamed
    assert f"job {TINY_ID} SUCCEEDED" in out
    [job] = _jobs(cluster, TINY_ID)
    assert job.entrypoint == tiny_job(f"{STAGED_CONFIG_DIR}/tiny.yaml")
    assert "RAY_AUTH_TOKEN" not in str(job.runtime_env) and cluster.token not in str(job.runtime_env)


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_an_existing_id_is_followed_not_submitted_again(
    cluster, tiny_config, finished_tiny_job, token_env, capsys
):
    before = len(_jobs(cluster))
    argv = [
        "submit",
        "--address",
        cluster.address,
        "-c",
        str(tiny_config),
        "--submission-id",
        TINY_ID,
        "--wait",
    ]
    rc = cli.main(argv)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"job {TINY_ID} already exists (SUCCEEDED)" in out and "run      train" in out
    assert len(_jobs(cluster)) == before


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_cli_submits_taskatlas_run_once_per_nightly_id(cluster, tiny_config, token_env, capsys):
    nightly = resolve_submission_id("nightly")
    argv = ["submit", "--address", cluster.address, "-c", str(tiny_config), "--set", "train.epochs=1"]
    argv += ["--submission-id", "nightly"]
    assert cli.main(argv) == 0
    client = cluster.client()
    try:
        [job] = _jobs(cluster, nightly)
        assert job.entrypoint == build_entrypoint(f"{STAGED_CONFIG_DIR}/tiny.yaml", ["train.epochs=1"])
    finally:
        client.stop_job(nightly)  # the real pipeline: not what this test is about
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"submitted job {nightly}" in out and f"job {nightly} already exists" in out
    assert len(_jobs(cluster, nightly)) == 1


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_without_the_token_the_cluster_refuses_with_one_clear_line(
    cluster, tiny_config, tmp_path, monkeypatch, capsys
):
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    before = len(_jobs(cluster))
    argv = ["submit", "--address", cluster.address, "-c", str(tiny_config), "--submission-id", "refused"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert (
        "requires a token" in err and "RAY_AUTH_TOKEN" in err and str(tmp_path / ".ray" / "auth_token") in err
    )

    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "refused the token from RAY_AUTH_TOKEN" in err
    assert len(_jobs(cluster)) == before
