"""`taskatlas submit`: run the pipeline on a Ray cluster through the Ray Jobs API.

taskatlas submit --address http://127.0.0.1:8265 -c configs/taskonomy-gpu.yaml --wait
taskatlas submit --address http://127.0.0.1:8265 -c configs/taskonomy-gpu.yaml --submission-id nightly
taskatlas submit --address http://127.0.0.1:8265 --submission-id taskatlas-nightly-20250101 --wait  # follow

taskatlas submit --address http://127.0.0.1:8265 -c configs/taskonomy-gpu.yaml --dry-run  # what would go

The token comes from RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token, and
goes over plain http only to loopback (or with --insecure). Secrets in --set values are refused:
they would be readable in the job's command line.
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
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list the files that would be uploaded, what is left out, and the job's command; send nothing",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow sending the Ray token over plain http:// to a host other than loopback",
    )
    p.set_defaults(func=_submit)


def _submit(args: argparse.Namespace) -> int:
    from components.settings import read_ray_auth
    from pipelines.config import load_pipeline_config
    from pipelines.pipeline import parse_stages
    from pipelines.submit import build_entrypoint, dry_run, refuse_secrets, resolve_submission_id, submit
    from pipelines.upload import upload_excludes

    refuse_secrets(args.overrides)  # before the config echoes a value back in an error
    cfg = load_pipeline_config(args.config, args.overrides)  # typos fail here, not on the cluster
    parse_stages(args.stages)
    config = Path(args.config) if args.config else None
    excludes = upload_excludes(cfg.storage_root)

    def entrypoint(staged: str | None) -> str:
        return build_entrypoint(staged, args.overrides, args.stages)

    if args.dry_run:
        return dry_run(args.address, entrypoint=entrypoint, config=config, excludes=excludes)
    return submit(
        args.address,
        entrypoint=entrypoint,
        config=config,
        submission_id=resolve_submission_id(args.submission_id),
        wait=args.wait,
        auth=read_ray_auth(),
        excludes=excludes,
        insecure=args.insecure,
    )
