"""The whole study's overhead: `taskatlas run` against a plain, single-process PyTorch script that
calls the same component functions with no Ray and no MLflow (issue 15, item 1).

    .venv/bin/python benchmarks/study_overhead.py                # --quick: ~5 minutes on 2 idle cores
    .venv/bin/python benchmarks/study_overhead.py --full         # configs/quickstart.yaml as is: ~25 min
    .venv/bin/python benchmarks/study_overhead.py --set transfer.epochs=2   # more overrides, both sides
    .venv/bin/python benchmarks/study_overhead.py --keep /tmp/study --plain-threads 1   # keep the files

On a busy machine torch's threads spin against other work (here, at load 10 on 2 cores, a training
epoch took 10-20x longer with 2 threads than with 1): take the figures on a quiet machine, or
compare with `--plain-threads 1`. `--keep DIR` keeps the data and the pipeline's storage root
(`mlflow ui --backend-store-uri sqlite:///DIR/pipeline/mlflow.db` shows its runs).

One dataset is generated first (outside both timings) and passed to both sides as `data.path`;
both read the same config (configs/quickstart.yaml, then the preset's and --set's overrides).
--quick: 3 tasks (every one a target), 400/100/100 images, 2 training epochs, 3 readout epochs,
budget 2, 2 network replicates and 2 readout replicates (the quickstart's 3 and 3 in --full); its
fixed costs weigh more than in --full, where the goal (<= 1.25) is judged.

Both sides run the same work: per task N = `train.replicates` networks, each searched
(`tune.each_replicate`, else all from search 0) and trained with its own seed; R =
`transfer.replicates` replicates of every readout, replicate r with its own seed on network
replicate r mod N; a target's beams from its first-order validation losses averaged over the
replicates; Stage III on the loss tables with their `replicate` column. With
`transfer.race.enabled` (`--set`), both race: round 0 trains replicate 0 of every readout (the
beams from replicate 0), and each later round runs the multi-bootstrap and `contested` on the
tables so far; the plain side then trains the readouts the pipeline chose in that round (read
from its MLflow runs, as Tune's trials are), so both do the same work even where float rounding
tips a choice, and reports per round whether its own choice was the same (`race_rounds`).

1. The pipeline: `python -m pipelines.cli run -c CONFIG --json` in a subprocess, on a fresh
   storage root: a local Ray, the SQLite MLflow store under the root, everything as `make demo`.
   Its split comes from its MLflow runs' times: `setup_s` (launch to the parent run), `stage1_s`
   (to the last `train/<network>` run's end; `stage1_search_s` to the last `tune/<network>`
   search's end, `stage1_train_s` the rest), `stage2_s` (to the `transfer` run's end),
   `analysis_s` (to the parent run's end), `exit_s` (report, Ray shut down, process gone).
2. The plain script: this file in a subprocess (`--plain`), one process, `torch.set_num_threads`
   = the machine's cores (`plain_threads`), its split timed in-process (`setup_s`, `exit_s` the
   rest of its wall time). Stage I as `Stage1.run` orders it: search n (n < N with
   `tune.each_replicate`, else only 0) of every task, then every network. Search n of a task runs
   each trial as `pipelines/stage1/trial.py::tune_trial` does with replicate n's seed
   (`stage1.plan.network_seed`: the holdout split, initialisation, batch order), replaying the
   hyperparameters Tune sampled for it (read from the pipeline's MLflow trial runs,
   `tune/<task>[#n]/<trial>`, so both sides train the same batch sizes), with ASHA's early
   stopping as synchronous successive halving over the same grace period, reduction factor and
   max epochs; the best trial by its last validation loss (`stage1.search.best_trial`, Tune's
   `scope="last"`). Network replicate n is trained with its search's best hyperparameters and its
   seed as `train_worker` does on one worker (test loss every epoch), then scored per image.
   Stage II: the plan of `stage2.plan.transfer_plan` (`plan_transfers` with R readout and N
   network replicates); every network replicate's features, its `random` encoder's
   (`stage2.plan.random_seed`) and `pixels`', of the transfer and test splits with one
   `FeatureEncoder`; every replicate of each readout (`TransferPlan.replicas`: first order,
   `self`, `pixels`, `random`, then the higher orders from each target's beams on its
   first-order validation losses of every replicate) with `train_readout` at `readout_seed` and
   `split_seed` on network replicate r mod N's features, or, for `self` replicate r,
   `score_network` on the target's network r mod N. Stages III + IV:
   `affinity_by_target` (the config's `analysis.bootstrap`, `transfer.pairing`, test subset),
   `solve_taxonomy`, `sweep_budgets`, `stability_of_rows` with each resample's beam availability
   (no plots).

Before anything is printed the two sides' work is checked: the same networks, the same searches
with the same trials, the same readouts (replicates included) and as many of each kind (`ran`),
and no Ray or MLflow in the plain process; a difference ends the run with one line naming it, and
no figure. Trial epochs may differ (ASHA stops asynchronously). The plain side trains readouts
one by one (`train_readout`), as the pipeline does on CPUs for the quickstart's targets (pixel
tasks: `transfer.stack: 0` stacks them only on GPUs or in one-batch epochs). The final networks
see the same batches (one worker reading its shards, as the plain loop) but may differ in float
rounding between torch's thread counts, so the beams and the taxonomy may differ too
(`same_hparams`, `same_beams`, `roots`, with each side's `taxonomy_stability`). Progress goes
to stderr; the last line printed is one JSON object: `pipeline_s`, `plain_s`, `overhead_ratio`,
`pipeline_split`, `plain_split`, `plain_threads` and what both sides ran (`ran`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from a checkout, installed or not

import pipelines  # noqa: E402, F401  (first: keeps the local Ray on loopback)

# isort: split
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from components.affinity import affinity_by_target, study_image_ids  # noqa: E402
from components.affinity_io import transfer_table  # noqa: E402
from components.bootstrap import stability_of_rows  # noqa: E402
from components.data.scenes import SceneConfig  # noqa: E402
from components.data.shards import ShardStore  # noqa: E402
from components.data.synthetic import DatasetConfig, generate_dataset  # noqa: E402
from components.models import build_network  # noqa: E402
from components.racing import FLAGS as RACE_FLAGS  # noqa: E402
from components.racing import contested, next_round  # noqa: E402
from components.resampling import replicate_draws  # noqa: E402
from components.tasks import Task, channels_for  # noqa: E402
from components.taxonomy import solve_taxonomy, sweep_budgets  # noqa: E402
from components.training import (  # noqa: E402
    OptimConfig,
    evaluate,
    holdout_split,
    iter_batches,
    make_optimizer,
    nanmean,
    per_image_losses,
    pick_device,
    train_one_epoch,
)
from components.transfer import (  # noqa: E402
    BASELINES,
    FeatureKind,
    FeatureSource,
    Pairing,
    Readout,
    ReadoutKind,
    ReadoutSettings,
    TransferPlan,
    network_replicate,
    readout_seed,
    split_seed,
    train_readout,
)
from components.transfer.beams import beam_availability  # noqa: E402
from components.transfer.feature_files import FeatureEncoder  # noqa: E402
from components.transfer.readout import score_network  # noqa: E402
from components.transfer.readout_files import LOSS_SCHEMA  # noqa: E402
from pipelines.analysis.plan import keep_test_subset, taxonomy_options  # noqa: E402
from pipelines.config import PipelineConfig, load_pipeline_config  # noqa: E402
from pipelines.stage1.plan import Stage1Plan, network_name  # noqa: E402
from pipelines.stage2.plan import random_seed, transfer_plan  # noqa: E402

CONFIG = ROOT / "configs" / "quickstart.yaml"
QUICK = [
    "tasks=[normal,depth_zbuffer,edge_texture]",
    "data.n_train=400",
    "data.n_transfer=100",
    "data.n_test=100",
    "train.epochs=2",
    "train.replicates=2",
    "transfer.epochs=3",
    "transfer.replicates=2",
    "taxonomy.budget=2",
]
SPLITS = ("transfer", "test")
BASELINE_NAMES = tuple(k.value for k in BASELINES)


def log(message: str) -> None:
    print(f"[study_overhead] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the plain script


@dataclass
class Trial:
    """One search trial kept in memory between rungs: what `tune_trial` holds in its process."""

    hparams: dict
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    val_losses: list[float] = field(default_factory=list)


def search(
    cfg: PipelineConfig, store: ShardStore, task: Task, sampled: list[dict], seed: int, device
) -> tuple[dict, list]:
    """One search of `search_tasks` for one task without Tune: `tune_trial`'s loop per trial with
    the search's seed (network replicate n's), ASHA as synchronous successive halving (at each
    rung keep the best 1/reduction_factor by validation loss, at least one); the best trial by its
    last finite validation loss (`best_trial`)."""
    t = cfg.tune
    fit, val = holdout_split(store.read("train", task.columns), t.holdout_fraction, seed)
    if t.max_train_images:
        fit = {k: v[: t.max_train_images] for k, v in fit.items()}
    trials = []
    for hparams in sampled:
        torch.manual_seed(seed)  # as each trial process does
        model = build_network(task, cfg.model, cfg.data.size, channels_for(task, store)).to(device)
        optimizer = make_optimizer(model, OptimConfig(**hparams))
        trials.append(Trial(hparams, model, optimizer, torch.Generator(device=device).manual_seed(seed)))
    alive, rung = trials, t.grace_period
    while True:
        stop = min(rung, t.max_epochs)
        for trial in alive:
            while len(trial.val_losses) < stop:
                epoch = len(trial.val_losses)
                batches = iter_batches(fit, trial.hparams["batch_size"], shuffle=True, seed=seed + epoch)
                train_one_epoch(trial.model, trial.optimizer, batches, task, device, trial.generator)
                trial.val_losses.append(evaluate(trial.model, iter_batches(val, 256), task, device))
        if stop >= t.max_epochs:
            break
        alive = sorted(alive, key=lambda x: x.val_losses[-1])[: max(1, len(alive) // t.reduction_factor)]
        rung *= t.reduction_factor
    scored = [x for x in trials if math.isfinite(x.val_losses[-1])]
    if not scored:
        raise SystemExit(f"plain: every search trial of {task.name} ended with a non-finite loss")
    best = min(scored, key=lambda x: x.val_losses[-1])  # Tune's get_best_result(scope="last")
    return best.hparams, [len(x.val_losses) for x in trials]


def train_network(cfg: PipelineConfig, store: ShardStore, task: Task, hparams: dict, seed: int, device):
    """The final training of one network replicate (`seed`: its `network_seed`) as `train_worker`
    runs it on one worker (rank 0: its generator at seed + 0), then `Stage1._score`'s scoring."""
    torch.manual_seed(seed)
    model = build_network(task, cfg.model, cfg.data.size, channels_for(task, store)).to(device)
    optimizer = make_optimizer(model, OptimConfig(**hparams))
    generator = torch.Generator(device=device).manual_seed(seed)
    train, test = store.read("train", task.columns), store.read("test", task.columns)
    for epoch in range(cfg.train.epochs):
        batches = iter_batches(train, hparams["batch_size"], shuffle=True, seed=seed + epoch)
        train_one_epoch(model, optimizer, batches, task, device, generator)
        evaluate(model, iter_batches(test, 256), task, device)  # rank 0's test loss every epoch
    _, losses = per_image_losses(model, iter_batches(test, 256), task, device)
    return model, nanmean(losses)


