"""The driver's side of MLflow: a tracker with explicit run and experiment ids; its registry is `models`.

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

import json
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import (
    Metric,
    Param,
    RunStatus,
    RunTag,
)
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import (
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_RUN_NAME,
)

from components.errors import TaskatlasError
from pipelines.tracking.batches import RunBatches
from pipelines.tracking.entities import NOTE, DatasetRef, RunToStart, flatten
from pipelines.tracking.logger import RunLogger
from pipelines.tracking.models import ModelRegistry
from pipelines.tracking.retry import (
    DEFAULT_RETRY_S,
    BudgetedClient,
    RetryBudget,
    use_retry_budget,
)
from pipelines.tracking.store import (
    check_sqlite_store,
    create_private_sqlite_store,
    damaged_sqlite_error,
    is_server,
    scheme,
    sqlite_store_refusal,
)

_MAX_BATCH = 900  # MLflow caps log_batch at 1000 metrics


# What a newcomer needs to read the experiment, shown on its page. The kind tag is what MLflow's
# UI read before 3.x's workflow switcher; 3.17's UI ignores it (`run_url` says why and what works).
EXPERIMENT_DESCRIPTION = """A Taskonomy-style transfer study (taskatlas). **Lower loss is better**
everywhere (`train_loss`, `test_loss`, `val_loss`, `final_test_loss`). Steps are epochs, counted
from 0 on `train/<task>` runs and readouts' `train_loss/r<k>`, from 1 on search trials (as Ray Tune
counts them).

- The parent run of each invocation holds the answer: its description states the chosen taxonomy
  (the roots to label, and where every other task gets its representation), with the bootstrap
  stability of each choice and every target's three best sources.
- `train/<task>` runs are the task networks (`train/<task>#<n>`: replicate n); `tune/<task>` runs
  their hyperparameter search, with a run per trial (`tune/<task>/<trial>`) in the experiment
  `<this experiment>/trials`, the best the one that ended with the lowest `val_loss`.
- `transfer/<target>` runs (under `transfer`) gather a target's readouts: small networks trained on
  frozen source features, one run per candidate (`target <- sources`) in the experiment
  `<this experiment>/readouts`, each replicate's losses as its own metrics. Every candidate's
  pooled figures are in its target run's description: `affinity` (AHP share of the target's win
  rates, higher = better source; a target's candidates sum to 1), `quality` (win rate against
  `self`, the target's own fully supervised network) and `gain` (win rate against `pixels`, a
  readout on raw pixels). `random` is a frozen random-init encoder: a source no better than it
  has nothing to offer.
