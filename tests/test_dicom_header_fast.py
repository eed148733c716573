"""The header fast path (pipeline.dicom.header._read_dataset_fast) gives exactly what pydicom's reader gives, or
hands the file to pydicom: same elements, same file position, same FileHeader or the same skip reason."""
from __future__ import annotations

import warnings

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pipeline.dicom import header as H

from helpers.dicom_phantoms import write_phantom


def _same_elements(fast, reference) -> bool:
    """The same tags; raw elements with the same VR, length and bytes; sequences with the same parsed items.

    Parsing a sequence makes pydicom convert PixelRepresentation (to resolve 'US or SS' VRs), at read time
    for pydicom's own undefined-length sequences and at first access for ours: where either element is
    converted, the converted values are compared.
    """
    tags = {int(e.tag) for e in fast.elements()}
    if tags != {int(e.tag) for e in reference.elements()}:
        return False
    for tag in sorted(tags):
        if tag in H._FAST_SEQUENCE_TAGS:
            ours, theirs = fast[tag].value, reference[tag].value
            if len(ours) != len(theirs) or not all(_same_elements(a, b) for a, b in zip(ours, theirs)):
                return False
            continue
        ours, theirs = fast.get_item(tag), reference.get_item(tag)
        if isinstance(ours, H.RawDataElement) and isinstance(theirs, H.RawDataElement):
            if (ours.VR, ours.length, ours.value) != (theirs.VR, theirs.length, theirs.value):
                return False
        elif str(fast[tag].value) != str(reference[tag].value):
            return False
    return True


def _outcome(path, fast: bool, monkeypatch):
    with monkeypatch.context() as patch:
        if not fast:
            patch.setattr(H, "_read_dataset_fast", lambda handle: None)
        try:
            return H.read_header(path)
        except H.SkipFile as exc:
            return ("skipped", str(exc), exc.damaged, exc.series_uid)


def _assert_same_as_pydicom(path) -> bool:
    """True when the fast path read ``path`` (and it agreed with pydicom), False when it handed it over."""
    with open(path, "rb") as handle:
        fast = H._read_dataset_fast(handle)
        fast_position = handle.tell()
    if fast is None:
        return False
    with warnings.catch_warnings(), open(path, "rb") as handle:
        warnings.simplefilter("ignore")
        reference = pydicom.dcmread(handle, stop_before_pixels=True, specific_tags=H.HEADER_TAGS)
        assert fast_position == handle.tell(), path
    assert _same_elements(fast, reference), path
    assert str(fast.file_meta.TransferSyntaxUID) == str(reference.file_meta.TransferSyntaxUID)
    assert str(fast.file_meta.get("MediaStorageSOPClassUID", "")) == \
        str(reference.file_meta.get("MediaStorageSOPClassUID", ""))
    return True


@pytest.mark.parametrize("syntax", ["explicit_little", "implicit_little", "rle"])
def test_fast_path_equals_pydicom_on_phantoms(tmp_path, syntax, monkeypatch):
    files = write_phantom(tmp_path / syntax, transfer_syntax=syntax)
    assert all(_assert_same_as_pydicom(path) for path in files)  # every phantom file takes the fast path
    for path in files[:3]:
        assert _outcome(path, True, monkeypatch) == _outcome(path, False, monkeypatch)


def _with_sequence(path, keyword: str, undefined: bool) -> None:
    dataset = pydicom.dcmread(path)
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "113100", "DCM", "Basic Profile"
    inner = Dataset()
    inner.CodeValue = "X"
    item.PurposeOfReferenceCodeSequence = Sequence([inner])
    setattr(dataset, keyword, Sequence([item, item]))
    element = dataset[keyword]
    element.is_undefined_length = undefined
    element.value[0].is_undefined_length_sequence_item = undefined
    dataset.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("undefined", [True, False])
@pytest.mark.parametrize("syntax", ["explicit_little", "implicit_little"])
def test_unrequested_sequences_are_skipped_like_pydicom(tmp_path, syntax, undefined, monkeypatch):
    path = write_phantom(tmp_path, transfer_syntax=syntax)[0]
    _with_sequence(path, "DeidentificationMethodCodeSequence", undefined)
    assert _assert_same_as_pydicom(path)
    assert _outcome(path, True, monkeypatch) == _outcome(path, False, monkeypatch)


@pytest.mark.parametrize("undefined", [True, False])
@pytest.mark.parametrize("syntax", ["explicit_little", "implicit_little"])
def test_requested_sequence_is_parsed_like_pydicom(tmp_path, syntax, undefined, monkeypatch):
    path = write_phantom(tmp_path, transfer_syntax=syntax)[0]
    _with_sequence(path, "ReferencedSeriesSequence", undefined)
    assert _assert_same_as_pydicom(path)
    assert _outcome(path, True, monkeypatch) == _outcome(path, False, monkeypatch)


@pytest.mark.parametrize("cut", [130, 200, 600, -3000, -10])
def test_cut_files_get_the_same_reason_as_before(tmp_path, cut, monkeypatch):
    path = write_phantom(tmp_path)[0]
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    assert _outcome(path, True, monkeypatch) == _outcome(path, False, monkeypatch)


def test_file_without_preamble_goes_to_pydicom(tmp_path, monkeypatch):
    path = write_phantom(tmp_path)[0]
    bare = tmp_path / "bare.dcm"
    bare.write_bytes(path.read_bytes()[132:])  # no preamble and no 'DICM': the data set starts at byte 0
    with open(bare, "rb") as handle:
        assert H._read_dataset_fast(handle) is None
    assert _outcome(bare, True, monkeypatch) == _outcome(bare, False, monkeypatch)


@pytest.mark.shared_data
def test_fast_path_equals_pydicom_on_shared_exports(shared_data, monkeypatch):
    fast = handed_over = 0
    for folder in ("sts_ct/STS_001", "sts_ct/STS_002", "dcm_qa_ct", "totalseg", "dcmqi", "single_slices"):
        for path in sorted(p for p in (shared_data / folder).rglob("*") if p.is_file()):
            if _assert_same_as_pydicom(path):
                fast += 1
            else:
                handed_over += 1
            assert _outcome(path, True, monkeypatch) == _outcome(path, False, monkeypatch), path
    assert fast > 100  # CT slices and RTSTRUCTs take the fast path
