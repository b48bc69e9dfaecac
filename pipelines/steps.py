"""Step folders: `<storage_root>/<step>/<key>/`, complete once the marker `done.json` exists.

The one convention every stage uses to say "finished" (design.md section 1). Object stores have
no rename, so the rule is the same on both kinds of storage: write the outputs, then the marker,
last. A killed step leaves outputs without a marker, which a rerun overwrites; a step whose
marker exists is skipped. The marker holds the step's summary (what a rerun returns).

Outputs are made in a local scratch folder (plots, MLflow artifacts and torch want local files)
and uploaded by `finish`; outputs a worker writes itself go straight to `step.location`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.storage import Location

if TYPE_CHECKING:  # annotations only: importing the steps loads no MLflow
    from pipelines.tracking import Tracker

DONE = "done.json"


@dataclass(frozen=True)
class Step:
    root: Location  # the storage root
    name: str  # may nest: "stage1/normal"
    key: str

    @property
    def location(self) -> Location:
        return self.root / self.name / self.key

    @property
    def marker(self) -> Location:
        return self.location / DONE

    @property
    def complete(self) -> bool:
        return self.marker.exists()

    def info(self) -> dict:
        """The summary the finished step wrote into its marker."""
        return self.marker.read_json()

    @contextmanager
    def scratch(self) -> Iterator[Path]:
        """A fresh local folder for outputs made locally; removed afterwards."""
        with tempfile.TemporaryDirectory(prefix=f"taskatlas-{self.name.replace('/', '-')}-") as d:
            yield Path(d)

    def finish(self, info: dict[str, Any], scratch: Path | None = None) -> dict[str, Any]:
        """Upload the scratch folder's files (if any), then write the marker: last."""
        if scratch is not None:
            for path in sorted(p for p in scratch.rglob("*") if p.is_file()):
                (self.location / path.relative_to(scratch).as_posix()).upload(path)
        self.marker.write_json(info)
        return info


def log_stored_artifact(tracker: Tracker, run_id: str, stored: Location) -> None:
    """Log a stored file to MLflow (which wants a local file): a local one as it is, a remote one
    through a temporary download."""
    if stored.is_local:
        tracker.log_artifact(run_id, stored.local_path)
        return
    with tempfile.TemporaryDirectory(prefix="taskatlas-artifact-") as d:
        tracker.log_artifact(run_id, stored.download(Path(d) / stored.name))
