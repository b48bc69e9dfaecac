"""An interrupt stays an interrupt through Ray Tune and Ray Train fits (real local Ray).

Regression: both install SIGINT handlers and never restore them. After a search in the same
process, the study lock's interrupt (on a lost lock) was taken by Tune's stale handler and
dropped; after a training, Train's handler swallowed two Ctrl+C and exited 0 on the third."""

import _thread
import os
import signal
import threading
import time

import pytest
import ray.train
import ray.train.torch
from ray import tune

from pipelines.ray_runtime import interrupts_kept


def test_a_search_leaves_the_interrupt_handler_as_it_found_it(ray_session, tmp_path):
    before = signal.getsignal(signal.SIGINT)
    with interrupts_kept():
        tune.Tuner(
            lambda config: {"loss": config["x"]},
            param_space={"x": tune.grid_search([1, 2])},
            run_config=tune.RunConfig(storage_path=str(tmp_path), name="search"),
        ).fit()
    assert signal.getsignal(signal.SIGINT) is before


def test_a_training_interrupted_raises_keyboard_interrupt_and_restores_the_handler(ray_session, tmp_path):
    before = signal.getsignal(signal.SIGINT)
    trainer = ray.train.torch.TorchTrainer(
        lambda: time.sleep(60),  # a lambda is pickled by value: the workers cannot import this file
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path), name="train"),
    )
    interrupt = threading.Timer(8.0, _thread.interrupt_main)  # once Train's handler is installed
    interrupt.start()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt), interrupts_kept():  # Ray Train's own: sys.exit(0)
            trainer.fit()
    finally:
        interrupt.cancel()
    assert time.monotonic() - started < 50  # the interrupt ended the fit, not the worker's sleep
    assert signal.getsignal(signal.SIGINT) is before


def test_tunes_switch_is_on_during_a_fit_and_put_back_after(monkeypatch):
    monkeypatch.delenv("TUNE_DISABLE_SIGINT_HANDLER", raising=False)
    with pytest.raises(KeyboardInterrupt), interrupts_kept():
        assert os.environ["TUNE_DISABLE_SIGINT_HANDLER"] == "1"
        raise SystemExit(1)  # what Train's handler's sys.exit(0) surfaces as, out of a ray.get
    assert "TUNE_DISABLE_SIGINT_HANDLER" not in os.environ


def _terminated_during(stage_bar: str, tmp_path) -> tuple[int, str]:
    """A tiny study run by the CLI in a process of its own, sent SIGTERM once `stage_bar` shows."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.study import write_study

    config = write_study(
        tmp_path / "tiny.yaml", tmp_path / "runs", train={"epochs": 30}, analysis={"bootstrap": 5000}
    )
    env = {**os.environ, "TASKATLAS_RAY_DASHBOARD": "0"}
    cmd = [sys.executable, "-m", "pipelines.cli", "run", "-c", str(config)]
    root = Path(__file__).resolve().parents[1]
    with subprocess.Popen(cmd, cwd=root, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL) as proc:
        seen = b""
        while stage_bar.encode() not in seen and proc.poll() is None:
            seen += proc.stderr.read1(4096)
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        return proc.wait(timeout=120), (seen + rest).decode(errors="replace")


@pytest.mark.slow  # a tiny study up to its networks, in a process of its own: about 30 s
def test_sigterm_during_training_ends_in_one_line_and_the_status_of_a_termination(tmp_path):
    """Regression: Ray's driver handler turned SIGTERM into `sys.exit(15)`: a traceback from
    wherever the main thread was, and a crash at exit (rc 139 here, 134 with a C++ stack dump
    from HiGHS during Stage IV's solves)."""
    rc, err = _terminated_during("networks:", tmp_path)
    assert rc == 143, err[-2000:]
    assert "taskatlas: terminated (SIGTERM); finished steps are kept" in err
    assert "Traceback" not in err and "Segmentation" not in err
