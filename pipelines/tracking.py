"""The one place that talks to MLflow: a thin tracker with explicit run and experiment ids.

Why explicit ids everywhere: `mlflow.set_experiment()` leaks `MLFLOW_EXPERIMENT_ID` into the
environment and fluent runs are process-global, which breaks as soon as Ray workers or threads
log. The driver creates the store, the experiment and every run but a network's; workers get a
`RunLogger` (tracking URI + run id) and only append metrics to that run, so a restarted worker
keeps logging to the same run instead of making a second one. A network's run is described by
the driver (`Tracker.run_to_start`) and made by its rank-0 worker at its first batch
(`RunLogger.start`), because MLflow sets a run's start time only when it is made: made when
queued, a network's run would show its wait as work.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import math
import os
import pickle
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import quote

import mlflow
import mlflow.artifacts
import requests
import torch
from mlflow.entities import (
    Dataset,
    DatasetInput,
    InputTag,
    LoggedModelOutput,
    Metric,
    Param,
    RunStatus,
    RunTag,
)
from mlflow.environment_variables import (
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
    MLFLOW_HTTP_REQUEST_BACKOFF_JITTER,
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_HTTP_REQUEST_TIMEOUT,
)
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import Schema, TensorSpec
from mlflow.utils.mlflow_tags import (
    MLFLOW_DATASET_CONTEXT,
    MLFLOW_MODEL_VERSIONS,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_RUN_NAME,
)

from components.config import from_dict, to_dict
from components.errors import TaskatlasError
from components.models import ModelConfig, TaskNetwork, build_network
from components.storage import location
from components.tasks import Task
from pipelines.compat import process_tracking_uri as _process_tracking_uri

_MAX_BATCH = 900  # MLflow caps log_batch at 1000 metrics
STORAGE_ROOT_TAG = "taskatlas.storage_root"  # on every run: which study a run belongs to
# A registered task network is these two files, never a pickled module (design.md section 8).
WEIGHTS_FILE = "weights.pt"  # the state dict, read back with torch.load(weights_only=True)
ARCHITECTURE_FILE = "architecture.json"  # what rebuilds the network with the project's own code
_WEIGHTS_FORMAT = "taskatlas-weights-v1"
CHAMPION = "champion"  # the registry alias of a task's best model (nightly moves it for networks)
QUEUE_SECONDS = "queue_seconds"  # on a network's run: from queued by the driver to its first batch
NOTE = "mlflow.note.content"  # the markdown description MLflow's UI shows for a run or experiment
# What a newcomer needs to read the experiment, shown on its page. The kind tag is what MLflow's
# UI read before 3.x's workflow switcher; 3.17's UI ignores it (`run_url` says why and what works).
EXPERIMENT_DESCRIPTION = """A Taskonomy-style transfer study (taskatlas). **Lower loss is better**
everywhere (`train_loss`, `test_loss`, `val_loss`, `final_test_loss`). Steps are epochs, counted
from 0 on `train/<task>` and readout runs, from 1 on search trials (as Ray Tune counts them).

- The parent run of each invocation holds the answer: its description states the chosen taxonomy
  (the roots to label, and where every other task gets its representation), with the bootstrap
  stability of each choice and every target's three best sources.
- `train/<task>` runs are the task networks (`train/<task>#<n>`: replicate n); `tune/<task>` runs
  their hyperparameter search, a nested run per trial (`tune/<task>/<trial>`), the best the one
  that ended with the lowest `val_loss`.
- Readout runs are named `target <- sources`: a small network trained on frozen source features.
  Their `affinity` (AHP share of the target's win rates, higher = better source; a target's
  candidates sum to 1), `quality` (win rate against `self`, the target's own fully supervised
  network) and `gain` (win rate against `pixels`, a readout on raw pixels) compare sources.
  `random` is a frozen random-init encoder: a source no better than it has nothing to offer.
"""
_EXPERIMENT_TAGS = {NOTE: EXPERIMENT_DESCRIPTION, "mlflow.experimentKind": "custom_model_development"}


SYSTEM_METRICS_INTERVAL_S = 5.0  # how often a train run samples its machine's CPU, memory and GPU
# Runs logged at once by `log_finished_runs`: requests in flight to a tracking server. The measured
# knee against a one-worker `mlflow server` on PostgreSQL (benchmarks/tracking_scale.py).
LOG_THREADS = 8


class UnsafeModelError(TaskatlasError):
    """A registry payload that is not a plain state dict plus architecture: refused, not loaded."""


@dataclass(frozen=True)
class NetworkSpec:
    """Everything that rebuilds a task network except its weights."""

    task: Task
    model: ModelConfig
    image_size: int
    channels: int

    def build(self) -> TaskNetwork:
        return build_network(self.task, self.model, self.image_size, self.channels)


@dataclass(frozen=True)
class Registration:
    """Where a logged model is registered and what the registry says: the registered model's
    description and tags (what every version is), and this version's."""

    name: str
    description: str
    version_description: str
    tags: Mapping[str, str] = field(default_factory=dict)
    version_tags: Mapping[str, str] = field(default_factory=dict)


def tensor_signature(model: torch.nn.Module, example: torch.Tensor) -> ModelSignature:
    """The input and output tensors of `model` (a batch dimension of any size), from one example."""
    with torch.no_grad():
        out = model.eval()(example)

    def batch_of(t: torch.Tensor) -> Schema:  # (-1, C, H, W): any batch size
        return Schema([TensorSpec(t.numpy().dtype, (-1, *t.shape[1:]))])

    return ModelSignature(inputs=batch_of(example), outputs=batch_of(out))


