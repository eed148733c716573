"""The RTSTRUCT fast reader (pipeline.labels.rtstruct._read_structure_set_fast) gives exactly the ROIs pydicom's
reader gives, or hands the file to pydicom: same names, numbers, colours, types and contour points."""
from __future__ import annotations

import pydicom
import pytest
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pipeline.dicom import header as header_module
from pipeline.dicom.header import read_header
from pipeline.errors import InputError
from pipeline.labels import rtstruct
from pipeline.synthetic.dicom import write_ct_series, write_rtstruct
from pipeline.synthetic.phantoms import LABEL_NAMES, PhantomOptions, make_phantom

SMALL = dict(shape=40, slices=8, inplane_spacing_min=1.8, inplane_spacing_max=2.4, slice_spacing_min=3.0,
             slice_spacing_max=4.0)


def _with_pydicom(monkeypatch, path):
    with monkeypatch.context() as patch:
        patch.setattr(rtstruct, "_read_structure_set_fast", lambda _path: None)
        return rtstruct.read_rtstruct(path)


def _assert_same(ours, theirs):
    assert [(r.number, r.name, r.color, r.interpreted_type, len(r.contours)) for r in ours] == \
        [(r.number, r.name, r.color, r.interpreted_type, len(r.contours)) for r in theirs]
    for a, b in zip(ours, theirs):
        for x, y in zip(a.contours, b.contours):
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes()


@pytest.mark.shared_data
def test_every_shared_rtstruct_reads_the_same_as_with_pydicom(shared_data, monkeypatch):
    paths = []
    for path in sorted(shared_data.rglob("*.dcm")):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
        except Exception:  # noqa: BLE001 - damaged or non-DICOM test files
            continue
        if header.get("Modality") == "RTSTRUCT":
            paths.append(path)
    assert len(paths) >= 20  # sts_ct: CT, MR and PET structure sets
    for path in paths:
        assert rtstruct._read_structure_set_fast(path) is not None, path  # the fast path handles them all
        _assert_same(rtstruct.read_rtstruct(path), _with_pydicom(monkeypatch, path))


@pytest.fixture
def phantom_rtstruct(tmp_path):
    phantom = make_phantom(3, PhantomOptions(**SMALL))
    files = write_ct_series(phantom.image, tmp_path / "ct")
    return write_rtstruct(phantom.label, files, tmp_path / "rs.dcm", LABEL_NAMES)


@pytest.mark.parametrize("syntax,charset,name", [
    (ImplicitVRLittleEndian, None, None),
    (ExplicitVRLittleEndian, None, None),
    (ExplicitVRLittleEndian, "ISO_IR 192", "Gehirn_Läsion ☢"),
    (ImplicitVRLittleEndian, "ISO_IR 100", "Rückenmark"),
    (ExplicitVRBigEndian, None, None),  # not the fast path's: pydicom reads it
])
def test_phantom_rtstruct_in_each_encoding(tmp_path, monkeypatch, phantom_rtstruct, syntax, charset, name):
    dataset = pydicom.dcmread(phantom_rtstruct)
    if charset:
        dataset.SpecificCharacterSet = charset
        dataset.StructureSetROISequence[0].ROIName = name
    dataset.ROIContourSequence[0].ContourSequence[0].ContourGeometricType = "POINT"  # skipped by both
    dataset.ROIContourSequence[-1].ROIDisplayColor = [300, -2, 7]
    path = tmp_path / "recoded.dcm"
    dataset.file_meta.TransferSyntaxUID = syntax
    pydicom.dcmwrite(path, dataset, implicit_vr=syntax == ImplicitVRLittleEndian,
                     little_endian=syntax != ExplicitVRBigEndian, force_encoding=True)
    fast = rtstruct._read_structure_set_fast(path)
    assert (fast is None) == (syntax == ExplicitVRBigEndian)
    ours, theirs = rtstruct.read_rtstruct(path), _with_pydicom(monkeypatch, path)
    _assert_same(ours, theirs)
    assert sum(len(r.contours) for r in ours) > 10
    if name:
        assert ours[0].name == name
    assert ours[-1].color == (255, 0, 7)
    # the scan's header of it: the references read from the raw bytes equal pydicom's reading of them
    header = read_header(path)
    with monkeypatch.context() as patch:
        patch.setattr(header_module, "_frame_references", lambda _dataset: None)
        assert read_header(path) == header
    assert len(header.referenced_sop_uids) == 8 and header.referenced_series_uids


def test_damaged_rtstruct_goes_to_pydicom_and_is_refused_the_same_way(tmp_path, monkeypatch, phantom_rtstruct):
    data = phantom_rtstruct.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:len(data) * 2 // 3])
    assert rtstruct._read_structure_set_fast(cut) is None
    with pytest.raises(Exception) as ours:  # noqa: B017 - whatever pydicom's reading gives, both give
        rtstruct.read_rtstruct(cut)
    with pytest.raises(Exception) as theirs:  # noqa: B017
        _with_pydicom(monkeypatch, cut)
    assert (type(ours.value), str(ours.value)) == (type(theirs.value), str(theirs.value))
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="could not be read as DICOM"):
        rtstruct.read_rtstruct(empty)


def test_non_numeric_contour_data_raises_as_before(tmp_path, monkeypatch, phantom_rtstruct):
    data = bytearray(phantom_rtstruct.read_bytes())  # Implicit VR Little Endian, as our writer writes
    at = data.index(b"\x06\x30\x50\x00") + 8  # the first ContourData value
    data[at:at + 3] = b"abc"
    path = tmp_path / "bad.dcm"
    path.write_bytes(bytes(data))
    assert rtstruct._read_structure_set_fast(path) is not None
    with pytest.raises(ValueError) as ours:
        rtstruct.read_rtstruct(path)
    with pytest.raises(ValueError) as theirs:
        _with_pydicom(monkeypatch, path)
    assert str(ours.value) == str(theirs.value)
