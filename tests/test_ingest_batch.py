"""A batch of exports with broken ones: every good case finishes, each bad one has its reason, nothing leaks PHI.

Runs the real ``ctseg ingest`` CLI (a subprocess) on one export folder holding 14 patients, 4 of
them broken (29 %): a header claiming Rows=Columns=65535 (RLE, so no pixel length can give it away:
the memory budget must), a 40000-column series whose NIfTI header nibabel cannot write
(HeaderDataError, an exception ingest has no rule for: the stage's isolation must catch it), a NaN
RescaleSlope on a middle slice and a truncated last slice.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pipeline import api
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.geometry import Volume, affine_from_parts

from helpers.dicom_phantoms import phantom_volume, write_phantom

REPO = Path(__file__).resolve().parents[1]
PATIENT = "DOE_JOHN_12345"


def ctseg(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def _good(folder: Path, number: int) -> None:
    write_phantom(folder, phantom_volume(shape=(40, 36, 12)), patient_id=f"P{number:03d}",
                  patient_name=f"PATIENT^{number:03d}", series_number=number)


def _rewrite_all(folder: Path, **attributes) -> None:
    for path in sorted(folder.glob("*.dcm")):
        dataset = pydicom.dcmread(path)
        for keyword, value in attributes.items():
            setattr(dataset, keyword, value)
        dataset.save_as(path)


def build_batch(root: Path) -> dict[str, str]:
    """14 patient folders; returns {folder name: the reason fragment expected} for the broken ones."""
    for number in range(10):
        _good(root / f"patient_{number:02d}", number)
    # RLE-compressed series whose headers claim 65535x65535 pixels (8 GiB per slice)
    huge = root / "patient_huge"
    write_phantom(huge, phantom_volume(shape=(40, 36, 12)), transfer_syntax="rle", patient_id="P100")
    _rewrite_all(huge, Rows=65535, Columns=65535)
    # 40000 columns: a plausible 400 mm wide strip, but more columns than a NIfTI-1 header can hold
    wide = root / "patient_wide"
    write_ct_strip(wide)
    # a NaN RescaleSlope on the middle slice, and a truncated last slice
    nan = root / "patient_nan"
    files = write_phantom(nan, phantom_volume(shape=(40, 36, 12)), patient_id="P102")
    dataset = pydicom.dcmread(files[6])
    dataset["RescaleSlope"]._value = "NaN"
    dataset.save_as(files[6])
    cut = root / f"{PATIENT}"  # an export folder named after the patient (PHI in the folder name)
    files = write_phantom(cut / "CT", phantom_volume(shape=(40, 36, 12)), patient_id="P103")
    files[-1].write_bytes(files[-1].read_bytes()[:2000])
    return {"patient_huge": "memory budget", "patient_wide": "HeaderDataError",
            "patient_nan": f"RescaleSlope is not finite (nan) in {files[6].name}",
            PATIENT: f"{files[-1].name}: truncated"}


def write_ct_strip(folder: Path) -> None:
    array = np.full((40000, 2, 12), 40, np.int16)
    array[::7] = -1000
    write_phantom(folder, Volume(array, affine_from_parts(np.eye(3), [0.01, 0.5, 2.0], [0, 0, 0])), patient_id="P101")


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    export = root / "export"
    expected = build_batch(export)
    out = root / "out"
    result = ctseg("ingest", export, "--output", out)
    return export, out, expected, result


def test_batch_finishes_every_good_case_and_names_each_bad_one(batch):
    export, out, expected, result = batch
    assert result.returncode == 3, result.stderr  # some cases failed: 3, as predict
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["ok"] == 10 and report["counts"]["failed"] == 4, report["counts"]
    failed = [c for c in report["cases"] if c["status"] == "failed"]
    errors = "\n".join(c["error"] for c in failed)
    for fragment in expected.values():
        assert fragment in errors, (fragment, errors)
    # the stage completed (done.json lists the failed cases), the manifest holds the good ones
    done = json.loads((out / "done.json").read_text())
    assert sorted(done["failed_cases"]) == sorted(c["id"] for c in failed)
    assert len(json.loads((out / "manifest.json").read_text())["cases"]) == 10
    assert len(list((out / "imagesTr").glob("*.nii.gz"))) == 10
    # the unforeseen HeaderDataError left its traceback in the case record and errors.log, not on stderr
    (wide,) = [c for c in failed if "HeaderDataError" in c["error"]]
    assert "Traceback" in wide["traceback"] and "HeaderDataError" in wide["traceback"]
    assert "HeaderDataError" in (out / "errors.log").read_text()
    assert "Traceback" not in result.stderr


def test_rerun_retries_only_the_failed_cases(batch, tmp_path):
    export, out, expected, _ = batch
    again = ctseg("ingest", export, "--output", out)
    assert again.returncode == 3, again.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["resumed"] == 10 and report["counts"]["failed"] == 4


def test_no_patient_name_from_a_folder_name_outside_private(batch):
    export, out, expected, result = batch
    leaks = []
    for path in out.rglob("*"):
        if "private" in path.relative_to(out).parts:
            continue
        if PATIENT in path.name or str(export) in str(path):
            leaks.append(f"file name {path}")
        if path.is_file() and (PATIENT in path.read_text(errors="replace") or
                               str(export) in path.read_text(errors="replace")):
            leaks.append(f"content of {path.relative_to(out)}")
    assert not leaks, leaks
    assert PATIENT not in result.stderr and PATIENT not in result.stdout
    # the private folder keeps the link back, owner-only
    private = out / "private"
    assert PATIENT in (private / "sources.csv").read_text()
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in private.iterdir())


def test_full_paths_setting_writes_them(tmp_path):
    export = tmp_path / PATIENT
    _good(export / "CT", 1)
    (export / "CT" / "notes.txt").write_text("not DICOM")
    cfg = load_config([], [f"output_root={tmp_path / 'o'}", "ingest.full_paths=true"])
    report = api.ingest(cfg, source=export, output=tmp_path / "o" / "ingest")
    assert PATIENT in json.dumps(report)


def test_output_inside_the_input_is_refused(tmp_path):
    export = tmp_path / "export"
    _good(export, 1)
    cfg = load_config([], [f"output_root={tmp_path / 'o'}"])
    for output in (export, export / "out"):
        with pytest.raises(ConfigError, match="--output must be outside the input folder"):
            api.ingest(cfg, source=export, output=output)
    result = ctseg("ingest", export, "--output", export / "ingest")
    assert result.returncode == 2 and "must be outside the input folder" in result.stderr
    assert not (export / "ingest").exists()


def test_traceback_on_stderr_only_with_debug(tmp_path):
    export = tmp_path / "export"
    _good(export / "good", 1)
    write_ct_strip(export / "wide")
    quiet = ctseg("ingest", export, "--output", tmp_path / "quiet")
    loud = ctseg("ingest", export, "--output", tmp_path / "loud", "--debug")
    assert quiet.returncode == loud.returncode == 3
    assert "unexpected HeaderDataError" in quiet.stderr and "Traceback" not in quiet.stderr
    assert "Traceback" in loud.stderr and "HeaderDataError" in loud.stderr


def test_error_texts_lose_the_input_folders(tmp_path):
    from pipeline.ingest.stage import PathPrivacy

    series = tmp_path / "export" / PATIENT / "CT"
    series.mkdir(parents=True)
    privacy = PathPrivacy([tmp_path / "export"], full=False)
    text = privacy.redact(f"[Errno 5] I/O error: '{series / 'IM0003.dcm'}' while reading {series}.")
    assert PATIENT not in text and "IM0003.dcm" in text and "<input folder #" in text
    assert privacy.describe(series / "IM0003.dcm").startswith("IM0003.dcm in input folder #")
    assert PathPrivacy([tmp_path / "export"], full=True).redact(str(series)) == str(series)
