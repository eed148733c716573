"""A radiotherapy export just works: ingest with no dataset, the structure inventory, masks, suggested names, relabel.

The synthetic export is real DICOM written with pipeline.synthetic.dicom: per patient a CT series and one
RTSTRUCT whose ROIs overlap (GTV inside PTV inside BODY) and whose names vary between patients.
"""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import yaml

from pipeline import api
from pipeline.config import load_config
from pipeline.geometry import Volume
from pipeline.volume_io import load_volume

from helpers.rt_export import PATIENTS, write_rt_export

# patient -> (phantom geometry, {ROI name: which mask}); "none" writes an ROI without contours








@pytest.fixture(scope="module")
def rt_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("rt") / "export"
    return root, write_rt_export(root)


def _on(mask: np.ndarray, image: Volume, grid) -> np.ndarray:
    """``mask`` (on the written image's grid) on ``grid``: ingest may store a feet-first series in another voxel
    order; the voxels are the same (exact reordering, checked)."""
    from pipeline.geometry import canonical_grid, resample_to_grid

    assert canonical_grid(image.grid).difference(canonical_grid(grid), atol_mm=1e-3) is None
    return resample_to_grid(mask.astype(np.uint8), image.grid, grid, order=0) != 0


def _rows(folder):
    with open(folder / "structures.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _case_of_patient(folder) -> dict[str, str]:
    with open(folder / "private" / "case_mapping.csv", newline="") as handle:
        return {row["patient_id"]: row["case_id"] for row in csv.DictReader(handle)}


def _corrupt_dicom_keeping_size_and_time(root) -> int:
    """Overwrite every DICOM file with zeros of the same size and restore its modification time."""
    count = 0
    for path in root.rglob("*.dcm"):
        info = path.stat()
        path.write_bytes(b"\0" * info.st_size)
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
        count += 1
    return count


def test_rt_export_without_dataset_then_relabel_from_masks(tmp_path, rt_export):
    source, truth = rt_export
    export = tmp_path / "export"
    import shutil

    shutil.copytree(source, export, copy_function=shutil.copy2)
    out = tmp_path / "ingest"
    cfg = load_config([], [f"output_root={tmp_path / 'outputs'}"])
    report = api.ingest(cfg, source=export, output=out)
    assert report["counts"] == {"cases": 4, "ok": 4, "failed": 0, "resumed": 0}
    cases = _case_of_patient(out)
    rows = _rows(out)
    # every ROI of every patient is in the inventory, with type, colour, size and the reason it is not mapped
    by_case = {}
    for row in rows:
        by_case.setdefault(row["case"], {})[row["name"]] = row
    for patient, (image, chosen) in truth.items():
        found = by_case[cases[patient]]
        assert set(found) == set(chosen)
        for name, mask in chosen.items():
            row = found[name]
            assert int(row["voxels"]) == int(mask.sum())
            assert row["empty"] == str(not mask.any())
            assert row["interpreted_type"] == "ORGAN" and len(row["color"].split()) == 3
            assert float(row["volume_ml"]) == pytest.approx(mask.sum() * np.prod(image.grid.spacing) / 1000, rel=1e-3)
            assert "no dataset description" in row["note"] and row["label"] == ""
            written = load_volume(out / row["mask"])  # each structure's own mask on its image's grid
            ingested = load_volume(out / "imagesTr" / f"{cases[patient]}_0000.nii.gz")
            assert written.grid.difference(ingested.grid) is None
            np.testing.assert_array_equal(written.array != 0, _on(mask, image, ingested.grid))
    assert not (out / "labelsTr").exists()
    # overlaps survive: the GTV lies inside the PTV inside BODY, each kept whole
    gtv = load_volume(out / by_case[cases["RT001"]]["GTV"]["mask"]).array != 0
    ptv = load_volume(out / by_case[cases["RT001"]]["PTV"]["mask"]).array != 0
    assert gtv.any() and (gtv & ~ptv).sum() == 0 and ptv.sum() > gtv.sum()
    assert json.loads((out / "structures.json").read_text())["structures"][0].keys() >= {"case", "name", "voxels"}
    # no patient ID or name in any file name or in the inventory
    names = " ".join(str(p) for p in out.rglob("*") if "private" not in p.parts)
    assert "RT00" not in names and "DOE" not in names and "RT00" not in (out / "structures.csv").read_text()

    suggested = yaml.safe_load((out / "dataset.suggested.yaml").read_text())
    labels = {label["name"]: label for label in suggested["labels"]}
    gtv_label = next(label for label in suggested["labels"] if "GTV" in [label["name"], *label.get("synonyms", [])])
    assert set([gtv_label["name"], *gtv_label["synonyms"]]) == {"GTV", "gtv_1", "GTV Primary"}
    assert "External" in labels and labels["External"]["synonyms"] == ["BODY"]  # TG-263 name of BODY
    assert [label["name"] for label in suggested["labels"]][:3] == ["background", "External", "PTV"]  # most frequent
    assert "^z_" in suggested["exclude"]
    assert not any("z_help" in [label["name"], *label.get("synonyms", [])] for label in suggested["labels"])

    # the rerun with the suggested file reads no DICOM: every DICOM file is now zeros (same size and time)
    assert _corrupt_dicom_keeping_size_and_time(export) == sum(len(list((export / p / "ct").iterdir())) + 1
                                                               for p in PATIENTS)
    cfg = load_config([], [f"output_root={tmp_path / 'outputs'}", f"dataset={out / 'dataset.suggested.yaml'}"])
    report = api.ingest(cfg, source=export, output=out)
    assert report["counts"]["ok"] == 4 and report["counts"]["failed"] == 0
    assert "no DICOM is read" in report["scan"]["reused"]
    left_out = {item["case"]: item["reason"] for item in report["left_out"]}
    assert set(left_out) == {cases["RT003"], cases["RT004"]}
    assert "no structure matches" in left_out[cases["RT004"]] and "GTV" in left_out[cases["RT004"]]
    assert "'GTV Primary' is empty" in left_out[cases["RT003"]]
    values = {label["name"]: label["value"] for label in suggested["labels"]}
    for patient, gtv_name in (("RT001", "GTV"), ("RT002", "gtv_1")):
        image, chosen = truth[patient]
        label = load_volume(out / "labelsTr" / f"{cases[patient]}.nii.gz")
        chosen = {name: _on(mask, image, label.grid) for name, mask in chosen.items()}
        assert label.grid.difference(load_volume(out / "imagesTr" / f"{cases[patient]}_0000.nii.gz").grid) is None
        # smaller structures win where they overlap: GTV inside PTV inside External
        np.testing.assert_array_equal(label.array == values["GTV"], chosen[gtv_name])
        np.testing.assert_array_equal(label.array == values["PTV"], chosen["PTV"] & ~chosen[gtv_name])
        np.testing.assert_array_equal(label.array == values["External"], chosen["BODY"] & ~chosen["PTV"])
    for patient in ("RT003", "RT004"):
        assert not (out / "labelsTr" / f"{cases[patient]}.nii.gz").exists()
    rows = {(r["case"], r["name"]): r for r in _rows(out)}
    assert rows[(cases["RT001"], "GTV")]["label"] == "GTV"
    assert rows[(cases["RT001"], "z_help")]["note"] == "excluded by '^z_'"
    assert "left out" in rows[(cases["RT004"], "PTV")]["note"]
    assert "empty" in rows[(cases["RT003"], "GTV Primary")]["note"]
    records = {c["id"]: c for c in report["cases"]}
    assert records[cases["RT002"]]["extra"]["labels"] == {"GTV": "gtv_1", "PTV": "PTV", "External": "BODY"}
    assert "no structure matches" in records[cases["RT004"]]["extra"]["left_out"]
    manifest = json.loads((out / "manifest.json").read_text())
    trainable = [c["id"] for c in manifest["cases"] if c["label"]]
    assert sorted(trainable) == sorted([cases["RT001"], cases["RT002"]])


def test_mapping_with_regex_exclude_and_ambiguity(tmp_path, rt_export):
    source, truth = rt_export
    out = tmp_path / "ingest"
    dataset = tmp_path / "dataset.yaml"
    dataset.write_text(yaml.safe_dump({
        "name": "rt", "source": str(source), "exclude": ["^z_", "couch", "(?i)body"],
        "labels": [{"name": "background", "value": 0},
                   {"name": "tumour", "value": 1, "regex": ["^gtv"]},
                   {"name": "PTV", "value": 2, "required": False}]}))
    cfg = load_config([], [f"output_root={tmp_path / 'outputs'}", f"dataset={dataset}"])
    report = api.ingest(cfg, output=out)
    cases = _case_of_patient(out)
    left_out = {item["case"]: item["reason"] for item in report["left_out"]}
    assert set(left_out) == {cases["RT003"], cases["RT004"]}
    rows = {(r["case"], r["name"]): r for r in _rows(out)}
    assert rows[(cases["RT002"], "gtv_1")]["label"] == "tumour"          # by regex
    assert rows[(cases["RT001"], "BODY")]["note"] == "excluded by '(?i)body'"
    label = load_volume(out / "labelsTr" / f"{cases['RT002']}.nii.gz")
    np.testing.assert_array_equal(label.array == 1, _on(truth["RT002"][1]["gtv_1"], truth["RT002"][0], label.grid))

    # two structures matching one label: the case is left out as ambiguous, nothing is guessed
    dataset.write_text(yaml.safe_dump({
        "name": "rt", "source": str(source), "labels": [{"name": "target", "value": 1, "regex": ["tv"]}]}))
    cfg = load_config([], [f"output_root={tmp_path / 'outputs'}", f"dataset={dataset}"])
    report = api.ingest(cfg, output=out)
    reasons = {item["case"]: item["reason"] for item in report["left_out"]}
    assert "ambiguous" in reasons[cases["RT001"]] and "'GTV'" in reasons[cases["RT001"]]
    assert "'PTV'" in reasons[cases["RT001"]]


def test_exclude_that_removes_a_label_is_refused(tmp_path):
    from pipeline.dataset import load_dataset
    from pipeline.errors import ConfigError

    path = tmp_path / "dataset.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "source": ".", "exclude": ["(?i)ptv"],
                                    "labels": [{"name": "PTV_high", "value": 1}]}))
    with pytest.raises(ConfigError, match="must not match"):
        load_dataset(path)
    path.write_text(yaml.safe_dump({"name": "x", "source": ".", "labels": [{"name": "a", "value": 1,
                                                                              "regex": ["(unclosed"]}]}))
    with pytest.raises(ConfigError, match="valid regular expression"):
        load_dataset(path)


