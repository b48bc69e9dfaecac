"""Where an imported dataset came from, and importing it again when that source has grown.

The manifest of an imported dataset records its importer and settings (the source folder among
them), so a scheduled job can re-scan the folder and re-import it as a new data version. Image
ids come from file names and splits from a hash of the point or stem, so images already imported
keep their ids and splits in the new version (design.md section 9).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from components.data.folder import import_folder, parse_spec, scan_folder
from components.data.importing import ImportConfig
from components.data.shards import SPLITS, Manifest, ShardStore
from components.data.taskonomy import import_taskonomy, scan
from components.storage import Location

IMPORTERS = ("taskatlas.taskonomy", "taskatlas.folder")


def source_ids(manifest: Manifest) -> list[str] | None:
    """The images the dataset's source folder holds now (as its importer would take them), or
    None for a dataset that was not imported (the synthetic scenes)."""
    settings = manifest.settings
    importer = settings.get("importer")
    if importer not in IMPORTERS:
        return None
    root, skip = Path(settings["root"]), bool(settings.get("skip_incomplete", False))
    found = scan(root, skip)[0] if importer == "taskatlas.taskonomy" else scan_folder(root, skip)
    return sorted(found.ids)


def imported_ids(store: ShardStore) -> list[str]:
    return sorted(str(i) for split in SPLITS for i in store.read(split, [])["image_id"])


def reimport(manifest: Manifest, out: Location) -> Manifest:
    """Run the dataset's importer again, with the settings it was imported with, into `out`."""
    s = manifest.settings
    config = ImportConfig(s["size"], s["transfer_fraction"], s["test_fraction"], s["rows_per_shard"])
    skip = bool(s.get("skip_incomplete", False))
    if s["importer"] == "taskatlas.taskonomy":
        return import_taskonomy(s["root"], out, config, skip_incomplete=skip)[0]
    return import_folder(s["root"], out, config, parse_spec(s.get("spec")), skip_incomplete=skip)[0]


def refreshed_dataset(path: str, cache: Location) -> str:
    """`path` itself while its source folder holds the images it was imported from; otherwise
    the source imported again, as a new data version, under `cache/<name>-<hash of the ids>`
    (imported once: a rerun finds it)."""
    store = ShardStore(path)
    ids = source_ids(store.manifest)
    if ids is None or ids == imported_ids(store):
        return path
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:12]
    out = cache / f"{store.root.name}-{digest}"
    reimport(store.manifest, out)
    return out.uri
