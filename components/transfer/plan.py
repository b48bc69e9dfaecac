"""Which readouts Stage II trains: a pure function of the tasks and the beam settings.

First order: every source -> every target, the target's own encoder included. Higher order k:
every k-subset of the target's best B first-order sources (its own encoder left out: a target
is never among its own sources beyond first order). Baselines per target: `self` (Stage I's
network, nothing to train), `pixels` and `random`. The higher-order source sets are only known
once a target's first-order losses are in, but their number is known up front, so the plan can
be counted and timed before anything runs.

With N network replicates per task (Stage I's `train.replicates`), readout replicate r reads
network replicate r mod N of its sources, and `self` has a replicate per readout replicate, r
scoring the target's network r mod N (`network_replicate`).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from itertools import combinations

import numpy as np

from components.seeds import derived_seed, replicate_seed
from components.transfer.beams import MAX_WIDEN, beam, rank_sources
from components.vocabulary import ALL_BASELINES, BASELINES, ReadoutKind

__all__ = ["ALL_BASELINES", "BASELINES", "ReadoutKind"]  # named in components.vocabulary


class Pairing(str, Enum):
    """How replicates draw their seeds (design.md section 10)."""

    PAIRED = "paired"  # replicate r of every candidate of a target shares one seed (common random numbers)
    INDEPENDENT = "independent"  # every readout's replicate r has a seed of its own


@dataclass(frozen=True, order=True)
class Readout:
    """One unit of Stage II work: train a readout from `sources` to `target` (or read `self`).
    `replicate` r > 0 is the same readout trained again with another seed (`readout_seed`), on
    network replicate r mod N of its sources (`network_replicate`); `self` replicate r is the
    target's network replicate r mod N, scored."""

    target: str
    sources: tuple[str, ...]  # sorted; (kind,) for a baseline, as in the loss table
    kind: ReadoutKind = ReadoutKind.TRANSFER
    replicate: int = 0

    def __post_init__(self) -> None:
        if tuple(sorted(set(self.sources))) != self.sources or not self.sources:
            raise ValueError(f"sources must be a non-empty sorted set, got {self.sources}")
        if self.kind is not ReadoutKind.TRANSFER and self.sources != (self.kind.value,):
            raise ValueError(f"a {self.kind.value} baseline has sources ({self.kind.value!r},)")
        if self.replicate < 0:
            raise ValueError(f"replicate must be >= 0, got {self.replicate}")

    @property
    def order(self) -> int:
        return len(self.sources)

    @property
    def name(self) -> str:
        """`a+b->t` (`a+b->t#r` for replicate r > 0): how logs, MLflow (`transfer/<name>`) and
        failure reports call it."""
        return f"{'+'.join(self.sources)}->{self.target}{self._suffix('#')}"

    @property
    def file_id(self) -> str:
        """The name without `>` or `#`: safe as a file name on any filesystem or object store."""
        return f"{'+'.join(self.sources)}--{self.target}{self._suffix('.r')}"

    @property
    def first(self) -> Readout:
        """Replicate 0 of this readout: what beams, summaries and candidates are keyed by."""
        return replace(self, replicate=0)

    def _suffix(self, mark: str) -> str:
        return f"{mark}{self.replicate}" if self.replicate else ""


def readout_seed(seed: int, r: Readout, pairing: Pairing = Pairing.PAIRED) -> int:
    """The seed of a readout's initialisation and batch order. Paired, replicate 0 keeps the
    study's seed (every readout of a study before replicates existed), and replicate r of every
    candidate of a target shares one seed; independent, each readout's replicate draws its own."""
    if pairing is Pairing.PAIRED:
        if r.replicate == 0:
            return seed
        entropy = [seed, r.replicate]
    else:
        entropy = [seed, r.replicate, zlib.crc32(r.target.encode()), zlib.crc32("+".join(r.sources).encode())]
    return derived_seed(entropy)


