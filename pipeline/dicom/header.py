"""One DICOM file's header: the attributes that scan, selection and assembly need, read without pixels.

:func:`read_header` parses a file with ``stop_before_pixels`` and a fixed tag list, then checks the
pixel data element itself (its length for native encodings, its fragment items for encapsulated
ones) so that a truncated file is rejected here, before any decoding. Single-frame files give one
:class:`SliceRef`; Enhanced and Legacy Converted Enhanced CT give one per frame, with position,
orientation, spacing and rescale taken from the per-frame (or shared) functional groups.
Files that cannot be used raise :class:`SkipFile` with a one-line reason.
"""
from __future__ import annotations

import functools
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement, empty_value_for_VR
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
CT_SOP_CLASSES = (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, LEGACY_ENHANCED_CT_IMAGE_STORAGE)
SECONDARY_CAPTURE_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.1",
                                 "1.2.840.10008.5.1.4.1.1.7.2", "1.2.840.10008.5.1.4.1.1.7.3",
                                 "1.2.840.10008.5.1.4.1.1.7.4")
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
# common image storage classes: an object of these without pixel data is an incomplete file
IMAGE_SOP_CLASSES = CT_SOP_CLASSES + SECONDARY_CAPTURE_SOP_CLASSES + tuple(
    "1.2.840.10008.5.1.4.1.1." + suffix for suffix in (
        "1", "1.1", "1.1.1", "1.2", "1.2.1", "1.3", "4", "4.1", "4.4", "6.1", "12.1", "12.2", "20", "128", "130",
        "481.1", "481.2"))
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
NATIVE_LITTLE_ENDIAN = (ImplicitVRLittleEndian, ExplicitVRLittleEndian)

PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
_ITEM, _SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE0DD

# Everything scan/select/assemble read. Sequences are read whole (their items are parsed lazily).
HEADER_TAGS = [Tag(keyword) for keyword in (
    "SpecificCharacterSet", "ImageType", "SOPClassUID", "SOPInstanceUID", "Modality", "Manufacturer",
    "SeriesDescription", "ConvolutionKernel", "SliceThickness", "SpacingBetweenSlices", "GantryDetectorTilt",
    "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber", "AcquisitionNumber",
    "InstanceNumber", "ImagePositionPatient", "ImageOrientationPatient", "FrameOfReferenceUID",
    "TemporalPositionIdentifier", "SamplesPerPixel", "PhotometricInterpretation", "NumberOfFrames", "Rows",
    "Columns", "PixelSpacing", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "PixelPaddingValue", "PixelPaddingRangeLimit", "RescaleIntercept", "RescaleSlope",
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "ReferencedSeriesSequence",
    "ReferencedFrameOfReferenceSequence", "StructureSetROISequence", "DirectoryRecordSequence",
    "ModalityLUTSequence")]

DICOM_UID_ROOT = b"1.2.840.10008"


class SkipFile(Exception):
    """A file that scan lists as skipped; the message is the reason.

    ``damaged`` is True when the file looks like a DICOM object that was cut or corrupted (it may be a
    lost slice of a series beside it), False for files that are simply not images (text, DICOMDIR).
    """

    def __init__(self, reason: str, damaged: bool = True):
        super().__init__(reason)
        self.damaged = damaged
        self.series_uid = ""  # SeriesInstanceUID when the header could be read that far (attribution)


@dataclass(frozen=True)
class PixelFormat:
    """How one file stores its pixels (shared by all frames of the file)."""

    transfer_syntax: str
    rows: int
    columns: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int  # 0 unsigned, 1 two's complement
    samples_per_pixel: int
    photometric: str
    frames: int
    padding_value: int | None        # PixelPaddingValue, in stored (raw) units
    padding_range_limit: int | None  # PixelPaddingRangeLimit, in stored units
    pixel_offset: int | None         # file offset of native little-endian pixel bytes, else None

    @property
    def is_native_little_endian(self) -> bool:
        return self.pixel_offset is not None


@dataclass(frozen=True)
class SliceRef:
    """One 2D image: a single-frame file, or one frame of a multi-frame file."""

    path: Path
    frame: int | None  # 0-based frame index in a multi-frame file, None for single-frame files
    position: tuple[float, float, float] | None  # ImagePositionPatient (LPS mm)
    orientation: tuple[float, ...] | None        # ImageOrientationPatient: row cosine, column cosine
    pixel_spacing: tuple[float, float] | None    # PixelSpacing: (between rows, between columns) mm
    rescale_slope: float
    rescale_intercept: float
    instance_number: int | None
    sop_instance_uid: str
    pixel: PixelFormat
    # attributes that tell two images at the same position apart (acquisition, temporal position, ...)
    discriminators: tuple[tuple[str, str], ...] = ()
    # what is wrong with RescaleSlope/RescaleIntercept as written ("" when both are valid numbers, slope
    # non-zero); rescale_slope/intercept then hold 1/0 and a CT series must be refused (assemble)
    rescale_problem: str = ""
    has_modality_lut: bool = False