class FinalStatus(str, Enum):
    """How a run whose work is over ended (MLflow's run status names)."""

    FINISHED = "FINISHED"
    FAILED = "FAILED"
    KILLED = "KILLED"


@dataclass(frozen=True)
class DatasetRef:
    """A versioned dataset as a run's input in MLflow: its name, version digest and location."""

    name: str
    digest: str
    source: str

    def input(self, context: str) -> DatasetInput:
        """The input of a run that read the dataset's `context` split (train, transfer, test)."""
        dataset = Dataset(self.name, self.digest, "local", json.dumps({"uri": self.source}))
        return DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)])


@dataclass(frozen=True)
class RunToStart:
    """A run made where and when its work begins (`RunLogger.start`): what `Tracker.start_run`
    would make, with its params and dataset. `id_file` (a `components.storage` URI, JSON) keeps
    the made run's id: a restarted worker logs to the run its first attempt made, and the driver
    finds it there."""

    experiment_id: str
    name: str
    tags: dict[str, str]  # its name, parent, source and study tags included
    params: dict[str, str]  # flattened
    id_file: str
    dataset: DatasetRef | None = None
    dataset_context: str = "training"
    queued_at: float = 0.0  # epoch seconds: when its work was queued (`QUEUE_SECONDS`); 0: not said

    def create(self, client: Any, start_time: float) -> str:
        """Make the run, starting at `start_time` (epoch seconds), and keep its id in `id_file`
        at once; then its params, its time in the queue and its dataset. Its id."""
        start_ms = int(start_time * 1000)
        run_id = client.create_run(
            self.experiment_id, start_time=start_ms, tags=self.tags, run_name=self.name
        ).info.run_id
        location(self.id_file).write_json({"run_id": run_id})
        params = [Param(k, v) for k, v in self.params.items()]
        waited = max(start_time - self.queued_at, 0.0)
        metrics = [Metric(QUEUE_SECONDS, waited, start_ms, 0)] if self.queued_at else []
        for i in range(0, max(len(params), 1), 100):
            client.log_batch(run_id, metrics=metrics if i == 0 else [], params=params[i : i + 100])
        if self.dataset is not None:
            client.log_inputs(run_id, [self.dataset.input(self.dataset_context)])
        return run_id


@dataclass(frozen=True)
class FinishedRun:
    """A run whose work is over, logged whole by `Tracker.log_finished_runs`.

    `run_id` names a run an earlier driver created and left unfinished (RUNNING, KILLED, FAILED):
    that run is completed (tags, params, metrics, status, end time) instead of a new one created;
    its start time stays. Times are epoch seconds; 0 means now."""

    name: str
    tags: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    metrics: Sequence[tuple[str, float, int]] = ()  # (key, value, step) rows
    start_time: float = 0.0
    end_time: float = 0.0
    status: FinalStatus = FinalStatus.FINISHED
    run_id: str | None = None
    inputs: Sequence[DatasetInput] = ()  # the datasets it read (one more request)


def default_tracking_uri(storage_root: str | Path) -> str:
    """SQLite under the storage root, as an absolute URI (relative ones resolve per process)."""
    return f"sqlite:///{Path(storage_root).resolve() / 'mlflow.db'}"


def _scheme(uri: str) -> str:
    """`s3` of `s3://b/p`, `sqlite` of `sqlite:///x.db`; `` for a plain path."""
    return uri.split("://", 1)[0].lower() if "://" in uri else ""


def _is_server(tracking_uri: str) -> bool:
    return _scheme(tracking_uri) in ("http", "https")


# ---------------------------------------------------------------- a server that does not answer

DEFAULT_RETRY_S = 60.0  # `tracking.retry_s`
_PAUSE_FIRST_S, _PAUSE_MAX_S = 0.5, 4.0  # between attempts while a server does not answer


class TrackingUnavailable(TaskatlasError):
    """The tracking server did not answer for the run's whole retry budget: the run stops."""


def request_timeout_s(retry_s: float) -> int:
    """How long one request waits for an answer: half the budget, 5 to 30 s. A server that takes
    connections and never answers stops a run after at most `retry_s` plus this."""
    return int(min(30, max(5, math.ceil(retry_s / 2))))


def use_retry_budget(retry_s: float) -> None:
    """MLflow's own HTTP retries off in this process, and one request's wait bounded: a
    `RetryBudget` retries instead, on one budget for the whole run. (By default MLflow retries
    each request 7 times, ~4 minutes, and a failure handler's requests start over.) MLflow reads
    these variables at every request (`mlflow.utils.rest_utils.http_request`); Ray workers call
    this through `RunLogger`, so a cluster's workers need nothing in their runtime env."""
    MLFLOW_HTTP_REQUEST_MAX_RETRIES.set(0)
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.set(0)
    MLFLOW_HTTP_REQUEST_BACKOFF_JITTER.set(0.0)
    MLFLOW_HTTP_REQUEST_TIMEOUT.set(request_timeout_s(retry_s))


