"""Racing: the same calibrated answer for fewer readouts? The raced study against the full one.

    .venv/bin/python benchmarks/racing.py                          # the quickstart, readout seeds 500-503
    .venv/bin/python benchmarks/racing.py --seeds 600,601 --root /work/race
    .venv/bin/python benchmarks/racing.py -c tiny.yaml --seeds 1,2 # smoke

The task networks are trained once (`--stages train`, `train.seed` as configured) on a base root.
Then, per readout seed s (`transfer.seed` and `analysis.seed`, scoring on its own random half of
the test images as `benchmarks/calibration.py` does), the full study (`transfer.replicates` of
every readout) and the raced one (`transfer.race.enabled`) each run on their own copy of the base
root, so neither reuses the other's readouts and both pay the same feature pass. The raced
study's settings are the config's `transfer.race`, and `--set` overrides apply to both.

Figures, on the last line as one JSON object:
- `readout_fraction`: readouts the raced studies trained over the full ones' (all seeds);
- `stage2_time_fraction`: the median over seeds of the raced Stage II's wall time over the full
  one's (the `transfer` run's `wall_seconds` in each root's MLflow store; features included);
- `full` and `raced`: the calibration keys of each set of runs (`calibration.calibration`:
  readout-seed reruns, so with few seeds the intervals are wide);
- `confident_claims_kept`: of the full studies' claims stated at >= 0.9, the share the raced
  study on the same seed also states at >= 0.9 (`claims_full_confident`: how many);
- `roots_agree`: the share of seeds on which both chose the same roots; `seconds`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import calibration  # benchmarks/calibration.py: the claims and their hold rates

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SEEDS = (500, 501, 502, 503)  # no setting was chosen on these
HIGH = calibration.HIGH


def taskatlas(config: str, root: Path, sets: list[str], stages: str | None = None) -> dict | None:
    """One `taskatlas run`; its --json summary (None for a run of some stages only)."""
    cmd = [
        str(Path(sys.executable).parent / "taskatlas"),
        "run",
        "-c",
        config,
        "--set",
        f"storage_root={root}",
    ]
    cmd += [a for s in sets for a in ("--set", s)] + (["--stages", stages] if stages else ["--json"])
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode:
        sys.stderr.write(out.stdout[-3000:] + out.stderr[-3000:])
        raise SystemExit(f"taskatlas run {' '.join(sets)} failed (rc {out.returncode})")
    return None if stages else json.loads(out.stdout.strip().splitlines()[-1])


def stage2_seconds(root: Path) -> float:
    """The `transfer` run's wall time, from the root's MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, "tags.stage = 'transfer' and attributes.run_name = 'transfer'")
    if len(runs) != 1:
        raise SystemExit(f"{root}: expected one transfer run, found {len(runs)}")
    return float(runs[0].data.metrics["wall_seconds"])


def confident_kept(full: dict, raced: dict) -> tuple[int, int]:
    """(claims the full study states at >= HIGH, of those the raced one states at >= HIGH too)."""
    mine, theirs = calibration.stated(full), calibration.stated(raced)
    sure = [c for c, p in mine.items() if p >= HIGH]
    return len(sure), sum(theirs.get(c, 0.0) >= HIGH for c in sure)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default="configs/quickstart.yaml")
    parser.add_argument(
        "--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="readout seeds, comma-separated"
    )
    parser.add_argument("--test-subset", type=float, default=0.5, help="analysis.test_subset (default 0.5)")
    parser.add_argument("--root", help="where the roots go (default: a temporary folder)")
    parser.add_argument("--set", action="append", default=[], help="config override for every run")
    return parser


def main(args: argparse.Namespace) -> None:
    seeds = [int(s) for s in args.seeds.split(",")]
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise SystemExit("--seeds: at least 2 distinct seeds (the calibration compares runs)")
    os.environ.setdefault("TASKATLAS_RAY_DASHBOARD", "0")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="taskatlas-racing-") as tmp:
        where = Path(args.root or tmp)
        base = where / "base"
        taskatlas(args.config, base, args.set, stages="train")
        runs: dict[str, list[dict]] = {"full": [], "raced": []}
        trained = {"full": 0, "raced": 0}
        fractions, agree, sure, kept = [], 0, 0, 0
        for seed in seeds:
            sets = [*args.set, f"transfer.seed={seed}", f"analysis.seed={seed}"]
            sets.append(f"analysis.test_subset={args.test_subset}")
            seconds = {}
            for mode, extra in (("full", []), ("raced", ["transfer.race.enabled=true"])):
                root = where / f"{mode}-{seed}"
                if not root.exists():
                    shutil.copytree(
                        base, root, symlinks=True, ignore=shutil.ignore_patterns("ray", "*.lock*")
                    )
                summary = taskatlas(args.config, root, sets + extra)
                runs[mode].append(summary["taxonomy"])
                trained[mode] += summary["readouts_ran"] + summary["readouts_reused"]
                seconds[mode] = stage2_seconds(root)
            fractions.append(seconds["raced"] / seconds["full"])
            agree += runs["full"][-1]["roots"] == runs["raced"][-1]["roots"]
            n, k = confident_kept(runs["full"][-1], runs["raced"][-1])
            sure, kept = sure + n, kept + k
            print(
                f"seed {seed}: Stage II {seconds['full']:.0f} s full, {seconds['raced']:.0f} s raced; roots "
                f"{runs['full'][-1]['roots']} / {runs['raced'][-1]['roots']}",
                flush=True,
            )
    keys = ("high_confidence_hold_rate", "high_confidence_claims", "low_confidence_false_rate", "brier")
    keys += ("exact_claimed", "exact_agreement", "exact_gap")
    figures = {
        "readout_fraction": trained["raced"] / trained["full"],
        "readouts": trained,
        "stage2_time_fraction": statistics.median(fractions),
        "confident_claims_kept": kept / sure if sure else None,
        "claims_full_confident": sure,
        "roots_agree": agree / len(seeds),
        **{mode: {k: calibration.calibration(r)[k] for k in keys} for mode, r in runs.items()},
        "seeds": seeds,
        "config": args.config,
        "overrides": args.set,
        "seconds": time.perf_counter() - started,
    }
    print(json.dumps(calibration.rounded(figures)))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
