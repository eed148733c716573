"""The preprocess stage on a real ingest folder: plan, cached arrays, exact geometry, cache reuse, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.errors import InputError
from pipeline.geometry import Grid, Volume
from pipeline.preprocess.cache import load_cached_case, read_index
from pipeline.preprocess.stage import run_preprocess
from pipeline.preprocess.transform import labels_to_source
from pipeline.volume_io import load_volume, save_nifti

from helpers.train import write_ingest_folder


def _config(tmp_path, *overrides):
    return load_config([], [f"output_root={tmp_path}", "experiment=exp", *overrides])


def test_stage_writes_plan_and_arrays_whose_labels_map_back_exactly(tmp_path):
    cfg = _config(tmp_path)
    ingest = write_ingest_folder(cfg.stage_dir("ingest"), n_train=3, n_test=1)
    report = run_preprocess(cfg)
    out = cfg.stage_dir("preprocess")
    assert report["status"] == "ok" and report["counts"]["ok"] == 3  # the test case is not preprocessed
    for name in ("fingerprint.json", "plan.json", "index.json", "report.json", "done.json"):
        assert (out / name).is_file()
    plan, entries = read_index(out)
    assert plan["target_spacing"] == [2.5, 2.5, 3.0]  # every case has that spacing: the median
    assert plan["class_values"] == [0, 1, 2, 5]
    manifest = json.loads((ingest / "manifest.json").read_text())
    for entry, case in zip(entries, [c for c in manifest["cases"] if c["role"] == "train"]):
        image, label, grid = load_cached_case(out, entry)
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert image.shape == label.shape == grid.shape
        assert 0.0 <= image.min() and image.max() <= 1.0  # fixed window scaled to [0, 1]
        source = load_volume(ingest / case["label"])
        # same spacing: going back must reproduce the source label exactly (syn_001 has a flipped i axis)
        meta = json.loads((out / entry["meta"]).read_text())
        values = np.array(plan["class_values"], dtype=np.uint8)[label]
        back = labels_to_source(values, grid, Grid.from_json(meta["source_grid"]))
        assert np.array_equal(back, source.array)
    # canonical axes: class 1 (patient's right) has a larger i than class 2 in every cached case
    for entry in entries:
        _, label, _ = load_cached_case(out, entry)
        assert np.argwhere(label == 1)[:, 0].mean() > np.argwhere(label == 2)[:, 0].mean()


def test_rerun_is_up_to_date_and_plan_changes_reuse_or_invalidate_the_cache(tmp_path):
    cfg = _config(tmp_path)
    write_ingest_folder(cfg.stage_dir("ingest"), n_train=2)
    run_preprocess(cfg)
    arrays = sorted((cfg.stage_dir("preprocess") / "arrays").glob("*_image.npy"))
    stamps = [p.stat().st_mtime_ns for p in arrays]
    assert run_preprocess(cfg)["status"] == "up_to_date"

    # a new memory budget re-plans patch sizes but leaves the arrays valid
    report = run_preprocess(_config(tmp_path, "preprocess.memory_budget_mb=1500"))
    assert report["status"] == "ok" and report["reused_arrays"] == 2
    assert [p.stat().st_mtime_ns for p in arrays] == stamps

    # a new window changes every array: recomputed
    report = run_preprocess(_config(tmp_path, "preprocess.memory_budget_mb=1500", "preprocess.window_low=-100"))
    assert report["reused_arrays"] == 0
    assert [p.stat().st_mtime_ns for p in arrays] != stamps


def test_percentile_zscore_uses_the_hu_inside_the_labels(tmp_path):
    cfg = _config(tmp_path, "preprocess.intensity=percentile_zscore", "preprocess.target_spacing=[5,5,5]")
    write_ingest_folder(cfg.stage_dir("ingest"), n_train=2)
    run_preprocess(cfg)
    plan, entries = read_index(cfg.stage_dir("preprocess"))
    intensity = plan["intensity"]
    # organs are 110, 160 and 230 HU with 12 HU noise: the foreground statistics lie in that range
    assert 100 < intensity["mean"] < 200 and 30 < intensity["std"] < 60
    assert 60 < intensity["low"] < 110 and 230 < intensity["high"] < 290
    image, label, _ = load_cached_case(cfg.stage_dir("preprocess"), entries[0])
    inside = image[label > 0]
    assert abs(inside.mean()) < 0.3 and 0.7 < inside.std() < 1.3  # z-scored foreground


def _replace_label(ingest, case_index, array):
    manifest = json.loads((ingest / "manifest.json").read_text())
    path = ingest / manifest["cases"][case_index]["label"]
    original = load_volume(path)
    save_nifti(Volume(array(original.array), original.affine), path)
    return manifest["cases"][case_index]["id"]


@pytest.mark.parametrize("problem,match", [
    ("unknown_value", r"values must be among those of the dataset description \[0, 1, 2, 5\], got \[9\]"),
    ("empty", "must contain at least one labelled voxel"),
])
def test_bad_labels_fail_before_anything_is_cached_naming_the_case(tmp_path, problem, match):
    cfg = _config(tmp_path)
    ingest = write_ingest_folder(cfg.stage_dir("ingest"), n_train=3)
    if problem == "unknown_value":
        case_id = _replace_label(ingest, 1, lambda a: np.where(a == 2, 9, a).astype(np.uint8))
    else:
        case_id = _replace_label(ingest, 1, lambda a: np.zeros_like(a))
    with pytest.raises(InputError, match=match) as info:
        run_preprocess(cfg)
    assert f"case {case_id}" in str(info.value)
    out = cfg.stage_dir("preprocess")
    assert not (out / "done.json").exists() and not (out / "arrays").exists()
    report = json.loads((out / "report.json").read_text())
    assert [c["id"] for c in report["cases"] if c["status"] == "failed"] == [case_id]


def test_label_on_another_grid_is_refused_naming_the_case(tmp_path):
    cfg = _config(tmp_path)
    ingest = write_ingest_folder(cfg.stage_dir("ingest"), n_train=2)
    manifest = json.loads((ingest / "manifest.json").read_text())
    path = ingest / manifest["cases"][0]["label"]
    label = load_volume(path)
    save_nifti(Volume(label.array[:, :, :-2], label.affine), path)
    with pytest.raises(InputError, match=r"case syn_000: label syn_000.nii.gz must lie on its image's grid, got shape"):
        run_preprocess(cfg)


def test_manifest_without_labelled_training_cases_is_refused(tmp_path):
    cfg = _config(tmp_path)
    ingest = write_ingest_folder(cfg.stage_dir("ingest"), n_train=0, n_test=2)
    assert (ingest / "manifest.json").is_file()
    with pytest.raises(InputError, match="at least one training case with a label"):
        run_preprocess(cfg)
