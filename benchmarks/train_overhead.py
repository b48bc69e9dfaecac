"""Ray Train overhead: the same epochs of the quickstart model with Ray Train (1 and 2 CPU
workers) and with a plain PyTorch loop in one process.

    .venv/bin/python benchmarks/train_overhead.py               # about 4 minutes on 2 cores
    .venv/bin/python benchmarks/train_overhead.py --epochs 20 --n-train 4000

Ray Train runs three ways: 1 and 2 workers reading their own shard slices (`train.loader`
"shards", the default) and 1 worker fed by Ray Data (`ray1_ray_data`, `train.loader` "ray_data").
Both sides do the same work per epoch: one training pass, a test-set evaluation and a
checkpoint (Ray Train: rank 0 also logs the epoch to MLflow). Ray is started once beforehand,
as in a pipeline; `ray*_over_plain` compare `TorchTrainer.fit()` wall time (worker start-up
included) with the plain loop on one thread (a one-CPU Ray worker also gets one thread);
`ray*_epoch_over_plain` compare the steady-state epoch time. Last line: one JSON object.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import pipelines  # noqa: F401  (first: keeps the local Ray on loopback)

# isort: split
import itertools

import ray
import ray.train
import ray.train.torch
import torch

from components.config import to_dict
from components.data.scenes import SceneConfig
from components.data.shards import ShardStore
from components.data.synthetic import DatasetConfig, generate_dataset
from components.models import build_network
from components.tasks import get_task
from components.training import OptimConfig, evaluate, iter_batches, make_optimizer, train_one_epoch
from pipelines.config import load_pipeline_config
from pipelines.ray_runtime import set_train_report_poll
from pipelines.stage1.ray_data import ray_dataset
from pipelines.stage1.worker import WorkerConfig, loop_config, train_worker
from pipelines.tracking.runs import Tracker

TASK = "normal"


def plain_loop(store: ShardStore, cfg, epochs: int, tmp: Path) -> tuple[float, list[float]]:
    torch.set_num_threads(1)
    task = get_task(TASK)
    torch.manual_seed(0)
    train, test = store.read("train", ["rgb", TASK]), store.read("test", ["rgb", TASK])
    start = time.perf_counter()
    model = build_network(task, cfg.model, cfg.data.size)
    opt = make_optimizer(model, OptimConfig(cfg.train.lr, cfg.train.weight_decay, cfg.train.batch_size))
    stamps = [time.perf_counter()]
    for epoch in range(epochs):
        train_one_epoch(
            model,
            opt,
            iter_batches(train, cfg.train.batch_size, shuffle=True, seed=epoch),
            task,
            torch.device("cpu"),
        )
        evaluate(model, iter_batches(test, 256), task, torch.device("cpu"))
        torch.save(
            {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch}, tmp / "state.pt"
        )
        stamps.append(time.perf_counter())
    return stamps[-1] - start, [b - a for a, b in itertools.pairwise(stamps)]


def ray_train(
    store: ShardStore, cfg, epochs: int, workers: int, loader: str, tmp: Path
) -> tuple[float, list[float]]:
    """`TorchTrainer.fit()` as Stage I runs it; `loader` as `train.loader`."""
    tracker = Tracker(f"sqlite:///{tmp}/mlflow.db", "bench", artifact_location=(tmp / "art").as_uri())
    run_id = tracker.start_run(f"ray{workers}")
    worker = WorkerConfig(
        task=to_dict(get_task(TASK)),
        model=to_dict(cfg.model),
        image_size=cfg.data.size,
        channels=get_task(TASK).channels,
        lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        batch_size=cfg.train.batch_size // workers,
        epochs=epochs,
        seed=0,
        tracking_uri=tracker.tracking_uri,
        run_id=run_id,
        data_root=store.root.uri if loader == "shards" else "",
        weights=str(tmp / f"weights-{workers}-{loader}.pt"),
    )
    data = {}
    if loader == "ray_data":  # materialized, as train.materialize_data does
        datasets = {s: ray_dataset(store, s, ["rgb", TASK]).materialize() for s in ("train", "test")}
        data = {"datasets": datasets, "dataset_config": ray.train.DataConfig(datasets_to_split=["train"])}
    trainer = ray.train.torch.TorchTrainer(
        train_worker,
        train_loop_config=loop_config([worker]),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"bench-{workers}-{loader}", storage_path=str(tmp / "ray")),
        **data,
    )
    set_train_report_poll(cfg.train.report_poll_s)  # as Stage I does
    start = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - start
    stamps = sorted(m.timestamp for m in tracker.client.get_metric_history(run_id, "train_loss"))
    return wall, [(b - a) / 1000 for a, b in itertools.pairwise(stamps)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--n-train", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        data = DatasetConfig(n_train=args.n_train, n_transfer=0, n_test=200, scene=SceneConfig(size=32))
        generate_dataset(tmp / "data", data)
        store = ShardStore(tmp / "data")
        cfg = load_pipeline_config("configs/quickstart.yaml", [f"data.path={tmp / 'data'}"])
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        plain_wall, plain_epochs = plain_loop(store, cfg, args.epochs, tmp)
        print(f"plain loop, 1 thread: {plain_wall:.1f} s")
        out = {"epochs": args.epochs, "n_train": args.n_train, "plain_s": round(plain_wall, 2)}
        # rayN: N workers reading their shards (train.loader "shards", the default); ray1_ray_data:
        # one worker fed by Ray Data from the object store.
        for name, workers, loader in (
            ("ray1", 1, "shards"),
            ("ray2", 2, "shards"),
            ("ray1_ray_data", 1, "ray_data"),
        ):
            (tmp / name).mkdir()
            wall, epochs = ray_train(store, cfg, args.epochs, workers, loader, tmp / name)
            print(f"Ray Train, {workers} CPU worker(s), loader {loader}: {wall:.1f} s")
            out[f"{name}_s"] = round(wall, 2)
            out[f"{name}_over_plain"] = round(wall / plain_wall, 3)
            out[f"{name}_epoch_over_plain"] = round(
                statistics.median(epochs) / statistics.median(plain_epochs[1:]), 3
            )
        ray.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
