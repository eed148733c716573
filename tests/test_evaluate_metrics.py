"""Hand-computed checks of pipeline.evaluate.metrics: cubes, spheres, anisotropy, empties, components, cropping."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.errors import CaseError, ConfigError, InputError
from pipeline.evaluate.grids import check_same_grid
from pipeline.evaluate.metrics import (
    ROW_KEYS,
    MetricOptions,
    case_metrics,
    class_boxes,
    mask_metrics,
    unmatched_components,
)
from pipeline.geometry import Grid, affine_from_parts

CLASSES = {1: "organ"}


def cube_pair(shift_axis: int, shift: int = 2, shape=(26, 22, 20), start=(4, 5, 3), size=10):
    """Reference: a size³ cube at ``start``; prediction: the same cube moved ``shift`` voxels along one axis."""
    ref = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    box = tuple(slice(s, s + size) for s in start)
    ref[box] = 1
    moved = list(start)
    moved[shift_axis] += shift
    pred[tuple(slice(s, s + size) for s in moved)] = 1
    return pred, ref


def one_row(pred, ref, spacing=(1.0, 1.0, 1.0), **options):
    rows = case_metrics(pred, ref, spacing, CLASSES, MetricOptions(**options), case_id="case-1")
    assert len(rows) == 1
    return rows[0]


# --- shifted cubes: 10³ voxels moved by 2 along one axis -----------------------------------------------------
# Overlap 8·10·10 = 800 voxels, so Dice = 2·800 / 2000 = 0.8. Each cube has 10³ − 8³ = 488 edge voxels.
# Distances from the moved cube's edge to the reference edge: 0 for the 8 rings shared by both side walls
# (8 × 36 = 288 voxels), 2 voxels for the far face (100) and the inner 6×6 of the near face (36), 1 for the
# rest. The same holds in the other direction, so HD95 = 2 voxels (136/488 = 28% of distances are 2) and
# surface Dice = 288/488 at tolerance < 1 voxel, 352/488 at 1 voxel, 1 at >= 2 voxels.

@pytest.mark.parametrize("axis", [0, 1, 2])
def test_shifted_cube_isotropic(axis):
    pred, ref = cube_pair(axis)
    row = one_row(pred, ref)
    assert row["dice"] == pytest.approx(0.8, abs=1e-7)
    assert row["hd95_mm"] == pytest.approx(2.0, abs=1e-6)
    assert row["flags"] == ""
    assert (row["fp_components"], row["fn_components"]) == (0, 0)


@pytest.mark.parametrize("tolerance, expected", [(0.5, 288 / 488), (1.0, 352 / 488), (1.9, 352 / 488),
                                                 (2.0, 1.0), (5.0, 1.0)])
def test_shifted_cube_surface_dice_tolerances(tolerance, expected):
    pred, ref = cube_pair(0)
    row = one_row(pred, ref, surface_tolerance_mm=tolerance)
    assert row["surface_dice"] == pytest.approx(expected, abs=1e-6)


def test_shifted_cube_plain_hausdorff_with_percentile_100():
    pred, ref = cube_pair(1, shift=3)
    row = one_row(pred, ref, hd_percentile=100.0)
    assert row["hd95_mm"] == pytest.approx(3.0, abs=1e-6)
    assert row["dice"] == pytest.approx(2 * 700 / 2000, abs=1e-7)


def test_anisotropic_spacing_scales_distances_per_axis():
    spacing = (0.8, 1.0, 3.0)
    # the same 2-voxel shift is 6 mm along the 3 mm axis, 1.6 mm along the 0.8 mm axis
    pred, ref = cube_pair(2)
    row = one_row(pred, ref, spacing)
    assert row["hd95_mm"] == pytest.approx(6.0, abs=1e-5)
    assert row["dice"] == pytest.approx(0.8, abs=1e-7)
    pred, ref = cube_pair(0)
    assert one_row(pred, ref, spacing)["hd95_mm"] == pytest.approx(1.6, abs=1e-5)


def test_anisotropic_surface_dice_below_and_above_the_shift():
    # shift 2 voxels along the 3 mm axis: only the far face (100 edge voxels per direction) lies 6 mm away;
    # the near face's inner voxels are at most 4 mm (side walls at 1 mm spacing) from the reference edge.
    pred, ref = cube_pair(2)
    spacing = (1.0, 1.0, 3.0)
    assert one_row(pred, ref, spacing, surface_tolerance_mm=5.0)["surface_dice"] == pytest.approx(388 / 488, abs=1e-6)
    assert one_row(pred, ref, spacing, surface_tolerance_mm=6.0)["surface_dice"] == pytest.approx(1.0, abs=1e-7)


# --- spheres with known distances -----------------------------------------------------------------------------

def sphere(shape, centre_mm, radius_mm, spacing):
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre_mm)) <= radius_mm ** 2


def test_concentric_spheres_have_the_radius_difference_as_distance():
    spacing = (0.5, 0.5, 0.5)
    shape = (64, 60, 62)
    centre = (16.0, 15.0, 15.5)
    ref = sphere(shape, centre, 10.0, spacing).astype(np.uint8)
    pred = sphere(shape, centre, 13.0, spacing).astype(np.uint8)
    row = one_row(pred, ref, spacing, surface_tolerance_mm=2.0)
    # edge voxels lie within half a voxel diagonal (0.43 mm) inside each sphere: distances are 3 mm ± 0.9 mm
    assert 2.5 <= row["hd95_mm"] <= 3.5
    assert row["surface_dice"] == 0.0  # every edge distance exceeds 2.1 mm
    assert one_row(pred, ref, spacing, surface_tolerance_mm=4.5)["surface_dice"] == 1.0
    volume_ref, volume_pred = 4 / 3 * math.pi * 10 ** 3 / 1000, 4 / 3 * math.pi * 13 ** 3 / 1000
    assert row["volume_ref_ml"] == pytest.approx(volume_ref, rel=0.01)
    assert row["volume_pred_ml"] == pytest.approx(volume_pred, rel=0.01)
    assert row["dice"] == pytest.approx(2 * volume_ref / (volume_ref + volume_pred), rel=0.01)
    assert row["volume_rel_error"] == pytest.approx((volume_pred - volume_ref) / volume_ref, rel=0.02)


def test_sphere_shifted_along_anisotropic_axis():
    spacing = (0.5, 0.5, 2.0)
    shape = (60, 60, 30)
    ref = sphere(shape, (15.0, 15.0, 30.0), 10.0, spacing).astype(np.uint8)
    pred = sphere(shape, (15.0, 15.0, 34.0), 10.0, spacing).astype(np.uint8)  # 2 slices = 4 mm along k
    row = one_row(pred, ref, spacing, hd_percentile=100.0)
    # the poles move by exactly 4 mm; no boundary point moves further than the shift
    assert row["hd95_mm"] == pytest.approx(4.0, abs=0.6)
    assert row["hd95_mm"] <= 4.0 + 1e-5


# --- volumes --------------------------------------------------------------------------------------------------

def test_volume_in_ml_uses_the_spacing():
    pred, ref = cube_pair(0)  # both 1000 voxels
    pred[0:5, 0:2, 0:2] = 1  # 20 more voxels, a separate blob
    row = one_row(pred, ref, (0.8, 0.8, 2.0))
    assert row["volume_ref_ml"] == pytest.approx(1000 * 1.28 / 1000)
    assert row["volume_pred_ml"] == pytest.approx(1020 * 1.28 / 1000)
    assert row["volume_abs_error_ml"] == pytest.approx(20 * 1.28 / 1000)
    assert row["volume_rel_error"] == pytest.approx(0.02)


# --- empty masks ------------------------------------------------------------------------------------------

def test_empty_prediction_gets_worst_values_and_a_flag():
    _, ref = cube_pair(0)
    pred = np.zeros_like(ref)
    spacing = (0.8, 1.0, 3.0)
    row = one_row(pred, ref, spacing)
    diagonal = math.sqrt((26 * 0.8) ** 2 + 22 ** 2 + (20 * 3.0) ** 2)
    assert row["flags"] == "pred_empty"
    assert (row["dice"], row["surface_dice"]) == (0.0, 0.0)
    assert row["hd95_mm"] == pytest.approx(diagonal)
    assert row["volume_rel_error"] == 1.0
    assert (row["fp_components"], row["fn_components"]) == (0, 1)


def test_empty_reference_gets_worst_values_and_a_flag():
    pred, _ = cube_pair(0)
    ref = np.zeros_like(pred)
    row = one_row(pred, ref)
    assert row["flags"] == "ref_empty"
    assert (row["dice"], row["surface_dice"]) == (0.0, 0.0)
    assert row["hd95_mm"] == pytest.approx(math.sqrt(26 ** 2 + 22 ** 2 + 20 ** 2))
    assert math.isnan(row["volume_rel_error"])  # undefined; the summary counts it as missing
    assert (row["fp_components"], row["fn_components"]) == (1, 0)


def test_one_sided_empty_with_nan_policy():
    _, ref = cube_pair(0)
    row = one_row(np.zeros_like(ref), ref, empty_one_side_distance="nan_flagged")
    assert math.isnan(row["hd95_mm"]) and row["flags"] == "pred_empty"


def test_both_empty_is_perfect():
    empty = np.zeros((8, 9, 10), np.uint8)
    row = one_row(empty, empty.copy())
    assert row["flags"] == "both_empty"
    assert (row["dice"], row["hd95_mm"], row["surface_dice"]) == (1.0, 0.0, 1.0)
    assert (row["volume_abs_error_ml"], row["volume_rel_error"]) == (0.0, 0.0)
    assert (row["fp_components"], row["fn_components"]) == (0, 0)


# --- components -------------------------------------------------------------------------------------------

def test_extra_and_missed_blobs_are_counted_as_components():
    pred, ref = cube_pair(0, shape=(40, 30, 30))
    pred[30:33, 20:23, 20:23] = 1  # a blob the reference does not have → 1 false-positive component
    ref[30:33, 2:4, 25:28] = 1  # a blob the prediction misses → 1 false-negative component
    pred[25:27, 25:27, 2:4] = 1
    pred[22:24, 22:24, 0:2] = 1  # two more separate false positives
    row = one_row(pred, ref)
    assert (row["fp_components"], row["fn_components"]) == (3, 1)


def test_component_connectivity_26_joins_corner_neighbours_6_does_not():
    pred = np.zeros((6, 6, 6), bool)
    pred[1, 1, 1] = pred[2, 2, 2] = True  # touch only at a corner
    ref = np.zeros_like(pred)
    ref[4, 4, 4] = True
    assert unmatched_components(pred, ref, 26) == (1, 1)
    assert unmatched_components(pred, ref, 6) == (2, 1)
    assert one_row(pred.astype(np.uint8), ref.astype(np.uint8), component_connectivity=6)["fp_components"] == 2


# --- cropping gives exactly the full-volume MONAI result ----------------------------------------------------

def random_blobs(rng, shape, count, classes):
    labels = np.zeros(shape, np.uint8)
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    for _ in range(count):
        centre = rng.uniform(0, shape)
        radii = rng.uniform(2, 7, size=3)
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1
        labels[inside] = rng.integers(1, classes + 1)
    return labels


def full_volume_monai(pred, ref, value, spacing, options):
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

    y_pred = torch.from_numpy((pred == value).astype(np.float32))[None, None]
    y_ref = torch.from_numpy((ref == value).astype(np.float32))[None, None]
    return {
        "dice": float(compute_dice(y_pred, y_ref)[0, 0]),
        "hd95_mm": float(compute_hausdorff_distance(y_pred, y_ref, include_background=True, percentile=95,
                                                    spacing=list(spacing))[0, 0]),
        "surface_dice": float(compute_surface_dice(y_pred, y_ref, [options.surface_tolerance_mm],
                                                   include_background=True, spacing=list(spacing),
                                                   use_subvoxels=options.surface_dice_subvoxels)[0, 0]),
    }


@pytest.mark.parametrize("subvoxels", [False, True])
def test_cropped_metrics_equal_full_volume_metrics(subvoxels):
    rng = np.random.default_rng(7)
    shape, spacing = (48, 40, 24), (0.7, 0.9, 2.5)
    ref = random_blobs(rng, shape, 10, 3)  # blobs cut by the volume border included
    pred = random_blobs(rng, shape, 10, 3)
    pred[ref > 0] = np.where(rng.random(np.count_nonzero(ref)) < 0.8, ref[ref > 0], 0)
    options = MetricOptions(surface_tolerance_mm=1.5, surface_dice_subvoxels=subvoxels, crop_margin_voxels=1)
    classes = {1: "a", 2: "b", 3: "c"}
    rows = case_metrics(pred, ref, spacing, classes, options)
    assert any(box is not None and any(s.start == 0 for s in box)
               for box in class_boxes(pred, ref, [1, 2, 3], 1).values())  # some class reaches the border
    for row in rows:
        value = row["class_value"]
        expected = full_volume_monai(pred, ref, value, spacing, options)
        assert row["flags"] == ""
        for key, number in expected.items():
            assert row[key] == pytest.approx(number, abs=1e-6), key
        full_fp_fn = unmatched_components(pred == value, ref == value, 26)
        assert (row["fp_components"], row["fn_components"]) == full_fp_fn


def test_parallel_and_sequential_rows_are_identical():
    rng = np.random.default_rng(3)
    ref = random_blobs(rng, (40, 36, 20), 8, 3)
    pred = np.roll(ref, 1, axis=0)
    classes = {3: "c", 1: "a", 2: "b", 4: "absent"}
    sequential = case_metrics(pred, ref, (1, 1, 2), classes, MetricOptions(workers=1), case_id="x")
    parallel = case_metrics(pred, ref, (1, 1, 2), classes, MetricOptions(workers=3), case_id="x")
    assert sequential == parallel
    assert [r["class_value"] for r in parallel] == [3, 1, 2, 4]
    assert list(parallel[0]) == list(ROW_KEYS)
    assert parallel[3]["flags"] == "both_empty" and parallel[3]["class_name"] == "absent"


def test_mask_metrics_on_boolean_masks_directly():
    pred, ref = cube_pair(0)
    values = mask_metrics(pred.astype(bool), ref.astype(bool), (1, 1, 1), MetricOptions(), diagonal_mm=99.0)
    assert values["dice"] == pytest.approx(0.8) and values["hd95_mm"] == pytest.approx(2.0)


# --- input checks -----------------------------------------------------------------------------------------

def test_float_labels_with_integer_values_are_accepted():
    pred, ref = cube_pair(0)
    assert one_row(pred.astype(np.float32), ref.astype(np.float64))["dice"] == pytest.approx(0.8)


def test_bad_inputs_give_clear_errors():
    pred, ref = cube_pair(0)
    with pytest.raises(CaseError, match="case-1: prediction label volume must hold integer class values"):
        case_metrics(pred * 0.5, ref, (1, 1, 1), CLASSES, case_id="case-1")
    with pytest.raises(CaseError, match=r"prediction shape must equal reference shape, got \(26, 22, 19\)"):
        case_metrics(pred[:, :, 1:], ref, (1, 1, 1), CLASSES, case_id="case-1")
    with pytest.raises(InputError, match="spacing must be three positive numbers"):
        case_metrics(pred, ref, (1, 0, 1), CLASSES)
    with pytest.raises(ConfigError, match="class values must be integers >= 1"):
        case_metrics(pred, ref, (1, 1, 1), {0: "background"})
    with pytest.raises(ConfigError, match="hd_percentile must be above 0 and at most 100"):
        case_metrics(pred, ref, (1, 1, 1), CLASSES, MetricOptions(hd_percentile=150))


def test_mismatched_grid_names_both_files_and_the_difference():
    grid = Grid((20, 22, 24), affine_from_parts(np.eye(3), (0.8, 0.8, 2.0), (-10.0, 5.0, 30.0)))
    check_same_grid("pred/a.nii.gz", grid, "ref/a.nrrd", Grid(grid.shape, grid.affine.copy()))
    moved = Grid((20, 22, 25), affine_from_parts(np.eye(3), (0.8, 0.8, 2.5), (-10.0, 5.0, 30.0)))
    with pytest.raises(InputError) as error:
        check_same_grid("pred/a.nii.gz", grid, "ref/a.nrrd", moved)
    message = str(error.value)
    assert "pred/a.nii.gz" in message and "ref/a.nrrd" in message
    assert "shape (20, 22, 24) vs (20, 22, 25)" in message and "spacing" in message and "--resample-ref" in message
