"""Predict is never silently wrong: broken inputs fail alone with a reason, a full disk leaves nothing that looks done,
folder names (patient names) stay under private/, the output folder cannot be an input, model.json is strict."""
from __future__ import annotations

import json
import re
import shutil
import sqlite3
import stat
import subprocess
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline import atomic
from pipeline.cli import main as cli_main
from pipeline.config import Config
from pipeline.errors import ConfigError, CtsegError, InputError
from pipeline.geometry import Volume
from pipeline.predict import stage as predict_stage
from pipeline.predict.ledger import LEDGER_FILE, sha256_file
from pipeline.predict.stage import EXIT_OK, EXIT_SOME_FAILED, run_predict
from pipeline.synthetic.phantoms import PhantomOptions, make_phantom
from pipeline.volume_io import save_nifti

from helpers.predict import SMALL_PHANTOM, write_phantom_nifti, write_small_model

PATIENT = "DOE_JOHN_12345"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_small_model(tmp_path_factory.mktemp("model") / "model")


def _config(**predict) -> Config:
    cfg = Config()
    cfg.predict.outputs.thumbnails = False
    for key, value in predict.items():
        setattr(cfg.predict, key, value)
    return cfg


def _ledger(folder: Path) -> dict:
    with sqlite3.connect(str(folder / LEDGER_FILE)) as db:
        db.row_factory = sqlite3.Row
        return {row["case_id"]: dict(row) for row in db.execute("SELECT * FROM cases")}