@dataclass
class FileHeader:
    """The attributes of one readable DICOM file."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    modality: str
    image_type: tuple[str, ...]
    series_description: str
    series_number: int | None
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    patient_id: str = field(repr=False)
    convolution_kernel: str
    slice_thickness: float | None
    spacing_between_slices: float | None
    manufacturer: str
    transfer_syntax: str
    slices: list[SliceRef] = field(default_factory=list)
    referenced_series_uids: tuple[str, ...] = ()
    referenced_sop_uids: tuple[str, ...] = ()
    referenced_frame_of_reference_uids: tuple[str, ...] = ()

    @property
    def is_image(self) -> bool:
        return bool(self.slices)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def read_header(path: Path) -> FileHeader:
    """Read ``path``'s header; raise :class:`SkipFile` with the reason when it cannot be used."""
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise SkipFile(f"unreadable ({exc.strerror or exc})") from exc
    if size == 0:
        raise SkipFile("empty file (0 bytes)", damaged=True)
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise SkipFile(f"unreadable ({exc.strerror or exc})") from exc
    dataset = None
    try:
        with handle:
            dataset = _read_dataset(handle)
            _skip_directory(dataset)
            _check_complete(dataset, handle.tell(), size)
            pixel_location = _pixel_data_location(handle, size, dataset)
        return _file_header(path, dataset, _media_class(dataset), pixel_location)
    except SkipFile as exc:
        exc.series_uid = _series_uid(dataset)
        raise
    except Exception as exc:  # pydicom raises many types for damaged headers
        skip = SkipFile(f"truncated or corrupt DICOM header ({type(exc).__name__}: {_short(exc)})")
        skip.series_uid = _series_uid(dataset)
        raise skip from exc


def _series_uid(dataset) -> str:
    try:
        return _text(dataset, "SeriesInstanceUID") if dataset is not None else ""
    except Exception:  # noqa: BLE001 - a damaged data set: no attribution
        return ""


def _media_class(dataset) -> str:
    meta = getattr(dataset, "file_meta", None)
    return str(getattr(meta, "MediaStorageSOPClassUID", "") or "")


def _skip_directory(dataset) -> None:
    if _media_class(dataset) == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in dataset:
        raise SkipFile("DICOMDIR media storage directory (an index of the export, not an image)", damaged=False)


def _read_dataset(handle) -> pydicom.Dataset:
    dataset = _read_dataset_fast(handle)
    if dataset is not None:
        return dataset
    handle.seek(0)
    try:
        return pydicom.dcmread(handle, stop_before_pixels=True, specific_tags=HEADER_TAGS)
    except InvalidDicomError:
        pass
    # No 'DICM' preamble: accept old ACR-NEMA-style files only when they start like a DICOM data set
    handle.seek(0)
    start = handle.read(4)
    if len(start) < 4 or start[:2] not in (b"\x08\x00", b"\x02\x00"):
        handle.seek(0)
        if DICOM_UID_ROOT in handle.read(4096):  # a DICOM object whose preamble or first bytes were damaged
            raise SkipFile("corrupt DICOM file (no valid DICM preamble or data set start, but DICOM UIDs inside)")
        raise SkipFile("not a DICOM file (no DICM preamble and no DICOM data set at the start)", damaged=False)
    handle.seek(0)
    dataset = pydicom.dcmread(handle, stop_before_pixels=True, specific_tags=HEADER_TAGS, force=True)
    if "SOPClassUID" not in dataset and "Modality" not in dataset:
        raise SkipFile("not a DICOM file (no SOP class or modality in the data set)")
    return dataset


# ---------------------------------------------------------------------------------------------
# Fast path. pydicom's reader parses every element (and every item of an undefined-length sequence
# it was not asked for) through Python objects: about 1 ms a file, most of an export scan. The common
# case (a 'DICM' file whose data set is Implicit or Explicit VR Little Endian) is read here straight
# from the bytes into the same RawDataElements pydicom would give (a requested sequence as a raw
# defined-length SQ that pydicom parses when it is read; unrequested ones are skipped without being
# parsed), positioned at the pixel data as ``stop_before_pixels`` leaves it. Anything else (big endian,
# deflate, no preamble, a VR that is not a standard one, an element or item that runs past the end
# of the file, a structure this walker does not know) returns None and the
# file is read by pydicom as before, so damaged files meet exactly the checks they met before.
# ---------------------------------------------------------------------------------------------

_FAST_TAGS = frozenset(int(t) for t in HEADER_TAGS) | {0x00080005}
_FAST_SEQUENCE_TAGS = frozenset(int(t) for t in HEADER_TAGS if dictionary_VR(t) == "SQ")
# walk_dataset's spec for the header: requested sequences kept as raw SQ bytes, the other requested elements raw
_FAST_SPEC: dict = {tag: ("raw" if tag in _FAST_SEQUENCE_TAGS else None) for tag in _FAST_TAGS}
_STANDARD_VRS = frozenset(vr.encode("ascii") for vr in (
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT", "OB", "OD", "OF", "OL", "OV", "OW",
    "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV"))
_LONG_VRS = frozenset(vr.encode("ascii") for vr in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR",
                                                     "UT", "SV", "UV"))
_UNDEFINED = 0xFFFFFFFF
_ITEM_DELIMITER = 0xFFFEE00D
_PIXEL_TAGS = frozenset(PIXEL_DATA_TAGS)
_WINDOW = 16384


