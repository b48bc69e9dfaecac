"""Are the stated shares probabilities? Rerun one study K times on fresh seeds and check.

    .venv/bin/python benchmarks/calibration.py                       # the quickstart, 6 runs, seeds 100-105
    .venv/bin/python benchmarks/calibration.py --full-rerun          # networks, readouts, analysis: all new
    .venv/bin/python benchmarks/calibration.py --seeds 200,201,202   # seeds of your own
    .venv/bin/python benchmarks/calibration.py --set transfer.replicates=1   # the image-only bootstrap
    .venv/bin/python benchmarks/calibration.py -c tiny.yaml --runs 2 --full-rerun --root /tmp/cal  # smoke
    .venv/bin/python benchmarks/calibration.py --full-rerun --root R --set transfer.race.enabled=true
        # on a root whose full studies are trained: the raced ones reuse their readouts (same keys)

Every run is `taskatlas run --json` on one storage root. Run k takes seed s_k (`--seeds`, default
100, 101, ...: the quickstart's settings were chosen looking at readout seeds 0-3, so those would
make the figures in sample) as its `transfer.seed` (every readout's seed and the `random` encoder)
and `analysis.seed`, and scores on its own random half of the test images
(`analysis.test_subset=0.5`, drawn by `analysis.seed`: `pipelines/analysis/run.in_test_subset`).
By default the task networks are trained once and shared (`train.seed` as configured): the runs
differ in readouts, bootstrap and test images. `--full-rerun` also sets `train.seed=s_k`, so
each run trains its own networks (the step keys hold every seed, so the runs share a root
without colliding: Stage I keys `train.seed`, Stage II `transfer.seed` and the networks' keys,
Stage III `analysis`). Report the two modes side by side: the JSON says which (`full_rerun`).

Why random halves: the reruns share the study's test images, so without them the image part of
each share (the bootstrap's resamples of test images) never had to come true. A run's bootstrap
resamples its own half, so its shares speak of a fresh half-size test set; another run's half is
an independent draw of the same size. Two halves still share about half their images (with
fraction f, a share f of each subset), so the check of the image part is milder than against
disjoint test sets; a smaller `--test-subset` shares less at the cost of noisier runs.

Definitions (`claims`, `calibration`). A run *chooses* its taxonomy's roots ("root", task) and,
per target it does not make a root, its source set ("edge", target, sources); a root is one
choice (the `self` entry of a target's transfer shares is the same fact, and is dropped). The
rest of its answer is its affinity table (`affinity_choices`), which states per candidate a
share of a rerun's draws for three more kinds of choice: ("best", target, sources), the
candidate with the target's highest affinity (`p_best`; `self` and `t <- t` do not compete);
("below_random", ...), a source set that wins on fewer than half the images against `random`
(`p_below_random`); ("no_gain", ...), the same against `pixels` (`p_no_gain`). Only transfers
are flagged, not the baselines (`random` losing to `pixels` is no finding about transfer). A run
chooses them by its point estimates. Its
stated share p_i(c) of a choice c is the share of its resamples that chose c. A *claim* is
(run i, choice c, p_i(c)) for each c with p_i(c) > 0. It *holds* in run j != i when run j chose
c; its hold rate is the mean over the K - 1 other runs, for a flag over the other runs that
trained that transfer (`flags_measured`: a higher order is trained only where a run's beam takes
its sources in; counting a run that never trained it as a failed check made second-order flags
look over-sure). The choices some run chose or gave a
share to, to which run i gave none, are run i's *unstated* options: reported apart (`unstated`,
their hold rate), not in the low bin.

Figures, on the last line as one JSON object:
- `reliability`: per bin of stated share, the claims in it, their mean share, their mean hold
  rate and its 95% Wilson interval;
- `high_confidence_hold_rate`: mean hold rate of claims stated at >= 0.9 (goal >= 0.85, with at
  least 6 such claims); `low_confidence_false_rate`: of claims stated at <= 0.1 (goal <= 0.15);
- Wilson intervals (`*_interval`) take n = the number of claims and the mean hold rate as the
  observed share. Each claim is checked against the other runs (a flag: those that trained its
  transfer), but those checks share the claim and each other run, so counting every check as a
  Bernoulli trial (n = `checks`) would overstate
  the evidence; n = claims is the more cautious choice (claims of one run are not independent
  either, so the interval is still a floor on the uncertainty);
- `brier`: the mean over claims and other runs of (p - held)^2, held 0 or 1;
- `by_kind`: the same high, low and Brier figures per kind of choice (`KINDS`), so that a
  headline carried by one kind shows; `taxonomy` the same for roots and edges together;
- `exact_claimed`: the runs' mean share for "this exact taxonomy"; `exact_agreement`: the share
  of pairs of runs that chose the same taxonomy; `exact_gap`: their difference (goal <= 0.15);
- `seconds`: the whole benchmark's wall time; `stage2_seconds`: the median run after the first
  when the networks are shared (Stage II to IV); `networks_trained`: per run, how many task
  networks it trained (every study task's with `--full-rerun`, unless a root already held them);
  `readouts`: per run, the readouts its study holds (trained or reused; a raced study's fewer);
- `win_rate_spread`: how far replicates disagree, the mean over runs, targets and pairs of
  trained candidates of the standard deviation over replicates r of the win rate of replicate r
  of one against replicate r of the other (paired replicates share a seed: `transfer.pairing`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from components.affinity import BASELINE_FLAGS, P_BEST
from components.vocabulary import PIXELS, RANDOM, SELF

ROOT = Path(__file__).resolve().parents[1]
BINS = ((0.0, 0.1), (0.1, 0.3), (0.3, 0.5), (0.5, 0.7), (0.7, 0.9), (0.9, 1.0))
HIGH, LOW = 0.9, 0.1  # claims stated at >= HIGH, and at <= LOW
GOALS = {  # the issue's
    "high_confidence_hold_rate": 0.85,  # at least
    "high_confidence_claims": 6,  # at least, for the figure above to count
    "low_confidence_false_rate": 0.15,  # at most
    "exact_gap": 0.15,  # at most
}
Z95 = 1.959963984540054  # the normal quantile of 0.975
DEFAULT_FIRST_SEED = 100  # the quickstart's settings were chosen on seeds 0-3
TUNED_SEEDS = range(4)

Choice = tuple[str, str, str]  # ("root", task, "") or (kind, target, "+"-joined sources)
TAXONOMY_KINDS = ("root", "edge")
FLAG_KINDS = {RANDOM: "below_random", PIXELS: "no_gain"}  # the claim's kind of each baseline's flag
# the flags read from a run's affinity table: (kind, its share's column, the point estimate's column)
FLAGS = tuple((FLAG_KINDS[baseline], share, win_rate) for baseline, share, win_rate in BASELINE_FLAGS)
BASELINES = tuple(FLAG_KINDS)  # not transfers: never flagged (`random` still competes for best)
KINDS = (*TAXONOMY_KINDS, "best", *(kind for kind, *_ in FLAGS))


@dataclass(frozen=True)
class Claim:
    run: int
    choice: Choice
    share: float  # p_i(c) > 0 (0 for an unstated option)
    held: tuple[bool, ...]  # per other run, in run order: did it choose the choice

    @property
    def hold_rate(self) -> float:
        return sum(self.held) / len(self.held)


def taxonomy_choices(taxonomy: dict) -> set[Choice]:
    """The taxonomy a run chose: its roots, and each served target's source set (a root once)."""
    made = {("root", r, "") for r in taxonomy["roots"]}
    return made | {("edge", t, "+".join(s)) for t, s in taxonomy["transfers"].items()}


