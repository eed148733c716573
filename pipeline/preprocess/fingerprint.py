"""Reading one training case, checking its label, and its contribution to the dataset fingerprint."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import CaseError, InputError
from pipeline.geometry import Volume, canonical_grid
from pipeline.training_fingerprint import case_statistics
from pipeline.volume_io import load_volume


@dataclass
class TrainingCase:
    """One manifest entry with role 'train' and a label, with absolute paths."""

    id: str
    image: Path
    label: Path


def source_identity(path: Path) -> dict:
    """What identifies a source file's content cheaply: its path, size and modification time."""
    stat = Path(path).stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def load_case(case: TrainingCase, allowed_values: set[int]) -> tuple[Volume, Volume]:
    """Load image and label and check them; a CaseError naming the case says what to fix."""
    try:
        image = load_volume(case.image)
        label = load_volume(case.label)
    except InputError as exc:
        raise CaseError(case.id, str(exc)) from exc
    difference = label.grid.difference(image.grid)
    if difference:
        raise CaseError(case.id, f"label {case.label.name} must lie on its image's grid, got {difference}. "
                                 f"Re-run ingest, or resample the label onto the image (nearest neighbour).")
    values = label.array
    if not np.issubdtype(values.dtype, np.integer):
        rounded = np.rint(values)
        if not np.array_equal(rounded, values):
            raise CaseError(case.id, f"label {case.label.name} must hold whole-number label values, got "
                                     f"fractional values (dtype {values.dtype}). Save it as an integer label map.")
        values = rounded.astype(np.int64)
        label = Volume(values, label.affine)
    present = np.unique(values)
    unknown = sorted(int(v) for v in present if int(v) not in allowed_values)
    if unknown:
        raise CaseError(case.id, f"label {case.label.name} values must be among those of the dataset description "
                                 f"{sorted(allowed_values)}, got {unknown}. Add them to the labels of "
                                 f"dataset.yaml, or fix the label file.")
    if not (present != 0).any():
        raise CaseError(case.id, f"label {case.label.name} must contain at least one labelled voxel, got an empty "
                                 f"label map. Remove the case's label (it then counts as unlabelled) or fix it.")
    return image, label


def case_fingerprint(case: TrainingCase, image: Volume, label: Volume, body_threshold_hu: float,
                     samples: int) -> tuple[dict, np.ndarray]:
    """Spacing, size and body extent on canonical axes, label voxel counts, and sampled foreground HU."""
    grid = image.grid
    canonical = canonical_grid(grid)
    axis_for = np.argmax(np.abs(grid.direction), axis=1)  # source index axis closest to R, A, S
    extent = np.asarray(canonical.shape) * canonical.spacing
    body = image.array > body_threshold_hu
    body_extent = extent.copy()
    if body.any() and len(set(axis_for.tolist())) == 3:
        for world_axis, index_axis in enumerate(axis_for):
            other = tuple(a for a in range(3) if a != index_axis)
            present = np.flatnonzero(body.any(axis=other))
            body_extent[world_axis] = (present[-1] - present[0] + 1) * grid.spacing[index_axis]
    foreground = np.flatnonzero(label.array.ravel() != 0)
    seed = int.from_bytes(hashlib.sha256(case.id.encode()).digest()[:4], "little")
    rng = np.random.default_rng(seed)
    chosen = foreground if foreground.size <= samples else rng.choice(foreground, samples, replace=False)
    hu = image.array.ravel()[np.sort(chosen)].astype(np.float32)
    values, counts = np.unique(label.array, return_counts=True)
    record = {
        "id": case.id,
        "spacing": [round(float(s), 6) for s in canonical.spacing],
        "shape": list(canonical.shape),
        "extent_mm": [round(float(e), 3) for e in extent],
        "body_extent_mm": [round(float(e), 3) for e in body_extent],
        "label_voxels": {str(int(v)): int(c) for v, c in zip(values, counts)},
        "hu_min": float(image.array.min()),
        "hu_max": float(image.array.max()),
        # what the model folder's training_fingerprint.json pools (label volumes, components, body HU histogram)
        "training_statistics": case_statistics(image.array, label.array, grid,
                                               [int(v) for v in values if int(v) != 0], body_threshold_hu),
    }
    return record, hu
