"""Scanning exports: skipped files with reasons, grouping into series, splitting, label pairing."""
from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from pipeline.dicom.header import LEGACY_ENHANCED_CT_IMAGE_STORAGE
from pipeline.dicom.scan import labels_for, scan_export
from pipeline.errors import InputError

from helpers.dicom_phantoms import phantom_volume, rewrite, write_phantom


def _reasons(result) -> dict[str, str]:
    return {s.path.name: s.reason for s in result.skipped}


# ---------------------------------------------------------------------------------------------
# Real exports
# ---------------------------------------------------------------------------------------------

@pytest.mark.shared_data
def test_philips_export_skips_dicomdir_and_dirfiles(shared_data):
    result = scan_export(shared_data / "dcm_qa_ct" / "Philips")
    skipped = {s.path.relative_to(shared_data / "dcm_qa_ct" / "Philips").as_posix(): s.reason for s in result.skipped}
    assert set(skipped) == {"DICOMDIR", "S21570/DIRFILE", "S21570/S2010/DIRFILE", "S21610/DIRFILE",
                            "S21610/S1000/DIRFILE", "S21610/S2010/DIRFILE", "S21610/S4010/DIRFILE"}
    assert all("DICOMDIR" in reason for reason in skipped.values())
    by_folder = {}
    for info in result.series:
        by_folder.setdefault(info.folder, []).append(info)
    assert [s.slice_count for s in by_folder["S21570/S2010"]] == [28]
    assert [s.slice_count for s in by_folder["S21610/S2010"]] == [54]
    assert [s.slice_count for s in by_folder["S21610/S1000"]] == [1]
    tilted = by_folder["S21610/S2010"][0]
    assert tilted.tilt_deg == pytest.approx(18.5, abs=0.01)
    assert tilted.slice_spacing == pytest.approx(2.5 * np.cos(np.radians(18.5)), abs=1e-3)
    assert by_folder["S21570/S2010"][0].tilt_deg == pytest.approx(0.0, abs=1e-6)
    # the secondary captures mix image sizes within one series UID: kept apart as parts
    captures = by_folder["S21610/S4010"]
    assert sum(s.slice_count for s in captures) == 5 and all(s.part >= 1 for s in captures)
    assert all("image sizes" in s.split_reason for s in captures)


@pytest.mark.shared_data
def test_sts_ct_every_patient_has_one_ct_paired_with_its_rtstruct(shared_data):
    patients = sorted(p for p in (shared_data / "sts_ct").iterdir() if p.is_dir())
    assert len(patients) == 20
    for patient in patients:
        result = scan_export(patient)
        ct = [s for s in result.series if s.modality == "CT"]
        assert len(ct) == 1, patient.name
        matches = labels_for(ct[0], result.series)
        assert [m.label.files for m in matches] == [[patient / "CT" / "mask" / "RS.dcm"]], patient.name
        assert matches[0].evidence == "referenced SeriesInstanceUID"
        # MR and PET share the CT's frame of reference but keep their own structure sets
        for other in (s for s in result.series if s.modality in ("MR", "PT")):
            assert [m.label.folder for m in labels_for(other, result.series)] == [
                other.folder.replace("/image", "/mask")]


@pytest.mark.shared_data
def test_blank_uids_fall_back_to_the_folder_geometry_key(shared_data):
    result = scan_export(shared_data / "totalseg" / "example_ct_dicom")
    assert len(result.series) == 1 and not result.skipped
    info = result.series[0]
    assert info.grouping == "fallback" and info.series_uid == "" and info.study_uid == ""
    assert info.key.startswith("folder:.|patient-") and "|512x512|iop-1.000,0.000,0.000,0.000,1.000,0.000" in info.key
    assert info.slice_count == 20 and info.transfer_syntaxes == ("1.2.840.10008.1.2.4.90",)
    assert len(info.short_key) == 10 and info.short_key in info.name


@pytest.mark.shared_data
def test_seg_pairs_with_the_feet_first_ct(shared_data):
    result = scan_export(shared_data / "dcmqi")
    ct = [s for s in result.series if s.modality == "CT"]
    assert len(ct) == 1 and ct[0].slice_count == 3
    matches = labels_for(ct[0], result.series)
    assert [(m.label.modality, m.evidence) for m in matches] == [("SEG", "referenced SeriesInstanceUID")]
    assert sum("not a DICOM file" in s.reason for s in result.skipped) == 8  # NRRD, JSON, licence


# ---------------------------------------------------------------------------------------------
# Broken files
# ---------------------------------------------------------------------------------------------