def sorted_split(store: ShardStore, split: str, columns: list[str]) -> dict[str, np.ndarray]:
    """A split in memory, rows sorted by image id (as Stage II's feature caches and labels)."""
    data = store.read(split, columns)
    order = np.argsort(data["image_id"].astype(str))
    return {k: v[order] for k, v in data.items()} | {"image_id": data["image_id"].astype(str)[order]}


def encode(cfg: PipelineConfig, plan: TransferPlan, checkpoints: dict, data: dict, threads: int, device):
    """(source, view) -> {split: (N, C, h, w) float16}: one `FeatureEncoder` over batches of both
    splits for every network replicate's encoder (source `network_name(task, n)`, as
    `FeatureCache.ensure_replicates` encodes each replicate's), `random` per network replicate
    (`random#n`, `random_seed`), and `pixels` once."""
    sources = [
        FeatureSource(name, FeatureKind.ENCODER, name, str(path))
        for (task, n), path in checkpoints.items()
        if task in plan.sources
        for name in [network_name(task, n)]
    ]
    kinds, random = {r.kind for r in plan.baselines}, ReadoutKind.RANDOM.value
    if ReadoutKind.RANDOM in kinds:
        sources += [
            FeatureSource(name, FeatureKind.RANDOM, name, seed=random_seed(cfg.transfer.seed, n))
            for n in range(plan.networks)
            for name in [network_name(random, n)]
        ]
    if ReadoutKind.PIXELS in kinds:
        sources.append(FeatureSource("pixels", FeatureKind.PIXELS, "pixels"))
    views = sorted({cfg.task(t).input for t in plan.targets}, key=lambda v: v.value)
    pairs = [(s, v) for s in sources for v in views]
    encoder = FeatureEncoder(pairs, cfg.model, use_gpu=device.type == "cuda", threads=threads)
    out: dict = {(s.name, v): {} for s, v in pairs}
    size = cfg.transfer.encode_batch_size
    for split in SPLITS:
        d = data[split]
        blocks = [
            encoder({"image_id": d["image_id"][i : i + size], "rgb": d["rgb"][i : i + size]})
            for i in range(0, len(d["image_id"]), size)
        ]
        for i, (s, v) in enumerate(pairs):
            out[s.name, v][split] = np.concatenate([b[f"f{i}"] for b in blocks])
    return out


