"""Readouts per hour: one readout at a time (a Ray task each, today's `transfer.stack: 1`) against
stacks of N readouts trained as one model (`components.transfer.train_stacked`), on the same
members, with plain components (no Ray, no MLflow), so it also runs on a bare GPU machine:

    .venv/bin/python benchmarks/readout_throughput.py                  # CPU, quickstart shapes, ~2 min
    .venv/bin/python benchmarks/readout_throughput.py --device cuda --members 64 --sizes 8,16,32,64
    .venv/bin/python benchmarks/readout_throughput.py --stage2         # also the quickstart's Stage II both ways

Members are a target's first-order readouts as Stage II stacks them: features shaped like the
quickstart's cache ((N, 8, 8, 8) float16 for 32x32 images), one per member, each with its own
seed, 200 transfer and 200 test images, `transfer.epochs` 6, batch 32, width 64, one thread each
on a CPU (as a Ray task with `cpus_per_readout: 1` runs). Two targets: `normal` (a pixel decoder)
and `class_object` (a vector head). Figures on the last line, one JSON object:
- `per_hour`: {target: {"1": readouts/hour one at a time, "N": stacked in stacks of N}};
- `stacked_speedup`: per target, stacked at the default stack size for this device and target
  (`transfer.stack: 0`: 16, but 1 for pixel targets on CPUs) over one at a time, and
  `best_speedup` at the best size measured;
- `stage2_speedup` (with `--stage2`): the quickstart's Stage II wall time with `transfer.stack: 1`
  over `transfer.stack: 16`, both on the same trained networks (`taskatlas run --stages transfer`
  on two copies of one storage root), else null.
"""

from __future__ import annotations

import argparse
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

from components.models import ModelConfig  # noqa: E402
from components.tasks import TaskKind, get_task  # noqa: E402
from components.transfer import ReadoutSettings, StackMember, train_readout, train_stacked  # noqa: E402

TARGETS = ("normal", "class_object")
AUTO_STACK = 16  # pipelines/stage2_plan.py: `transfer.stack: 0`


def labels(task, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    shape = (n, *task.output_shape(size, task.channels))
    return (
        rng.random(shape).astype(np.float32)
        if task.kind is TaskKind.PIXEL
        else rng.integers(0, 2, shape).astype(np.float32)
    )


def members(n: int, images: int, seed: int = 0) -> list[StackMember]:
    rng = np.random.default_rng(seed)
    feats = lambda: rng.standard_normal((images, 8, 8, 8)).astype(np.float16)  # noqa: E731
    return [StackMember(feats(), feats(), seed=i) for i in range(n)]


def throughput(target: str, args, device: torch.device) -> dict[str, float]:
    task, rng = get_task(target), np.random.default_rng(1)
    model = ModelConfig(width=16, representation_channels=8, downsample=4)
    ys = labels(task, args.images, 32, rng), labels(task, args.images, 32, rng)
    common = {
        "task": task,
        "model": model,
        "image_size": 32,
        "transfer_y": ys[0],
        "test_y": ys[1],
        "test_ids": np.arange(args.images).astype(str),
        "device": device,
    }
    settings = ReadoutSettings(epochs=args.epochs, batch_size=32, width=64)
    group = members(args.members, args.images)
    out = {}
    start = time.perf_counter()
    for m in group:
        train_readout(
            transfer_x=m.transfer_x, test_x=m.test_x, settings=replace(settings, seed=m.seed), **common
        )
    _sync(device)
    out["1"] = len(group) * 3600 / (time.perf_counter() - start)
    for size in args.sizes:
        start = time.perf_counter()
        for i in range(0, len(group), size):
            train_stacked(members=group[i : i + size], settings=settings, **common)
        _sync(device)
        out[str(size)] = len(group) * 3600 / (time.perf_counter() - start)
        print(f"{target}: stacks of {size}: {out[str(size)] / out['1']:.2f}x one at a time", flush=True)
    return {k: round(v) for k, v in out.items()}


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
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stage2", action="store_true", help="also time the quickstart's Stage II both ways")
    parser.add_argument("-c", "--config", default="configs/quickstart.yaml")
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    per_hour = {t: throughput(t, args, device) for t in TARGETS}
    speedup, best = {}, {}
    for t, rates in per_hour.items():
        auto = 1 if get_task(t).kind is TaskKind.PIXEL and device.type == "cpu" else AUTO_STACK
        size = str(min(auto, args.members))
        speedup[t] = round(rates[size] / rates["1"], 3) if size in rates else None
        best[t] = round(max(rates[s] for s in rates if s != "1") / rates["1"], 3)
    figures = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{args.threads} thread(s)",
        "members": args.members,
        "epochs": args.epochs,
        "per_hour": per_hour,
        "stacked_speedup": speedup,
        "best_speedup": best,
        "stage2_speedup": stage2_seconds(args),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