def test_truncated_empty_and_foreign_files_are_skipped_with_reasons(tmp_path):
    paths = write_phantom(tmp_path / "export" / "series")
    data = paths[3].read_bytes()
    paths[3].write_bytes(data[: len(data) - 500])              # cut inside the pixel data
    paths[4].write_bytes(data[:300])                           # cut inside the header
    (tmp_path / "export" / "empty.dcm").write_bytes(b"")
    (tmp_path / "export" / "notes.txt").write_text("not an image\n")
    (tmp_path / "export" / "viewer.exe").write_bytes(b"MZ" + bytes(range(256)) * 4)
    result = scan_export(tmp_path / "export")
    reasons = _reasons(result)
    assert reasons[paths[3].name].startswith("truncated: pixel data needs")
    assert reasons[paths[4].name].startswith("truncated")
    assert reasons["empty.dcm"] == "empty file (0 bytes)"
    assert reasons["notes.txt"].startswith("not a DICOM file") and reasons["viewer.exe"].startswith("not a DICOM")
    assert [s.slice_count for s in result.series] == [len(paths) - 2]


def test_truncated_compressed_file_is_skipped(tmp_path):
    paths = write_phantom(tmp_path, transfer_syntax="rle")
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[:-40])
    result = scan_export(tmp_path)
    assert _reasons(result)[paths[0].name] == "truncated: the file ends inside the compressed pixel data"


