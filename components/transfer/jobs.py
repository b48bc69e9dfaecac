"""One unit of Stage II work as a plain function over files, for any executor to run.

A readout job reads cached features and the dataset's labels, trains, and writes its per-image
test losses to one Parquet file *itself*, whole (`Location.write_bytes`): a finished readout is
in storage even if whoever launched it dies, so a rerun never repeats it. Every execution also
notes `start` and `done` in the readout's attempt log (retries show there).

Readouts are stored by their own key, `<root>/readouts/<target>/<sources>.<key>.parquet`, the
key hashing everything that determines the result (the target's task definition, the sources'
feature keys, the readout settings, the data): any study that needs the same readout finds it,
so adding a task to a finished study trains only the readouts that involve it.

Feature cache folders are written by the encoders themselves, one block per batch
(`<attempt>/<split>/<block>.npz`: `ids`, `x` (B, C, h, w) float16), complete once `done.json`
names the attempt. A reader joins a split's blocks once per node into the bounded local cache
(`components.local_cache`), rows sorted by image id, so features of several sources and the
labels line up by position, memory-mapped.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import sys
import time
import uuid
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from components.data.shards import ShardStore
from components.local_cache import cached_array
from components.models import ModelConfig, build_network, representation_shape
from components.storage import Location, location
from components.tasks import InputTransform, Loss, Task
from components.training import iter_batches, nanmean, pick_device
from components.transfer.features import FeatureSource, build_feature_module, encode_batch, load_state_dict
from components.transfer.plan import Readout, ReadoutKind
from components.transfer.readout import ReadoutSettings, score_network, train_readout
from components.transfer.scratch import train_scratch
from components.transfer.stacked import StackMember, train_stacked
from components.vocabulary import IMAGE_ID, LOSS, REPLICATE, SOURCES, TARGET

LOSS_SCHEMA = pa.schema(
    [
        (TARGET, pa.string()),
        (SOURCES, pa.list_(pa.string())),
        (IMAGE_ID, pa.string()),
        (LOSS, pa.float32()),
        (REPLICATE, pa.int32()),  # which training of the readout (design.md section 10)
    ]
)
_META = b"taskatlas"  # readout file metadata: mean loss, seconds, training history


@dataclass(frozen=True)
class ReadoutJob:
    """Everything one readout needs, in one picklable value."""

    readout: Readout
    task: Task  # the target
    feature_dirs: tuple[str, ...]  # one cache folder (URI) per source, in the readout's source order
    # (none for `self`, which scores the target's own network, saved at `checkpoint`)
    data_root: str
    model: ModelConfig
    image_size: int
    channels: int
    settings: ReadoutSettings
    path: str  # the readout's loss file's URI (`readout_path`); its attempt log lies beside it
    use_gpu: bool
    threads: int
    fail: bool = False  # test seam: raise on every attempt
    checkpoint: str = ""  # `self`: the URI of the target's Stage I network (a state dict)


@dataclass(frozen=True)
class ReadoutOutcome:
    readout: Readout
    mean_loss: float  # over the test images
    seconds: float
    train_losses: tuple[float, ...] = ()
    val_loss: float = float("nan")  # over the transfer split's validation part: ranks beams
    started: float = 0.0  # when the job began and ended (epoch seconds): the MLflow run's times
    finished: float = 0.0


def readout_path(root: Location, readout: Readout, key: str) -> Location:
    """Where the readout with this key stores its per-image losses, under the storage root."""
    return root / "readouts" / readout.target / f"{'+'.join(readout.sources)}.{key}.parquet"


def attempts_path(path: str | Location) -> Location:
    """The attempt log beside a readout's loss file: a file locally, a folder of one object per
    event on object storage (which cannot append)."""
    loc = path if isinstance(path, Location) else location(path)
    return loc.with_name(loc.name.removesuffix(".parquet") + ".attempts.log")


def attempt_events(path: str | Location) -> list[str]:
    """The events (`start`, `done`) noted for a readout, in order."""
    log = attempts_path(path)
    if log.is_local:
        return log.read_text().split()[::3] if log.exists() else []
    return [f.name.split("-")[-1] for f in sorted(log.files(), key=lambda f: f.name)]


def note_attempt(readout_file: str, event: str) -> None:
    log = attempts_path(readout_file)
    if log.is_local:
        log.local_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(log.local_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)  # a log: owner only
        with os.fdopen(fd, "a") as f:
            f.write(f"{event} {os.getpid()} {time.time():.3f}\n")
    else:
        (log / f"{time.time():.6f}-{os.getpid()}-{event}").write_bytes(b"")


def run_readout(job: ReadoutJob) -> ReadoutOutcome:
    """Train one readout on cached features, store its per-image test losses, return a summary."""
    r, task, started = job.readout, job.task, time.time()
    note_attempt(job.path, "start")
    if job.fail:
        raise RuntimeError(f"injected failure of readout {r.name} (a test's fault seam)")
    torch.set_num_threads(job.threads)
    if r.kind is ReadoutKind.SELF:
        return _score_self(job, started)
    if r.kind is ReadoutKind.SCRATCH:
        return _train_scratch(job, started)
    train_x, train_ids = source_features(job.feature_dirs, "transfer")
    test_x, test_ids = source_features(job.feature_dirs, "test")
    result = train_readout(
        task=task,
        model=job.model,
        image_size=job.image_size,
        transfer_x=train_x,
        transfer_y=_labels(job.data_root, "transfer", task.column, train_ids),
        test_x=test_x,
        test_y=_labels(job.data_root, "test", task.column, test_ids),
        test_ids=test_ids,
        settings=job.settings,
        device=pick_device(job.use_gpu),
        channels=job.channels,
    )
    return _store(job.path, r, result, started)


def train_model(job: ReadoutJob) -> tuple[dict, int, float]:
    """The readout of `job` trained with its weights kept: (state dict, input channels, mean test
    loss). With replicate 0's job it retrains that readout exactly (same seed, data and order)."""
    torch.set_num_threads(job.threads)
    train_x, train_ids = source_features(job.feature_dirs, "transfer")
    test_x, test_ids = source_features(job.feature_dirs, "test")
    result = train_readout(
        task=job.task,
        model=job.model,
        image_size=job.image_size,
        transfer_x=train_x,
        transfer_y=_labels(job.data_root, "transfer", job.task.column, train_ids),
        test_x=test_x,
        test_y=_labels(job.data_root, "test", job.task.column, test_ids),
        test_ids=test_ids,
        settings=job.settings,
        device=pick_device(job.use_gpu),
        channels=job.channels,
        keep=True,
    )
    return result.weights, int(train_x.shape[1]), result.mean_loss


