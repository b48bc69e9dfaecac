"""The pipeline config at its edge: each field checked once, when it loads."""

from __future__ import annotations

import pytest

from components.errors import ConfigError
from pipelines.config import RUNTIME, Loader, TransferConfig, key_fields, load_pipeline_config


def test_the_storage_root_is_opened_once_when_the_config_loads(tmp_path):
    with pytest.raises(ConfigError, match=r"^storage_root: cannot open 'nosuch://bucket/x'"):
        load_pipeline_config(None, ["storage_root=nosuch://bucket/x"])
    cfg = load_pipeline_config(None, [f"storage_root={tmp_path}"])
    assert cfg.root is cfg.root and cfg.root.local_path == tmp_path


def test_choices_are_enums_named_in_one_line_errors():
    assert load_pipeline_config(None, ["train.loader=ray_data"]).train.loader is Loader.RAY_DATA
    with pytest.raises(ConfigError, match=r"^taxonomy\.transform: 'log' is not one of sqrt, none$"):
        load_pipeline_config(None, ["taxonomy.transform=log"])


def test_fields_marked_runtime_enter_no_key():
    t = TransferConfig()
    science = key_fields(t, RUNTIME)
    assert "stack" not in science and "cpus_per_readout" not in science and "max_retries" not in science
    assert {"epochs", "lr", "width", "seed", "orders", "replicates"} <= set(science)