def test_missing_root_raises(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        scan_export(tmp_path / "nowhere")


def test_copied_file_is_read_once(tmp_path):
    paths = write_phantom(tmp_path / "a")
    shutil.copy(paths[0], tmp_path / "a" / "copy_of_first.dcm")
    result = scan_export(tmp_path)
    assert [s.slice_count for s in result.series] == [len(paths)]
    assert any("same SOPInstanceUID" in s.reason for s in result.skipped)


# ---------------------------------------------------------------------------------------------
# Grouping
# ---------------------------------------------------------------------------------------------

def test_two_series_in_one_folder_stay_apart(tmp_path):
    write_phantom(tmp_path, series_number=2, series_description="SOFT", file_naming="sop_uid")
    write_phantom(tmp_path, series_number=3, series_description="BONE", file_naming="sop_uid",
                  convolution_kernel="BONE")
    result = scan_export(tmp_path)
    assert sorted((s.series_description, s.slice_count) for s in result.series) == [("BONE", 10), ("SOFT", 10)]


def test_two_series_with_blank_uids_in_one_folder_stay_apart(tmp_path):
    for number, spacing in ((4, 0.7), (5, 0.5)):
        paths = write_phantom(tmp_path, phantom_volume(spacing=(spacing, spacing, 2.0)), series_number=number,
                              file_naming="sop_uid")
        for path in paths:
            rewrite(path, StudyInstanceUID="", SeriesInstanceUID="")
    result = scan_export(tmp_path)
    assert sorted(s.series_number for s in result.series) == [4, 5]
    assert all(s.grouping == "fallback" and s.slice_count == 10 for s in result.series)


def test_blank_uid_series_with_equal_numbers_split_by_geometry(tmp_path):
    for spacing in (0.7, 0.5):
        for path in write_phantom(tmp_path, phantom_volume(spacing=(spacing, spacing, 2.0)), file_naming="sop_uid"):
            rewrite(path, StudyInstanceUID="", SeriesInstanceUID="", FrameOfReferenceUID="")
    result = scan_export(tmp_path)
    assert sorted(s.pixel_spacing for s in result.series) == [(0.5, 0.5), (0.7, 0.7)]
    assert all(s.part == 0 and not s.split_reason for s in result.series)


def test_mixed_patients_are_never_merged(tmp_path):
    uids = dict(study_uid=generate_uid(), series_uid=generate_uid(), frame_of_reference_uid=generate_uid())
    write_phantom(tmp_path / "one", patient_id="P1", **uids)
    write_phantom(tmp_path / "two", patient_id="P2", **uids)
    result = scan_export(tmp_path)
    assert len(result.series) == 2 and all(s.slice_count == 10 for s in result.series)
    assert len({s.key for s in result.series}) == 2
    assert any("2 different patients" in w for w in result.warnings)
    assert not any("P1" in w or "P2" in w for w in result.warnings)
    assert all("P1" not in s.key and "P2" not in s.key for s in result.series)


def test_mixed_patients_with_blank_uids_are_never_merged(tmp_path):
    for patient in ("P1", "P2"):
        for path in write_phantom(tmp_path, patient_id=patient, file_naming="sop_uid"):
            rewrite(path, StudyInstanceUID="", SeriesInstanceUID="", FrameOfReferenceUID="")
    result = scan_export(tmp_path)
    assert sorted(s.patient_id for s in result.series) == ["P1", "P2"]


def test_series_mixing_image_sizes_is_split_into_parts(tmp_path):
    uids = dict(study_uid=generate_uid(), series_uid=generate_uid(), frame_of_reference_uid=generate_uid())
    write_phantom(tmp_path / "a", **uids)
    write_phantom(tmp_path / "b", phantom_volume(shape=(32, 32, 10), origin=(10.0, 20.0, 30.0)), **uids)
    result = scan_export(tmp_path)
    assert sorted((s.columns, s.rows, s.part) for s in result.series) == [(32, 32, 2), (40, 36, 1)]
    assert all("image sizes" in s.split_reason for s in result.series)
    assert all(s.key.endswith(f"#part{s.part}") for s in result.series)


def test_repeated_positions_split_by_acquisition_number(tmp_path):
    uids = dict(study_uid=generate_uid(), series_uid=generate_uid(), frame_of_reference_uid=generate_uid())
    write_phantom(tmp_path / "a", **uids)
    for path in write_phantom(tmp_path / "b", **uids):
        rewrite(path, AcquisitionNumber=2)
    result = scan_export(tmp_path)
    assert [(s.part, s.slice_count) for s in sorted(result.series, key=lambda s: s.part)] == [(1, 10), (2, 10)]
    assert all("split by AcquisitionNumber" in s.split_reason for s in result.series)


def test_enhanced_ct_frames_become_slices(tmp_path):
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    paths = write_phantom(tmp_path / "single")
    frames = [pydicom.dcmread(p) for p in paths]
    multiframe = LegacyConvertedEnhancedCTImage(frames, generate_uid(), 7, generate_uid(), 1)
    multiframe.save_as(tmp_path / "enhanced.dcm")
    result = scan_export(tmp_path / "enhanced.dcm")
    info = result.series[0]
    assert info.sop_class_uid == LEGACY_ENHANCED_CT_IMAGE_STORAGE and info.slice_count == 10
    assert [s.frame for s in info.slices] == list(range(10))
    assert info.slice_spacing == pytest.approx(2.0) and info.pixel_spacing == (0.8, 0.7)
    assert {s.rescale_intercept for s in info.slices} == {-1024.0}


def test_localizer_inside_an_axial_series_becomes_its_own_part(tmp_path):
    uids = dict(study_uid=generate_uid(), series_uid=generate_uid(), frame_of_reference_uid=generate_uid())
    write_phantom(tmp_path / "axial", **uids)
    coronal = phantom_volume(shape=(40, 36, 2), direction=[[-1, 0, 0], [0, 0, -1], [0, 1, 0]])
    write_phantom(tmp_path / "scout", coronal, image_type="ORIGINAL\\PRIMARY\\LOCALIZER", **uids)
    parts = sorted(scan_export(tmp_path).series, key=lambda s: s.part)
    assert [(p.orientation_label, p.slice_count) for p in parts] == [("axial", 10), ("coronal", 2)]
    assert parts[0].split_reason.startswith("series mixes orientations (10 images 40x36 axial, 2 images 40x36 "
                                            "coronal [IM0001.dcm, IM0002.dcm]); split into 2 parts")


def test_secondary_capture_sharing_a_series_uid_is_split_by_sop_class(tmp_path):
    uids = dict(study_uid=generate_uid(), series_uid=generate_uid(), frame_of_reference_uid=generate_uid())
    write_phantom(tmp_path / "axial", **uids)
    write_phantom(tmp_path / "capture", phantom_volume(shape=(40, 36, 1), origin=(10.0, 20.0, 90.0)),
                  sop_class_uid="1.2.840.10008.5.1.4.1.1.7", **uids)
    parts = sorted(scan_export(tmp_path).series, key=lambda s: s.slice_count)
    assert [(p.sop_class_uid.rsplit(".", 1)[-1], p.slice_count) for p in parts] == [("7", 1), ("2", 10)]
    assert all("SOP classes" in p.split_reason for p in parts)


def test_label_pairing_falls_back_to_instances_and_frame_of_reference(tmp_path):
    from dataclasses import replace

    image = scan_export(write_phantom(tmp_path / "ct")[0].parent).series[0]
    uids = sorted(image.sop_instance_uids)
    by_instances = replace(image, key="rt1", modality="RTSTRUCT", slices=[], series_uid="x",
                           referenced_series_uids=(), referenced_sop_uids=(uids[0],))
    other_instances = replace(by_instances, key="rt2", referenced_sop_uids=("1.2.3",))
    by_frame = replace(by_instances, key="rt3", referenced_sop_uids=(),
                       referenced_frame_of_reference_uids=(image.frame_of_reference_uid,))
    other_series = replace(by_frame, key="rt4", referenced_series_uids=("1.2.3.4",))
    matches = labels_for(image, [image, by_instances, other_instances, by_frame, other_series])
    assert [(m.label.key, m.evidence) for m in matches] == [("rt1", "referenced SOP instances"),
                                                            ("rt3", "FrameOfReferenceUID")]
