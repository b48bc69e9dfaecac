"""The study's answer in words: the markdown that the parent MLflow run shows as its description.

A researcher who opens the run should read what was chosen and why without opening a file: the
roots to label, where every other target gets its representation (with its affinity and, with
the bootstrap, how often that choice comes back), and each target's best sources.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from components.affinity import top_sources
from components.answer import StudyAnswer
from components.verdict import STABLE, edge_text, noise_note, ties_text
from components.vocabulary import ALL_BASELINES, SELF

BASELINE_NAMES = frozenset(k.value for k in ALL_BASELINES)


def answer_markdown(
    answer: StudyAnswer,
    affinity: pa.Table,
    run: tuple[str, str],
    artifacts: Sequence[str] = (),
    top: int = 3,
) -> str:
    """`answer` is Stage IV's; `affinity` the table; `artifacts` the files on `run`, (experiment
    id, run id): the pictures among them are linked to the UI's artifact viewer (the REST
    `get-artifact` answers with a download, not a picture)."""
    stability, said, taxonomy = answer.stability, answer.verdict, answer.taxonomy
    value = {
        (row["target"], "+".join(row["sources"])): row["affinity"]
        for row in affinity.select(["target", "sources", "affinity"]).to_pylist()
    }

    def share(target: str, sources: str) -> str:
        return f"{stability.edge(target, sources):.2f}" if stability else "-"

    roots = ", ".join(
        f"**{r}**" + (f" ({stability.root(r):.2f})" if stability else "") for r in taxonomy.roots
    )
    lines = [
        f"### Taxonomy: budget {taxonomy.to_dict()['budget']}, max order {taxonomy.max_order}, "
        f"objective {taxonomy.objective:.4g}",
        "",
        f"Label these tasks (the roots): {roots}.",
    ]
    if stability:
        lines.append(
            f"This exact taxonomy comes back in {stability.taxonomy:.0%} of {stability.resamples} "
            "draws of what a rerun would measure (numbers in brackets: the share of draws choosing that "
            f"root or edge; an edge below {STABLE} is given with its alternatives)."
        )
    lines.append(f"*{noise_note(said)}.*")
    lines += ["", "| target | gets its representation from | affinity | stability |", "|---|---|---|---|"]
    targets = sorted({t for t, _ in value})
    for target in targets:
        sources = "+".join(taxonomy.transfers.get(target, [SELF]))
        label = f"{SELF} (a root: labelled)" if sources == SELF else sources.replace("+", " + ")
        if sources != SELF:
            label = edge_text(target, sources.split("+"), said, stability).split(" <- ", 1)[1]
        aff = value.get((target, sources), float("nan"))
        lines.append(f"| {target} | {label} | {aff:.3f} | {share(target, sources)} |")
    lines += ["", "For a root, the affinity is that of its own fully supervised network (`self`)."]
    measured_sources = {s for row in affinity.select(["sources"]).to_pylist() for s in row["sources"]}
    if only_sources := sorted(measured_sources - set(targets) - {SELF, *BASELINE_NAMES}):
        lines.append(f"Sources only, never targets, so not in the tables: {', '.join(only_sources)}.")
    if said.ties:
        lines += ["", "Not distinguishable from the best (each one's probability of being the best):", ""]
        lines += [f"- {target}: {ties_text(target, said)}" for target in said.ties]
    lines += ["", f"### The {top} best sources of each target (affinity; higher is better)", ""]
    lines += ["| target | " + " | ".join(f"#{i + 1}" for i in range(top)) + " |", "|---" * (top + 1) + "|"]
    for target, best in top_sources(affinity, top).items():
        cells = [f"{'+'.join(s)} ({a:.3f})" for s, a in best] + [""] * (top - len(best))
        lines.append(f"| {target} | " + " | ".join(cells) + " |")
    pictures = {"taxonomy.png": "taxonomy", "affinity_heatmap.png": "affinity heatmap"}
    viewer = "#/experiments/{}/runs/{}/artifacts/".format(*run)  # the UI's route to a run's artifact
    links = [f"[{pictures[n]}]({viewer}{n})" for n in artifacts if n in pictures]
    if artifacts:  # only what is on this run: the `affinity` and `taxonomy` runs hold the rest
        shown = f"Pictures: {', '.join(links)}. " if links else ""
        lines += ["", shown + f"In this run's Artifacts tab: {', '.join(f'`{n}`' for n in artifacts)}."]
    return "\n".join(lines)
