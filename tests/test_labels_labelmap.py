"""NIfTI/NRRD label maps: exact grid checks against the image, exact reordering, integer values."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.errors import InputError
from pipeline.geometry import Volume, canonical_grid, resample_to_grid
from pipeline.labels.labelmap import load_label_map
from pipeline.synthetic.phantoms import PhantomOptions, make_phantom
from pipeline.volume_io import save_nifti, sitk_to_volume

SMALL = dict(shape=40, slices=10, inplane_spacing_min=2.5, inplane_spacing_max=3.0, slice_spacing_min=4.0,
             slice_spacing_max=5.0)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(8, PhantomOptions(**SMALL, feet_first=True))


@pytest.mark.shared_data
def test_dcmqi_nrrd_label_loads_on_its_feet_first_ct(shared_data):
    folder = shared_data / "dcmqi"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder / "ct-3slice")))
    image = sitk_to_volume(reader.Execute())
    label = load_label_map(folder / "liver_spine_gapped_seg.nrrd", image.grid)
    assert label.dtype == np.uint8 and set(np.unique(label).tolist()) == {0, 1, 5}
    instance_order = image.grid.affine.copy()
    instance_order[:3, 2] *= -1
    instance_order[:3, 3] = image.grid.world([0, 0, 2])
    flipped = load_label_map(folder / "liver_spine_gapped_seg.nrrd", Volume(label, instance_order).grid)
    np.testing.assert_array_equal(flipped, label[:, :, ::-1])


def test_label_on_the_image_grid_loads_unchanged(tmp_path, phantom):
    path = save_nifti(phantom.label, tmp_path / "label.nii.gz")
    np.testing.assert_array_equal(load_label_map(path, phantom.image.grid), phantom.label.array)


def test_reoriented_label_is_put_back_exactly(tmp_path, phantom):
    canonical = canonical_grid(phantom.label.grid)
    assert canonical.difference(phantom.label.grid) is not None
    reoriented = resample_to_grid(phantom.label.array, phantom.label.grid, canonical)
    path = save_nifti(Volume(reoriented, canonical.affine), tmp_path / "ras_label.nii.gz")
    np.testing.assert_array_equal(load_label_map(path, phantom.image.grid), phantom.label.array)


def test_mismatched_grid_names_both_files_and_the_difference(tmp_path, phantom):
    shifted = phantom.label.affine.copy()
    shifted[:3, 3] += [0.0, 0.0, 1.5]
    path = save_nifti(Volume(phantom.label.array, shifted), tmp_path / "label.nii.gz")
    with pytest.raises(InputError) as error:
        load_label_map(path, phantom.image.grid, image_path=tmp_path / "image.nii.gz")
    message = str(error.value)
    assert "label.nii.gz" in message and "image.nii.gz" in message and "origin" in message
    smaller = Volume(phantom.label.array[:, :, :-1], phantom.label.affine)
    path = save_nifti(smaller, tmp_path / "short.nii.gz")
    with pytest.raises(InputError, match=r"shape \(40, 40, 9\) vs \(40, 40, 10\)"):
        load_label_map(path, phantom.image.grid)
    # within tolerance passes
    nudged = phantom.label.affine.copy()
    nudged[:3, 3] += 1e-4
    path = save_nifti(Volume(phantom.label.array, nudged), tmp_path / "nudged.nii.gz")
    np.testing.assert_array_equal(load_label_map(path, phantom.image.grid), phantom.label.array)


def test_label_values_must_be_non_negative_integers(tmp_path, phantom):
    grid = phantom.image.grid
    as_float = phantom.label.array.astype(np.float32)
    path = save_nifti(Volume(as_float, grid.affine), tmp_path / "float_ok.nii.gz")
    loaded = load_label_map(path, grid)
    assert loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded, phantom.label.array)
    as_float[0, 0, 0] = 0.5
    path = save_nifti(Volume(as_float, grid.affine), tmp_path / "prob.nii.gz")
    with pytest.raises(InputError, match=r"non-integer voxels \(e.g. 0.5\)"):
        load_label_map(path, grid)
    negative = phantom.label.array.astype(np.int16)
    negative[1, 1, 1] = -1
    path = save_nifti(Volume(negative, grid.affine), tmp_path / "neg.nii.gz")
    with pytest.raises(InputError, match=r"label values in \[0, 65535\], got \[-1"):
        load_label_map(path, grid)
    big = phantom.label.array.astype(np.int32) * 300
    path = save_nifti(Volume(big, grid.affine), tmp_path / "big.nii.gz")
    assert load_label_map(path, grid).dtype == np.uint16
