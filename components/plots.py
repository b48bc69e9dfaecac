"""Pictures of Stages III and IV, drawn with matplotlib only (no Graphviz binary needed).

Figures are built with `matplotlib.figure.Figure` and the Agg canvas directly, never pyplot, so
nothing depends on a display or on pyplot's global state.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from components.answer import Stability, Verdict
from components.taxonomy import SweepPoint, Taxonomy
from components.vocabulary import BASELINE_NAMES, RANDOM, SELF

_ORDER_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")
_ROOT_Y, _TARGET_Y, _JUNCTION_Y = 1.0, 0.0, 0.45


def plot_affinity_heatmap(affinity: pa.Table, path: str | Path) -> Path:
    """First-order sources (rows) x targets (columns), log colour scale; blank = not measured."""
    rows = affinity.filter(pc.equal(affinity["order"], 1)).to_pylist()
    targets = sorted({r["target"] for r in rows})
    names = {r["sources"][0] for r in rows}
    sources = [n for n in (SELF,) if n in names] + sorted(names - {SELF, RANDOM})
    sources += [n for n in (RANDOM,) if n in names]
    matrix = np.full((len(sources), len(targets)), np.nan)
    for r in rows:
        matrix[sources.index(r["sources"][0]), targets.index(r["target"])] = r["affinity"]
    positive = matrix[np.isfinite(matrix) & (matrix > 0)]
    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size else None

    fig = Figure(figsize=(1.5 + 0.35 * len(targets), 1.5 + 0.3 * len(sources)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(matrix), norm=norm, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(targets)), targets, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(sources)), sources, fontsize=8)
    ax.set_xlabel("target")
    ax.set_ylabel("source")
    ax.set_title("AHP affinity (first order)")
    fig.colorbar(image, ax=ax, label="affinity")
    return _save(fig, path)


def plot_taxonomy(
    taxonomy: Taxonomy, path: str | Path, stability: Stability | None = None, verdict: Verdict | None = None
) -> Path:
    """Roots on top, the other targets below; a transfer from k > 1 sources is a hyper-edge that
    joins its sources at a dot before the arrow into the target. Colour = transfer order. With a
    bootstrap `stability`, each edge and root is labelled with the fraction of resamples that
    choose it; with a `verdict` (`components.verdict`), an edge below its stable share is dashed
    and a transfer that gains nothing over `random`/`pixels` is marked with a cross."""
    shaky, useless = (set(verdict.alternatives), set(verdict.no_gain)) if verdict else (set(), set())
    roots = list(taxonomy.roots)
    root_x = {r: float(i) for i, r in enumerate(roots)}
    targets = sorted(
        taxonomy.transfers, key=lambda t: (np.mean([root_x[s] for s in taxonomy.transfers[t]]), t)
    )
    width = max(len(roots), len(targets), 2)
    root_x = {r: _spread(i, len(roots), width) for i, r in enumerate(roots)}
    target_x = {t: _spread(i, len(targets), width) for i, t in enumerate(targets)}

    fig = Figure(figsize=(max(6.0, 0.75 * width + 1.5), 5.0), layout="constrained")
    ax = fig.add_subplot()
    orders = sorted({len(s) for s in taxonomy.transfers.values()})
    for target, sources in taxonomy.transfers.items():
        colour = _ORDER_COLOURS[(len(sources) - 1) % len(_ORDER_COLOURS)]
        style = "--" if target in shaky else "-"
        end = (target_x[target], _TARGET_Y + 0.04)
        if len(sources) == 1:
            start = (root_x[sources[0]], _ROOT_Y - 0.04)
        else:
            start = (np.mean([root_x[s] for s in sources] + [target_x[target]]), _JUNCTION_Y)
            for s in sources:
                ax.plot(
                    [root_x[s], start[0]], [_ROOT_Y - 0.04, start[1]], style, color=colour, lw=1.2, alpha=0.8
                )
            ax.plot(*start, "o", color=colour, ms=5)
        arrow = {"arrowstyle": "-|>", "color": colour, "lw": 1.2, "linestyle": style}
        ax.annotate("", xy=end, xytext=start, arrowprops=arrow)
        if stability:
            share = stability.edge(target, "+".join(sources))
            mid = ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2)
            ax.text(
                *mid,
                f"{share:.2f}",
                fontsize=7,
                color=colour,
                ha="center",
                va="center",
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
            )

    supervised = set(taxonomy.affinity)
    for r, x in root_x.items():
        ax.plot(x, _ROOT_Y, "s", ms=11, color="#2a9d8f" if r in supervised else "#9e9e9e", zorder=3)
        share = f" ({stability.root(r):.2f})" if stability else ""
        ax.text(x, _ROOT_Y + 0.07, r + share, rotation=35, ha="left", va="bottom", fontsize=8)
    for t, x in target_x.items():
        ax.plot(x, _TARGET_Y, "o", ms=10, color="#f4a261", zorder=3)
        if t in useless:  # a transfer that loses to random or pixels: nothing gained
            ax.plot(x, _TARGET_Y, "x", ms=9, color="#c0392b", mew=2, zorder=4)
        label = f"{t} ({taxonomy.affinity[t]:.3g})"
        ax.text(x, _TARGET_Y - 0.07, label, rotation=35, ha="right", va="top", fontsize=8)

    kinds = [("#2a9d8f", "root (supervised target)", supervised & set(roots))]
    kinds += [
        ("#9e9e9e", "root (not a target)", set(roots) - supervised),
        ("#f4a261", "target (affinity)", targets),
    ]
    handles = [
        Line2D([], [], marker="s", ls="", color=c, label=label) for c, label, used in kinds if used
    ] + [
        Line2D([], [], color=_ORDER_COLOURS[(k - 1) % len(_ORDER_COLOURS)], label=f"order {k}")
        for k in orders
    ]
    if shaky:
        handles.append(Line2D([], [], ls="--", color="#555555", label="below 0.9: see alternatives"))
    if useless:
        handles.append(Line2D([], [], marker="x", ls="", color="#c0392b", label="no gain over random/pixels"))
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    ax.set_xlim(-0.8, width - 0.2)
    ax.set_ylim(-0.9, 1.5)
    ax.set_axis_off()
    title = f"taxonomy: budget {taxonomy.budget:g}, max order {taxonomy.max_order}, objective {taxonomy.objective:.4g}"
    if stability:
        title += f"\nin {stability.taxonomy:.0%} of {stability.resamples} bootstrap resamples"
        title += "; labels: share per root and edge"
    if verdict and not verdict.training_noise_measured:
        title += "\ntraining noise NOT measured (transfer.replicates: 1)"
    elif verdict and verdict.networks == 1:
        title += "\nnetworks: 1 training run each (train.replicates: 1): not in the shares"
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_sweep(points: Sequence[SweepPoint], path: str | Path, max_order: int) -> Path:
    """Objective vs budget: where the curve flattens, more supervision buys little."""
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    solved = [p for p in points if p.taxonomy is not None]
    ax.plot([p.budget for p in solved], [p.objective for p in solved], "o-", label="optimal objective")
    if infeasible := [p.budget for p in points if p.taxonomy is None]:
        bottom = min((p.objective for p in solved), default=0.0)
        ax.plot(infeasible, [bottom] * len(infeasible), "x", color="#c44e52", label="infeasible")
    ax.set_xlabel("budget (cost of the roots)")
    ax.set_ylabel("objective")
    ax.set_title(f"taxonomy objective vs budget (max order {max_order})")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _spread(i: int, n: int, width: int) -> float:
    """x of item i of n, centred on a row of `width` slots."""
    return i + (width - n) / 2


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    return path


def plot_position(
    target: str, rows: Sequence[dict], path: str | Path, chosen: Sequence[str] = (), limit: int = 20
) -> Path:
    """A positioned task's candidates ranked by affinity, with their 95% intervals (horizontal
    bars, best on top); baselines grey, the model's sources outlined in black."""
    rows = sorted(rows, key=lambda r: -r["affinity"])[:limit]
    names = ["+".join(r["sources"]) for r in rows]
    baselines = BASELINE_NAMES
    fig = Figure(figsize=(6.5, 1.2 + 0.28 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(rows))[::-1]
    aff = np.array([r["affinity"] for r in rows])
    lo = np.array([r.get("affinity_lo", np.nan) for r in rows])
    hi = np.array([r.get("affinity_hi", np.nan) for r in rows])
    colours = [
        "#999999" if n in baselines else _ORDER_COLOURS[len(r["sources"]) - 1]
        for n, r in zip(names, rows, strict=True)
    ]
    edges = ["black" if tuple(r["sources"]) == tuple(chosen) else "none" for r in rows]
    ax.barh(y, aff, color=colours, edgecolor=edges, linewidth=1.5)
    if np.isfinite(lo).any():
        err = np.vstack([np.clip(aff - lo, 0, None), np.clip(hi - aff, 0, None)])
        ax.errorbar(aff, y, xerr=np.nan_to_num(err), fmt="none", ecolor="black", capsize=2, lw=0.8)
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlabel("AHP affinity (95% interval)")
    ax.set_title(f"where {target} sits: its sources, best first")
    return _save(fig, path)
