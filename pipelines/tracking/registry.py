"""A study's own names in a shared MLflow registry and under a shared storage root.

Two studies may share one storage root and one tracking store. Their step folders are keyed by
content (`pipelines/steps.py`): a step two studies define alike is one step, done once, which is
safe to share. Everything named rather than keyed belongs to one study, its config's `name`:

- its networks are registered as `<study>-<task>` (the default study, `taskatlas`, gives
  `taskatlas-normal`; `configs/quickstart.yaml` gives `taskatlas-quickstart-normal`), a positioned
  task's model as `<study>-<task>-transfer`;
- every version carries tags `study` and `definition` (`Task.definition_hash`), and a champion is
  compared only with a challenger of its own definition (`pipelines/nightly.py`);
- nightly state (the last taxonomy) lives under `nightly/<study>/`.
"""

from __future__ import annotations

from mlflow.exceptions import MlflowException

from components.storage import Location
from components.tasks import Task
from pipelines.tracking.runs import Tracker

STUDY_TAG = "study"
DEFINITION_TAG = "definition"  # Task.definition_hash of the task the version was trained for
KEY_TAG = "config_hash"  # the key of the step that made the version (a network's, a positioned model's)


def network_model(study: str, task: str) -> str:
    """The registered name of a study's network for `task`."""
    return f"{study}-{task}"


def positioned_model(study: str, task: str) -> str:
    """The registered name of a task positioned against a study (`taskatlas position`)."""
    return f"{study}-{task}-transfer"


def version_tags(study: str, task: Task) -> dict[str, str]:
    """The tags that say whose and what a registered version is."""
    return {"task": task.name, STUDY_TAG: study, DEFINITION_TAG: task.definition_hash}


def registered_definition(tracker: Tracker, registered: str, version: str) -> str | None:
    """The definition hash a registered version was tagged with (None: registered before the tag)."""
    return tracker.models.version_tags(registered, version).get(DEFINITION_TAG)


def nightly_state(root: Location, study: str) -> Location:
    """Where `taskatlas nightly` keeps what it remembers between nights, for one study."""
    return root / "nightly" / study


def is_registered(tracker: Tracker, registered: str, version: str, key: str) -> bool:
    """Whether version `version` of `registered` is in the current tracking store and is what the
    step `key` made (tagged with it, or untagged: registered before the tag). A step's marker says
    its model was registered, but the store can be replaced under the study (a damaged `mlflow.db`
    moved aside), or copied with a storage root that moved: the marker's version is then missing,
    another model's, or one whose files are under the old root."""
    try:
        tags = tracker.models.tags_if_made_here(registered, version)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return False
    return tags is not None and tags.get(KEY_TAG, key) == key
