"""The real sarcoma export (../shared/data/sts_ct) ingested with no dataset description."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.geometry import canonical_grid, resample_to_grid
from pipeline.volume_io import load_volume


@pytest.mark.shared_data
def test_sts_export_without_dataset_inventories_gtv_masks_equal_the_ibsi_reference(shared_data, tmp_path,
                                                                                  monkeypatch, capsys):
    import pipeline.labels.rtstruct as rtstruct

    real = rtstruct.read_rtstruct
    log_of_calls = tmp_path / "read_rtstruct_calls.txt"  # a file: the cases may be ingested in worker processes

    def counting(path):
        with open(log_of_calls, "a", encoding="utf-8") as handle:
            handle.write(f"{path}\n")
        return real(path)

    monkeypatch.setattr(rtstruct, "read_rtstruct", counting)
    export = shared_data / "sts_ct"
    out = tmp_path / "ingest"
    assert main(["ingest", str(export), "--output", str(out), "--set", f"output_root={tmp_path}"]) == 0
    patients = sorted(p.name for p in export.iterdir() if p.is_dir())
    assert len(patients) == 20
    # every patient's CT is written; MR and PET of STS_001/002 are skipped with a reason
    assert len(list((out / "imagesTr").glob("*_0000.nii.gz"))) == 20
    with open(out / "series.csv", newline="") as handle:
        series = list(csv.DictReader(handle))
    skipped = [row for row in series if row.get("modality") in ("MR", "PT")]
    assert skipped and all(row["selected"] in ("False", "false", "0", "no") and row["reason"] for row in skipped)
    # each CT's RTSTRUCT was parsed once (the MR/PET ones, drawn on other series, not at all)
    calls = log_of_calls.read_text(encoding="utf-8").splitlines()
    assert len(calls) == 20 and len(set(calls)) == 20
    with open(out / "private" / "case_mapping.csv", newline="") as handle:
        mapping = {row["case_id"]: row["patient_id"] for row in csv.DictReader(handle)}
    assert sorted(mapping.values()) == patients
    with open(out / "structures.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 20 and all(row["name"].startswith("GTV_Mass") for row in rows)
    assert all(row["interpreted_type"] and row["empty"] == "False" and float(row["volume_ml"]) > 0 for row in rows)
    # masks equal today's rasterisation: Dice 1.0 against the IBSI's reference mask of every patient
    dices = []
    for row in rows:
        case_id = row["case"]
        folder = mapping[case_id]  # the private mapping: PatientID is the folder name in this export
        reference = load_volume(export / folder / "reference" / "CT_mask.nii.gz")
        mask = load_volume(out / row["mask"])
        assert canonical_grid(mask.grid).difference(canonical_grid(reference.grid), atol_mm=1e-3) is None
        ref = resample_to_grid((reference.array > 0).astype(np.uint8), reference.grid, mask.grid, order=0) > 0
        ours = mask.array > 0
        dices.append(2.0 * float((ours & ref).sum()) / float(ours.sum() + ref.sum()))
    assert min(dices) == 1.0, dices
    suggested = (out / "dataset.suggested.yaml").read_text()
    assert "GTV_Mass_CT" in suggested
    assert "no case could be ingested" not in capsys.readouterr().err


@pytest.mark.shared_data
def test_dicom_seg_segments_are_inventoried_with_masks(shared_data, tmp_path):
    """The dcmqi liver SEG on its 3-slice feet-first CT: the segment's mask equals dcmqi's own NRRD label."""
    from pipeline import api
    from pipeline.config import load_config

    folder = shared_data / "dcmqi"
    out = tmp_path / "ingest"
    cfg = load_config([], [f"output_root={tmp_path}", "ingest.select.min_slices=1",
                           "ingest.plausibility.min_slices=1"])
    report = api.ingest(cfg, source=folder, output=out)
    assert report["counts"]["ok"] == 1
    with open(out / "structures.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["kind"], r["number"], r["name"]) for r in rows] == [("SEG", "1", "Liver")]
    row = rows[0]
    assert row["interpreted_type"] and len(row["color"].split()) == 3 and row["empty"] == "False"
    mask = load_volume(out / row["mask"])
    expected = load_volume(folder / "liver_seg.nrrd")
    ref = resample_to_grid(expected.array.astype(np.uint8), expected.grid, mask.grid, order=0)
    np.testing.assert_array_equal(mask.array != 0, ref != 0)
    assert int(row["voxels"]) == int((expected.array != 0).sum())
