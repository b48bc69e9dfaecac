"""Racing: the same calibrated answer for fewer readouts? The raced study against the full one.

    .venv/bin/python benchmarks/racing.py                          # the quickstart, readout seeds 500-503
    .venv/bin/python benchmarks/racing.py --seeds 600,601 --root /work/race
    .venv/bin/python benchmarks/racing.py -c tiny.yaml --seeds 1,2 # smoke
    .venv/bin/python benchmarks/racing.py --simulate taskonomy     # the policy at Taskonomy's shape
    .venv/bin/python benchmarks/racing.py --frontier --root /work/race --seeds 600,601  # policies replayed

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
- `confident_claims_kept_floor`: the same figure for the full study against itself, its Stage
  III/IV rerun on the same images with other resamples (`analysis.subset_seed`): a claim near 0.9
  falls either side by the resamples' own noise, so no raced study can be expected above it;
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
how many train. `--prune-top-k K` first prunes as `transfer.prune` does (`prune_plan`: each
target's top K by an estimate mu + N(0, sd) whose rank correlation with mu is
`--estimator-spearman`, and an `--audit-fraction` of the rest); `--flags` is `transfer.race.flags`;
`--check-full` also states the full study's claims: `confident_claims_kept`, and per side how
many claims at >= 0.9 and the share true (the lowest mu is the best; a flag holds where mu is
above its baseline's).

`--frontier` replays each policy of POLICIES on the full studies an earlier run kept in `--root`
(`full-<seed>`): the rounds on the full study's loss tables (the same keys raced or not, so a
raced study's readouts are a subset of them; its higher orders as the full study's beams chose
them), then `readout_fraction` and `confident_claims_kept` of the affinity table's claims (each
target's best, the flags), and the floor: the full table against itself with other resamples.
"""

from __future__ import annotations

import argparse
import json
import math
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
FLOOR_SEED = 1_000_000  # the floor's resamples: analysis.seed + this, on the seed's own images


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


def copy_root(source: Path, root: Path) -> Path:
    """`root`, a copy of the storage root `source` unless it exists (a rerun resumes in it),
    without the source's Ray session or locks."""
    if not root.exists():
        shutil.copytree(source, root, symlinks=True, ignore=shutil.ignore_patterns("ray", "*.lock*"))
    return root


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
    """(names, (n, R, m) float32 losses, (n,) mean offsets mu) of one simulated target:
    `candidates` transfers, then self, random and pixels (see the module's docstring)."""
    mu = rng.normal(0.0, 0.3, candidates)
    mu = np.concatenate([mu, [mu.min() - 0.3, 0.3, 0.4]])
    names = [f"s{c:02d}" for c in range(candidates)] + ["self", "random", "pixels"]
    shift = rng.normal(0.0, sd, (len(names), replicates, 1))
    noise = rng.standard_normal((len(names), replicates, images), dtype=np.float32)
    difficulty = rng.standard_normal(images).astype(np.float32)
    return names, (difficulty + mu[:, None, None] + shift + noise).astype(np.float32), mu


def simulated_table(target: str, names: list[str], losses: np.ndarray, counts: dict) -> pa.Table:
    """The target's loss table as Stage II writes it, with replicates 0..counts[name] - 1 of each
    (none of a candidate not in `counts`: pruned)."""
    ids = np.array([f"i{i:05d}" for i in range(losses.shape[2])])
    parts = [(n, r) for n in names for r in range(counts.get((target, (n,)), 0))]
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


def estimator_noise(spearman: float, spread: float = 0.3) -> float:
    """The sd of an estimate mu + N(0, sd) whose Spearman correlation with mu ~ N(0, spread) is
    `spearman` (for normals, Spearman = (6 / pi) asin(r / 2) of the Pearson r)."""
    r = 2 * math.sin(math.pi * spearman / 6)
    return spread * math.sqrt(1 / r**2 - 1)