@dataclass(frozen=True)
class StackJob:
    """Readouts into one target trained as one stacked model (design.md section 13): first-order
    sources x replicates, or one higher order's source sets x replicates. Every member is a whole
    `ReadoutJob` (its own features, seed and loss file); members must differ only in those."""

    members: tuple[ReadoutJob, ...]

    @property
    def name(self) -> str:
        first = self.members[0].readout
        return f"{len(self.members)} readouts -> {first.target}"


@dataclass(frozen=True)
class StackOutcome:
    """What a stack did: the members it trained (or found stored) and those that failed."""

    outcomes: tuple[ReadoutOutcome, ...]
    failed: tuple[tuple[Readout, str], ...] = ()


def run_stack(job: StackJob) -> StackOutcome:
    """Train a stack's members that are not stored yet, as one model per input shape, and store
    each member's losses itself: a member is written once, so a retried or resumed stack skips
    what is done (exactly once per member). A member that diverges is retried alone by
    `train_stacked`, and reported failed if it diverges again; the others are kept. A member
    with the `fail` seam raises after the others are stored."""
    first, started = job.members[0], time.time()
    torch.set_num_threads(first.threads)
    done, todo = [], []
    for m in job.members:
        stored = stored_outcome(location(m.path), m.readout)
        (done.append(stored) if stored is not None else todo.append(m))
    failed: list[tuple[Readout, str]] = []
    by_shape: dict[tuple, list[tuple[ReadoutJob, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]] = {}
    for m in todo:
        note_attempt(m.path, "start")
        if m.fail:
            continue
        train_x, train_ids = source_features(m.feature_dirs, "transfer")
        test_x, test_ids = source_features(m.feature_dirs, "test")
        by_shape.setdefault(train_x.shape[1:], []).append((m, train_x, train_ids, test_x, test_ids))
    for group in by_shape.values():  # every member's features hold the same images, by id
        m0, _, train_ids, _, test_ids = group[0]
        for m, _, a, _, b in group[1:]:
            if not (np.array_equal(a, train_ids) and np.array_equal(b, test_ids)):
                raise RuntimeError(
                    f"features of {m.readout.name} and {m0.readout.name} hold different images"
                )
        common = {
            "task": m0.task,
            "model": m0.model,
            "image_size": m0.image_size,
            "transfer_y": _labels(m0.data_root, "transfer", m0.task.column, train_ids),
            "test_y": _labels(m0.data_root, "test", m0.task.column, test_ids),
            "test_ids": test_ids,
            "device": pick_device(m0.use_gpu),
            "channels": m0.channels,
        }
        if len(group) == 1:  # a stack of one is the plain readout (`transfer.stack: 1`)
            m, tx, _, sx, _ = group[0]
            results = [train_readout(transfer_x=tx, test_x=sx, settings=m.settings, **common)]
        else:
            members = [StackMember(tx, sx, m.settings.seed) for m, tx, _, sx, _ in group]
            results = train_stacked(members=members, settings=m0.settings, **common)
        for (m, *_), result in zip(group, results, strict=True):
            if result is None:
                failed.append((m.readout, f"readout {m.readout.name} diverged (non-finite loss), alone too"))
                continue
            done.append(_store(m.path, m.readout, result, started))
    if seams := [m.readout.name for m in todo if m.fail]:
        raise RuntimeError(f"injected failure of readout {', '.join(seams)} (a test's fault seam)")
    return StackOutcome(tuple(done), tuple(failed))


def _store(path: str, readout: Readout, result, started: float) -> ReadoutOutcome:
    """A trained readout's (or `scratch`'s) result as its stored loss file, then `done` in its log."""
    outcome = ReadoutOutcome(
        readout, result.mean_loss, result.seconds, result.train_losses, result.val_loss, started, time.time()
    )
    write_readout(location(path), outcome, result.image_ids, result.losses)
    note_attempt(path, "done")
    return outcome


def _score_self(job: ReadoutJob, started: float) -> ReadoutOutcome:
    """The `self` baseline: the target's fully supervised network on the test images, with the
    readouts' inputs (view per image id), labels, loss, device and precision."""
    start = time.perf_counter()
    task, device = job.task, pick_device(job.use_gpu)
    net = build_network(task, job.model, job.image_size, job.channels)
    net.load_state_dict(load_state_dict(job.checkpoint))
    ids, rgb = _split_labels(job.data_root, "test", "rgb")
    losses = score_network(
        net.to(device), rgb, ids, _labels(job.data_root, "test", task.column, ids), task, device
    )
    outcome = ReadoutOutcome(
        job.readout, nanmean(losses), time.perf_counter() - start, started=started, finished=time.time()
    )
    write_readout(location(job.path), outcome, ids, losses)
    note_attempt(job.path, "done")
    return outcome


def _train_scratch(job: ReadoutJob, started: float) -> ReadoutOutcome:
    """The `scratch` baseline: the target's architecture trained from random weights on the
    readouts' images and labels (`components.transfer.scratch`)."""
    task = job.task
    transfer_ids, transfer_rgb = _split_labels(job.data_root, "transfer", "rgb")
    test_ids, test_rgb = _split_labels(job.data_root, "test", "rgb")
    result = train_scratch(
        task=task,
        model=job.model,
        image_size=job.image_size,
        transfer_rgb=transfer_rgb,
        transfer_ids=transfer_ids,
        transfer_y=_labels(job.data_root, "transfer", task.column, transfer_ids),
        test_rgb=test_rgb,
        test_ids=test_ids,
        test_y=_labels(job.data_root, "test", task.column, test_ids),
        settings=job.settings,
        device=pick_device(job.use_gpu),
        channels=job.channels,
    )
    return _store(job.path, job.readout, result, started)


def calibrate_readout(job: ReadoutJob, n_images: int, n_transfer: int, n_test: int) -> float:
    """Seconds one readout shaped like `job` takes here, from 1- and 2-epoch runs on random data."""
    torch.set_num_threads(job.threads)
    task = job.task
    c, h, w = representation_shape(job.model, job.image_size)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n_images, c, h, w)).astype(np.float16)
    y_shape = (n_images, *task.output_shape(job.image_size, job.channels))
    if task.loss is Loss.CROSS_ENTROPY:  # class indices per pixel
        y = rng.integers(0, job.channels, (n_images, *y_shape[2:]))
    else:
        y = rng.random(y_shape).astype(np.float16)
    seconds = []
    for epochs in (1, 2):
        result = train_readout(
            task=task,
            model=job.model,
            image_size=job.image_size,
            transfer_x=x,
            transfer_y=y,
            test_x=x,
            test_y=y,
            test_ids=np.arange(n_images),
            settings=replace(job.settings, epochs=epochs),
            device=pick_device(job.use_gpu),
            channels=job.channels,
        )
        seconds.append(result.seconds)
    per_image_epoch = max(seconds[1] - seconds[0], 1e-6) / n_images
    eval_per_image = max(seconds[0] - per_image_epoch * n_images, 0.0) / n_images
    return per_image_epoch * n_transfer * job.settings.epochs + eval_per_image * n_test


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
        random_seed: int,
        use_gpu: bool,
        threads: int = 1,
        log: str | None = None,
    ):
        torch.set_num_threads(threads)
        self.device = pick_device(use_gpu)
        self.pairs, self.log = list(pairs), log
        sources = {s.key: s for s, _ in self.pairs}
        self.modules = {
            k: build_feature_module(s, model, random_seed).to(self.device) for k, s in sources.items()
        }

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
                joined["ids"], joined["x"] = _joined(root / attempt / split)
            with open(tmp, "wb") as f:
                np.save(f, joined["x" if part else "ids"])

        return make

    # the ids loaded before the features are made: the cache's bound may evict their entry then
    ids = cached_array(f"{name}.ids.npy", save(0))
    return ids, cached_array(f"{name}.npy", save(1), mmap=True)


