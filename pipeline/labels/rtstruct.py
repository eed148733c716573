"""Rasterising DICOM RTSTRUCT contours into boolean masks on an image's voxel grid.

Contour points are LPS millimetres; each CLOSED_PLANAR contour lies in one image slice. A voxel
is inside when its centre is inside the polygon, with the even-odd rule across all contours of
an ROI on a slice, so holes (inner contours) and several islands per slice come out right.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import InputError
from pipeline.geometry import Grid, world_to_index

log = logging.getLogger("ctseg.labels")

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
# a contour more than this many slices from the nearest slice centre does not belong to the image
SLICE_TOLERANCE = 0.5
# points of one planar contour may spread this much across slices (rounding in exported coordinates)
PLANARITY_TOLERANCE = 0.25


@dataclass
class RoiContours:
    """One ROI's CLOSED_PLANAR contours as LPS point arrays, with its display colour and RT type."""

    number: int
    name: str
    contours: list[np.ndarray]
    color: tuple[int, int, int] | None = None   # ROIDisplayColor
    interpreted_type: str = ""                   # RTROIInterpretedType (ORGAN, PTV, GTV, EXTERNAL, ...)


def read_rtstruct(rtstruct_path: Path) -> list[RoiContours]:
    """Read every ROI of an RTSTRUCT with its closed planar contours (other geometric types are skipped).

    The file is read once, by :func:`_read_structure_set_fast` when it can (a 'DICM' file in Implicit or
    Explicit VR Little Endian of a structure it knows), else by pydicom; both give the same ROIs.
    """
    rtstruct_path = Path(rtstruct_path)
    structure_set = _read_structure_set_fast(rtstruct_path)
    if structure_set is None:
        structure_set = _read_structure_set_pydicom(rtstruct_path)
    dataset, roi_contours, observations = structure_set
    modality = dataset.get("Modality", "")
    if modality != "RTSTRUCT" and dataset.get("SOPClassUID", "") != RTSTRUCT_SOP_CLASS:
        raise InputError(f"{rtstruct_path} must be an RTSTRUCT, got Modality '{modality}'. Point the label input at "
                         f"the structure set file (often RS*.dcm).")
    names = {int(item.ROINumber): str(item.get("ROIName", f"ROI_{item.ROINumber}")).strip()
             for item in dataset.get("StructureSetROISequence", [])}
    rois = {number: RoiContours(number, name, []) for number, name in names.items()}
    skipped: dict[str, int] = {}
    for roi_contour, contours in roi_contours:
        number = int(roi_contour.ReferencedROINumber)
        roi = rois.setdefault(number, RoiContours(number, f"ROI_{number}", []))
        roi.color = _display_color(roi_contour)
        for kind_value, contour_points in contours:
            kind = str(kind_value).upper()
            points = contour_points()
            if kind != "CLOSED_PLANAR" or points is None:
                skipped[kind] = skipped.get(kind, 0) + 1
                continue
            if len(points) % 3:
                raise InputError(f"{rtstruct_path}: ROI '{roi.name}' has a contour with {len(points)} coordinates; "
                                 f"ContourData must hold (x, y, z) triplets. Re-export the structure set.")
            if len(points) < 9:  # one or two points enclose no area
                skipped["degenerate"] = skipped.get("degenerate", 0) + 1
                continue
            roi.contours.append(points.reshape(-1, 3))
    for observation in observations:
        number = observation.get("ReferencedROINumber")
        if number is not None and int(number) in rois:
            rois[int(number)].interpreted_type = str(observation.get("RTROIInterpretedType", "") or "")
    if skipped:
        log.info("%s: skipped non-closed contours %s", rtstruct_path.name, skipped)
    return list(rois.values())


def _read_structure_set_pydicom(rtstruct_path: Path):
    """(data set, [(ROIContourSequence item, [(geometric type, () -> points)])], RTROIObservationsSequence)."""
    import pydicom

    try:
        dataset = pydicom.dcmread(rtstruct_path)
    except Exception as exc:
        raise InputError(f"{rtstruct_path} could not be read as DICOM ({type(exc).__name__}: {exc}). Check that "
                         f"the file is a complete RTSTRUCT export.") from exc
    roi_contours = [(item, [(contour.get("ContourGeometricType", "CLOSED_PLANAR"),
                             lambda contour=contour: _contour_data(contour))
                            for contour in item.get("ContourSequence", [])])
                    for item in dataset.get("ROIContourSequence", [])]
    return dataset, roi_contours, dataset.get("RTROIObservationsSequence", [])


