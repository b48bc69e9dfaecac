"""`taskatlas submit` fails safe: bounded waits, no secrets uploaded or put on a command line, no
token over plain http (issue 27, parts 5 and 8). No cluster needed: a socket that never answers
stands in for a hung dashboard."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from components.errors import TaskatlasError
from pipelines import cli, submit
from pipelines.submit import Token, build_entrypoint, refuse_plain_http, refuse_secrets
from pipelines.upload import STAGED_CONFIG_DIR, plan_upload, staged_project, upload_excludes

SECRETS = (
    ".env",
    ".env.local",
    "id_rsa",
    "id_rsa.pub",
    "server.pem",
    "tls.key",
    "credentials",
    "pkg/gcp.credentials.json",
    ".aws/config",
    ".netrc",
)


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def silent_address():
    """http://127.0.0.1:PORT of a server that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


@pytest.fixture
def closed_address():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def no_token(tmp_path, monkeypatch):
    """No Ray token anywhere: the CLI must fail on the address, not on auth."""
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(f"name: submit-safety\nstorage_root: {tmp_path / 'runs'}\ntasks: [normal]\n")
    return path


# ---------------------------------------------------------------- timeouts


@pytest.mark.timeout(90)
@pytest.mark.timeout(60)
def test_an_address_that_accepts_and_never_answers_ends_in_one_line(
    silent_address, tiny_config, no_token, capsys, monkeypatch
):
    monkeypatch.setattr(submit, "PROBE_S", 1.0)  # the default waits 10 s for the first answer
    start = time.monotonic()
    assert cli.main(["submit", "--address", silent_address, "-c", str(tiny_config)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert silent_address in line and "did not answer" in line
    assert time.monotonic() - start < 15


@pytest.mark.timeout(60)
def test_a_closed_port_is_still_one_line(closed_address, tiny_config, no_token, capsys):
    assert cli.main(["submit", "--address", closed_address, "-c", str(tiny_config)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert closed_address in line and "cannot reach" in line


# ---------------------------------------------------------------- what is uploaded


def _project_with_secrets(root: Path) -> Path:
    """A project folder: code, a .gitignore, the secrets a developer leaves lying around, a storage
    root inside it, and a symlink to a file outside it."""
    (root / "pkg").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'p'\n")
    (root / "pkg" / "a.py").write_text("x = 1\n")
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("private\n")
    (root / "debug.log").write_text("noise\n")
    (root / ".gitignore").write_text("notes/\n*.log\n")
    (root / "pkg" / ".gitignore").write_text("scratch_*.py\n")
    (root / "pkg" / "scratch_1.py").write_text("y = 2\n")
    for rel in SECRETS:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n")
    (root / "my-runs" / "normal").mkdir(parents=True)
    (root / "my-runs" / "normal" / "model.pt").write_text("weights\n")
    outside = root.parent / "outside.txt"
    outside.write_text("not the project's\n")
    (root / "pkg" / "link.txt").symlink_to(outside)
    return root


def test_the_upload_follows_gitignore_and_leaves_out_secrets_storage_and_links(tmp_path, monkeypatch):
    root = _project_with_secrets(tmp_path / "proj")
    monkeypatch.chdir(root)
    plan = plan_upload(root, upload_excludes("my-runs", root))
    assert set(plan.files) == {".gitignore", "pyproject.toml", "pkg/.gitignore", "pkg/a.py"}
    assert plan.links == ("pkg/link.txt",)
    assert "/my-runs/" in plan.excluded and ".env*" in plan.excluded
    config = tmp_path / "c.yaml"
    config.write_text("name: x\n")
    with staged_project(config, root=root, excludes=upload_excludes("my-runs", root)) as (work, rel):
        shipped = {p.relative_to(work).as_posix() for p in work.rglob("*") if not p.is_dir()}
    assert shipped == set(plan.files) | {rel}


def test_the_storage_root_is_left_out_only_when_inside_the_project(tmp_path):
    root = tmp_path / "proj"
    root.mkdir()
    assert "/runs/" in upload_excludes(str(root / "runs"), root)
    assert "/a/b/" in upload_excludes(f"file://{root}/a/b", root)
    base = upload_excludes(str(tmp_path / "elsewhere"), root)
    assert base == upload_excludes("s3://bucket/studies", root)
    assert not any("elsewhere" in p for p in base)


def test_dry_run_lists_the_upload_without_the_env_file_and_contacts_nothing(
    tmp_path, silent_address, tiny_config, no_token, capsys
):
    from pipelines.submit import dry_run

    root = _project_with_secrets(tmp_path / "proj")
    entry = lambda config: build_entrypoint(config, ["train.epochs=1"])  # noqa: E731
    excludes = upload_excludes(str(root / "my-runs"), root)
    assert dry_run(silent_address, entrypoint=entry, config=tiny_config, excludes=excludes, root=root) == 0
    out = capsys.readouterr().out
    assert "pkg/a.py" in out and f"{STAGED_CONFIG_DIR}/tiny.yaml" in out
    assert build_entrypoint(f"{STAGED_CONFIG_DIR}/tiny.yaml", ["train.epochs=1"]) in out
    assert "AWS_SECRET" not in out and "notes/todo.txt" not in out and "model.pt" not in out
    listed = {line.strip() for line in out.splitlines()}
    assert not listed & set(SECRETS)
    assert ".env*" in out  # the patterns left out are shown

    start = time.monotonic()  # the command: the real project, a silent address, and no wait
    argv = ["submit", "--address", silent_address, "-c", str(tiny_config), "--dry-run"]
    assert cli.main(argv) == 0
    assert time.monotonic() - start < 8
    out = capsys.readouterr().out
    assert "pipelines/cli.py" in out and "python -m pipelines.cli run -c" in out
    listed = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    assert not [name for name in listed if name.startswith((".venv/", ".git/", "taskatlas-runs/", ".env"))]


# ---------------------------------------------------------------- secrets on the command line


@pytest.mark.parametrize(
    "override",
    [
        "tracking_uri=http://alice:hunter2@mlflow.internal:5000",
        "tracking_uri=postgresql://alice:hunter2@db/mlflow",
        "tracking.password=hunter2",
        "aws_secret_access_key=hunter2",
        "api_token=hunter2",
        "secrets.mlflow=hunter2",
        "tracking_uri=https://mlflow.internal/?access_token=hunter2",
    ],
)
def test_a_secret_in_set_is_refused_in_one_line_before_anything_is_sent(
    override, closed_address, no_token, capsys
):
    argv = ["submit", "--address", closed_address, "--set", override, "--dry-run"]
    assert cli.main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "hunter2" not in line and "environment variable" in line and "--set" in line


def test_values_that_are_not_secrets_pass():
    refuse_secrets(["tracking_uri=http://mlflow.internal:5000", "train.epochs=3", "name=a:b@c"])
    refuse_secrets(["tracking.token_file=/run/secrets/mlflow", "tracking.password=${MLFLOW_PW}"])
    with pytest.raises(TaskatlasError, match="tracking_uri"):
        refuse_secrets(["tracking_uri=https://bob:pw@mlflow.internal"])


# ---------------------------------------------------------------- the Ray token over plain http


def test_the_token_is_not_sent_over_plain_http_to_another_host():
    token = Token("t0ken", "RAY_AUTH_TOKEN")
    for address in ("http://10.0.0.5:8265", "10.0.0.5:8265", "http://head.internal:8265"):
        with pytest.raises(TaskatlasError, match="--insecure") as err:
            refuse_plain_http(address, token, insecure=False)
        assert "\n" not in str(err.value) and "t0ken" not in str(err.value)
        refuse_plain_http(address, token, insecure=True)
        refuse_plain_http(address, None, insecure=False)  # no token: nothing to leak
    for address in ("http://127.0.0.1:8265", "http://localhost:8265", "http://[::1]:8265", "https://h:443"):
        refuse_plain_http(address, token, insecure=False)


@pytest.mark.timeout(60)
def test_the_cli_refuses_before_connecting(tiny_config, monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t0ken")
    address = "http://head.invalid:8265"
    assert cli.main(["submit", "--address", address, "-c", str(tiny_config)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert address in line and "--insecure" in line and "RAY_AUTH_TOKEN" in line
    assert cli.main(["submit", "--address", address, "-c", str(tiny_config), "--insecure"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "cannot reach" in line  # let through: it fails on the (unresolvable) address