def simulated_pruning(args: argparse.Namespace, made: dict) -> set:
    """The (target, (source,)) candidates the cheap estimator leaves untrained: `prune_plan`, the
    pipeline's rule (each target's `--prune-top-k` by estimate, an audit sample of the rest), on
    estimates mu + N(0, sd) with the Spearman correlation the probe measured (`--estimator-spearman`)."""
    from components.transfer import Readout, ReadoutKind, TransferPlan, prune_plan

    rng = np.random.default_rng([args.simulation_seed, 1])  # not the losses' stream
    sd = estimator_noise(args.estimator_spearman)
    targets = sorted(made)
    sources = made[targets[0]][0][:-3]
    plan = TransferPlan(
        targets=tuple(targets),
        sources=tuple(sources),
        orders=(),
        beams=(),
        first_order=tuple(Readout(t, (s,)) for t in targets for s in sources),
        baselines=tuple(
            Readout(t, (k.value,), k) for t in targets for k in (ReadoutKind.RANDOM, ReadoutKind.PIXELS)
        ),
    )
    estimates = {
        (t, s): float(mu + e)
        for t in targets
        for s, mu, e in zip(sources, made[t][2], rng.normal(0.0, sd, len(sources)), strict=False)
    }
    pruned = prune_plan(plan, estimates, args.prune_top_k, args.audit_fraction, args.simulation_seed)
    return {(r.target, r.sources) for r in pruned.pruned}


def simulated_claims(rows: list[dict], made: dict) -> dict[tuple[str, str, str], bool]:
    """The claims an affinity table on simulated losses states at >= HIGH, each with whether it
    is true: a `p_best` of the candidate of lowest mu (`self` aside), a flag of a transfer whose
    mu is above its baseline's (what endless replicates and images would say)."""
    out = {}
    for row in rows:
        names, _, mu = made[row["target"]]
        source = row["sources"][0]
        if source == "self":
            continue
        mine = mu[names.index(source)]
        truth = {"p_best": mine == min(m for n, m in zip(names, mu, strict=True) if n != "self")}
        if source not in ("random", "pixels"):
            truth |= {"p_below_random": mine > mu[names.index("random")]}
            truth |= {"p_no_gain": mine > mu[names.index("pixels")]}
        for column, true in truth.items():
            p = row.get(column)
            if p is not None and p == p and p >= HIGH:
                out[row["target"], source, column] = bool(true)
    return out


def simulate(args: argparse.Namespace) -> dict:
    """The racing policy on a generated table at Taskonomy's shape (module docstring)."""
    from components.affinity import affinity_by_target
    from components.racing import FLAGS, contested, next_round

    rng = np.random.default_rng(args.simulation_seed)
    targets, R = [f"t{t:02d}" for t in range(26)], args.replicates
    made = {t: simulated_losses(rng, 48, 16_000, R, args.replicate_sd) for t in targets}
    spread = statistics.fmean(
        float(np.std([(x[0, r] < x[1, r]).mean() for r in range(R)], ddof=1)) for _, x, _ in made.values()
    )
    everything = {(t, (n,)): R for t, (names, _, _) in made.items() for n in names}
    pruned = simulated_pruning(args, made) if args.prune_top_k else set()
    counts = {c: 1 for c in everything if c not in pruned}
    ids = [f"i{i:05d}" for i in range(16_000)]

    def shares(have: dict, require_self: bool) -> list[dict]:
        result = affinity_by_target(
            targets,
            lambda t: simulated_table(t, *made[t][:2], have),
            args.resamples,
            args.simulation_seed,
            ids,
            require_self=require_self,
        )
        return result.table.select(["target", "sources", "affinity", "p_best", *FLAGS]).to_pylist()

    trained = [sum(1 for c in counts if c[1] != ("self",))]
    policy = {} if args.flags is None else {"flags": args.flags}  # else transfer.race's defaults
    for k in range(1, R):
        chosen = next_round(counts, contested(shares(counts, False), counts, **policy), k, everything)
        for c in chosen:
            counts[c] += 1
        trained.append(sum(1 for c in chosen if c[1] != ("self",)))
        print(f"round {k}: {trained[-1]} readouts", flush=True)
    readouts_full = sum(1 for c in everything if c[1] != ("self",)) * R
    raced = simulated_claims(shares(counts, True), made)
    full = simulated_claims(shares(everything, True), made) if args.check_full else None
    truth = {"raced": raced} | ({"full": full} if full is not None else {})
    return {
        "simulate": "taskonomy",
        "readout_fraction": sum(trained) / readouts_full,
        "readouts_per_round": trained,
        "readouts_full": readouts_full,
        "pruned": len(pruned),
        "confident_claims_kept": sum(c in raced for c in full) / len(full) if full else None,
        "claims_high": {side: len(c) for side, c in truth.items()},
        "claims_high_true": {side: statistics.fmean(c.values()) if c else None for side, c in truth.items()},
        "win_rate_spread": spread,
        "replicate_sd": args.replicate_sd,
        "replicates": R,
        "resamples": args.resamples,
        "prune_top_k": args.prune_top_k,
        "audit_fraction": args.audit_fraction,
        "estimator_spearman": args.estimator_spearman,
        "flags": args.flags,
    }


