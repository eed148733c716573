"""DICOM phantom series for the scan, select and assemble tests: an asymmetric volume and its written series."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from pipeline.geometry import Volume
from pipeline.synthetic.dicom import SeriesWriteOptions, write_ct_series

SHAPE = (40, 36, 10)  # JPEG 2000 needs at least 32×32 pixels


def phantom_values(i, j, k):
    return 3 * np.asarray(i) + 20 * np.asarray(j) + 100 * np.asarray(k) - 900


def phantom_array(shape=SHAPE) -> np.ndarray:
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return phantom_values(i, j, k).astype(np.int16)


def phantom_affine(spacing=(0.7, 0.8, 2.0), origin=(10.0, 20.0, -30.0), direction=None) -> np.ndarray:
    affine = np.eye(4)
    direction = np.diag([-1.0, -1.0, 1.0]) if direction is None else np.asarray(direction, dtype=float)
    affine[:3, :3] = direction * np.asarray(spacing)[None, :]
    affine[:3, 3] = origin
    return affine


def phantom_volume(shape=SHAPE, **affine_args) -> Volume:
    return Volume(phantom_array(shape), phantom_affine(**affine_args))


def write_phantom(folder: Path, volume: Volume | None = None, **options) -> list[Path]:
    """Write a phantom series with pipeline.synthetic.dicom (options: SeriesWriteOptions fields)."""
    return write_ct_series(volume or phantom_volume(), Path(folder), SeriesWriteOptions(**options))


def rewrite(path: Path, **attributes) -> None:
    """Change attributes of one written file in place (for defects the writer has no option for)."""
    dataset = pydicom.dcmread(path)
    for keyword, value in attributes.items():
        setattr(dataset, keyword, value)
    dataset.save_as(path)
