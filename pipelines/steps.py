"""Step folders: `<storage_root>/<step>/<key>/`, complete once `done.json` is written (last).

A step whose folder is complete is skipped on rerun (design.md section 1). Outputs are written
into a `.partial` sibling first and renamed into place with `done.json`, so a killed step never
leaves a folder that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DONE = "done.json"


@dataclass(frozen=True)
class Step:
    root: Path  # the storage root
    name: str
    key: str

    @property
    def path(self) -> Path:
        return self.root / self.name / self.key

    @property
    def complete(self) -> bool:
        return (self.path / DONE).is_file()

    def info(self) -> dict:
        return json.loads((self.path / DONE).read_text())

    def begin(self) -> Path:
        """A clean scratch folder to write the outputs into."""
        scratch = self.path.with_name(self.key + ".partial")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        return scratch

    def finish(self, scratch: Path, info: dict[str, Any]) -> Path:
        (scratch / DONE).write_text(json.dumps(info, indent=1, sort_keys=True, default=str))
        shutil.rmtree(self.path, ignore_errors=True)
        os.replace(scratch, self.path)
        return self.path
