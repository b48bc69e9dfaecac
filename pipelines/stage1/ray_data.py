"""Ray Data over the shard store, for distributed training (Stage I).

Shards are verified (schema and checksum, by `ShardStore`) before Ray reads a byte of them, so a
corrupt shard fails the job up front with the shard's name instead of mid-epoch on a worker.
"""

from __future__ import annotations

import ray.data

from components.data.shards import ShardStore


def ray_dataset(store: ShardStore, split: str, columns: list[str]) -> ray.data.Dataset:
    """A Ray Dataset of `split` with `image_id` and the given columns (numpy batches keep shapes)."""
    for name in columns:
        store.manifest.column(name)  # fails early, naming the column, if the dataset lacks it
    paths = [p.path for p in store.shard_paths(split)]
    data = ray.data.read_parquet(paths, filesystem=store.root.fs)  # local or object storage alike
    return data.select_columns(["image_id", *columns])
