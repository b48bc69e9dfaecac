"""A study's answer as typed values: the chosen taxonomy, how often each part of it comes back in
the draws of what a rerun would measure (`Stability`), and what can honestly be said about it
(`Verdict`). Stored and printed as JSON (`to_json` / `from_json`, the form `taxonomy.json` and
`taskatlas run --json` have), typed everywhere in between, so no module reads another's keys."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from components.taxonomy import Taxonomy

Shares = tuple[tuple[str, float], ...]  # ("a+b", share) pairs, most likely first


@dataclass(frozen=True)
class Stability:
    """Shares of the draws that choose each root, each target's sources ("a+b", or `self` for a
    root), and this exact taxonomy."""

    resamples: int
    roots: Mapping[str, float]
    transfers: Mapping[str, Mapping[str, float]]
    taxonomy: float
    seed: int | None = None  # `taskatlas solve --bootstrap`: the seed it drew with

    def root(self, task: str) -> float:
        return self.roots.get(task, 0.0)

    def edge(self, target: str, sources: str) -> float:
        return self.transfers.get(target, {}).get(sources, 0.0)

    @classmethod
    def from_json(cls, data: Mapping) -> Stability:
        return cls(
            int(data.get("resamples", 0)),
            dict(data["roots"]),
            {t: dict(s) for t, s in data["transfers"].items()},
            float(data["taxonomy"]),
            data.get("seed"),
        )

    def to_json(self) -> dict:
        out = {
            "roots": dict(self.roots),
            "transfers": {t: dict(s) for t, s in self.transfers.items()},
            "taxonomy": self.taxonomy,
            "resamples": self.resamples,
        }
        return out | ({"seed": self.seed} if self.seed is not None else {})


@dataclass(frozen=True)
class NoGain:
    """A chosen transfer that loses to a baseline: the baseline -> the share of draws saying so
    (None: no bootstrap, the point estimate lost)."""

    sources: str
    loses_to: Mapping[str, float | None]


@dataclass(frozen=True)
class Verdict:
    """What the report says beside the taxonomy (`components.verdict`)."""

    replicates: int  # readout replicates per candidate
    networks: int = 1  # network replicates per task (a study from before them had one)
    ties: Mapping[str, Shares] = field(default_factory=dict)  # target -> candidates with p_best >= TIE
    alternatives: Mapping[str, Shares] = field(default_factory=dict)  # target -> shaky edge's options
    no_gain: Mapping[str, NoGain] = field(default_factory=dict)

    @property
    def training_noise_measured(self) -> bool:
        return self.replicates > 1

    @property
    def network_noise_measured(self) -> bool:
        return self.replicates > 1 and self.networks > 1

    @classmethod
    def from_json(cls, data: Mapping) -> Verdict:
        def shares(d: Mapping) -> dict[str, Shares]:
            return {t: tuple((str(s), float(p)) for s, p in items) for t, items in d.items()}

        return cls(
            int(data.get("replicates", 1)),
            int(data.get("networks", 1)),
            shares(data.get("ties", {})),
            shares(data.get("alternatives", {})),
            {t: NoGain(g["sources"], dict(g["loses_to"])) for t, g in data.get("no_gain", {}).items()},
        )

    def to_json(self) -> dict:
        def listed(d: Mapping[str, Shares]) -> dict:
            return {t: [[s, p] for s, p in items] for t, items in d.items()}

        return {
            "replicates": self.replicates,
            "training_noise_measured": self.training_noise_measured,
            "networks": self.networks,
            "network_noise_measured": self.network_noise_measured,
            "ties": listed(self.ties),
            "alternatives": listed(self.alternatives),
            "no_gain": {
                t: {"sources": g.sources, "loses_to": dict(g.loses_to)} for t, g in self.no_gain.items()
            },
        }


@dataclass(frozen=True)
class StudyAnswer:
    """Stage IV's answer: the taxonomy, its stability (None without a bootstrap), the verdict, the
    transfers pruning kept from the BIP (None without pruning) and where the files are."""

    taxonomy: Taxonomy
    stability: Stability | None
    verdict: Verdict
    pruned: Mapping | None = None
    path: str = ""

    @property
    def roots(self) -> tuple[str, ...]:
        return self.taxonomy.roots

    @property
    def transfers(self) -> Mapping[str, tuple[str, ...]]:
        return self.taxonomy.transfers

    @classmethod
    def from_json(cls, data: Mapping, path: str = "") -> StudyAnswer:
        taxonomy = Taxonomy(
            data["budget"],
            data["max_order"],
            data["objective"],
            tuple(data["roots"]),
            {t: tuple(s) for t, s in data["transfers"].items()},
            {},
        )
        stability = Stability.from_json(data["stability"]) if data.get("stability") else None
        return cls(
            taxonomy, stability, Verdict.from_json(data.get("verdict") or {}), data.get("pruned"), path
        )

    def to_json(self) -> dict:
        """The JSON form of design.md section 6, with the stability, the verdict and the pruning."""
        out = self.taxonomy.to_dict()
        if self.stability is not None:
            out["stability"] = self.stability.to_json()
        out["verdict"] = self.verdict.to_json()
        if self.pruned is not None:
            out["pruned"] = self.pruned
        return out