def transfer(
    cfg: PipelineConfig,
    store: ShardStore,
    networks: dict,
    checkpoints: dict,
    threads: int,
    replay: dict[int, list[str]] | None = None,
) -> dict:
    """Stage II in one process: the plan, the features, every replicate of every readout (raced
    with `transfer.race`: round 0, then each round's multi-bootstrap and choice), a loss table per
    target. `networks` and `checkpoints`: (task, network replicate) -> model, weights; `replay`:
    the readouts the pipeline trained in race round k, trained here in its place."""
    start, t = time.perf_counter(), cfg.transfer
    plan = transfer_plan(cfg, [task.name for task in cfg.study_tasks()])  # as `Stage2Plan.plan`
    device = pick_device(t.use_gpu is not False)
    columns = sorted({"rgb", *(cfg.task(x).column for x in plan.targets)})
    data = {split: sorted_split(store, split, columns) for split in SPLITS}
    features = encode(cfg, plan, checkpoints, data, threads, device)
    to_first_readout_s = time.perf_counter() - start
    settings = ReadoutSettings.from_config(t)  # replicate 0's; each readout's seed: `readout_seed`
    outcomes: dict[Readout, tuple] = {}  # readout -> (val loss, per-image test losses, wall seconds)
    test = data["test"]

    def run(r: Readout) -> None:
        task, n = cfg.task(r.target), network_replicate(r, plan.networks)
        start = time.perf_counter()
        if r.kind is ReadoutKind.SELF:  # as jobs._score_self, on the target's network r mod N
            losses = score_network(
                networks[r.target, n], test["rgb"], test["image_id"], test[task.column], task, device
            )
            outcomes[r] = (float("nan"), losses, time.perf_counter() - start)
            return
        if r.kind is not ReadoutKind.TRANSFER and r.kind not in (ReadoutKind.PIXELS, ReadoutKind.RANDOM):
            raise SystemExit(f"plain: no {r.kind.value} baseline here (transfer.baselines)")
        # network replicate n's features of each source, and of `random`; `pixels`: the same in each
        names = [network_name(s, n) for s in r.sources] if r.kind is not ReadoutKind.PIXELS else ["pixels"]
        x = {s: np.concatenate([features[name, task.input][s] for name in names], axis=1) for s in SPLITS}
        result = train_readout(
            task=task,
            model=cfg.model,
            image_size=cfg.data.size,
            transfer_x=x["transfer"],
            transfer_y=data["transfer"][task.column],
            test_x=x["test"],
            test_y=test[task.column],
            test_ids=test["image_id"],
            settings=replace(  # as `Stage2Plan.job`
                settings, seed=readout_seed(t.seed, r, t.pairing), split_seed=split_seed(t.seed, r.replicate)
            ),
            device=device,
            channels=channels_for(task, store),
        )
        outcomes[r] = (result.val_loss, result.losses, time.perf_counter() - start)

    race = t.race.enabled and plan.replicates > 1
    first_round = replace(plan, replicates=1) if race else plan  # racing: round 0, as `Stage2.run`
    for readout in (*plan.first_order, *plan.baselines):
        for r in first_round.replicas(readout):
            run(r)
    for target in plan.targets:  # higher orders from the replicates' first-order validation losses
        first: dict[str, list[float]] = {}
        for readout in plan.first_order_of(target):
            for r in first_round.replicas(readout):
                first.setdefault(r.sources[0], []).append(outcomes[r][0])
        for readout in plan.higher_order(target, first):
            for r in first_round.replicas(readout):
                run(r)

    def tables() -> dict[str, pa.Table]:  # the loss tables of every readout so far
        losses = {r: o[1] for r, o in outcomes.items()}
        return {target: loss_table(target, losses, test["image_id"]) for target in plan.targets}

    rounds = []  # racing: per round k, how many readouts and whether this side chose the same
    for k in range(1, plan.replicates if race else 1):
        mine = race_round(cfg, plan, tables(), sorted(outcomes), k)
        # the pipeline's choice (float rounding may tip a share): the same work
        chosen = mine if replay is None else [readout_named(n) for n in replay.get(k, [])]
        same = {r.name for r in mine} == {r.name for r in chosen}
        rounds.append({"round": k, "readouts": len(chosen), "same": same})
        if not chosen:
            break  # as `Stage2.run`: no claim can move
        for r in chosen:
            run(r)
    val_losses: dict[tuple[str, str], list[float]] = {}  # (target, source) -> per replicate, in order
    for r in sorted(outcomes, key=lambda r: r.replicate):
        if r.kind is ReadoutKind.TRANSFER and r.order == 1:
            val_losses.setdefault((r.target, r.sources[0]), []).append(outcomes[r][0])
    return {
        "tables": tables(),
        "readouts": sorted(outcomes),
        "val_losses": val_losses,
        "race_rounds": rounds,
        "to_first_readout_s": to_first_readout_s,
        "readout_busy_s": sum(o[2] for o in outcomes.values()),
    }


