"""Synthetic CT phantoms: world-space anatomy, left/right, HU, grids and the DICOM/NIfTI export."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy import ndimage

from pipeline.errors import ConfigError
from pipeline.labels.rtstruct import rasterise_rtstruct
from pipeline.synthetic.dicom import SeriesWriteOptions, tilted_affine
from pipeline.synthetic.phantoms import (
    LABEL_NAMES,
    PhantomOptions,
    label_centroid_ras,
    make_phantom,
    write_phantom_export,
)
from pipeline.volume_io import load_volume, sitk_to_volume

# the slices cover at least the in-plane field of view (36 × 3 mm ≥ 64 × 1.6 mm), so organs fit in any direction
SMALL = dict(shape=64, slices=36, inplane_spacing_min=1.6, inplane_spacing_max=2.2, slice_spacing_min=3.0,
             slice_spacing_max=4.0)


def small(seed, **overrides):
    return make_phantom(seed, PhantomOptions(**{**SMALL, **overrides}))


@pytest.mark.parametrize("seed", [0, 7])
def test_same_seed_keeps_organs_in_place_whatever_the_grid(seed):
    reference = small(seed, noise_hu=0)
    for variant in (dict(feet_first=True), dict(direction="oblique"), dict(direction="random", feet_first=True)):
        other = small(seed, noise_hu=0, **variant)
        assert other.image.grid.difference(reference.image.grid) is not None  # a genuinely different grid
        voxel = float(np.linalg.norm(reference.image.grid.spacing))
        for value in LABEL_NAMES:
            shift = np.linalg.norm(label_centroid_ras(other.label, value) - label_centroid_ras(reference.label, value))
            assert shift < voxel, (variant, value, shift)


@pytest.mark.parametrize("seed", range(4))
def test_liver_is_on_the_patients_right_and_left_kidney_higher(seed):
    phantom = small(seed, noise_hu=0)
    liver = label_centroid_ras(phantom.label, 1)
    spleen = label_centroid_ras(phantom.label, 2)
    # RAS+: +x points to the patient's right, so the liver (right) has the larger x
    assert liver[0] > spleen[0] + 10
    # identity direction is DICOM axial: i runs towards the patient's left, so the liver has the smaller i
    index = {v: np.argwhere(phantom.label.array == v).mean(axis=0) for v in (1, 2)}
    assert index[1][0] < index[2][0]
    components, count = ndimage.label(phantom.label.array == 3)
    assert count == 2
    kidneys = [phantom.label.grid.world(np.argwhere(components == n).mean(axis=0)) for n in (1, 2)]
    right, left = sorted(kidneys, key=lambda c: -c[0])
    assert left[2] > right[2]  # the left kidney sits higher (superior = +z)
    assert right[0] > phantom.anatomy.centre_ras[0] > left[0]  # one kidney on each side of the midline


def test_hu_values_look_like_ct():
    phantom = small(3)
    image, label = phantom.image.array, phantom.label.array
    assert image.dtype == np.int16 and label.dtype == np.uint8
    assert phantom.label.grid.difference(phantom.image.grid) is None
    medians = {v: float(np.median(image[ndimage.binary_erosion(label == v)])) for v in (1, 2, 3)}
    assert 85 < medians[1] < 115 and 125 < medians[2] < 155 and 140 < medians[3] < 220
    assert medians[2] - medians[1] > 25
    assert float(np.median(image[0, 0, :])) < -950  # air in the corner
    assert (image > 400).sum() > 100  # spine and ribs
    assert ((image < -700) & (image > -900)).sum() > 1000  # lungs
    noise = np.std(image[:4, :4, :].astype(float))
    assert 10 < noise < 25
    assert set(np.unique(label).tolist()) == {0, 1, 2, 3}


def test_phantoms_are_deterministic_and_vary_with_the_seed():
    a, b, c = small(5), small(5), small(6)
    np.testing.assert_array_equal(a.image.array, b.image.array)
    np.testing.assert_array_equal(a.label.array, b.label.array)
    assert not np.array_equal(a.label.array, c.label.array)
    assert a.image.grid.difference(c.image.grid) is not None


def test_grid_respects_the_options():
    options = PhantomOptions(**SMALL)
    for seed in range(5):
        grid = make_phantom(seed, options).image.grid
        assert grid.shape == (64, 64, 36)
        assert grid.spacing[0] == pytest.approx(grid.spacing[1])
        assert 1.6 <= grid.spacing[0] <= 2.2
        assert 3.0 <= grid.spacing[2] <= 4.0
        np.testing.assert_allclose(grid.direction[:, :2], [[-1, 0], [0, -1], [0, 0]], atol=1e-12)
    feet_first = small(0, feet_first=True).image.grid
    assert feet_first.direction[2, 2] == pytest.approx(-1.0)


@pytest.mark.parametrize("seed", range(3))
def test_organs_never_touch_the_border_in_any_direction(seed):
    label = small(seed, direction="random", noise_hu=0).label.array
    for axis in range(3):
        assert not np.take(label, [0, -1], axis=axis).any()


def test_thin_slab_keeps_the_anatomy_size_and_place():
    full = small(9, noise_hu=0)
    slab = small(9, noise_hu=0, slices=8)  # 24–32 mm of slices through the middle of the abdomen
    assert slab.anatomy.scale_mm == full.anatomy.scale_mm
    assert slab.image.grid.shape == (64, 64, 8)
    centre = slab.image.grid.world(np.array(slab.image.grid.shape) / 2 - 0.5)
    np.testing.assert_allclose(centre, full.image.grid.world(np.array(full.image.grid.shape) / 2 - 0.5), atol=1e-6)
    assert (slab.label.array == 1).any()  # the liver crosses the middle of the scan


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="direction must be identity, oblique or random"):
        make_phantom(0, PhantomOptions(**SMALL, direction="sideways"))
    with pytest.raises(ConfigError, match="slice_spacing_min must be positive and at most slice_spacing_max"):
        make_phantom(0, PhantomOptions(**{**SMALL, "slice_spacing_min": 5.0, "slice_spacing_max": 1.0}))


def test_export_writes_dicom_nifti_and_rtstruct(tmp_path):
    cases = [small(1), small(2, feet_first=True)]
    results = write_phantom_export(tmp_path, cases, rtstruct=True)
    assert [r["case_id"] for r in results] == ["phantom_000", "phantom_001"]
    studies = set()
    for result, phantom in zip(results, cases):
        files = result["dicom_files"]
        assert files[0].relative_to(tmp_path).parts[:3] == (result["case_id"], "ST0001", "SE0001")
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
        assert str(header.PatientName).startswith("PHANTOM^") and header.PatientID == result["patient_id"]
        assert header.PatientPosition == ("FFS" if phantom.options.feet_first else "HFS")
        studies.add(header.StudyInstanceUID)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(f) for f in files])
        dicom = sitk_to_volume(reader.Execute())
        nifti_image = load_volume(result["image_nifti"])
        nifti_label = load_volume(result["label_nifti"])
        assert dicom.grid.difference(nifti_image.grid) is None
        assert nifti_label.grid.difference(nifti_image.grid) is None
        np.testing.assert_array_equal(dicom.array, nifti_image.array)
        np.testing.assert_array_equal(nifti_label.array, phantom.label.array)
        masks = rasterise_rtstruct(result["rtstruct"], nifti_image.grid)
        assert sorted(masks) == sorted(LABEL_NAMES.values())
        for value, name in LABEL_NAMES.items():
            np.testing.assert_array_equal(masks[name], phantom.label.array == value)
    assert len(studies) == 2


def test_export_rejects_unsafe_case_ids(tmp_path):
    with pytest.raises(ConfigError, match="plain folder names"):
        write_phantom_export(tmp_path, [small(0)], case_ids=["../escape"], nifti=False)


def test_tilted_export_shows_the_same_anatomy(tmp_path):
    phantom = small(4, noise_hu=0)
    [result] = write_phantom_export(tmp_path, [phantom], series_options=SeriesWriteOptions(gantry_tilt_deg=15.0),
                                    nifti=False, rtstruct=True)
    header = pydicom.dcmread(result["dicom_files"][0], stop_before_pixels=True)
    assert float(header.GantryDetectorTilt) == 15.0
    tilted = tilted_affine(phantom.image.affine, 15.0)
    _, label = phantom.render(tilted, phantom.image.array.shape)
    voxel = float(np.linalg.norm(phantom.image.grid.spacing))
    for value in LABEL_NAMES:
        world = (tilted @ np.r_[np.argwhere(label.array == value).mean(axis=0), 1.0])[:3]
        assert np.linalg.norm(world - label_centroid_ras(phantom.label, value)) < voxel
    # the tilted slices really differ from the untilted ones
    assert not np.array_equal(label.array, phantom.label.array)