# --frontier: policies replayed on the full studies' tables, (p_best, settled, top, flags)
POLICIES = (
    (0.02, 0.98, 3, 1.0),  # transfer.race's defaults before `flags`
    (0.02, 0.98, 2, 1.0),
    (0.1, 0.98, 3, 1.0),
    (0.02, 0.98, 3, 0.85),
    (0.02, 0.98, 3, 0.7),
    (0.02, 0.98, 3, 0.5),
    (0.1, 0.98, 2, 0.85),  # transfer.race's defaults
)


def full_tables(root: Path) -> dict[str, pa.Table]:
    """A full study's per-target loss tables (its newest Stage II step's)."""
    import pyarrow.parquet as pq

    steps = sorted((root / "stage2").glob("*/losses"), key=lambda d: d.stat().st_mtime)
    if not steps:
        raise SystemExit(f"{root}: no Stage II loss tables (run the benchmark with --root first)")
    return {f.stem: pq.read_table(f) for f in sorted(steps[-1].glob("*.parquet"))}


def replayed_rows(cfg, tables: dict, counts: dict | None, require_self: bool, seed: int) -> list[dict]:
    """Stage III's affinity rows (its test subset, `seed`'s resamples) on replicates 0..counts - 1
    of each candidate (None: every replicate), as a raced study with those readouts would state."""
    from components.affinity import affinity_by_target, study_image_ids
    from pipelines.analysis.plan import keep_test_subset

    a = cfg.analysis

    def read(target: str) -> pa.Table:
        table = tables[target]
        if counts is not None:
            sources = [tuple(x) for x in table.column("sources").to_pylist()]
            replicate = table.column("replicate").to_pylist()
            keep = [r < counts.get((target, x), 0) for x, r in zip(sources, replicate, strict=True)]
            table = table.filter(pa.array(keep))
        return keep_test_subset(table, a.test_subset_seed, a.test_subset, f"target {target}'s loss table")

    ids = study_image_ids(read(t).select(["image_id"]) for t in sorted(tables))
    result = affinity_by_target(sorted(tables), read, a.bootstrap, seed, ids, require_self=require_self)
    columns = [
        "target",
        "sources",
        "affinity",
        "p_best",
        *(c for _, x, w in calibration.FLAGS for c in (x, w)),
    ]
    return result.table.select(columns).to_pylist()


def replay_race(cfg, tables: dict, policy: tuple) -> tuple[dict, dict]:
    """(replicates each candidate would have, those it has in the full study) under `policy`:
    the rounds of `pipelines.stage2.run` on the full study's readouts (the same keys raced or
    not), its higher orders as the full study's beams chose them."""
    from components.racing import contested, next_round

    full: dict = {}
    for target, table in tables.items():
        for x, r in zip(
            table.column("sources").to_pylist(), table.column("replicate").to_pylist(), strict=True
        ):
            full[target, tuple(x)] = max(full.get((target, tuple(x)), 0), r + 1)
    counts = dict.fromkeys(full, 1)
    for k in range(1, max(full.values())):
        rows = replayed_rows(cfg, tables, counts, False, cfg.analysis.seed)
        chosen = next_round(counts, contested(rows, counts, *policy), k, full)
        for c in chosen:
            counts[c] += 1
        if not chosen:
            break
    return counts, full