def race_round(cfg: PipelineConfig, plan: TransferPlan, tables: dict, readouts: list[Readout], k: int):
    """Replicate k of each readout still in its target's race, as `Stage2._race_round` decides
    it: the multi-bootstrap (Stage III's settings) of the tables so far, `contested`, `next_round`."""
    race = cfg.transfer.race
    result = subset_affinity(cfg, tables, require_self=False)
    shares = result.table.select(["target", "sources", "affinity", "p_best", *RACE_FLAGS]).to_pylist()
    counts = Counter((r.target, r.sources) for r in readouts)
    still = contested(shares, counts, race.p_best, race.settled, race.top, race.flags)
    first = {(r.target, r.sources): r.first for r in readouts if r.replicate == 0}
    most = {c: len(plan.replicas(r)) for c, r in first.items()}
    return [replace(first[c], replicate=k) for c in next_round(counts, still, k, most)]


def readout_named(name: str) -> Readout:
    """`a+b->t#2` (`Readout.name`) -> the readout: the pipeline's racing choices, replayed."""
    head, _, replicate = name.partition("#")
    sources, target = head.split("->")
    kind = ReadoutKind(sources) if sources in BASELINE_NAMES else ReadoutKind.TRANSFER
    return Readout(target, tuple(sources.split("+")), kind, int(replicate or 0))


