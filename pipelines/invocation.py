"""What every pipeline command does first: the dataset, the tracker, the parent MLflow run."""

from __future__ import annotations

import contextlib
import ctypes
import getpass
import os
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from components.config import config_hash, to_dict
from components.data.scenes import SceneConfig
from components.data.shards import ShardStore
from components.data.synthetic import DatasetConfig, generate_dataset
from components.disk_space import free_reserve, no_space, reserve_space
from components.errors import ConfigError, OutOfSpace, TaskatlasError
from components.settings import read_settings
from components.storage import Location, location
from components.study_lock import StudyLock, lock_store
from pipelines.config import PipelineConfig, check_image_size
from pipelines.hparams import HParams
from pipelines.progress import progress_bar
from pipelines.ray_runtime import cluster_gpus, cluster_nodes
from pipelines.steps import Fence
from pipelines.tracking.entities import STORAGE_ROOT_TAG, DatasetRef
from pipelines.tracking.runs import Tracker
from pipelines.tracking.store import check_sqlite_store, default_tracking_uri, remote_storage_refusal

TRACKING_TIMEOUT_S = 10.0  # how long a tracking server has to answer before a run starts
TUNED = "tuned per task (tune/<task>)"  # a parent run's param where each network has its own value
# Under the storage root, what holds no temp files of ours (Ray's own storage, MLflow's artifacts).
_NO_TEMP_FILES = ("ray", "mlartifacts")


def dataset_config(cfg: PipelineConfig) -> DatasetConfig:
    d = cfg.data
    return DatasetConfig(
        d.n_train, d.n_transfer, d.n_test, d.seed, d.rows_per_shard, SceneConfig(size=d.size)
    )


def dataset_folder(cfg: PipelineConfig) -> Location:
    """The configured dataset folder, or where the synthetic one for this config lives."""
    if cfg.data.path:
        return location(cfg.data.path)
    return cfg.root / "data" / f"synthetic-{config_hash(dataset_config(cfg))}"


def prepare_dataset(cfg: PipelineConfig) -> ShardStore:
    """The configured dataset, or the synthetic one (generated once, keyed by its config)."""
    out = dataset_folder(cfg)
    if not cfg.data.path and not (out / "manifest.json").exists():
        config = dataset_config(cfg)
        with progress_bar(config.n_train + config.n_transfer + config.n_test, "rendering scenes") as update:
            generate_dataset(out, config, progress=update)
    store = ShardStore(out)
    check_image_size(cfg.data, {c.name: c.shape for c in store.manifest.columns})
    return store


def tracking_uri(cfg: PipelineConfig) -> str:
    """The configured tracking URI, or SQLite under a local storage root ("" on object storage,
    which has no default: `check_tracking_store` refuses it)."""
    if cfg.tracking_uri or not cfg.root.is_local:
        return cfg.tracking_uri
    return default_tracking_uri(cfg.root.local_path)


def check_tracking_store(cfg: PipelineConfig, shared: bool = False) -> None:
    """A local tracking store (SQLite) serves a study on one machine only: refused, in one line
    saying to run a tracking server, when the storage root is object storage or `shared` by the
    nodes of a cluster."""
    uri = tracking_uri(cfg) or "(default: SQLite under the storage root)"
    if why := remote_storage_refusal(uri, cfg.root.uri, shared):
        raise ConfigError(why)


def open_tracker(cfg: PipelineConfig, shared: bool = False) -> Tracker:
    """The study's tracker; `shared`: the storage root is used by several nodes (see
    `check_tracking_store`)."""
    check_tracking_store(cfg, shared)
    uri = tracking_uri(cfg)
    artifacts = None
    if uri.startswith("sqlite"):
        cfg.root.local_path.mkdir(parents=True, exist_ok=True)
        artifacts = (cfg.root.local_path / "mlartifacts").as_uri()
    return Tracker(
        uri,
        cfg.name,
        artifact_location=artifacts,
        run_tags={STORAGE_ROOT_TAG: str(cfg.root)},
        retry_s=cfg.tracking.retry_s,
    )


def preflight(cfg: PipelineConfig, sources: Sequence[str] | None = None) -> None:
    """What must hold before a command does any work, each failing in one line naming the field
    or path: the environment's settings, `transfer.targets` among the tasks a command's `--tasks`
    kept (`sources`), a writable storage root, a tracking server that answers within
    TRACKING_TIMEOUT_S, or an SQLite store that is whole."""
    read_settings()
    if sources is not None and (missing := [t for t in cfg.transfer.targets if t not in sources]):
        raise ConfigError(f"--tasks: leaves out {missing[0]!r}, one of transfer.targets")
    check_tracking_store(cfg)  # before touching storage: a refusal needs no network
    check_writable(cfg.root, "storage_root")
    uri = tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        check_tracking_server(uri)
    elif uri.startswith("sqlite:///"):
        check_writable(Path(uri.removeprefix("sqlite:///")).parent, "tracking_uri")
        check_sqlite_store(uri)


