"""Which results to distrust: each plausibility flag on phantoms, the confidence, and the morning report's order."""
from __future__ import annotations

import csv
import json
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from pipeline import training_fingerprint as tfp
from pipeline.config import Config
from pipeline.errors import InputError
from pipeline.geometry import Volume
from pipeline.predict import trust
from pipeline.predict.inference import WindowPredictor, sliding_window_predict
from pipeline.predict.ledger import LEDGER_FILE
from pipeline.predict.model import LabelInfo
from pipeline.predict.options import PredictConfig, ReportOptions, TrustOptions
from pipeline.predict.report import label_statistics
from pipeline.predict.stage import run_predict
from pipeline.synthetic.phantoms import LABEL_NAMES, make_phantom
from pipeline.volume_io import save_nifti

from helpers.predict import (
    LABELS,
    SMALL_PHANTOM,
    IntensityOracle,
    encoded_image,
    oracle_predictor,
    write_small_model,
)

INFOS = [LabelInfo(lbl["value"], lbl["name"], tuple(lbl["color"])) for lbl in LABELS]
TRAIN_SEEDS = range(6)
THRESHOLD = -500.0


@pytest.fixture(scope="module")
def fingerprint() -> dict:
    stats = []
    for seed in TRAIN_SEEDS:
        p = make_phantom(seed, SMALL_PHANTOM)
        stats.append(tfp.case_statistics(p.image.array, p.label.array, p.image.grid, list(LABEL_NAMES), THRESHOLD))
    return tfp.build(stats, [{"name": "background", "value": 0}] + LABELS)


@pytest.fixture(scope="module")
def held_out():
    return make_phantom(40, SMALL_PHANTOM)


def _result_codes(label: np.ndarray, grid, fingerprint) -> list[tuple[str, str]]:
    volumes, _ = label_statistics(label, grid, INFOS, ReportOptions())
    flags, _ = trust.result_flags(label, volumes, INFOS, fingerprint, TrustOptions(), grid)
    return sorted((f.code, f.label) for f in flags)


def _input_codes(image: Volume, fingerprint) -> list[str]:
    flags, _ = trust.input_flags(image.array, image.grid, fingerprint, TrustOptions())
    return sorted({f.code for f in flags})


def test_the_fingerprint_remembers_volumes_components_and_inputs_and_round_trips(fingerprint, tmp_path):
    assert fingerprint["cases"] == len(TRAIN_SEEDS)
    liver, kidneys = fingerprint["labels"]["liver"], fingerprint["labels"]["kidneys"]
    assert liver["present_in"] == len(TRAIN_SEEDS) and len(liver["volume_ml"]["values"]) == len(TRAIN_SEEDS)
    assert 0 < liver["volume_ml"]["min"] < liver["volume_ml"]["max"]
    assert liver["components"]["max"] == 1 and kidneys["components"]["max"] == 2  # two kidneys, one liver
    assert len(fingerprint["hu_histogram"]["cases"]) == len(TRAIN_SEEDS)
    assert abs(sum(fingerprint["hu_histogram"]["pooled"]) - 1.0) < 1e-4
    tfp.write(tmp_path, fingerprint)
    assert tfp.read(tmp_path) == json.loads(json.dumps(fingerprint))
    assert tfp.read(tmp_path / "elsewhere") is None  # an older model folder: no checks, no error
    (tmp_path / tfp.FILE).write_text(json.dumps({**fingerprint, "format": "other/9"}))
    with pytest.raises(InputError, match="must have format 'ctseg-training-fingerprint/1', got 'other/9'"):
        tfp.read(tmp_path)


def test_a_familiar_phantom_raises_no_flag(fingerprint, held_out):
    assert _input_codes(held_out.image, fingerprint) == []
    assert _result_codes(held_out.label.array, held_out.label.grid, fingerprint) == []


def test_a_shrunken_organ_is_flagged_below_half_the_smallest_training_volume(fingerprint, held_out):
    label = held_out.label.array.copy()
    liver = np.argwhere(label == 1)
    middle = int(np.median(liver[:, 2]))
    label[(label == 1) & (np.arange(label.shape[2])[None, None, :] != middle)] = 0  # one slice of liver left
    volumes, _ = label_statistics(label, held_out.label.grid, INFOS, ReportOptions())
    assert 0 < volumes["liver"]["volume_ml"] < fingerprint["labels"]["liver"]["volume_ml"]["min"] / 2
    assert _result_codes(label, held_out.label.grid, fingerprint) == [("volume_low", "liver")]


def test_an_organ_far_too_large_is_flagged_above_twice_the_largest(fingerprint, held_out):
    label = held_out.label.array.copy()
    body = held_out.image.array > THRESHOLD
    label[body & (label == 0)] = 3  # every body voxel that is not an organ becomes "kidneys"
    codes = _result_codes(label, held_out.label.grid, fingerprint)
    assert ("volume_high", "kidneys") in codes