def _unanswered(err: BaseException) -> bool:
    """Whether a tracking call failed for want of an answer (refused, timed out, or MLflow's
    transient statuses: 429, 5xx), not because the server refused the request."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, (requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError)):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


class RetryBudget:
    """One budget of `retry_s` seconds for all of a run's tracking calls while the server does
    not answer. A call without an answer is tried again (pauses of 0.5 s doubling to 4 s) until
    the server has been silent `retry_s` seconds, counted from the first unanswered attempt of any
    call (threads share it) and reset by any answer. Then that call, and every later one at once
    and without a request, raise `TrackingUnavailable`: a failure handler starts no second round."""

    def __init__(
        self,
        tracking_uri: str,
        retry_s: float = DEFAULT_RETRY_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.tracking_uri, self.retry_s = tracking_uri, retry_s
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._silent_since: float | None = None  # the first unanswered attempt since an answer
        self._gave_up_after: float | None = None  # seconds of silence, once the budget is spent

    @property
    def spent(self) -> bool:
        """Whether the server is known dead: every call now fails at once."""
        return self._gave_up_after is not None

    def error(self) -> TrackingUnavailable:
        return TrackingUnavailable(
            f"tracking_uri: the tracking server at {self.tracking_uri} did not answer for "
            f"{self._gave_up_after or 0:.0f} s (tracking.retry_s: {self.retry_s:g}); finished work is"
            " on disk, and the next run logs what is missing"
        )

    def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        pause = _PAUSE_FIRST_S
        while True:
            if self.spent:
                raise self.error()
            started = self._clock()
            try:
                result = fn(*args, **kwargs)
            except Exception as err:
                if not _unanswered(err):
                    raise
                with self._lock:
                    if self._silent_since is None or started < self._silent_since:
                        self._silent_since = started
                    silent = self._clock() - self._silent_since
                    if silent >= self.retry_s and self._gave_up_after is None:
                        self._gave_up_after = silent
                if self.spent:
                    raise self.error() from None
                self._sleep(min(pause, self.retry_s - silent))
                pause = min(2 * pause, _PAUSE_MAX_S)
                continue
            with self._lock:
                self._silent_since = None
            return result


class _BudgetedClient:
    """An `MlflowClient` whose every method call goes through a `RetryBudget`."""

    def __init__(self, client: MlflowClient, budget: RetryBudget):
        self.raw, self._budget = client, budget

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("raw", "_budget"):  # not set yet (copy, unpickling)
            raise AttributeError(name)
        value = getattr(self.raw, name)
        return functools.partial(self._budget.call, value) if callable(value) else value


# ---------------------------------------------------------------- a damaged SQLite store

_SQLITE_MAGIC = b"SQLite format 3\x00"


def sqlite_store_damage(path: Path) -> str | None:
    """Why the SQLite file at `path` is not a whole database (not SQLite, or shorter than its
    header says: cut short by a full disk or a killed copy), or None. Reads its 100-byte header
    only: the check costs nothing on a store of any size."""
    try:
        with open(path, "rb") as f:
            header = f.read(100)
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    if size == 0:
        return None  # a new, empty store
    if any(path.with_name(path.name + suffix).exists() for suffix in ("-journal", "-wal")):
        return None  # a writer's journal beside it: SQLite itself rolls back or replays it on open
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        return "not an SQLite database"
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    header_size_valid = header[24:28] == header[92:96]  # SQLite's rule for the in-header size
    if header_size_valid and pages and size < pages * page_size:
        return f"cut short: {size} of {pages * page_size} bytes"
    return None


def sqlite_store_refusal(path: Path, why: str) -> str:
    """The one line that refuses a damaged SQLite store and says what to do."""
    return (
        f"tracking_uri: the MLflow store {path} is damaged ({why}); move it aside"
        f" (mv {path} {path}.damaged) and rerun: the study's outputs under the storage root are kept"
        " and reused, in a new store (`sqlite3 FILE .recover` may save the old one's runs)"
    )


def check_sqlite_store(tracking_uri: str) -> None:
    """A damaged SQLite store refused in one line (`sqlite_store_refusal`); anything else passes."""
    if _scheme(tracking_uri) == "sqlite":
        path = Path(tracking_uri.removeprefix("sqlite:///"))
        if why := sqlite_store_damage(path):
            raise TaskatlasError(sqlite_store_refusal(path, why))


def create_private_sqlite_store(tracking_uri: str) -> None:
    """A new SQLite store is created empty and readable by its owner only (0600; SQLite gives its
    journal the same mode): it holds every run's params and tags, whatever the umask. An existing
    store keeps the mode it has."""
    if _scheme(tracking_uri) == "sqlite":
        path = Path(tracking_uri.removeprefix("sqlite:///"))
        with contextlib.suppress(FileExistsError, FileNotFoundError):  # no folder: MLflow says so
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _damaged_sqlite_error(err: BaseException) -> bool:
    """Whether an error is SQLite finding its file damaged (rather than locked, or missing)."""
    text = str(err).lower()
    return "database disk image is malformed" in text or "file is not a database" in text


# MLflow 3.17's UI opens every experiment on its GenAI view: a sidebar switch it keeps in the
# browser (localStorage `mlflow.workflowType`, default `genai`) overrides the experiment's
# `mlflow.experimentKind` tag, and no server setting changes that default. A link that names the
# view (`?workflowType=machine_learning`) opens on runs and models.
_UI_VIEW = "workflowType=machine_learning"


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI of a tracking server; None for a local store (no UI runs)."""
    if not _is_server(tracking_uri):
        return None
    base = tracking_uri.rstrip("/")
    return f"{base}/#/experiments/{experiment_id}/runs/{quote(run_id)}?{_UI_VIEW}"