def loss_table(target: str, losses: dict[Readout, np.ndarray], ids: np.ndarray) -> pa.Table:
    """Every readout replicate into `target`, one row per (readout, replicate, test image): Stage
    III's input, as `write_target_losses` joins the readout files (`LOSS_SCHEMA`)."""
    mine = sorted(r for r in losses if r.target == target)
    return pa.table(
        {
            "target": [target] * (len(ids) * len(mine)),
            "sources": [list(r.sources) for r in mine for _ in ids],
            "image_id": np.tile(ids, len(mine)),
            "loss": np.concatenate([losses[r] for r in mine]).astype(np.float32),
            "replicate": np.repeat(np.array([r.replicate for r in mine], np.int32), len(ids)),
        },
        schema=LOSS_SCHEMA,
    )


def subset_affinity(cfg: PipelineConfig, tables: dict[str, pa.Table], require_self: bool = True):
    """`study_affinity` on tables in memory: the test subset of each, the multi-bootstrap with
    Stage III's settings (a racing round's, and Stage III's own)."""
    a = cfg.analysis
    tables = {
        k: keep_test_subset(v, a.test_subset_seed, a.test_subset, f"target {k}'s loss table")
        for k, v in tables.items()
    }
    ids = study_image_ids(tables[k].select(["image_id"]) for k in sorted(tables)) if a.bootstrap else None
    paired = cfg.transfer.pairing is Pairing.PAIRED
    return affinity_by_target(
        sorted(tables), tables.__getitem__, a.bootstrap, a.seed, ids, paired=paired, require_self=require_self
    )


def analyse(cfg: PipelineConfig, tables: dict[str, pa.Table], val_losses: dict) -> dict:
    """Stages III + IV as `pipelines/analysis/run.py` computes them (no files, plots or runs)."""
    result = subset_affinity(cfg, tables)
    table, options = transfer_table(result.table), taxonomy_options(cfg)
    taxonomy = solve_taxonomy(table, options)
    sweep_budgets(table, options)
    answer = taxonomy.to_dict()
    if result.samples is not None:
        rows = result.table.select(["target", "sources"]).to_pydict()
        samples = result.predictive.astype(np.float32).astype(np.float64)  # as the pipeline stores them
        sources = [tuple(s) for s in rows["sources"]]
        available = beams_in_reach(cfg, rows["target"], sources, val_losses, len(result.samples))
        answer["stability"] = stability_of_rows(
            rows["target"], sources, samples, options, taxonomy, available=available
        )
    return answer


def beams_in_reach(cfg: PipelineConfig, targets: list, sources: list, val_losses: dict, n: int):
    """`analysis.run._beam_availability` from the first-order validation losses in memory."""
    t, seed = cfg.transfer, cfg.analysis.seed
    if not t.orders:
        return None
    losses = {k: np.asarray(v) for k, v in val_losses.items()}
    slots: dict[str, int] = {}
    for (target, _), v in losses.items():
        slots[target] = max(slots.get(target, 0), len(v))
    draws = {
        (target, source): replicate_draws(seed, target, slots[target], n) % len(v)
        if t.pairing is Pairing.PAIRED
        else replicate_draws(seed, target, len(v), n, (source,))
        for (target, source), v in losses.items()
    }
    rows = list(zip(targets, sources, strict=True))
    return beam_availability(rows, losses, draws, t.orders, t.beams, t.widen_beams, n)


def plain_study(spec: dict) -> dict:
    """The whole study in this process; `spec`: config, overrides, the trials to replay (by search
    name, `tune/<name>`), a folder."""
    threads = spec["threads"]
    torch.set_num_threads(threads)
    cfg = load_pipeline_config(spec["config"], spec["overrides"])
    store, out = ShardStore(cfg.data.path), Path(spec["out"])
    stage1 = Stage1Plan(cfg, store)
    device = pick_device(cfg.train.use_gpu is not False)
    began, marks = time.time(), [time.perf_counter()]  # epoch seconds: the parent times the process
    tasks = cfg.study_tasks()
    hparams, trial_epochs = {}, {}  # by search: `normal`, `normal#1`
    for s in stage1.searches() if cfg.tune.enabled else ():  # as `Stage1.run`: search n of every task
        for task in tasks:
            name = network_name(task.name, s)
            sampled = spec["trials"].get(name, [])
            log(f"plain: search {name} ({len(sampled)} trials)")
            hparams[name], trial_epochs[name] = search(cfg, store, task, sampled, stage1.seed(s), device)
    marks.append(time.perf_counter())
    networks, checkpoints = {}, {}  # (task, replicate) -> model, its weights' file
    for task in tasks:
        for n in range(stage1.replicates):
            searched = cfg.tune.enabled  # else `Stage1Plan.default_hparams`, as the pipeline trains
            h = (
                hparams[network_name(task.name, stage1.search_of(n))]
                if searched
                else stage1.default_hparams().to_json()
            )
            log(f"plain: train {network_name(task.name, n)} {h}")
            networks[task.name, n], _ = train_network(cfg, store, task, h, stage1.seed(n), device)
            checkpoints[task.name, n] = out / f"{task.name}.r{n}.pt"
            torch.save(networks[task.name, n].state_dict(), checkpoints[task.name, n])
    marks.append(time.perf_counter())
    log("plain: transfer")
    replay = {int(k): v for k, v in spec["race"].items()} if spec.get("race") is not None else None
    stage2 = transfer(cfg, store, networks, checkpoints, threads, replay)
    marks.append(time.perf_counter())
    log("plain: affinity + taxonomy")
    answer = analyse(cfg, stage2["tables"], stage2["val_losses"])
    marks.append(time.perf_counter())
    return {
        "began": began,
        "ended": time.time(),
        "split": {
            "stage1_s": marks[2] - marks[0],
            "stage1_search_s": marks[1] - marks[0],
            "stage1_train_s": marks[2] - marks[1],
            "stage2_s": marks[3] - marks[2],
            "stage2_to_first_readout_s": stage2["to_first_readout_s"],  # reading, encoding
            "readout_busy_s": stage2["readout_busy_s"],
            "analysis_s": marks[4] - marks[3],
        },
        "networks": sorted(network_name(task, n) for task, n in networks),
        "hparams": hparams,
        "trial_epochs": trial_epochs,
        "readouts": [r.name for r in stage2["readouts"]],
        "race_rounds": stage2["race_rounds"],
        "taxonomy": answer,
        "threads": torch.get_num_threads(),
        "imported": sorted(m for m in ("ray", "mlflow") if m in sys.modules),
    }