def _number(value) -> float | None:
    return None if value is None or value != value else float(value)


def affinity_choices(rows: list[dict]) -> tuple[set[Choice], dict[Choice, float], set[Choice]]:
    """(made, stated, measured) of an affinity table's rows: per target the candidate of highest
    affinity among those with a `p_best` ("best"), and each source set whose win rate against
    `random` (`gain`: against `pixels`) is below one half ("below_random", "no_gain"); the shares
    are the table's `p_best`, `p_below_random` and `p_no_gain` where above 0; `measured`: every
    flag the table could state, one per transfer it measured against that baseline."""
    made, shares, best, measured = set(), {}, {}, set()
    for row in rows:
        target, key = row["target"], "+".join(row["sources"])
        if (p := _number(row.get(P_BEST))) is not None:  # NaN: self and t <- t do not compete
            best.setdefault(target, []).append((row["affinity"], key))
            shares[("best", target, key)] = p
        for kind, share, estimate in FLAGS:
            p, w = _number(row.get(share)), _number(row.get(estimate))
            if key in (SELF, target, *BASELINES) or p is None or w is None:
                continue
            shares[(kind, target, key)] = p
            measured.add((kind, target, key))
            if w < 0.5:
                made.add((kind, target, key))
    made |= {("best", t, max(candidates)[1]) for t, candidates in best.items()}
    return made, {c: p for c, p in shares.items() if p > 0}, measured