def remote_storage_refusal(tracking_uri: str, storage_uri: str, shared: bool) -> str | None:
    """Why a study may not track to `tracking_uri`, in one line, or None if it may.

    A local store (SQLite, or a folder: MLflow's file store) is a file on one machine: refused
    when the storage root is remote (`s3://`, `gs://`, any scheme but `file`) or `shared` by the
    nodes of a cluster, whose workers would write it from several machines (SQLite over NFS)."""
    if _scheme(tracking_uri) not in ("", "file", "sqlite"):
        return None
    remote = _scheme(storage_uri) not in ("", "file")
    if not (remote or shared):
        return None
    why = "is remote" if remote else "is shared by the nodes of a cluster"
    return (
        f"tracking_uri {tracking_uri} is a local store, but storage_root {storage_uri} {why}: run an"
        " MLflow server with a PostgreSQL backend (mlflow server --backend-store-uri"
        " postgresql+psycopg2://USER@DBHOST:5432/mlflow --artifacts-destination s3://BUCKET/mlartifacts"
        " --app-name basic-auth --host MLFLOW_HOST --port 5000, MLFLOW_HOST the cluster-internal"
        " address, never 0.0.0.0) and set tracking_uri: http://MLFLOW_HOST:5000, with"
        " MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment"
    )


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in data.items():
        if isinstance(v, Mapping):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


@dataclass(frozen=True)
class RunLogger:
    """Picklable handle that appends metrics to one existing run (what a rank-0 worker gets)."""

    tracking_uri: str
    run_id: str
    retry_s: float = DEFAULT_RETRY_S  # `tracking.retry_s`: this process's budget (`RetryBudget`)

    @functools.cached_property
    def _client(self) -> _BudgetedClient:
        """Made in the process that logs (a Ray worker), never pickled: `__getstate__`."""
        if _is_server(self.tracking_uri):
            use_retry_budget(self.retry_s)
        return _BudgetedClient(MlflowClient(self.tracking_uri), RetryBudget(self.tracking_uri, self.retry_s))

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_client"}

    @classmethod
    def start(cls, tracking_uri: str, run: RunToStart, retry_s: float = DEFAULT_RETRY_S) -> RunLogger:
        """The logger of the run `run` describes, made now, as its work begins, unless an earlier
        attempt made it (its `id_file`). A server silent for `retry_s`: a logger that logs nothing
        (`server_down`), and the driver makes the run when the work is over (`Tracker.start_planned`)."""
        ids = location(run.id_file)
        if ids.exists():
            return cls(tracking_uri, ids.read_json()["run_id"], retry_s)
        logger = cls(tracking_uri, "", retry_s)
        with contextlib.suppress(TrackingUnavailable):
            return cls(tracking_uri, run.create(logger._client, time.time()), retry_s)
        return logger

    @property
    def server_down(self) -> bool:
        """The budget is spent: the worker's later logging is skipped (`log_metrics`, `set_tags`),
        its training goes on, and the driver stops the run at its next tracking call."""
        return "_client" in self.__dict__ and self._client._budget.spent

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """The run's metrics only: its logged model gets the final epoch's when it is registered
        (`Tracker.register_weights`), so the model shows one value per key, not every epoch's.
        Nothing once the server is down (`server_down`): the weights on disk are the work."""
        now = int(time.time() * 1000)
        self._log([Metric(k, float(v), now, step) for k, v in metrics.items()], [])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._log([], [RunTag(k, str(v)) for k, v in tags.items()])

    def _log(self, metrics: list[Metric], tags: list[RunTag]) -> None:
        if self.server_down:
            return
        with contextlib.suppress(TrackingUnavailable):
            self._client.log_batch(self.run_id, metrics=metrics, tags=tags, synchronous=True)

    @contextlib.contextmanager
    def system_metrics(self, interval_s: float = SYSTEM_METRICS_INTERVAL_S) -> Iterator[None]:
        """MLflow's system metrics of this machine (`system/cpu_utilization_percentage`, memory,
        disk, network; GPUs too with nvidia-ml-py) on the run every `interval_s` while the block
        runs, and at least once; nothing where psutil is not installed (MLflow measures with it), or
        once the server is down (then what was not sent is lost: the block's work goes on)."""
        if importlib.util.find_spec("psutil") is None or self.server_down:
            yield
            return
        import psutil
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # psutil's CPU reading is the use since its previous call, and 0.0 on the first: call it
        # now, so that a block shorter than one interval does not read as an idle CPU.
        psutil.cpu_percent()
        monitor = SystemMetricsMonitor(
            self.run_id, sampling_interval=interval_s, resume_logging=True, tracking_uri=self.tracking_uri
        )
        first = monitor._logging_step
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()  # its own thread's failures are warnings
            if monitor._logging_step == first and not self.server_down:  # shorter than one interval
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                try:
                    monitor.mlflow_logger.flush()
                except Exception as err:
                    if not _unanswered(err):
                        raise

    def logged_steps(self, key: str) -> set[int]:
        """Steps at which the run already has metric `key` (what an earlier attempt logged)."""
        if self.server_down:
            return set()
        with contextlib.suppress(TrackingUnavailable):
            return {m.step for m in self._client.get_metric_history(self.run_id, key)}
        return set()


