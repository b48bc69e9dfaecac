"""Stage II's feature cache: every frozen encoder's features of the transfer and test images,
computed once per (encoder, data version, input view) and reused by every readout and run.

    <root>/features/<encoder key>/<data version>/<view>/<attempt>/<split>/<block>.npz
    <root>/features/<encoder key>/<data version>/<view>/done.json     (names the attempt; last)

One pass over both splits runs every encoder whose features are missing: a few Ray tasks, each
with a share of the shards, load the encoders once, read each image once per view and write
their blocks to storage themselves (`feature_files.encode_shards`); the driver sees row counts only,
then writes each folder's marker. Readouts join a folder's blocks once per node (`feature_files.feature_array`).

The encoder key is its checkpoint's hash, so each network replicate of a task (`train.replicates`)
has folders of its own; `ensure_replicates` encodes what every replicate misses in the same pass.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import ray

from components.data.shards import ShardStore
from components.storage import Location
from components.tasks import InputTransform
from components.transfer import FeatureSource, ReadoutKind, TransferPlan
from components.transfer.feature_files import FEATURES_DONE, encode_shards
from pipelines.config import PipelineConfig
from pipelines.ray_runtime import cluster_cpus, cluster_gpus

SPLITS = ("transfer", "test")
_ENCODE = ray.remote(encode_shards)


def complete(folder: Location) -> bool:
    """The folder's marker exists and names its attempt. One that is empty or invalid is named in
    one line and removed, so the folder is encoded again (a readout would fail on it)."""
    marker = folder / FEATURES_DONE
    if not marker.exists():
        return False
    try:
        info = marker.read_json()
        if not (isinstance(info, dict) and isinstance(info.get("attempt"), str) and info["attempt"]):
            raise ValueError("names no attempt")
    except (OSError, ValueError) as err:
        why = f"taskatlas: {marker} cannot be read ({err}); its features are encoded again"
        print(why, file=sys.stderr, flush=True)
        marker.unlink(missing_ok=True)
        return False
    return True


@dataclass
class FeatureCache:
    config: PipelineConfig
    store: ShardStore
    use_gpu: bool
    encode_log: Path | None = None  # test seam: one JSON line per (pair, batch) encoded

    def folder(self, source: FeatureSource, view: InputTransform) -> Location:
        return self.config.root / "features" / source.key / self.store.data_version / view.value

    def ensure(self, sources: Mapping[str, FeatureSource], plan: TransferPlan) -> dict[tuple[str, str], str]:
        """(source name, view) -> its complete cache folder's URI, encoding whatever is missing.
        `sources`: every feature source by name (`stage2.plan.feature_sources`)."""
        return self.ensure_replicates([sources], plan)[0]

    def ensure_replicates(
        self, replicates: Sequence[Mapping[str, FeatureSource]], plan: TransferPlan
    ) -> list[dict[tuple[str, str], str]]:
        """`ensure` for each network replicate's feature sources (item n: the sources of network
        replicate n), in one pass over the images for all that is missing: item n of the answer
        is replicate n's (source name, view) -> folder URI (`random` and `pixels`, the same in
        every replicate, are encoded once)."""
        kinds = {r.kind for r in plan.baselines}
        baselines = {k.value for k in (ReadoutKind.RANDOM, ReadoutKind.PIXELS)}
        views = sorted({self.config.task(t).input for t in plan.targets}, key=lambda v: v.value)
        out, missing = [], {}
        for sources in replicates:
            names = [n for n in sources if (ReadoutKind(n) in kinds if n in baselines else n in plan.sources)]
            folders = {(n, v.value): self.folder(sources[n], v) for n in names for v in views}
            for (n, v), f in folders.items():
                if f.uri not in missing and not complete(f):
                    missing[f.uri] = (sources[n], InputTransform(v))
            out.append({k: f.uri for k, f in folders.items()})
        if missing:
            self.encode(list(missing.values()))
        return out

    def encode(self, pairs: list[tuple[FeatureSource, InputTransform]]) -> None:
        """One pass over both splits for every pair, as Ray tasks that each take a share of the
        shards, load the encoders once and write their blocks themselves (plain tasks on pooled
        workers: a Ray Data pipeline cost ~10 s of start-up here, for seconds of encoding)."""
        attempt = uuid.uuid4().hex[:12]
        folders = [self.folder(s, v) for s, v in pairs]
        gpus = cluster_gpus() if self.use_gpu else 0
        shards = [(split, info.path) for split in SPLITS for info in self.store.shards(split)]
        for split in SPLITS:  # checked here first, so a bad shard fails in one line, before any work
            self.store.shard_paths(split)
        workers = max(1, min(gpus or min(cluster_cpus(), 8), len(shards)))
        task = _ENCODE.options(num_cpus=1, num_gpus=1 if gpus else 0)
        refs = [
            task.remote(
                self.store.root.uri,
                shards[i::workers],
                self.config.transfer.encode_batch_size,
                [(f / attempt).uri for f in folders],
                pairs=pairs,
                model=self.config.model,
                use_gpu=gpus > 0,
                log=str(self.encode_log) if self.encode_log else None,
            )
            for i in range(workers)
        ]
        rows = dict.fromkeys(SPLITS, 0)
        for written in ray.get(refs):
            for split, n in written.items():
                rows[split] += n
        counts = self.store.manifest.counts
        if missed := {s: counts[s] - rows[s] for s in SPLITS if rows[s] < counts[s]}:
            raise RuntimeError(f"the feature pass missed images: {missed}")
        for (source, view), folder in zip(pairs, folders, strict=True):
            if complete(folder):  # another run finished it first: keep its blocks
                continue
            info = {**asdict(source), "view": view.value, "attempt": attempt, "rows": rows}
            (folder / FEATURES_DONE).write_json(info)
