"""The evaluate stage and CLI: pairing by case id, grid checks, --resample-ref, and --compare of two runs."""
import json
import subprocess
import sys

import numpy as np

from pipeline.geometry import Volume, affine_from_parts
from pipeline.volume_io import save_nifti

AFFINE = affine_from_parts(np.diag([-1.0, 1.0, -1.0]), [0.8, 0.9, 2.5], [40, -20, 10])


def _write_run(folder, shift, cases=4):
    for index in range(cases):
        ref = np.zeros((40, 36, 20), np.uint8)
        ref[8:24, 6:20, 4:14] = 1
        ref[28:34, 24:30, 6:12] = 2
        pred = np.roll(ref, shift + index % 2, axis=0)
        save_nifti(Volume(ref, AFFINE), folder / "ref" / f"c{index}.nii.gz")
        save_nifti(Volume(pred, AFFINE), folder / "pred" / f"c{index}.nii.gz")


def ctseg(*args):
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_evaluate_then_compare_two_runs(tmp_path):
    _write_run(tmp_path / "a", shift=3)
    _write_run(tmp_path / "b", shift=1)
    for run in ("a", "b"):
        result = ctseg("evaluate", "--pred", tmp_path / run / "pred", "--ref", tmp_path / run / "ref",
                       "--output", tmp_path / run / "eval")
        assert result.returncode == 0, result.stderr
        assert "c0" in result.stdout  # the printed Dice table
        rows = (tmp_path / run / "eval" / "metrics.csv").read_text().splitlines()
        assert len(rows) == 1 + 4 * 2
        assert (tmp_path / run / "eval" / "evaluation.html").is_file()
    result = ctseg("evaluate", "--compare", tmp_path / "a" / "eval", tmp_path / "b" / "eval",
                   "--output", tmp_path / "cmp")
    assert result.returncode == 0, result.stderr
    comparison = json.loads((tmp_path / "cmp" / "report.json").read_text())["comparison"]
    dice = [row for row in comparison if row["metric"] == "dice"]
    assert dice and all(row["mean_b"] > row["mean_a"] for row in dice)  # the smaller shift is better
    assert "Wilcoxon" in result.stdout


def test_mismatched_grid_is_a_clear_error_unless_resampling_is_asked(tmp_path):
    _write_run(tmp_path, shift=0, cases=1)
    shifted = affine_from_parts(np.diag([-1.0, 1.0, -1.0]), [0.8, 0.9, 2.5], [41, -20, 10])
    ref = np.zeros((40, 36, 20), np.uint8)
    ref[8:24, 6:20, 4:14] = 1
    save_nifti(Volume(ref, shifted), tmp_path / "ref" / "c0.nii.gz")
    result = ctseg("evaluate", "--pred", tmp_path / "pred", "--ref", tmp_path / "ref", "--output", tmp_path / "e1")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    report = json.loads((tmp_path / "e1" / "report.json").read_text())
    assert "same voxel grid" in report["cases"][0]["error"] and "origin" in report["cases"][0]["error"]
    result = ctseg("evaluate", "--pred", tmp_path / "pred", "--ref", tmp_path / "ref", "--output", tmp_path / "e2",
                   "--resample-ref")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "e2" / "report.json").read_text())
    assert any("resampled" in note for note in report["notes"])


def test_evaluating_the_same_folders_again_gives_the_same_metrics(tmp_path):
    """A second evaluation of unchanged inputs recomputes every case instead of failing on resumed ones."""
    _write_run(tmp_path, shift=2)
    outputs = []
    for _ in range(2):
        result = ctseg("evaluate", "--pred", tmp_path / "pred", "--ref", tmp_path / "ref",
                       "--output", tmp_path / "eval")
        assert result.returncode == 0, result.stderr
        outputs.append((tmp_path / "eval" / "metrics.csv").read_text())
    assert outputs[0] == outputs[1] and len(outputs[1].splitlines()) == 1 + 4 * 2
