"""The CLI: fast help, and one-line errors with the right exit code for bad input."""
import subprocess
import sys
import time

import numpy as np

from pipeline.geometry import Volume, affine_from_parts
from pipeline.synthetic.dicom import SeriesWriteOptions, write_ct_series


def ctseg(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_help_is_fast_and_lists_verbs():
    start = time.perf_counter()
    result = ctseg("--help")
    elapsed = time.perf_counter() - start
    assert result.returncode == 0
    for verb in ("ingest", "preprocess", "train", "predict", "evaluate", "run", "demo"):
        assert verb in result.stdout
    assert elapsed < 3.0  # includes interpreter start-up; torch and MONAI must not be imported
    probe = subprocess.run([sys.executable, "-c", "import sys, pipeline.cli; pipeline.cli.build_parser(); "
                            "print('torch' in sys.modules or 'monai' in sys.modules)"],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "False"


def test_unknown_verb_is_a_usage_error():
    result = ctseg("frobnicate")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def _assert_one_line_error(result, *fragments, code=1):
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ctseg: error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_missing_input_folder(tmp_path):
    missing = tmp_path / "no_such_export"
    _assert_one_line_error(ctseg("ingest", missing, "--output", tmp_path / "out"), str(missing), "does not exist")


def test_empty_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_one_line_error(ctseg("ingest", empty, "--output", tmp_path / "out"), str(empty))


def test_folder_without_ct(tmp_path):
    export = tmp_path / "mr_only"
    volume = Volume(np.zeros((16, 16, 12), np.int16), affine_from_parts(np.eye(3), [1, 1, 2], [0, 0, 0]))
    write_ct_series(volume, export / "series",
                    SeriesWriteOptions(modality="MR", sop_class_uid="1.2.840.10008.5.1.4.1.1.4"))
    (export / "notes.txt").write_text("not dicom")
    result = ctseg("ingest", export, "--output", tmp_path / "out")
    _assert_one_line_error(result, str(export), "no CT series")
    assert (tmp_path / "out" / "series.csv").read_text().count("MR") >= 1  # the reason is on record


def test_unreadable_file(tmp_path):
    folder = tmp_path / "DOE_JOHN_12345"
    folder.mkdir()
    broken = folder / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b\x08 this is not a real gzip stream")
    result = ctseg("ingest", broken, "--output", tmp_path / "out")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    # the file is named; its folder (which may name the patient) only with ingest.full_paths
    assert "broken.nii.gz could not be read" in result.stderr and "DOE_JOHN" not in result.stderr


def test_debug_shows_traceback(tmp_path):
    result = ctseg("ingest", tmp_path / "missing", "--output", tmp_path / "out", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_ingest_imports_no_torch_or_monai(tmp_path):
    """The ingest path (scan, decode, RTSTRUCT rasterisation, NIfTI writes) runs without importing torch or MONAI:
    their import costs seconds per process, more than a small export's whole conversion."""
    from pipeline.synthetic.dicom import write_rtstruct

    image = Volume(np.full((24, 20, 12), -1000, np.int16), affine_from_parts(np.eye(3), [1.5, 1.2, 3.0], [5, -7, 2]))
    image.array[6:18, 5:15, 2:10] = 40
    files = write_ct_series(image, tmp_path / "export" / "P1" / "ct", SeriesWriteOptions(patient_id="P1"))
    write_rtstruct(Volume((np.asarray(image.array) > 0).astype(np.uint8), image.affine), files,
                   tmp_path / "export" / "P1" / "rs" / "RS.dcm", {1: "BODY"})
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, pipeline.cli; code = pipeline.cli.main(sys.argv[1:]); "
         "print('torch' in sys.modules, 'monai' in sys.modules, code)",
         "ingest", str(tmp_path / "export"), "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300)
    assert probe.stdout.strip().splitlines()[-1] == "False False 0", probe.stdout + probe.stderr
    assert list((tmp_path / "out").rglob("*.nii.gz")), "ingest wrote no volume"
