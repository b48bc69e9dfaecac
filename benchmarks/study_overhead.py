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
budget 2; its fixed costs weigh more than in --full, where the goal (<= 1.25) is judged.

1. The pipeline: `python -m pipelines.cli run -c CONFIG --json` in a subprocess, on a fresh
   storage root: a local Ray, the SQLite MLflow store under the root, everything as `make demo`.
   Its split comes from its MLflow runs' times: `setup_s` (launch to the parent run), `stage1_s`
   (to the last `train/<task>` run's end), `stage2_s` (to the `transfer` run's end),
   `analysis_s` (to the parent run's end), `exit_s` (report, Ray shut down, process gone).
2. The plain script: this file in a subprocess (`--plain`), one process, `torch.set_num_threads`
   = the machine's cores (`plain_threads`), its split timed in-process (`setup_s`, `exit_s` the
   rest of its wall time). Per task: the search as `pipelines/stage1/trial.py::tune_trial` runs each
   trial, replaying the hyperparameters Tune sampled (read from the pipeline's MLflow trial runs,
   so both sides train the same batch sizes), with ASHA's early stopping as synchronous successive
   halving over the same grace period, reduction factor and max epochs; the best trial by
   validation loss at any epoch (Tune's `scope="all"`) is trained as `train_worker` does (test
   loss every epoch), then scored per image. Stage II: every source's features of the transfer
   and test splits with `FeatureEncoder`; the plan of `plan_transfers` (first order, `self`,
   `pixels`, `random`, then the higher orders from each target's top beam by validation loss) with
   `train_readout` / `score_network`. Stages III + IV: `affinity_by_target` with the config's
   `analysis.bootstrap`, `solve_taxonomy`, `sweep_budgets`, `stability_of_rows` (no plots).

The networks, trials and readouts each side ran must match (asserted after the JSON is printed);
trial epochs may differ (ASHA stops asynchronously). The final networks see the same batches
(one worker reading its shards, as the plain loop) but may differ in float rounding between
torch's thread counts, so the beams and the taxonomy may differ too (`same_hparams`, `same_beams`, `roots`, with each side's `taxonomy_stability`). Progress goes to
stderr; the last line printed is one JSON object: `pipeline_s`, `plain_s`, `overhead_ratio`,
`pipeline_split`, `plain_split`, `plain_threads` and what both sides ran (`ran`).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from a checkout, installed or not

import pipelines  # noqa: E402, F401  (first: keeps the local Ray on loopback)

# isort: split
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from components.affinity import affinity_by_target  # noqa: E402
from components.affinity_io import transfer_table  # noqa: E402
from components.bootstrap import stability_of_rows  # noqa: E402
from components.data.scenes import SceneConfig  # noqa: E402
from components.data.shards import ShardStore  # noqa: E402
from components.data.synthetic import DatasetConfig, generate_dataset  # noqa: E402
from components.models import build_network  # noqa: E402
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
    Readout,
    ReadoutKind,
    ReadoutSettings,
    TransferPlan,
    plan_transfers,
    train_readout,
)
from components.transfer.feature_files import FeatureEncoder  # noqa: E402
from components.transfer.readout import score_network  # noqa: E402
from pipelines.analysis.plan import taxonomy_options  # noqa: E402
from pipelines.config import PipelineConfig, load_pipeline_config  # noqa: E402

CONFIG = ROOT / "configs" / "quickstart.yaml"
QUICK = [
    "tasks=[normal,depth_zbuffer,edge_texture]",
    "data.n_train=400",
    "data.n_transfer=100",
    "data.n_test=100",
    "train.epochs=2",
    "transfer.epochs=3",
    "taxonomy.budget=2",
]
SPLITS = ("transfer", "test")
BASELINE_NAMES = tuple(k.value for k in BASELINES)
LOSSES = pa.schema(  # a target's loss table, as Stage II writes it for Stage III
    [
        ("target", pa.string()),
        ("sources", pa.list_(pa.string())),
        ("image_id", pa.string()),
        ("loss", pa.float32()),
    ]
)


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
    cfg: PipelineConfig, store: ShardStore, task: Task, sampled: list[dict], device
) -> tuple[dict, list]:
    """`Stage1.search_all` for one task without Tune: `tune_trial`'s loop per trial, ASHA as synchronous successive
    halving (at each rung keep the best 1/reduction_factor by validation loss, at least one)."""
    t, seed = cfg.tune, cfg.train.seed
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
    best = min(trials, key=lambda x: min(x.val_losses))  # Tune's get_best_result(scope="all")
    return best.hparams, [len(x.val_losses) for x in trials]


