"""The one module that reads the environment: what a run is told by its machine, not its config."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from components.errors import ConfigError


@dataclass(frozen=True)
class Settings:
    ray_address: str | None  # RAY_ADDRESS: join this cluster instead of starting a local one
    ray_num_cpus: int | None  # TASKATLAS_RAY_NUM_CPUS: CPUs of a locally started Ray
    # TASKATLAS_RAY_DASHBOARD=0: start a local Ray without its dashboard (saves ~2 s and ~200 MB;
    # the tests do this). With it, users watch the run at http://127.0.0.1:8265, and Ray Train's
    # placement-group cleaner can see its controller through the state API it serves.
    ray_dashboard: bool = True
    # TASKATLAS_VERBOSE=1 (or `taskatlas -v`): Ray, Tune and Train logs live on the console; by
    # default they go to Ray's log folder (its path is printed) and the console shows progress
    # bars and the answer.
    verbose: bool = False
    # The local cache of remote files (TASKATLAS_CACHE, default ~/.cache/taskatlas) and its size
    # bound in GB (TASKATLAS_CACHE_GB, default 20)
    cache_dir: Path = Path.home() / ".cache" / "taskatlas"
    cache_gb: float = 20.0
    # S3 storage: the region (AWS_DEFAULT_REGION, default us-east-1; pyarrow would ask AWS, and
    # there is no network at run time) and an S3-protocol server's URL (AWS_ENDPOINT_URL)
    aws_region: str = "us-east-1"
    aws_endpoint: str | None = None


def read_settings() -> Settings:
    cpus = os.environ.get("TASKATLAS_RAY_NUM_CPUS")
    dashboard = os.environ.get("TASKATLAS_RAY_DASHBOARD", "1").strip().lower()
    if dashboard not in ("0", "1", "true", "false"):
        raise ConfigError(f"TASKATLAS_RAY_DASHBOARD must be 0 or 1, got {dashboard!r}")
    verbose = os.environ.get("TASKATLAS_VERBOSE", "0").strip().lower()
    if verbose not in ("0", "1", "true", "false"):
        raise ConfigError(f"TASKATLAS_VERBOSE must be 0 or 1, got {verbose!r}")
    return Settings(
        ray_address=os.environ.get("RAY_ADDRESS") or None,
        ray_num_cpus=_positive_int("TASKATLAS_RAY_NUM_CPUS", cpus) if cpus else None,
        ray_dashboard=dashboard in ("1", "true"),
        verbose=verbose in ("1", "true"),
        cache_dir=Path(os.environ.get("TASKATLAS_CACHE") or Path.home() / ".cache" / "taskatlas"),
        cache_gb=_positive_float("TASKATLAS_CACHE_GB", os.environ.get("TASKATLAS_CACHE_GB") or "20"),
        aws_region=os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        aws_endpoint=os.environ.get("AWS_ENDPOINT_URL") or None,
    )


def _positive_float(name: str, text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a number > 0, got {text!r}") from None
    if not value > 0:
        raise ConfigError(f"{name} must be a number > 0, got {text!r}")
    return value


def _positive_int(name: str, text: str, minimum: int = 1) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a whole number >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be a whole number >= {minimum}, got {text!r}")
    return value


@dataclass(frozen=True)
class RayAuth:
    """Where a Ray client finds the cluster's token, in Ray's own order of precedence."""

    mode: str | None  # RAY_AUTH_MODE: "disabled" means send no token
    token: str | None  # RAY_AUTH_TOKEN: the token itself
    token_path: Path | None  # RAY_AUTH_TOKEN_PATH: a file holding it
    default_token_path: Path  # ~/.ray/auth_token: what a new local cluster writes


def read_ray_auth() -> RayAuth:
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return RayAuth(
        mode=(os.environ.get("RAY_AUTH_MODE") or "").lower() or None,
        token=os.environ.get("RAY_AUTH_TOKEN") or None,
        token_path=Path(path).expanduser() if path else None,
        default_token_path=Path.home() / ".ray" / "auth_token",
    )


def keep_local_ray_on_loopback() -> None:
    """A locally started Ray binds to the machine's LAN address unless told otherwise; Ray reads
    this variable when it is imported. Not for a process that joins a cluster (RAY_ADDRESS)."""
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
