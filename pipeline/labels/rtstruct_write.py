"""Writing a label map as a DICOM RTSTRUCT that planning systems import: contours on voxel edges.

Contours. Each connected region of a label on a slice is traced along the *edges* of its voxels
(the staircase between inside and outside pixels), not through voxel centres and not across
corners: the enclosed area is exactly the voxel count times the pixel area (a planning system's
volume agrees with ours), every pixel centre lies half a pixel from the nearest edge (any
point-in-polygon fill gives the mask back exactly), and a polygon always has at least 4 points.
Diagonally touching pixels are separate regions (4-connectivity), so no polygon crosses or
touches itself; two regions may share a corner point.

Holes and islands. PS3.3 C.8.8.6.3 gives two ways to draw a region with a hole: the "keyhole"
technique, one CLOSED_PLANAR contour joined to its hole by an arbitrarily narrow channel, and the
XOR technique, which needs the newer Contour Geometric Type CLOSEDPLANAR_XOR that few planning
systems read yet. Several CLOSED_PLANAR contours of one ROI on one slice have no combination rule
in the standard, and readers differ: plastimatch takes their union (holes come back filled, measured
in tests/test_rtstruct_output.py), our reader (:mod:`pipeline.labels.rtstruct`), Eclipse and
RayStation exports treat a nested contour as a hole (XOR). So by default (``holes="keyhole"``)
every hole is joined to the region around it by a zero-width channel along a voxel edge; every
contour then encloses foreground only, islands (also an island inside a hole) are contours of their
own, no two contours overlap, and union, XOR and even-odd filling all give the mask back. The
channel lies on a voxel edge, so it passes through no voxel centre. ``holes="separate"`` writes
each hole as its own contour instead (the XOR convention of Eclipse's exports; the test fixtures use
it, as planning systems write it).

Geometry: a contour's points are the LPS positions of voxel-corner index coordinates
``(i ± 0.5, j ± 0.5, k)`` through the label grid's affine, so oblique and feet-first grids need
nothing special; the label slice k must be one source image (the caller checks and passes the
image of each k).

References: the Referenced Frame of Reference Sequence names the CT's Frame of Reference, study and
series, and its Contour Image Sequence lists *every* image of the series (as Eclipse and RayStation
write it; a superset of the contoured slices, so an importer finds the whole series), while each
contour references the one image it lies on.

Encoding: Implicit VR Little Endian (4-byte lengths: a contour of thousands of points exceeds the
64 KiB an Explicit VR DS value may hold), the ROI Contour Sequence encoded directly (pydicom needs
minutes for the hundreds of thousands of elements of a large structure set). Text:
SpecificCharacterSet ISO_IR 192 (UTF-8), so ROI names such as ``Rückenmark`` survive.
"""
from __future__ import annotations

import datetime as _dt
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ImplicitVRLittleEndian, RTStructureSetStorage, generate_uid

from pipeline import atomic
from pipeline.geometry import Grid, lps_to_ras

# Patient and General Study attributes copied from the source image (same patient, same study)
COPIED_ATTRIBUTES = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                     "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription")
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"  # what planning systems write as the referenced study class


@dataclass
class Roi:
    """One ROI to write: the label value it contours, its name, display colour and coded concept."""

    value: int
    name: str
    color: tuple[int, int, int]
    concept: Any = None  # pipeline.labels.codes.Concept; None: no codes, RT type ORGAN


@dataclass
class ImageRef:
    """A source image an RTSTRUCT refers to."""

    sop_class_uid: str
    sop_instance_uid: str


@dataclass
class SourceSeries:
    """What the RTSTRUCT needs of the CT series it was drawn on."""

    header: Dataset                     # one image's header (patient, study, series, frame of reference)
    images: list[ImageRef]              # every image of the series (Contour Image Sequence of the series)
    image_of_slice: dict[int, ImageRef] = field(default_factory=dict)  # label slice k -> the image it lies on


# ---------------------------------------------------------------------------------------------
# Contours
# ---------------------------------------------------------------------------------------------