def check_writable(folder: Path | Location, field: str) -> None:
    folder = folder if isinstance(folder, Location) else location(folder)
    probe = folder / f".taskatlas-write-test-{os.getpid()}"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{field}: {folder} is not writable ({err.strerror or err})") from None


def check_tracking_server(uri: str, timeout_s: float = TRACKING_TIMEOUT_S) -> None:
    """Any HTTP answer from `<uri>/health` will do (even 401: the server is there)."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TaskatlasError(
            f"tracking_uri: no MLflow server answers at {uri} within {timeout_s:g} s ({reason})"
        ) from None


@contextmanager
def study_lock(
    cfg: PipelineConfig, command: str, wait: bool = False, never_wait_for: str = ""
) -> Iterator[Fence]:
    """The storage root for this process alone (design.md section 1); then what dead attempts
    left behind, temp files of theirs, is removed. The one lock of a study: `run`, `nightly`,
    `position` and the stage commands all take it (`StudyLock.acquire` for `never_wait_for`).

    Two ends in one line: a full disk (`OutOfSpace`, naming the root and what was being written),
    and the lock taken over by another process (`LockLost`: the heartbeat interrupts this one, and
    no step writes its marker after). A local root keeps `reserve_space` set aside meanwhile, which
    `invocation` frees to mark its runs FAILED on a full disk. Yields the lock's fence (`check`),
    which each step of the work under it is handed."""
    lock = StudyLock(
        lock_store(cfg.root),
        command,
        where=f"storage root {cfg.root}",
        on_lost=lambda lost: interrupt_main_thread(),
    )

    def waiting(holder) -> None:
        print(f"waiting for {holder.describe()} to finish with {cfg.root}", file=sys.stderr, flush=True)

    try:
        with lock.held(wait, waiting, never_wait_for), redelivered_interrupts():
            if cfg.root.is_local:  # object stores get whole objects or nothing: no temp files
                remove_dead_temp_files(cfg.root.local_path)
                reserve_space(cfg.root.local_path)
            try:
                yield lock.check
            finally:
                if cfg.root.is_local:
                    free_reserve(cfg.root.local_path)
    except BaseException as err:
        writing = no_space(err)
        if writing is None and lock.lost is not None:
            if no_space(lock.lost) is None:
                raise lock.lost from None
            writing = "the study lock's record"  # lost for want of space to refresh it
        if writing is None:
            raise
        raise OutOfSpace(
            f"no space left on device writing {writing or 'under the storage root'} (storage root"
            f" {cfg.root}); free some space and rerun: finished steps are kept, the rest resumes",
            writing,
        ) from None


@contextmanager
def redelivered_interrupts() -> Iterator[None]:
    """A lost lock stops this process by interrupting its main thread. An interrupt that lands in
    a finalizer (a garbage-collected SQLAlchemy or Ray object) cannot propagate: Python prints it
    as "Exception ignored", a traceback where one line belongs, and drops it. While held, such an
    interrupt is delivered again to the main thread instead."""
    before = sys.unraisablehook

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            # from another thread, once this hook has returned: raised in the hook, it would be lost again
            threading.Timer(0.01, interrupt_main_thread).start()
            return
        before(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = before


def interrupt_main_thread() -> None:
    """A KeyboardInterrupt in the main thread, at its next bytecode, whatever SIGINT handler is
    installed. `_thread.interrupt_main` goes through the handler, and a library's (Ray Tune's and
    Train's take the signal for themselves; others may ignore it) would drop it: a lost lock would
    not stop the run. (CPython's PyThreadState_SetAsyncExc, its documented way to do this.)"""
    ident = threading.main_thread().ident
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(KeyboardInterrupt))


def remove_dead_temp_files(root: Path) -> list[Path]:
    """Every `*.tmp` file or folder under the root: the lock holder writes none yet, so they are
    dead attempts' (a killed feature encoding, readout or table write)."""
    removed = []
    for folder, dirs, files in os.walk(root):
        if Path(folder) == root:
            dirs[:] = [d for d in dirs if d not in _NO_TEMP_FILES]
        for name in [d for d in dirs if d.endswith(".tmp")]:
            shutil.rmtree(Path(folder) / name, ignore_errors=True)
            removed.append(Path(folder) / name)
            dirs.remove(name)
        for name in files:
            if name.endswith(".tmp"):
                (Path(folder) / name).unlink(missing_ok=True)
                removed.append(Path(folder) / name)
    return removed


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "unknown"