# ---------------------------------------------------------------- the pipeline's record


def pipeline_record(root: Path, experiment: str) -> dict:
    """From the pipeline's MLflow store: stage times, the trials each search ran (by search name,
    `normal` or `normal#1`, in Tune's order), each search's best, the readouts (`Readout.name`)."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking.runs import COMPANION_DESCRIPTIONS, companion_name
    from pipelines.tracking.store import default_tracking_uri

    client = MlflowClient(default_tracking_uri(root))
    # the study's stage runs, its trials' and its readouts' (companion experiments)
    names = [experiment] + [companion_name(experiment, kind) for kind in COMPANION_DESCRIPTIONS]
    ids = [client.get_experiment_by_name(name) for name in names]
    runs, token = [], None
    while True:
        page = client.search_runs([e.experiment_id for e in ids if e], max_results=1000, page_token=token)
        runs += page
        if not (token := page.token):
            break
    by_name = {r.info.run_name: r for r in runs}
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    trains = sorted(
        (r for r in runs if r.info.run_name.startswith("train/")), key=lambda r: r.info.start_time
    )
    searches = [r for r in runs if _is_search(r)]
    trial_runs: dict[str, list] = {}
    for r in runs:
        parts = r.info.run_name.split("/")
        if parts[0] == "tune" and len(parts) == 3:  # tune/<task>[#n]/<trial id>
            trial_runs.setdefault(parts[1], []).append(r)
    trials: dict[str, list[dict]] = {}
    trial_epochs: dict[str, list[int]] = {}
    for name, mine in sorted(trial_runs.items()):
        for r in sorted(mine, key=lambda r: r.data.tags.get("trial_id", r.info.run_name)):  # Tune's order
            p = r.data.params
            trials.setdefault(name, []).append(
                {
                    "lr": float(p["lr"]),
                    "weight_decay": float(p["weight_decay"]),
                    "batch_size": int(p["batch_size"]),
                }
            )
            history = client.get_metric_history(r.info.run_id, "val_loss")
            trial_epochs.setdefault(name, []).append(len(history))
    readouts = [r for r in runs if "candidate_key" in r.data.tags]  # a run per candidate
    return {
        "parent": (parent.info.start_time / 1000, parent.info.end_time / 1000),
        "train": [(r.info.start_time / 1000, r.info.end_time / 1000) for r in trains],
        "search": [(r.info.start_time / 1000, r.info.end_time / 1000) for r in searches],
        "transfer": (by_name["transfer"].info.start_time / 1000, by_name["transfer"].info.end_time / 1000),
        "readout_starts": [r.info.start_time / 1000 for r in readouts],  # its first replicate's
        "readout_seconds": [
            v for r in readouts for k, v in r.data.metrics.items() if k.startswith("seconds/r")
        ],
        "trials": trials,
        "trial_epochs": trial_epochs,
        "hparams": {r.info.run_name.split("/")[1]: _best_params(r) for r in searches},
        "readouts": [name for r in readouts for name in _readout_names(r)],
    }


def _is_search(run) -> bool:
    """A search's run, `tune/<task>` or `tune/<task>#n` (`record_search`), not one of its trials."""
    return run.info.run_name.startswith("tune/") and run.info.run_name.count("/") == 1


def _best_params(run) -> dict:
    p = run.data.params
    return {
        "lr": float(p["best.lr"]),
        "weight_decay": float(p["best.weight_decay"]),
        "batch_size": int(p["best.batch_size"]),
    }


def _readout_names(run) -> list[str]:
    """The `Readout.name` of each replicate on a candidate's run (its `test_loss/r<k>`): `a+b->t`,
    `a+b->t#r` for replicate r > 0."""
    tags, name = run.data.tags, f"{run.data.tags['sources']}->{run.data.tags['target']}"
    reps = sorted(int(k.removeprefix("test_loss/r")) for k in run.data.metrics if k.startswith("test_loss/r"))
    assert len(reps) == run.data.metrics["replicates"], tags  # every finished replicate has its loss
    return [name + (f"#{r}" if r else "") for r in reps]