def test_an_organ_present_in_every_training_case_but_empty_is_flagged(fingerprint, held_out):
    label = held_out.label.array.copy()
    label[label == 2] = 0
    assert _result_codes(label, held_out.label.grid, fingerprint) == [("label_missing", "spleen")]


def _corner_blob(label: np.ndarray, grid, millilitres: float, value: int) -> np.ndarray:
    """``label`` with a cube of about ``millilitres`` of ``value`` in the corner (0, 0, 0), away from the organs."""
    from pipeline.geometry import voxel_volume_ml

    side = max(1, int(round((millilitres / voxel_volume_ml(grid)) ** (1 / 3))))
    changed = label.copy()
    assert not changed[:side, :side, :side].any()
    changed[:side, :side, :side] = value
    return changed


def test_an_extra_component_is_flagged_but_not_a_speck(fingerprint, held_out):
    grid = held_out.label.grid
    smallest = fingerprint["labels"]["spleen"]["volume_ml"]["min"]
    extra = _corner_blob(held_out.label.array, grid, 0.3 * smallest, 2)  # a second "spleen" of 30% its size
    assert _result_codes(extra, grid, fingerprint) == [("components", "spleen")]
    speck = _corner_blob(held_out.label.array, grid, 0.02 * smallest, 2)  # a few voxels: not a second organ
    volumes, _ = label_statistics(speck, grid, INFOS, ReportOptions())
    flags, measured = trust.result_flags(speck, volumes, INFOS, fingerprint, TrustOptions(), grid)
    assert flags == [] and measured["spleen"]["components"] == 2 and measured["spleen"]["components_counted"] == 1


def test_component_sizes_do_not_depend_on_the_arrays_memory_order():
    # predict holds the source-grid labels in Fortran order (NIfTI's); component_sizes then works on the
    # transposed C-ordered view for speed, which must give the same components as a C-ordered copy
    rng = np.random.default_rng(3)
    labels = np.zeros((23, 17, 11), dtype=np.uint8)
    labels[rng.random(labels.shape) < 0.15] = 1  # many small, irregular components
    labels[2:9, 3:12, 1:5] = 2
    labels[14:20, 1:4, 6:10] = 2  # two components of label 2
    labels[20, 15, 9] = 3  # one voxel
    fortran = np.asfortranarray(labels)
    assert fortran.flags.f_contiguous and not fortran.flags.c_contiguous
    expected = tfp.component_sizes(np.ascontiguousarray(labels), [1, 2, 3, 4])
    got = tfp.component_sizes(fortran, [1, 2, 3, 4])
    assert set(got) == {1, 2, 3, 4}
    assert len(expected[1]) > 5 and len(expected[2]) == 2 and expected[3].tolist() == [1] and expected[4].size == 0
    for value in expected:
        assert sorted(got[value].tolist()) == sorted(expected[value].tolist())


def test_an_input_with_another_hu_distribution_is_unfamiliar(fingerprint, held_out):
    array = held_out.image.array.astype(np.float32)
    body = array > THRESHOLD
    array[body] = array[body] * 1.5 + 150.0  # denser tissue everywhere: a different body HU histogram
    changed = Volume(array, held_out.image.affine)
    flags, measured = trust.input_flags(changed.array, changed.grid, fingerprint, TrustOptions())
    assert [f.code for f in flags] == ["hu_distribution"]
    assert measured["hu_wasserstein_hu"] > measured["hu_limit_hu"] >= TrustOptions().hu_distance_floor_hu
    assert flags[0].kind == "unfamiliar input" and "Wasserstein" in flags[0].reason
    _, familiar = trust.input_flags(held_out.image.array, held_out.image.grid, fingerprint, TrustOptions())
    assert familiar["hu_wasserstein_hu"] < familiar["hu_limit_hu"]


def test_an_input_with_another_spacing_and_field_of_view_is_unfamiliar(fingerprint, held_out):
    affine = held_out.image.affine.copy()
    affine[:3, :3] *= 3.0  # same voxels, three times the spacing: a field of view three times as large
    codes = _input_codes(Volume(held_out.image.array, affine), fingerprint)
    assert codes == ["field_of_view", "spacing"]


def test_entropy_is_zero_when_certain_and_one_when_uniform():
    classes = np.ones((4, 4, 4), dtype=np.uint8)
    certain = np.zeros((3, 4, 4, 4), dtype=np.float32)
    certain[1] = 1.0
    assert trust.foreground_entropy(certain, classes) == pytest.approx(0.0, abs=1e-6)
    uniform = np.full((3, 4, 4, 4), 1 / 3, dtype=np.float32)
    assert trust.foreground_entropy(uniform, classes) == pytest.approx(1.0, abs=1e-5)
    assert trust.foreground_entropy(uniform, np.zeros_like(classes)) is None  # nothing predicted
    assert trust.foreground_entropy(None, classes) is None


def test_the_score_combines_entropy_agreement_and_flags_as_documented():
    assert trust.confidence_score(0.2, 0.9, 0) == pytest.approx(0.72)
    assert trust.confidence_score(0.2, 0.9, 2) == pytest.approx(0.72 / 4)
    assert trust.confidence_score(None, None, 1) == pytest.approx(0.5)