"""


_KIND = {"mlflow.experimentKind": "custom_model_development"}
_EXPERIMENT_TAGS = {NOTE: EXPERIMENT_DESCRIPTION, **_KIND}
# The study's companion experiments (`Tracker.companion`): `<experiment>/<kind>`.
COMPANION_DESCRIPTIONS = {
    "readouts": """The readouts of a taskatlas study: one run per candidate, named `target <-
sources`, a small network trained on frozen source features (`self`, `pixels`, `random`:
baselines). **Lower loss is better.** Each replicate's figures are its own metrics: `test_loss/r0`,
`val_loss/r0`, `seconds/r0`, and `train_loss/r0` by epoch (from 0); `replicates` counts those
that finished. `pooled_affinity` (AHP share of the target's win rates, higher = better source),
`pooled_quality` (win rate against `self`) and `pooled_gain` (against `pixels`) pool every
replicate. Each run's parent is its target's `transfer/<target>` run in the study's experiment
(filter this table by `tags.target = 'normal'` for one target).""",
    "trials": """The hyperparameter search trials of a taskatlas study: one run per trial, named
`tune/<task>/<trial>`, its hyperparameters as params and its epochs' `val_loss` and `train_loss`
(steps from 1, as Ray Tune counts them); **lower loss is better**. Each run's parent is its
search's `tune/<task>` run in the study's experiment, which names the best trial (`best_trial`:
the lowest last `val_loss`).""",
}


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
        if is_server(tracking_uri):
            use_retry_budget(retry_s)
        self.budget = RetryBudget(tracking_uri, retry_s)
        self.run_tags = dict(run_tags or {})  # set on every run this tracker creates (and matched)
        # Also set on every run it creates, but never searched for: who ran it, from which code
        # (MLflow's "Created by" and "Source"); `invocation` sets them once it knows them.
        self.source_tags: dict[str, str] = {}
        try:
            raw = MlflowClient(tracking_uri, registry_uri=tracking_uri)
            self.client = BudgetedClient(raw, self.budget)
            experiment = self.client.get_experiment_by_name(experiment_name)
        except Exception as err:
            if scheme(tracking_uri) == "sqlite" and damaged_sqlite_error(err):  # past its header
                path = Path(tracking_uri.removeprefix("sqlite:///"))
                raise TaskatlasError(sqlite_store_refusal(path, "malformed")) from None
            raise
        self.experiment_id = study_experiment(self.client, experiment_name, experiment, artifact_location)
        self.experiment_name, self.artifact_location = experiment_name, artifact_location
        self._companions: dict[str, str] = {}  # kind -> experiment id (`companion`)
        self.models = ModelRegistry(self.client, tracking_uri, self.experiment_id)  # the same budget
        self.batches = RunBatches(self)  # many runs at a time (thousands of readouts)

    def companion(self, kind: str) -> str:
        """The id of `<experiment>/<kind>`, "readouts" or "trials" (`companion_experiment`)."""
        if kind not in self._companions:
            study, location = self.experiment_name, self.artifact_location
            self._companions[kind] = companion_experiment(self.client, study, location, kind)
        return self._companions[kind]

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

    def describe(self, run_id: str, markdown: str) -> None:
        """The run's description in MLflow's UI."""
        self.client.set_tag(run_id, NOTE, markdown)

    def log_dataset(self, run_id: str, dataset: DatasetRef, context: str = "training") -> None:
        """The run's dataset as an MLflow dataset input (name, version digest, where it lives)."""
        self.client.log_inputs(run_id, [dataset.input(context)])

    def write_json_artifact(self, run_id: str, data: Any, filename: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / filename
            path.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
            self.client.log_artifact(run_id, str(path))


def companion_name(study: str, kind: str) -> str:
    """The name of the study's companion experiment of `kind` ("readouts", "trials")."""
    return f"{study}/{kind}"


def companion_experiment(client: Any, study: str, artifact_location: str | None, kind: str) -> str:
    """The id of the study's companion experiment `<study>/<kind>` (`COMPANION_DESCRIPTIONS`), made
    if missing. The many small runs (thousands of readouts, hundreds of trials) go there so that
    the study's first page (MLflow's UI loads 100 runs at a time, newest first) shows the stage runs
    under the parent; each names its parent, a stage run of the study's experiment, and the UI shows
    that parent above them."""
    name = companion_name(study, kind)
    location = artifact_location and f"{artifact_location.rstrip('/')}/{kind}"
    tags = {NOTE: COMPANION_DESCRIPTIONS[kind], **_KIND}
    return study_experiment(client, name, client.get_experiment_by_name(name), location, tags)


def study_experiment(
    client: Any,
    name: str,
    experiment: Any,
    artifact_location: str | None,
    tags: Mapping[str, str] = _EXPERIMENT_TAGS,
) -> str:
    """The id of the study's experiment (`experiment`: the store's of that name, or None), made if
    missing, with its tags. If it logs to another root's artifacts (the storage root was copied
    or moved, its store with it), it is kept under another name (its runs' history) and the
    study's name starts afresh here, so nothing is written into the old root."""
    if experiment is not None and artifact_location and experiment.artifact_location != artifact_location:
        moved = f"{name} (artifacts at {experiment.artifact_location})"
        client.rename_experiment(experiment.experiment_id, moved)
        print(
            f"taskatlas: the tracking store was made at another storage root ({experiment.artifact_location}); "
            f"its runs are now the experiment {moved!r}, and this root logs to {artifact_location}",
            file=sys.stderr,
            flush=True,
        )
        experiment = None
    if experiment is None:
        return client.create_experiment(name, artifact_location=artifact_location, tags=dict(tags))
    for key, value in tags.items():
        if experiment.tags.get(key) != value:
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id
