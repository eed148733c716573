"""Loading NIfTI/NRRD label maps and checking that they lie exactly on their image's grid."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline.errors import InputError
from pipeline.geometry import Grid, canonical_grid, resample_to_grid
from pipeline.volume_io import load_volume

log = logging.getLogger("ctseg.labels")


def load_label_map(path: Path, image_grid: Grid, tolerance_mm: float = 1e-3, image_path: Path | None = None
                   ) -> np.ndarray:
    """The label map at ``path`` as a uint8/uint16 array on ``image_grid``.

    A label stored with the same voxels in another axis order (e.g. RAS-reoriented) is reordered
    exactly; any other geometry difference beyond ``tolerance_mm`` raises InputError naming both
    files. Values must be non-negative integers.
    """
    path = Path(path)
    label = load_volume(path)
    image_name = str(image_path) if image_path is not None else "its image"
    difference = label.grid.difference(image_grid, atol_mm=tolerance_mm)
    array = np.asarray(label.array)
    if difference is not None:
        if canonical_grid(label.grid).difference(canonical_grid(image_grid), atol_mm=tolerance_mm) is not None:
            raise InputError(f"label map {path} must lie on the grid of {image_name}, got {difference} "
                             f"(label vs image). Resample the label onto the image with nearest-neighbour "
                             f"interpolation, or pair it with the image it was drawn on.")
        log.info("%s stores the image's voxels in another axis order; reordering it exactly", path.name)
        array = resample_to_grid(array, label.grid, image_grid, order=0)
    return _integer_labels(array, path)


def _integer_labels(array: np.ndarray, path: Path) -> np.ndarray:
    if array.dtype == bool:
        return array.astype(np.uint8)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InputError(f"label map {path} must hold integer label values, got dtype {array.dtype}. "
                         f"Save the label map as an integer image.")
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            raise InputError(f"label map {path} must hold integer label values, got {int((~finite).sum())} "
                             f"NaN/inf voxels. Fix the file (it may be a probability map, not a label map).")
        fractional = array != np.rint(array)
        if fractional.any():
            example = float(array[fractional].flat[0])
            raise InputError(f"label map {path} must hold integer label values, got {int(fractional.sum())} "
                             f"non-integer voxels (e.g. {example:g}). It may be a probability map or was "
                             f"resampled with linear interpolation; threshold it or re-export with nearest.")
    low, high = (array.min(), array.max()) if array.size else (0, 0)
    if low < 0 or high > 65535:
        raise InputError(f"label map {path} must hold label values in [0, 65535], got [{low:g}, {high:g}]. "
                         f"Remap the labels to small non-negative integers.")
    return array.astype(np.uint8 if high <= 255 else np.uint16)