def frontier(args: argparse.Namespace) -> dict:
    """Each policy of POLICIES replayed on the full study of each seed (`--root`'s `full-<seed>`):
    readouts (`self` aside: scored, not trained) and the affinity table's claims at >= HIGH (each
    target's best, the flags) it keeps; the floor: the full table against itself resampled anew."""
    from pipelines.config import load_pipeline_config

    def sure(rows: list[dict]) -> set:
        return {c for c, p in calibration.affinity_choices(rows)[1].items() if p >= HIGH}

    def trained(counts: dict) -> int:  # `self` is scored, not trained
        return sum(n for c, n in counts.items() if c[1] != ("self",))

    totals = {p: [0, 0] for p in POLICIES}  # policy -> [readouts, claims kept]
    full_readouts = claims = floor = 0
    for seed in (int(s) for s in args.seeds.split(",")):
        sets = [
            *args.set,
            f"transfer.seed={seed}",
            f"analysis.seed={seed}",
            f"analysis.test_subset={args.test_subset}",
        ]
        cfg = load_pipeline_config(args.config, sets)
        tables = full_tables(Path(args.root) / f"full-{seed}")
        mine = sure(replayed_rows(cfg, tables, None, True, seed))
        floor += len(mine & sure(replayed_rows(cfg, tables, None, True, seed + FLOOR_SEED)))
        claims += len(mine)
        for policy in POLICIES:
            counts, full = replay_race(cfg, tables, policy)
            raced = sure(replayed_rows(cfg, tables, counts, True, seed))
            totals[policy][0] += trained(counts)
            totals[policy][1] += len(mine & raced)
        full_readouts += trained(full)
        print(f"seed {seed}: {len(mine)} claims at >= {HIGH}", flush=True)
    keys = ("p_best", "settled", "top", "flags")
    return {
        "frontier": [
            dict(zip(keys, p, strict=True))
            | {"readout_fraction": n / full_readouts, "confident_claims_kept": k / claims if claims else None}
            for p, (n, k) in totals.items()
        ],
        "confident_claims_kept_floor": floor / claims if claims else None,
        "claims_full_confident": claims,
        "seeds": args.seeds,
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
    parser.add_argument(
        "--frontier", action="store_true", help="policies replayed on the full studies kept in --root"
    )
    parser.add_argument("--replicate-sd", type=float, default=0.35, help="--simulate: replicate shift sd")
    parser.add_argument("--resamples", type=int, default=100, help="--simulate: bootstrap resamples")
    parser.add_argument(
        "--replicates", type=int, default=3, help="--simulate: R, replicates of the full study"
    )
    parser.add_argument("--simulation-seed", type=int, default=0)
    parser.add_argument(
        "--prune-top-k",
        type=int,
        default=0,
        help="--simulate: candidates per target kept by estimate (0: no pruning)",
    )
    parser.add_argument(
        "--audit-fraction", type=float, default=0.1, help="--simulate: of the pruned, trained to check"
    )
    parser.add_argument(
        "--estimator-spearman", type=float, default=0.535, help="--simulate: the estimate's rank correlation"
    )
    parser.add_argument("--flags", type=float, help="--simulate: transfer.race.flags (default: its default)")
    parser.add_argument("--check-full", action="store_true", help="--simulate: the full study's claims too")
    return parser


def main(args: argparse.Namespace) -> None:
    if args.frontier:
        if not args.root:
            raise SystemExit(
                "--frontier: give --root, the folder of an earlier run with its full-<seed> roots"
            )
        started = time.perf_counter()
        print(json.dumps(calibration.rounded(frontier(args) | {"seconds": time.perf_counter() - started})))
        return
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
        fractions, agree, sure, kept, untrained, floor_sure, floor_kept = [], 0, 0, 0, 0, 0, 0
        for seed in seeds:
            sets = [*args.set, f"transfer.seed={seed}", f"analysis.seed={seed}"]
            sets.append(f"analysis.test_subset={args.test_subset}")
            seconds = {}
            for mode, extra in (("full", []), ("raced", ["transfer.race.enabled=true"])):
                root = copy_root(base, where / f"{mode}-{seed}")
                summary = taskatlas(args.config, root, sets + extra)
                runs[mode].append(calibration.answer_of(summary))
                trained[mode] += summary["readouts_ran"] + summary["readouts_reused"]
                seconds[mode] = stage2_seconds(root)
            # the floor: the full study against itself, its Stage III/IV on the same images with
            # other resamples (Stage II reused): what the resamples' own noise lets the figure reach
            root = copy_root(where / f"full-{seed}", where / f"floor-{seed}")
            other = [*sets, f"analysis.seed={seed + FLOOR_SEED}", f"analysis.subset_seed={seed}"]
            floor = calibration.answer_of(taskatlas(args.config, root, other))
            n, k, _ = confident_kept(runs["full"][-1], floor)
            floor_sure, floor_kept = floor_sure + n, floor_kept + k
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
        "confident_claims_kept_floor": floor_kept / floor_sure if floor_sure else None,
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
