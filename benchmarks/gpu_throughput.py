"""GPU throughput of the project's training code, with no Ray and no MLflow (plain components), so
it runs on a bare GPU machine with only torch, numpy and pyarrow:

    .venv/bin/python benchmarks/gpu_throughput.py                      # sized for minutes on one GPU
    .venv/bin/python benchmarks/gpu_throughput.py --device cpu --images 64 --size 32 \\
        --encoder small --epochs 2 --readouts 4 --readout-epochs 1     # smoke run on a CPU

(a) `stage1_ratio`: images/s of Stage I's training step as its Ray Train worker runs it (numpy
    batches of the split, `components.training.train_one_epoch`: per-batch host-to-device copy,
    the task's input transform, bf16 autocast, channels-last) over a plain PyTorch loop on the
    same network with the split already on the device (the fastest plain loop: no copies at
    all). Median epoch after one warm-up epoch. Goal: within 1.1x.
(b) `packing_gain`: readouts per GPU-hour with `--pack` readouts sharing the GPU at once (as
    Stage II packs them with `transfer.gpus_per_readout = 1/pack`: here `--pack` spawned
    processes, each training readouts from one queue) over one readout at a time; each readout is
    `components.transfer.train_readout` on features shaped like the cache's.
The last line printed is one JSON object; `device` names the card.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from a checkout, installed or not

import numpy as np  # noqa: E402
import torch  # noqa: E402

from components.models import EncoderKind, ModelConfig, build_network  # noqa: E402
from components.models.network import representation_shape  # noqa: E402
from components.tasks import get_task  # noqa: E402
from components.training import OptimConfig, iter_batches, make_optimizer, train_one_epoch  # noqa: E402
from components.transfer import ReadoutSettings, train_readout  # noqa: E402

TASK = "normal"


def model_config(encoder: str) -> ModelConfig:
    if encoder == "resnet50":  # Taskonomy's encoder, cut to a 16x16x8-like representation
        return ModelConfig(encoder=EncoderKind.RESNET, resnet_depth=50, downsample=8)
    return ModelConfig(width=32, downsample=4)  # configs/quickstart.yaml's small encoder


def synthetic_split(images: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A split as the shards hold it: uint8 RGB and float32 unit normals (content is irrelevant
    to throughput; shapes and dtypes are what count)."""
    rng = np.random.default_rng(seed)
    normal = rng.normal(size=(images, 3, size, size)).astype(np.float32)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    return {
        "image_id": np.array([f"img{i}" for i in range(images)]),
        "rgb": rng.integers(0, 256, (images, 3, size, size), dtype=np.uint8),
        "normal": normal,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stage1_throughput(args: argparse.Namespace, device: torch.device) -> dict:
    """Images/s of the component step and of the plain loop on the same network and data."""
    task, model = get_task(TASK), model_config(args.encoder)
    data = synthetic_split(args.images, args.size)
    n = args.images - args.images % args.batch_size

    def component_epoch(net, opt, epoch: int) -> None:
        generator = torch.Generator().manual_seed(epoch)
        batches = iter_batches(data, args.batch_size, shuffle=True, seed=epoch, drop_last=True)
        train_one_epoch(net, opt, batches, task, device, generator)

    x_dev = torch.from_numpy(data["rgb"]).to(device).float().div(255.0)
    x_dev = x_dev.contiguous(memory_format=torch.channels_last)
    y_dev = torch.from_numpy(data["normal"]).to(device)

    def plain_epoch(net, opt, epoch: int) -> None:
        net.train()
        order = torch.randperm(args.images, generator=torch.Generator().manual_seed(epoch)).to(device)
        for start in range(0, n, args.batch_size):
            idx = order[start : start + args.batch_size]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                pred = net(x_dev[idx])
            loss = task.per_image_loss(pred.float(), y_dev[idx]).nanmean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    out = {}
    for name, epoch_fn in (("plain", plain_epoch), ("component", component_epoch)):
        torch.manual_seed(0)
        net = build_network(task, model, args.size).to(device)
        opt = make_optimizer(net, OptimConfig(lr=1e-3))
        times = []
        for epoch in range(args.epochs + 1):  # the first is warm-up (cuDNN autotuning, allocator)
            _sync(device)
            start = time.perf_counter()
            epoch_fn(net, opt, epoch)
            _sync(device)
            times.append(time.perf_counter() - start)
        out[f"{name}_images_per_s"] = round(n / statistics.median(times[1:]), 1)
    out["stage1_ratio"] = round(out["plain_images_per_s"] / out["component_images_per_s"], 3)
    return out


def _readout_worker(args: argparse.Namespace, device_name: str, jobs, done) -> None:
    """One packed slot: train readouts from the queue until it is empty."""
    torch.set_num_threads(1)
    device = torch.device(device_name)
    task, model = get_task(TASK), model_config(args.encoder)
    c, h, w = representation_shape(model, args.size)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.readout_images, c, h, w)).astype(np.float32)
    y = synthetic_split(args.readout_images, args.size)["normal"]
    ids = np.array([f"img{i}" for i in range(args.readout_images)])
    settings = ReadoutSettings(epochs=args.readout_epochs, batch_size=args.batch_size)
    while jobs.get() is not None:
        train_readout(
            task=task,
            model=model,
            image_size=args.size,
            transfer_x=x,
            transfer_y=y,
            test_x=x,
            test_y=y,
            test_ids=ids,
            settings=settings,
            device=device,
        )
        done.put(1)


def readouts_per_hour(args: argparse.Namespace, device: torch.device, slots: int) -> float:
    """Readouts per hour with `slots` processes sharing the device (start-up not counted)."""
    ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    jobs, done = ctx.Queue(), ctx.Queue()
    for _ in range(slots):  # warm-up: one readout per slot before the clock starts
        jobs.put(1)
    workers = [
        ctx.Process(target=_readout_worker, args=(args, str(device), jobs, done)) for _ in range(slots)
    ]
    for p in workers:
        p.start()
    for _ in range(slots):
        done.get()
    start = time.perf_counter()
    for _ in range(args.readouts):
        jobs.put(1)
    for _ in range(args.readouts):
        done.get()
    seconds = time.perf_counter() - start
    for _ in workers:
        jobs.put(None)
    for p in workers:
        p.join()
    return 3600 * args.readouts / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--encoder", choices=("resnet50", "small"), default="resnet50")
    p.add_argument("--size", type=int, default=128, help="image side")
    p.add_argument("--images", type=int, default=2048, help="Stage I training images")
    p.add_argument("--epochs", type=int, default=3, help="timed Stage I epochs (after one warm-up)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--readouts", type=int, default=24, help="timed readouts per packing")
    p.add_argument("--readout-images", type=int, default=512)
    p.add_argument("--readout-epochs", type=int, default=5)
    p.add_argument("--pack", type=int, default=4, help="readouts sharing the device at once")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "encoder": args.encoder,
        "size": args.size,
        **stage1_throughput(args, device),
    }
    one = readouts_per_hour(args, device, 1)
    packed = readouts_per_hour(args, device, args.pack)
    out |= {
        "pack": args.pack,
        "readouts_per_hour_one_at_a_time": round(one),
        "readouts_per_hour_packed": round(packed),
        "packing_gain": round(packed / one, 2),
        "ray_or_mlflow_imported": sorted(m for m in ("ray", "mlflow") if m in sys.modules),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
