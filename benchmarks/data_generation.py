"""Images per second of the synthetic scene generator, on one core.

    .venv/bin/python benchmarks/data_generation.py            # about a minute
    .venv/bin/python benchmarks/data_generation.py --images 512 --repeats 5

Measures scene sampling + ray casting + every annotation (the whole `render_images` path) at
sizes 32, 64 and 128, and the end-to-end rate with Parquet shard writing at 64. Median of
`--repeats` runs. Last line: one JSON object.
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one core: the figure is per core (set before numpy loads)

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from components.data.scenes import SceneConfig  # noqa: E402
from components.data.synthetic import DatasetConfig, generate_dataset, render_images  # noqa: E402


def rate(fn, images: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return images / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = {}
    for size in (32, 64, 128):
        n = args.images if size <= 64 else args.images // 4
        config = DatasetConfig(seed=0, scene=SceneConfig(size=size))
        render_images(config, "train", 0, 8)  # warm-up
        result[f"images_per_s_per_core_{size}"] = round(
            rate(lambda c=config, n=n: render_images(c, "train", 0, n), n, args.repeats), 1
        )
        print(f"size {size}: {result[f'images_per_s_per_core_{size}']} images/s (render + all annotations)")
    n = args.images
    config = DatasetConfig(n_train=n, n_transfer=0, n_test=0, rows_per_shard=256, scene=SceneConfig(size=64))

    def write() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            generate_dataset(f"{tmp}/ds", config)

    result["images_per_s_per_core_64_with_parquet"] = round(rate(write, n, args.repeats), 1)
    print(f"size 64 with Parquet shards: {result['images_per_s_per_core_64_with_parquet']} images/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
