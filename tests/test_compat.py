"""pipelines/compat.py reaches into Ray's and MLflow's private modules: pinned to the versions it
was written against, so a version bump fails here first, naming what to re-check."""

from importlib.metadata import version

import pipelines.compat as compat

PINNED = {"ray": "2.60.", "mlflow": "3.17."}  # pyproject.toml's ranges; compat.py was checked on these


def test_the_private_names_compat_uses_exist_in_the_pinned_versions():
    for package, prefix in PINNED.items():
        assert version(package).startswith(prefix), (
            f"{package} {version(package)}: re-check pipelines/compat.py's private uses, then update PINNED"
        )
    for name in ("RayTorchBackend", "set_torch_distributed_env_vars", "setup_torch_process_group"):
        assert callable(getattr(compat, name)), name
    with compat.process_tracking_uri("sqlite:////tmp/x.db"):
        import mlflow

        assert mlflow.get_tracking_uri() == "sqlite:////tmp/x.db"
    assert mlflow.get_tracking_uri() != "sqlite:////tmp/x.db"  # put back as it was


def test_the_tracking_store_and_the_monitors_step_are_reachable(tmp_path):
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    assert callable(compat.tracking_store(client).update_run_info)
    run = client.create_run(client.create_experiment("x"))
    monitor = SystemMetricsMonitor(run.info.run_id, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    assert compat.logging_step(monitor) == 0
