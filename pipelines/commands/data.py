"""`taskatlas data ...`: make, inspect, import and picture datasets.

taskatlas data generate --out data/synthetic-64 --n-train 2000 --size 64 --seed 0
taskatlas data info data/synthetic-64
taskatlas data import-taskonomy --root /data/taskonomy --out data/taskonomy-64 --size 64
taskatlas data import-folder --root my-images --out data/mine-64 --size 64 --spec spec.yaml
taskatlas data preview --out docs/scene.png            # one scene with all annotations
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from components.data.folder import import_folder, load_spec
from components.data.importing import Found, ImportConfig, describe_skipped
from components.data.scenes import SceneConfig
from components.data.shards import SPLITS, Manifest, ShardStore, valid_fractions
from components.data.synthetic import DatasetConfig, generate_dataset, render_images
from components.data.taskonomy import import_taskonomy
from components.errors import TaskatlasError
from pipelines.progress import progress_bar


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="generate, import and inspect datasets")
    cmds = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    gen = cmds.add_parser("generate", help="render the synthetic multi-task scenes into Parquet shards")
    gen.add_argument("--out", required=True, type=Path)
    defaults = DatasetConfig()
    gen.add_argument("--n-train", type=int, default=defaults.n_train)
    gen.add_argument("--n-transfer", type=int, default=defaults.n_transfer)
    gen.add_argument("--n-test", type=int, default=defaults.n_test)
    gen.add_argument("--size", type=int, default=defaults.scene.size, help="image side in pixels")
    gen.add_argument("--seed", type=int, default=defaults.seed)
    gen.add_argument("--rows-per-shard", type=int, default=defaults.rows_per_shard)
    gen.set_defaults(func=_generate)

    info = cmds.add_parser("info", help="summary of a dataset folder (verifies every shard)")
    info.add_argument("root", type=Path)
    info.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    info.set_defaults(func=_info)

    imp = cmds.add_parser("import-taskonomy", help="import the public Taskonomy folder layout")
    imp.add_argument("--root", required=True, type=Path, help="folder with one sub-folder per domain")
    _import_args(imp)
    imp.set_defaults(func=_import)

    fold = cmds.add_parser("import-folder", help="import <root>/<column>/<stem>.(png|jpg|npy)")
    fold.add_argument("--root", required=True, type=Path, help="folder with rgb/ and one folder per column")
    fold.add_argument("--spec", type=Path, help="YAML: per column scale, offset, invalid, labels")
    _import_args(fold)
    fold.set_defaults(func=_import_folder)

    prev = cmds.add_parser("preview", help="draw one image with all its annotations to a PNG")
    prev.add_argument("--out", required=True, type=Path)
    prev.add_argument("--dataset", type=Path, help="take the image from this dataset (else render one)")
    prev.add_argument("--split", default="test", choices=SPLITS)
    prev.add_argument("--index", type=int, default=0)
    prev.add_argument("--size", type=int, default=128, help="image side when rendering")
    prev.add_argument("--seed", type=int, default=0)
    prev.set_defaults(func=_preview)


def _generate(args: argparse.Namespace) -> int:
    config = DatasetConfig(
        n_train=args.n_train,
        n_transfer=args.n_transfer,
        n_test=args.n_test,
        seed=args.seed,
        rows_per_shard=args.rows_per_shard,
        scene=SceneConfig(size=args.size),
    )
    generate_and_report(args.out, config)
    return 0


def generate_and_report(out: Path, config: DatasetConfig) -> Manifest:
    total = config.n_train + config.n_transfer + config.n_test
    with progress_bar(total, "rendering scenes") as update:
        manifest = generate_dataset(out, config, progress=update)
    print(summary(out, manifest))
    return manifest


def _info(args: argparse.Namespace) -> int:
    store = ShardStore(args.root)
    store.verify()
    valid = valid_fractions(store)
    if args.json:
        m = store.manifest
        print(
            json.dumps(
                {
                    "root": str(store.root),
                    "source": m.source,
                    "data_version": m.data_version,
                    "counts": m.counts,
                    "columns": {c.name: [c.dtype, list(c.shape)] for c in m.columns},
                    "valid_fraction": valid,
                }
            )
        )
    else:
        print(summary(store.root, store.manifest))
        print("valid pixels " + ", ".join(f"{name} {valid[name]:.3f}" for name in valid))
    return 0


def _import_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path)
    defaults = ImportConfig()
    parser.add_argument("--size", type=int, default=defaults.size, help="image side in pixels")
    parser.add_argument("--transfer-fraction", type=float, default=defaults.transfer_fraction)
    parser.add_argument("--test-fraction", type=float, default=defaults.test_fraction)
    parser.add_argument("--rows-per-shard", type=int, default=defaults.rows_per_shard)
    parser.add_argument(
        "--skip-incomplete",
        action="store_true",
        help="import the images that have every domain and list the others (default: an error)",
    )


def _import_config(args: argparse.Namespace) -> ImportConfig:
    return ImportConfig(
        size=args.size,
        transfer_fraction=args.transfer_fraction,
        test_fraction=args.test_fraction,
        rows_per_shard=args.rows_per_shard,
    )


def _import(args: argparse.Namespace) -> int:
    config = _import_config(args)
    with progress_bar(0, "importing Taskonomy") as update:
        manifest, unknown, found = import_taskonomy(
            args.root, args.out, config, progress=update, skip_incomplete=args.skip_incomplete
        )
    if unknown:
        print(f"skipped folders that are not known domains: {', '.join(unknown)}")
    _report_import(args.out, manifest, found)
    return 0


def _import_folder(args: argparse.Namespace) -> int:
    config, spec = _import_config(args), load_spec(args.spec)
    with progress_bar(0, "importing folder") as update:
        manifest, found = import_folder(
            args.root, args.out, config, spec, progress=update, skip_incomplete=args.skip_incomplete
        )
    _report_import(args.out, manifest, found)
    return 0


def _report_import(out: Path, manifest: Manifest, found: Found) -> None:
    if found.skipped:
        print(describe_skipped(found.skipped))
    print(summary(out, manifest))


def _preview(args: argparse.Namespace) -> int:
    from components.data.preview import save_scene_figure  # matplotlib: only for this command

    if args.dataset:
        data = ShardStore(args.dataset).read(args.split)
        if not 0 <= args.index < len(data["image_id"]):
            raise TaskatlasError(
                f"--index {args.index} is out of range for {args.split} ({len(data['image_id'])} images)"
            )
        row = {k: v[args.index] for k, v in data.items() if k != "image_id"}
        title = f"{args.dataset.name}: {data['image_id'][args.index]}"
    else:
        config = DatasetConfig(seed=args.seed, scene=SceneConfig(size=args.size))
        row = {k: v[0] for k, v in render_images(config, args.split, args.index, 1).items()}
        title = f"synthetic scene: seed {args.seed}, {args.split} image {args.index}, {args.size}x{args.size}"
    print(f"wrote {save_scene_figure(row, args.out, title)}")
    return 0


def summary(root: Path, manifest: Manifest) -> str:
    counts = manifest.counts
    shape = next(c.shape for c in manifest.columns if c.name == "rgb") if manifest.columns else ()
    lines = [
        f"dataset      {root}",
        f"source       {manifest.source}",
        f"data version {manifest.data_version}",
        f"images       {sum(counts.values())} ({', '.join(f'{s} {counts[s]}' for s in SPLITS)})",
        f"image size   {'x'.join(map(str, shape[1:]))}",
        f"shards       {len(manifest.shards)}",
        f"columns      {', '.join(c.name for c in manifest.columns)}",
    ]
    return "\n".join(lines)
