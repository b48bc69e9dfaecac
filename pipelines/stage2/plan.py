"""Stage II's plan: which readouts a study trains, each one's key and file, which are stored,
and the job each runs. Pure reads of the config, the data version and the stored files: no
tracker and no Ray, so `run`, `--dry-run`, `nightly` and `position` all plan alike.

Network replicates (`train.replicates` N): readout replicate r reads network replicate r mod N
of each source (`network_replicate`), so its key hashes that network's features; `self`
replicate r scores the target's network r mod N, and `random` replicate r reads network
replicate r's random encoder (`random_seed`). Replicate 0 reads network 0: every key of a study
with N = 1 is the key it had before network replicates.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from components.config import config_hash
from components.data.shards import ShardStore, file_sha256
from components.errors import TaskatlasError
from components.seeds import replicate_seed
from components.storage import Location, location
from components.tasks import TaskKind, channels_for
from components.transfer import (
    FeatureKind,
    FeatureSource,
    Pairing,
    Readout,
    ReadoutKind,
    ReadoutSettings,
    TransferPlan,
    build_readout,
    network_replicate,
    plan_transfers,
    readout_seed,
    split_seed,
)
from components.transfer.jobs import ReadoutJob
from components.transfer.readout import validation_split
from components.transfer.readout_files import ReadoutOutcome, readout_path, stored_outcome
from pipelines.config import PipelineConfig
from pipelines.results import TaskResult
from pipelines.sections import PLAN, RUNTIME, SCRATCH_KEY, TransferConfig, key_fields
from pipelines.steps import Step, StepStatus

AUTO_STACK = 16  # `transfer.stack: 0` where stacking pays (docs/benchmarks.md)
# ... and for pixel targets on CPUs when every training step is one small batch (a new task
# positioned from a few labels): 1.3x there, where a step is overhead-bound (docs/benchmarks.md)
SMALL_BATCH_STACK = 4


@dataclass(frozen=True)
class ReadoutKeys:
    """Each readout's own key and file. The key hashes what determines the readout and nothing
    else: the readout settings, model and data (`common`), the target's definition, and its
    sources' feature keys (for `self`, the target's Stage I network). So any study that needs
    the same readout finds it stored, whatever other tasks it has. Readout replicate r reads
    network replicate r mod N (`network_replicate`): its sources' features, or for `self` the
    target's network, are that replicate's."""

    root: Location  # the storage root
    common: str
    features: Mapping[str, str]  # source (task, `random`, `pixels`) -> feature key (network replicate 0)
    networks: Mapping[str, str]  # task -> its Stage I key (replicate 0)
    targets: Mapping[str, str]  # task -> hash of its definition and output channels
    seed: int = 0  # transfer.seed (also in `common`)
    pairing: Pairing = Pairing.PAIRED
    scratch_epochs: int = 0  # transfer.scratch_epochs: in the keys of `scratch` baselines only
    # Network replicates 1..N-1 (`train.replicates` N): one mapping each, as `features` and
    # `networks` are replicate 0's; a network not trained yet is missing from its mapping
    replica_features: tuple[Mapping[str, str], ...] = ()
    replica_networks: tuple[Mapping[str, str], ...] = ()

    @property
    def network_replicates(self) -> int:
        return 1 + len(self.replica_features)

    def network_of(self, r: Readout) -> int:
        """The network replicate `r` reads (`network_replicate`)."""
        return network_replicate(r, self.network_replicates)

    def key(self, r: Readout) -> str:
        n = self.network_of(r)
        if r.kind is ReadoutKind.SELF:  # the target's network, scored: no readout setting applies
            networks = self.replica_networks[n - 1] if n else self.networks
            return config_hash("self-v2", r.name, self.targets[r.target], networks[r.target])
        if r.kind is ReadoutKind.SCRATCH:  # no features: the raw images, and its own epochs
            parts = [self.common, r.name, self.targets[r.target], {"scratch_epochs": self.scratch_epochs}]
        else:
            names = r.sources if r.kind is ReadoutKind.TRANSFER else (r.kind.value,)
            features = self.replica_features[n - 1] if n else self.features
            parts = [self.common, r.name, self.targets[r.target], [features[name] for name in names]]
        if (seed := self.seed_of(r)) != self.seed:  # replicate 0, paired: the key it always had
            parts.append({"seed": seed})
        if r.replicate:  # its replicate's fit rows (`split_seed`); replicate 0 keeps the study's
            parts.append({"split": split_seed(self.seed, r.replicate)})
        return config_hash(*parts)

    def seed_of(self, r: Readout) -> int:
        return readout_seed(self.seed, r, self.pairing)

    def path(self, r: Readout) -> Location:
        return readout_path(self.root, r, self.key(r))


def transfer_plan(config: PipelineConfig, sources: Sequence[str]) -> TransferPlan:
    """Stage II's readouts from the config alone (`sources`: the tasks with networks); targets are
    `transfer.targets` or the non-source-only. Higher orders are known once their beams are:
    before, `TransferPlan.counts` bounds them."""
    t = config.transfer  # targets among `sources`: checked at load and by `preflight`
    targets = list(t.targets) or [s for s in sources if not config.task(s).source_only]
    networks = config.train.replicates
    return plan_transfers(
        targets, list(sources), t.orders, t.beams, t.baselines, t.replicates, t.widen_beams, networks
    )


@dataclass(frozen=True)
class Stage2Plan:
    """Stage II's plan for a config and a dataset. `use_gpu`: the run's answer (the cluster's
    GPUs when `transfer.use_gpu` is unset); it shapes the jobs and stacks, never a key."""

    config: PipelineConfig
    store: ShardStore
    use_gpu: bool = False
    fail_readouts: tuple[str, ...] = ()  # a test's fault seam: these readouts always raise
    _stack_sizes: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    @property
    def transfer(self) -> TransferConfig:
        return self.config.transfer

    @property
    def settings(self) -> ReadoutSettings:
        """Replicate 0's settings; replicate r trains with `ReadoutKeys.seed_of` as its seed, on
        its own rows (`split_seed`)."""
        return ReadoutSettings.from_config(self.transfer)

    @property
    def resources(self) -> dict:
        """One Ray task's: a stack of readouts, or one `self` scored."""
        t = self.transfer
        return {"num_cpus": t.cpus_per_readout, "num_gpus": t.gpus_per_readout if self.use_gpu else 0}

    def plan(self, sources: list[str]) -> TransferPlan:
        """Every configured task is a source; targets are `transfer.targets` or the non-source-only."""
        return transfer_plan(self.config, sources)

    def key(self, results: Mapping[str, TaskResult]) -> str:
        """Keyed by the transfer settings, every network read (with `train.replicates` N > 1,
        each task's replicates 1..N-1 too) and the keys of the readouts it holds."""
        science = key_fields(self.transfer, RUNTIME)
        if not self.transfer.prune.enabled:  # pruning off: the key studies had before it existed
            science.pop("prune")
        if not self.transfer.race.enabled:  # racing off: likewise
            science.pop("race")
        if ReadoutKind.SCRATCH not in self.transfer.baselines:  # likewise, without a scratch baseline
            science.pop("scratch_epochs")
        encoders = {name: r.key for name, r in results.items()}
        cfg = self.config
        parts = ["stage2", science, cfg.model, cfg.data.size, encoders, self.store.data_version]
        if (n := cfg.train.replicates) > 1:
            self.check_networks(results)
            replicas = {t: [r.network(i).key for i in range(1, n)] for t, r in results.items()}
            parts.append({"network_replicates": replicas})
        # The keys of the readouts it holds (those known up front; higher orders key the same way):
        # a change to how readouts are keyed (a replicate's split, say) makes a new step, never
        # an old loss table of readouts no longer planned.
        keys, plan = self.readout_keys(results), self.plan(list(results))
        readouts = sorted(keys.key(x) for r in (*plan.first_order, *plan.baselines) for x in plan.replicas(r))
        return config_hash(*parts, {"readouts": config_hash(readouts)})

    def check_networks(self, results: Mapping[str, TaskResult]) -> None:
        """Every task's `train.replicates` networks are among `results` (before Stage II reads them)."""
        n = self.config.train.replicates
        if short := [(t, 1 + len(r.replicas)) for t, r in results.items() if len(r.replicas) < n - 1]:
            task, have = short[0]
            raise TaskatlasError(
                f"train.replicates is {n}, but task {task!r} has {have} trained network(s); train them "
                "first (taskatlas train, or the train stage)"
            )

    def step(self, key: str) -> Step:
        return Step(self.config.root, "stage2", key)

    def is_complete(self, key: str) -> bool:
        """The marker is written only when every readout of the plan succeeded."""
        return self.step(key).complete

    def readout_keys(self, results: Mapping[str, TaskResult]) -> ReadoutKeys:
        """How to key each readout of a study on these networks (see `ReadoutKeys`)."""
        t, cfg = self.transfer, self.config
        science = key_fields(t, RUNTIME, PLAN, SCRATCH_KEY)
        common = config_hash("readout-v1", science, cfg.model, cfg.data.size, self.store.data_version)
        per_replicate = [network_results(results, n) for n in range(cfg.train.replicates)]
        features = [
            {name: s.key for name, s in feature_sources(cfg, rs, n).items()}
            for n, rs in enumerate(per_replicate)
        ]
        networks = [{name: r.key for name, r in rs.items()} for rs in per_replicate]
        targets = {  # a task's definition and output channels shape every readout into it
            name: config_hash(task, channels_for(task, self.store)) for name, task in cfg.catalog.items()
        }
        return ReadoutKeys(
            cfg.root,
            common,
            features[0],
            networks[0],
            targets,
            t.seed,
            t.pairing,
            t.scratch_epochs,
            tuple(features[1:]),
            tuple(networks[1:]),
        )

    def preview(self, results: Mapping[str, TaskResult]) -> list[tuple[str, StepStatus]]:
        """(readout, RUN | REUSE) for `--dry-run`, from the networks trained so far: exact for
        first order and baselines, and for the higher orders of targets whose first-order readouts
        are all stored; other targets' higher orders are one line "up to N", as their beams come
        from first-order results still to be trained. A readout of an untrained network runs."""
        plan = self.plan(list(self.config.tasks))
        keys = self.readout_keys(results)

        def stored(r: Readout) -> ReadoutOutcome | None:
            try:
                return stored_outcome(keys.path(r), r)
            except KeyError:  # a source or the target has no trained network yet
                return None

        def status(readouts) -> list[tuple[str, StepStatus]]:
            return [
                (x.name, StepStatus.REUSE if stored(x) else StepStatus.RUN)
                for r in readouts
                for x in plan.replicas(r)
            ]

        out = status((*plan.first_order, *plan.baselines))
        for target in plan.targets:
            first = {x: stored(x) for r in plan.first_order_of(target) for x in plan.replicas(r)}
            if all(first.values()):
                losses: dict[str, list[float]] = {}
                for x, o in first.items():
                    losses.setdefault(x.sources[0], []).append(o.val_loss)
                out += status(plan.higher_order(target, losses))
            elif n := sum(plan.higher_order_count(target, k) for k in plan.orders):
                out.append((f"{target}: up to {n} higher-order (beam after first order)", StepStatus.RUN))
        return out

    def job(self, r: Readout, dirs: tuple[str, ...], path: str, checkpoint: str = "") -> ReadoutJob:
        """What the readout's Ray task runs: `dirs` its sources' feature folders, `path` its loss file."""
        t, task = self.transfer, self.config.task(r.target)
        epochs = {"epochs": t.scratch_epochs} if r.kind is ReadoutKind.SCRATCH else {}
        return ReadoutJob(
            readout=r,
            task=task,
            feature_dirs=dirs,
            data_root=self.store.root.uri,
            model=self.config.model,
            image_size=self.config.data.size,
            channels=channels_for(task, self.store),
            settings=replace(
                self.settings,
                seed=readout_seed(t.seed, r, t.pairing),
                split_seed=split_seed(t.seed, r.replicate),
                **epochs,
            ),
            path=path,
            use_gpu=self.use_gpu,
            threads=max(1, int(t.cpus_per_readout)),
            fail=r.first.name in self.fail_readouts,  # every replicate of it
            checkpoint=checkpoint,
        )

    def stack_size(self, target: str) -> int:
        """Readouts per stack into `target`: `transfer.stack` (0: `auto_stack`), fewer where one
        member's rough footprint (parameters, gradients and AdamW's two moments; the decoder's
        activations kept for backward, about 16 floats per output value of a batch) times the
        stack would pass `transfer.stack_memory_gb`."""
        if target not in self._stack_sizes:
            t, task, size = self.transfer, self.config.task(target), self.config.data.size
            limit = t.stack or self._auto_stack(task.kind)
            channels = channels_for(task, self.store)
            rep = self.config.model.representation_channels
            net = build_readout(task, rep, self.config.model, size, t.width, channels)
            params = sum(p.numel() for p in net.parameters())
            member = 4 * (4 * params + 16 * t.batch_size * math.prod(task.output_shape(size, channels)))
            self._stack_sizes[target] = max(1, min(limit, int(t.stack_memory_gb * 2**30 // member)))
        return self._stack_sizes[target]

    def _auto_stack(self, kind: TaskKind) -> int:
        t = self.transfer
        fit = validation_split(self.store.manifest.counts["transfer"], t.val_fraction, t.seed)[0].size
        return auto_stack(kind, self.use_gpu, fit, t.batch_size)


def auto_stack(kind: TaskKind, use_gpu: bool, fit_images: int, batch_size: int) -> int:
    """`transfer.stack: 0`'s stack size, from docs/benchmarks.md's measurements: 16, but for a
    pixel target on CPUs 1, or 4 where the training images fit in one batch."""
    if kind is not TaskKind.PIXEL or use_gpu:
        return AUTO_STACK
    return SMALL_BATCH_STACK if fit_images <= batch_size else 1


def network_results(results: Mapping[str, TaskResult], replicate: int) -> dict[str, TaskResult]:
    """Task -> its network replicate `replicate`, of the tasks that have it (`TaskResult.replicas`)."""
    return {name: r.network(replicate) for name, r in results.items() if replicate <= len(r.replicas)}


def feature_sources(
    config: PipelineConfig, results: Mapping[str, TaskResult], replicate: int = 0
) -> dict[str, FeatureSource]:
    """Source name -> feature source of network replicate `replicate`: each task's encoder (keyed
    by its checkpoint's hash), `random` (keyed by architecture and its seed, `random_seed`) and
    `pixels` (keyed by the rearrangement)."""
    model, seed = config.model, random_seed(config.transfer.seed, replicate)
    out = {
        name: FeatureSource(name, FeatureKind.ENCODER, checkpoint_key(r.model_path), r.model_path)
        for name, r in results.items()
    }
    random, pixels = ReadoutKind.RANDOM.value, ReadoutKind.PIXELS.value
    out[random] = FeatureSource(random, FeatureKind.RANDOM, f"random-{config_hash(model, seed)}", seed=seed)
    out[pixels] = FeatureSource(pixels, FeatureKind.PIXELS, f"pixels-{model.downsample}")
    return out


def random_seed(seed: int, replicate: int) -> int:
    """The `random` encoder's seed in network replicate `replicate`: `transfer.seed` for replicate
    0 (its key as before replicates), one drawn from (seed, replicate) for the others. A rerun of
    the study draws another random encoder, as it trains other task networks; one `random` shared
    by every replicate would hide that part of a rerun's noise from the multi-bootstrap."""
    return replicate_seed(seed, replicate, "stage2-random-encoder")


def checkpoint_key(uri: str) -> str:
    """An encoder's feature key: its checkpoint's hash, read once per file version (a run asks
    for it for the readout keys and again for the feature cache; a ResNet-50 is ~100 MB)."""
    stored = location(uri)
    info = stored.fs.get_file_info(stored.path)
    return _sha256_prefix(stored.uri, info.mtime_ns or 0, info.size)


@functools.lru_cache(maxsize=256)
def _sha256_prefix(uri: str, mtime_ns: int, size: int) -> str:
    return file_sha256(location(uri))[:16]
