"""Plausibility checks: real CTs pass, display-value and broken volumes are flagged or refused."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.dicom.plausibility import PlausibilityOptions, check_plausibility
from pipeline.errors import InputError
from pipeline.geometry import Volume
from pipeline.volume_io import load_volume


def _ct(shape=(64, 64, 20), spacing=(0.8, 0.8, 2.0)) -> Volume:
    rng = np.random.default_rng(0)
    array = rng.normal(40, 20, shape).astype(np.float32)
    array[:5] = -1000.0  # some air
    return Volume(array, np.diag([*spacing, 1.0]))


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["sts_ct/STS_002/reference/CT_image.nii.gz", "pyradiomics/lung1_image.nrrd",
                                  "totalseg/example_ct.nii.gz",
                                  "dcm_qa_ct/ref/1A_TRAUMA_PLAIN_HEAD_DM_Head_201.nii.gz"])
def test_real_ct_volumes_pass(shared_data, name):
    assert check_plausibility(load_volume(shared_data / name), name) == []


@pytest.mark.shared_data
def test_uint8_display_volume_is_flagged_and_can_be_refused(shared_data):
    volume = load_volume(shared_data / "oblique" / "CT_pitch.nii.gz")
    warnings = check_plausibility(volume, "CT_pitch.nii.gz")
    assert warnings == ["CT_pitch.nii.gz: intensities are uint8 (0 to 255), display values rather than HU"]
    with pytest.raises(InputError, match=r"CT_pitch.nii.gz must look like a CT volume in HU on a valid grid, got: "
                                         r"intensities are uint8"):
        check_plausibility(volume, "CT_pitch.nii.gz", PlausibilityOptions(refuse=True))


def test_synthetic_ct_passes():
    assert check_plausibility(_ct(), "case") == []


def test_display_range_without_air_is_flagged():
    volume = _ct()
    volume.array[:] = np.clip(volume.array, 0, 255)
    volume.array[0, 0, 0] = 255
    assert check_plausibility(volume, "case") == ["case: intensities lie in 0 to 255 with no air: display values "
                                                  "rather than HU"]


def test_missing_rescale_is_flagged():
    volume = _ct()
    volume.array += 1024  # stored values of an unsigned series, intercept not applied
    (warning,) = check_plausibility(volume, "case")
    assert "intensities may not be HU (missing rescale?)" in warning


def test_nan_and_infinite_voxels_are_counted():
    volume = _ct()
    volume.array[0, 0, :3] = np.nan
    volume.array[1, 1, 0] = np.inf
    (warning,) = check_plausibility(volume, "case")
    assert warning == "case: 4 voxels are not finite (3 NaN, 1 infinite)"


def test_sheared_grid_is_flagged():
    volume = _ct()
    volume.affine[:3, 2] = [0.0, 0.5, 2.0]  # k axis leans 14° towards j
    (warning,) = check_plausibility(volume, "case")
    assert "direction cosines are not orthonormal" in warning


def test_few_slices_and_tiny_field_of_view_are_flagged():
    warnings = check_plausibility(_ct(shape=(20, 20, 2), spacing=(0.5, 0.5, 1.0)), "case")
    assert warnings == ["case: 2 slice(s) < min_slices 3",
                        "case: tiny field of view: 10.0 x 10.0 mm in-plane (< 30 mm)"]
    assert check_plausibility(_ct(shape=(20, 20, 2), spacing=(0.5, 0.5, 1.0)), "case",
                              PlausibilityOptions(min_slices=1, min_field_of_view_mm=5)) == []


def test_training_volume_refuses_nan_shear_and_few_slices_unless_allowed():
    from pipeline.dicom.plausibility import check_training_volume

    nan = _ct()
    nan.array[0, 0, 0] = np.nan
    sheared = _ct()
    sheared.affine[:3, 2] = [0.0, 0.5, 2.0]
    single = _ct(shape=(64, 64, 1))
    for volume, setting in ((nan, "allow_non_finite"), (sheared, "allow_sheared"), (single, "allow_few_slices")):
        with pytest.raises(InputError, match=rf"case must be a finite CT volume .* set ingest.plausibility.{setting}"):
            check_training_volume(volume, "case")
        warnings = check_training_volume(volume, "case", PlausibilityOptions(**{setting: True}))
        assert len(warnings) == 1  # accepted, with the problem named
    assert check_training_volume(_ct(), "case") == []
