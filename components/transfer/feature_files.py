"""Frozen encoders' features on disk: encoded once per (encoder, view, split) in blocks, a folder
complete once its marker names the attempt whose blocks it holds, and read back as arrays."""

from __future__ import annotations

import functools
import io
import json
import uuid
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from components.data.shards import ShardStore
from components.local_cache import cached_array
from components.models import ModelConfig
from components.storage import Location, location
from components.tasks import InputTransform
from components.training import iter_batches, pick_device
from components.transfer.features import FeatureSource, build_feature_module, encode_batch


class FeatureEncoder:
    """Callable over numpy batches (`image_id`, `rgb`): every (source, view) pair's features.

    Each encoder is loaded once however many views use it, and each image viewed once per view.
    A Ray Data actor, a plain loop or a test can run it. `log` (a test seam) gets one JSON line
    per (pair, batch) with the image ids it encoded.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[FeatureSource, InputTransform]],
        model: ModelConfig,
        use_gpu: bool,
        threads: int = 1,
        log: str | None = None,
    ):
        torch.set_num_threads(threads)
        self.device = pick_device(use_gpu)
        self.pairs, self.log = list(pairs), log
        sources = {s.key: s for s, _ in self.pairs}
        self.modules = {k: build_feature_module(s, model).to(self.device) for k, s in sources.items()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """-> {'image_id', 'f0', 'f1', ...}: column f<i> holds the features of pair i."""
        ids = [str(i) for i in batch["image_id"]]
        out = {"image_id": np.asarray(ids)}
        for view in dict.fromkeys(v for _, v in self.pairs):
            wanted = {f"f{i}": self.modules[s.key] for i, (s, v) in enumerate(self.pairs) if v is view}
            out |= encode_batch(wanted, batch["rgb"], ids, view, self.device)
        if self.log:
            lines = [json.dumps({"source": s.key, "view": v.value, "ids": ids}) for s, v in self.pairs]
            with open(self.log, "a") as f:
                f.write("\n".join(lines) + "\n")
        return out


def source_features(dirs: Sequence[str], split: str) -> tuple[np.ndarray, np.ndarray]:
    """Channel-wise concatenation of the sources' cached features, (N, sum C, h, w), and the ids."""
    ids = feature_array(dirs[0], split)[0]
    for d in dirs[1:]:
        if not np.array_equal(feature_array(d, split)[0], ids):
            raise RuntimeError(f"feature caches {dirs[0]} and {d} hold different {split} images")
    features = [feature_array(d, split)[1] for d in dirs]
    return np.concatenate(features, axis=1), np.asarray(ids)


FEATURES_DONE = "done.json"  # a feature folder's marker: which attempt's blocks are complete


@functools.lru_cache(maxsize=32)
def feature_array(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, features) of one split of a complete feature folder, rows sorted by id: joined from
    its blocks once per node into the local cache, then memory-mapped once per process (a worker
    runs many readouts)."""
    root = location(folder)
    attempt = (root / FEATURES_DONE).read_json()["attempt"]
    name, joined = f"{root.uri}/{attempt}/{split}", {}

    def save(part: int):
        def make(tmp: Path) -> None:
            if not joined:
                joined["ids"], joined["x"] = joined_blocks(root / attempt / split)
            with open(tmp, "wb") as f:
                np.save(f, joined["x" if part else "ids"])

        return make

    # the ids loaded before the features are made: the cache's bound may evict their entry then
    ids = cached_array(f"{name}.ids.npy", save(0))
    return ids, cached_array(f"{name}.npy", save(1), mmap=True)


def joined_blocks(blocks: Location) -> tuple[np.ndarray, np.ndarray]:
    """A split's blocks as one array sorted by image id (a retried batch's duplicates dropped)."""
    parts = []
    for f in sorted(blocks.files(), key=lambda f: f.name):
        try:
            with np.load(io.BytesIO(f.read_bytes()), allow_pickle=False) as block:
                parts.append((block["ids"], block["x"]))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            # The folder is no longer complete: its marker goes, so the next run encodes it again.
            (blocks.parent.parent / FEATURES_DONE).unlink(missing_ok=True)
            raise RuntimeError(
                f"feature block {f} is damaged ({type(err).__name__}: {err}); "
                "its features are encoded again on the next run"
            ) from None
    if not parts:
        raise RuntimeError(f"feature folder {blocks} holds no blocks")
    ids = np.concatenate([i for i, _ in parts]).astype(str)
    order = np.unique(ids, return_index=True)[1]  # sorted, first of duplicates
    return ids[order], np.concatenate([x for _, x in parts])[order]


class FeatureBlockWriter:
    """A callable over numpy batches (`image_id`, `rgb`, `split`) that encodes every
    (source, view) pair and writes each batch's features to storage itself, one block per pair
    and split, under `outs[i]` (pair i's attempt folder). Returns only the rows written, so no
    feature passes through the driver."""

    def __init__(self, outs: Sequence[str], **encoder_kwargs):
        self.outs = [location(o) for o in outs]
        self.encoder = FeatureEncoder(**encoder_kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        features = self.encoder(batch)
        splits = np.asarray(batch["split"]).astype(str)
        block = uuid.uuid4().hex
        names, rows = np.unique(splits, return_counts=True)
        for split in names:
            mine = splits == split
            for i, out in enumerate(self.outs):
                buf = io.BytesIO()
                np.savez(buf, ids=features["image_id"][mine], x=features[f"f{i}"][mine])
                (out / str(split) / f"{block}.npz").write_bytes(buf.getvalue())
        return {"split": names, "rows": rows}


def encode_shards(
    data_root: str, shards: Sequence[tuple[str, str]], batch_size: int, outs: Sequence[str], **encoder_kwargs
) -> dict[str, int]:
    """One worker's share of the feature pass: encode the (split, shard path) `shards` of the
    dataset at `data_root` with one `FeatureBlockWriter` (its encoders loaded once), batch by
    batch; returns the rows written per split."""
    store = ShardStore(data_root)
    infos = {(info.split, info.path): info for info in store.manifest.shards}
    writer = FeatureBlockWriter(outs, **encoder_kwargs)
    rows: dict[str, int] = {}
    for split, path in shards:
        data = store.read_shard(infos[split, path], ["rgb"])
        for batch in iter_batches(data, batch_size):
            written = writer({**batch, "split": np.full(len(batch["image_id"]), split)})
            for name, n in zip(written["split"], written["rows"], strict=True):
                rows[str(name)] = rows.get(str(name), 0) + int(n)
    return rows
