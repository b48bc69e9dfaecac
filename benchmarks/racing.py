"""Racing: the same calibrated answer for fewer readouts? The raced study against the full one.

    .venv/bin/python benchmarks/racing.py                          # the quickstart, readout seeds 500-503
    .venv/bin/python benchmarks/racing.py --seeds 600,601 --root /work/race
    .venv/bin/python benchmarks/racing.py -c tiny.yaml --seeds 1,2 # smoke
    .venv/bin/python benchmarks/racing.py --simulate taskonomy     # the policy at Taskonomy's shape

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
  study on the same seed also states at >= 0.9 (`claims_full_confident`: how many;
  `confident_claims_untrained`: how many of them are flags on a transfer the raced study did not
  train, its beams coming from replicate 0 alone);
- `roots_agree`: the share of seeds on which both chose the same roots; `seconds`.

`--simulate taskonomy` runs the racing policy alone (`components.racing`, with the same
multi-bootstrap) on a generated per-image loss table at Taskonomy's shape: 26 targets, 48
candidates each plus `self`, `random` and `pixels`, 16,000 test images, R replicates
(`--replicates`, default 3). Loss of
candidate c, replicate r, image i: d_i + mu_c + rho_cr + e_cri, with mu_c ~ N(0, 0.3) (`self`
0.3 below the best, `random` and `pixels` 0.3 and 0.4 above the mean), a replicate's shift rho ~
N(0, `--replicate-sd`) and per-image noise e ~ N(0, 1); the default replicate sd gives about the
win-rate spread over replicates the quickstart measured (0.12, docs/benchmarks.md: printed as
`win_rate_spread`). It prints `readout_fraction` (readouts trained raced / full) and per round
how many train.
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
import numpy as np
import pyarrow as pa

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
    """The newest `transfer` run's wall time, from the root's MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, "tags.stage = 'transfer' and attributes.run_name = 'transfer'")
    if not runs:  # the newest: a root copied from another holds that one's runs too
        raise SystemExit(f"{root}: no transfer run")
    return float(max(runs, key=lambda r: r.info.start_time).data.metrics["wall_seconds"])


def confident_kept(full: dict, raced: dict) -> tuple[int, int, int]:
    """(claims the full study states at >= HIGH, of those the raced one states at >= HIGH too,
    of those flags on a transfer the raced study did not train: its beams, from replicate 0
    alone, may take in other higher orders)."""
    mine, theirs = calibration.stated(full), calibration.stated(raced)
    sure = [c for c, p in mine.items() if p >= HIGH]
    trained = calibration.flags_measured(raced)
    untrained = sum(calibration.is_flag(c) and c not in trained for c in sure)
    return len(sure), sum(theirs.get(c, 0.0) >= HIGH for c in sure), untrained


def simulated_losses(rng: np.random.Generator, candidates: int, images: int, replicates: int, sd: float):
    """(names, (n, R, m) float32 losses) of one simulated target: `candidates` transfers, then
    self, random and pixels (see the module's docstring)."""
    mu = rng.normal(0.0, 0.3, candidates)
    mu = np.concatenate([mu, [mu.min() - 0.3, 0.3, 0.4]])
    names = [f"s{c:02d}" for c in range(candidates)] + ["self", "random", "pixels"]
    shift = rng.normal(0.0, sd, (len(names), replicates, 1))
    noise = rng.standard_normal((len(names), replicates, images), dtype=np.float32)
    difficulty = rng.standard_normal(images).astype(np.float32)
    return names, (difficulty + mu[:, None, None] + shift + noise).astype(np.float32)


def simulated_table(target: str, names: list[str], losses: np.ndarray, counts: dict) -> pa.Table:
    """The target's loss table as Stage II writes it, with replicates 0..counts[name] - 1 of each."""
    ids = np.array([f"i{i:05d}" for i in range(losses.shape[2])])
    parts = [(n, r) for n in names for r in range(counts[target, (n,)])]
    values = np.concatenate([losses[names.index(n), r] for n, r in parts])
    m = losses.shape[2]
    sources = pa.ListArray.from_arrays(
        pa.array(np.arange(len(parts) + 1, dtype=np.int32)), [n for n, _ in parts]
    )
    take = pa.array(np.repeat(np.arange(len(parts)), m))
    return pa.table(
        {
            "target": pa.array([target] * (len(parts) * m)),
            "sources": sources.take(take),
            "image_id": pa.array(np.tile(ids, len(parts))),
            "loss": values,
            "replicate": pa.array(np.repeat([r for _, r in parts], m).astype(np.int32)),
        }
    )