class _NotFast(Exception):
    """The fast path does not handle this file: pydicom reads it."""


NotFast = _NotFast  # the name other modules catch


class _Window:
    """Random access to a file's bytes through one buffered window (the header is usually in the first one)."""

    def __init__(self, handle, size: int):
        self.handle, self.size = handle, size
        self.base, self.data = 0, handle.read(_WINDOW)

    def bytes(self, position: int, count: int) -> bytes:
        end = position + count
        if end > self.size:
            raise _NotFast  # runs past the end of the file: a damaged file, for pydicom's checks
        if position < self.base or end > self.base + len(self.data):
            self.handle.seek(position)
            self.base, self.data = position, self.handle.read(max(count, _WINDOW))
            if len(self.data) < count:
                raise _NotFast
        start = position - self.base
        return self.data[start:start + count]


def _read_dataset_fast(handle) -> pydicom.Dataset | None:
    """The header as pydicom's ``dcmread(stop_before_pixels=True, specific_tags=HEADER_TAGS)`` gives it, or None."""
    try:
        size = os.fstat(handle.fileno()).st_size
        window = _Window(handle, size)
        if size < 132 or window.bytes(128, 4) != b"DICM":
            return None
        meta, position = fast_meta(window, 132)
        syntax = meta.get(0x00020010, "")
        if syntax == ImplicitVRLittleEndian:
            implicit = True
        elif syntax == ExplicitVRLittleEndian or (syntax and _is_encapsulated(syntax)
                                                  and syntax != ExplicitVRBigEndian):
            implicit = False
        else:
            return None
        elements, position = _fast_elements(window, position, implicit)
    except (_NotFast, struct.error, UnicodeDecodeError):
        return None
    from pydicom.dataset import Dataset

    dataset = Dataset(elements)
    dataset.file_meta = _file_meta(syntax, meta.get(0x00020002, ""))
    if 0x00080005 in elements:
        dataset["SpecificCharacterSet"]  # converted, as pydicom's reader does (it decodes what follows)
    handle.seek(position)
    return dataset


