"""Planning: target spacing (median, nnU-Net's anisotropic rule), intensities, patch/batch within budget."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.preprocess.plan import (
    estimate_training_mb,
    intensity_statistics,
    make_plan,
    plan_patch,
    plan_target_spacing,
    transform_key,
)


def test_target_spacing_is_the_median_for_isotropic_data():
    spacings = [[0.8, 0.8, 1.0], [1.0, 1.0, 1.5], [0.7, 0.7, 1.2]]
    target, anisotropic = plan_target_spacing(np.array(spacings), 3.0)
    assert target == [0.8, 0.8, 1.2]
    assert not anisotropic


def test_anisotropic_data_keeps_the_coarse_axis_at_its_10th_percentile():
    # in-plane ~0.7 mm, slices 2.5-5 mm: median slice 5.0 is > 3× the in-plane median
    spacings = [[0.7, 0.7, 5.0]] * 6 + [[0.7, 0.7, 2.5]] * 2 + [[0.8, 0.8, 5.0]] * 2
    target, anisotropic = plan_target_spacing(np.array(spacings), 3.0)
    assert anisotropic
    assert target[:2] == [0.7, 0.7]
    assert target[2] == pytest.approx(np.percentile([5.0] * 8 + [2.5] * 2, 10))
    assert target[2] < 5.0  # not the median


def test_anisotropic_rule_never_makes_the_coarse_axis_finer_than_the_others():
    spacings = [[1.0, 1.0, 5.0]] * 5 + [[1.0, 1.0, 0.5]] * 5
    target, anisotropic = plan_target_spacing(np.array(spacings), 2.0)
    assert anisotropic
    assert target[2] >= 1.0


def test_coarse_in_plane_axis_is_detected_too():
    target, anisotropic = plan_target_spacing(np.array([[4.0, 1.0, 1.0], [4.0, 1.0, 1.0]]), 3.0)
    assert anisotropic and target[0] == pytest.approx(4.0)


def test_intensity_statistics_match_numpy():
    rng = np.random.default_rng(0)
    samples = rng.normal(60, 20, 50_000)
    stats = intensity_statistics(samples, 0.5, 99.5)
    assert stats["percentile_low"] == pytest.approx(np.percentile(samples, 0.5))
    assert stats["percentile_high"] == pytest.approx(np.percentile(samples, 99.5))
    assert stats["mean"] == pytest.approx(60, abs=0.5)
    assert stats["std"] == pytest.approx(20, abs=0.5)


def test_planned_patch_fits_the_budget_and_is_divisible():
    channels = [32, 64, 128, 256]
    for budget in (1000, 2000, 8000):
        patch, batch = plan_patch([300, 300, 200], [0.8, 0.8, 1.5], channels, budget, 10 ** 9, 8, 4, 1e9)
        assert all(p % 8 == 0 for p in patch)
        assert estimate_training_mb(patch, batch, channels, 4) <= budget
        assert batch >= 2
    small, _ = plan_patch([300, 300, 200], [0.8, 0.8, 1.5], channels, 1000, 10 ** 9, 8, 4, 1e9)
    large, _ = plan_patch([300, 300, 200], [0.8, 0.8, 1.5], channels, 8000, 10 ** 9, 8, 4, 1e9)
    assert np.prod(large) > np.prod(small)


def test_patch_shrinks_the_physically_longest_axis_first():
    # axis 2 is 200 × 3 mm = 600 mm long, axes 0/1 are 160 × 1 mm: axis 2 must give way first
    patch, _ = plan_patch([160, 160, 200], [1.0, 1.0, 3.0], [16, 32, 64, 128], 600, 10 ** 9, 8, 2, 1e9)
    assert patch[2] * 3.0 <= max(patch[0], patch[1]) * 1.0 + 8 * 3.0


def test_patch_never_exceeds_the_median_image_and_batch_grows_for_small_images():
    patch, batch = plan_patch([40, 36, 20], [1.0, 1.0, 1.0], [16, 32, 64], 4000, 10 ** 9, 8, 2, 1e7)
    assert patch == [40, 36, 20]
    assert batch > 2


def _fingerprint(spacing=(0.8, 0.8, 2.5)):
    cases = [{"id": f"c{i}", "spacing": list(spacing), "shape": [256, 256, 60],
              "extent_mm": [205.0, 205.0, 150.0], "body_extent_mm": [180.0, 150.0, 150.0]} for i in range(4)]
    return {"cases": cases,
            "labels": [{"name": "background", "value": 0, "color": [0, 0, 0]},
                       {"name": "liver", "value": 1, "color": [255, 0, 0]},
                       {"name": "tumour", "value": 7, "color": [0, 255, 0]}],
            "foreground_hu": {"percentile_low": -50.0, "percentile_high": 250.0, "mean": 90.0, "std": 40.0}}


def test_make_plan_records_plan_and_lets_config_override_every_field():
    planned = make_plan(_fingerprint(), load_config([], ["preprocess.intensity=percentile_zscore"]))
    assert planned["target_spacing"] == [0.8, 0.8, 2.5]
    assert planned["intensity"] == {"mode": "percentile_zscore", "low": -50.0, "high": 250.0, "mean": 90.0,
                                    "std": 40.0}
    assert planned["class_values"] == [0, 1, 7]
    assert [lbl["name"] for lbl in planned["labels"]] == ["liver", "tumour"]
    assert planned["overrides"] == []
    for mode, dims in (("3d", 3), ("2d", 2)):
        assert len(planned["configurations"][mode]["patch_size"]) == dims

    overridden = make_plan(_fingerprint(), load_config([], [
        "preprocess.target_spacing=[1.5,1.5,3]", "preprocess.window_low=-100", "preprocess.crop_to_body=false"]))
    assert overridden["target_spacing"] == [1.5, 1.5, 3.0]
    assert overridden["intensity"] == {"mode": "window", "low": -100.0, "high": 300.0}
    assert overridden["crop_to_body"] is False
    assert set(overridden["overrides"]) == {"target_spacing", "intensity"}
    assert overridden["transform_key"] != planned["transform_key"]


def test_transform_key_ignores_patch_and_batch_but_not_spacing():
    plan = make_plan(_fingerprint(), load_config([], []))
    changed = dict(plan, configurations={"3d": {"patch_size": [8, 8, 8], "batch_size": 1}})
    assert transform_key(changed) == transform_key(plan)
    assert transform_key(dict(plan, target_spacing=[9.0, 9.0, 9.0])) != transform_key(plan)
