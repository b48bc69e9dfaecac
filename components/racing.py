"""Racing readout replicates: another replicate only where it can change the answer.

Replicates are what make the shares honest (the multi-bootstrap over how each readout trained),
and most of them are spent on candidates no resample would ever choose. Racing (Maron & Moore's
Hoeffding races; successive elimination, the idea behind Ray Tune's ASHA) samples more only
where the decision is still open: round 0 trains one replicate of every readout; after each
round, the multi-bootstrap's `p_best` (each candidate's share of resamples in which it is its
target's best) says which candidates are still in the race. Pure: rows in, names out; Stage II
(`pipelines.stage2.run`) trains what this asks for.

A target is *settled* when one candidate is the best in at least `settled` of the resamples and
that candidate's training noise was measured (two replicates or more): with one replicate the
resamples see only the test images, and are surer than a rerun would be. Otherwise its
candidates with `p_best` >= `p_best` race on, and, until they have two replicates, its `top`
candidates by affinity too (the shares that left them out did not know how they train), with
`self` (the bar a root is scored by; scored, not trained: cheap) and the baselines a flag of a
racing candidate still depends on: `random` where its `p_below_random` is open, `pixels` (the
no-gain flag's reference) where its `p_no_gain` is (open: at least `p_best`, below `settled`).
With `flags` below 1, a candidate whose flag share is in [`flags`, `settled`) races too, with
that flag's baseline, in any target, settled or not: another replicate may make the flag a claim
stated at >= 0.9, where borrowed noise alone leaves it below (benchmarks/racing.py). A
baseline, or the target's own encoder (`t <- t`), that decides nothing keeps its replicates. A candidate
left behind keeps the replicates it has; with one, the multi-bootstrap lends it the training noise
its target's raced candidates measured (`components.resampling.unmeasured_shifts`), so the shares
that left it behind still allow for how it might have trained.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from components.affinity import BASELINE_FLAGS
from components.vocabulary import SELF

FLAGS = tuple(share for _, share, _ in BASELINE_FLAGS)  # the shares of the flags `random` and `pixels` decide
Candidate = tuple[str, tuple[str, ...]]  # (target, sources)


def contested(
    rows: Iterable[Mapping],
    replicates: Mapping[tuple[str, tuple[str, ...]], int],
    p_best: float = 0.1,
    settled: float = 0.98,
    top: int = 2,
    flags: float = 0.85,
) -> dict[str, set[tuple[str, ...]]]:
    """Affinity rows (`target`, `sources`, `affinity`, `p_best`: NaN for `self` and `t <- t`,
    which do not compete; `p_below_random` and `p_no_gain` where known) and each (target,
    sources)'s replicates so far -> target -> the source sets (baselines as `(self,)`...) to
    train another replicate of. `flags`: a candidate whose flag share is at least this (and below
    `settled`) races too, with the flag's baseline: one more replicate may make it a claim stated
    at >= 0.9 (1: flags race only with their candidate). A target whose rows carry no `p_best` (no
    bootstrap) cannot be raced: it is left out."""
    if not 0 < p_best <= settled <= 1 or top < 1 or not 0 < flags <= 1:
        raise ValueError(
            "racing: need 0 < p_best <= settled <= 1, top >= 1 and 0 < flags <= 1, "
            f"got {p_best}, {settled}, {top}, {flags}"
        )
    shares: dict[str, dict[tuple[str, ...], tuple[float, float]]] = {}
    flags_of: dict[Candidate, dict[str, float]] = {}  # the baseline flags' shares (NaN: none)
    for row in rows:
        p = row.get("p_best")
        if p is None or math.isnan(p):
            continue
        shares.setdefault(row["target"], {})[tuple(row["sources"])] = (float(p), float(row["affinity"]))
        flags_of[row["target"], tuple(row["sources"])] = {
            k: float(v) for k in FLAGS if (v := row.get(k)) is not None and v == v
        }
    out: dict[str, set[tuple[str, ...]]] = {}
    for target, candidates in sorted(shares.items()):
        open_flags = {
            s for s in candidates if any(flags <= v < settled for v in flags_of[target, s].values())
        }
        measured = {s for s in candidates if replicates.get((target, s), 1) > 1}
        best = max(candidates, key=lambda s: (candidates[s][0], candidates[s][1]))
        racing, baselines = set(open_flags), set()
        if candidates[best][0] < settled or best not in measured:  # the target's best is still open
            racing |= {s for s, (p, _) in candidates.items() if p >= p_best}
            ranked = sorted(candidates, key=lambda s: (-candidates[s][1], s))[:top]
            racing |= {s for s in ranked if s not in measured}
            baselines.add((SELF,))
        for baseline, flag, _ in BASELINE_FLAGS:
            if any(p_best <= flags_of[target, s].get(flag, 0.0) < settled for s in racing):
                baselines.add((baseline,))
        if racing or baselines:
            out[target] = racing | baselines
    return out


def next_round(
    counts: Mapping[Candidate, int],
    still: Mapping[str, set[tuple[str, ...]]],
    k: int,
    most: Mapping[Candidate, int],
) -> list[Candidate]:
    """The candidates that train replicate k: those still in their target's race (`contested`)
    that raced every earlier round (they have replicates 0..k-1: successive elimination, so the
    multi-bootstrap reads each candidate's replicates 0..R_c - 1) and may have more than k
    (`most`: `transfer.replicates`, or 1 for `self` without network replicates)."""
    return sorted(c for c, n in counts.items() if n == k and c[1] in still.get(c[0], ()) and most[c] > k)
