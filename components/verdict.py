"""How sure the answer is, in words: ties said as ties, shaky edges as alternatives, useless
transfers flagged (design.md section 10). Pure and torch-free: the CLI, `taxonomy.json`, the
MLflow description and the picture all read the one `Verdict` that `verdict` returns.

- A target's *ties*: its candidates (other than `self`) whose probability of being the best,
  over the multi-bootstrap's resamples, is at least `TIE`: the data cannot tell them apart.
- An edge chosen in fewer than `STABLE` of the resamples is stated with its alternatives,
  `reshading <- normal (0.55) or depth_euclidean + normal (0.40)`, not as one answer.
- A chosen transfer that loses to `random` (what architecture alone gives) or to `pixels` (no
  encoder) in at least `STABLE` of the resamples is flagged, naming the baseline and that share.
- With one replicate, the resamples saw only the test images, not how each readout happened to
  train: every report says training noise was not measured. With readout replicates but one
  network per task (`train.replicates: 1`), every readout read the same network, so how the
  networks happened to train is not in the intervals either: every report says that too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from components.affinity import BASELINE_FLAGS
from components.answer import NoGain, Stability, Verdict
from components.taxonomy import Taxonomy
from components.vocabulary import RANDOM, SELF

STABLE = 0.9  # an edge or root chosen in at least this share of resamples is stated as the choice
TIE = 0.1  # candidates at least this likely to be the best are not distinguishable from it
ALTERNATIVE = 0.05  # alternatives of a shaky edge shown down to this share


def verdict(
    taxonomy: Taxonomy,
    stability: Stability | None,
    affinity_rows: Iterable[Mapping],
    replicates: int,
    networks: int = 1,
) -> Verdict:
    """`stability`: None without a bootstrap; `affinity_rows`: the affinity table's rows
    (`target`, `sources`, and where measured `p_best`, `vs_random`, `gain`); `replicates`: readout
    replicates per candidate; `networks`: Stage I network replicates per task (`train.replicates`),
    read by the readout replicates."""
    rows = {(r["target"], tuple(r["sources"])): r for r in affinity_rows}
    ties: dict[str, list] = {}
    for (target, sources), row in sorted(rows.items()):
        p = row.get("p_best")
        if sources not in ((SELF,), (target,)) and p is not None and p == p and p >= TIE:
            ties.setdefault(target, []).append(("+".join(sources), round(float(p), 4)))
    alternatives, no_gain = {}, {}
    for target, sources in sorted(taxonomy.transfers.items()):
        key = "+".join(sources)
        if stability is not None and stability.edge(target, key) < STABLE:
            shares = stability.transfers.get(target, {})
            alternatives[target] = tuple((s, round(v, 4)) for s, v in shares.items() if v >= ALTERNATIVE)
        if loses := losing_baselines(rows.get((target, tuple(sources)), {})):
            no_gain[target] = NoGain(key, loses)
    ranked = {t: tuple(sorted(items, key=lambda item: (-item[1], item[0]))) for t, items in ties.items()}
    return Verdict(replicates, networks, ranked, alternatives, no_gain)


def losing_baselines(row: Mapping) -> dict[str, float]:
    """The baselines a transfer loses to, with the share of resamples that say so: `random`
    (`p_below_random`) and `pixels` (`p_no_gain`) where at least STABLE of the resamples have it
    win on fewer than half the images. Without resamples (no bootstrap), the point estimate's win
    rate below one half, with share None: nothing measured how sure that is."""
    loses: dict[str, float] = {}
    for baseline, share, win_rate in BASELINE_FLAGS:
        p, w = row.get(share), row.get(win_rate)
        if p is not None and p == p:
            if p >= STABLE:
                loses[baseline] = round(float(p), 4)
        elif w is not None and w == w and w < 0.5:
            loses[baseline] = None
    return loses


def edge_text(target: str, sources: Iterable[str], verdict_: Verdict, stability: Stability | None) -> str:
    """`target <- a + b (0.97)`, or below STABLE the chosen sources first, then the alternatives
    by share (`self`: the target a root): the answer is what is read first, even where
    the resamples more often choose something else."""
    key = "+".join(sources)
    if target in verdict_.alternatives:
        options = verdict_.alternatives[target] or ((key, 0.0),)
        shares = dict(options)
        chosen = shares.get(key, stability.edge(target, key) if stability else 0.0)
        options = ((key, chosen), *((s, v) for s, v in options if s != key))
        body = " or ".join(f"{_plus(s)} ({v:.2f})" for s, v in options)
    else:
        share = stability.transfers.get(target, {}).get(key) if stability else None
        body = _plus(key) + (f" ({share:.2f})" if share is not None else "")
    flag = ""
    if target in verdict_.no_gain and (loses := verdict_.no_gain[target].loses_to):
        said = " and ".join(
            name + ("" if p is None else f" ({p:.2f} of resamples)") for name, p in loses.items()
        )
        flag = f"  [loses to {said}: " + (
            "no better than a random encoder]" if RANDOM in loses else "no better than training from pixels]"
        )
    return f"{target} <- {body}" + flag


def ties_text(target: str, verdict_: Verdict) -> str:
    """`normal (0.55) ~ depth_euclidean (0.40)`: the candidates not distinguishable from the best."""
    return " ~ ".join(f"{_plus(s)} ({p:.2f})" for s, p in verdict_.ties.get(target, ()))


def noise_note(verdict_: Verdict) -> str:
    """What the intervals and shares cover, in one sentence."""
    if not verdict_.training_noise_measured:
        return (
            "uncertainty: training noise was NOT measured (transfer.replicates: 1); the shares cover only "
            "which test images were drawn, and overstate how sure the answer is"
        )
    readouts = (
        f"uncertainty: a multi-bootstrap over {verdict_.replicates} readout replicates (training seeds)"
    )
    if verdict_.networks > 1:
        return f"{readouts}, reading {verdict_.networks} network replicates per task, and the test images"
    return (
        f"{readouts} and the test images; networks: 1 training run each (train.replicates: 1): how "
        "the networks trained is not in the intervals"
    )


def _plus(key: str) -> str:
    return key.replace("+", " + ")
