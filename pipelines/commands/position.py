"""`taskatlas position` (a new task against a finished study) and `taskatlas predict`.

taskatlas position -c STUDY.yaml --task NEW.yaml --images DIR [--spec SPEC.yaml] [--json]
taskatlas predict -c STUDY.yaml --model NAME[@alias|/version] --images DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.commands.common import add_config_args, add_lock_arg

if TYPE_CHECKING:
    from pipelines.position.answer import PositionAnswer


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "position", help="where a new task sits among a finished study's tasks, and a model for it"
    )
    add_config_args(p)
    add_lock_arg(p)
    p.add_argument(
        "--task", required=True, help="YAML with one task definition: `name: {column, kind, loss, channels}`"
    )
    p.add_argument("--images", required=True, type=Path, help="folder with rgb/ and the task's column folder")
    p.add_argument("--spec", help="import spec of the task's column (scale, offset, invalid, labels)")
    p.add_argument("--json", action="store_true", help="end with the answer as one JSON line")
    p.set_defaults(func=_position)
    q = sub.add_parser("predict", help="a registered model's predictions for a folder of images")
    add_config_args(q)
    q.add_argument("--model", required=True, help="NAME (its champion), NAME@alias or NAME/version")
    q.add_argument("--images", required=True, type=Path, help="folder of images (or with an rgb/ folder)")
    q.add_argument("--out", required=True, type=Path, help="where predictions go: OUT/<column>/<stem>.<ext>")
    q.set_defaults(func=_predict)


def _position(args: argparse.Namespace) -> int:
    from pipelines.config import load_pipeline_config
    from pipelines.invocation import invocation, preflight, study_lock
    from pipelines.position.inputs import check_images, check_task, finished_study, import_images, load_task
    from pipelines.position.run import position_task
    from pipelines.ray_runtime import ensure_ray
    from pipelines.tracking.entities import DatasetRef

    cfg = load_pipeline_config(args.config, args.overrides)
    task = load_task(args.task)
    use_self = check_task(cfg, task)
    spec = check_images(args.images, task, cfg, args.spec)
    study = finished_study(cfg)
    preflight(cfg)
    with study_lock(cfg, "position", args.wait_for_lock) as fence:
        store = import_images(cfg, task, args.images, spec)
        ensure_ray(args.verbose)
        with invocation(cfg, f"position {task.name}", fence, args.verbose) as inv:
            images = DatasetRef(f"{task.name}-images", store.data_version, str(store.root))
            inv.tracker.log_dataset(inv.run_id, images)
            result = position_task(study, task, store, inv.tracker, inv.run_id, inv.fence, use_self)
    print_position(result.answer, result.folder, args.config or "STUDY.yaml")
    if args.json:
        print(json.dumps(result.summary()))
    return 0


def print_position(answer: PositionAnswer, folder: str, config: str) -> None:
    """The answer as text: ranked candidates, the best (ties said), where it sits, the model."""

    def f(x: float) -> str:
        return "   -" if math.isnan(x) else f"{x:.2f}"

    print(
        f"\nwhere {answer.task} sits ({answer.transfer_images} labelled transfer images, "
        f"{answer.test_images} test images, {answer.replicates} replicate(s) of every readout)"
    )
    print(f"  {'sources':<34} affinity  95% interval  gain vs scratch  p_best")
    for c in answer.candidates[:12]:
        interval = f"{f(c.affinity_lo)}-{f(c.affinity_hi)}"
        print(f"  {c.name:<34} {f(c.affinity):>8}  {interval:>12}  {f(c.gain):>15}  {f(c.p_best):>6}")
    best = answer.best
    if len(best) > 1:
        tied = ", ".join(f"{b.name} ({f(b.p_best).strip()})" for b in best)
        print(f"best sources, not distinguishable from each other: {tied}")
    elif best:
        print(f"best source: {best[0].name} (p_best {f(best[0].p_best).strip()})")
    near = [f"{t} ({rho:.2f})" for t, rho in answer.nearest[:3]]
    print(f"nearest study tasks (rank correlation of source affinities): {', '.join(near) or 'none'}")
    roots = ", ".join(answer.roots)
    if fr := answer.from_roots:
        print(f"the study's roots ({roots}) serve it with {fr.name} (affinity {fr.affinity:.2f})")
    if (more := answer.one_more_root) and more[0][2]:
        print(f"one more root: {more[0][0]} would add {more[0][2]:.2f} affinity")
    m, gain = answer.model, answer.chosen.gain
    print(
        f"model: {m.name} v{m.version} (champion), from {' + '.join(m.sources)}"
        + (
            ""
            if math.isnan(gain)
            else f"; beats scratch on {gain:.0%} of test images (chosen on validation images)"
        )
    )
    print(f"  predict: taskatlas predict -c {config} --model {m.name} --images DIR --out DIR")
    print(f"picture: {folder}/position.png")


def _predict(args: argparse.Namespace) -> int:
    from pipelines.config import load_pipeline_config
    from pipelines.invocation import tracking_uri
    from pipelines.predict import predict

    cfg = load_pipeline_config(args.config, args.overrides)
    uri = tracking_uri(cfg)
    done = predict(uri, args.model, args.images, args.out)
    print(f"{done.files} prediction(s) of {done.task} by {done.model} in {done.out}")
    return 0
