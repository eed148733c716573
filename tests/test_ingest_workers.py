"""Ingesting cases in worker processes (ingest.workers): the same outputs as one process, the same isolation."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import api
from pipeline.config import load_config
from pipeline.geometry import Volume, affine_from_parts
from pipeline.ingest import stage
from pipeline.ingest.workers import choose_workers, usable_cores
from pipeline.synthetic.dicom import SeriesWriteOptions, write_ct_series, write_rtstruct

REPO = Path(__file__).resolve().parents[1]
# written files whose content names the run's timing, its output folder or the worker count
RUN_SPECIFIC = {"report.json", "done.json", "config.yaml"}


def _patient(export: Path, number: int, broken: bool = False) -> None:
    """An oblique, asymmetric CT with an RTSTRUCT of two ROIs (BODY, and a TUMOUR off centre)."""
    shape = (30 + number, 26, 12)
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    body = ((i - 14) / 11.0) ** 2 + ((j - 12) / 9.0) ** 2 < 1
    tumour = ((i - 18) / 4.0) ** 2 + ((j - 9) / 3.0) ** 2 + ((k - 4 - number % 3) / 2.5) ** 2 < 1
    array = np.where(body, 30, -1000).astype(np.int16) + np.where(tumour, 40, 0).astype(np.int16)
    angle = np.deg2rad(7.0 + number)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1.0]])
    image = Volume(array, affine_from_parts(direction, [1.1, 1.3, 2.5], [10.0 * number, -20.0, 5.0]))
    folder = export / f"patient_{number:02d}"
    files = write_ct_series(image, folder / "ct", SeriesWriteOptions(patient_id=f"P{number:03d}",
                                                                     patient_name=f"DOE^{number:03d}"))
    labels = np.where(tumour, 2, np.where(body, 1, 0)).astype(np.uint8)
    write_rtstruct(Volume(labels, image.affine), files, folder / "rs" / "RS.dcm", {1: "BODY", 2: "TUMOUR"})
    if broken:  # a slice cut short: the case is refused naming the file
        files[4].write_bytes(files[4].read_bytes()[:1500])


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers") / "export"
    for number in range(5):
        _patient(root, number, broken=number == 2)
    return root


def _ingest(export: Path, out: Path, workers: int, *extra: str) -> dict:
    cfg = load_config([], [f"output_root={out.parent}", f"ingest.workers={workers}", *extra])
    return api.ingest(cfg, source=export, output=out)


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in RUN_SPECIFIC and "cases" not in p.relative_to(out).parts}


def _case_records(out: Path) -> dict[str, dict]:
    records = {}
    for path in sorted((out / "cases").glob("*.json")):
        record = json.loads(path.read_text())
        record.pop("seconds")
        records[path.name] = json.loads(json.dumps(record).replace(str(out), "OUT"))
    return records


def test_workers_write_the_same_outputs_as_one_process_and_refuse_the_same_case(export, tmp_path):
    one = _ingest(export, tmp_path / "one" / "ingest", 1)
    three = _ingest(export, tmp_path / "three" / "ingest", 3)
    assert one["workers"] == 1 and three["workers"] == 3
    # the same files, byte for byte: images, labels, masks, inventories, provenance, manifest, series table
    ours, theirs = _files(tmp_path / "three" / "ingest"), _files(tmp_path / "one" / "ingest")
    assert sorted(ours) == sorted(theirs)
    assert [name for name in ours if ours[name] != theirs[name]] == []
    assert sum(name.endswith(".nii.gz") for name in ours) == 4 * 3  # image and 2 masks per good case (no dataset)
    # the same case records (but for their timing) and the same case order in the report
    assert _case_records(tmp_path / "three" / "ingest") == _case_records(tmp_path / "one" / "ingest")
    assert [c["id"] for c in three["cases"]] == [c["id"] for c in one["cases"]]
    # the broken case is refused with its one-line reason, the others are done
    (failed,) = [c for c in three["cases"] if c["status"] == "failed"]
    (failed_one,) = [c for c in one["cases"] if c["status"] == "failed"]
    assert failed["error"] == failed_one["error"] and "truncated" in failed["error"]
    assert "\n" not in failed["error"] and failed["traceback"] is None
    assert three["counts"] == {"cases": 5, "ok": 4, "failed": 1, "resumed": 0}


def test_cli_exit_code_and_resume_with_workers(export, tmp_path):
    out = tmp_path / "ingest"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", "import sys, pipeline.cli; code = pipeline.cli.main(sys.argv[1:]); "
               "print('torch' in sys.modules, 'monai' in sys.modules, code)",
               "ingest", str(export), "--output", str(out), "--set", "ingest.workers=2"]
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    # some cases failed: exit code 3; torch and MONAI are not imported on the way
    assert first.stdout.strip().splitlines()[-1] == "False False 3", first.stdout + first.stderr
    assert "Traceback" not in first.stderr and "DOE" not in first.stderr
    # one finished case's record removed, as an interrupted run would leave it: the rerun does that case
    # and the refused one again, and resumes the other three
    report = json.loads((out / "report.json").read_text())
    done = [c["id"] for c in report["cases"] if c["status"] == "ok"]
    (out / "cases" / f"{done[1]}.json").unlink()
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert again.stdout.strip().splitlines()[-1] == "False False 3", again.stdout + again.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["counts"] == {"cases": 5, "ok": 4, "failed": 1, "resumed": 3}
    assert [c["id"] for c in report["cases"] if c["extra"].get("resumed")] == [c for c in done if c != done[1]]


def test_a_worker_that_dies_fails_its_case_only(export, tmp_path, monkeypatch):
    real = stage.ingest_case
    parent = os.getpid()
    victim = {}

    def dying(cfg, dataset, case, *args, **kwargs):
        if os.getpid() != parent and case.image_path.parent.name == "patient_03":
            os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
        return real(cfg, dataset, case, *args, **kwargs)

    monkeypatch.setattr(stage, "ingest_case", dying)
    report = _ingest(export, tmp_path / "ingest", 2)
    by_folder = {c["inputs"]["image"]: c for c in report["cases"]}
    assert report["counts"]["ok"] == 3 and report["counts"]["failed"] == 2
    dead = [c for c in report["cases"] if c["status"] == "failed" and "stopped abruptly" in (c["error"] or "")]
    assert len(dead) == 1 and "\n" not in dead[0]["error"], by_folder
    victim["id"] = dead[0]["id"]
    manifest = json.loads((tmp_path / "ingest" / "manifest.json").read_text())
    assert victim["id"] not in {c["id"] for c in manifest["cases"]} and len(manifest["cases"]) == 3


def test_worker_log_lines_come_in_case_order(export, tmp_path, monkeypatch, caplog):
    real = stage.ingest_case

    def noisy(cfg, dataset, case, *args, **kwargs):
        logging.getLogger("ctseg").warning("worker %d ingests %s", os.getpid(), case.id)
        return real(cfg, dataset, case, *args, **kwargs)

    monkeypatch.setattr(stage, "ingest_case", noisy)
    caplog.set_level(logging.INFO, logger="ctseg")
    report = _ingest(export, tmp_path / "ingest", 3)
    lines = [r.getMessage() for r in caplog.records if " ingests " in r.getMessage()]
    assert [line.split()[-1] for line in lines] == [c["id"] for c in report["cases"]]
    assert all(int(line.split()[1]) != os.getpid() for line in lines)  # they ran in workers, were logged here


def test_workers_setting_is_not_part_of_the_stage_hash(export, tmp_path):
    out = tmp_path / "ingest"
    _ingest(export, out, 1)
    again = _ingest(export, out, 2)  # a rerun with another worker count redoes nothing that was done
    assert again["counts"]["resumed"] == 4 and again["counts"]["failed"] == 1


def test_choose_workers():
    cores = usable_cores()
    gib = float(2**30)
    assert choose_workers(1, [gib] * 8, 100 * gib) == 1
    assert choose_workers(4, [gib] * 8, 0.5 * gib) == 4  # an explicit setting is taken as it is
    assert choose_workers(4, [gib] * 2, 100 * gib) == 2  # never more than the cases to do
    assert choose_workers(0, [gib] * 64, 100 * gib) == min(cores, 64)
    assert choose_workers(0, [gib] * 64, 2.5 * gib) == min(cores, 2)  # the memory budget limits them
    assert choose_workers(0, [8 * gib, gib], 4 * gib) == 1  # the largest case decides; never fewer than 1
    assert choose_workers(0, [], 4 * gib) == 1
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="ingest.workers must be 0"):
        choose_workers(-1, [gib], gib)


def test_a_negative_workers_setting_is_refused_before_anything_is_read(export, tmp_path):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="ingest.workers must be 0"):
        _ingest(export, tmp_path / "ingest", -1)
    assert not (tmp_path / "ingest").exists()


def _same_scan(root: Path) -> None:
    from pipeline.dicom.scan import PROCESS_SCAN_MIN_FILES, scan_export

    threads = scan_export(root, workers=2)
    processes = scan_export(root, workers=2, processes=3)
    assert sum(len(s.files) for s in threads.series) + len(threads.skipped) >= PROCESS_SCAN_MIN_FILES
    assert processes == threads  # every series, slice, skipped file and reason, in the same order
    return threads


def test_scan_in_processes_equals_the_scan_in_threads(export):
    assert _same_scan(export).skipped  # the truncated slice among them


@pytest.mark.shared_data
def test_scan_of_the_sarcoma_export_in_processes_equals_the_scan_in_threads(shared_data):
    _same_scan(shared_data / "sts_ct")


def _double_or_fail(index: int) -> int:
    from pipeline.errors import CaseError

    if index == 3:
        raise CaseError("c3", "refused for a reason")
    if index == 4:
        raise ValueError("a bug")
    if index >= 5:
        import time

        time.sleep(120)
    return 2 * index


def test_case_processes_return_results_and_raise_failures_in_the_main_process():
    from pipeline.ingest.workers import CaseProcesses, WorkerRefusal, WorkerTraceback

    with CaseProcesses(_double_or_fail, [0, 1, 2, 3, 4], 2, str) as processes:
        assert [processes.result(i) for i in (2, 0, 1)] == [4, 0, 2]
        with pytest.raises(WorkerRefusal, match="^case c3: refused for a reason$"):
            processes.result(3)
        with pytest.raises(ValueError, match="a bug") as error:
            processes.result(4)
        assert isinstance(error.value.__cause__, WorkerTraceback) and "_double_or_fail" in str(error.value.__cause__)


def test_aborting_stops_the_workers_mid_case():
    import time

    from pipeline.ingest.workers import CaseProcesses

    processes = CaseProcesses(_double_or_fail, [5, 6], 2, str)
    workers = list(processes.pool._processes.values())
    time.sleep(0.5)
    start = time.monotonic()
    processes.close(abort=True)
    assert time.monotonic() - start < 30 and not any(w.is_alive() for w in workers)
