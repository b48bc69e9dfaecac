"""What every pipeline command does first: the dataset, the tracker, the parent MLflow run."""

from __future__ import annotations

import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from components.config import config_hash, to_dict
from components.data.scenes import SceneConfig
from components.data.shards import ShardStore
from components.data.synthetic import DatasetConfig, generate_dataset
from components.tracking import Tracker, default_tracking_uri
from pipelines.config import PipelineConfig
from pipelines.progress import progress_bar


def dataset_config(cfg: PipelineConfig) -> DatasetConfig:
    d = cfg.data
    return DatasetConfig(
        d.n_train, d.n_transfer, d.n_test, d.seed, d.rows_per_shard, SceneConfig(size=d.size)
    )


def dataset_folder(cfg: PipelineConfig) -> Path:
    """The configured dataset folder, or where the synthetic one for this config lives."""
    if cfg.data.path:
        return Path(cfg.data.path)
    return cfg.root / "data" / f"synthetic-{config_hash(dataset_config(cfg))}"


def prepare_dataset(cfg: PipelineConfig) -> ShardStore:
    """The configured dataset, or the synthetic one (generated once, keyed by its config)."""
    out = dataset_folder(cfg)
    if not cfg.data.path and not (out / "manifest.json").exists():
        config = dataset_config(cfg)
        with progress_bar(config.n_train + config.n_transfer + config.n_test, "rendering scenes") as update:
            generate_dataset(out, config, progress=update)
    return ShardStore(out)


def open_tracker(cfg: PipelineConfig) -> Tracker:
    cfg.root.mkdir(parents=True, exist_ok=True)
    uri = cfg.tracking_uri or default_tracking_uri(cfg.root)
    artifacts = (cfg.root / "mlartifacts").as_uri() if uri.startswith("sqlite") else None
    return Tracker(uri, cfg.name, artifact_location=artifacts)


def code_version() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


@dataclass(frozen=True)
class Invocation:
    config: PipelineConfig
    store: ShardStore
    tracker: Tracker
    run_id: str


@contextmanager
def invocation(cfg: PipelineConfig, command: str):
    """Dataset + tracker + a parent run tagged with config hash, data version and code version;
    the run is marked FAILED if the body raises."""
    store = prepare_dataset(cfg)
    tracker = open_tracker(cfg)
    tags = {
        "command": command,
        "config_hash": config_hash(cfg),
        "data_version": store.data_version,
        "code_version": code_version(),
    }
    run_id = tracker.start_run(command, tags=tags)
    tracker.log_dict(run_id, to_dict(cfg), "config.json")
    try:
        yield Invocation(cfg, store, tracker, run_id)
    except BaseException:
        tracker.end_run(run_id, failed=True)
        raise
    tracker.end_run(run_id)