def split_seed(seed: int, replicate: int) -> int:
    """The seed of readout replicate `replicate`'s fit/validation split of the transfer images:
    `transfer.seed` for replicate 0 (the split a study always had), one drawn from (seed,
    replicate) for the others. Every readout of replicate r trains on the same rows, so a target's
    candidates are compared on the same training images; another replicate draws other rows, as a
    rerun of the study would, so the multi-bootstrap over replicates sees which images the readouts
    happened to train on. One split shared by every replicate hid it: on whole reruns, one run's
    split made colorization lose to `random` on both depth targets in all three replicates (win
    rates 0.18-0.44), where the same networks with another split won 0.76-0.97."""
    return replicate_seed(seed, replicate, "stage2-split")


def network_replicate(r: Readout, networks: int) -> int:
    """Which of its sources' (or, for `self`, its target's) N = `networks` Stage I network
    replicates readout replicate r reads: r mod N. Replicate 0 reads network 0, the only one a
    study had before network replicates, so its keys are the ones it always had; replicate r of
    every candidate of a target reads the same network replicate, as `self` replicate r does (the
    pairing `readout_seed` gives seeds). `pixels`, `random` and `scratch` read no network."""
    return r.replicate % networks


def baseline(target: str, kind: ReadoutKind) -> Readout:
    return Readout(target, (kind.value,), kind)


@dataclass(frozen=True)
class TransferPlan:
    targets: tuple[str, ...]
    sources: tuple[str, ...]
    orders: tuple[int, ...]  # higher orders, ascending
    beams: tuple[int, ...]  # B of each higher order
    first_order: tuple[Readout, ...]  # grouped by target, in target order
    baselines: tuple[Readout, ...]
    # `prune_plan`: first-order readouts left untrained (never AHP candidates), and those of
    # `first_order` trained only as an audit of the estimate that would have pruned them
    pruned: tuple[Readout, ...] = ()
    audited: tuple[Readout, ...] = ()
    top_k: int = 0  # sources per target kept by estimate; 0: not pruned
    shared: tuple[str, ...] = ()  # sources kept for every target (`shared_sources`)
    replicates: int = 1  # each trained readout, trained this many times with its own seed
    widen: float = 0.0  # beams take in sources within this many standard errors of the edge
    networks: int = 1  # Stage I network replicates per task (`network_replicate`)

    def replicas(self, r: Readout) -> tuple[Readout, ...]:
        """Every replicate of `r`. `self` is scored, not trained: one with one network per task
        (its keys as before network replicates), else one per readout replicate, replicate r
        scoring network r mod N, so replicate r of every candidate has its `self` to pair with."""
        return tuple(replace(r, replicate=i) for i in range(self._replicates(r.kind)))

    def _replicates(self, kind: ReadoutKind) -> int:
        return 1 if kind is ReadoutKind.SELF and self.networks == 1 else self.replicates

    def first_order_of(self, target: str) -> tuple[Readout, ...]:
        return tuple(r for r in self.first_order if r.target == target)

    def candidates(self, target: str) -> tuple[str, ...]:
        """Sources a higher-order set of `target` may use: every source of a first-order readout
        it trains, but the target itself."""
        return tuple(r.sources[0] for r in self.first_order_of(target) if r.sources[0] != target)

    def higher_order_count(self, target: str, order: int) -> int:
        """Readouts of one higher order for `target` (replicate 0; at the beam's widest when widened)."""
        beam = self.beams[self.orders.index(order)]
        widest = beam + (MAX_WIDEN if self.widen > 0 else 0)
        return math.comb(min(widest, len(self.candidates(target))), order)

    def higher_order(
        self, target: str, first_order_losses: Mapping[str, float | Sequence[float]]
    ) -> tuple[Readout, ...]:
        """Readouts of every higher order for `target` (replicate 0 of each), from its first-order
        validation losses (source -> loss, or its replicates' losses; lower is better), each order's
        beam chosen by `beam`. Sources missing from the mapping (a failed readout) are not in it."""
        out = []
        for order, size in zip(self.orders, self.beams, strict=True):
            chosen = beam(first_order_losses, size, self.widen, exclude=target)
            out += [Readout(target, tuple(sorted(c))) for c in combinations(chosen, order)]
        return tuple(out)

    def counts(self) -> dict[str, int]:
        """Readouts per order and per baseline, replicates included, as printed before a run."""
        out = {"order 1": len(self.first_order) * self.replicates}
        for order in self.orders:
            n = sum(self.higher_order_count(t, order) for t in self.targets)
            out[f"order {order}"] = n * self.replicates
        for kind in ALL_BASELINES:
            n = sum(r.kind is kind for r in self.baselines)
            if n:
                out[kind.value] = n * self._replicates(kind)
        return out

    @property
    def trained(self) -> int:
        """Readouts that train a network (all but `self`)."""
        return sum(v for k, v in self.counts().items() if k != ReadoutKind.SELF.value)