@functools.lru_cache(maxsize=64)
def _file_meta(syntax: str, media_class: str):
    """The file meta of the fast path (only the two UIDs read from it); shared, read-only, by files that agree."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID

    file_meta = FileMetaDataset()
    file_meta.TransferSyntaxUID = UID(syntax)
    if media_class:
        file_meta.MediaStorageSOPClassUID = UID(media_class)
    return file_meta


def fast_meta(window, position: int) -> tuple[dict[int, str], int]:
    """Group 0002 (always Explicit VR Little Endian): the UIDs it holds, and where the data set starts."""
    meta: dict[int, str] = {}
    while position + 8 <= window.size:
        head = window.bytes(position, 8)
        group, element = struct.unpack_from("<HH", head)
        if group != 0x0002:
            break
        vr = head[4:6]
        if vr not in _STANDARD_VRS:
            raise _NotFast
        if vr in _LONG_VRS:
            (length,) = struct.unpack("<I", window.bytes(position + 8, 4))
            position += 12
        else:
            (length,) = struct.unpack_from("<H", head, 6)
            position += 8
        if length == _UNDEFINED:
            raise _NotFast
        if element in (0x0002, 0x0010):
            meta[0x00020000 | element] = window.bytes(position, length).decode("ascii").strip(" \x00")
        position += length
    return meta, position


def _fast_elements(window: _Window, position: int, implicit: bool) -> tuple[dict, int]:
    """The requested top-level elements up to the pixel data (or the end of the file)."""
    return walk_dataset(window, position, None, implicit, _FAST_SPEC)


def _skip_undefined_sequence(window: _Window, position: int, implicit: bool, depth: int = 0) -> int:
    """The position after the sequence delimiter of an undefined-length sequence starting at ``position``."""
    if depth > 16:
        raise _NotFast
    while True:
        tag_group, tag_element, length = struct.unpack("<HHI", window.bytes(position, 8))
        tag = tag_group << 16 | tag_element
        position += 8
        if tag == _SEQUENCE_DELIMITER:
            return position
        if tag != _ITEM:
            raise _NotFast
        if length != _UNDEFINED:
            if position + length > window.size:
                raise _NotFast
            position += length
            continue
        position = _skip_undefined_item(window, position, implicit, depth)


def _skip_undefined_item(window: _Window, position: int, implicit: bool, depth: int) -> int:
    """The position after the item delimiter of an undefined-length item starting at ``position``."""
    while True:
        head = window.bytes(position, 8)
        group, element = struct.unpack_from("<HH", head)
        tag = group << 16 | element
        if tag == _ITEM_DELIMITER:
            return position + 8
        if group == 0xFFFE:
            raise _NotFast
        if implicit:
            vr = None
            (length,) = struct.unpack_from("<I", head, 4)
            position += 8
        else:
            code = head[4:6]
            if code not in _STANDARD_VRS:
                raise _NotFast
            vr = code.decode("ascii")
            if code in _LONG_VRS:
                (length,) = struct.unpack("<I", window.bytes(position + 8, 4))
                position += 12
            else:
                (length,) = struct.unpack_from("<H", head, 6)
                position += 8
        if length == _UNDEFINED:
            if not (implicit or vr in ("SQ", "UN")):
                raise _NotFast
            position = _skip_undefined_sequence(window, position, implicit if vr != "UN" else True, depth + 1)
        else:
            if position + length > window.size:
                raise _NotFast
            position += length


# ---------------------------------------------------------------------------------------------
# A walker over chosen elements, shared with pipeline.labels.rtstruct: ``spec`` maps the tags to keep to None
# (kept as a RawDataElement) or to the spec of a sequence's items (each item read into a dict the same way);
# every other element is skipped unparsed. The same checks as the fast path above: anything it does not know
# raises _NotFast, and the caller hands the file (or element) to pydicom.
# ---------------------------------------------------------------------------------------------

class BytesWindow:
    """Bytes in memory (a whole file, or one element's value) with the ``bytes``/``size`` interface of _Window."""

    def __init__(self, data: bytes):
        self.data, self.size = data, len(data)

    def bytes(self, position: int, count: int) -> bytes:
        if position < 0 or position + count > self.size:
            raise _NotFast
        return self.data[position:position + count]


def walk_dataset(window: BytesWindow | _Window, position: int, end: int | None, implicit: bool, spec: dict,
                 top: bool = True) -> tuple[dict, int]:
    """The elements of ``spec`` in the data set (``top``) or item starting at ``position``, and where it ends.

    ``end``: the end of a defined-length item; None for the top level (ends at the pixel data or the end of the
    file) or an undefined-length item (ends at its item delimiter). ``spec`` maps a tag to None (keep the element
    as a pydicom RawDataElement), "raw" (keep a sequence's bytes as one raw SQ element, parsed by pydicom when
    read) or a dict (walk the sequence item by item with that spec); other elements are skipped unparsed.
    """
    from pydicom.tag import BaseTag

    found: dict = {}
    first = top
    while True:
        if end is not None and position >= end:
            if position != end:
                raise _NotFast
            return found, position
        if top and position >= window.size:
            return found, position
        head = window.bytes(position, 8)
        group, element = struct.unpack_from("<HH", head)
        tag = group << 16 | element
        if first and implicit and 0x40 < head[4] < 0x5B and 0x40 < head[5] < 0x5B:
            raise _NotFast  # looks explicit: pydicom would switch to explicit VR here
        first = False
        if tag == _ITEM_DELIMITER and not top and end is None:
            return found, position + 8
        if top and tag in _PIXEL_TAGS:
            return found, position
        if group in (0xFFFE, 0x0002):
            raise _NotFast
        if implicit:
            vr = None
            (length,) = struct.unpack_from("<I", head, 4)
            value_at = position + 8
        else:
            code = head[4:6]
            if code not in _STANDARD_VRS:
                raise _NotFast
            vr = code.decode("ascii")
            if code in _LONG_VRS:
                (length,) = struct.unpack("<I", window.bytes(position + 8, 4))
                value_at = position + 12
            else:
                (length,) = struct.unpack_from("<H", head, 6)
                value_at = position + 8
        wanted = spec.get(tag, False)
        if wanted == "raw":
            # a requested sequence: its bytes (without the delimiter of an undefined length) become a raw
            # defined-length SQ element that pydicom parses when it is read, as it parses any raw SQ
            if length == _UNDEFINED:
                if not (implicit or vr == "SQ"):
                    raise _NotFast
                stop = _skip_undefined_sequence(window, value_at, implicit)
                value, length = window.bytes(value_at, stop - 8 - value_at), stop - 8 - value_at
            else:
                stop, value = value_at + length, window.bytes(value_at, length)
            found[BaseTag(tag)] = RawDataElement(BaseTag(tag), "SQ", length, value, value_at, implicit, True)
            position = stop
            continue
        if isinstance(wanted, dict):  # a sequence read item by item
            if not (implicit or vr == "SQ"):
                raise _NotFast
            found[tag], position = walk_items(window, value_at, length, implicit, wanted)
            continue
        if length == _UNDEFINED:
            if not (implicit or vr in ("SQ", "UN")):
                raise _NotFast
            position = _skip_undefined_sequence(window, value_at, implicit if vr != "UN" else True)
            continue
        if wanted is None:
            value = window.bytes(value_at, length) if length else empty_value_for_VR(vr, raw=True)
            found[BaseTag(tag)] = RawDataElement(BaseTag(tag), vr, length, value, value_at, implicit, True)
        elif value_at + length > window.size:
            raise _NotFast
        position = value_at + length


def walk_items(window: BytesWindow | _Window, position: int, length: int, implicit: bool,
               spec: dict) -> tuple[list[dict], int]:
    """The items of a sequence whose value starts at ``position``, each read with ``spec``; and where it ends."""
    end = None if length == _UNDEFINED else position + length
    items: list[dict] = []
    while True:
        if end is not None and position >= end:
            if position != end:
                raise _NotFast
            return items, position
        tag_group, tag_element, item_length = struct.unpack("<HHI", window.bytes(position, 8))
        tag = tag_group << 16 | tag_element
        position += 8
        if tag == _SEQUENCE_DELIMITER and end is None:
            return items, position
        if tag != _ITEM:
            raise _NotFast
        item_end = None if item_length == _UNDEFINED else position + item_length
        found, position = walk_dataset(window, position, item_end, implicit, spec, top=False)
        items.append(found)


def _check_complete(dataset, position: int, size: int) -> None:
    """pydicom skips unrequested elements by seeking, silently past the end of a cut file."""
    if position > size:
        raise SkipFile("truncated: the file ends inside its header")
    elements = getattr(dataset, "_dict", None)  # pydicom's own store; every element, in any order
    for element in (elements.values() if type(elements) is dict else dataset.elements()):
        if isinstance(element, RawDataElement) and element.value is not None \
                and element.length != 0xFFFFFFFF and len(element.value) < element.length:
            raise SkipFile("truncated: the file ends inside its header")
    if "SOPClassUID" not in dataset and "Modality" not in dataset:
        raise SkipFile("truncated or corrupt DICOM header (no SOP class or modality in the data set)")


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text[:120]


def _pixel_data_location(handle, size: int, dataset) -> tuple[int, int | None] | None:
    """(value offset, length or None when undefined) of the pixel data element, None when absent.

    ``stop_before_pixels`` leaves the file positioned at the start of the pixel data element.
    """
    syntax = _transfer_syntax(dataset)
    if syntax not in NATIVE_LITTLE_ENDIAN and syntax != ExplicitVRBigEndian and not _is_encapsulated(syntax):
        return None  # deflated data sets: the file position is not a dataset position
    start = handle.tell()
    head = handle.read(12)
    if len(head) < 8:
        return None
    little = syntax != ExplicitVRBigEndian
    group, element = struct.unpack("<HH" if little else ">HH", head[:4])
    if (group << 16 | element) not in PIXEL_DATA_TAGS:
        return None
    if syntax == ImplicitVRLittleEndian:
        (length,) = struct.unpack("<I", head[4:8])
        offset = start + 8
    else:
        if len(head) < 12:
            raise SkipFile("truncated: the file ends inside the pixel data element header")
        (length,) = struct.unpack("<I" if little else ">I", head[8:12])
        offset = start + 12
    if length == 0xFFFFFFFF:
        _check_fragments(handle, offset, size)
        return offset, None
    if offset + length > size:
        raise SkipFile(f"truncated: pixel data needs {length} bytes but the file ends after {size - offset}")
    return offset, length


def _is_encapsulated(syntax: str) -> bool:
    try:
        return bool(pydicom.uid.UID(syntax).is_encapsulated)
    except Exception:
        return False


def _check_fragments(handle, offset: int, size: int) -> None:
    """Walk the encapsulated pixel data items; a missing sequence delimiter means the file was cut."""
    position = offset
    while True:
        if position + 8 > size:
            raise SkipFile("truncated: the file ends inside the compressed pixel data")
        handle.seek(position)
        tag_group, tag_element, length = struct.unpack("<HHI", handle.read(8))
        tag = tag_group << 16 | tag_element
        if tag == _SEQUENCE_DELIMITER:
            return
        if tag != _ITEM:
            raise SkipFile(f"corrupt compressed pixel data (unexpected tag {tag:08X} at byte {position})")
        position += 8 + length


def _transfer_syntax(dataset) -> str:
    meta = getattr(dataset, "file_meta", None)
    syntax = str(getattr(meta, "TransferSyntaxUID", "") or "")
    if syntax:
        return syntax
    return ImplicitVRLittleEndian if dataset.is_implicit_VR else ExplicitVRLittleEndian


def _file_header(path: Path, dataset, media_class: str, pixel_location) -> FileHeader:
    syntax = _transfer_syntax(dataset)
    header = FileHeader(
        path=path,
        sop_class_uid=_text(dataset, "SOPClassUID") or media_class,
        sop_instance_uid=_text(dataset, "SOPInstanceUID"),
        modality=_text(dataset, "Modality").upper(),
        image_type=_strings(_value(dataset, "ImageType")),
        series_description=_recode_utf8(_text(dataset, "SeriesDescription"), dataset),
        series_number=_int(_value(dataset, "SeriesNumber")),
        study_uid=_text(dataset, "StudyInstanceUID"),
        series_uid=_text(dataset, "SeriesInstanceUID"),
        frame_of_reference_uid=_text(dataset, "FrameOfReferenceUID"),
        patient_id=_recode_utf8(_text(dataset, "PatientID"), dataset),
        convolution_kernel="\\".join(_strings(_value(dataset, "ConvolutionKernel"))),
        slice_thickness=_float(_value(dataset, "SliceThickness")),
        spacing_between_slices=_float(_value(dataset, "SpacingBetweenSlices")),
        manufacturer=_text(dataset, "Manufacturer"),
        transfer_syntax=syntax,
    )
    _add_references(header, dataset)
    if header.slice_thickness is None:  # Enhanced CT keeps it in the functional groups
        shared = _first_item(_value(dataset, "SharedFunctionalGroupsSequence"))
        measures = _first_item(_value(shared, "PixelMeasuresSequence")) if shared is not None else None
        header.slice_thickness = _float(_value(measures, "SliceThickness")) if measures is not None else None
    has_pixels = pixel_location is not None or ("Rows" in dataset and _is_deflated(syntax))
    if not has_pixels and header.sop_class_uid in IMAGE_SOP_CLASSES:
        raise SkipFile("image object without pixel data (truncated or incomplete file)")
    if pixel_location is not None and ("Rows" not in dataset or "Columns" not in dataset):
        raise SkipFile("damaged pixel module: pixel data without Rows and Columns")
    if "Rows" in dataset and "Columns" in dataset:
        if not has_pixels:
            raise SkipFile("image header without pixel data")
        pixel = _pixel_format(dataset, syntax, pixel_location)
        header.slices = _slices(path, dataset, header, pixel)
    return header


def _is_deflated(syntax: str) -> bool:
    return syntax == "1.2.840.10008.1.2.1.99"


def _pixel_format(dataset, syntax: str, pixel_location) -> PixelFormat:
    rows, columns = _int(_value(dataset, "Rows")) or 0, _int(_value(dataset, "Columns")) or 0
    bits_allocated = _int(_value(dataset, "BitsAllocated")) or 16
    frames = max(1, _int(_value(dataset, "NumberOfFrames")) or 1)
    samples = _int(_value(dataset, "SamplesPerPixel")) or 1
    if rows <= 0 or columns <= 0:
        raise SkipFile(f"image size must be positive, got Rows={rows} Columns={columns}")
    offset = None
    if pixel_location is not None and syntax in NATIVE_LITTLE_ENDIAN:
        offset, length = pixel_location
        expected = rows * columns * frames * samples * bits_allocated // 8
        if bits_allocated == 1:
            expected = math.ceil(rows * columns * frames * samples / 8)
        if length is not None and length not in (expected, expected + (expected % 2)):
            raise SkipFile(f"damaged pixel module: pixel data holds {length} bytes but Rows {rows} × Columns "
                           f"{columns} × frames {frames} × SamplesPerPixel {samples} × BitsAllocated "
                           f"{bits_allocated} needs {expected}")
    return PixelFormat(
        transfer_syntax=syntax, rows=rows, columns=columns, bits_allocated=bits_allocated,
        bits_stored=_int(_value(dataset, "BitsStored")) or bits_allocated,
        pixel_representation=_int(_value(dataset, "PixelRepresentation")) or 0,
        samples_per_pixel=samples, photometric=_text(dataset, "PhotometricInterpretation") or "MONOCHROME2",
        frames=frames, padding_value=_int(_value(dataset, "PixelPaddingValue")),
        padding_range_limit=_int(_value(dataset, "PixelPaddingRangeLimit")), pixel_offset=offset)


def _slices(path: Path, dataset, header: FileHeader, pixel: PixelFormat) -> list[SliceRef]:
    shared = _first_item(_value(dataset, "SharedFunctionalGroupsSequence"))
    per_frame = _value(dataset, "PerFrameFunctionalGroupsSequence")
    common = dict(rescale_slope=_float(_value(dataset, "RescaleSlope")),
                  rescale_intercept=_float(_value(dataset, "RescaleIntercept")),
                  position=_floats(_value(dataset, "ImagePositionPatient"), 3),
                  orientation=_floats(_value(dataset, "ImageOrientationPatient"), 6),
                  pixel_spacing=_floats(_value(dataset, "PixelSpacing"), 2),
                  instance_number=_int(_value(dataset, "InstanceNumber")))
    common["rescale_problem"] = _rescale_problem(_value(dataset, "RescaleSlope"), _value(dataset, "RescaleIntercept"))
    common["has_modality_lut"] = _value(dataset, "ModalityLUTSequence") is not None
    base_discriminators = _discriminators(dataset, header)
    if pixel.frames == 1 and per_frame is None and shared is None:
        return [_slice_ref(path, None, header, pixel, common, base_discriminators)]
    slices = []
    for frame in range(pixel.frames):
        groups = _frame_groups(per_frame, frame, shared)
        values = dict(common)
        values["position"] = _group_value(groups, "PlanePositionSequence", "ImagePositionPatient", 3) \
            or common["position"]
        values["orientation"] = _group_value(groups, "PlaneOrientationSequence", "ImageOrientationPatient", 6) \
            or common["orientation"]
        values["pixel_spacing"] = _group_value(groups, "PixelMeasuresSequence", "PixelSpacing", 2) \
            or common["pixel_spacing"]
        transform = _group_item(groups, "PixelValueTransformationSequence")
        if transform is not None:
            raw_slope, raw_intercept = _value(transform, "RescaleSlope"), _value(transform, "RescaleIntercept")
            values["rescale_slope"], values["rescale_intercept"] = _float(raw_slope), _float(raw_intercept)
            values["rescale_problem"] = _rescale_problem(raw_slope, raw_intercept)
        content = _group_item(groups, "FrameContentSequence")
        values["instance_number"] = _int(_value(content, "InStackPositionNumber")) if content is not None else None
        if values["instance_number"] is None:
            values["instance_number"] = frame + 1
        slices.append(_slice_ref(path, frame, header, pixel, values,
                                 base_discriminators + _frame_discriminators(groups)))
    return slices


def _slice_ref(path, frame, header, pixel, values, discriminators) -> SliceRef:
    slope = values["rescale_slope"]
    return SliceRef(
        path=path, frame=frame, position=values["position"], orientation=values["orientation"],
        pixel_spacing=values["pixel_spacing"],
        rescale_slope=1.0 if slope in (None, 0.0) else float(slope),
        rescale_intercept=float(values["rescale_intercept"] or 0.0),
        instance_number=values["instance_number"], sop_instance_uid=header.sop_instance_uid, pixel=pixel,
        discriminators=discriminators, rescale_problem=values["rescale_problem"],
        has_modality_lut=values["has_modality_lut"])


def _rescale_problem(slope, intercept) -> str:
    """What is wrong with a RescaleSlope/RescaleIntercept pair as written; "" when both are usable."""
    problems = [p for p in (_number_problem("RescaleSlope", slope), _number_problem("RescaleIntercept", intercept))
                if p]
    if not problems and _float(slope) == 0.0:
        problems.append("RescaleSlope is 0")
    return "; ".join(problems)


def _number_problem(keyword: str, value) -> str:
    items = _split(value)
    if not items or (isinstance(items[0], str) and not items[0].strip()):
        return f"{keyword} is missing"
    if len(items) > 1:
        return f"{keyword} must be one number, got {len(items)} values"
    text = items[0]
    try:
        number = float(text)
    except (TypeError, ValueError):
        return f"{keyword} is not a number ({_printable(text)!r})"
    if not math.isfinite(number):
        return f"{keyword} is not finite ({number})"
    return ""


def _printable(value) -> str:
    text = str(value)[:24]
    return "".join(c if c.isprintable() else "?" for c in text)


def _discriminators(dataset, header: FileHeader) -> tuple[tuple[str, str], ...]:
    found = []
    for keyword in ("AcquisitionNumber", "TemporalPositionIdentifier"):
        value = _text(dataset, keyword)
        if value:
            found.append((keyword, str(value)))
    if header.image_type:
        found.append(("ImageType", "\\".join(header.image_type)))
    return tuple(found)


def _frame_discriminators(groups) -> tuple[tuple[str, str], ...]:
    found = []
    content = _group_item(groups, "FrameContentSequence")
    if content is not None:
        for keyword in ("StackID", "TemporalPositionIndex"):
            value = _text(content, keyword)
            if value:
                found.append((keyword, str(value)))
    frame_type = _group_item(groups, "CTImageFrameTypeSequence")
    if frame_type is not None and _value(frame_type, "FrameType"):
        found.append(("FrameType", "\\".join(_strings(_value(frame_type, "FrameType")))))
    return tuple(found)


def _first_item(sequence):
    try:
        return sequence[0] if sequence else None
    except Exception:
        return None


def _frame_groups(per_frame, frame: int, shared) -> list:
    groups = []
    if per_frame is not None and frame < len(per_frame):
        groups.append(per_frame[frame])
    if shared is not None:
        groups.append(shared)
    return groups


def _group_item(groups, sequence_keyword: str):
    for group in groups:
        item = _first_item(_value(group, sequence_keyword))
        if item is not None:
            return item
    return None


def _group_value(groups, sequence_keyword: str, keyword: str, count: int):
    for group in groups:
        item = _first_item(_value(group, sequence_keyword))
        if item is not None and keyword in item:
            return _floats(_value(item, keyword), count)
    return None


class _WalkedItem:
    """An item read by :func:`walk_items`, as :func:`_value` reads a Dataset: raw elements and sequences by tag."""

    __slots__ = ("_dict",)

    def __init__(self, found: dict):
        self._dict = {tag: _WalkedSequence([_WalkedItem(item) for item in value]) if isinstance(value, list)
                      else value for tag, value in found.items()}


class _WalkedSequence:
    __slots__ = ("value",)

    def __init__(self, items: list):
        self.value = items


# what _add_references reads of an RTSTRUCT's ReferencedFrameOfReferenceSequence: FrameOfReferenceUID, and in
# RTReferencedStudySequence > RTReferencedSeriesSequence the SeriesInstanceUID and the ContourImageSequence's
# ReferencedSOPInstanceUIDs
_FRAME_REFERENCE_ITEM = {0x00200052: None, 0x30060012: {0x30060014: {
    0x0020000E: None, 0x30060016: {0x00081155: None}}}}


def _frame_references(dataset) -> list | None:
    """ReferencedFrameOfReferenceSequence read from the raw bytes the fast path kept; None when pydicom must.

    pydicom builds a Dataset per item (one per contoured image: most of an RTSTRUCT's header time); the items
    here hold only the UIDs :func:`_add_references` reads, which :func:`_value` decodes as it decodes them
    from pydicom's Datasets. Anything the walker does not know goes to pydicom, as before.
    """
    elements = getattr(dataset, "_dict", None)
    element = elements.get(0x30060010) if type(elements) is dict else None
    if not isinstance(element, RawDataElement) or not isinstance(element.value, bytes) \
            or not element.is_little_endian:
        return None
    try:
        items, _ = walk_items(BytesWindow(element.value), 0, len(element.value), element.is_implicit_VR,
                              _FRAME_REFERENCE_ITEM)
    except (_NotFast, struct.error):
        return None
    return [_WalkedItem(item) for item in items]


def _add_references(header: FileHeader, dataset) -> None:
    """Series/instance/frame-of-reference UIDs an RTSTRUCT or SEG says it was drawn on."""
    series, instances, frames = [], [], []
    frame_references = _frame_references(dataset)
    if frame_references is None:
        frame_references = _value(dataset, "ReferencedFrameOfReferenceSequence") or []
    for frame_ref in frame_references:  # RTSTRUCT
        frames.append(_text(frame_ref, "FrameOfReferenceUID"))
        for study in _value(frame_ref, "RTReferencedStudySequence") or []:
            for series_ref in _value(study, "RTReferencedSeriesSequence") or []:
                series.append(_text(series_ref, "SeriesInstanceUID"))
                for image in _value(series_ref, "ContourImageSequence") or []:
                    instances.append(_text(image, "ReferencedSOPInstanceUID"))
    for roi in _value(dataset, "StructureSetROISequence") or []:
        frames.append(_text(roi, "ReferencedFrameOfReferenceUID"))
    for series_ref in _value(dataset, "ReferencedSeriesSequence") or []:  # SEG (and others)
        series.append(_text(series_ref, "SeriesInstanceUID"))
        for instance in _value(series_ref, "ReferencedInstanceSequence") or []:
            instances.append(_text(instance, "ReferencedSOPInstanceUID"))
    if header.modality == "SEG" and header.frame_of_reference_uid:
        frames.append(header.frame_of_reference_uid)
    header.referenced_series_uids = _unique(series)
    header.referenced_sop_uids = _unique(instances)
    header.referenced_frame_of_reference_uids = _unique(frames)


def _unique(values) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v for v in values if v))


