"""Flows that compose `components/` with Ray and MLflow, and the `taskatlas` CLI."""