def train_network(cfg: PipelineConfig, store: ShardStore, task: Task, hparams: dict, device):
    """The final training as `train_worker` runs it on one worker, then `Stage1._train`'s scoring."""
    seed = cfg.train.seed
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
    """(source, view) -> {split: (N, C, h, w) float16}: one `FeatureEncoder` over batches of both splits."""
    sources = [FeatureSource(n, FeatureKind.ENCODER, n, str(p)) for n, p in checkpoints.items()]
    kinds = {r.kind for r in plan.baselines}
    sources += [
        FeatureSource(k.value, FeatureKind(k.value), k.value)
        for k in (ReadoutKind.RANDOM, ReadoutKind.PIXELS)
        if k in kinds
    ]
    views = sorted({cfg.task(t).input for t in plan.targets}, key=lambda v: v.value)
    pairs = [(s, v) for s in sources for v in views]
    encoder = FeatureEncoder(
        pairs, cfg.model, random_seed=cfg.transfer.seed, use_gpu=device.type == "cuda", threads=threads
    )
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


def transfer(cfg: PipelineConfig, store: ShardStore, networks: dict, checkpoints: dict, threads: int) -> dict:
    """Stage II in one process: the plan, the features, every readout, a loss table per target."""
    start, t = time.perf_counter(), cfg.transfer
    sources = list(cfg.tasks)
    targets = list(t.targets) or [s for s in sources if not cfg.task(s).source_only]
    plan = plan_transfers(targets, sources, t.orders, t.beams, t.baselines)
    device = pick_device(t.use_gpu is not False)
    columns = sorted({"rgb", *(cfg.task(x).column for x in targets)})
    data = {split: sorted_split(store, split, columns) for split in SPLITS}
    features = encode(cfg, plan, checkpoints, data, threads, device)
    to_first_readout_s = time.perf_counter() - start
    settings = ReadoutSettings.from_config(t)
    outcomes: dict[Readout, tuple] = {}  # readout -> (val loss, per-image test losses, wall seconds)
    test = data["test"]

    def run(r: Readout) -> None:
        task = cfg.task(r.target)
        start = time.perf_counter()
        if r.kind is ReadoutKind.SELF:  # as jobs._score_self
            losses = score_network(
                networks[r.target], test["rgb"], test["image_id"], test[task.column], task, device
            )
            outcomes[r] = (float("nan"), losses, time.perf_counter() - start)
            return
        names = r.sources if r.kind is ReadoutKind.TRANSFER else (r.kind.value,)
        x = {s: np.concatenate([features[n, task.input][s] for n in names], axis=1) for s in SPLITS}
        result = train_readout(
            task=task,
            model=cfg.model,
            image_size=cfg.data.size,
            transfer_x=x["transfer"],
            transfer_y=data["transfer"][task.column],
            test_x=x["test"],
            test_y=test[task.column],
            test_ids=test["image_id"],
            settings=settings,
            device=device,
            channels=channels_for(task, store),
        )
        outcomes[r] = (result.val_loss, result.losses, time.perf_counter() - start)

    for r in (*plan.first_order, *plan.baselines):
        run(r)
    for target in plan.targets:  # higher orders from the first-order validation losses, as the fan-out
        first = {r.sources[0]: outcomes[r][0] for r in plan.first_order_of(target)}
        for r in plan.higher_order(target, first):
            run(r)
    losses = {r: o[1] for r, o in outcomes.items()}
    return {
        "tables": {target: loss_table(target, losses, test["image_id"]) for target in plan.targets},
        "readouts": sorted(outcomes),
        "to_first_readout_s": to_first_readout_s,
        "readout_busy_s": sum(o[2] for o in outcomes.values()),
    }


def loss_table(target: str, losses: dict[Readout, np.ndarray], ids: np.ndarray) -> pa.Table:
    """Every readout into `target`, one row per (readout, test image): Stage III's input."""
    mine = [r for r in losses if r.target == target]
    return pa.table(
        {
            "target": [target] * (len(ids) * len(mine)),
            "sources": [list(r.sources) for r in mine for _ in ids],
            "image_id": np.tile(ids, len(mine)),
            "loss": np.concatenate([losses[r] for r in mine]).astype(np.float32),
        },
        schema=LOSSES,
    )


def analyse(cfg: PipelineConfig, tables: dict[str, pa.Table]) -> dict:
    """Stages III + IV as `pipelines/analysis/run.py` computes them (no files, plots or runs)."""
    a = cfg.analysis
    result = affinity_by_target(sorted(tables), tables.__getitem__, a.bootstrap, a.seed)
    table, options = transfer_table(result.table), taxonomy_options(cfg)
    taxonomy = solve_taxonomy(table, options)
    sweep_budgets(table, options)
    answer = taxonomy.to_dict()
    if result.samples is not None:
        rows = result.table.select(["target", "sources"]).to_pydict()
        samples = result.predictive.astype(np.float32).astype(np.float64)  # as the pipeline stores them
        sources = [tuple(s) for s in rows["sources"]]
        answer["stability"] = stability_of_rows(rows["target"], sources, samples, options, taxonomy)
    return answer


