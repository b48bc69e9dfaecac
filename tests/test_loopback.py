"""A local run listens on loopback only (issue 12 item 3): every listening socket of every process
of a real `taskatlas train` (driver, Ray, DDP workers and their torch.distributed rendezvous)."""

import ipaddress
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import pids_carrying
from tests.study import write_study

REPO = Path(__file__).resolve().parents[1]
_SOCKET = re.compile(r"^LISTEN\s+\d+\s+\d+\s+(\S+):(\d+)\s+\S+\s+users:\((.*)\)$")


def listening(pids: set[int]) -> set[tuple[str, int, int]]:
    """(address, port, pid) of each TCP socket that one of `pids` listens on (`ss -ltnp`)."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in out.splitlines():
        if m := _SOCKET.match(line.strip()):
            for pid in map(int, re.findall(r"pid=(\d+)", m[3])):
                if pid in pids:
                    found.add((m[1].strip("[]"), int(m[2]), pid))
    return found


def is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:  # `*`: every interface
        return False
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback  # ::ffff:127.0.0.1 too


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.slow
def test_every_socket_a_local_training_run_listens_on_is_loopback(tmp_path):
    config = tmp_path / "tiny.yaml"
    write_study(
        config,
        tmp_path / "runs",
        tasks=["normal"],
        train={"epochs": 3, "num_workers": 2, "cpus_per_worker": 0.5},
    )
    marker = f"TASKATLAS_SOCKET_PROBE={uuid.uuid4().hex}"
    key, value = marker.split("=")
    run = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "train", "-c", str(config)],
        cwd=REPO,
        env={**os.environ, key: value},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: set[tuple[str, int, int]] = set()
    names: dict[int, set[str]] = {}  # a pid's titles over time (ray::IDLE, then its actor's)
    try:
        while run.poll() is None:
            pids = pids_carrying(marker + "\0") | {run.pid}
            for sock in listening(pids):
                seen.add(sock)
                names.setdefault(sock[2], set()).add(cmdline(sock[2]).strip())
            time.sleep(0.3)
        assert run.returncode == 0, run.stderr.read()[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    exposed = sorted((a, p, sorted(names[pid])) for a, p, pid in seen if not is_loopback(a))
    assert not exposed, f"listening beyond loopback: {exposed}"
    # The sampling saw the run's processes, the DDP workers' rendezvous among them.
    titles = {title[:60] for pid in names for title in names[pid]}
    assert any("RayTrainWorker" in title for title in titles), titles
