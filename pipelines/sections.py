"""The sections of a study's config, one typed dataclass per stage, each validated where it is made
(a bad value is a one-line error naming its field), and what each field's value changes: which
keys it enters (`key_fields`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from components.config import to_dict
from components.errors import ConfigError
from components.taxonomy import Transform
from components.transfer import BASELINES, Pairing, ReadoutKind
from components.transfer.estimate import EstimatorKind

# What a config field's value changes (`field(metadata=...)`), read by `key_fields`.
KEY_ROLE = "key_role"


RUNTIME = {KEY_ROLE: "runtime"}  # how work is laid out: enters no key


PLAN = {KEY_ROLE: "plan"}  # which steps run: enters the stage's key, not each step's


SCRATCH_KEY = {KEY_ROLE: "scratch-readouts"}  # enters the keys of `scratch` baselines only


def key_fields(config: Any, *leave_out: Mapping[str, str]) -> dict[str, Any]:
    """The config's fields as plain values (`to_dict`), less those marked with any of `leave_out`
    (`RUNTIME`, `PLAN`, `SCRATCH_KEY`); unmarked fields enter every key."""
    roles = {marks[KEY_ROLE] for marks in leave_out}
    return {
        f.name: to_dict(getattr(config, f.name))
        for f in fields(config)
        if f.metadata.get(KEY_ROLE) not in roles
    }


def at_least(section: str, config: Any, minimum: float, *names: str, above: bool = False) -> None:
    """One-line errors naming the field: each `names` must be >= minimum (> with `above`)."""
    for name in names:
        value = getattr(config, name)
        if value is not None and (value <= minimum if above else value < minimum):
            raise ConfigError(f"{section}.{name} must be {'>' if above else '>='} {minimum}, got {value}")


@dataclass(frozen=True)
class DataConfig:
    """Which dataset: an existing folder (`path`, e.g. imported Taskonomy) or generated scenes."""

    path: str = ""
    n_train: int = 2000
    n_transfer: int = 500
    n_test: int = 500
    size: int | None = None  # image side; unset: the dataset's own (data.path), or 64 for generated scenes
    seed: int = 0
    rows_per_shard: int = 500

    def __post_init__(self) -> None:
        at_least("data", self, 1, "n_train", "n_transfer", "n_test", "size", "rows_per_shard")
        at_least("data", self, 0, "seed")


class Loader(Enum):
    """`train.loader`: how a DDP worker gets its data (see `TrainConfig.loader`)."""

    SHARDS = "shards"
    RAY_DATA = "ray_data"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    lr: float = 1e-3  # used as they are when tune.enabled is false
    weight_decay: float = 1e-4
    batch_size: int = 32
    num_workers: int = 0  # 0: one per GPU of the cluster if it has GPUs, else 2 CPU workers
    use_gpu: bool | None = None  # None: when the cluster has GPUs
    cpus_per_worker: float = 1.0
    max_failures: int = 2
    checkpoints_to_keep: int = 2
    concurrent_tasks: int = 0  # task networks trained at once; 0: as many as the cluster fits
    # Networks one Ray Train run trains one after another. 0: each of the concurrent runs trains an
    # equal share (a run's start-up, seconds of CPU for its processes and imports, is paid once a
    # share, not once a network); 1: a run of its own for every network.
    networks_per_run: int = 0
    # How a worker gets its data. "shards": each DDP worker reads its own equal, contiguous slice
    # of the verified shard files into memory and reshuffles it every epoch (a split that fits in
    # the workers' memory: no Ray Data actors, nothing through the object store, seconds less per
    # network). "ray_data": Ray Data streams the split and splits it among the workers (larger
    # than memory, or read and decoded on other nodes); the two settings below are for it.
    loader: Loader = Loader.SHARDS
    # Load each split into the object store before training. Ray Data read tasks then never wait
    # for CPUs the training workers hold (a deadlock on small CPU clusters); turn it off for
    # datasets larger than the object store, on clusters with CPUs to spare for streaming reads.
    materialize_data: bool = True
    # After its first epoch, each worker keeps its (equal-sized) shard in memory and reshuffles it
    # itself, instead of paying Ray Data's per-batch conversion every epoch. Off for large shards.
    cache_in_memory: bool = True
    # How often Ray Train's controller polls the workers for reports (Ray's default is 2 s): each
    # checkpoint is registered, and a finished run noticed, up to this much later.
    report_poll_s: float = 0.5
    seed: int = 0
    # Each task's network trained this many times (and searched, `tune.each_replicate`): replicate 0 with `seed`
    # (the network of a study without replicates, the one registered), replicate n > 0 with a
    # seed of its own (`stage1.plan.network_seed`). Readout replicate r reads network replicate
    # r mod N, so Stage III's multi-bootstrap covers how the networks trained too (at most
    # transfer.replicates: more would never be read). Raising it trains only the new replicates.
    replicates: int = 1

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError("train.lr must be > 0 and train.weight_decay >= 0")
        if self.report_poll_s <= 0:
            raise ConfigError(f"train.report_poll_s must be > 0, got {self.report_poll_s}")
        at_least(
            "train",
            self,
            0,
            "num_workers",
            "max_failures",
            "concurrent_tasks",
            "networks_per_run",
            "seed",
        )
        at_least("train", self, 1, "checkpoints_to_keep", "replicates")
        at_least("train", self, 0, "cpus_per_worker", above=True)


@dataclass(frozen=True)
class TuneConfig:
    enabled: bool = True
    num_samples: int = 4
    max_epochs: int = 3  # ASHA's max_t
    grace_period: int = 1
    reduction_factor: int = 2
    lr_min: float = 3e-4
    lr_max: float = 3e-3
    weight_decay_min: float = 1e-6
    weight_decay_max: float = 1e-3
    batch_sizes: tuple[int, ...] = (16, 32, 64)
    holdout_fraction: float = 0.15  # of `train`, for validation: the search never sees `test`
    max_train_images: int = 0  # subsample `train` during the search; 0: all
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 1.0  # on GPU clusters
    # With train.replicates N > 1: true, network replicate n searches again with its own seed (as a
    # rerun of the study would: reruns chose learning rates 5x apart and batches 16 to 64, and the
    # networks' replicates must span that); false, one search per task, replicates differ in seed
    # only (cheaper when the search costs more than the training).
    each_replicate: bool = field(default=True, metadata=PLAN)  # which searches run: in no search's key

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.max_epochs < 1 or not 1 <= self.grace_period <= self.max_epochs:
            raise ConfigError("tune: need num_samples >= 1 and 1 <= grace_period <= max_epochs")
        if not 0 < self.lr_min <= self.lr_max or not 0 < self.weight_decay_min <= self.weight_decay_max:
            raise ConfigError("tune: need 0 < lr_min <= lr_max and 0 < weight_decay_min <= weight_decay_max")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError("tune.batch_sizes must be a non-empty list of positive sizes")
        at_least("tune", self, 2, "reduction_factor")
        at_least("tune", self, 0, "max_train_images", "gpus_per_trial")
        at_least("tune", self, 0, "cpus_per_trial", above=True)
        if not 0 < self.holdout_fraction < 1:
            raise ConfigError(f"tune.holdout_fraction must be in (0, 1), got {self.holdout_fraction}")


@dataclass(frozen=True)
class PruneConfig:
    """Stage II pruning (design.md section 11): per target, full readouts only for the sources a
    cheap estimate ranks best, a random audit sample of the rest, and every baseline. Off by
    default: a pruned transfer is never an AHP candidate, so the study cannot pick it."""

    enabled: bool = False
    top_k: int = 3  # sources per target trained in full, by estimate (ignored with compute_fraction)
    # sources trained into every target: those whose estimates rank best over all targets, so a
    # small-budget taxonomy (a few roots serving every target) stays feasible and measured
    shared: int = 2
    audit_fraction: float = 0.1  # of the other sources, per target (rounded up): trained to check
    # > 0: budget mode, K is the largest whose Stage II (estimates included) costs at most this
    # fraction of the full plan's, from the calibrated readout cost
    compute_fraction: float = 0.0
    estimator: EstimatorKind = EstimatorKind.PROBE
    short_epochs: int = 1  # epochs of the `short` estimator's readout

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.short_epochs < 1:
            raise ConfigError("transfer.prune.top_k and transfer.prune.short_epochs must be >= 1")
        at_least("transfer.prune", self, 0, "shared")
        for name in ("audit_fraction", "compute_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"transfer.prune.{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class RaceConfig:
    """Raced readout replicates (`components.racing`): round 0 trains replicate 0 of every
    readout; each later round trains the next replicate only of the candidates still in their
    target's race (`p_best` at least `p_best`, in a target whose best is below `settled` or not
    yet replicated, and its `top` by affinity until they are), with that target's baselines, up
    to `transfer.replicates`. Needs `analysis.bootstrap` > 0."""

    enabled: bool = False
    # chosen on readout seeds 940-943 (`racing.py --frontier`), checked on 944-947: 0.49 of the
    # readouts, 0.72 of the full study's confident claims kept (docs/benchmarks.md, "Racing")
    p_best: float = 0.1
    settled: float = 0.98
    top: int = 2  # each target's best candidates by affinity race until their noise is measured
    # a candidate whose flag (below random, no gain) has a share in [flags, settled) races on:
    # another replicate may make it a claim stated at >= 0.9; 1: off
    flags: float = 0.85

    def __post_init__(self) -> None:
        if not 0 < self.p_best <= self.settled <= 1:
            raise ConfigError(
                f"transfer.race: need 0 < p_best <= settled <= 1, got p_best {self.p_best}, settled {self.settled}"
            )
        if not 0 < self.flags <= 1:
            raise ConfigError(f"transfer.race.flags must be in (0, 1], got {self.flags}")
        at_least("transfer.race", self, 1, "top")


@dataclass(frozen=True)
class TransferConfig:
    """Stage II: which readouts (orders, beams, baselines), how each trains, what it may use.

    Each field says which keys it enters (`key_fields`): by default, every readout's key and the
    stage's; `PLAN` fields (which readouts) the stage's only; `RUNTIME` fields (how the work is
    laid out on the cluster) none; `scratch_epochs` the keys of `scratch` baselines only."""

    orders: tuple[int, ...] = field(
        default=(2,), metadata=PLAN
    )  # higher orders; first order always runs (<= taxonomy.max_order)
    beams: tuple[int, ...] = field(
        default=(4,), metadata=PLAN
    )  # B of each higher order: its k-subsets of the top-B sources
    targets: tuple[str, ...] = field(
        default=(), metadata=PLAN
    )  # empty: every configured task that is not source-only
    baselines: tuple[ReadoutKind, ...] = field(default=BASELINES, metadata=PLAN)
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    width: int = 64  # channels of the readout's two conv layers
    seed: int = 0  # readout init and shuffling, and the `random` encoder's weights
    # Each readout (and the `pixels` and `random` baselines) trained this many times, each replicate
    # with its own seed: Stage III's multi-bootstrap then measures training noise, not only the
    # test images' (design.md section 10). Raising it trains only the new replicates.
    replicates: int = field(default=3, metadata=PLAN)
    pairing: Pairing = field(
        default=Pairing.PAIRED, metadata=PLAN
    )  # replicate r of a target's candidates shares its seed, or not
    # Beams take in up to 2 more sources whose mean validation loss is within this many standard
    # errors (over replicates) of the beam's last source; 0: exactly `beams` sources.
    widen_beams: float = field(default=1.0, metadata=PLAN)
    # Held out of each readout's training to rank first-order sources for the higher-order beams:
    # the beams never see the test images that the win rates are computed on.
    val_fraction: float = 0.2
    # The `scratch` baseline (a whole network trained from random weights on the readouts' images,
    # the reference for Gain when positioning a new task) trains this many epochs: with few labels
    # it needs more passes than a readout on frozen features.
    scratch_epochs: int = field(default=30, metadata=SCRATCH_KEY)
    encode_batch_size: int = field(default=256, metadata=RUNTIME)
    # Readouts into one target trained as one stacked model, one Ray task (design.md section 13):
    # at most this many, fewer where `stack_memory_gb` says so; 1: a Ray task per readout. 0: by
    # measurement (docs/benchmarks.md): 16, but for pixel targets on CPUs 1 (their readouts are
    # compute-bound there and train no faster stacked: oneDNN's grouped convolutions), or 4 where
    # the training images fit in one batch (few labels: each step is overhead-bound).
    stack: int = field(default=0, metadata=RUNTIME)
    stack_memory_gb: float = field(
        default=4.0, metadata=RUNTIME
    )  # a rough bound on one stack's activations and parameters
    # Resources of one Ray task: a stack of readouts, or one `self` scored
    cpus_per_readout: float = field(default=1.0, metadata=RUNTIME)
    gpus_per_readout: float = field(default=0.25, metadata=RUNTIME)  # on GPU clusters: 4 stacks share a GPU
    use_gpu: bool | None = field(default=None, metadata=RUNTIME)  # None: when the cluster has GPUs
    max_retries: int = field(
        default=2, metadata=RUNTIME
    )  # per readout, then it is reported as failed and the others go on
    prune: PruneConfig = field(default_factory=PruneConfig, metadata=PLAN)
    race: RaceConfig = field(default_factory=RaceConfig, metadata=PLAN)

    def __post_init__(self) -> None:
        if len(self.orders) != len(self.beams):
            raise ConfigError(f"transfer.beams needs one size per order in transfer.orders {self.orders}")
        if any(k < 2 for k in self.orders) or len(set(self.orders)) != len(self.orders):
            raise ConfigError(f"transfer.orders must be distinct higher orders >= 2, got {self.orders}")
        if any(b < k for k, b in zip(self.orders, self.beams, strict=True)):
            raise ConfigError(f"transfer.beams: each beam must be >= its order ({self.orders}, {self.beams})")
        if ReadoutKind.TRANSFER in self.baselines:
            raise ConfigError("transfer.baselines: choose from self, pixels, random, scratch")
        for name in ("epochs", "batch_size", "width", "encode_batch_size", "scratch_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"transfer.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError("transfer.lr must be > 0 and transfer.weight_decay >= 0")
        if self.cpus_per_readout <= 0 or not 0 < self.gpus_per_readout <= 1:
            raise ConfigError("transfer.cpus_per_readout must be > 0 and transfer.gpus_per_readout in (0, 1]")
        if self.max_retries < 0:
            raise ConfigError(f"transfer.max_retries must be >= 0, got {self.max_retries}")
        at_least("transfer", self, 1, "replicates")
        at_least("transfer", self, 0, "stack")
        at_least("transfer", self, 0, "stack_memory_gb", above=True)
        at_least("transfer", self, 0, "widen_beams", "seed")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"transfer.val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass(frozen=True)
class TaxonomyConfig:
    """Stage IV: the BIP's budget and options (design.md section 6)."""

    budget: int = 3  # roots given full supervision (with costs: the supervision budget)
    max_order: int = 2
    transform: Transform = Transform.SQRT
    importance: dict[str, float] = field(default_factory=dict)  # r_t, default 1
    cost: dict[str, float] = field(default_factory=dict)  # supervision cost of a root, default 1
    exclude: tuple[str, ...] = ()
    source_only: tuple[str, ...] = ()  # beyond the tasks that are source-only by definition

    def __post_init__(self) -> None:
        if self.budget < 1 or self.max_order < 1:
            raise ConfigError("taxonomy.budget and taxonomy.max_order must be >= 1")


