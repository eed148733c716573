"""Ingest never lets a DICOM tag choose a path outside the output folder, and keeps patient IDs out of names."""
import numpy as np

from pipeline import api
from pipeline.config import load_config
from pipeline.geometry import Volume, affine_from_parts
from pipeline.synthetic.dicom import SeriesWriteOptions, write_ct_series


def _export(root, patient_id, patient_name):
    volume = Volume(np.full((48, 48, 12), 40, np.int16), affine_from_parts(np.eye(3), [0.8, 0.8, 2.5], [0, 0, 0]))
    volume.array[:4] = -1000
    write_ct_series(volume, root / "series", SeriesWriteOptions(patient_id=patient_id, patient_name=patient_name,
                                                                series_number=3))
    return root


def test_tag_values_cannot_escape_the_output_folder(tmp_path):
    export = _export(tmp_path / "export", "../../../../tmp/evil/..", "../../EVIL^NAME")
    out = tmp_path / "out" / "ingest"
    cfg = load_config([], [f"output_root={tmp_path / 'out'}", "ingest.anonymise_case_ids=false"])
    report = api.ingest(cfg, source=export, output=out)
    assert report["counts"]["ok"] == 1
    written = [p.resolve() for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert written and all(str(p).startswith(str(out.resolve())) for p in written)
    assert not (tmp_path / "evil").exists()
    case_id = report["cases"][0]["id"]
    assert "/" not in case_id and ".." not in case_id


def test_default_case_ids_hold_no_patient_data(tmp_path, caplog):
    export = _export(tmp_path / "export", "PATIENT-12345", "DOE^JANE")
    cfg = load_config([], [f"output_root={tmp_path / 'out'}"])
    with caplog.at_level("INFO", logger="ctseg"):
        report = api.ingest(cfg, source=export, output=tmp_path / "out" / "ingest")
    case_id = report["cases"][0]["id"]
    assert case_id.startswith("case_") and "12345" not in case_id
    names = " ".join(str(p) for p in (tmp_path / "out").rglob("*") if "private" not in p.parts)
    assert "12345" not in names and "DOE" not in names
    assert "12345" not in caplog.text and "DOE" not in caplog.text
    mapping = (tmp_path / "out" / "ingest" / "private" / "case_mapping.csv").read_text()
    assert "PATIENT-12345" in mapping  # the one private place that links back
    series_table = (tmp_path / "out" / "ingest" / "series.csv").read_text()
    assert "12345" not in series_table and "DOE" not in series_table