def _agreement(predictor, image: np.ndarray):
    cfg = PredictConfig(overlap=0.25)
    window_predictor = WindowPredictor(predictor, "fp32")
    observer = trust.MemberAgreement.attach(window_predictor)
    with_observer = sliding_window_predict(image, predictor, cfg, window_predictor=window_predictor)
    observer.detach()
    without = sliding_window_predict(image, predictor, cfg, window_predictor=window_predictor)
    assert np.array_equal(with_observer.classes, without.classes)  # watching does not change the labels
    return observer.dice()


def test_ensemble_members_that_agree_score_one_and_a_deviating_member_less(held_out):
    image = encoded_image(held_out.label).array.astype(np.float32)
    image = (image + 1000.0) / 2000.0  # the oracle's window
    predictor = oracle_predictor(held_out.label.grid.spacing)
    assert trust.MemberAgreement.attach(WindowPredictor(predictor, "fp32")) is None  # one member: no term
    step = float(predictor.networks[0].levels[1])
    predictor.networks = [predictor.networks[0], IntensityOracle(4, step).eval()]
    assert _agreement(predictor, image) == pytest.approx(1.0)
    deviating = IntensityOracle(4, step).eval()
    deviating.levels[2] = deviating.levels[3]  # this member calls every spleen voxel kidney... and kidneys too
    predictor.networks = [predictor.networks[0], deviating]
    assert _agreement(predictor, image) < 0.95


# ---------------------------------------------------------------------------------------------
# The morning report
# ---------------------------------------------------------------------------------------------

def _changed_hu(path: Path, seed: int) -> Path:
    phantom = make_phantom(seed, SMALL_PHANTOM)
    array = phantom.image.array.astype(np.float32)
    body = array > THRESHOLD
    array[body] = array[body] * 1.5 + 150.0
    save_nifti(Volume(array.astype(np.int16), phantom.image.affine), path)
    return path


def test_the_morning_report_lists_least_trustworthy_first_and_counts_what_needs_review(fingerprint, tmp_path):
    model = write_small_model(tmp_path / "model")
    tfp.write(model, fingerprint)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for seed in (50, 51):
        save_nifti(make_phantom(seed, SMALL_PHANTOM).image, inputs / f"familiar{seed}_0000.nii.gz")
    _changed_hu(inputs / "denser_0000.nii.gz", 52)
    (inputs / "broken_0000.nii.gz").write_bytes(b"not a nifti file")
    cfg = Config()
    cfg.predict.outputs.thumbnails = False
    cfg.predict.trust.review_below = 0.0  # needs review exactly when flagged
    result = run_predict(cfg, model, inputs, tmp_path / "out")
    out = tmp_path / "out"

    with sqlite3.connect(str(out / LEDGER_FILE)) as db:
        db.row_factory = sqlite3.Row
        ledger = {r["case_id"]: dict(r) for r in db.execute("SELECT * FROM cases")}
    done = {case: json.loads(r["summary"])["trust"] for case, r in ledger.items() if r["status"] == "done"}
    assert set(done) == {"familiar50", "familiar51", "denser"} and ledger["broken"]["status"] == "failed"
    denser = done["denser"]
    assert "hu_distribution" in [f["code"] for f in denser["flags"]] and denser["needs_review"]
    assert any(w.startswith("unfamiliar input: body HU distribution") for w in json.loads(ledger["denser"]["warnings"]))
    for case, entry in done.items():  # every flag is a warning of the case, and flags decide review here
        warnings = json.loads(ledger[case]["warnings"])
        assert all(f"{f['kind']}: {f['reason']}" in warnings for f in entry["flags"])
        assert entry["needs_review"] == bool(entry["flags"])
        assert entry["confidence"] == pytest.approx(
            trust.confidence_score(entry["entropy"], entry["ensemble_dice"], len(entry["flags"])), abs=1e-4)
    flagged = sorted(case for case, entry in done.items() if entry["flags"])

    rows = list(csv.DictReader((out / "report.csv").open()))
    assert rows[0]["case_id"] == "broken" and rows[0]["status"] == "failed"
    confidences = [float(r["confidence"]) for r in rows[1:]]
    assert confidences == sorted(confidences) and len(confidences) == 3
    assert sorted(r["case_id"] for r in rows if r["needs_review"] == "yes") == flagged
    page = (out / "report.html").read_text()
    count = re.search(r"<th>needs review</th><td>(\d+) of (\d+) finished case", page)
    assert count and (int(count.group(1)), int(count.group(2))) == (len(flagged), 3)
    assert page.index("broken") < min(page.index(case) for case in done)
    order = [case for case in sorted(done, key=lambda c: (done[c]["confidence"], c))]
    positions = [page.index(f"<tr><td><a href='#{case}'>") for case in order]
    assert positions == sorted(positions)
    assert result.report["needs_review"] == sorted(flagged, key=lambda c: (done[c]["confidence"], c))
    assert page.index("needs review") < page.index("<th>cases</th>")  # the count sits at the top