def pipeline_split(record: dict, launched: float, exited: float) -> dict:
    """Contiguous spans from the launch to the exit of `taskatlas run` (they sum to its wall time)."""
    parent_start, parent_end = record["parent"]
    trains = record["train"]
    stage1_end = max(end for _, end in trains)
    split = {
        "setup_s": parent_start - launched,
        "stage1_s": stage1_end - parent_start,
        "stage2_s": record["transfer"][1] - stage1_end,
        "analysis_s": parent_end - record["transfer"][1],
        "exit_s": exited - parent_end,
    }
    searches = record["search"]
    if not searches:
        split |= {"stage1_search_s": 0.0, "stage1_train_s": split["stage1_s"]}
    elif max(end for _, end in searches) <= min(start for start, _ in trains):  # every search, then training
        searched = max(end for _, end in searches)
        split |= {"stage1_search_s": searched - parent_start, "stage1_train_s": stage1_end - searched}
    split["stage2_to_first_readout_s"] = (
        min(record["readout_starts"]) - record["transfer"][0]
    )  # mostly encoding
    split["readout_busy_s"] = sum(record["readout_seconds"])  # each replicate's own training time
    return split


# ---------------------------------------------------------------- driver


def run_pipeline(tmp: Path, overrides: list[str]) -> tuple[float, dict, dict]:
    root = tmp / "pipeline"
    command = [sys.executable, "-m", "pipelines.cli", "run", "-c", str(CONFIG), "--json"]
    command += [a for o in [*overrides, f"storage_root={root}"] for a in ("--set", o)]
    log("pipeline: " + " ".join(command[1:]))
    launched, start = time.time(), time.perf_counter()
    child = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=False)
    wall, exited = time.perf_counter() - start, time.time()
    sys.stderr.write(child.stdout)
    if child.returncode:
        raise SystemExit(f"taskatlas run failed with exit code {child.returncode}")
    summary = json.loads(child.stdout.strip().splitlines()[-1])
    cfg = load_pipeline_config(CONFIG, overrides)
    record = pipeline_record(root, cfg.name)
    return wall, summary, record | {"split": pipeline_split(record, launched, exited)}


def run_plain(
    tmp: Path, overrides: list[str], trials: dict, race: dict | None, threads: int
) -> tuple[float, dict]:
    out = tmp / "plain"
    out.mkdir()
    spec = {
        "config": str(CONFIG),
        "overrides": overrides,
        "trials": trials,
        "race": race,
        "out": str(out),
        "threads": threads,
    }
    (tmp / "plain.json").write_text(json.dumps(spec))
    command = [sys.executable, str(Path(__file__).resolve()), "--plain", str(tmp / "plain.json")]
    log("plain: " + " ".join(command[1:]))
    launched, start = time.time(), time.perf_counter()
    child = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=False)
    wall, exited = time.perf_counter() - start, time.time()
    if child.returncode:
        raise SystemExit(f"the plain side failed with exit code {child.returncode}")
    report = json.loads(child.stdout.strip().splitlines()[-1])
    report["split"] |= {"setup_s": report["began"] - launched, "exit_s": exited - report["ended"]}
    return wall, report


def race_rounds(readouts: list[str]) -> dict[int, list[str]]:
    """The pipeline's readouts by race round: round k trained replicate k (`a+b->t#k`)."""
    rounds: dict[int, list[str]] = {}
    for name in readouts:
        if "#" in name:
            rounds.setdefault(int(name.rpartition("#")[2]), []).append(name)
    return rounds


def kind_of(name: str) -> str:
    """`a+b->t` (or `a+b->t#1`) -> `order 2`; `self->t` -> `self` (and `pixels`, `random`)."""
    sources = name.split("->")[0]
    return sources if sources in BASELINE_NAMES else f"order {sources.count('+') + 1}"


def counts(networks: list, trials: dict[str, list], readouts: list[str]) -> dict:
    return {
        "networks": len(networks),
        "searches": len(trials),
        "trials": sum(len(v) for v in trials.values()),
        "readouts": dict(sorted(Counter(map(kind_of, readouts)).items())),
    }


def higher_order(readouts: list[str]) -> list[str]:
    return sorted(n for n in readouts if kind_of(n) not in ("order 1", *BASELINE_NAMES))


