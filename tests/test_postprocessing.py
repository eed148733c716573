"""Postprocessing decided from cross-validation: the decision, its file in the model folder, and predict applying it."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.config import Config
from pipeline.errors import InputError
from pipeline.models.folder import POSTPROCESSING_FILE, read_model_spec, read_postprocessing, write_postprocessing
from pipeline.postprocessing import Rule, apply_rules, class_components, decide, label_components, smallest_component_ml
from pipeline.predict.cases import Case
from pipeline.predict.inference import WindowPredictor
from pipeline.predict.stage import predict_case, run_predict
from pipeline.synthetic.phantoms import PhantomOptions, make_phantom
from pipeline.volume_io import save_nifti

from helpers.predict import encoded_image, oracle_predictor, source_resolution, write_phantom_nifti, write_small_model

VOXEL_ML = 0.001  # 1 mm³ voxels in the constructed cases
SHAPE = (24, 24, 24)


def _blocks(*boxes, value=1, shape=SHAPE) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.uint8)
    for box in boxes:
        labels[tuple(slice(a, b) for a, b in box)] = value
    return labels


BIG = ((2, 8), (2, 8), (2, 8))          # 216 voxels
SECOND = ((14, 19), (14, 19), (14, 19))  # 125 voxels, detached from BIG
BLOB = ((2, 6), (14, 18), (14, 18))      # 64 voxels, detached from both
SPECK = ((20, 21), (2, 4), (20, 21))     # 2 voxels


def _decision(pairs, smallest_ml, classes=None):
    classes = classes or {1: "gtv"}
    cases = {f"c{n}": class_components(pred, ref, list(classes)) for n, (pred, ref) in enumerate(pairs)}
    return decide(cases, classes, VOXEL_ML, smallest_ml)


def test_largest_component_is_kept_where_it_raises_the_mean_dice():
    reference = _blocks(BIG)
    with_blob = _blocks(BIG, BLOB)  # a detached false positive larger than any threshold tried
    decision = _decision([(with_blob, reference), (reference.copy(), reference)], {1: 0.027})
    entry = decision["classes"]["gtv"]
    assert entry["rule"] == {"keep_largest_component": True, "min_component_ml": None}
    assert entry["cases"] == 2 and entry["cases_with_several_components"] == 1
    assert entry["dice_without"] == pytest.approx((2 * 216 / (280 + 216) + 1.0) / 2, abs=1e-6)
    assert entry["dice_with"] == pytest.approx(1.0)
    # the thresholds tried were fractions of the smallest training component, none large enough for the blob
    tried = [c["min_component_ml"] for c in entry["candidates"] if c["min_component_ml"] is not None]
    assert tried == pytest.approx([0.0027, 0.00675, 0.0135])  # at most half the smallest seen
    assert decision["case_dice"]["c0"]["gtv"] == {"without": pytest.approx(0.870968, abs=1e-6), "with": 1.0}


def test_largest_component_is_not_kept_where_it_hurts():
    reference = _blocks(BIG, SECOND)  # e.g. two lymph nodes: both real
    decision = _decision([(reference.copy(), reference), (_blocks(BIG, SECOND), reference)], {1: 0.125})
    entry = decision["classes"]["gtv"]
    assert entry["rule"] is None and entry["dice_with"] == entry["dice_without"] == 1.0
    largest = next(c for c in entry["candidates"] if c["keep_largest_component"])
    assert largest["mean_dice"] == pytest.approx(2 * 216 / (216 + 341), abs=1e-6)  # measured, and worse
    assert "no rule raised the mean Dice" in entry["reason"]


def test_small_component_removal_is_chosen_where_it_helps_and_the_largest_component_would_hurt():
    reference = _blocks(BIG, SECOND)
    decision = _decision([(_blocks(BIG, SECOND, SPECK), reference), (reference.copy(), reference)], {1: 0.125})
    entry = decision["classes"]["gtv"]
    assert entry["rule"] == {"keep_largest_component": False, "min_component_ml": pytest.approx(0.0125)}
    assert entry["dice_without"] == pytest.approx((2 * 341 / (343 + 341) + 1) / 2, abs=1e-6)
    assert entry["dice_with"] == pytest.approx(1.0)


def test_each_class_is_decided_on_its_own_and_an_absent_class_counts_as_right_when_predicted_empty():
    reference = _blocks(BIG) + _blocks(SECOND, value=2)
    noisy = reference.copy()
    noisy[tuple(slice(a, b) for a, b in SPECK)] = 1   # a speck of class 1
    empty_reference = np.zeros(SHAPE, dtype=np.uint8)
    speck_only = _blocks(SPECK)                        # class 1 predicted where the case has none
    decision = _decision([(noisy, reference), (speck_only, empty_reference)], {1: 0.216, 2: 0.125},
                         classes={1: "gtv", 2: "node"})
    gtv, node = decision["classes"]["gtv"], decision["classes"]["node"]
    assert gtv["rule"]["min_component_ml"] == pytest.approx(0.0216)
    assert gtv["dice_without"] == pytest.approx((2 * 216 / 434 + 0.0) / 2, abs=1e-6)  # the speck alone: Dice 0
    assert gtv["dice_with"] == pytest.approx(1.0)  # removed: right for both cases
    assert node["rule"] is None and node["dice_without"] == pytest.approx(1.0)  # absent in both: 1, not NaN
    assert decision["mean_foreground_dice_with"] == pytest.approx(1.0)


def test_smallest_training_component_and_physical_thresholds_on_different_grids():
    labels = [_blocks(BIG, SPECK), _blocks(SECOND)]
    assert smallest_component_ml(iter(labels), [1, 2], 0.002) == {1: pytest.approx(0.004), 2: None}
    components, sizes = label_components(_blocks(BIG, SPECK))
    assert sorted(sizes.tolist()) == [2, 216] and components.max() == 2
    diagonal = np.zeros((3, 3, 3), dtype=bool)
    diagonal[0, 0, 0] = diagonal[1, 1, 1] = True
    assert len(label_components(diagonal)[1]) == 1  # 26-connectivity
    # the same 10-voxel island is 0.02 mL on a 1x1x2 mm grid (removed below 0.03 mL), 0.08 mL on 2 mm voxels (kept)
    island = _blocks(BIG, ((20, 22), (20, 21), (2, 7)))
    fine = island.copy()
    records = apply_rules(fine, 0.002, {1: Rule(min_component_ml=0.03)}, {1: "gtv"})
    assert fine[20:22, 20, 2:7].max() == 0 and records[0]["removed"] == 1
    assert records[0]["removed_ml"] == pytest.approx(0.02) and records[0]["note"].startswith("gtv: removed 1 of 2")
    coarse = island.copy()
    assert apply_rules(coarse, 0.008, {1: Rule(min_component_ml=0.03)}, {1: "gtv"})[0]["removed"] == 0
    np.testing.assert_array_equal(coarse, island)


# ---------------------------------------------------------------------------------------------
# The decision file in the model folder
# ---------------------------------------------------------------------------------------------

def _liver_lcc(**extra) -> dict:
    return {"source": "test decision", "cases": 3, **extra,
            "classes": {"liver": {"value": 1, "cases": 3, "rule": {"keep_largest_component": True,
                                                                   "min_component_ml": None},
                                  "dice_without": 0.8, "dice_with": 0.9},
                        "spleen": {"value": 2, "cases": 3, "rule": None, "dice_without": 0.7, "dice_with": 0.7}}}


def test_decision_file_round_trips_old_folders_load_without_it_and_bad_files_are_refused(tmp_path: Path):
    folder = write_small_model(tmp_path / "model")
    spec = read_model_spec(folder)
    assert read_postprocessing(folder, spec) is None  # a folder from before: no decided clean-up
    write_postprocessing(folder, _liver_lcc())
    stored = json.loads((folder / POSTPROCESSING_FILE).read_text())
    assert list(stored)[0] == "format" and stored["format"] == "ctseg-postprocessing/1"
    assert read_postprocessing(folder, spec)["classes"]["liver"]["rule"]["keep_largest_component"] is True
    for broken, match in ((dict(_liver_lcc(), format="nnunet/2"), "must have format 'ctseg-postprocessing/1'"),
                          ({**_liver_lcc(), "classes": {"lung": {"rule": None}}}, r"labels of the model .*'lung'"),
                          ({**_liver_lcc(), "classes": {"liver": {"rule": {"keep_largest_component": "yes"}}}},
                           "classes.liver.rule must be null or")):
        (folder / POSTPROCESSING_FILE).write_text(json.dumps({"format": "ctseg-postprocessing/1", **broken}))
        with pytest.raises(InputError, match=match):
            read_postprocessing(folder, spec)
    (folder / POSTPROCESSING_FILE).write_text("{not json")
    with pytest.raises(InputError, match="must be readable JSON"):
        read_postprocessing(folder, spec)


# ---------------------------------------------------------------------------------------------
# Predict applies the decision
# ---------------------------------------------------------------------------------------------

OBLIQUE_FEET_FIRST = PhantomOptions(shape=48, slices=20, inplane_spacing_min=1.1, inplane_spacing_max=1.5,
                                    slice_spacing_min=2.5, slice_spacing_max=3.0, direction="oblique",
                                    feet_first=True, noise_hu=0.0)


def _phantom_with_blob(tmp_path: Path):
    """An oblique feet-first phantom whose image makes the network see a detached liver blob."""
    phantom = make_phantom(4, OBLIQUE_FEET_FIRST)
    truth = phantom.label.array.copy()
    with_blob = truth.copy()
    fg = np.argwhere(truth > 0)
    lo = fg.min(0)
    corner = tuple(slice(int(a), int(a) + 3) for a in (lo[0], fg[:, 1].max() - 2, lo[2]))
    clear = tuple(slice(max(0, s.start - 2), s.stop + 2) for s in corner)
    if truth[clear].any():  # the blob must be detached from every label
        pytest.fail("the blob's corner touches a label; pick another corner")
    with_blob[corner] = 1
    label = type(phantom.label)(with_blob, phantom.label.affine.copy())
    path = tmp_path / "blob.nii.gz"
    save_nifti(encoded_image(label), path)
    return path, truth, with_blob, phantom.label.grid


def test_predict_removes_a_detached_false_positive_blob_with_the_decided_rule_on_the_source_grid(tmp_path: Path):
    path, truth, with_blob, grid = _phantom_with_blob(tmp_path)
    assert len(label_components(with_blob == 1)[1]) == 2 and len(label_components(truth == 1)[1]) == 1
    predictor = oracle_predictor(source_resolution(grid))  # the network predicts exactly what the image encodes
    predictor.postprocessing = {"format": "ctseg-postprocessing/1", **_liver_lcc()}
    cfg = Config()
    cfg.predict.outputs.thumbnails = False
    outputs, summary, _, _ = predict_case(Case("blob", str(path), path=path), predictor, WindowPredictor(predictor),
                                          cfg, tmp_path / "auto", "test")
    written = nib.load(str(tmp_path / "auto" / outputs["labels"]["path"]))
    np.testing.assert_array_equal(np.asarray(written.dataobj), truth)  # the blob is gone, nothing else changed
    assert written.shape == grid.shape and np.allclose(written.affine, grid.affine, atol=1e-5)  # geometry kept
    provenance = json.loads((tmp_path / "auto" / outputs["provenance"]["path"]).read_text())
    applied = provenance["postprocessing"]
    assert applied["decided"] and applied["model_decision"] == "auto" and applied["source"] == "test decision"
    liver = next(r for r in applied["applied"] if r["label"] == "liver")
    assert liver["components"] == 2 and liver["removed"] == 1
    voxel_ml = abs(np.linalg.det(grid.affine[:3, :3])) / 1000
    assert liver["removed_ml"] == pytest.approx(27 * voxel_ml, rel=1e-3)  # measured with the source voxel volume
    assert any(n.startswith("liver: removed 1 of 2 connected components") for n in provenance["postprocess"])
    assert summary["postprocessing"]["applied"][0]["removed"] == 1

    cfg.predict.postprocess.model_decision = "none"
    outputs, *_ = predict_case(Case("blob", str(path), path=path), predictor, WindowPredictor(predictor), cfg,
                               tmp_path / "none", "test")
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "none" / outputs["labels"]["path"])).dataobj),
                                  with_blob)
    provenance = json.loads((tmp_path / "none" / outputs["provenance"]["path"]).read_text())
    assert provenance["postprocessing"]["decided"] is False and provenance["postprocessing"]["applied"] == []

    cfg.predict.postprocess.model_decision = "auto"
    cfg.predict.postprocess.min_component_ml = ["liver=0.001"]  # the config's own setting for liver wins
    outputs, *_ = predict_case(Case("blob", str(path), path=path), predictor, WindowPredictor(predictor), cfg,
                               tmp_path / "configured", "test")
    np.testing.assert_array_equal(
        np.asarray(nib.load(str(tmp_path / "configured" / outputs["labels"]["path"])).dataobj), with_blob)
    provenance = json.loads((tmp_path / "configured" / outputs["provenance"]["path"]).read_text())
    assert provenance["postprocessing"]["overridden_by_config"] == ["liver"]


def test_predict_batch_applies_the_model_folders_decision_and_reports_it(tmp_path: Path):
    folder = write_small_model(tmp_path / "model")
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_phantom_nifti(inputs / "case0_0000.nii.gz", seed=0)
    cfg = Config()
    cfg.predict.outputs.thumbnails = False
    cfg.predict.outputs.seg_nrrd = False
    before = run_predict(cfg, folder, inputs, tmp_path / "before")
    assert before.report["model"]["postprocessing"]["decided"] is False
    assert "no postprocessing.json" in before.report["model"]["postprocessing"]["reason"]
    every = {name: {"rule": {"keep_largest_component": True, "min_component_ml": None}}
             for name in ("liver", "spleen", "kidneys")}
    write_postprocessing(folder, {"source": "test decision", "cases": 2, "classes": every})
    after = run_predict(cfg, folder, inputs, tmp_path / "after")
    assert after.exit_code == 0 and after.report["hash"] != before.report["hash"]
    entry = after.report["cases"][0]
    assert entry["postprocessing"]["decided"] is True
    assert {r["label"] for r in entry["postprocessing"]["applied"]} <= {"liver", "spleen", "kidneys"}
    labels = np.asarray(nib.load(str(tmp_path / "after" / entry["outputs"]["labels"])).dataobj)
    for value in (1, 2, 3):
        assert len(label_components(labels == value)[1]) <= 1  # at most one component of each class is written
    source = nib.load(str(inputs / "case0_0000.nii.gz"))
    assert labels.shape == source.shape
    assert np.allclose(nib.load(str(tmp_path / "after" / entry["outputs"]["labels"])).affine, source.affine)


@pytest.mark.parametrize("shape", [(7,), (9, 6), (11, 8, 5), (5, 6, 4, 3)])
@pytest.mark.parametrize("layout", ["C", "F", "strided"])
def test_label_boxes_equal_scipys_find_objects_in_every_memory_layout(shape, layout):
    from scipy import ndimage

    from pipeline.postprocessing import label_boxes

    rng = np.random.default_rng(len(shape))
    for trial in range(20):
        labels = np.zeros(shape, dtype=np.int16)
        for value in rng.choice([1, 2, 3, 5], size=int(rng.integers(0, 4)), replace=False):
            spot = tuple(int(rng.integers(0, n)) for n in shape)
            other = tuple(int(rng.integers(0, n)) for n in shape)
            labels[spot] = value
            labels[other] = value
        if trial % 5 == 0:
            labels[tuple(0 for _ in shape)] = -1  # not a label: find_objects ignores values below 1
        if layout == "F":
            labels = np.asfortranarray(labels)
        elif layout == "strided":
            labels = np.repeat(labels, 2, axis=0)[::2]
        expected = {value: box for value, box in enumerate(ndimage.find_objects(labels, max_label=4), start=1)
                    if box is not None}
        assert label_boxes(labels, 4) == expected


@pytest.mark.parametrize("cores", [1, 2, 5])
def test_many_classes_with_interleaved_islands_give_the_one_class_at_a_time_result(monkeypatch, cores):
    """Classes are labelled in groups of threads; the result is that of applying each rule alone, in turn."""
    rng = np.random.default_rng(11)
    labels = np.asfortranarray(rng.integers(0, 6, size=(40, 31, 23)).astype(np.uint8))  # overlapping boxes, islands
    labels[5:30, 5:25, 4:20] = 2  # one large component of class 2 among the others' islands
    rules = {1: Rule(min_component_ml=0.005), 2: Rule(keep_largest_component=True),
             3: Rule(min_component_ml=0.002, keep_largest_component=True), 5: Rule(min_component_ml=0.02)}
    names = {v: f"c{v}" for v in range(1, 6)}
    expected, expected_records = labels.copy(order="F"), []
    for value, rule in rules.items():  # one rule at a time, every component counted with scipy directly
        components, sizes = label_components(expected == value)
        keep = rule.keep(sizes, 0.001)
        expected[np.isin(components, np.flatnonzero(~keep) + 1)] = 0
        expected_records.append((f"c{value}", len(sizes), int((~keep).sum())))
    monkeypatch.setattr("pipeline.torchrun.cores_per_process", lambda: cores)
    kept: dict = {}
    records = apply_rules(labels, 0.001, {**rules, 4: Rule(), 9: Rule(keep_largest_component=True)}, names, kept)
    np.testing.assert_array_equal(labels, expected)
    assert [(r["label"], r["components"], r["removed"]) for r in records] == expected_records
    assert all(r["removed"] > 0 for r in records)  # every rule had something to do
    # what the trust step takes instead of labelling again: the components of the cleaned map, in the same order
    from pipeline.training_fingerprint import component_sizes

    assert sorted(kept) == [1, 2, 3, 5, 9] and kept[9].size == 0  # 9 is absent, 4 had no rule
    again = component_sizes(labels, [1, 2, 3, 5])
    for value in (1, 2, 3, 5):
        np.testing.assert_array_equal(kept[value], again[value])
