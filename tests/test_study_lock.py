"""One study per storage root at a time (components/study_lock.py, issue 12 item 1)."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from components.study_lock import STUDY_LOCK, LocalLockStore, StudyLock, StudyLocked
from tests.services import cli_process
from tests.study import write_study

REPO = Path(__file__).resolve().parents[1]
HOLD = textwrap.dedent(
    """
    import sys, time
    from components.study_lock import LocalLockStore, StudyLock
    lock = StudyLock(LocalLockStore(sys.argv[1]), "run", heartbeat_s=0.5)
    lock.acquire()
    print("held", flush=True)
    time.sleep(120)
    """
)


def test_a_second_holder_is_refused_naming_the_first_and_gets_it_once_released(tmp_path):
    store = LocalLockStore(tmp_path / STUDY_LOCK)
    first = StudyLock(store, "run", where="storage root X")
    first.acquire()
    with pytest.raises(StudyLocked) as refused:
        StudyLock(store, "train", where="storage root X").acquire()
    line = str(refused.value)
    assert "\n" not in line and "storage root X" in line and "taskatlas run" in line
    assert f"host {socket.gethostname()}" in line and f"pid {os.getpid()}" in line
    assert f"since {first.holder.since}" in line and "--wait-for-lock" in line
    first.release()
    assert not (tmp_path / STUDY_LOCK).exists()
    with StudyLock(store, "train").held():
        assert store.read().command == "train"


def test_a_dead_or_silent_holder_is_taken_over(tmp_path):
    store = LocalLockStore(tmp_path / STUDY_LOCK)
    owner = StudyLock(store, "run")
    owner.acquire()
    owner._stop.set()  # the process "dies": no release, no heartbeat
    proc = subprocess.Popen(["true"])
    proc.wait()
    dead = replace(owner.holder, pid=proc.pid, started="")
    assert store.swap(owner.holder, dead)
    with StudyLock(store, "train").held() as me:  # same host, process gone: taken over at once
        assert me.pid == os.getpid() and me.command == "train"
    # Another host: only the heartbeat tells; a stale one is taken over, a fresh one is not.
    other = StudyLock(store, "run")
    other.acquire()
    other._stop.set()
    fresh = replace(other.holder, host="elsewhere", pid=1)
    assert store.swap(other.holder, fresh)
    with pytest.raises(StudyLocked, match="host elsewhere, pid 1"):
        StudyLock(store, "train", stale_after_s=60).acquire()
    assert store.swap(fresh, replace(fresh, heartbeat=time.time() - 120))
    with StudyLock(store, "train", stale_after_s=60).held() as me:
        assert me.host == socket.gethostname()


def test_wait_for_the_lock_polls_until_the_holder_releases(tmp_path):
    store = LocalLockStore(tmp_path / STUDY_LOCK)
    holder = StudyLock(store, "run")
    holder.acquire()
    waited = []
    threading.Timer(1.0, holder.release).start()
    start = time.monotonic()
    with StudyLock(store, "nightly", poll_s=0.2).held(wait=True, on_wait=waited.append):
        assert time.monotonic() - start >= 0.9
    assert [h.command for h in waited] == ["run"]


def test_a_heartbeat_keeps_the_record_fresh(tmp_path):
    store = LocalLockStore(tmp_path / STUDY_LOCK)
    with StudyLock(store, "run", heartbeat_s=0.2).held() as first:
        time.sleep(0.7)
        assert store.read().heartbeat > first.heartbeat and store.read().token == first.token


def _config(tmp_path: Path) -> Path:
    transfer = {"orders": [], "beams": [], "replicates": 1}
    return write_study(
        tmp_path / "tiny.yaml", tmp_path / "runs", tasks=["normal", "reshading"], transfer=transfer
    )


@pytest.mark.slow  # real drivers, one killed: 26 s (CI runs it)
def test_a_second_study_on_a_root_is_refused_at_once_or_waits_and_takes_over_a_killed_holder(tmp_path):
    config, lock_path = _config(tmp_path), tmp_path / "runs" / STUDY_LOCK
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    waiter = None
    try:
        assert holder.stdout.readline().strip() == "held"
        for command in (["run"], ["train"], ["transfer"], ["nightly", "--date", "2026-11-20"]):
            start = time.monotonic()
            done = subprocess.run(
                [sys.executable, "-m", "pipelines.cli", *command, "-c", str(config)],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=120,
            )
            lines = done.stderr.strip().splitlines()
            assert done.returncode == 2 and len(lines) == 1, (command, done.stderr)
            assert f"pid {holder.pid}" in lines[0] and f"host {socket.gethostname()}" in lines[0]
            assert "since" in lines[0] and time.monotonic() - start < 30
        assert not (tmp_path / "runs" / "mlflow.db").exists()  # refused before any work

        # --wait-for-lock waits; the holder is killed (no release), its lock is taken over.
        waiter = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", "train", "-c", str(config), "--wait-for-lock"],
            cwd=REPO,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        assert "waiting for taskatlas run" in waiter.stderr.readline()
        assert json.loads(lock_path.read_text())["pid"] == holder.pid
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        deadline = time.monotonic() + 30
        while json.loads(lock_path.read_text())["pid"] != waiter.pid:
            assert time.monotonic() < deadline and waiter.poll() is None
            time.sleep(0.2)
    finally:
        for proc in (waiter, holder):
            if proc is not None and proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


def test_a_holder_whose_lock_is_taken_over_is_fenced_and_writes_no_marker(tmp_path):
    """Issue 27 item 8: a holder that was silent past `stale_after_s` (a partition, a pause) and
    whose lock a second holder took over learns it at its next heartbeat; from then on no step
    of it writes its marker, and its release leaves the new holder's record alone."""
    from components.errors import LockLost
    from components.storage import location
    from pipelines.steps import DONE, Step

    store = LocalLockStore(tmp_path / STUDY_LOCK)
    told = threading.Event()
    first = StudyLock(store, "run", heartbeat_s=0.6, on_lost=lambda lost: told.set())
    first.acquire()
    step = Step(location(tmp_path), "stage1/normal", "abc")
    step.finish({"ok": 1}, fence=first.check)  # held: the marker is written
    time.sleep(0.3)  # silent longer than the second holder's patience
    second = StudyLock(store, "train", stale_after_s=0.2, heartbeat_s=30)
    second.acquire()  # takes the "dead" holder's lock over
    try:
        assert told.wait(5), "the first holder never noticed"
        with pytest.raises(LockLost) as lost:
            first.check()
        line = str(lost.value)
        assert "\n" not in line and "taken over by taskatlas train" in line and f"pid {os.getpid()}" in line
        assert "stopped before its next write" in line
        fenced = Step(location(tmp_path), "stage1/reshading", "def")
        with pytest.raises(LockLost):
            fenced.finish({"ok": 1}, fence=first.check)
        assert not fenced.marker.exists() and (tmp_path / "stage1/normal/abc" / DONE).exists()
        first.release()  # must not delete the second holder's record
        assert store.read().token == second.holder.token
        second.check()  # the new holder's fence lets it write
    finally:
        second.release()