def simulate(args: argparse.Namespace) -> dict:
    """The racing policy on a generated table at Taskonomy's shape (module docstring)."""
    from components.affinity import affinity_by_target
    from components.racing import FLAGS, contested, next_round

    rng = np.random.default_rng(args.simulation_seed)
    targets, R = [f"t{t:02d}" for t in range(26)], args.replicates
    made = {t: simulated_losses(rng, 48, 16_000, R, args.replicate_sd) for t in targets}
    spread = statistics.fmean(
        float(np.std([(x[0, r] < x[1, r]).mean() for r in range(R)], ddof=1)) for _, x in made.values()
    )
    counts = {(t, (n,)): 1 for t, (names, _) in made.items() for n in names}
    most = dict.fromkeys(counts, R)
    trained = [sum(1 for c in counts if c[1] != ("self",))]
    for k in range(1, R):
        result = affinity_by_target(
            targets,
            lambda t: simulated_table(t, *made[t], counts),
            args.resamples,
            args.simulation_seed,
            [f"i{i:05d}" for i in range(16_000)],
            require_self=True,
        )
        rows = result.table.select(["target", "sources", "affinity", "p_best", *FLAGS]).to_pylist()
        chosen = next_round(counts, contested(rows, counts), k, most)
        for c in chosen:
            counts[c] += 1
        trained.append(sum(1 for c in chosen if c[1] != ("self",)))
        print(f"round {k}: {trained[-1]} readouts", flush=True)
    full = sum(1 for c in counts if c[1] != ("self",)) * R
    return {
        "simulate": "taskonomy",
        "readout_fraction": sum(trained) / full,
        "readouts_per_round": trained,
        "readouts_full": full,
        "win_rate_spread": spread,
        "replicate_sd": args.replicate_sd,
        "replicates": R,
        "resamples": args.resamples,
    }


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default="configs/quickstart.yaml")
    parser.add_argument(
        "--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="readout seeds, comma-separated"
    )
    parser.add_argument("--test-subset", type=float, default=0.5, help="analysis.test_subset (default 0.5)")
    parser.add_argument("--root", help="where the roots go (default: a temporary folder)")
    parser.add_argument("--set", action="append", default=[], help="config override for every run")
    parser.add_argument("--simulate", choices=["taskonomy"], help="the policy alone on a generated table")
    parser.add_argument("--replicate-sd", type=float, default=0.35, help="--simulate: replicate shift sd")
    parser.add_argument("--resamples", type=int, default=100, help="--simulate: bootstrap resamples")
    parser.add_argument(
        "--replicates", type=int, default=3, help="--simulate: R, replicates of the full study"
    )
    parser.add_argument("--simulation-seed", type=int, default=0)
    return parser


def main(args: argparse.Namespace) -> None:
    if args.simulate:
        started = time.perf_counter()
        figures = simulate(args) | {"seconds": time.perf_counter() - started}
        print(json.dumps(calibration.rounded(figures)))
        return
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
        fractions, agree, sure, kept, untrained = [], 0, 0, 0, 0
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
                runs[mode].append(calibration.answer_of(summary))
                trained[mode] += summary["readouts_ran"] + summary["readouts_reused"]
                seconds[mode] = stage2_seconds(root)
            fractions.append(seconds["raced"] / seconds["full"])
            agree += runs["full"][-1]["roots"] == runs["raced"][-1]["roots"]
            n, k, u = confident_kept(runs["full"][-1], runs["raced"][-1])
            sure, kept, untrained = sure + n, kept + k, untrained + u
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
        "confident_claims_untrained": untrained,
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