def is_flag(choice: Choice) -> bool:
    """A flag on a transfer (`below_random`, `no_gain`), not a taxonomy choice or a best."""
    return choice[0] in FLAG_KINDS.values()


def flags_measured(run: dict) -> set[Choice]:
    """The flags a run could check: those on the transfers it trained. A higher order is
    trained only where a run's beam takes its sources in, so it is measured in some runs only."""
    return affinity_choices(run.get("affinity_rows", []))[2]


def choices(run: dict) -> set[Choice]:
    """The choices a run made: its taxonomy, and what its affinity table's point estimates say."""
    return taxonomy_choices(run) | affinity_choices(run.get("affinity_rows", []))[0]


def stated(run: dict) -> dict[Choice, float]:
    """The shares a run gave (> 0): each root, and each source set its resamples chose for a
    target, less `self` (the target as a root, already a root's share); and its affinity table's."""
    s = run["stability"]
    out = {("root", r, ""): p for r, p in s["roots"].items()}
    for target, shares in s["transfers"].items():
        out |= {("edge", target, key): p for key, p in shares.items() if key != SELF}
    return {c: p for c, p in out.items() if p > 0} | affinity_choices(run.get("affinity_rows", []))[1]


def claims(runs: list[dict]) -> tuple[list[Claim], list[Claim]]:
    """(claims, unstated options) of the runs' taxonomy dicts (each with `stability`): every
    (run i, choice c, p_i(c) > 0), and every choice some run chose or stated to which run i gave
    no share, each with whether every other run chose it. A flag says what a transfer does
    where it is trained: it is checked only against the other runs that trained that transfer
    (a run whose beam left it out says nothing of it), and is no option of a run that did not."""
    if len(runs) < 2:
        raise ValueError("calibration needs at least 2 runs")
    made = [choices(t) for t in runs]
    shares = [stated(t) for t in runs]
    measured = [flags_measured(t) for t in runs]
    universe = sorted(set().union(*made, *shares))
    claimed, unstated = [], []
    for i, share in enumerate(shares):
        for c in universe:
            flag = is_flag(c)
            if flag and c not in measured[i]:
                continue
            others = [m for j, m in enumerate(made) if j != i and (not flag or c in measured[j])]
            if not others:  # no other run trained it: nothing to check it against
                continue
            claim = Claim(i, c, share.get(c, 0.0), tuple(c in m for m in others))
            (claimed if claim.share > 0 else unstated).append(claim)
    return claimed, unstated


def bin_of(p: float) -> tuple[float, float]:
    """The reliability bin of a stated share: (0, 0.1], (0.1, 0.3], ..., (0.7, 0.9), [0.9, 1]."""
    if p >= HIGH:
        return BINS[-1]
    return next(b for b in BINS if p <= b[1])


