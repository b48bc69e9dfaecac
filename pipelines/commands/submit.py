"""`taskatlas submit`: run the pipeline on a Ray cluster through the Ray Jobs API.

taskatlas submit --address http://127.0.0.1:8265 -c configs/taskonomy-gpu.yaml --wait
taskatlas submit --address http://127.0.0.1:8265 -c configs/taskonomy-gpu.yaml --submission-id nightly
taskatlas submit --address http://127.0.0.1:8265 --submission-id taskatlas-nightly-20250101 --wait  # follow

The token comes from RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.commands.common import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="send `taskatlas run` to a Ray cluster as a Ray job (Jobs API)")
    p.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://127.0.0.1:8265")
    add_config_args(p)
    p.add_argument("--stages", help="comma-separated stages, passed on to `taskatlas run`")
    p.add_argument(
        "--submission-id",
        help="a job id; if that job exists it is followed, not submitted again. "
        "'nightly': taskatlas-nightly-YYYYMMDD (UTC date)",
    )
    p.add_argument("--wait", action="store_true", help="stream the job's logs; exit 1 unless it succeeds")
    p.set_defaults(func=_submit)


def _submit(args: argparse.Namespace) -> int:
    from pipelines.config import load_pipeline_config
    from pipelines.pipeline import parse_stages
    from pipelines.settings import read_ray_auth
    from pipelines.submit import build_entrypoint, resolve_submission_id, submit

    load_pipeline_config(args.config, args.overrides)  # typos fail here, not on the cluster
    parse_stages(args.stages)
    return submit(
        args.address,
        entrypoint=lambda config: build_entrypoint(config, args.overrides, args.stages),
        config=Path(args.config) if args.config else None,
        submission_id=resolve_submission_id(args.submission_id),
        wait=args.wait,
        auth=read_ray_auth(),
    )
