"""`taskatlas train` and `taskatlas tune`: Stage I from the command line.

taskatlas train -c configs/quickstart.yaml [--tasks normal,reshading] [--set train.epochs=3]
taskatlas tune  -c configs/quickstart.yaml --tasks normal --set tune.num_samples=8
"""

from __future__ import annotations

import argparse

from pipelines.commands.common import add_config_args, add_lock_arg, mlflow_ui_command


def register(sub: argparse._SubParsersAction) -> None:
    for name, helptext, func in (
        (
            "train",
            "Stage I: search hyperparameters (Ray Tune) and train each task network (Ray Train)",
            _train,
        ),
        ("tune", "Stage I search only: Ray Tune with ASHA per task; prints the best hyperparameters", _tune),
    ):
        p = sub.add_parser(name, help=helptext)
        add_config_args(p)
        add_lock_arg(p)
        p.add_argument("--tasks", help="comma-separated subset of the config's tasks")
        p.set_defaults(func=func)


def _setup(args: argparse.Namespace):
    from components.tasks import parse_tasks
    from pipelines.config import load_pipeline_config
    from pipelines.invocation import preflight

    cfg = load_pipeline_config(args.config, args.overrides)
    tasks = parse_tasks(args.tasks or cfg.tasks, cfg.catalog)
    preflight(cfg)
    return cfg, tasks


def _train(args: argparse.Namespace) -> int:
    from pipelines.invocation import invocation, study_lock
    from pipelines.ray_runtime import ensure_ray
    from pipelines.stage1.plan import network_name
    from pipelines.stage1.run import Stage1
    from pipelines.tracking.registry import network_model

    cfg, tasks = _setup(args)
    with study_lock(cfg, "train", args.wait_for_lock) as fence:
        ensure_ray(args.verbose)
        with invocation(cfg, "train", fence, args.verbose) as inv:
            results = Stage1(cfg, inv.store, inv.tracker, inv.run_id, inv.fence, verbose=inv.verbose).run(
                tasks, search=True
            )
    print(f"\n{'task':<18} {'test loss':>10}  lr        wd        batch  registered model")
    for name, first in results.items():
        for r in (first, *first.replicas):  # network replicates (train.replicates): not registered
            h, network = r.hparams, network_name(name, r.replicate)
            registered = (
                "-" if r.replicate else f"{r.registered or network_model(cfg.name, name)} v{r.model_version}"
            )
            print(
                f"{network:<18} {r.test_loss:>10.4f}  {h.lr:.2e}  {h.weight_decay:.2e}  {h.batch_size:>5}  {registered}"
            )
    print(f"\nMLflow UI: {mlflow_ui_command(inv.tracker.tracking_uri)}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from pipelines.invocation import invocation, study_lock
    from pipelines.ray_runtime import ensure_ray
    from pipelines.stage1.plan import network_name
    from pipelines.stage1.run import Stage1

    cfg, tasks = _setup(args)
    with study_lock(cfg, "tune", args.wait_for_lock) as fence:
        ensure_ray(args.verbose)
        with invocation(cfg, "tune", fence, args.verbose) as inv:
            stage1 = Stage1(cfg, inv.store, inv.tracker, inv.run_id, inv.fence, verbose=inv.verbose)
            best = {  # one search per network replicate (tune.each_replicate), or one
                network_name(name, n): h
                for n in stage1.plan.searches()
                for name, h in stage1.search(tasks, n).items()
            }
    for name, h in best.items():
        print(
            f"{name:<18} lr={h['lr']:.2e} weight_decay={h['weight_decay']:.2e} batch_size={h['batch_size']}"
        )
    return 0