def _joined(blocks: Location) -> tuple[np.ndarray, np.ndarray]:
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


def write_readout(path: Location, outcome: ReadoutOutcome, ids: np.ndarray, losses: np.ndarray) -> None:
    """Whole: a stored readout is always a complete one."""
    r, n = outcome.readout, len(ids)
    table = pa.table(
        {
            "target": [r.target] * n,
            "sources": [list(r.sources)] * n,
            "image_id": np.asarray(ids).astype(str),
            "loss": np.asarray(losses, np.float32),
            "replicate": np.full(n, r.replicate, np.int32),
        },
        schema=LOSS_SCHEMA,
    )
    meta = {"kind": r.kind.value, **{k: v for k, v in asdict(outcome).items() if k != "readout"}}
    meta["digest"] = _digest(table)
    path.write_parquet(table.replace_schema_metadata({_META: json.dumps(meta).encode()}))


def _digest(table: pa.Table) -> str:
    """SHA-256 of a readout's image ids and losses: what its file must still hold when reused."""
    h = hashlib.sha256()
    h.update("\0".join(table["image_id"].to_pylist()).encode())
    h.update(np.ascontiguousarray(table["loss"].to_numpy(zero_copy_only=False), np.float32).tobytes())
    return h.hexdigest()


def stored_outcome(path: Location, readout: Readout, known: set[str] | None = None) -> ReadoutOutcome | None:
    """The summary of a stored readout (from the file's metadata), or None if not stored.
    `known`: the file names already listed in its folder (one listing per target, not a request
    per readout)."""
    if (path.name not in known) if known is not None else not path.exists():
        return None
    try:
        meta = _verified_meta(path)
    except (OSError, ValueError, KeyError, pa.ArrowException) as err:  # truncated, or bytes changed
        print(
            f"taskatlas: readout file {path} is damaged ({err}); it is trained again",
            file=sys.stderr,
            flush=True,
        )
        path.unlink(missing_ok=True)
        return None
    return ReadoutOutcome(
        readout,
        meta["mean_loss"],
        meta["seconds"],
        tuple(meta["train_losses"]),
        meta["val_loss"],
        meta.get("started", 0.0),
        meta.get("finished", 0.0),
    )