def prune_plan(
    plan: TransferPlan,
    estimates: Mapping[tuple[str, str], float],
    top_k: int,
    audit_fraction: float = 0.0,
    seed: int = 0,
    shared: int = 0,
) -> TransferPlan:
    """Per target, keep the first-order readouts of the `top_k` sources with the lowest estimate
    ((target, source) -> estimated loss; ties by name), of the `shared` sources that rank best
    over all targets (`shared_sources`), and a random audit sample of the rest:
    `ceil(audit_fraction x rest)` of them, drawn from (seed, target). Every baseline stays, and
    higher orders still come from the trained first-order results. A source without an estimate
    is kept (nothing says it is hopeless)."""
    if top_k < 1 or shared < 0 or not 0 <= audit_fraction <= 1:
        raise ValueError(
            f"need top_k >= 1, shared >= 0 and 0 <= audit_fraction <= 1, got {top_k}, {shared}, {audit_fraction}"
        )
    everywhere = shared_sources(plan, estimates, shared)
    kept, pruned, audited = [], [], []
    for target in plan.targets:
        readouts = plan.first_order_of(target)
        known = {
            r.sources[0]: estimates[target, r.sources[0]]
            for r in readouts
            if (target, r.sources[0]) in estimates
        }
        ranked = rank_sources(known)
        rest = [s for s in ranked[top_k:] if s not in everywhere]
        rng = np.random.default_rng([seed, zlib.crc32(target.encode())])
        audit = {str(s) for s in rng.choice(rest, _audit_size(len(rest), audit_fraction), replace=False)}
        for r in readouts:
            source = r.sources[0]
            if source in rest and source not in audit:
                pruned.append(r)
                continue
            kept.append(r)
            if source in audit:
                audited.append(r)
    return replace(
        plan,
        first_order=tuple(kept),
        pruned=tuple(pruned),
        audited=tuple(audited),
        top_k=top_k,
        shared=everywhere,
    )


def shared_sources(plan: TransferPlan, estimates: Mapping[tuple[str, str], float], n: int) -> tuple[str, ...]:
    """The `n` sources with the best mean rank over the targets' estimates (each target's ranks
    scaled to [0, 1]; a target's own network is not ranked for it; ties by name).

    Why: a taxonomy at a small budget picks a few roots that serve every target. If each target
    kept only its own top K, no few sources might be trained into every target, and the budget
    would be infeasible for the pruned study although the full one solves it."""
    if n <= 0:
        return ()
    ranks: dict[str, list[float]] = {}
    for target in plan.targets:
        known = {
            r.sources[0]: estimates[target, r.sources[0]]
            for r in plan.first_order_of(target)
            if (target, r.sources[0]) in estimates
        }
        ranked = rank_sources(known, exclude=target)
        for i, source in enumerate(ranked):
            ranks.setdefault(source, []).append(i / max(len(ranked) - 1, 1))
    return tuple(sorted(ranks, key=lambda s: (float(np.mean(ranks[s])), s))[:n])


def _audit_size(rest: int, audit_fraction: float) -> int:
    return math.ceil(audit_fraction * rest - 1e-9)


def prune_for_budget(
    plan: TransferPlan,
    estimates: Mapping[tuple[str, str], float],
    compute_fraction: float,
    seconds_per_readout: float,
    estimate_seconds: float,
    audit_fraction: float = 0.0,
    seed: int = 0,
    shared: int = 0,
) -> tuple[TransferPlan, float]:
    """(the pruned plan with the largest K (>= 1) whose cost, `planned_fraction`, is at most
    `compute_fraction`, that cost). Each K's plan is built and counted exactly, so a shared
    source that is already among a target's top K costs nothing twice. The cost never falls as K
    grows (a source moved into the top K leaves the audit pool), so the first K over budget ends
    the search. When K = 1 is already over, that plan is returned with its cost, for the caller
    to report."""
    most = max((len(plan.first_order_of(t)) for t in plan.targets), default=1)
    best = None
    for k in range(1, most + 1):
        pruned = prune_plan(plan, estimates, k, audit_fraction, seed, shared)
        cost = planned_fraction(plan, pruned, seconds_per_readout, estimate_seconds)
        if cost > compute_fraction:
            return best or (pruned, cost)
        best = (pruned, cost)
    return best