MIN_BOOTSTRAP = 10  # `analysis.bootstrap`: fewer resamples state no share (0: no bootstrap)


@dataclass(frozen=True)
class AnalysisConfig:
    """Stage III/IV uncertainty (design.md section 10): resamples of each target's test images."""

    bootstrap: int = 200  # 0: no intervals, no stability
    seed: int = 0
    # The share of the study's test images Stage III/IV score, each image kept or not by a hash of
    # (seed, image id) (`analysis.steps.in_test_subset`): reruns with other seeds score other
    # halves (benchmarks/calibration.py). 1.0: every image, and the step keys studies always had.
    test_subset: float = 1.0
    # The seed that draws the test subset; None: `seed`. Another `seed` with the same subset seed
    # resamples the same images anew: how much of a share is the resamples' own noise
    # (benchmarks/racing.py's floor of `confident_claims_kept`).
    subset_seed: int | None = None

    @property
    def test_subset_seed(self) -> int:
        return self.seed if self.subset_seed is None else self.subset_seed

    def __post_init__(self) -> None:
        if self.bootstrap < 0 or self.seed < 0 or (self.subset_seed or 0) < 0:
            raise ConfigError("analysis.bootstrap, analysis.seed and analysis.subset_seed must be >= 0")
        if 0 < self.bootstrap < MIN_BOOTSTRAP:  # a share (p_best, stability) needs resamples
            raise ConfigError(
                f"analysis.bootstrap: {self.bootstrap} resamples are too few for a share; "
                f"give at least {MIN_BOOTSTRAP}, or 0 for no bootstrap"
            )
        if not 0 < self.test_subset <= 1:  # NaN fails too
            raise ConfigError(f"analysis.test_subset must be in (0, 1], got {self.test_subset}")