# ---------------------------------------------------------------------------------------------
# Value access. pydicom's value conversion (validation, charset handling, typed values) costs
# several milliseconds per file, more than parsing; the few attributes read here are decoded
# straight from the raw element bytes instead. Sequences go through pydicom.
# ---------------------------------------------------------------------------------------------

_BINARY_FORMATS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d"}
_TAGS: dict[str, int] = {}


def _tag(keyword: str) -> int:
    tag = _TAGS.get(keyword)
    if tag is None:
        tag = _TAGS[keyword] = int(Tag(keyword))
    return tag


def _value(dataset, keyword: str) -> Any:
    """The value of ``keyword`` as text ('a\\b' for several values), numbers, a sequence, or None."""
    elements = getattr(dataset, "_dict", None)  # pydicom's own store: get_item without its Tag() conversion
    try:
        element = elements.get(_tag(keyword)) if type(elements) is dict else dataset.get_item(_tag(keyword))
    except Exception:
        return None
    if element is None:
        return None
    if not isinstance(element, RawDataElement):
        return element.value
    raw = element.value
    if raw is None:
        return None
    vr = element.VR or _dictionary_vr(int(element.tag))
    if vr == "SQ":
        return dataset.get(keyword)
    if " or " in vr:  # e.g. PixelPaddingValue 'US or SS': signed when the pixels are
        vr = "SS" if _pixel_representation(dataset) == 1 else "US"
    code = _BINARY_FORMATS.get(vr)
    if code is not None:
        count = len(raw) // struct.calcsize(code)
        values = struct.unpack(("<" if element.is_little_endian else ">") + code * count,
                               raw[:count * struct.calcsize(code)])
        return values[0] if count == 1 else values
    # latin-1 maps every byte to one character, so UTF-8 text (ISO_IR 192) can be recovered exactly
    # by _recode_utf8 where it matters (descriptions); every other value here is ASCII
    return raw.decode("latin-1").strip(" \x00")