def test_a_changed_export_is_read_again(tmp_path, rt_export):
    import shutil

    source, _ = rt_export
    export = tmp_path / "export"
    shutil.copytree(source / "RT001", export / "RT001", copy_function=shutil.copy2)
    out = tmp_path / "ingest"
    api.ingest(load_config([], [f"output_root={tmp_path}"]), source=export, output=out)
    dataset = tmp_path / "dataset.yaml"
    dataset.write_text(yaml.safe_dump({"name": "rt", "source": str(export),
                                       "labels": [{"name": "GTV", "value": 1}]}))
    rs = export / "RT001" / "rs" / "RS.dcm"
    os.utime(rs, ns=(rs.stat().st_atime_ns, rs.stat().st_mtime_ns + 10**9))  # re-exported: a new time
    report = api.ingest(load_config([], [f"output_root={tmp_path}", f"dataset={dataset}"]), source=export,
                        output=out)
    assert "reused" not in report["scan"] and report["scan"]["series"] >= 2  # scanned again
    assert report["counts"]["ok"] == 1 and not report["left_out"]
    again = api.ingest(load_config([], [f"output_root={tmp_path}", "ingest.compresslevel=3", f"dataset={dataset}"]),
                       source=export, output=out)
    assert "reused" not in again["scan"]  # other ingest settings: images are made again