# ---------------------------------------------------------------------------------------------
# Fast path. pydicom builds a Dataset for every contour item (about 20 ms for a 500 kB structure set,
# most of an RTSTRUCT's cost); here the file's bytes are walked once (pipeline.dicom.header.walk_dataset)
# and each contour's ContourGeometricType and ContourData bytes are taken as they lie. Only the few small
# elements (ROI numbers, names, colours, types) go through pydicom's own value conversion, with
# the file's character set, in small Datasets; ReferencedFrameOfReferenceSequence (which the export scan
# reads) and every other element are skipped unparsed. Anything the walker does not know (no preamble, big
# endian, deflate, a non-standard VR, an element that runs past the end of the file) returns None, and
# pydicom reads the file as before, with its error messages.
# ---------------------------------------------------------------------------------------------

_SPECIFIC_CHARACTER_SET, _SOP_CLASS_UID, _MODALITY = 0x00080005, 0x00080016, 0x00080060
_STRUCTURE_SET_ROI_SEQUENCE, _ROI_CONTOUR_SEQUENCE, _OBSERVATIONS_SEQUENCE = 0x30060020, 0x30060039, 0x30060080
_CONTOUR_SEQUENCE, _GEOMETRIC_TYPE, _CONTOUR_DATA = 0x30060040, 0x30060042, 0x30060050
# which elements are kept, per level; a dict is a sequence whose items are read with that spec
_ROI_ITEM = {0x30060022: None, 0x30060026: None}                       # ROINumber, ROIName
_OBSERVATION_ITEM = {0x30060084: None, 0x300600A4: None}               # ReferencedROINumber, RTROIInterpretedType
_CONTOUR_ITEM = {_GEOMETRIC_TYPE: None, _CONTOUR_DATA: None}
_ROI_CONTOUR_ITEM = {0x30060084: None, 0x3006002A: None, _CONTOUR_SEQUENCE: _CONTOUR_ITEM}  # ROI, colour, contours
_TOP = {_SPECIFIC_CHARACTER_SET: None, _SOP_CLASS_UID: None, _MODALITY: None,
        _STRUCTURE_SET_ROI_SEQUENCE: _ROI_ITEM, _ROI_CONTOUR_SEQUENCE: _ROI_CONTOUR_ITEM,
        _OBSERVATIONS_SEQUENCE: _OBSERVATION_ITEM}


def _read_structure_set_fast(rtstruct_path: Path):
    """What :func:`_read_structure_set_pydicom` returns, read straight from the bytes; None when it cannot."""
    import struct

    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    from pipeline.dicom.header import BytesWindow, NotFast, fast_meta, walk_dataset

    try:
        with open(rtstruct_path, "rb") as handle:
            data = handle.read()
    except OSError:
        return None  # pydicom gives the error message
    window = BytesWindow(data)
    try:
        if window.size < 132 or window.bytes(128, 4) != b"DICM":
            return None
        meta, position = fast_meta(window, 132)
        syntax = meta.get(0x00020010, "")
        if syntax not in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
            return None
        implicit = syntax == ImplicitVRLittleEndian
        first = window.bytes(position, 6) if position + 6 <= window.size else b""
        if implicit and len(first) == 6 and 0x40 < first[4] < 0x5B and 0x40 < first[5] < 0x5B:
            return None  # looks explicit: pydicom would switch to explicit VR here
        found, _ = walk_dataset(window, position, None, implicit, _TOP)
    except (NotFast, struct.error, UnicodeDecodeError):
        return None
    top = Dataset({tag: value for tag, value in found.items() if not isinstance(value, list)})
    encoding = top._character_set  # what pydicom decodes the names with, as for any item of this file

    def item(elements: dict) -> Dataset:
        return Dataset({t: v for t, v in elements.items() if not isinstance(v, list)}, parent_encoding=encoding)

    from pydicom.dataelem import convert_raw_data_element

    def geometric_type(contour: dict):
        raw = contour.get(_GEOMETRIC_TYPE)
        return "CLOSED_PLANAR" if raw is None else convert_raw_data_element(raw, encoding=encoding).value

    def points_of(contour: dict):
        raw = contour.get(_CONTOUR_DATA)
        return None if raw is None else _points(raw.value)

    if _STRUCTURE_SET_ROI_SEQUENCE in found:
        from pydicom.sequence import Sequence

        top.StructureSetROISequence = Sequence([item(i) for i in found[_STRUCTURE_SET_ROI_SEQUENCE]])
    roi_contours = [(item(roi), [(geometric_type(c), lambda c=c: points_of(c)) for c in roi.get(_CONTOUR_SEQUENCE, [])])
                    for roi in found.get(_ROI_CONTOUR_SEQUENCE, [])]
    observations = [item(i) for i in found.get(_OBSERVATIONS_SEQUENCE, [])]
    return top, roi_contours, observations