@functools.lru_cache(maxsize=4096)
def _dictionary_vr(tag: int) -> str:
    """The dictionary VR of ``tag`` (cached: pydicom's lookup is a large share of an implicit-VR header read)."""
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


def _pixel_representation(dataset) -> int:
    value = _value(dataset, "PixelRepresentation")
    return int(value) if isinstance(value, (int, float)) else 0


def _recode_utf8(text: str, dataset) -> str:
    charset = _text(dataset, "SpecificCharacterSet")
    if "ISO_IR 192" not in charset:
        return text
    try:
        return text.encode("latin-1").decode("utf-8", errors="replace")
    except UnicodeEncodeError:  # already decoded by pydicom
        return text


def _text(dataset, keyword: str) -> str:
    value = _value(dataset, keyword)
    if value is None:
        return ""
    return str(value).strip().strip("\x00").strip()


def _split(value: Any) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return list(value)
    if isinstance(value, str):
        return value.split("\\")
    return [value]


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(str(v).strip().upper() for v in _split(value))


def _float(value: Any) -> float | None:
    items = _split(value)
    if not items:
        return None
    try:
        result = float(items[0])
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def _int(value: Any) -> int | None:
    number = _float(value)
    return None if number is None else int(round(number))


def _floats(value: Any, count: int) -> tuple[float, ...] | None:
    items = _split(value)
    if len(items) != count:
        return None
    try:
        numbers = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        return None
    return numbers if all(math.isfinite(v) for v in numbers) else None
