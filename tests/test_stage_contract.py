"""The stage contract: rerun does nothing, a changed setting reruns, a killed stage resumes cleanly."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.config import load_config
from pipeline.geometry import Volume, affine_from_parts
from pipeline.stage import StageRun
from pipeline.volume_io import load_volume, save_nifti


def _volume_folder(folder: Path, count: int, shape=(64, 48, 40)) -> Path:
    rng = np.random.default_rng(0)
    images = folder / "imagesTr"
    labels = folder / "labelsTr"
    for index in range(count):
        affine = affine_from_parts(np.diag([-1.0, 1.0, 1.0]), [0.8, 0.9, 2.5], [10.0 * index, -30, 5])
        hu = rng.normal(40, 20, shape).astype(np.int16)
        hu[:5] = -1000
        label = np.zeros(shape, np.uint8)
        label[10:30, 5:20, 4 + index % 3:20] = 1
        save_nifti(Volume(hu, affine), images / f"c{index:02d}_0000.nii.gz")
        save_nifti(Volume(label, affine), labels / f"c{index:02d}.nii.gz")
    return folder


def _finished_cases(out: Path) -> int:
    folder = out / "cases"  # a record being written (its .partial- file) is not a finished case
    return len([p for p in folder.glob("*.json") if ".partial-" not in p.name]) if folder.exists() else 0


def test_stage_run_skips_done_cases_and_reruns_on_new_hash(tmp_path):
    outputs = tmp_path / "stage"
    run = StageRun.open("demo-stage", outputs, "hash-a")
    calls = []
    for case in ["a", "b"]:
        with run.case(case) as record:
            calls.append(case)
            target = outputs / f"{case}.txt"
            target.write_text(case)
            record.outputs = {"file": str(target)}
    run.finish()
    assert StageRun.open("demo-stage", outputs, "hash-a").skipped_up_to_date
    again = StageRun.open("demo-stage", outputs, "hash-b")
    assert not again.skipped_up_to_date and not (outputs / "done.json").exists()
    with again.case("a") as record:
        assert record is not None  # a new hash redoes the case
    # the same hash resumes done cases, unless forced: --force redoes every case
    with StageRun.open("demo-stage", outputs, "hash-a").case("b") as record:
        assert record is None
    with StageRun.open("demo-stage", outputs, "hash-a", force=True).case("b") as record:
        assert record is not None


def test_ingest_rerun_does_nothing(tmp_path):
    source = _volume_folder(tmp_path / "src", 2)
    out = tmp_path / "ingest"
    cfg = load_config([], [f"output_root={tmp_path}"])
    from pipeline import api

    first = api.ingest(cfg, source=source, output=out)
    assert first["counts"]["ok"] == 2
    stamp = (out / "done.json").stat().st_mtime_ns
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}
    second = api.ingest(cfg, source=source, output=out)
    assert second["status"] == "up_to_date"
    assert (out / "done.json").stat().st_mtime_ns == stamp
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")} == mtimes
    changed = load_config([], [f"output_root={tmp_path}", "ingest.compresslevel=6"])
    third = api.ingest(changed, source=source, output=out)
    assert third["counts"]["ok"] == 2 and third["counts"]["resumed"] == 0


def test_killed_ingest_resumes_without_corrupt_files(tmp_path):
    source = _volume_folder(tmp_path / "src", 8, shape=(160, 160, 80))
    out = tmp_path / "ingest"
    command = [sys.executable, "-m", "pipeline", "ingest", str(source), "--output", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and _finished_cases(out) < 2:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "done.json").exists(), "the stage finished before it could be killed; use more cases"
    finished_before = _finished_cases(out)
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["ok"] == 8
    assert report["counts"]["resumed"] >= finished_before >= 1
    assert not [p for p in out.rglob("*") if ".partial-" in p.name]
    for path in sorted((out / "imagesTr").glob("*.nii.gz")):
        assert load_volume(path).array.shape == (160, 160, 80)  # every file is complete and readable
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["cases"]) == 8


def test_any_exception_fails_only_its_case_and_the_stage_completes(tmp_path, caplog):
    """MemoryError, a library's exception or a bug inside one case: recorded with its traceback, batch goes on."""
    from nibabel.spatialimages import HeaderDataError

    outputs = tmp_path / "stage"
    run = StageRun.open("demo-stage", outputs, "hash-a")
    failures = {"a": MemoryError("Unable to allocate 8.00 GiB"), "b": HeaderDataError("shape does not fit"),
                "c": KeyError("bug")}
    for case_id in ["a", "ok1", "b", "c", "ok2"]:
        with run.case(case_id) as record:
            if case_id in failures:
                raise failures[case_id]
            record.outputs = {}
    report = run.finish(allow_failed=True)
    assert report["counts"] == {"cases": 5, "ok": 2, "failed": 3, "resumed": 0}
    records = {r["id"]: r for r in report["cases"]}
    assert "unexpected MemoryError: Unable to allocate 8.00 GiB" in records["a"]["error"]
    assert "HeaderDataError" in records["b"]["traceback"] and "Traceback" in records["b"]["traceback"]
    assert json.loads((outputs / "cases" / "c.json").read_text())["traceback"].count("KeyError") >= 1
    assert (outputs / "errors.log").read_text().count("Traceback") == 3
    assert "Traceback" not in caplog.text  # the traceback is logged at debug level only (stderr with --debug)
    done = json.loads((outputs / "done.json").read_text())
    assert done["failed_cases"] == ["a", "b", "c"]
    # a rerun is not "up to date": it retries the failed cases and resumes the finished ones
    again = StageRun.open("demo-stage", outputs, "hash-a")
    assert not again.skipped_up_to_date and again.is_case_done("ok1") and not again.is_case_done("a")