def plain_study(spec: dict) -> dict:
    """The whole study in this process; `spec`: config, overrides, the trials to replay, a folder."""
    threads = spec["threads"]
    torch.set_num_threads(threads)
    cfg = load_pipeline_config(spec["config"], spec["overrides"])
    store, out = ShardStore(cfg.data.path), Path(spec["out"])
    device = pick_device(cfg.train.use_gpu is not False)
    began, marks = time.time(), [time.perf_counter()]  # epoch seconds: the parent times the process
    networks, checkpoints, hparams, trial_epochs = {}, {}, {}, {}
    search_s = 0.0
    for task in cfg.study_tasks():
        t0 = time.perf_counter()
        if cfg.tune.enabled:
            log(f"plain: search {task.name} ({len(spec['trials'][task.name])} trials)")
            hparams[task.name], trial_epochs[task.name] = search(
                cfg, store, task, spec["trials"][task.name], device
            )
        else:  # `Stage1.default_hparams`
            t = cfg.train
            hparams[task.name] = {"lr": t.lr, "weight_decay": t.weight_decay, "batch_size": t.batch_size}
        search_s += time.perf_counter() - t0
        log(f"plain: train {task.name} {hparams[task.name]}")
        networks[task.name], _ = train_network(cfg, store, task, hparams[task.name], device)
        checkpoints[task.name] = out / f"{task.name}.pt"
        torch.save(networks[task.name].state_dict(), checkpoints[task.name])
    marks.append(time.perf_counter())
    log("plain: transfer")
    stage2 = transfer(cfg, store, networks, checkpoints, threads)
    marks.append(time.perf_counter())
    log("plain: affinity + taxonomy")
    answer = analyse(cfg, stage2["tables"])
    marks.append(time.perf_counter())
    readouts = stage2["readouts"]
    return {
        "began": began,
        "ended": time.time(),
        "split": {
            "stage1_s": marks[1] - marks[0],
            "stage1_search_s": search_s,
            "stage1_train_s": marks[1] - marks[0] - search_s,
            "stage2_s": marks[2] - marks[1],
            "stage2_to_first_readout_s": stage2["to_first_readout_s"],  # reading, encoding
            "readout_busy_s": stage2["readout_busy_s"],
            "analysis_s": marks[3] - marks[2],
        },
        "networks": sorted(networks),
        "hparams": hparams,
        "trial_epochs": trial_epochs,
        "readouts": [r.name for r in readouts],
        "taxonomy": answer,
        "threads": torch.get_num_threads(),
        "imported": sorted(m for m in ("ray", "mlflow") if m in sys.modules),
    }


# ---------------------------------------------------------------- the pipeline's record