def _verified_meta(path: Location) -> dict:
    """A readout file's metadata, once its losses are checked against the digest written with
    them (files from before digests are taken as they are); once per file version and process."""
    info = path.fs.get_file_info(path.path)
    return _verified_meta_of(path.uri, info.size, info.mtime_ns or 0)


@functools.lru_cache(maxsize=65536)
def _verified_meta_of(uri: str, size: int, mtime_ns: int) -> dict:
    table = location(uri).read_parquet()
    meta = json.loads(table.schema.metadata[_META])
    if "digest" in meta and _digest(table) != meta["digest"]:
        raise ValueError("its losses do not match the digest written with them")
    return meta


def read_readout(path: Location) -> pa.Table:
    """A stored readout's losses (a file written before replicates existed is replicate 0)."""
    table = path.read_parquet().replace_schema_metadata(None)
    if "replicate" not in table.column_names:
        table = table.append_column(LOSS_SCHEMA.field("replicate"), pa.array(np.zeros(len(table), np.int32)))
    return table


def write_target_losses(readout_files: Sequence[str], out: str) -> int:
    """One target's loss table (every readout into it, concatenated): what Stage III reads, one
    target at a time. Run where the work is (a Ray task), not in the driver. Returns its rows."""
    tables = [read_readout(location(f)) for f in readout_files]
    table = pa.concat_tables(tables) if tables else LOSS_SCHEMA.empty_table()
    location(out).write_parquet(table)
    return table.num_rows


@functools.lru_cache(maxsize=4)
def _split_labels(data_root: str, split: str, column: str) -> tuple[np.ndarray, np.ndarray]:
    data = ShardStore(data_root).read(split, [column])
    ids = data["image_id"].astype(str)
    order = np.argsort(ids)
    return ids[order], data[column][order]


def labels_for(data_root: str, split: str, column: str, ids: np.ndarray) -> np.ndarray:
    """The stored labels of `split`'s images `ids` (sorted by id, as the feature caches' rows)."""
    return _labels(data_root, split, column, ids)


def _labels(data_root: str, split: str, column: str, ids: np.ndarray) -> np.ndarray:
    label_ids, labels = _split_labels(data_root, split, column)
    if not np.array_equal(label_ids, ids.astype(str)):
        raise RuntimeError(f"cached features and the dataset at {data_root} disagree on the {split} images")
    return labels