def dataset_name(cfg: PipelineConfig, store: ShardStore) -> str:
    """What the dataset input is called in MLflow: the imported folder, or the synthetic scenes."""
    return Path(cfg.data.path).name if cfg.data.path else f"synthetic-{cfg.data.size}px-seed{cfg.data.seed}"


def dataset_ref(cfg: PipelineConfig, store: ShardStore) -> DatasetRef:
    """The study's dataset as an MLflow input: on the parent run, and on every train and readout run."""
    return DatasetRef(dataset_name(cfg, store), store.data_version, str(store.root))


def used_config(cfg: PipelineConfig, cluster_gpus: int) -> dict:
    """The config as the parent run's params: no value that no network or readout used. A setting
    the search tunes says so (`TUNED`; each `train/<task>` run logs the value it trained with);
    `use_gpu` as resolved on a cluster with `cluster_gpus` GPUs, and GPUs per trial and per readout
    as granted: 0 where none is used."""
    params = to_dict(cfg)
    if cfg.tune.enabled:
        params["train"] |= dict.fromkeys(HParams.names(), TUNED)
    train_gpu = cluster_gpus > 0 if cfg.train.use_gpu is None else cfg.train.use_gpu  # trials' too
    transfer_gpu = cluster_gpus > 0 if cfg.transfer.use_gpu is None else cfg.transfer.use_gpu
    params["train"]["use_gpu"], params["transfer"]["use_gpu"] = train_gpu, transfer_gpu
    if not train_gpu:
        params["tune"]["gpus_per_trial"] = 0
    if not transfer_gpu:
        params["transfer"]["gpus_per_readout"] = 0
    return params


def code_version() -> str:
    """The full commit hash of the code (MLflow links `mlflow.source.git.commit`)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _ended_failed(tracker: Tracker, run_id: str) -> bool:
    """The run marked FAILED; False if the disk was too full to."""
    try:
        tracker.end_run(run_id, failed=True)
    except Exception as err:
        if no_space(err) is None:
            raise
        return False
    return True


def _fail_runs_on_full_disk(cfg: PipelineConfig, tracker: Tracker) -> None:
    """Every run of this study still RUNNING marked FAILED (the parent, and any network or
    readout run whose own failure handler could not write), in the space `study_lock` reserved;
    if even that fails, the next run marks them (`Tracker.end_orphans`)."""
    if cfg.root.is_local:
        free_reserve(cfg.root.local_path)
    with contextlib.suppress(Exception):  # the disk's error is the one to report
        tracker.end_orphans(STORAGE_ROOT_TAG, str(cfg.root), failed=True)


@dataclass(frozen=True)
class Invocation:
    config: PipelineConfig
    store: ShardStore
    tracker: Tracker
    run_id: str
    fence: Fence  # the study lock's check, which every step makes before its marker (`study_lock`)
    verbose: bool = False  # `taskatlas -v`: Tune's trial tables too


@contextmanager
def invocation(cfg: PipelineConfig, command: str, fence: Fence, verbose: bool = False):
    """Dataset + tracker + a parent run tagged with config hash, data version and code version;
    the run is marked FAILED if the body raises. `fence`: what `study_lock` yielded."""
    tracker = open_tracker(cfg, shared=cluster_nodes() > 1)  # Ray is up: SQLite on several nodes?
    store = prepare_dataset(cfg)
    # The caller holds the study lock: a run of this root still RUNNING has a dead driver.
    tracker.end_orphans(STORAGE_ROOT_TAG, str(cfg.root))
    commit = code_version()
    # Who ran it, from which code: MLflow's "Created by" and "Source", on every run it creates.
    tracker.source_tags = {
        "mlflow.source.git.commit": commit,
        "mlflow.source.name": f"taskatlas {command}",
        "mlflow.source.type": "LOCAL",
        "mlflow.user": _user(),
    }
    tags = {
        "command": command,
        "config_hash": config_hash(cfg),
        "data_version": store.data_version,
        "code_version": commit[:7],
    }
    started = datetime.now(timezone.utc)
    run_id = tracker.start_run(f"{command} {cfg.name} {started:%Y-%m-%d %H:%M}", tags=tags)
    # The config as used, flattened (filterable); config.json: as given, to run it again
    tracker.log_params(run_id, used_config(cfg, cluster_gpus()))
    tracker.log_dict(run_id, to_dict(cfg), "config.json")
    tracker.log_dataset(run_id, dataset_ref(cfg, store))
    try:
        yield Invocation(cfg, store, tracker, run_id, fence, verbose or read_settings().verbose)
    except BaseException as err:
        if no_space(err) is not None or not _ended_failed(tracker, run_id):
            _fail_runs_on_full_disk(cfg, tracker)
        raise
    tracker.end_run(run_id)