def pipeline_record(root: Path, experiment: str) -> dict:
    """From the pipeline's MLflow store: stage times, the trials Tune ran, the readouts."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking.store import default_tracking_uri

    client = MlflowClient(default_tracking_uri(root))
    exp = client.get_experiment_by_name(experiment)
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        runs += page
        if not (token := page.token):
            break
    by_name = {r.info.run_name: r for r in runs}
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    trains = sorted(
        (r for r in runs if r.info.run_name.startswith("train/")), key=lambda r: r.info.start_time
    )
    trials: dict[str, list[dict]] = {}
    trial_epochs: dict[str, list[int]] = {}
    for r in runs:
        parts = r.info.run_name.split("/")
        if parts[0] == "tune" and len(parts) == 3:
            p = r.data.params
            trials.setdefault(parts[1], []).append(
                {
                    "lr": float(p["lr"]),
                    "weight_decay": float(p["weight_decay"]),
                    "batch_size": int(p["batch_size"]),
                }
            )
            history = client.get_metric_history(r.info.run_id, "val_loss")
            trial_epochs.setdefault(parts[1], []).append(len(history))
    readouts = [r for r in runs if "readout_key" in r.data.tags]
    return {
        "parent": (parent.info.start_time / 1000, parent.info.end_time / 1000),
        "train": [(r.info.start_time / 1000, r.info.end_time / 1000) for r in trains],
        "transfer": (by_name["transfer"].info.start_time / 1000, by_name["transfer"].info.end_time / 1000),
        "readout_spans": [(r.info.start_time / 1000, r.info.end_time / 1000) for r in readouts],
        "trials": trials,
        "trial_epochs": trial_epochs,
        "hparams": {r.info.run_name.split("/")[1]: _best_params(r) for r in runs if _is_search(r)},
        "readouts": [f"{r.data.tags['sources']}->{r.data.tags['target']}" for r in readouts],
    }


def _is_search(run) -> bool:
    return run.info.run_name.startswith("tune/") and run.info.run_name.count("/") == 1


def _best_params(run) -> dict:
    p = run.data.params
    return {
        "lr": float(p["best.lr"]),
        "weight_decay": float(p["best.weight_decay"]),
        "batch_size": int(p["best.batch_size"]),
    }


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
    if all(a[1] <= b[0] for a, b in itertools.pairwise(trains)):  # tasks one at a time: search, train, ...
        ends = [parent_start] + [end for _, end in trains[:-1]]
        split["stage1_search_s"] = sum(s - e for (s, _), e in zip(trains, ends, strict=True))
        split["stage1_train_s"] = sum(end - s for s, end in trains)
    spans = record["readout_spans"]
    split["stage2_to_first_readout_s"] = min(s for s, _ in spans) - record["transfer"][0]  # mostly encoding
    split["readout_busy_s"] = sum(end - s for s, end in spans)
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


def run_plain(tmp: Path, overrides: list[str], trials: dict, threads: int) -> tuple[float, dict]:
    out = tmp / "plain"
    out.mkdir()
    spec = {
        "config": str(CONFIG),
        "overrides": overrides,
        "trials": trials,
        "out": str(out),
        "threads": threads,
    }
    (tmp / "plain.json").write_text(json.dumps(spec))
    command = [sys.executable, str(Path(__file__).resolve()), "--plain", str(tmp / "plain.json")]
    log("plain: " + " ".join(command[1:]))
    launched, start = time.time(), time.perf_counter()
    child = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True)
    wall, exited = time.perf_counter() - start, time.time()
    report = json.loads(child.stdout.strip().splitlines()[-1])
    report["split"] |= {"setup_s": report["began"] - launched, "exit_s": exited - report["ended"]}
    return wall, report


def kind_of(name: str) -> str:
    """`a+b->t` -> `order 2`; `self->t` -> `self` (and `pixels`, `random`)."""
    sources = name.split("->")[0]
    return sources if sources in BASELINE_NAMES else f"order {sources.count('+') + 1}"


def counts(networks: list, trials: dict[str, list], readouts: list[str]) -> dict:
    return {
        "networks": len(networks),
        "trials": sum(len(v) for v in trials.values()),
        "readouts": dict(sorted(Counter(map(kind_of, readouts)).items())),
    }


def higher_order(readouts: list[str]) -> list[str]:
    return sorted(n for n in readouts if kind_of(n) not in ("order 1", *BASELINE_NAMES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="the default: 3 tasks, fewer images and epochs")
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
        log(f"generating {d.n_train}/{d.n_transfer}/{d.n_test} images at {d.size}x{d.size} (not timed)")
        data = DatasetConfig(
            d.n_train, d.n_transfer, d.n_test, d.seed, d.rows_per_shard, SceneConfig(size=d.size)
        )
        generate_dataset(tmp / "data", data)
        overrides = [*overrides, f"data.path={tmp / 'data'}"]
        load = os.getloadavg()[0]
        pipeline_s, summary, record = run_pipeline(tmp, overrides)
        log(f"pipeline: {pipeline_s:.1f} s")
        plain_s, plain = run_plain(tmp, overrides, record["trials"], args.plain_threads)
        log(f"plain: {plain_s:.1f} s")
        load_after = os.getloadavg()[0]

    ran = {
        "pipeline": counts(summary["networks_trained"], record["trial_epochs"], record["readouts"]),
        "plain": counts(plain["networks"], plain["trial_epochs"], plain["readouts"]),
    }
    first = {
        side: sorted(set(r["readouts"]) - set(higher_order(r["readouts"])))
        for side, r in (("pipeline", record), ("plain", plain))
    }
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
        "ran": ran["pipeline"],
        "trial_epochs": {
            "pipeline": sum(map(sum, record["trial_epochs"].values())),
            "plain": sum(map(sum, plain["trial_epochs"].values())),
        },
        "same_hparams": record["hparams"] == plain["hparams"] if record["hparams"] else None,
        "same_beams": higher_order(record["readouts"]) == higher_order(plain["readouts"]),
        "roots": {"pipeline": summary["taxonomy"]["roots"], "plain": plain["taxonomy"]["roots"]},
        "taxonomy_stability": {  # how often the exact taxonomy comes back: near 0.5, a coin flip
            side: t.get("stability", {}).get("taxonomy")
            for side, t in (("pipeline", summary["taxonomy"]), ("plain", plain["taxonomy"]))
        },
        "load_avg_1m": [round(load, 2), round(load_after, 2)],
    }
    print(json.dumps(result))
    assert ran["pipeline"] == ran["plain"], f"the two sides ran different work: {ran}"
    assert first["pipeline"] == first["plain"], "the first-order and baseline readouts differ"
    assert not plain["imported"], f"the plain side imported {plain['imported']}"


if __name__ == "__main__":
    main()