def wilson(rate: float, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of an observed share `rate` of n trials (None for n = 0)."""
    if n == 0:
        return None
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def brier(claimed: list[Claim]) -> float | None:
    """Mean over claims and other runs of (share - held)^2."""
    checks = [(c.share - h) ** 2 for c in claimed for h in c.held]
    return statistics.fmean(checks) if checks else None


def exact_agreement(runs: list[dict]) -> float:
    """The share of pairs of runs that chose the same taxonomy (the same roots and source sets)."""
    made = [taxonomy_choices(t) for t in runs]
    return statistics.fmean(a == b for a, b in itertools.combinations(made, 2))


def hold_figures(claimed: list[Claim]) -> dict:
    """n, mean share, mean hold rate and its Wilson interval (n = claims) of a group of claims."""
    rate = statistics.fmean(c.hold_rate for c in claimed) if claimed else None
    return {
        "claims": len(claimed),
        "stated": statistics.fmean(c.share for c in claimed) if claimed else None,
        "held": rate,
        "interval": wilson(rate, len(claimed)) if claimed else None,
    }


def kind_figures(claimed: list[Claim]) -> dict:
    """Claims, the high and low figures and Brier of one kind of choice."""
    high = hold_figures([c for c in claimed if c.share >= HIGH])
    low = hold_figures([c for c in claimed if c.share <= LOW])
    return {
        "claims": len(claimed),
        "high_claims": high["claims"],
        "high_held": high["held"],
        "high_interval": high["interval"],
        "low_claims": low["claims"],
        "low_true": low["held"],
        "brier": brier(claimed),
    }


def calibration(runs: list[dict]) -> dict:
    """The figures of the module docstring (unrounded) from the runs' taxonomy dicts."""
    claimed, unstated = claims(runs)
    reliability = [
        {"bin": f"{lo:.1f}-{hi:.1f}"} | hold_figures([c for c in claimed if bin_of(c.share) == (lo, hi)])
        for lo, hi in BINS
    ]
    high = hold_figures([c for c in claimed if c.share >= HIGH])
    low = hold_figures([c for c in claimed if c.share <= LOW])
    rest = hold_figures(unstated)
    groups = {kind: (kind,) for kind in KINDS} | {"taxonomy": TAXONOMY_KINDS}
    by_kind = {
        name: kind_figures([c for c in claimed if c.choice[0] in kinds]) for name, kinds in groups.items()
    }
    exact_claimed = statistics.fmean(t["stability"]["taxonomy"] for t in runs)
    agreement = exact_agreement(runs)
    return {
        "reliability": reliability,
        "claims": len(claimed),
        "checks": sum(len(c.held) for c in claimed),
        "wilson_n": "claims",
        "high_confidence_hold_rate": high["held"],
        "high_confidence_claims": high["claims"],
        "high_confidence_interval": high["interval"],
        "low_confidence_false_rate": low["held"],
        "low_confidence_claims": low["claims"],
        "low_confidence_interval": low["interval"],
        "unstated": rest["claims"],
        "unstated_hold_rate": rest["held"],
        "unstated_interval": rest["interval"],
        "brier": brier(claimed),
        "by_kind": by_kind,
        "exact_claimed": exact_claimed,
        "exact_agreement": agreement,
        "exact_gap": abs(exact_claimed - agreement),
    }


def goals_met(figures: dict) -> bool:
    """The issue's goals; a figure with no claims behind it meets none."""
    high, low = figures["high_confidence_hold_rate"], figures["low_confidence_false_rate"]
    return bool(
        high is not None
        and high >= GOALS["high_confidence_hold_rate"]
        and figures["high_confidence_claims"] >= GOALS["high_confidence_claims"]
        and low is not None
        and low <= GOALS["low_confidence_false_rate"]
        and figures["exact_gap"] <= GOALS["exact_gap"]
    )


def rounded(value, digits: int = 4):
    """`value` with every float rounded (tuples become lists), for the JSON line."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


def check_figures(figures: dict) -> None:
    """Raise ValueError naming the first figure that disagrees with the others (the rounded
    JSON form, so to within its rounding)."""
    tol = 2e-4
    bins = figures["reliability"]
    problems = []
    if sum(b["claims"] for b in bins) != figures["claims"]:
        problems.append("the bins' claims do not add up to `claims`")
    if not figures["claims"] <= figures["checks"] <= figures["claims"] * (figures["runs"] - 1):
        problems.append("`checks` is not between claims and claims x (runs - 1)")
    high = (figures["high_confidence_claims"], figures["high_confidence_hold_rate"])
    low = (figures["low_confidence_claims"], figures["low_confidence_false_rate"])
    for b, (n, rate), name in ((bins[-1], high, "high_confidence"), (bins[0], low, "low_confidence")):
        if (b["claims"], b["held"]) != (n, rate):  # the same claims: claims >= 0.9, and <= 0.1
            problems.append(f"bin {b['bin']} disagrees with {name}")
    groups = [(b["held"], b["interval"], f"bin {b['bin']}") for b in bins]
    groups += [(figures["high_confidence_hold_rate"], figures["high_confidence_interval"], "high")]
    groups += [(figures["low_confidence_false_rate"], figures["low_confidence_interval"], "low")]
    groups += [(figures["unstated_hold_rate"], figures["unstated_interval"], "unstated")]
    for rate, interval, name in groups:
        if (rate is None) != (interval is None):
            problems.append(f"{name}: a hold rate without an interval, or the reverse")
        elif rate is not None and not (
            0 <= interval[0] <= interval[1] <= 1 and interval[0] - tol <= rate <= interval[1] + tol
        ):
            problems.append(f"{name}: hold rate {rate} outside its interval {interval}")
    if abs(figures["exact_gap"] - abs(figures["exact_claimed"] - figures["exact_agreement"])) > tol:
        problems.append("exact_gap is not |exact_claimed - exact_agreement|")
    if figures["brier"] is not None and not 0 <= figures["brier"] <= 1:
        problems.append(f"brier {figures['brier']} outside [0, 1]")
    if figures["goals_met"] != goals_met(figures):
        problems.append("goals_met disagrees with the figures")
    if problems:
        raise ValueError("calibration figures inconsistent: " + "; ".join(problems))


def win_rate_spread(losses_dir: str) -> float | None:
    """The mean standard deviation over replicates of pairwise win rates (None with one replicate)."""
    spreads = []
    for path in sorted(Path(losses_dir).glob("*.parquet")):
        rows = pq.read_table(path).to_pydict()
        by = {}
        for sources, image, loss, rep in zip(
            rows["sources"], rows["image_id"], rows["loss"], rows["replicate"], strict=True
        ):
            if sources != [SELF]:
                by.setdefault("+".join(sources), {}).setdefault(rep, {})[image] = loss
        names = [c for c, reps in by.items() if len(reps) > 1]
        for a, b in itertools.combinations(names, 2):
            reps = sorted(set(by[a]) & set(by[b]))
            rates = []
            for r in reps:
                images = sorted(by[a][r])
                la, lb = np.array([by[a][r][i] for i in images]), np.array([by[b][r][i] for i in images])
                ok = ~(np.isnan(la) | np.isnan(lb))
                rates.append(float(np.mean((la[ok] < lb[ok]) + 0.5 * (la[ok] == lb[ok]))))
            if len(rates) > 1:
                spreads.append(float(np.std(rates, ddof=1)))
    return statistics.fmean(spreads) if spreads else None


def run_study(config: str, root: Path, seed: int, full_rerun: bool, subset: float, extra: list[str]) -> dict:
    """One `taskatlas run --json` on seed `seed`: its taxonomy dict, and where its losses are."""
    sets = [f"storage_root={root}", f"transfer.seed={seed}", f"analysis.seed={seed}"]
    sets += [f"analysis.test_subset={subset}", *([f"train.seed={seed}"] if full_rerun else []), *extra]
    cmd = [str(Path(sys.executable).parent / "taskatlas"), "run", "-c", config, "--json"]
    cmd += [arg for s in sets for arg in ("--set", s)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode:
        sys.stderr.write(out.stdout[-3000:] + out.stderr[-3000:])
        raise SystemExit(f"run with seed {seed} failed (rc {out.returncode})")
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    readouts = summary["readouts_ran"] + summary["readouts_reused"]
    return answer_of(summary) | {
        "losses": summary["losses"],
        "trained": len(summary["networks_trained"]),
        "readouts": readouts,
    }


def answer_of(summary: dict) -> dict:
    """The answer a `taskatlas run --json` summary states: its taxonomy dict and, as
    `affinity_rows`, the columns of its affinity table the claims read."""
    if "stability" not in (summary["taxonomy"] or {}):
        raise SystemExit("the runs state no shares: calibration needs analysis.bootstrap > 0")
    columns = [
        "target",
        "sources",
        "affinity",
        P_BEST,
        *(column for _, share, win_rate in FLAGS for column in (share, win_rate)),
    ]
    rows = pq.read_table(summary["affinity"], columns=columns).to_pylist()
    return summary["taxonomy"] | {"affinity_rows": rows}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default="configs/quickstart.yaml")
    parser.add_argument("--runs", type=int, default=6, help="studies to run (default 6)")
    parser.add_argument(
        "--seeds",
        help=f"comma-separated seeds, one per run (default {DEFAULT_FIRST_SEED}, {DEFAULT_FIRST_SEED + 1}, ...)",
    )
    parser.add_argument(
        "--full-rerun", action="store_true", help="each run also sets train.seed: its own task networks"
    )
    parser.add_argument(
        "--test-subset",
        type=float,
        default=0.5,
        help="analysis.test_subset of every run (default 0.5; 1: all)",
    )
    parser.add_argument("--root", help="storage root to use (default: a temporary folder)")
    parser.add_argument(
        "--save", help="write the runs' answers (taxonomy and affinity rows) to this JSON file"
    )
    parser.add_argument("--set", action="append", default=[], help="config override for every run")
    return parser


def main(args: argparse.Namespace) -> None:
    if args.seeds:
        seeds = [int(s) for s in args.seeds.split(",")]
    else:
        seeds = list(range(DEFAULT_FIRST_SEED, DEFAULT_FIRST_SEED + args.runs))
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise SystemExit("--seeds/--runs: calibration needs at least 2 runs with distinct seeds")
    if not 0 < args.test_subset <= 1:
        raise SystemExit(f"--test-subset must be in (0, 1], got {args.test_subset}")
    if tuned := sorted(set(seeds) & set(TUNED_SEEDS)):
        print(f"warning: seeds {tuned} are those the quickstart was tuned on: in sample", file=sys.stderr)
    os.environ.setdefault("TASKATLAS_RAY_DASHBOARD", "0")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="taskatlas-calibration-") as tmp:
        root = Path(args.root or tmp)
        runs, seconds, spreads = [], [], []
        for k, seed in enumerate(seeds):
            start = time.perf_counter()
            runs.append(run_study(args.config, root, seed, args.full_rerun, args.test_subset, args.set))
            seconds.append(time.perf_counter() - start)
            t = runs[-1]
            spreads.append(win_rate_spread(t["losses"]))  # before a temporary root goes
            print(
                f"run {k} (seed {seed}): {seconds[-1]:.0f} s, {t['trained']} networks trained, roots {t['roots']}, "
                f"exact {t['stability']['taxonomy']:.2f}",
                flush=True,
            )
    if args.save:
        Path(args.save).write_text(json.dumps([{k: v for k, v in t.items() if k != "losses"} for t in runs]))
    figures = calibration(runs)
    figures |= {
        "runs": len(runs),
        "seeds": seeds,
        "full_rerun": args.full_rerun,
        "test_subset": args.test_subset,
        "overrides": args.set,
        "replicates": runs[0].get("verdict", {}).get("replicates"),
        "seconds": time.perf_counter() - started,
        "first_run_seconds": seconds[0],
        "networks_trained": [t["trained"] for t in runs],  # per run: all of them with --full-rerun
        "readouts": [t["readouts"] for t in runs],  # per run, trained or reused (raced: fewer)
        "stage2_seconds": None if args.full_rerun else statistics.median(seconds[1:]),
        "win_rate_spread": None if None in spreads else statistics.fmean(spreads),
        "goals": GOALS,
    }
    figures = rounded(figures)
    figures["goals_met"] = goals_met(figures)
    check_figures(figures)
    for row in figures["reliability"]:
        print(
            f"  stated {row['bin']}: {row['claims']:>3} claims, mean {row['stated']}, "
            f"held {row['held']} {row['interval']}"
        )
    print(f"  unstated: {figures['unstated']} options, held {figures['unstated_hold_rate']}")
    for kind, k in figures["by_kind"].items():
        print(
            f"  {kind}: {k['claims']} claims; >= {HIGH}: {k['high_claims']}, held {k['high_held']}; "
            f"<= {LOW}: {k['low_claims']}, true {k['low_true']}; Brier {k['brier']}"
        )
    print(json.dumps(figures))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