def _display_color(roi_contour) -> tuple[int, int, int] | None:
    try:
        values = [int(v) for v in roi_contour.get("ROIDisplayColor", None) or []]
    except (TypeError, ValueError):
        return None
    return tuple(min(max(v, 0), 255) for v in values) if len(values) == 3 else None


def _contour_data(contour) -> np.ndarray | None:
    """ContourData as floats, parsed straight from the raw bytes (pydicom's DS objects are 50× slower)."""
    if 0x30060050 not in contour:
        return None
    element = contour.get_item(0x30060050)
    raw = getattr(element, "value", None)
    if isinstance(raw, (bytes, bytearray)):
        return _points(raw)
    values = contour.ContourData
    return np.asarray([float(v) for v in values], dtype=np.float64) if values else None


def _points(raw: bytes) -> np.ndarray:
    """The numbers of a raw ContourData (DS) value."""
    text = raw.decode("ascii", errors="replace").replace("\\", " ").replace("\x00", " ")
    parts = text.split()
    # float() per value: the same numbers and the same ValueError as numpy's string parsing, 3x faster
    return np.fromiter(map(float, parts), dtype=np.float64, count=len(parts))


def rasterise_rtstruct(rtstruct_path: Path, image_grid: Grid, roi_names: list[str] | None = None
                       ) -> dict[str, np.ndarray]:
    """Boolean mask per ROI on ``image_grid`` (arrays [i, j, k]); ``roi_names`` selects ROIs (case-insensitive).

    A requested name the RTSTRUCT lacks raises InputError listing the names it has.
    """
    rtstruct_path = Path(rtstruct_path)
    rois = read_rtstruct(rtstruct_path)
    seen: dict[str, int] = {}
    for roi in rois:
        if roi.name.lower() in seen:
            raise InputError(f"{rtstruct_path} must name each ROI once, got '{roi.name}' for ROI numbers "
                             f"{seen[roi.name.lower()]} and {roi.number}. Rename one in the planning system.")
        seen[roi.name.lower()] = roi.number
    if roi_names is not None:
        by_name = {roi.name.lower(): roi for roi in rois}
        missing = [name for name in roi_names if name.strip().lower() not in by_name]
        if missing:
            raise InputError(f"{rtstruct_path} must contain ROI(s) {missing}, got {sorted(r.name for r in rois)}. "
                             f"Fix the ROI names in the label configuration (names are case-insensitive).")
        rois = [by_name[name.strip().lower()] for name in roi_names]
    for roi in rois:
        if not roi.contours:
            log.warning("%s: ROI '%s' has no closed contours; its mask is empty", rtstruct_path.name, roi.name)
    return {roi.name: rasterise_contours(roi.contours, image_grid, f"{rtstruct_path} ROI '{roi.name}'")
            for roi in rois}


