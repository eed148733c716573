"""Series selection: default rules on real exports, each rule's reason, the policy and the series table."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from pipeline.dicom.scan import scan_export
from pipeline.dicom.select import SelectionRules, select_series, write_series_table
from pipeline.errors import ConfigError

from helpers.dicom_phantoms import phantom_volume, write_phantom


def _by_description(decisions):
    return {(d.series.folder, d.series.series_description, d.series.part): d for d in decisions}


@pytest.mark.shared_data
def test_philips_selection_keeps_exactly_the_two_axial_series(shared_data):
    decisions = select_series(scan_export(shared_data / "dcm_qa_ct" / "Philips").series)
    selected = sorted((d.series.folder, d.series.slice_count) for d in decisions if d.selected)
    assert selected == [("S21570/S2010", 28), ("S21610/S2010", 54)]
    reasons = {d.series.folder: [] for d in decisions}
    for d in decisions:
        reasons[d.series.folder].append(d.reason)
    assert reasons["S21610/S1000"][0].startswith("localizer (ImageType LOCALIZER)")
    assert len(reasons["S21610/S4010"]) == 3
    assert all(r.startswith("secondary capture SOP class") for r in reasons["S21610/S4010"])
    assert all(r.startswith("selected: ") for d in decisions if d.selected for r in [d.reason])


@pytest.mark.shared_data
@pytest.mark.parametrize("patient", ["STS_001", "STS_002"])
def test_mixed_modality_export_selects_only_the_ct(shared_data, patient):
    decisions = select_series(scan_export(shared_data / "sts_ct" / patient).series)
    assert [d.series.folder for d in decisions if d.selected] == ["CT/image"]
    reasons = {d.series.folder: d.reason for d in decisions}
    assert reasons["MR_T1/image"] == "modality MR (not a kept modality)"
    assert reasons["PET/image"] == "modality PT (not a kept modality)"
    assert reasons["CT/mask"] == "modality RTSTRUCT (label object)"


def test_each_rule_gives_its_reason(tmp_path):
    write_phantom(tmp_path / "axial", series_description="AXIAL 2MM")
    coronal = phantom_volume(direction=[[-1, 0, 0], [0, 0, -1], [0, 1, 0]])
    write_phantom(tmp_path / "coronal", coronal, series_description="CORONAL")
    write_phantom(tmp_path / "derived", image_type="DERIVED\\SECONDARY\\AXIAL", series_description="MIP")
    write_phantom(tmp_path / "short", phantom_volume(shape=(40, 36, 3)), series_description="SHORT")
    write_phantom(tmp_path / "mr", modality="MR", sop_class_uid="1.2.840.10008.5.1.4.1.1.4", series_description="T1")
    write_phantom(tmp_path / "scout", image_type="ORIGINAL\\PRIMARY\\LOCALIZER", series_description="SCOUT")
    decisions = select_series(scan_export(tmp_path).series, SelectionRules(policy="all"))
    reasons = {d.series.series_description: d.reason for d in decisions}
    assert reasons["AXIAL 2MM"].startswith("selected: 10 slices")
    assert reasons["CORONAL"] == "not axial: orientation is coronal"
    assert reasons["MIP"] == "derived image (ImageType DERIVED\\SECONDARY\\AXIAL)"
    assert reasons["SHORT"] == "3 slices < min_slices 10"
    assert reasons["T1"] == "modality MR (not a kept modality)"
    assert reasons["SCOUT"] == "localizer (ImageType LOCALIZER)"
    rules = SelectionRules(policy="all", allowed_orientations=["axial", "coronal"], allow_derived=True, min_slices=3)
    kept = {d.series.series_description for d in select_series(scan_export(tmp_path).series, rules) if d.selected}
    assert kept == {"AXIAL 2MM", "CORONAL", "MIP", "SHORT"}


def test_regex_and_thickness_rules(tmp_path):
    write_phantom(tmp_path / "soft", series_description="Abdomen 2.0 B30f", convolution_kernel="B30f")
    write_phantom(tmp_path / "bone", series_description="Abdomen 2.0 B70f", convolution_kernel="B70f")
    series = scan_export(tmp_path).series
    rules = SelectionRules(policy="all", kernel_regex="^B3")
    assert [d.series.convolution_kernel for d in select_series(series, rules) if d.selected] == ["B30F"]
    rules = SelectionRules(policy="all", exclude_description_regex="b70")
    kept = [d for d in select_series(series, rules) if d.selected]
    assert [d.series.series_description for d in kept] == ["Abdomen 2.0 B30f"]
    rules = SelectionRules(policy="all", slice_thickness_range=[2.5, 5.0])
    assert all(d.reason == "slice thickness 2 mm outside [2.5, 5] mm" for d in select_series(series, rules))
    rules = SelectionRules(policy="all", description_regex="thorax")
    assert all(d.reason == "description does not match 'thorax'" for d in select_series(series, rules))


def test_policy_largest_keeps_one_series_per_study(tmp_path):
    from pydicom.uid import generate_uid

    study = generate_uid()
    write_phantom(tmp_path / "thick", series_description="THICK", study_uid=study)
    write_phantom(tmp_path / "thin", phantom_volume(shape=(40, 36, 20), spacing=(0.7, 0.8, 1.0)),
                  series_description="THIN", study_uid=study)
    write_phantom(tmp_path / "other_study", series_description="OTHER")
    decisions = select_series(scan_export(tmp_path).series)
    by_name = {d.series.series_description: d for d in decisions}
    assert by_name["THIN"].selected and by_name["OTHER"].selected and not by_name["THICK"].selected
    assert by_name["THICK"].reason.startswith("policy largest: 10 slices, the study's largest qualifying series")
    assert sum(d.selected for d in select_series(scan_export(tmp_path).series, SelectionRules(policy="all"))) == 3


def test_bad_rules_raise_config_errors():
    with pytest.raises(ConfigError, match="description_regex must be a valid regular expression"):
        select_series([], SelectionRules(description_regex="(unclosed"))
    with pytest.raises(ConfigError, match=r"slice_thickness_range must be \[min, max\]"):
        select_series([], SelectionRules(slice_thickness_range=[1.0]))
    with pytest.raises(ConfigError, match="allowed_orientations"):
        select_series([], SelectionRules(allowed_orientations=["oblique"]))


def test_series_table_has_every_series_and_no_patient_data(tmp_path):
    write_phantom(tmp_path / "export" / "a", patient_name="DOE^JANE", patient_id="SECRET-4711",
                  series_description="CHEST")
    write_phantom(tmp_path / "export" / "b", phantom_volume(shape=(40, 36, 4)), patient_name="DOE^JANE",
                  patient_id="SECRET-4711", series_description="SCOUT")
    decisions = select_series(scan_export(tmp_path / "export").series)
    csv_path, json_path = write_series_table(decisions, tmp_path / "out")
    for path in (csv_path, json_path):
        text = path.read_text()
        assert "SECRET-4711" not in text and "DOE" not in text and "JANE" not in text
    rows = list(csv.DictReader(csv_path.open()))
    assert [(r["description"], r["selected"], r["slice_count"]) for r in rows] == [
        ("CHEST", "True", "10"), ("SCOUT", "False", "4")]
    assert rows[0]["spacing_mm"] == "0.7x0.8x2" and rows[0]["orientation"] == "axial"
    assert rows[0]["sop_class"] == "CT Image Storage" and rows[0]["image_type"] == "ORIGINAL\\PRIMARY\\AXIAL"
    data = json.loads(json_path.read_text())
    assert [r["reason"] for r in data["series"]][1] == "4 slices < min_slices 10"
    assert data["series"][0]["tilt_deg"] == 0.0 and np.isclose(data["series"][0]["spacing_mm"][2], 2.0)
    assert not list((tmp_path / "out").glob("*.partial-*"))