def _huge_header_nifti(path: Path) -> Path:
    """A NIfTI whose header claims 32000^3 int16 voxels (65 TB) on a file of a few hundred bytes."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape((32000, 32000, 32000))
    header.set_sform(np.eye(4), code=1)
    path.write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 256)
    return path


def _one_slice(path: Path, seed: int) -> Path:
    phantom = make_phantom(seed, SMALL_PHANTOM)
    save_nifti(Volume(np.ascontiguousarray(phantom.image.array[:, :, 10:11]), phantom.image.affine), path)
    return path


def _with_nan(path: Path, seed: int) -> Path:
    phantom = make_phantom(seed, SMALL_PHANTOM)
    array = phantom.image.array.astype(np.float32)
    array[10, 12, 5] = np.nan
    save_nifti(Volume(array, phantom.image.affine), path)
    return path


def _sheared(path: Path, seed: int) -> Path:
    phantom = make_phantom(seed, SMALL_PHANTOM)
    affine = phantom.image.affine.copy()
    affine[:3, 1] += 0.4 * affine[:3, 0]  # the j axis leans towards i: not orthonormal
    save_nifti(Volume(phantom.image.array, affine), path)
    return path


def _files_outside_private(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.is_file() and "private" not in p.relative_to(out).parts]


def test_a_batch_with_a_third_broken_finishes_every_good_case_and_names_each_bad_one(tmp_path: Path, model_dir,
                                                                                      capfd):
    """15 cases from a list file (NIfTI files and a DICOM series), 5 broken (a missing list line, a truncated file, a
    65 TB header, NaN voxels, one slice for a 3D model), all under a folder named after the patient; exit 3,
    report.json, no name leaks."""
    scans = tmp_path / "exports" / PATIENT / "nifti"
    scans.mkdir(parents=True)
    good = [write_phantom_nifti(scans / f"case{n:02d}.nii.gz", seed=n) for n in range(9)]
    data = good[0].read_bytes()
    (scans / "truncated.nii.gz").write_bytes(data[: len(data) // 3])
    _huge_header_nifti(scans / "huge.nii")
    _with_nan(scans / "nanvox.nii.gz", seed=20)
    single = tmp_path / "exports" / PATIENT / "single"
    single.mkdir()
    _one_slice(single / "oneslice.nii.gz", seed=21)
    from pipeline.synthetic.dicom import SeriesWriteOptions, write_ct_series

    phantom = make_phantom(22, PhantomOptions(shape=48, slices=16, noise_hu=5.0))
    write_ct_series(phantom.image, tmp_path / "exports" / PATIENT / "dicom" / f"CT_{PATIENT}",
                    SeriesWriteOptions(patient_name="DOE^JOHN", patient_id="12345"))
    listing = tmp_path / "exports" / "tonight.txt"
    listing.write_text(f"{PATIENT}/nifti\n{PATIENT}/missing_{PATIENT}.nii.gz\n{PATIENT}/single/oneslice.nii.gz\n"
                       f"{PATIENT}/dicom\n")
    out = tmp_path / "out"

    code = cli_main(["predict", "--model", str(model_dir), "--input", str(listing), "--output", str(out),
                     "--set", "predict.outputs.thumbnails=false"])

    assert code == EXIT_SOME_FAILED == 3
    report = json.loads((out / "report.json").read_text())
    cases = {c["id"]: c for c in report["cases"]}
    assert len(cases) == 15 and report["counts"]["ok"] == 10 and report["counts"]["failed"] == 5
    assert [c["status"] for cid, c in cases.items() if cid.startswith("case_")] == ["ok"]
    for n in range(9):
        assert cases[f"case{n:02d}"]["status"] == "ok"
        label = nib.load(str(out / f"case{n:02d}.nii.gz"))
        assert label.shape == nib.load(str(good[n])).shape
    reasons = {cid: c["error"] for cid, c in cases.items() if c["status"] == "failed"}
    assert set(reasons) == {"tonight-line2", "truncated", "huge", "nanvox", "oneslice"}
    assert "line 2" in reasons["tonight-line2"] and "does not exist" in reasons["tonight-line2"]
    assert "truncated.nii.gz" in reasons["truncated"] and "could not be read" in reasons["truncated"]
    assert "huge.nii" in reasons["huge"] and "MemoryError" in reasons["huge"]
    assert "nanvox.nii.gz" in reasons["nanvox"] and "not finite" in reasons["nanvox"]
    assert "oneslice.nii.gz" in reasons["oneslice"] and "1 slice(s)" in reasons["oneslice"]
    assert all(reason.count("\n") == 0 for reason in reasons.values())
    for case_id in reasons:  # a failed case leaves no output under a final name
        assert not predict_stage.case_outputs(out, case_id)
    assert not list(out.rglob(f"*{atomic.PARTIAL_MARK}*"))
    assert {row["status"] for row in _ledger(out).values()} == {"done", "failed"}

    # privacy: the patient's folder name only under private/ (owner-only), nowhere else, not in the logs
    leaks = [p.relative_to(out) for p in _files_outside_private(out) if PATIENT.encode() in p.read_bytes()]
    assert leaks == []
    captured = capfd.readouterr()
    assert PATIENT not in captured.err and PATIENT not in captured.out
    assert (out / "predict.log").is_file() and "tonight-line2: failed" in (out / "predict.log").read_text()
    private = out / "private"
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert stat.S_IMODE((private / "inputs.json").stat().st_mode) == 0o600
    assert PATIENT in (private / "inputs.json").read_text()

    # with predict.full_paths the full paths are shown (the documented opt-in)
    out2 = tmp_path / "out_full"
    cfg = _config(full_paths=True)
    result = run_predict(cfg, model_dir, listing, out2)
    assert result.exit_code == 3 and PATIENT in json.dumps(result.report)


def test_an_unexpected_error_inside_one_case_fails_only_that_case_with_its_traceback(tmp_path: Path, model_dir,
                                                                                     monkeypatch, capfd):
    """A bug hit overnight (here a fault injected into the post-processing of one case) leaves its traceback in
    the ledger, report.json and predict.log; stderr gets one line; the other cases finish."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for n in range(3):
        write_phantom_nifti(inputs / f"case{n}.nii.gz", seed=n)
    real = predict_stage.postprocess
    calls = []

    def faulty(labels, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("injected fault in case 2 of 3")
        return real(labels, *args, **kwargs)

    monkeypatch.setattr(predict_stage, "postprocess", faulty)
    out = tmp_path / "out"
    result = run_predict(_config(), model_dir, inputs, out)
    assert result.exit_code == 3
    cases = {c["id"]: c for c in result.report["cases"]}
    assert [cases[f"case{n}"]["status"] for n in range(3)] == ["ok", "failed", "ok"]
    assert "out of memory" in cases["case1"]["error"]
    assert "injected fault" in cases["case1"]["traceback"] and "Traceback" in cases["case1"]["traceback"]
    assert "injected fault" in _ledger(out)["case1"]["traceback"]
    assert "injected fault" in (out / "predict.log").read_text()
    assert "Traceback" not in capfd.readouterr().err  # only with --debug
    assert not predict_stage.case_outputs(out, "case1")
    assert json.loads((out / "report.json").read_text())["counts"]["failed"] == 1


def test_implausible_volumes_are_refused_by_default_and_named_when_allowed(tmp_path: Path, model_dir):
    inputs = tmp_path / "in"
    inputs.mkdir()
    _sheared(inputs / "sheared.nii.gz", seed=3)
    _one_slice(inputs / "thin.nii.gz", seed=4)
    refused = run_predict(_config(), model_dir, inputs, tmp_path / "out")
    errors = {c["id"]: c["error"] for c in refused.report["cases"]}
    assert "orthonormal" in errors["sheared"] and "slice" in errors["thin"]
    allowed = run_predict(_config(refuse_implausible=False, min_slices=1), model_dir, inputs, tmp_path / "out2")
    assert allowed.exit_code == 0
    warnings = {c["id"]: " ".join(c["warnings"]) for c in allowed.report["cases"]}
    assert "orthonormal" in warnings["sheared"]
    assert "min_patch_coverage" in warnings["thin"]  # a 3D model on one slice: named
    provenance = json.loads((tmp_path / "out2" / "thin.provenance.json").read_text())
    assert any("min_patch_coverage" in w for w in provenance["warnings"])


def test_an_implausibly_large_grid_is_refused_with_its_size_not_a_memory_error(tmp_path: Path, model_dir):
    phantom = make_phantom(5, SMALL_PHANTOM)
    inputs = tmp_path / "in"
    inputs.mkdir()
    affine = phantom.image.affine.copy()
    affine[:3, :3] *= 400.0  # spacing in the wrong unit: a body 25 m wide
    save_nifti(Volume(phantom.image.array, affine), inputs / "giant.nii.gz")
    refused = run_predict(_config(), model_dir, inputs, tmp_path / "out")
    assert "max_extent_mm" in refused.report["cases"][0]["error"]
    anyway = run_predict(_config(refuse_implausible=False), model_dir, inputs, tmp_path / "out2")
    error = anyway.report["cases"][0]["error"]
    assert anyway.exit_code == 3 and "must fit in memory on the model grid" in error and "GB available" in error


def test_output_folder_equal_to_or_inside_the_input_is_refused(tmp_path: Path, model_dir, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_phantom_nifti(inputs / "case0.nii.gz", seed=0)
    for out in (inputs, inputs / "results"):
        code = cli_main(["predict", "--model", str(model_dir), "--input", str(inputs), "--output", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "--output must be outside the input folder" in err
    assert not (inputs / "results").exists() and not (inputs / LEDGER_FILE).exists()
    listing = tmp_path / "list.txt"
    listing.write_text("in\n")
    with pytest.raises(ConfigError, match="outside the input"):  # a folder named in a list is an input too
        run_predict(_config(), model_dir, listing, inputs / "sub")


# ---------------------------------------------------------------------------------------------
# model.json
# ---------------------------------------------------------------------------------------------

def _edit_model(model_dir: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / f"model_{uuid.uuid4().hex[:6]}"
    shutil.copytree(model_dir, copy)
    spec = json.loads((copy / "model.json").read_text())
    edit(spec)
    (copy / "model.json").write_text(json.dumps(spec))
    return copy


@pytest.mark.parametrize("edit, expected", [
    (lambda s: s.update(threshold=0.5), r"unknown key 'threshold'; valid keys are format, network"),
    (lambda s: s["network"]["kwargs"].update(chanels=[4, 8]), r"unknown key network.kwargs.'chanels' for UNet; "
                                                               r"valid keys are .*channels"),
    (lambda s: s.update(patch_size="32"), r"patch_size must be a list of 3 positive integers"),
    (lambda s: s.update(mode="4d"), r"mode must be one of 3d, 2d, got '4d'"),
    (lambda s: s["labels"][0].update(value="1"), r"labels\[0\].value must be an integer 1-65535, got '1'"),
    (lambda s: s["network"].update(name="VNet"), r"network.name must be one of UNet, DynUNet"),
    (lambda s: s["network"].update(in_channels=1.5), r"network.in_channels must be a positive integer"),
    (lambda s: s["folds"][0].update(weights="x.pt"), r"unknown key folds\[0\].'weights'"),
    (lambda s: s["plan"].update(target_spacing=[3, 3]), r"plan.target_spacing must be a list of 3 positive"),
    (lambda s: s["network"]["kwargs"].update(strides="two"), r"network spec kwargs must be valid arguments of UNet"),
])
def test_model_json_is_validated_strictly_with_one_line_naming_the_key(tmp_path: Path, model_dir, edit, expected):
    from pipeline.models.loader import load_model_folder

    broken = _edit_model(model_dir, tmp_path, edit)
    with pytest.raises(InputError, match=expected) as caught:
        load_model_folder(broken)
    assert "\n" not in str(caught.value)


def test_labels_with_coded_concepts_are_valid(tmp_path: Path, model_dir):
    # training writes each label's SNOMED codes and RT type into model.json (pipeline.labels.codes); the strict
    # reader must accept what the writer writes (a trained model was refused before this was checked together)
    from pipeline.models.loader import load_model_folder

    coded = _edit_model(model_dir, tmp_path, lambda s: s["labels"][0].update(
        category={"value": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"},
        type={"value": "10200004", "scheme": "SCT", "meaning": "Liver"}, rt_type="ORGAN"))
    assert load_model_folder(coded).spec["labels"][0]["rt_type"] == "ORGAN"


def test_a_network_too_big_for_the_memory_budget_is_refused_before_it_is_built(tmp_path: Path, model_dir):
    import time

    from pipeline.predict.model import load_predictor

    huge = _edit_model(model_dir, tmp_path, lambda s: s["network"]["kwargs"].update(channels=[32768, 32768]))
    started = time.perf_counter()
    with pytest.raises(InputError, match=r"must fit the memory budget of .* GB, got an estimated [0-9.]+ GB"):
        load_predictor(huge, __import__("torch").device("cpu"))
    assert time.perf_counter() - started < 30  # refused from the estimate, not after allocating
    with pytest.raises(InputError, match="network_budget_gb"):  # and as a batch error of run_predict
        inputs = tmp_path / "in"
        inputs.mkdir()
        write_phantom_nifti(inputs / "c.nii.gz", seed=1)
        run_predict(_config(), huge, inputs, tmp_path / "out")
    normal = load_predictor(model_dir, __import__("torch").device("cpu"), memory_budget_gb=1.0)
    assert normal.networks


# ---------------------------------------------------------------------------------------------
# Disk full
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path: Path):
    """A 4 MB tmpfs mounted for the test (needs root); skipped with the reason where mounting is impossible."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command on this machine: cannot create a small file system to fill")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(folder: Path, leave_bytes: int) -> Path:
    """A filler file that leaves about ``leave_bytes`` free on the file system of ``folder``."""
    filler = folder / "filler.bin"
    free = shutil.disk_usage(folder).free
    with open(filler, "wb") as handle:
        remaining = max(0, free - leave_bytes)
        block = b"\0" * (1 << 16)
        while remaining > 0:
            chunk = block[: min(len(block), remaining)]
            try:
                handle.write(chunk)
                handle.flush()
            except OSError:
                break
            remaining -= len(chunk)
    return filler


def test_disk_full_fails_the_case_leaves_no_orphans_and_a_rerun_completes(tmp_path: Path, model_dir, small_disk):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for n in range(4):
        write_phantom_nifti(inputs / f"case{n}.nii.gz", seed=40 + n)
    # one case's outputs, measured on an ordinary disk
    probe = run_predict(_config(), model_dir, inputs / "case0.nii.gz", tmp_path / "probe")
    assert probe.exit_code == 0
    case_bytes = sum(p.stat().st_size for p in predict_stage.case_outputs(tmp_path / "probe", "case0"))

    out = small_disk / "out"
    out.mkdir()
    first = run_predict(_config(), model_dir, inputs / "case0.nii.gz", out)  # ledger and shared files exist
    assert first.exit_code == 0
    filler = _fill(small_disk, leave_bytes=int(case_bytes * 1.5) + 64 * 1024)

    result = run_predict(_config(), model_dir, inputs, out)

    assert result.exit_code == 3
    rows = _ledger(out)
    assert "running" not in {row["status"] for row in rows.values()}
    failed = {cid: row["error"] for cid, row in rows.items() if row["status"] == "failed"}
    not_started = {cid for cid, row in rows.items() if row["status"] == "pending"}
    assert failed or result.report.get("stopped")
    for message in list(failed.values()) + ([result.report["stopped"]] if result.report.get("stopped") else []):
        assert "output disk full (" in message and "MB free); free space and rerun" in message
    for case_id, row in rows.items():
        outputs = predict_stage.case_outputs(out, case_id)
        if row["status"] == "done":  # done: every recorded output is there with its checksum
            recorded = json.loads(row["outputs"])
            assert {out / e["path"] for e in recorded.values()} == set(outputs)
            assert all(sha256_file(out / e["path"]) == e["sha256"] for e in recorded.values())
        else:  # not finished: nothing under a final name
            assert outputs == [], (case_id, outputs)
    assert not list(out.rglob(f"*{atomic.PARTIAL_MARK}*"))
    assert (out / "report.json").is_file()
    assert set(failed) | not_started, "the disk should have filled during the batch"

    filler.unlink()  # space freed: the rerun finishes every case
    again = run_predict(_config(), model_dir, inputs, out)  # a plain rerun: disk-full failures are retried
    assert again.exit_code == EXIT_OK
    assert {row["status"] for row in _ledger(out).values()} == {"done"}
    for n in range(4):
        assert nib.load(str(out / f"case{n}.nii.gz")).shape == nib.load(str(inputs / f"case{n}.nii.gz")).shape

    # a disk already full when the batch starts: one clear line (not a raw OperationalError), or, where SQLite
    # can still reuse its write-ahead log, the new case fails with the same message; the done cases stay done
    write_phantom_nifti(inputs / "case9.nii.gz", seed=49)
    filler = _fill(small_disk, leave_bytes=0)
    try:
        late = run_predict(_config(), model_dir, inputs, out)
    except CtsegError as exc:
        assert re.search(r"output disk full \(\d+ MB free\); free space and rerun", str(exc)), exc
    else:
        assert late.exit_code == 3
        assert "output disk full" in {c["id"]: c for c in late.report["cases"]}["case9"]["error"]
    filler.unlink()
    rows = _ledger(out)
    assert all(rows[f"case{n}"]["status"] == "done" for n in range(4)) and "running" not in {
        row["status"] for row in rows.values()}
    assert not predict_stage.case_outputs(out, "case9")


def test_redaction_hides_folder_names_but_leaves_ordinary_words(tmp_path: Path):
    from pipeline.predict import privacy
    from pipeline.predict.cases import Case

    root = tmp_path / "exports"
    (root / PATIENT / "in").mkdir(parents=True)
    case = Case("c1", str(root / PATIENT / "in" / "ct.nii.gz"), path=root / PATIENT / "in" / "ct.nii.gz")
    redact = privacy.case_redactor(case, root)
    text = (f"{root}/{PATIENT}/in/ct.nii.gz could not be read; skipped {PATIENT}/in/x.dcm; folder {PATIENT} "
            f"loaded in 2 s; {root}/other.nii.gz")
    cleaned = redact(text)
    assert PATIENT not in cleaned and str(root) not in cleaned
    assert cleaned.startswith("ct.nii.gz could not be read; skipped x.dcm;") and "loaded in 2 s" in cleaned
    assert "<input>/other.nii.gz" in cleaned
    assert privacy.Redactor(enabled=False)(text) == text