def rasterise_contours(contours: list[np.ndarray], grid: Grid, where: str = "contours") -> np.ndarray:
    """Even-odd fill of closed planar LPS contours at the voxel centres of ``grid``.

    All points are mapped to voxel indices in one call, and the scan-line fill runs over the contours of
    many slices at once (:func:`fill_slices`); the result is voxel for voxel that of filling each slice alone.
    """
    mask = np.zeros(grid.shape, dtype=bool)
    if not contours:
        return mask
    lengths = [len(points) for points in contours]
    index = world_to_index(grid, np.concatenate(contours) * np.array([-1.0, -1.0, 1.0]))  # LPS → RAS → index
    polygons_on_slice: dict[int, list[np.ndarray]] = {}
    outside = 0
    first = 0
    for length in lengths:
        contour = index[first:first + length]
        first += length
        k_values = contour[:, 2]
        k = int(np.rint(k_values.mean()))
        if np.ptp(k_values) > 2 * PLANARITY_TOLERANCE:
            raise InputError(f"{where}: a contour spans slices {k_values.min():.2f}–{k_values.max():.2f} of the "
                             f"image, but contours must lie in one image slice. Check that the structure set belongs "
                             f"to this image series (same orientation and slice positions).")
        if not 0 <= k < grid.shape[2] or abs(k_values.mean() - k) > SLICE_TOLERANCE:
            outside += 1
            continue
        polygons_on_slice.setdefault(k, []).append(contour[:, :2])
    slices = sorted(polygons_on_slice)
    per_chunk = max(1, FILL_CHUNK_VOXELS // (grid.shape[0] * grid.shape[1]))
    for start in range(0, len(slices), per_chunk):
        chunk = slices[start:start + per_chunk]
        mask[:, :, chunk] = fill_slices(grid.shape[:2], [polygons_on_slice[k] for k in chunk]).transpose(1, 2, 0)
    if outside:
        log.warning("%s: %d contour(s) lie outside the image's slices and were ignored", where, outside)
    return mask


# the scan-line fill of many slices at once holds an int64 toggle count per voxel of the slices it fills
FILL_CHUNK_VOXELS = 1 << 22


def fill_even_odd(shape: tuple[int, int], polygons: list[np.ndarray]) -> np.ndarray:
    """Pixels (indexed [i, j]) whose centres lie inside an odd number of the (i, j) polygons."""
    return fill_slices(shape, [polygons])[0]


def fill_slices(shape: tuple[int, int], polygons_per_slice: list[list[np.ndarray]]) -> np.ndarray:
    """:func:`fill_even_odd` of several slices at once: a (slices, ni, nj) boolean array.

    Scanline fill: every edge crossing row j at x toggles the pixels with centre i > x. Edges are
    half-open in j, so a vertex exactly on a row is counted once. Every edge of every polygon of every
    slice is handled in one pass of array operations (no Python loop over edges, rows or slices).
    """
    ni, nj = shape
    polygons = [p for slice_polygons in polygons_per_slice for p in slice_polygons]
    lengths = np.array([len(p) for p in polygons], dtype=np.int64)
    slot = np.repeat(np.repeat(np.arange(len(polygons_per_slice)), [len(s) for s in polygons_per_slice]), lengths)
    starts = np.concatenate(polygons)
    following = np.arange(1, len(starts) + 1)
    ends_at = np.cumsum(lengths)
    following[ends_at - 1] = ends_at - lengths  # each polygon closes on its first point
    ends = starts[following]
    x0, y0, x1, y1 = starts[:, 0], starts[:, 1], ends[:, 0], ends[:, 1]
    low, high = np.minimum(y0, y1), np.maximum(y0, y1)
    first_row = np.maximum(np.ceil(low), 0).astype(np.int64)
    end_row = np.minimum(np.ceil(high), nj).astype(np.int64)  # rows j with low <= j < high
    counts = np.maximum(end_row - first_row, 0)
    slices = len(polygons_per_slice)
    if counts.sum() == 0:
        return np.zeros((slices, ni, nj), dtype=bool)
    edge = np.repeat(np.arange(len(counts)), counts)
    row = first_row[edge] + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
    slope = (x1 - x0)[edge] / (y1 - y0)[edge]
    crossing = x0[edge] + (row - y0[edge]) * slope
    first_right = np.clip(np.floor(crossing).astype(np.int64) + 1, 0, ni)
    # Only the box the crossings span is counted: left of the first toggle of a row nothing is inside, and
    # right of its last one the count is even (a closed polygon crosses a row an even number of times, the
    # half-open rule included), so nothing is inside there either. The parity is summed in uint8: wrapping
    # at 256 keeps it.
    i0, i1 = int(first_right.min()), int(first_right.max())
    j0, j1 = int(row.min()), int(row.max()) + 1
    width, height = i1 - i0 + 1, j1 - j0
    toggles = np.bincount((slot[edge] * height + (row - j0)) * width + (first_right - i0),
                          minlength=slices * height * width).reshape(slices, height, width)
    parity = np.cumsum((toggles & 1).astype(np.uint8), axis=2, dtype=np.uint8) & 1
    inside = np.zeros((slices, nj, ni), dtype=bool)
    right = min(i1, ni)
    inside[:, j0:j1, i0:right] = parity[:, :, :right - i0].astype(bool)
    return inside.transpose(0, 2, 1)