def keyhole_walls(padded: np.ndarray) -> np.ndarray:
    """Cuts that join every hole of a padded 2D mask to the region around it (the keyhole channels).

    ``walls[a, q]`` separates pixels ``(a - 1, q)`` and ``(a, q)``. From each hole's top row (its
    leftmost pixel there) a wall runs up the pixel edge on that pixel's left until it reaches the
    outside or another hole (which has its own wall further up), so every hole opens to the outside.
    """
    from scipy import ndimage

    ni, nj = padded.shape
    walls = np.zeros((ni + 1, nj), dtype=bool)
    background, count = ndimage.label(~padded, structure=np.ones((3, 3), dtype=bool))  # holes: 8-connected
    if count <= 1:
        return walls
    outside = np.unique(np.r_[background[0], background[-1], background[:, 0], background[:, -1]])
    p, q = np.nonzero(background)
    hole = background[p, q]
    inside = ~np.isin(hole, outside)
    p, q, hole = p[inside], q[inside], hole[inside]
    order = np.lexsort((p, -q, hole))  # per hole: top row first, leftmost pixel first
    _, first = np.unique(hole[order], return_index=True)
    for column, top in zip(p[order][first].tolist(), q[order][first].tolist()):
        row = top + 1
        while row < nj and padded[column - 1, row] and padded[column, row]:
            walls[column, row] = True
            row += 1
    return walls


def voxel_edge_contours(plane: np.ndarray, holes: str = "keyhole") -> list[np.ndarray]:
    """Closed polygons along the voxel edges of a 2D boolean mask indexed [i, j], as (n, 2) (i, j) arrays.

    ``holes="keyhole"``: each hole is joined to its surrounding region by a zero-width channel along
    a voxel edge, so every polygon is an outer boundary (counter-clockwise in (i, j)) and the regions
    never overlap: union, XOR and even-odd filling all give the mask. ``holes="separate"``: holes
    are their own clockwise polygons, to be combined by XOR (even-odd). Collinear points are dropped,
    so a single pixel is a 4-point square.
    """
    padded = np.pad(np.asarray(plane, dtype=bool), 1)
    ni, nj = padded.shape
    walls = keyhole_walls(padded) if holes == "keyhole" else np.zeros((ni + 1, nj), dtype=bool)
    # directed boundary edges between corner points (a, b) of the padded grid, inside on the left;
    # pixel (p, q) has corners (p, q), (p + 1, q), (p + 1, q + 1), (p, q + 1)
    starts, ends = [], []
    for dp, dq, corner_a, corner_b in ((0, -1, (0, 0), (1, 0)), (1, 0, (1, 0), (1, 1)),
                                       (0, 1, (1, 1), (0, 1)), (-1, 0, (0, 1), (0, 0))):
        open_side = ~np.roll(padded, (-dp, -dq), axis=(0, 1))
        if dp == 1:
            open_side |= walls[1:]
        elif dp == -1:
            open_side |= walls[:-1]
        p, q = np.nonzero(padded & open_side)
        starts.append(np.c_[p + corner_a[0], q + corner_a[1]])
        ends.append(np.c_[p + corner_b[0], q + corner_b[1]])
    start = np.concatenate(starts)
    end = np.concatenate(ends)
    if not len(start):
        return []
    width = nj + 1
    successor = _successors(start, end, width)
    polygons = []
    for edges in _cycles(successor):
        polygon = _drop_collinear(start[edges].astype(np.float64)) - 1.5  # corners → index coordinates
        if len(polygon) >= 3:
            polygons.append(polygon)
    return polygons


