"""Stage II speed: readouts on cached features vs re-encoding, and the fan-out's parallel efficiency.

    .venv/bin/python benchmarks/transfer_fanout.py                       # ~3 minutes on 2 cores
    .venv/bin/python benchmarks/transfer_fanout.py --readouts 32 --images 256

(a) `cached_speedup`: one readout trained on cached features vs the same readout re-encoding
    every batch with the frozen encoder (what a pipeline without the cache does every epoch),
    median of --repeats, one thread each. Measured for the Taskonomy encoder (ResNet-50, the
    headline figure) and for the quickstart's small encoder, whose forward pass is so cheap that
    caching barely matters there; the readout's decoder dominates either way.
(b) `fanout_efficiency`: wall time of --readouts real readout tasks (`run_readout` as Stage II
    submits it, on cached features) with one worker, divided by workers x the wall time with
    every core, each task one thread; Ray workers are warmed up first.
With a GPU, (c) readouts per hour on one GPU packed `1/gpus_per_readout` at a time vs one at a
time. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from a checkout, installed or not
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported: loopback only

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from components.data.scenes import SceneConfig  # noqa: E402
from components.data.shards import ShardStore  # noqa: E402
from components.data.synthetic import DatasetConfig, generate_dataset  # noqa: E402
from components.models import EncoderKind, ModelConfig  # noqa: E402
from components.storage import location  # noqa: E402
from components.tasks import InputTransform, get_task  # noqa: E402
from components.training import pick_device  # noqa: E402
from components.transfer import FeatureKind, FeatureSource, Readout, ReadoutSettings, train_readout  # noqa: E402
from components.transfer.feature_files import FEATURES_DONE, encode_shards  # noqa: E402
from components.transfer.features import encode_batch, random_encoder  # noqa: E402
from components.transfer.jobs import ReadoutJob, run_readout  # noqa: E402

SIZE = 32
TARGET = "normal"
ENCODERS = {
    "resnet50": ModelConfig(encoder=EncoderKind.RESNET, resnet_depth=50, width=16, downsample=4),
    "small": ModelConfig(width=16, downsample=4),  # configs/quickstart.yaml
}


def cached_vs_reencode(model: ModelConfig, images: int, epochs: int, repeats: int) -> dict:
    """Seconds of one readout on cached features and re-encoding each batch (median of repeats)."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (images, 3, SIZE, SIZE), dtype=np.uint8)
    labels = rng.random((images, 3, SIZE, SIZE)).astype(np.float16)
    device = pick_device(use_gpu=True)
    encoder, ids = random_encoder(model, 0).to(device), [str(i) for i in range(images)]
    start = time.perf_counter()
    cached = encode_batch({"f": encoder}, rgb, ids, InputTransform.NONE, device)["f"]
    encode_s = time.perf_counter() - start
    common = {
        "task": get_task(TARGET),
        "model": model,
        "image_size": SIZE,
        "transfer_y": labels,
        "test_y": labels,
        "test_ids": np.arange(images),
        "settings": ReadoutSettings(epochs=epochs),
        "device": device,
    }
    runs = {
        "cached": lambda: train_readout(transfer_x=cached, test_x=cached, **common),
        "reencode": lambda: train_readout(
            transfer_x=rgb, test_x=rgb, featurize=lambda x: encoder(x / 255.0), **common
        ),
    }
    for run in runs.values():
        run()  # warm-up
    seconds = {k: statistics.median(run().seconds for _ in range(repeats)) for k, run in runs.items()}
    return {**seconds, "encode_once_s": encode_s, "speedup": seconds["reencode"] / seconds["cached"]}


def _feature_cache(store: ShardStore, model: ModelConfig, folder: Path) -> str:
    """Cached `random`-encoder features of both splits, written by Stage II's own feature pass
    code (`feature_files.encode_shards`) and marked complete as Stage II marks them."""
    pairs = [(FeatureSource("random", FeatureKind.RANDOM, "random"), InputTransform.NONE)]
    shards = [(i.split, i.path) for i in store.manifest.shards if i.split in ("transfer", "test")]
    attempt = "bench"
    encode_shards(
        str(store.root),
        shards,
        256,
        [str(folder / attempt)],
        pairs=pairs,
        model=model,
        use_gpu=False,
    )
    location(folder / FEATURES_DONE).write_json({"attempt": attempt})
    return str(folder)


