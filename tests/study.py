"""The tiny study most end-to-end tests run: three tasks on 72 generated 32x32 images, one epoch
of everything. `write_study` writes it as a YAML config, with sections merged over it."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

TINY_STUDY = {
    "name": "tiny",
    "tasks": ["normal", "reshading", "edge_texture"],
    "data": {"n_train": 40, "n_transfer": 16, "n_test": 16, "size": 32, "rows_per_shard": 16},
    "model": {"encoder": "small", "width": 8, "downsample": 4},
    "train": {"epochs": 1, "num_workers": 1},
    "tune": {"enabled": False},
    "transfer": {"orders": [2], "beams": [2], "epochs": 1, "width": 16},
    "taxonomy": {"budget": 1, "max_order": 2},
}


def study_config(storage_root: str | Path, **sections) -> dict:
    """The tiny study on `storage_root`, each of `sections` merged over its section (a mapping)
    or put in its place (anything else); a section given as None is left out."""
    config = copy.deepcopy(TINY_STUDY) | {"storage_root": str(storage_root)}
    for name, value in sections.items():
        if value is None:
            config.pop(name, None)
        elif isinstance(value, dict) and isinstance(config.get(name), dict):
            config[name] = config[name] | value
        else:
            config[name] = value
    return config


def write_study(path: Path, storage_root: str | Path, **sections) -> Path:
    """`study_config` written to `path` as YAML; returns `path`."""
    path.write_text(yaml.safe_dump(study_config(storage_root, **sections), sort_keys=False))
    return path
