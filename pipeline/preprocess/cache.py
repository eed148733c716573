"""The preprocessed cache on disk: its format version, writer and reader (``<experiment>/preprocess``).

Layout::

    plan.json               target spacing, intensity handling, crop, patch/batch sizes (plan.py)
    index.json              {"format": INDEX_FORMAT, "transform_key", "cases": [entry, ...]}
    arrays/<id>_image.npy   float32 (or float16) [i, j, k] on the model grid, intensities scaled
    arrays/<id>_label.npy   uint8 class indices 0..K-1 (plan["class_values"] maps them to label values)
    arrays/<id>.json        the case's meta: grids, class voxel counts and the key the arrays are valid for

An entry names the three files of a case relative to the folder. The preprocess stage writes the cache; the train
stage (and anything else) reads it only through :func:`read_index`, :func:`load_cached_case` and :func:`read_meta`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline import atomic
from pipeline.errors import InputError
from pipeline.geometry import Grid
from pipeline.stage import safe_name

INDEX_FORMAT = "ctseg-preprocessed/1"


def case_paths(folder: Path, case_id: str) -> dict[str, Path]:
    """Where the image, label and meta files of ``case_id`` live in the cache ``folder``."""
    name = safe_name(case_id)
    arrays = folder / "arrays"
    return {"image": arrays / f"{name}_image.npy", "label": arrays / f"{name}_label.npy",
            "meta": arrays / f"{name}.json"}


def save_array(path: Path, array: np.ndarray) -> None:
    """Write one cached array atomically (``.npy``, C order)."""
    with atomic.atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array))


def write_meta(path: Path, meta: dict) -> None:
    atomic.write_json(path, meta)


def read_meta(path: Path) -> dict | None:
    """A case's meta, or None when it is missing or unreadable (the case is then recomputed)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def write_index(folder: Path, transform_key: str, entries: list[dict]) -> None:
    atomic.write_json(folder / "index.json", {"format": INDEX_FORMAT, "transform_key": transform_key,
                                              "cases": entries})


def read_index(preprocess_dir: Path) -> tuple[dict, list[dict]]:
    """The plan and the cached cases of a finished preprocess folder (for the train stage)."""
    plan_path = preprocess_dir / "plan.json"
    index_path = preprocess_dir / "index.json"
    for path in (plan_path, index_path):
        if not path.is_file():
            raise InputError(f"{path} must exist: run 'ctseg preprocess' first.")
    plan = json.loads(plan_path.read_text(encoding="utf-8"))
    index = json.loads(index_path.read_text(encoding="utf-8"))
    if index.get("format") != INDEX_FORMAT:
        raise InputError(f"{index_path} must have format {INDEX_FORMAT!r}, got {index.get('format')!r}. "
                         f"Re-run 'ctseg preprocess --force'.")
    return plan, index["cases"]


def cached_shape(preprocess_dir: Path, entry: dict) -> tuple[int, ...]:
    """The model-grid shape of a cached case, from its meta (no array is loaded)."""
    meta = read_meta(preprocess_dir / entry["meta"])
    if meta is None:
        raise InputError(f"{preprocess_dir / entry['meta']} must be readable JSON: re-run 'ctseg preprocess --force'.")
    return tuple(meta["grid"]["shape"])


def load_cached_case(preprocess_dir: Path, entry: dict) -> tuple[np.ndarray, np.ndarray, Grid]:
    """Image (float32), label (uint8) and model grid of one cached case."""
    image = np.load(preprocess_dir / entry["image"]).astype(np.float32, copy=False)
    label = np.load(preprocess_dir / entry["label"])
    meta = json.loads((preprocess_dir / entry["meta"]).read_text(encoding="utf-8"))
    return image, label, Grid.from_json(meta["grid"])
