"""Flows that compose `components/` with Ray and MLflow, and the `taskatlas` CLI."""

from components.settings import keep_local_ray_on_loopback

# Before anything imports Ray: Ray decides at import time whether a local instance binds to the
# machine's LAN address; a local run stays on 127.0.0.1 (a cluster run has RAY_ADDRESS set).
keep_local_ray_on_loopback()
