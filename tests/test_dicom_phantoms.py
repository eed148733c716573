"""Synthetic DICOM phantoms shared by the tests/test_dicom_*.py files, plus checks of the phantoms.

The phantom's HU value encodes its voxel index (``3 i + 20 j + 100 k − 900``), so a flip, a
transpose, a wrong slice order or a misplaced slice changes values, and linear interpolation along
any axis reproduces the formula exactly (used by the tilt and missing-slice tests).
"""
from __future__ import annotations

import numpy as np
import pydicom

from helpers.dicom_phantoms import (
    phantom_array,
    phantom_volume,
    write_phantom,
)


def test_phantom_is_asymmetric():
    array = phantom_array()
    for axis in range(3):
        assert not np.array_equal(array, np.flip(array, axis=axis))
    assert not np.array_equal(array[:, :, 0], array[:, :, 1])


def test_written_phantom_has_the_geometry_the_writer_documents(tmp_path):
    volume = phantom_volume()
    paths = write_phantom(tmp_path, volume)
    first = pydicom.dcmread(paths[0])
    # pixel data of slice 0 is array[:, :, 0].T, IPP is the world point of voxel (0, 0, 0) in LPS
    assert np.array_equal(first.pixel_array * float(first.RescaleSlope) + float(first.RescaleIntercept),
                          volume.array[:, :, 0].T)
    assert np.allclose([float(v) for v in first.ImagePositionPatient], [-10.0, -20.0, -30.0])
