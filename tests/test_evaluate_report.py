"""pipeline.evaluate.report: CSV/JSON round trips, the self-contained HTML, thumbnails' orientation and aspect."""
from __future__ import annotations

import io
import json
import math
import re

import numpy as np
import pytest
from matplotlib.image import imread

from pipeline.errors import InputError
from pipeline.evaluate.metrics import MetricOptions, case_metrics
from pipeline.evaluate.report import (
    format_table,
    overlay_thumbnails,
    read_metrics_csv,
    worst_cases,
    write_evaluation_html,
    write_metrics_csv,
    write_summary_json,
)
from pipeline.evaluate.summary import compare_runs, summarise
from pipeline.geometry import affine_from_parts

CLASSES = {1: "liver", 2: "kidney"}


def evaluated_rows(count=8):
    """Real metric rows: case k has its prediction shifted by k voxels, so Dice falls with k."""
    rows = []
    for k in range(count):
        ref = np.zeros((30, 28, 16), np.uint8)
        ref[5:17, 6:18, 3:11] = 1
        ref[20:26, 4:10, 4:9] = 2
        pred = np.roll(ref, k % 6, axis=0)
        if k == 7:
            pred[pred == 2] = 0  # an empty prediction for the kidney
        rows += case_metrics(pred, ref, (0.8, 0.8, 2.0), CLASSES, MetricOptions(workers=1), case_id=f"case{k:02d}")
    return rows


@pytest.fixture(scope="module")
def rows():
    return evaluated_rows()


def test_metrics_csv_round_trip_keeps_values_and_types(rows, tmp_path):
    rows = [dict(r) for r in rows]
    rows[1]["volume_rel_error"] = math.nan
    path = tmp_path / "out" / "metrics.csv"
    write_metrics_csv(rows, path)
    back = read_metrics_csv(path)
    assert len(back) == len(rows) == 16
    for original, read in zip(rows, back):
        for key, value in original.items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(read[key])
            else:
                assert read[key] == value and type(read[key]) is type(value), key
    assert not list(path.parent.glob("*.partial-*"))


def test_compare_runs_from_csv_files(rows, tmp_path):
    better = [dict(r, dice=min(1.0, r["dice"] + 0.05)) for r in rows]
    write_metrics_csv(rows, tmp_path / "a.csv")
    write_metrics_csv(better, tmp_path / "b.csv")
    comparison = compare_runs(read_metrics_csv(tmp_path / "a.csv"), read_metrics_csv(tmp_path / "b.csv"))
    liver = next(r for r in comparison if r["class_name"] == "liver" and r["metric"] == "dice")
    assert liver["mean_difference"] > 0 and liver["p_value"] < 0.05


