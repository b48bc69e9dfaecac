"""Readouts per hour: one readout at a time (a Ray task each, today's `transfer.stack: 1`) against
stacks of N readouts trained as one model (`components.transfer.train_stacked`), on the same
members, with plain components (no Ray, no MLflow), so it also runs on a bare GPU machine:

    .venv/bin/python benchmarks/readout_throughput.py                  # CPU, quickstart shapes, ~2 min
    .venv/bin/python benchmarks/readout_throughput.py --device cuda --members 64 --sizes 8,16,32,64
    .venv/bin/python benchmarks/readout_throughput.py --stage2         # also the quickstart's Stage II both ways
    .venv/bin/python benchmarks/readout_throughput.py --images 10 --epochs 100  # a task positioned from 10 labels

Members are a target's first-order readouts as Stage II stacks them: features shaped like the
study's cache ((N, C, S/d, S/d) float16; the quickstart's by default: 8 channels, 8x8, for 32x32
images), one per member, each with its own seed, 200 transfer and 200 test images, the study's
decoder width and `transfer` settings (epochs, batch, width), one thread each on a CPU (as a Ray
task with `cpus_per_readout: 1` runs). Two targets: `normal` (a pixel decoder, like every target
of the quickstart) and `class_object` (a vector head). Figures on the last line, one JSON object:
- `per_hour`: {target: {"1": readouts/hour one at a time, "N": stacked in stacks of N}};
- `stacked_speedup`: per target, stacked at the default stack size for this device and target
  (`transfer.stack: 0`: 16, but for pixel targets on CPUs 1, or 4 where the training images fit
  in one batch; `pipelines.stage2.plan.auto_stack`) over one at a time, and
  `best_speedup` at the best size measured;
- `stage2_speedup` (with `--stage2`): the quickstart's Stage II wall time with `transfer.stack: 1`
  over `transfer.stack: 16`, both on the same trained networks (`taskatlas run --stages transfer`
  on two copies of one storage root), else null;
- `roofline`: per target, what bounds any stacking on this device. `step_gflop`: the FLOPs of one
  readout's training step, a full batch (convolutions and matrix products, forward and backward, counted by
  `torch.utils.flop_counter`); `readout_gflops`: the rate one readout alone trains at;
  `speedup_bound`: `matmul_gflops` (a large float32 matrix product's rate on the same threads, about
  the most a stacked convolution can reach) over `readout_gflops`, the most a stack could gain if it ran
  its convolutions at matrix-product speed and everything else were free.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from a checkout, installed or not

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from components.models import representation_shape  # noqa: E402
from components.tasks import TaskKind, get_task  # noqa: E402
from components.transfer import ReadoutSettings, StackMember, train_readout, train_stacked  # noqa: E402
from components.transfer.readout import build_readout, label_tensor, validation_split  # noqa: E402
from pipelines.config import load_pipeline_config  # noqa: E402
from pipelines.stage2.plan import auto_stack  # noqa: E402

TARGETS = ("normal", "class_object")


def labels(task, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    shape = (n, *task.output_shape(size, task.channels))
    return (
        rng.random(shape).astype(np.float32)
        if task.kind is TaskKind.PIXEL
        else rng.integers(0, 2, shape).astype(np.float32)
    )


def members(
    n: int, images: int, test_images: int, shape: tuple[int, ...], seed: int = 0
) -> list[StackMember]:
    rng = np.random.default_rng(seed)
    feats = lambda rows: rng.standard_normal((rows, *shape)).astype(np.float16)  # noqa: E731
    return [StackMember(feats(images), feats(test_images), seed=i) for i in range(n)]


def throughput(target: str, args, cfg, device: torch.device) -> tuple[dict[str, float], dict[str, float]]:
    task, rng, size = get_task(target), np.random.default_rng(1), cfg.data.size
    shape = representation_shape(cfg.model, size)
    ys = labels(task, args.images, size, rng), labels(task, args.test_images, size, rng)
    common = {
        "task": task,
        "model": cfg.model,
        "image_size": size,
        "transfer_y": ys[0],
        "test_y": ys[1],
        "test_ids": np.arange(args.test_images).astype(str),
        "device": device,
    }
    settings = replace(ReadoutSettings.from_config(cfg.transfer), epochs=args.epochs or cfg.transfer.epochs)
    group = members(args.members, args.images, args.test_images, shape)
    out = {}
    start, train_seconds = time.perf_counter(), 0.0
    for m in group:
        result = train_readout(
            transfer_x=m.transfer_x, test_x=m.test_x, settings=replace(settings, seed=m.seed), **common
        )
        train_seconds += result.seconds
    _sync(device)
    out["1"] = len(group) * 3600 / (time.perf_counter() - start)
    roofline = bound(task, cfg, shape, settings, ys[0], args, train_seconds / len(group), device)
    for size in args.sizes:
        start = time.perf_counter()
        for i in range(0, len(group), size):
            train_stacked(members=group[i : i + size], settings=settings, **common)
        _sync(device)
        out[str(size)] = len(group) * 3600 / (time.perf_counter() - start)
        print(f"{target}: stacks of {size}: {out[str(size)] / out['1']:.2f}x one at a time", flush=True)
    return {k: round(v) for k, v in out.items()}, roofline


def bound(task, cfg, shape, settings, y, args, seconds: float, device: torch.device) -> dict[str, float]:
    """What limits stacking here: one readout's FLOP rate (training steps and the scoring of its
    validation and test images, over `seconds`) against a large matrix product's."""
    net = build_readout(task, shape[0], cfg.model, cfg.data.size, settings.width).to(device)
    b = min(settings.batch_size, len(y))
    x, target = torch.randn(b, *shape, device=device), label_tensor(y[:b], task, device)
    with FlopCounterMode(display=False) as forward:
        pred = net(x)
    with FlopCounterMode(display=False) as backward:
        task.per_image_loss(pred, target).mean().backward()
    fit = validation_split(args.images, settings.val_fraction, settings.split_seed)[0].size
    batch_sizes = [min(settings.batch_size, fit - i) for i in range(0, fit, settings.batch_size)]
    trained = settings.epochs * sum(n for n in batch_sizes if n > 1)  # a last batch of one is dropped
    scored = args.images - fit + args.test_images  # validation and test images
    per_image = (forward.get_total_flops() + backward.get_total_flops()) / b
    readout = (per_image * trained + forward.get_total_flops() / b * scored) / seconds / 1e9
    return {
        "step_gflop": round(per_image * min(settings.batch_size, fit) / 1e9, 3),
        "readout_gflops": round(readout, 1),
        "speedup_bound": round(matmul_gflops(device) / readout, 2),
    }


