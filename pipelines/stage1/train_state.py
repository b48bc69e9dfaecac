"""Ray Train's own state of a Stage I training run, `<storage_root>/ray/<run name>/`: checked
before the trainer starts, so a state a full disk or a killed copy left damaged never blocks a
rerun.

Ray Train resumes a run from its `checkpoint_manager_snapshot.json` and refuses to start
(`CheckpointManagerInitializationError`) when the snapshot does not parse, was written by another
Ray version, or lists a checkpoint that is gone; a checkpoint whose weights are cut short fails
every restart. Such a state is removed, in one line: what is finished is decided by our own step
markers and final weights (`pipelines.steps`), so the networks of that run not finished yet are
trained again from the start.
"""

from __future__ import annotations

import io
import sys
import zipfile

import ray

from components.storage import Location
from pipelines.stage1.worker import CHECKPOINT_FILE

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's name (StorageContext)


def train_state_damage(run_dir: Location) -> str:
    """Why Ray Train could not resume the run in `run_dir` ("" if it can, or has nothing to resume)."""
    snapshot = run_dir / SNAPSHOT
    if not snapshot.exists():
        return ""
    try:
        state = snapshot.read_json()
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
        version = state.get("ray_version")
        listed = [r["checkpoint_dir_name"] for r in state.get("checkpoint_results") or []]
        latest = (state.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{snapshot} cannot be read ({type(err).__name__}: {err or 'empty'})"
    if version != ray.__version__:
        return f"{snapshot} was written by Ray {version}, this is Ray {ray.__version__}"
    for name in listed:
        if not (run_dir / name).exists():
            return f"{run_dir / name}, a checkpoint {SNAPSHOT} lists, is missing"
    if latest:
        weights = run_dir / latest / CHECKPOINT_FILE
        try:  # torch.save writes a zip: its CRCs tell a whole file from a cut one
            with zipfile.ZipFile(io.BytesIO(weights.read_bytes())) as z:
                if z.testzip() is not None:
                    raise zipfile.BadZipFile("a CRC does not match")
        except (OSError, zipfile.BadZipFile) as err:
            return f"{weights}, its latest checkpoint, cannot be read ({err})"
    return ""


def repair_train_state(run_dir: Location, what: str) -> bool:
    """Remove the run's state if Ray Train could not resume from it, saying so in one line."""
    problem = train_state_damage(run_dir)
    if problem:
        print(
            f"taskatlas: {problem}; removed Ray Train's state of {what} ({run_dir}): its networks"
            " not finished yet train again from the start",
            file=sys.stderr,
            flush=True,
        )
        run_dir.rmtree()
    return bool(problem)