def test_bad_metrics_csv_is_a_clear_error(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("case_id,dice\nx,0.5\n")
    with pytest.raises(InputError, match="metrics.csv must have the columns"):
        read_metrics_csv(path)
    with pytest.raises(InputError, match="no such file"):
        read_metrics_csv(tmp_path / "missing.csv")


def test_summary_json_is_strict_json(rows, tmp_path):
    rows = [dict(r) for r in rows]
    rows[0]["volume_rel_error"] = math.nan
    summary = summarise(rows)
    summary["extra"] = {"not_a_number": math.nan, "values": [1.0, math.inf]}
    write_summary_json(summary, tmp_path / "summary.json")
    text = (tmp_path / "summary.json").read_text()

    def reject(constant):
        raise AssertionError(f"summary.json holds the non-standard constant {constant}")

    loaded = json.loads(text, parse_constant=reject)
    assert loaded["extra"] == {"not_a_number": None, "values": [1.0, None]}
    assert loaded["classes"]["liver"]["metrics"]["volume_rel_error"]["n_missing"] == 1


def test_worst_cases_by_mean_dice(rows):
    # shift k voxels along a 12-voxel liver and a 6-voxel kidney: Dice (12-k)/12 and (6-k)/6
    # case05: (7/12 + 1/6)/2 = 0.375; case07 (shift 1, kidney missed): (11/12 + 0)/2 = 0.458; case04: 0.5
    assert worst_cases(rows, 3) == ["case05", "case07", "case04"]


def test_format_table(rows):
    table = format_table(rows)
    lines = table.splitlines()
    assert lines[0] == "Dice per case and class"
    assert lines[1].split() == ["case", "liver", "kidney"]  # columns in class-value order
    case00 = next(line for line in lines if line.startswith("case00"))
    assert case00.split() == ["case00", "1.000", "1.000"]
    case07 = next(line for line in lines if line.startswith("case07"))
    assert case07.split()[1:] == ["0.917", "0.000*"]
    assert lines[-2].startswith("mean") and "empty prediction" in lines[-1]


def test_evaluation_html_is_self_contained_and_shows_the_worst_cases(rows, tmp_path):
    ref = np.zeros((30, 28, 16), np.uint8)
    ref[5:17, 6:18, 3:11] = 1
    thumbs = overlay_thumbnails(None, np.roll(ref, 5, axis=0), ref, (0.8, 0.8, 2.0))
    notes = ["Reference resampled with nearest neighbour (--resample-ref).", "<script>alert(1)</script>"]
    path = tmp_path / "evaluation.html"
    write_evaluation_html(rows, summarise(rows), {"case05": thumbs}, path, notes)
    text = path.read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text and "<link" not in text
    sources = re.findall(r"src=['\"]([^'\"]*)", text)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert len(sources) == 7 + 3  # a box plot per metric, three views of case05
    worst_section = text.split("Worst cases")[1].split("All cases")[0]
    for case in worst_cases(rows, 5):
        assert f"{case}: mean Dice" in worst_section
    assert "case00: mean Dice" not in worst_section
    assert "Reference resampled with nearest neighbour" in text and "&lt;script&gt;" in text
    assert "Radiological convention" in text


def colour_pixels(png: bytes, colour: str) -> np.ndarray:
    """(row, column) of pixels close to pure green or magenta."""
    pixels = imread(io.BytesIO(png))[..., :3]
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    if colour == "green":
        mask = (green > 0.6) & (red < 0.35) & (blue < 0.35)
    else:
        mask = (red > 0.6) & (blue > 0.6) & (green < 0.35)
    return np.argwhere(mask)


def test_thumbnails_follow_the_radiological_convention():
    # canonical RAS arrays: i grows to the patient's right, j anterior, k superior
    shape = (40, 40, 20)
    ref = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    ref[28:37, 27:36, 12:18] = 1  # right, anterior, superior
    pred[4:12, 4:12, 12:18] = 1  # left, posterior, same slices
    thumbs = overlay_thumbnails(None, pred, ref, (1.0, 1.0, 1.0))
    assert set(thumbs) == {"axial", "coronal", "sagittal"}
    height, width = imread(io.BytesIO(thumbs["axial"])).shape[:2]
    green, magenta = colour_pixels(thumbs["axial"], "green"), colour_pixels(thumbs["axial"], "magenta")
    assert len(green) and len(magenta)
    # axial: anterior up, patient's right on the image left
    assert green[:, 0].mean() < height / 2 and green[:, 1].mean() < width / 2
    assert magenta[:, 0].mean() > height / 2 and magenta[:, 1].mean() > width / 2
    # coronal: superior up, right on the left
    green = colour_pixels(thumbs["coronal"], "green")
    height, width = imread(io.BytesIO(thumbs["coronal"])).shape[:2]
    assert green[:, 0].mean() < height / 2 and green[:, 1].mean() < width / 2
    # sagittal: superior up, anterior on the left
    green = colour_pixels(thumbs["sagittal"], "green")
    assert green[:, 0].mean() < height / 2 and green[:, 1].mean() < width / 2


def test_thumbnail_aspect_ratio_follows_the_spacing():
    shape, spacing = (120, 60, 20), (0.5, 1.5, 3.0)  # extent 60 × 90 × 60 mm
    ref = np.zeros(shape, np.uint8)
    ref[50:70, 20:40, 8:12] = 1
    thumbs = overlay_thumbnails(np.random.default_rng(0).normal(40, 30, shape), ref, ref, spacing)
    expected = {"axial": 90 / 60, "coronal": 60 / 60, "sagittal": 60 / 90}  # height / width in mm
    for view, ratio in expected.items():
        height, width = imread(io.BytesIO(thumbs[view])).shape[:2]
        assert height / width == pytest.approx(ratio, rel=0.03), view
        assert max(height, width) == pytest.approx(256, abs=2)


def test_thumbnails_with_affine_reorient_to_the_same_pictures():
    shape, spacing = (30, 24, 12), (1.0, 1.2, 2.5)
    ref = np.zeros(shape, np.uint8)
    ref[18:26, 14:20, 6:10] = 1
    pred = np.roll(ref, 2, axis=1)
    image = np.linspace(-1000, 1000, ref.size).reshape(shape)
    canonical = overlay_thumbnails(image, pred, ref, spacing)
    # the same voxels stored as DICOM-like LPS order: i and j flipped, then axes i and k swapped
    stored = [np.transpose(v[::-1, ::-1, :], (2, 1, 0)) for v in (image, pred, ref)]
    direction = np.array([[0.0, 0.0, -1.0], [0.0, -1.0, 0.0], [1.0, 0.0, 0.0]])  # columns: k→S, j→P, i→L
    origin = ((shape[0] - 1) * spacing[0], (shape[1] - 1) * spacing[1], 0.0)
    affine = affine_from_parts(direction, (spacing[2], spacing[1], spacing[0]), origin)
    # RAS of stored index (a, b, c) = canonical index (shape0-1-c, shape1-1-b, a) scaled: check one voxel
    assert np.allclose(affine @ [1, 2, 3, 1], [(shape[0] - 1 - 3) * 1.0, (shape[1] - 1 - 2) * 1.2, 1 * 2.5, 1])
    reoriented = overlay_thumbnails(*stored, spacing=(9.0, 9.0, 9.0), affine=affine)
    for view in canonical:
        assert imread(io.BytesIO(reoriented[view])).shape == imread(io.BytesIO(canonical[view])).shape
        assert np.array_equal(imread(io.BytesIO(reoriented[view])), imread(io.BytesIO(canonical[view]))), view


def test_comparison_csv_and_text(rows, tmp_path):
    from pipeline.evaluate.report import format_comparison, write_comparison, write_comparison_csv

    better = [dict(r, dice=min(1.0, r["dice"] + 0.05)) for r in rows if r["case_id"] != "case03"]
    comparison = compare_runs(rows, better)
    write_comparison_csv(comparison, tmp_path / "comparison.csv")
    import csv

    with open(tmp_path / "comparison.csv", newline="") as handle:
        lines = list(csv.DictReader(handle))
    liver_dice = next(line for line in lines if line["class_name"] == "liver" and line["metric"] == "dice")
    assert liver_dice["cases_only_in_a"] == "case03" and liver_dice["b_is_better"] == "True"
    assert float(liver_dice["mean_difference"]) > 0
    text = format_comparison(comparison)
    assert text.splitlines()[0].split()[:3] == ["class", "metric", "n"]
    assert "cases only in run A (not compared): case03" in text
    liver_line = next(line for line in text.splitlines() if line.startswith("liver") and "Dice" in line
                      and "Surface" not in line)
    assert liver_line.split()[-1] == "yes"
    write_comparison(comparison, tmp_path / "cmp", "runs/a", "runs/b")
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert saved["run_a"] == "runs/a" and len(saved["comparison"]) == len(comparison)
    assert (tmp_path / "cmp" / "comparison.txt").read_text().startswith("A = runs/a\nB = runs/b")
    assert (tmp_path / "cmp" / "comparison.csv").is_file()


def test_summary_keys_duplicate_class_names_apart():
    rows = evaluated_rows(2)
    for row in rows:
        row["class_name"] = "organ"
    assert set(summarise(rows)["classes"]) == {"organ (1)", "organ (2)"}
