"""Are the stated shares probabilities? Rerun one study K times with other readout seeds and check.

    .venv/bin/python benchmarks/calibration.py                        # the quickstart, 4 runs
    .venv/bin/python benchmarks/calibration.py --seeds 7,8,9,10       # readout seeds of your own
    .venv/bin/python benchmarks/calibration.py --train-seeds          # the networks vary too
    .venv/bin/python benchmarks/calibration.py --set transfer.replicates=1   # the old, image-only bootstrap

Every run is `taskatlas run --json` on one storage root, so the task networks are trained once
and shared (with `--train-seeds`, run k also sets `train.seed`, and each run trains its own);
only `transfer.seed` differs, and with it every readout's seed and the `random` encoder.

Each run states shares (design.md section 10): per task, how often it is a root; per target, how
often each source set serves it. A claim is one such (choice, share) of one run, for every
choice any run made or gave a share to (0 where this run gave none). It *holds* in another run
when that run chose it. Figures, on the last line as one JSON object:
- `reliability`: per bin of stated share, the claims in it, their mean share and mean hold rate;
- `high_confidence_hold_rate`: mean hold rate of claims stated at >= 0.9 (goal >= 0.85);
- `low_confidence_false_rate`: mean hold rate of claims stated at <= 0.1 (goal <= 0.15);
- `exact_claimed`: the runs' mean share for "this exact taxonomy"; `exact_agreement`: the share
  of pairs of runs that chose the same taxonomy (goal: within 0.25 of each other);
- `stage2_seconds`: median wall time of a run after the first (Stage II to IV: the networks reused);
- `win_rate_spread`: how far replicates disagree, the mean over runs, targets and pairs of
  trained candidates of the standard deviation over replicates r of the win rate of replicate r
  of one against replicate r of the other (paired replicates share a seed: `transfer.pairing`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
BINS = ((0.0, 0.1), (0.1, 0.3), (0.3, 0.5), (0.5, 0.7), (0.7, 0.9), (0.9, 1.0))
GOALS = {"high_confidence_hold_rate": 0.85, "low_confidence_false_rate": 0.15, "exact_gap": 0.25}


def win_rate_spread(losses_dir: str) -> float | None:
    """The mean standard deviation over replicates of pairwise win rates (None with one replicate)."""
    spreads = []
    for path in sorted(Path(losses_dir).glob("*.parquet")):
        rows = pq.read_table(path).to_pydict()
        by = {}
        for sources, image, loss, rep in zip(
            rows["sources"], rows["image_id"], rows["loss"], rows["replicate"], strict=True
        ):
            if sources != ["self"]:
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
    return round(statistics.fmean(spreads), 4) if spreads else None


def run_study(config: str, root: Path, seed: int, train_seed: int | None, extra: list[str]) -> dict:
    sets = [f"storage_root={root}", f"transfer.seed={seed}", *extra]
    if train_seed is not None:
        sets.append(f"train.seed={train_seed}")
    cmd = [str(Path(sys.executable).parent / "taskatlas"), "run", "-c", config, "--json"]
    cmd += [arg for s in sets for arg in ("--set", s)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode:
        sys.stderr.write(out.stdout[-3000:] + out.stderr[-3000:])
        raise SystemExit(f"run with transfer.seed={seed} failed (rc {out.returncode})")
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    return summary["taxonomy"] | {"losses": summary["losses"]}


def choices(taxonomy: dict) -> set[tuple[str, str, str]]:
    """The choices a run made: ("root", task, "") and ("edge", target, sources or "self")."""
    made = {("root", r, "") for r in taxonomy["roots"]}
    targets = set(taxonomy["stability"]["transfers"]) | set(taxonomy["transfers"])
    for target in targets:
        made.add(("edge", target, "+".join(taxonomy["transfers"].get(target, ["self"]))))
    return made


def stated(taxonomy: dict) -> dict[tuple[str, str, str], float]:
    """The shares a run gave: every root and edge its resamples chose."""
    s = taxonomy["stability"]
    out = {("root", r, ""): p for r, p in s["roots"].items()}
    for target, shares in s["transfers"].items():
        out |= {("edge", target, key): p for key, p in shares.items()}
    return out


def bin_of(p: float) -> tuple[float, float]:
    """The reliability bin of a stated share: [0, 0.1], (0.1, 0.3], ..., (0.7, 0.9), [0.9, 1]."""
    if p >= 0.9:
        return BINS[-1]
    return next(b for b in BINS if p <= b[1])


def calibration(runs: list[dict]) -> dict:
    """The figures above from the runs' taxonomy dicts (each with `stability`)."""
    made = [choices(t) for t in runs]
    claims_of = [stated(t) for t in runs]
    universe = set().union(*made, *(c.keys() for c in claims_of))
    claims = []  # (stated share, hold rate in the other runs)
    for i, claim_map in enumerate(claims_of):
        others = [m for j, m in enumerate(made) if j != i]
        for c in universe:
            claims.append((claim_map.get(c, 0.0), sum(c in m for m in others) / len(others)))
    reliability = []
    for lo, hi in BINS:
        inside = [(p, h) for p, h in claims if bin_of(p) == (lo, hi)]
        reliability.append(
            {
                "bin": f"{lo:.1f}-{hi:.1f}",
                "claims": len(inside),
                "stated": round(statistics.fmean(p for p, _ in inside), 3) if inside else None,
                "held": round(statistics.fmean(h for _, h in inside), 3) if inside else None,
            }
        )
    high = [h for p, h in claims if p >= 0.9]
    low = [h for p, h in claims if p <= 0.1]
    same = [made[i] == made[j] for i, j in itertools.combinations(range(len(runs)), 2)]
    return {
        "reliability": reliability,
        "high_confidence_hold_rate": round(statistics.fmean(high), 3) if high else None,
        "high_confidence_claims": len(high),
        "low_confidence_false_rate": round(statistics.fmean(low), 3) if low else None,
        "low_confidence_claims": len(low),
        "exact_claimed": round(statistics.fmean(t["stability"]["taxonomy"] for t in runs), 3),
        "exact_agreement": round(statistics.fmean(same), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default="configs/quickstart.yaml")
    parser.add_argument("--runs", type=int, default=4, help="studies to run (default 4)")
    parser.add_argument("--seeds", help="comma-separated transfer seeds (default 0..runs-1)")
    parser.add_argument("--train-seeds", action="store_true", help="also vary train.seed per run")
    parser.add_argument("--root", help="storage root to use (default: a temporary folder)")
    parser.add_argument("--set", action="append", default=[], help="config override for every run")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(range(args.runs))
    if len(seeds) < 2:
        raise SystemExit("--seeds/--runs: calibration needs at least 2 runs")
    os.environ.setdefault("TASKATLAS_RAY_DASHBOARD", "0")
    with tempfile.TemporaryDirectory(prefix="taskatlas-calibration-") as tmp:
        root = Path(args.root or tmp)
        runs, seconds, spreads = [], [], []
        for k, seed in enumerate(seeds):
            start = time.perf_counter()
            runs.append(run_study(args.config, root, seed, k if args.train_seeds else None, args.set))
            seconds.append(time.perf_counter() - start)
            t = runs[-1]
            spreads.append(win_rate_spread(t["losses"]))  # before a temporary root goes
            print(
                f"run {k} (transfer.seed {seed}): {time.perf_counter() - start:.0f} s, roots {t['roots']}, "
                f"exact {t['stability']['taxonomy']:.2f}",
                flush=True,
            )
    figures = calibration(runs)
    for row in figures["reliability"]:
        print(f"  stated {row['bin']}: {row['claims']:>3} claims, mean {row['stated']}, held {row['held']}")
    gap = abs(figures["exact_claimed"] - figures["exact_agreement"])
    figures |= {
        "runs": len(runs),
        "seeds": seeds,
        "train_seeds": args.train_seeds,
        "overrides": args.set,
        "replicates": runs[0].get("verdict", {}).get("replicates"),
        "first_run_seconds": round(seconds[0], 1),
        "stage2_seconds": round(statistics.median(seconds[1:]), 1),
        "win_rate_spread": round(statistics.fmean(spreads), 4) if None not in spreads else None,
        "goals_met": bool(
            (figures["high_confidence_hold_rate"] or 0) >= GOALS["high_confidence_hold_rate"]
            and (figures["low_confidence_false_rate"] or 0) <= GOALS["low_confidence_false_rate"]
            and gap <= GOALS["exact_gap"]
        ),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
