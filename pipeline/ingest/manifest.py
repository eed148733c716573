"""The ingest manifest on disk (``<ingest>/manifest.json``, format ``ctseg-ingest/1``): its version, writer, reader.

It is what later stages read of an ingest folder: the label descriptions, the key of the images it was made from
(so an unchanged export is relabelled without reading DICOM again) and one entry per case with its role
(train/test), image, label map, provenance and structure inventory, relative to the folder.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline import atomic
from pipeline.errors import InputError

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "ctseg-ingest/1"


def write_manifest(folder: Path, labels: list[dict], images_key: str | None, cases: list[dict]) -> Path:
    """Write the manifest atomically, cases sorted by id."""
    path = Path(folder) / MANIFEST_FILE
    atomic.write_json(path, {"format": MANIFEST_FORMAT, "labels": labels, "images_key": images_key,
                             "cases": sorted(cases, key=lambda c: c["id"])})
    return path


def read_manifest(folder: Path) -> dict:
    """The manifest of a finished ingest folder; one clear error when it is missing, damaged or of another version."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise InputError(f"{path} must exist: run 'ctseg ingest' before this stage.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} must be readable JSON, got {exc}. Re-run 'ctseg ingest --force'.") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise InputError(f"{path} must have format {MANIFEST_FORMAT!r}, got {got!r}. Re-run 'ctseg ingest' with "
                         f"this version.")
    return manifest
