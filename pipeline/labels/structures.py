"""The structure inventory: every RTSTRUCT ROI and DICOM SEG segment of a case as a binary mask on its image.

Layout in the ingest folder::

    structures/<case>/<object>_<number>_<name>.nii.gz   one uint8 0/1 mask per structure, on the image grid
    structures/<case>/structures.json                    the case's inventory (rows as below)
    structures.csv / structures.json                     every case's rows: the whole export's inventory

A row: case, object (``RTSTRUCT <hash>`` / ``SEG <hash>``: the label object, named by a hash of its
scan key, never by its path, which may hold a patient's name), ROI or segment number, name,
interpreted type, colour, voxel count, volume in mL, empty, mask file, and the label it was mapped
to, or why not (``note``). Structures overlap (a GTV inside a PTV inside BODY), so each keeps its
own mask; label maps are made from these masks, which is also how a rerun with a new dataset
description relabels without reading the DICOM again.

Each label object is parsed once and each structure rasterised once per run.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from pipeline import atomic
from pipeline.errors import CtsegError, InputError
from pipeline.geometry import Grid, Volume, voxel_volume_ml

log = logging.getLogger("ctseg")

FOLDER = "structures"
CASE_FILE = "structures.json"
CSV_FILE = "structures.csv"
JSON_FILE = "structures.json"
FORMAT = "ctseg-structures/1"


@dataclass
class LabelObject:
    """An RTSTRUCT or SEG file that belongs to a case's image, named by ``object_id`` (no path)."""

    path: Path
    modality: str       # RTSTRUCT or SEG
    object_id: str      # e.g. "RTSTRUCT 1a2b3c4d5e"


@dataclass
class Structure:
    """One row of the inventory (see the module docstring)."""

    case: str
    object: str
    kind: str
    number: int
    name: str
    interpreted_type: str = ""
    color: str = ""              # "r g b", empty when the file gives none
    voxels: int = 0
    volume_ml: float = 0.0
    empty: bool = True
    mask: str = ""               # relative to the ingest folder; empty when the structure could not be read
    label: str = ""              # the label it was mapped to
    note: str = ""               # why it was not mapped, and any problem reading it
    problem: str = ""            # what went wrong reading or placing it (kept when the case is relabelled)

    def to_json(self) -> dict:
        return asdict(self)


COLUMNS = [f.name for f in fields(Structure)]


def read_structures(case_id: str, objects: list[LabelObject], grid: Grid, warnings: list[str],
                    parsed: dict[Path, Callable[[], list]] | None = None) -> Iterator[tuple[Structure, np.ndarray]]:
    """Every structure of ``objects`` rasterised on ``grid``, one at a time (a structure set may hold 60 ROIs).

    A label object that cannot be read, or a structure that cannot be placed on the image, becomes
    a row with an empty mask and the reason in ``problem`` (and in ``warnings``): the image is still
    ingested. ``parsed``: per RTSTRUCT path, a call returning what ``read_rtstruct`` returns (or raising what it
    raises) when the file was parsed ahead in another thread; the others are parsed here.
    """
    parsed = parsed or {}
    voxel_ml = voxel_volume_ml(grid)
    for obj in objects:
        try:
            items = _read_object(obj, grid, parsed.get(obj.path))
        except (CtsegError, OSError, ValueError, KeyError, AttributeError, IndexError) as exc:
            reason = f"{obj.object_id} could not be read ({exc})"
            warnings.append(f"{reason}; its structures are not in the inventory")
            yield (Structure(case_id, obj.object_id, obj.modality, 0, "", note=reason, problem=reason),
                   np.zeros(grid.shape, dtype=bool))
            continue
        for number, name, kind_type, color, mask, problem in items:
            voxels = int(np.count_nonzero(mask))
            row = Structure(case_id, obj.object_id, obj.modality, number, name, kind_type,
                            " ".join(str(int(v)) for v in color) if color else "", voxels,
                            round(voxels * voxel_ml, 4), voxels == 0, note=problem, problem=problem)
            if problem:
                warnings.append(f"{obj.object_id} structure '{name}': {problem}")
            yield row, mask