def test_a_holder_that_cannot_refresh_its_lock_for_stale_after_s_gives_it_up(tmp_path):
    """A lease: storage it cannot write for `stale_after_s` (here a full disk; a partitioned S3
    alike), after which others may take the lock over, fences the holder too."""
    from components.disk_space import no_space
    from components.errors import LockLost
    from tests.disk import fill, small_disk

    with small_disk(tmp_path / "disk", "1m") as disk:
        holder = StudyLock(LocalLockStore(disk / STUDY_LOCK), "run", heartbeat_s=0.2, stale_after_s=0.5)
        holder.acquire()
        try:
            fill(disk)  # the record can no longer be rewritten
            deadline = time.monotonic() + 5
            while holder.lost is None:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            with pytest.raises(LockLost, match=r"could not be refreshed for 0\.5 s") as lost:
                holder.check()
            assert no_space(lost.value) is not None  # the CLI reports the full disk instead
            assert [p.name for p in disk.iterdir() if p.name.endswith(".new")] == []  # no litter
        finally:
            holder.release()


@pytest.mark.slow  # a real driver, fenced at its next heartbeat (10 s)
def test_a_driver_whose_lock_is_taken_over_stops_in_one_line_before_its_next_write(tmp_path):
    transfer = {"orders": [], "beams": [], "replicates": 1}
    config = write_study(tmp_path / "tiny.yaml", tmp_path / "runs", tasks=["normal"], transfer=transfer)
    store = LocalLockStore(tmp_path / "runs" / STUDY_LOCK)
    driver = cli_process("train", "-c", str(config))
    taker = StudyLock(store, "run", stale_after_s=0.0)  # no patience: as after a 60 s partition
    try:
        deadline = time.monotonic() + 60
        while (held := store.read()) is None or held.pid != driver.pid:
            assert driver.poll() is None and time.monotonic() < deadline, driver.stderr.read()[-3000:]
            time.sleep(0.1)
        taker.acquire()
        taken = time.monotonic()
        _, err = driver.communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.startswith("taskatlas: error:")]
        assert driver.returncode == 1 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
        assert "taken over by taskatlas run" in lines[0] and "stopped before its next write" in lines[0]
        assert time.monotonic() - taken < 60
        assert not list((tmp_path / "runs" / "stage1").rglob("done.json"))  # nothing marked finished
        assert store.read().token == taker.holder.token  # the new holder's record is untouched
    finally:
        taker.release()
        if driver.poll() is None:
            os.kill(driver.pid, signal.SIGKILL)
            driver.wait()


def test_an_interrupt_that_lands_in_a_finalizer_is_delivered_again_not_printed(capsys):
    """Regression: a lost lock interrupts the main thread; landing in a garbage-collected object's
    finalizer, the interrupt was printed as "Exception ignored ... Traceback" and dropped."""
    from pipelines.invocation import redelivered_interrupts

    class Finalized:
        def __del__(self):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), redelivered_interrupts():
        Finalized()  # its finalizer runs here, and swallows the interrupt
        deadline = time.monotonic() + 5  # delivered again within milliseconds
        while time.monotonic() < deadline:
            pass
    assert "Traceback" not in capsys.readouterr().err


def test_a_lost_locks_interrupt_reaches_the_main_thread_whatever_sigint_handler_is_installed(capsys):
    """Regression: the interrupt went through the SIGINT handler, and a library's handler left
    installed (Ray Tune's, Ray Train's, or one that ignores the signal) dropped it: the run went on."""
    import signal
    import threading

    from pipelines.invocation import interrupt_main_thread, redelivered_interrupts

    before = signal.signal(signal.SIGINT, lambda signum, frame: None)  # swallows every SIGINT
    try:
        with pytest.raises(KeyboardInterrupt):
            threading.Timer(0.05, interrupt_main_thread).start()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                pass

        class Finalized:
            def __del__(self):
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt), redelivered_interrupts():
            Finalized()  # the interrupt lands in its finalizer, and is delivered again
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                pass
    finally:
        signal.signal(signal.SIGINT, before)
    assert "Traceback" not in capsys.readouterr().err