def _successors(start: np.ndarray, end: np.ndarray, width: int) -> np.ndarray:
    """The edge that follows each boundary edge: the only one leaving its end corner, or at a corner
    with two (diagonal pixels, a keyhole's ends) the one turning most to the left."""
    start_key = start[:, 0] * width + start[:, 1]
    end_key = end[:, 0] * width + end[:, 1]
    order = np.argsort(start_key, kind="stable")
    sorted_keys = start_key[order]
    first = np.searchsorted(sorted_keys, end_key, side="left")
    count = np.searchsorted(sorted_keys, end_key, side="right") - first
    if count.min() < 1 or count.max() > 2:
        raise ValueError("boundary edges must meet at corners shared by one or two edges")  # cannot happen
    successor = order[first]
    double = np.nonzero(count == 2)[0]
    if len(double):
        a, b = order[first[double]], order[first[double] + 1]
        direction = end - start
        rank_a = _turn_ranks(direction[double], direction[a])
        rank_b = _turn_ranks(direction[double], direction[b])
        successor[double] = np.where(rank_a <= rank_b, a, b)
    return successor


def _turn_ranks(incoming: np.ndarray, outgoing: np.ndarray) -> np.ndarray:
    """0 left, 1 straight on, 2 right, 3 back: the order in which a boundary walk prefers its next edge."""
    cross = incoming[:, 0] * outgoing[:, 1] - incoming[:, 1] * outgoing[:, 0]
    dot = (incoming * outgoing).sum(axis=1)
    return np.where(cross > 0, 0, np.where(cross < 0, 2, np.where(dot > 0, 1, 3)))


def _cycles(successor: np.ndarray) -> list[np.ndarray]:
    """The cycles of the successor map (each edge on exactly one): the closed boundary loops."""
    if np.bincount(successor, minlength=len(successor)).max() > 1:
        raise ValueError("boundary walk is not one-to-one")  # the turn rule makes it so; a guard, not a path
    following = successor.tolist()
    seen = bytearray(len(following))
    loops = []
    for first in range(len(following)):
        if seen[first]:
            continue
        loop = []
        edge = first
        while not seen[edge]:
            seen[edge] = 1
            loop.append(edge)
            edge = following[edge]
        loops.append(np.asarray(loop))
    return loops


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    before = np.roll(points, 1, axis=0)
    after = np.roll(points, -1, axis=0)
    cross = (points[:, 0] - before[:, 0]) * (after[:, 1] - points[:, 1]) - \
            (points[:, 1] - before[:, 1]) * (after[:, 0] - points[:, 0])
    keep = np.abs(cross) > 1e-9
    return points[keep] if keep.sum() >= 3 else points


