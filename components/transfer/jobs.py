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
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from components.data.shards import ShardStore
from components.models import ModelConfig, build_network, representation_shape
from components.storage import location
from components.tasks import Loss, Task
from components.training import nanmean, pick_device
from components.transfer.feature_files import source_features
from components.transfer.features import load_state_dict
from components.transfer.plan import Readout, ReadoutKind
from components.transfer.readout import ReadoutSettings, score_network, train_readout
from components.transfer.readout_files import ReadoutOutcome, note_attempt, stored_outcome, write_readout
from components.transfer.scratch import train_scratch
from components.transfer.stacked import StackMember, train_stacked


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
            members = [
                StackMember(tx, sx, m.settings.seed, m.settings.split_seed) for m, tx, _, sx, _ in group
            ]
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