@dataclass(frozen=True)
class PositionConfig:
    """`taskatlas position` (design.md section 12): how a new task's labelled images are split."""

    test_fraction: float = 0.25  # of the images, drawn per image from its name, scored not trained on
    min_test_images: int = 10  # fewer cannot tell sources apart: refused up front
    # Readouts (and `scratch`) train at least this many optimizer steps: with few labelled images
    # an epoch is one or two steps, and `transfer.epochs` alone would leave them untrained.
    min_steps: int = 100

    def __post_init__(self) -> None:
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"position.test_fraction must be in (0, 1), got {self.test_fraction}")
        at_least("position", self, 2, "min_test_images")
        at_least("position", self, 1, "min_steps")

    def epochs(self, epochs: int, fit_images: int, batch_size: int) -> int:
        """`epochs`, or more where they would give fewer than `min_steps` steps on `fit_images`."""
        per_epoch = max(1, len(range(0, fit_images - 1, batch_size)))  # a last batch of one is dropped
        return max(epochs, -(-self.min_steps // per_epoch))


@dataclass(frozen=True)
class TrackingConfig:
    """How long a tracking server may go without answering before a run stops (it says so in one
    line; finished work stays on disk and the next run logs what is missing)."""

    retry_s: float = 60.0  # one budget for the whole run's tracking calls while the server is down

    def __post_init__(self) -> None:
        at_least("tracking", self, 0, "retry_s")