@functools.cache
def matmul_gflops(device: torch.device) -> float:
    """A 2048x2048 float32 matrix product's rate, the fastest of 9: the peak stacking aims at."""
    a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
    times = []
    for _ in range(9):
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / min(times) / 1e9


def stage2_seconds(args) -> float | None:
    """The quickstart's Stage II with stacks of 1 and of 16 on copies of one trained root."""
    if not args.stage2:
        return None
    exe = str(Path(sys.executable).parent / "taskatlas")
    with tempfile.TemporaryDirectory(prefix="taskatlas-stack-") as tmp:
        base = Path(tmp) / "base"
        run = [exe, "run", "-c", args.config, "--set", f"storage_root={base}", "--stages", "train"]
        subprocess.run(run, cwd=ROOT, check=True, capture_output=True)
        seconds = {}
        for stack in (1, 16):
            root = Path(tmp) / f"stack{stack}"
            shutil.copytree(base, root)
            cmd = [
                exe,
                "run",
                "-c",
                args.config,
                "--set",
                f"storage_root={root}",
                "--set",
                f"transfer.stack={stack}",
            ]
            start = time.perf_counter()
            subprocess.run([*cmd, "--stages", "train,transfer"], cwd=ROOT, check=True, capture_output=True)
            seconds[stack] = time.perf_counter() - start
            print(f"quickstart Stage II, transfer.stack={stack}: {seconds[stack]:.0f} s", flush=True)
    return round(seconds[1] / seconds[16], 3)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--members", type=int, default=8, help="readouts per target (default 8)")
    parser.add_argument("--sizes", default="4,8", help="stack sizes to measure (default 4,8)")
    parser.add_argument("--images", type=int, default=200, help="transfer images (a fifth validate)")
    parser.add_argument("--test-images", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=0, help="default: the study's transfer.epochs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stage2", action="store_true", help="also time the quickstart's Stage II both ways")
    parser.add_argument("-c", "--config", default="configs/quickstart.yaml")
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_pipeline_config(args.config)
    measured = {t: throughput(t, args, cfg, device) for t in TARGETS}
    per_hour = {t: rates for t, (rates, _) in measured.items()}
    speedup, best = {}, {}
    fit = validation_split(args.images, cfg.transfer.val_fraction, cfg.transfer.seed)[0].size
    for t, rates in per_hour.items():
        auto = auto_stack(get_task(t).kind, device.type == "cuda", fit, cfg.transfer.batch_size)
        size = str(min(auto, args.members))
        speedup[t] = round(rates[size] / rates["1"], 3) if size in rates else None
        best[t] = round(max(rates[s] for s in rates if s != "1") / rates["1"], 3)
    figures = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{args.threads} thread(s)",
        "members": args.members,
        "epochs": args.epochs or cfg.transfer.epochs,
        "per_hour": per_hour,
        "matmul_gflops": round(matmul_gflops(device), 1),
        "roofline": {t: roofline for t, (_, roofline) in measured.items()},
        "stacked_speedup": speedup,
        "best_speedup": best,
        "stage2_speedup": stage2_seconds(args),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