def check_same_work(summary: dict, record: dict, plain: dict) -> dict:
    """What each side ran (`counts`), after checking that it is the same work: the same networks,
    searches and trials, the same readouts (replicates included), no Ray or MLflow in the plain
    process. A difference ends the run (SystemExit) in one line naming it, before any figure."""
    ran = {
        "pipeline": counts(summary["networks_trained"], record["trial_epochs"], record["readouts"]),
        "plain": counts(plain["networks"], plain["trial_epochs"], plain["readouts"]),
    }

    def differ(what: str, pipeline, plain_side) -> None:
        if pipeline == plain_side:
            return
        if isinstance(pipeline, dict):  # name only the entries that differ
            keys = sorted(k for k in {*pipeline, *plain_side} if pipeline.get(k) != plain_side.get(k))
            pipeline, plain_side = ({k: side.get(k) for k in keys} for side in (pipeline, plain_side))
        raise SystemExit(f"the two sides ran different {what}: pipeline {pipeline}, plain {plain_side}")

    differ("work", ran["pipeline"], ran["plain"])
    differ("networks", sorted(summary["networks_trained"]), plain["networks"])
    differ("searches", sorted(record["hparams"]), sorted(plain["hparams"]))
    differ(
        "trials",
        {k: len(v) for k, v in sorted(record["trials"].items())},
        {k: len(v) for k, v in sorted(plain["trial_epochs"].items())},
    )
    first = {
        side: sorted(set(r["readouts"]) - set(higher_order(r["readouts"])))
        for side, r in (("pipeline", record), ("plain", plain))
    }
    if first["pipeline"] != first["plain"]:
        only = sorted(set(first["pipeline"]) ^ set(first["plain"]))
        raise SystemExit(f"the two sides ran different first-order or baseline readouts: {only[:6]}")
    if len(higher_order(plain["readouts"])) != len(set(higher_order(plain["readouts"]))):
        raise SystemExit("the plain side ran a higher-order readout twice")
    if plain["imported"]:
        raise SystemExit(f"the plain side imported {plain['imported']}")
    return ran["pipeline"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument(
        "--quick", action="store_true", help="the default: 3 tasks, fewer images, epochs and replicates"
    )
    preset.add_argument("--full", action="store_true", help="configs/quickstart.yaml as is (~25 minutes)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--plain-threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch threads of the plain side (cores)",
    )
    parser.add_argument("--keep", type=Path, help="work in this new folder and keep it (data, storage root)")
    parser.add_argument("--plain", type=Path, help=argparse.SUPPRESS)  # the plain side's subprocess
    args = parser.parse_args()
    if args.plain:
        print(json.dumps(plain_study(json.loads(args.plain.read_text()))))
        return

    overrides = ([] if args.full else QUICK) + args.overrides
    if args.keep:
        args.keep.mkdir(parents=True)  # a new folder: the pipeline needs a fresh storage root
    workdir = contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="study-")
    with workdir as tmp_dir:
        tmp = Path(tmp_dir)
        cfg = load_pipeline_config(CONFIG, overrides)
        d = cfg.data
        log(
            f"generating {d.n_train}/{d.n_transfer}/{d.n_test} images at {d.size}x{d.size} (not timed); "
            f"{cfg.train.replicates} network and {cfg.transfer.replicates} readout replicates"
        )
        data = DatasetConfig(
            d.n_train, d.n_transfer, d.n_test, d.seed, d.rows_per_shard, SceneConfig(size=d.size)
        )
        generate_dataset(tmp / "data", data)
        overrides = [*overrides, f"data.path={tmp / 'data'}"]
        load = os.getloadavg()[0]
        pipeline_s, summary, record = run_pipeline(tmp, overrides)
        log(f"pipeline: {pipeline_s:.1f} s")
        race = race_rounds(record["readouts"]) if cfg.transfer.race.enabled else None
        plain_s, plain = run_plain(tmp, overrides, record["trials"], race, args.plain_threads)
        log(f"plain: {plain_s:.1f} s")
        load_after = os.getloadavg()[0]

    ran = check_same_work(summary, record, plain)  # before any figure: never one of unequal work
    result = {
        "preset": "full" if args.full else "quick",
        "overrides": [o for o in overrides if not o.startswith("data.path=")],
        "pipeline_s": round(pipeline_s, 1),
        "plain_s": round(plain_s, 1),
        "overhead_ratio": round(pipeline_s / plain_s, 3),
        "pipeline_split": {k: round(v, 1) for k, v in record["split"].items()},
        "plain_split": {k: round(v, 1) for k, v in plain["split"].items()},
        "plain_threads": plain["threads"],
        "plain_imported": plain["imported"],  # must be []: no Ray, no MLflow
        "cores": os.cpu_count(),
        "replicates": {"networks": cfg.train.replicates, "readouts": cfg.transfer.replicates},
        "ran": ran,
        "trial_epochs": {
            "pipeline": sum(map(sum, record["trial_epochs"].values())),
            "plain": sum(map(sum, plain["trial_epochs"].values())),
        },
        "same_hparams": record["hparams"] == plain["hparams"] if record["hparams"] else None,
        "race_rounds": plain["race_rounds"],  # per round: readouts, and whether the plain side chose alike
        "same_beams": higher_order(record["readouts"]) == higher_order(plain["readouts"]),
        "roots": {"pipeline": summary["taxonomy"]["roots"], "plain": plain["taxonomy"]["roots"]},
        "taxonomy_stability": {  # how often the exact taxonomy comes back: near 0.5, a coin flip
            side: t.get("stability", {}).get("taxonomy")
            for side, t in (("pipeline", summary["taxonomy"]), ("plain", plain["taxonomy"]))
        },
        "load_avg_1m": [round(load, 2), round(load_after, 2)],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
