"""How sure the answer is, in words: ties said as ties, shaky edges as alternatives, useless
transfers flagged (design.md section 10). Pure and torch-free: the CLI, `taxonomy.json`, the
MLflow description and the picture all read the one dict `verdict` returns.

- A target's *ties*: its candidates (other than `self`) whose probability of being the best,
  over the multi-bootstrap's resamples, is at least `TIE`: the data cannot tell them apart.
- An edge chosen in fewer than `STABLE` of the resamples is stated with its alternatives,
  `reshading <- normal (0.55) or depth_euclidean + normal (0.40)`, not as one answer.
- A chosen transfer that loses to `random` (what architecture alone gives) or to `pixels` (no
  encoder) on most test images is flagged: that target gains nothing from transfer.
- With one replicate, the resamples saw only the test images, not how each readout happened to
  train: every report says training noise was not measured.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from components.vocabulary import SELF

STABLE = 0.9  # an edge or root chosen in at least this share of resamples is stated as the choice
TIE = 0.1  # candidates at least this likely to be the best are not distinguishable from it
ALTERNATIVE = 0.05  # alternatives of a shaky edge shown down to this share


def verdict(
    taxonomy: Mapping, stability: Mapping | None, affinity_rows: Iterable[Mapping], replicates: int
) -> dict:
    """`taxonomy`: the JSON form (`roots`, `transfers`); `stability`: `stability_of_rows`'s dict or
    None; `affinity_rows`: the affinity table as dicts (`target`, `sources`, and where measured
    `p_best`, `vs_random`, `gain`); `replicates`: readout replicates per candidate."""
    rows = {(r["target"], tuple(r["sources"])): r for r in affinity_rows}
    ties: dict[str, list] = {}
    for (target, sources), row in sorted(rows.items()):
        p = row.get("p_best")
        if sources != (SELF,) and p is not None and p == p and p >= TIE:
            ties.setdefault(target, []).append(["+".join(sources), round(float(p), 4)])
    for target in ties:
        ties[target].sort(key=lambda item: (-item[1], item[0]))
    alternatives, no_gain = {}, {}
    for target, sources in sorted(taxonomy["transfers"].items()):
        key = "+".join(sources)
        shares = (stability or {}).get("transfers", {}).get(target, {})
        if stability and shares.get(key, 0.0) < STABLE:
            alternatives[target] = [[s, round(v, 4)] for s, v in shares.items() if v >= ALTERNATIVE]
        row = rows.get((target, tuple(sources)), {})
        losing = {k: row[k] for k in ("vs_random", "gain") if row.get(k) is not None and row[k] == row[k]}
        if any(v < 0.5 for v in losing.values()):
            no_gain[target] = {"sources": key, **{k: round(float(v), 4) for k, v in losing.items()}}
    return {
        "replicates": replicates,
        "training_noise_measured": replicates > 1,
        "ties": ties,
        "alternatives": alternatives,
        "no_gain": no_gain,
    }


def edge_text(target: str, sources: Iterable[str], verdict_: Mapping, stability: Mapping | None) -> str:
    """`target <- a + b (0.97)`, or below STABLE the chosen sources first, then the alternatives
    by share (`self`: the target a root): the answer is what is read first, even where
    the resamples more often choose something else."""
    key = "+".join(sources)
    if target in verdict_.get("alternatives", {}):
        options = verdict_["alternatives"][target] or [[key, 0.0]]
        shares = dict((s, v) for s, v in options)
        chosen = shares.get(key, (stability or {}).get("transfers", {}).get(target, {}).get(key, 0.0))
        options = [[key, chosen], *([s, v] for s, v in options if s != key)]
        body = " or ".join(f"{_plus(s)} ({v:.2f})" for s, v in options)
    else:
        share = stability["transfers"].get(target, {}).get(key) if stability else None
        body = _plus(key) + (f" ({share:.2f})" if share is not None else "")
    flag = "  [no gain over random/pixels: this target gains nothing from transfer]"
    return f"{target} <- {body}" + (flag if target in verdict_.get("no_gain", {}) else "")


def ties_text(target: str, verdict_: Mapping) -> str:
    """`normal (0.55) ~ depth_euclidean (0.40)`: the candidates not distinguishable from the best."""
    return " ~ ".join(f"{_plus(s)} ({p:.2f})" for s, p in verdict_.get("ties", {}).get(target, []))


def noise_note(verdict_: Mapping) -> str:
    if verdict_.get("training_noise_measured"):
        return (
            f"uncertainty: a multi-bootstrap over {verdict_['replicates']} readout replicates (training "
            "seeds) and the test images"
        )
    return (
        "uncertainty: training noise was NOT measured (transfer.replicates: 1); the shares cover only "
        "which test images were drawn, and overstate how sure the answer is"
    )


def _plus(key: str) -> str:
    return key.replace("+", " + ")
