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