def planned_fraction(
    full: TransferPlan, pruned: TransferPlan, seconds_per_readout: float, estimate_seconds: float
) -> float:
    """What `pruned` costs as a fraction of `full`, estimates included, every trained readout at
    `seconds_per_readout` (higher orders at their most): budget mode's one cost model."""
    whole = full.trained * seconds_per_readout
    return (pruned.trained * seconds_per_readout + estimate_seconds) / whole if whole else 0.0


def plan_transfers(
    targets: Sequence[str],
    sources: Sequence[str],
    orders: Sequence[int] = (2, 3),
    beams: Sequence[int] = (4, 4),
    baselines: Sequence[ReadoutKind] = BASELINES,
    replicates: int = 1,
    widen: float = 0.0,
    networks: int = 1,
) -> TransferPlan:
    """The plan for `targets` (tasks that are not source-only) from `sources` (every trained task),
    each task with `networks` Stage I network replicates (`network_replicate`)."""
    if len(orders) != len(beams):
        raise ValueError(f"one beam size per higher order: orders {tuple(orders)}, beams {tuple(beams)}")
    if any(k < 2 for k in orders) or len(set(orders)) != len(orders):
        raise ValueError(f"higher orders must be distinct and >= 2, got {tuple(orders)}")
    if any(b < k for k, b in zip(orders, beams, strict=True)):
        raise ValueError(
            f"each beam must be at least its order: orders {tuple(orders)}, beams {tuple(beams)}"
        )
    if ReadoutKind.TRANSFER in baselines:
        raise ValueError("transfer is not a baseline")
    if replicates < 1 or widen < 0 or networks < 1:
        raise ValueError(
            f"need replicates >= 1, widen >= 0 and networks >= 1, got {replicates}, {widen}, {networks}"
        )
    pairs = sorted(zip(orders, beams, strict=True))
    first = tuple(Readout(t, (s,)) for t in targets for s in sources)
    extra = tuple(baseline(t, kind) for t in targets for kind in ALL_BASELINES if kind in baselines)
    return TransferPlan(
        targets=tuple(targets),
        sources=tuple(sources),
        orders=tuple(k for k, _ in pairs),
        beams=tuple(b for _, b in pairs),
        first_order=first,
        baselines=extra,
        replicates=replicates,
        widen=widen,
        networks=networks,
    )


def estimate_seconds(readouts: int, seconds_per_readout: float, slots: int) -> float:
    """Wall time of `readouts` equal readouts on `slots` parallel slots, in waves."""
    return math.ceil(readouts / max(slots, 1)) * seconds_per_readout


def describe_plan(
    plan: TransferPlan, seconds_per_readout: float | None = None, slots: int = 1, stored: int = 0
) -> str:
    """The plan as printed before a run: counts per order and baseline, and the time estimate."""
    counts = plan.counts()
    lines = [f"Stage II plan: {len(plan.targets)} targets, {len(plan.sources)} sources"]
    lines += [f"  {name:<8} {n:>6} readouts" for name, n in counts.items()]
    lines.append(f"  {'total':<8} {sum(counts.values()):>6} ({plan.trained} trained)")
    if plan.pruned:
        lines.append(
            f"  pruned by estimate: {len(plan.pruned)} first-order readouts "
            f"({len(plan.audited)} kept as an audit of the estimate)"
        )
    if stored:
        lines.append(f"  already stored: {stored} (skipped)")
    if seconds_per_readout is not None:
        todo = max(plan.trained - stored, 0)
        eta = estimate_seconds(todo, seconds_per_readout, slots)
        lines.append(
            f"  estimate: {todo} readouts x {seconds_per_readout:.1f} s on {slots} slot(s) ~ {_hms(eta)}"
        )
    return "\n".join(lines)


def _hms(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
