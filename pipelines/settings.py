"""The one module that reads the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    ray_address: str | None  # RAY_ADDRESS: join this cluster instead of starting a local one
    ray_num_cpus: int | None  # TASKATLAS_RAY_NUM_CPUS: CPUs of a locally started Ray


def read_settings() -> Settings:
    cpus = os.environ.get("TASKATLAS_RAY_NUM_CPUS")
    return Settings(
        ray_address=os.environ.get("RAY_ADDRESS") or None, ray_num_cpus=int(cpus) if cpus else None
    )


def keep_local_ray_on_loopback() -> None:
    """A locally started Ray binds to the machine's LAN address unless told otherwise; Ray reads
    this variable when it is imported. Not for a process that joins a cluster (RAY_ADDRESS)."""
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