def fanout(
    store: ShardStore, workdir: Path, readouts: int, epochs: int, use_gpu: bool, gpu_share: float
) -> dict:
    """Wall seconds of `readouts` readout tasks one at a time vs packed onto every slot."""
    model = ENCODERS["small"]
    features = _feature_cache(store, model, workdir / "features")
    job = ReadoutJob(
        readout=Readout(TARGET, ("random",)),
        task=get_task(TARGET),
        feature_dirs=(features,),
        data_root=str(store.root),
        model=model,
        image_size=SIZE,
        channels=get_task(TARGET).channels,
        settings=ReadoutSettings(epochs=epochs),
        path=str(workdir / "stage" / "readout.parquet"),
        use_gpu=use_gpu,
        threads=1,
    )
    remote = ray.remote(run_readout)
    cpus = int(ray.cluster_resources()["CPU"])
    if use_gpu:
        one, packed = {"num_cpus": 1, "num_gpus": 1}, {"num_cpus": 1, "num_gpus": gpu_share}
        workers = min(cpus, int(1 / gpu_share))
    else:
        one, packed, workers = {"num_cpus": cpus}, {"num_cpus": 1}, cpus

    def wall(options: dict, n: int) -> float:
        start = time.perf_counter()
        ray.get([remote.options(**options).remote(job) for _ in range(n)])
        return time.perf_counter() - start

    wall(packed, workers)  # warm-up: start every worker process once
    load = os.getloadavg()[0]  # other work on the machine skews (b): reported with it
    serial = wall(one, readouts)
    parallel = wall(packed, readouts)
    return {
        "load_avg_1m_before": load,
        "workers": workers,
        "readouts": readouts,
        "serial_s": serial,
        "parallel_s": parallel,
        "efficiency": serial / (parallel * workers),
        "readouts_per_hour_one_at_a_time": 3600 * readouts / serial,
        "readouts_per_hour_packed": 3600 * readouts / parallel,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128, help="transfer images per readout")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the cached/re-encode readouts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--readouts", type=int, default=0, help="fan-out size (default: 4 per worker)")
    parser.add_argument("--fanout-epochs", type=int, default=6)
    parser.add_argument("--gpu-share", type=float, default=0.25, help="GPU fraction per readout (GPU only)")
    args = parser.parse_args()

    report: dict = {}
    for name, model in ENCODERS.items():
        r = cached_vs_reencode(model, args.images, args.epochs, args.repeats)
        report[name] = r
        print(
            f"(a) {name:>8} encoder: readout {r['cached']:.2f} s on cached features, {r['reencode']:.2f} s "
            f"re-encoding every batch -> {r['speedup']:.1f}x (encoding once: {r['encode_once_s']:.2f} s)"
        )

    use_gpu = torch.cuda.is_available()
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        config = DatasetConfig(n_train=0, n_transfer=args.images, n_test=64, scene=SceneConfig(size=SIZE))
        generate_dataset(data, config)
        store = ShardStore(data)
        workers = int(ray.cluster_resources()["CPU"])
        n = args.readouts or 4 * (min(workers, int(1 / args.gpu_share)) if use_gpu else workers)
        f = fanout(store, Path(tmp), n, args.fanout_epochs, use_gpu, args.gpu_share)
    ray.shutdown()
    print(
        f"(b) fan-out of {f['readouts']} readouts: {f['serial_s']:.1f} s with 1 worker, {f['parallel_s']:.1f} s "
        f"with {f['workers']} -> efficiency {f['efficiency']:.2f} of linear "
        f"(load average before: {f['load_avg_1m_before']:.1f} on {os.cpu_count()} cores)"
    )
    if use_gpu:
        print(
            f"(c) one GPU: {f['readouts_per_hour_packed']:.0f} readouts/h packed {1 / args.gpu_share:.0f} at a "
            f"time vs {f['readouts_per_hour_one_at_a_time']:.0f} one at a time"
        )
    result = {
        "cached_speedup": round(report["resnet50"]["speedup"], 2),
        "cached_speedup_small_encoder": round(report["small"]["speedup"], 2),
        "readout_cached_s": round(report["resnet50"]["cached"], 3),
        "readout_reencode_s": round(report["resnet50"]["reencode"], 3),
        "fanout_efficiency": round(f["efficiency"], 3),
        "fanout_workers": f["workers"],
        "fanout_readouts": f["readouts"],
        "fanout_serial_s": round(f["serial_s"], 2),
        "fanout_parallel_s": round(f["parallel_s"], 2),
        "load_avg_1m_before_fanout": round(f["load_avg_1m_before"], 2),
        "gpu": torch.cuda.get_device_name() if use_gpu else None,
    }
    if use_gpu:
        result["gpu_readouts_per_hour_packed"] = round(f["readouts_per_hour_packed"])
        result["gpu_readouts_per_hour_one_at_a_time"] = round(f["readouts_per_hour_one_at_a_time"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
