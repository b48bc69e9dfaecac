"""The environment the pipeline reads (components/settings.py), parsed once and checked."""

import pytest

from components.errors import ConfigError
from components.settings import read_settings


def test_a_local_ray_gets_its_dashboard_unless_told_not_to(monkeypatch):
    monkeypatch.delenv("TASKATLAS_RAY_DASHBOARD", raising=False)
    assert read_settings().ray_dashboard is True
    monkeypatch.setenv("TASKATLAS_RAY_DASHBOARD", "0")
    assert read_settings().ray_dashboard is False


def test_a_bad_dashboard_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("TASKATLAS_RAY_DASHBOARD", "maybe")
    with pytest.raises(ConfigError, match="TASKATLAS_RAY_DASHBOARD"):
        read_settings()


def test_cpus_and_address_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("TASKATLAS_RAY_NUM_CPUS", "3")
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    settings = read_settings()
    assert settings.ray_num_cpus == 3 and settings.ray_address == "ray://head:10001"