class PackedMasks:
    """The masks of a case kept bit-packed in memory (8 voxels a byte) until the label map needs them."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)
        self.packed: list[np.ndarray] = []

    def add(self, mask: np.ndarray) -> None:
        self.packed.append(np.packbits(np.asarray(mask, dtype=bool).ravel()))

    def __call__(self, index: int) -> np.ndarray:
        count = int(np.prod(self.shape))
        return np.unpackbits(self.packed[index], count=count).astype(bool).reshape(self.shape)


def _read_object(obj: LabelObject, grid: Grid, parsed: Callable[[], list] | None = None):
    if obj.modality == "RTSTRUCT":
        from pipeline.labels.rtstruct import rasterise_contours, read_rtstruct

        rois = parsed() if parsed is not None else read_rtstruct(obj.path)  # parsed once, here or ahead
        return _rtstruct_items(rois, obj, grid, rasterise_contours)
    if obj.modality == "SEG":
        from pipeline.labels.seg import read_seg_segments

        return [(s.number, s.label, s.property_type, s.color, s.mask, "") for s in read_seg_segments(obj.path, grid)]
    raise InputError(f"{obj.object_id} must be an RTSTRUCT or a DICOM SEG, got modality '{obj.modality}'.")


def _rtstruct_items(rois, obj: LabelObject, grid: Grid, rasterise):
    for roi in rois:  # each ROI rasterised once, when the caller asks for it
        problem = ""
        try:
            mask = rasterise(roi.contours, grid, f"{obj.object_id} ROI '{roi.name}'")
        except InputError as exc:
            mask, problem = np.zeros(grid.shape, dtype=bool), f"could not be placed on the image: {exc}"
        if not roi.contours and not problem:
            problem = "has no closed contours"
        yield roi.number, roi.name, roi.interpreted_type, roi.color, mask, problem


def mask_name(structure: Structure, index: int) -> str:
    from pipeline.stage import safe_name

    return f"{index:02d}_{structure.number}_{safe_name(structure.name, 40)}.nii.gz"


def write_case_structures(out: Path, case_id: str, found: Iterable[tuple[Structure, np.ndarray]], grid: Grid,
                          compresslevel: int = 1) -> tuple[list[Structure], PackedMasks]:
    """Write each structure's mask as it comes and the case's inventory; returns the rows and their masks."""
    from pipeline.volume_io import save_nifti

    rows, masks = [], PackedMasks(grid.shape)
    for index, (row, mask) in enumerate(found, start=1):
        if row.name or row.number:
            relative = f"{FOLDER}/{case_id}/{mask_name(row, index)}"
            save_nifti(Volume(mask.astype(np.uint8), grid.affine), Path(out) / relative, compresslevel=compresslevel)
            row.mask = relative
        rows.append(row)
        masks.add(mask)
    write_case_inventory(out, case_id, rows)
    return rows, masks


def write_case_inventory(out: Path, case_id: str, rows: list[Structure]) -> Path:
    path = Path(out) / FOLDER / case_id / CASE_FILE
    atomic.write_json(path, {"format": FORMAT, "case": case_id, "structures": [r.to_json() for r in rows]})
    return path


def read_case_inventory(out: Path, case_id: str) -> list[Structure] | None:
    """The case's inventory from an earlier run, or None when it is missing or a mask file is gone."""
    path = Path(out) / FOLDER / case_id / CASE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = [Structure(**item) for item in data.get("structures", [])]
    except (OSError, json.JSONDecodeError, TypeError):
        return None
    if any(row.mask and not (Path(out) / row.mask).is_file() for row in rows):
        return None
    return rows


def load_mask(out: Path, row: Structure, grid: Grid) -> np.ndarray:
    """The boolean mask of ``row`` written by an earlier run; it must lie on ``grid``."""
    from pipeline.volume_io import load_volume

    if not row.mask:
        return np.zeros(grid.shape, dtype=bool)
    volume = load_volume(Path(out) / row.mask)
    difference = volume.grid.difference(grid, atol_mm=1e-3)
    if difference is not None:
        raise InputError(f"structure mask {row.mask} must lie on its image's grid, got {difference}. Rerun "
                         f"ingest with --force to rebuild the masks from the DICOM.")
    return np.asarray(volume.array) != 0


def write_inventory(out: Path, rows: list[Structure]) -> None:
    """``structures.csv`` and ``structures.json`` of the whole run (rows sorted by case, object, number)."""
    rows = sorted(rows, key=lambda r: (r.case, r.object, r.number))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow(row.to_json())
    atomic.write_text(Path(out) / CSV_FILE, buffer.getvalue())
    atomic.write_json(Path(out) / JSON_FILE, {"format": FORMAT, "structures": [r.to_json() for r in rows]})