class Tracker:
    """Driver-side access to one experiment of one tracking store.

    Every call goes through one `RetryBudget` (`retry_s`, `tracking.retry_s`): a server silent
    that long stops the run with `TrackingUnavailable`, and failure handlers then skip their
    calls (`end_run(failed=True)`). A damaged SQLite store is refused in one line, before use."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        artifact_location: str | None = None,
        run_tags: Mapping[str, str] | None = None,
        retry_s: float = DEFAULT_RETRY_S,
    ):
        self.tracking_uri = tracking_uri
        check_sqlite_store(tracking_uri)
        create_private_sqlite_store(tracking_uri)
        if _is_server(tracking_uri):
            use_retry_budget(retry_s)
        self.budget = RetryBudget(tracking_uri, retry_s)
        self.run_tags = dict(run_tags or {})  # set on every run this tracker creates (and matched)
        # Also set on every run it creates, but never searched for: who ran it, from which code
        # (MLflow's "Created by" and "Source"); `invocation` sets them once it knows them.
        self.source_tags: dict[str, str] = {}
        try:
            raw = MlflowClient(tracking_uri, registry_uri=tracking_uri)
            self.client = _BudgetedClient(raw, self.budget)
            experiment = self.client.get_experiment_by_name(experiment_name)
        except Exception as err:
            if _scheme(tracking_uri) == "sqlite" and _damaged_sqlite_error(err):  # past its header
                path = Path(tracking_uri.removeprefix("sqlite:///"))
                raise TaskatlasError(sqlite_store_refusal(path, "malformed")) from None
            raise
        if experiment is None:
            self.experiment_id = self.client.create_experiment(
                experiment_name, artifact_location=artifact_location, tags=_EXPERIMENT_TAGS
            )
        else:
            self.experiment_id = experiment.experiment_id
            for key, value in _EXPERIMENT_TAGS.items():
                if experiment.tags.get(key) != value:
                    self.client.set_experiment_tag(self.experiment_id, key, value)

    def start_run(
        self,
        name: str,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        start_time: float | None = None,
    ) -> str:
        """A new run; `start_time` (epoch seconds) when the work it records began earlier."""
        all_tags = self._tags(name, parent_run_id, tags)
        start = None if start_time is None else int(start_time * 1000)
        run = self.client.create_run(self.experiment_id, start_time=start, run_name=name, tags=all_tags)
        return run.info.run_id

    def run_to_start(
        self,
        name: str,
        parent_run_id: str,
        tags: Mapping[str, str],
        params: Mapping[str, Any],
        id_file: str,
        dataset: DatasetRef | None = None,
        dataset_context: str = "training",
    ) -> RunToStart:
        """A run for the worker that does its work to make when the work begins (`RunLogger.start`),
        as `start_run` and `log_params` would; queued now. `id_file`: where its id is kept."""
        flat = {k: v[:6000] for k, v in flatten(params).items()}
        tags = self._tags(name, parent_run_id, tags)
        return RunToStart(
            self.experiment_id, name, tags, flat, id_file, dataset, dataset_context, queued_at=time.time()
        )

    def start_planned(self, run: RunToStart) -> str:
        """`run` made here, now: the worker that was to make it could not reach the store."""
        return run.create(self.client, time.time())

    def _tags(self, name: str, parent_run_id: str | None, tags: Mapping[str, str] | None) -> dict[str, str]:
        """A new run's tags: its name, who made it from which code, the study's, its own, its parent."""
        all_tags = {MLFLOW_RUN_NAME: name, **self.source_tags, **self.run_tags, **(tags or {})}
        if parent_run_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        return all_tags

    def find_run(self, name: str, parent_run_id: str | None = None) -> str | None:
        """The newest run of that name (under that parent): reused instead of duplicated on rerun."""
        query = f"tags.`{MLFLOW_RUN_NAME}` = '{name}'"
        if parent_run_id:
            query += f" and tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'"
        runs = self.client.search_runs(
            [self.experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1
        )
        return runs[0].info.run_id if runs else None

    def reopen_run(self, run_id: str, parent_run_id: str | None = None) -> str:
        """Continue a run an earlier invocation left unfinished (KILLED, FAILED): RUNNING again,
        under this invocation's parent run."""
        if parent_run_id:
            self.client.set_tag(run_id, MLFLOW_PARENT_RUN_ID, parent_run_id)
        self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return run_id

    def resume_or_start_run(
        self,
        name: str,
        parent_run_id: str | None,
        tags: Mapping[str, str],
        match: str,
        params: Mapping[str, Any] | None = None,
    ) -> str:
        """The newest unfinished run of that name whose tag `match` has our value, reopened under
        `parent_run_id`; else a new run, with `params`. How a rerun continues a dead driver's
        stage in one run."""
        query = f"tags.`{MLFLOW_RUN_NAME}` = '{name}' and tags.`{match}` = '{tags[match]}'"
        for key, value in self.run_tags.items():
            query += f" and tags.`{key}` = '{value}'"
        runs = self.client.search_runs(
            [self.experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1
        )
        if runs and runs[0].info.status != "FINISHED":
            return self.reopen_run(runs[0].info.run_id, parent_run_id)
        run_id = self.start_run(name, parent_run_id, tags)
        if params:
            self.log_params(run_id, params)
        return run_id

    def end_orphans(self, tag: str, value: str, failed: bool = False) -> list[str]:
        """Mark KILLED every run still RUNNING whose `tag` is `value`: called by the one live
        process of a study (it holds the study lock), so their driver is dead. `failed`: mark
        them FAILED, the live process's own runs (a full disk ends them all at once)."""
        query = f"attributes.status = 'RUNNING' and tags.`{tag}` = '{value}'"
        status = RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.KILLED)
        killed, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], query, max_results=1000, page_token=token)
            for run in page:
                self.client.set_terminated(run.info.run_id, status)
                killed.append(run.info.run_id)
            if not (token := page.token):
                return killed

    def logger(self, run_id: str) -> RunLogger:
        return RunLogger(self.tracking_uri, run_id, self.budget.retry_s)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(k, v[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        self.log_history(run_id, [(k, float(v), step) for k, v in metrics.items()])

    def log_history(
        self, run_id: str, rows: list[tuple[str, float, int]], params: Mapping[str, str] | None = None
    ) -> None:
        """Many (key, value, step) metrics, and a few params, in as few requests as MLflow allows."""
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, s) for k, v, s in rows]
        first_params = [Param(k, str(v)) for k, v in (params or {}).items()]
        for i in range(0, max(len(metrics), 1), _MAX_BATCH):
            self.client.log_batch(run_id, metrics=metrics[i : i + _MAX_BATCH], params=first_params)
            first_params = []

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_dict(self, run_id: str, data: Any, filename: str) -> None:
        self.client.log_dict(run_id, data, filename)

    def end_run(self, run_id: str, failed: bool = False, end_time: float | None = None) -> None:
        """FINISHED, or FAILED. Marking a run FAILED is skipped once the server is known down
        (`RetryBudget.spent`): the next run marks it KILLED (`end_orphans`)."""
        if failed and self.budget.spent:
            return
        status = RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED)
        self.client.set_terminated(run_id, status, None if end_time is None else round(end_time * 1000))

    def log_finished_runs(
        self, parent_run_id: str | None, runs: Sequence[FinishedRun], threads: int = LOG_THREADS
    ) -> list[str]:
        """Log many runs whose work is over, each whole, and return their ids in order.

        A run costs three requests: created with its name, tags (the tracker's run tags and the
        parent too) and start time; its params and metrics in one batch; ended with its status and
        end time (a fourth when it has dataset `inputs`). Against a tracking server `threads` runs go at once; a local store (SQLite) takes
        them one at a time. If any run fails to log, the first error is raised once the others are
        done; a run it leaves RUNNING is found and completed by the next attempt (`run_id`)."""
        if not _is_server(self.tracking_uri):
            threads = 1
        if threads <= 1 or len(runs) <= 1:
            return [self._log_finished(parent_run_id, run) for run in runs]
        with ThreadPoolExecutor(min(threads, len(runs)), thread_name_prefix="mlflow-log") as pool:
            futures = [pool.submit(self._log_finished, parent_run_id, run) for run in runs]
        return [f.result() for f in futures]

    def _log_finished(self, parent_run_id: str | None, run: FinishedRun) -> str:
        now = time.time()
        tags = {MLFLOW_RUN_NAME: run.name, **self.source_tags, **self.run_tags, **run.tags}
        if parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        tag_rows = [RunTag(k, str(v)) for k, v in tags.items()]
        run_id = run.run_id
        if run_id is None:
            start = int((run.start_time or now) * 1000)
            created = self.client.create_run(
                self.experiment_id, start_time=start, tags=tags, run_name=run.name
            )
            run_id = created.info.run_id
            tag_rows = []  # set with the run
        end = int((run.end_time or now) * 1000)
        metrics = [Metric(k, float(v), end, int(step)) for k, v, step in run.metrics]
        params = [Param(k, str(v)[:6000]) for k, v in run.params.items()]
        if metrics or params or tag_rows:
            self.client.log_batch(run_id, metrics=metrics, params=params, tags=tag_rows, synchronous=True)
        if run.inputs:
            self.client.log_inputs(run_id, list(run.inputs))
        self._end(run_id, run.status, end)
        return run_id

    def end_runs(
        self, run_ids: Sequence[str], status: FinalStatus, end_time: float = 0.0, threads: int = LOG_THREADS
    ) -> None:
        """End runs created earlier (one request each, `threads` at a time against a server);
        `end_time` in epoch seconds, 0 for now."""
        end = int((end_time or time.time()) * 1000)
        if not _is_server(self.tracking_uri) or threads <= 1 or len(run_ids) <= 1:
            for run_id in run_ids:
                self._end(run_id, status, end)
            return
        with ThreadPoolExecutor(min(threads, len(run_ids)), thread_name_prefix="mlflow-end") as pool:
            futures = [pool.submit(self._end, run_id, status, end) for run_id in run_ids]
        for f in futures:
            f.result()

    def log_metrics_many(
        self, metrics: Mapping[str, Mapping[str, float]], threads: int = LOG_THREADS
    ) -> None:
        """One batch of metrics for each of many runs (run id -> metrics): `threads` requests at a
        time against a server, one at a time on a local store."""
        now = int(time.time() * 1000)

        def log(run_id: str) -> None:
            rows = [Metric(k, float(v), now, 0) for k, v in metrics[run_id].items()]
            self.client.log_batch(run_id, metrics=rows, synchronous=True)

        if not _is_server(self.tracking_uri) or threads <= 1 or len(metrics) <= 1:
            for run_id in metrics:
                log(run_id)
            return
        with ThreadPoolExecutor(min(threads, len(metrics)), thread_name_prefix="mlflow-metrics") as pool:
            futures = [pool.submit(log, run_id) for run_id in metrics]
        for f in futures:
            f.result()

    def _end(self, run_id: str, status: FinalStatus, end_ms: int) -> None:
        """One UpdateRun request. `MlflowClient.set_terminated` would also fetch the whole run and
        print its URL (over HTTP), a second request per run; its store call is this one."""
        store = self.client.raw._tracking_client.store
        self.budget.call(store.update_run_info, run_id, RunStatus.from_string(status.value), end_ms, None)

    def describe(self, run_id: str, markdown: str) -> None:
        """The run's description in MLflow's UI."""
        self.client.set_tag(run_id, NOTE, markdown)

    def log_dataset(self, run_id: str, dataset: DatasetRef, context: str = "training") -> None:
        """The run's dataset as an MLflow dataset input (name, version digest, where it lives)."""
        self.client.log_inputs(run_id, [dataset.input(context)])

    def create_logged_model(self, run_id: str, name: str, params: Mapping[str, Any] | None = None) -> str:
        """The MLflow logged model a training run produces, made before training starts, with the
        hyperparameters it is trained with. It gets its metrics (the final epoch's) and its files
        when it is registered (`register_weights`)."""
        flat = {k: v[:6000] for k, v in flatten(params or {}).items()}
        model = self.client.create_logged_model(
            self.experiment_id, name=name, source_run_id=run_id, params=flat or None
        )
        return model.model_id

    def last_metrics(self, run_id: str, keys: Sequence[str]) -> list[Metric]:
        """The newest record of each of `keys` at its highest step (what the run's page shows),
        exactly as logged: logged again with a model id it adds no row to the run's history."""
        out = []
        for key in keys:
            history = self.client.get_metric_history(run_id, key)
            if history:
                out.append(max(history, key=lambda m: (m.step, m.timestamp)))
        return out

    def log_task_network(
        self,
        run_id: str,
        model_id: str,
        state_dict: Mapping[str, Any],
        spec: NetworkSpec,
        registration: Registration,
        metrics: Sequence[Metric],
        signature: ModelSignature | None = None,
    ) -> str:
        """Store a task network as weights only (its state dict and the architecture that
        rebuilds it) in its logged model `model_id`, with its final `metrics`, and register a
        new version of it; returns the version."""
        architecture = {"format": _WEIGHTS_FORMAT, **to_dict(spec.__dict__)}
        return self.register_weights(
            run_id, model_id, state_dict, architecture, registration, metrics, signature
        )

    def register_weights(
        self,
        run_id: str,
        model_id: str,
        state_dict: Mapping[str, Any],
        architecture: Mapping[str, Any],
        registration: Registration,
        metrics: Sequence[Metric] = (),
        signature: ModelSignature | None = None,
    ) -> str:
        """Any model as weights only: `state_dict` and `architecture` (JSON, with its `format`)
        in the logged model `model_id`, which gets `metrics` (one value per key: its final ones),
        becomes an output of its run, and is registered as a new version (from `models:/<id>`, so
        the logged model, the run and the version link to each other in the UI). `signature`:
        the input and output tensors, in an `MLmodel` file beside the weights."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "model"
            folder.mkdir()
            torch.save(dict(state_dict), folder / WEIGHTS_FILE)
            (folder / ARCHITECTURE_FILE).write_text(json.dumps(dict(architecture), indent=1, sort_keys=True))
            if signature is not None:
                Model(run_id=run_id, model_id=model_id, signature=signature).save(folder / "MLmodel")
            self.client.log_model_artifacts(model_id, str(folder))
        self.client.set_logged_model_tags(model_id, dict(registration.version_tags))
        self._log_model_metrics(run_id, model_id, metrics)
        step = max((m.step for m in metrics), default=0)
        run = self.client.get_run(run_id)
        if model_id not in {o.model_id for o in (run.outputs.model_outputs if run.outputs else [])}:
            self.client.log_outputs(run_id, [LoggedModelOutput(model_id, step)])
        self.client.finalize_logged_model(model_id, "READY")
        return self.register_version(registration, model_id, run_id)

    def register_version(self, registration: Registration, model_id: str, run_id: str) -> str:
        """A new version of `registration.name` from the logged model `model_id` of `run_id`, so
        the logged model, the run and the version link to each other; returns the version."""
        self._describe_registered_model(registration)
        with self._models_uris_resolvable():
            version = self.client.create_model_version(
                registration.name,
                f"models:/{model_id}",
                run_id,
                tags=dict(registration.version_tags),
                description=registration.version_description,
                model_id=model_id,
            )
        self._link_version(model_id, registration.name, int(version.version))
        return str(version.version)

    def find_version(self, registered_name: str, tags: Mapping[str, str]) -> str | None:
        """The newest version of `registered_name` carrying all of `tags`, or None."""
        versions = self.client.search_model_versions(f"name = '{registered_name}'")
        matching = [int(v.version) for v in versions if all(v.tags.get(k) == t for k, t in tags.items())]
        return str(max(matching)) if matching else None

    def version_model_id(self, registered_name: str, version: str) -> str | None:
        """The logged model a registered version was made from (None: registered from a path).
        A local store keeps it only in the version's source, `models:/<model id>`."""
        found = self.client.get_model_version(registered_name, version)
        if found.model_id:
            return found.model_id
        source = found.source or ""
        return source.removeprefix("models:/") if source.startswith("models:/m-") else None

    def _log_model_metrics(self, run_id: str, model_id: str, metrics: Sequence[Metric]) -> None:
        """`metrics` on the logged model, each key once (a key it has already is left as it is).
        Logged through the run: one the run has already (same key, value, step, timestamp) is not
        recorded there twice."""
        have = {m.key for m in self.client.get_logged_model(model_id).metrics or []}
        rows = [
            Metric(
                m.key,
                float(m.value),
                m.timestamp,
                m.step,
                model_id=model_id,
                dataset_name=m.dataset_name,
                dataset_digest=m.dataset_digest,
            )
            for m in metrics
            if m.key not in have
        ]
        if rows:
            self.client.log_batch(run_id, metrics=rows, synchronous=True)

    def _describe_registered_model(self, registration: Registration) -> None:
        """The registered model, made if new, with its description and tags (every version's)."""
        name = registration.name
        try:
            self.client.create_registered_model(
                name, tags=dict(registration.tags), description=registration.description
            )
            return
        except mlflow.exceptions.MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        self.client.update_registered_model(name, registration.description)
        for key, value in registration.tags.items():
            self.client.set_registered_model_tag(name, key, value)

    def _models_uris_resolvable(self):
        """Where a `models:/<id>` source can be registered. A tracking server resolves it in its
        own store. A local store's registry resolves it with `MlflowClient()`, on the process-wide
        tracking URI: that is set to ours for the call (without touching the environment, under a
        lock, and put back after), since this tracker never uses the process-wide URI itself."""
        if _is_server(self.tracking_uri):
            return contextlib.nullcontext()
        return _process_tracking_uri(self.tracking_uri)

    def _link_version(self, model_id: str, name: str, version: int) -> None:
        """The logged model's `mlflow.modelVersions` tag, what the UI reads to show it registered:
        a tracking server sets it when the version is created, a local store does not."""
        tags = self.client.get_logged_model(model_id).tags
        linked = json.loads(tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
        if any(v.get("name") == name and str(v.get("version")) == str(version) for v in linked):
            return
        linked.append({"name": name, "version": version})
        self.client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(linked)})

    def alias_version(self, registered_name: str, alias: str) -> str | None:
        """The version an alias points at, or None (no such model or alias yet)."""
        try:
            return str(self.client.get_model_version_by_alias(registered_name, alias).version)
        except mlflow.exceptions.MlflowException:
            return None

    def version_tags(self, registered_name: str, version: str) -> dict[str, str]:
        """The tags of a registered version (its task, study and definition hash, for ours)."""
        return dict(self.client.get_model_version(registered_name, version).tags)

    def set_alias(self, registered_name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(registered_name, alias, version)

    def write_json_artifact(self, run_id: str, data: Any, filename: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / filename
            path.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
            self.client.log_artifact(run_id, str(path))


def resolve_version(tracking_uri: str, model: str) -> tuple[str, str]:
    """`name`, `name@alias` or `name/version` -> (registered name, version); `name` alone is its
    champion. One-line errors for an unknown model, alias or version."""
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    if "/" in model:
        name, version = model.rsplit("/", 1)
        try:
            return name, str(client.get_model_version(name, version).version)
        except mlflow.exceptions.MlflowException:
            raise TaskatlasError(f"--model: {name} has no version {version!r} at {tracking_uri}") from None
    name, _, alias = model.partition("@")
    alias = alias or CHAMPION
    try:
        return name, str(client.get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        known = [m.name for m in client.search_registered_models(max_results=50)]
        raise TaskatlasError(
            f"--model: no registered model {name!r} with alias {alias!r} at {tracking_uri}"
            f" (registered: {', '.join(sorted(known)) or 'none'})"
        ) from None


def load_registered_weights(
    tracking_uri: str, registered_name: str, version: str, formats: Sequence[str] = (_WEIGHTS_FORMAT,)
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(architecture, state dict) of a registered version, loaded with `torch.load(weights_only=
    True)`; anything that is not a plain state dict plus an architecture in one of `formats` is
    refused, never unpickled."""
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    what = f"registered model {registered_name} v{version}"
    uri = client.get_model_version_download_uri(registered_name, version)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri, dst_path=tmp)
        )
        try:
            architecture = json.loads((local / ARCHITECTURE_FILE).read_text())
        except (OSError, ValueError):
            raise UnsafeModelError(
                f"{what}: no readable {ARCHITECTURE_FILE}; only weights-only models are loaded"
                " (a model registered by an older taskatlas: retrain it)"
            ) from None
        if not isinstance(architecture, dict) or architecture.get("format") not in formats:
            raise UnsafeModelError(f"{what}: {ARCHITECTURE_FILE} is not in the {' or '.join(formats)} format")
        try:
            state = torch.load(local / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise UnsafeModelError(
                f"{what}: {WEIGHTS_FILE} is not a plain state dict; refused ({first})"
            ) from None
    return architecture, state


def network_spec(architecture: Mapping[str, Any]) -> NetworkSpec:
    return NetworkSpec(
        task=from_dict(Task, architecture["task"], "task."),
        model=from_dict(ModelConfig, architecture["model"], "model."),
        image_size=int(architecture["image_size"]),
        channels=int(architecture["channels"]),
    )


def load_registered_model(tracking_uri: str, registered_name: str, version: str) -> TaskNetwork:
    """Rebuild a registered task network with the project's code and load its weights with
    `torch.load(weights_only=True)`; anything else in the registry is refused, never unpickled."""
    architecture, state = load_registered_weights(tracking_uri, registered_name, version)
    model = network_spec(architecture).build()
    model.load_state_dict(state)
    return model.eval()