def ds_text(value: float) -> str:
    """Format a number for a DS element: as precise as fits in 16 characters."""
    value = float(value) + 0.0  # turns -0.0 into 0.0
    for digits in range(12, 3, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    raise ValueError(f"{value} cannot be written as a DICOM decimal string")


ROI_CONTOUR_SEQUENCE = 0x30060039


def _mm(value: float) -> str:
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _element(tag: int, value: bytes, pad: bytes = b" ") -> bytes:
    """One Implicit VR Little Endian element: tag, 4-byte length, value padded to even length."""
    if len(value) % 2:
        value += pad
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _item(body: bytes) -> bytes:
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body


def _image_reference(image: ImageRef) -> bytes:
    return _item(_element(0x00081150, image.sop_class_uid.encode("ascii"), b"\0") +
                 _element(0x00081155, image.sop_instance_uid.encode("ascii"), b"\0"))


def _roi_contour_item(number: int, color, contours: list[tuple[ImageRef | None, np.ndarray]]) -> bytes:
    """One ROI Contour Sequence item: display colour, ROI number and its CLOSED_PLANAR contours.

    ContourData is DS in mm with 4 decimals (0.1 µm); Implicit VR has 4-byte lengths, so a contour
    of any size fits (Explicit VR limits a DS value to 64 KiB, about 2,400 points).
    """
    items = []
    for n, (image, points) in enumerate(contours, start=1):
        body = _element(0x30060016, _image_reference(image)) if image is not None else b""
        body += _element(0x30060042, b"CLOSED_PLANAR")
        body += _element(0x30060046, str(len(points)).encode("ascii"))
        body += _element(0x30060048, str(n).encode("ascii"))
        body += _element(0x30060050, "\\".join(map(_mm, np.asarray(points, dtype=np.float64).ravel().tolist()))
                         .encode("ascii"))
        items.append(_item(body))
    body = _element(0x3006002A, "\\".join(str(int(c)) for c in color[:3]).encode("ascii"))
    if items:
        body += _element(0x30060040, b"".join(items))
    body += _element(0x30060084, str(number).encode("ascii"))
    return _item(body)


def slice_contours_lps(labels: np.ndarray, grid: Grid, value: int, holes: str = "keyhole"
                       ) -> dict[int, list[np.ndarray]]:
    """Voxel-edge contours of label ``value`` per slice k, as (n, 3) LPS millimetre arrays."""
    affine_lps = lps_to_ras(grid.affine)
    planes = np.nonzero(np.any(labels == value, axis=(0, 1)))[0]
    out: dict[int, list[np.ndarray]] = {}
    for k in planes.tolist():
        polygons = voxel_edge_contours(labels[:, :, k] == value, holes)
        out[k] = [(affine_lps @ np.c_[p, np.full(len(p), k), np.ones(len(p))].T).T[:, :3] for p in polygons]
    return out


# ---------------------------------------------------------------------------------------------
# The data set
# ---------------------------------------------------------------------------------------------

MAX_LENGTH = {"SH": 16, "LO": 64, "CS": 16, "PN": 64}


def copy_study_attributes(header: Dataset, dataset: Dataset) -> list[str]:
    """Copy the patient and study attributes; a value longer than its VR allows (a source export's
    defect, which dciodvfy calls an error) is shortened, and the returned notes say which (without
    the value: it may identify). ``copy_study_attributes(ds, ds)`` shortens them in place."""
    from pydicom.datadict import dictionary_VR

    notes = []
    for keyword in COPIED_ATTRIBUTES:
        value = header.get(keyword, "")
        value = "" if value is None else value
        limit = MAX_LENGTH.get(dictionary_VR(keyword))
        if limit and isinstance(value, str) and len(value) > limit:
            notes.append(f"{keyword} of the source is {len(value)} characters, more than its VR "
                         f"{dictionary_VR(keyword)} allows; shortened to {limit}")
            value = value[:limit]
        setattr(dataset, keyword, value)
    return notes


def _code_item(code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme
    item.CodeMeaning = code.meaning[:64]
    return item


def _image_item(image: ImageRef) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = image.sop_class_uid
    item.ReferencedSOPInstanceUID = image.sop_instance_uid
    return item


def new_file_dataset(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, charset: str,
                     implementation: str) -> Dataset:
    """An empty DICOM file dataset: file meta (preamble, transfer syntax, implementation) and the SOP identity."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = implementation
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.preamble = b"\x00" * 128
    dataset.SpecificCharacterSet = charset
    dataset.SOPClassUID = sop_class_uid
    dataset.SOPInstanceUID = sop_instance_uid
    return dataset


def rtstruct_dataset(labels: np.ndarray, grid: Grid, rois: list[Roi], source: SourceSeries,
                     software_version: str = "", series_description: str = "ctseg RTSTRUCT",
                     label: str = "CTSEG", holes: str = "keyhole") -> tuple[Dataset, dict]:
    """The RTSTRUCT of ``labels`` (on ``grid``, the source series' grid) and a summary of what it holds."""
    header = source.header
    dataset = new_file_dataset(RTStructureSetStorage, generate_uid(), ImplicitVRLittleEndian, "ISO_IR 192", "CTSEG")
    now = _dt.datetime.now()
    dataset.InstanceCreationDate = now.strftime("%Y%m%d")
    dataset.InstanceCreationTime = now.strftime("%H%M%S")
    corrected = copy_study_attributes(header, dataset)
    dataset.Modality = "RTSTRUCT"
    dataset.SeriesInstanceUID = generate_uid()
    dataset.SeriesNumber = int(header.get("SeriesNumber", 0) or 0) + 100
    dataset.SeriesDate = dataset.InstanceCreationDate
    dataset.SeriesTime = dataset.InstanceCreationTime
    dataset.SeriesDescription = series_description
    dataset.OperatorsName = ""
    dataset.Manufacturer = "ctseg"
    dataset.ManufacturerModelName = "ctseg predict"
    dataset.SoftwareVersions = software_version or "unknown"
    dataset.InstanceNumber = 1
    dataset.StructureSetLabel = label
    dataset.StructureSetDate = dataset.InstanceCreationDate
    dataset.StructureSetTime = dataset.InstanceCreationTime
    frame_uid = str(header.FrameOfReferenceUID)
    dataset.FrameOfReferenceUID = frame_uid  # the Frame of Reference module (PS3.3 A.19.3 lists it)
    dataset.PositionReferenceIndicator = header.get("PositionReferenceIndicator", "") or ""

    series_item = Dataset()
    series_item.SeriesInstanceUID = str(header.SeriesInstanceUID)
    series_item.ContourImageSequence = Sequence([_image_item(image) for image in source.images])
    study_item = Dataset()
    study_item.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
    study_item.ReferencedSOPInstanceUID = str(header.StudyInstanceUID)
    study_item.RTReferencedSeriesSequence = Sequence([series_item])
    frame_item = Dataset()
    frame_item.FrameOfReferenceUID = frame_uid
    frame_item.RTReferencedStudySequence = Sequence([study_item])
    dataset.ReferencedFrameOfReferenceSequence = Sequence([frame_item])

    roi_items, contour_items, observation_items = [], [], []
    summary: dict[str, Any] = {"rois": [], "contours": 0, "points": 0, "unreferenced_contours": 0,
                               "corrected": corrected}
    for number, roi in enumerate(rois, start=1):
        item = Dataset()
        item.ROINumber = number
        item.ReferencedFrameOfReferenceUID = frame_uid
        item.ROIName = roi.name[:64]
        item.ROIGenerationAlgorithm = "AUTOMATIC"
        roi_items.append(item)
        contours = []
        for k, polygons in slice_contours_lps(labels, grid, roi.value, holes).items():
            image = source.image_of_slice.get(k)
            summary["unreferenced_contours"] += 0 if image is not None else len(polygons)
            contours += [(image, points) for points in polygons]
            summary["points"] += sum(len(points) for points in polygons)
        contour_items.append(_roi_contour_item(number, roi.color, contours))
        summary["contours"] += len(contours)
        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        concept = roi.concept
        if concept is not None:
            observation.RTROIIdentificationCodeSequence = Sequence([_code_item(concept.type)])
        observation.RTROIInterpretedType = getattr(concept, "rt_type", None) or "ORGAN"
        observation.ROIInterpreter = ""
        observation_items.append(observation)
        summary["rois"].append({"name": roi.name, "number": number, "contours": len(contours),
                                "rt_type": observation.RTROIInterpretedType})
    dataset.StructureSetROISequence = Sequence(roi_items)
    # the ROI Contour Sequence is encoded here (Implicit VR Little Endian, as the file is): pydicom
    # takes minutes for the hundreds of thousands of elements of a large structure set
    data = b"".join(contour_items)
    dataset[ROI_CONTOUR_SEQUENCE] = RawDataElement(ROI_CONTOUR_SEQUENCE, "SQ", len(data), data, 0, True, True)
    dataset.set_original_encoding(True, True, "ISO_IR 192")
    dataset.RTROIObservationsSequence = Sequence(observation_items)
    dataset.ApprovalStatus = "UNAPPROVED"  # a model's contours are drafts until a clinician approves them
    summary["holes"] = holes
    summary["sop_instance_uid"] = str(dataset.SOPInstanceUID)
    summary["series_instance_uid"] = str(dataset.SeriesInstanceUID)
    return dataset, summary


def save_rtstruct(dataset: Dataset, path: Path) -> Path:
    """Write the RTSTRUCT atomically as a DICOM Part 10 file."""
    path = Path(path)
    with atomic.atomic_path(path) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)
    return path


def source_header(path: Path) -> Dataset:
    """The header of one source image (no pixels), for :class:`SourceSeries`."""
    import pydicom

    return pydicom.dcmread(str(path), stop_before_pixels=True)


def image_ref(header: Dataset) -> ImageRef:
    return ImageRef(str(header.SOPClassUID), str(header.SOPInstanceUID))

