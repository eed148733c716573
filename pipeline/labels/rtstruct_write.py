"""Writing a label map as a DICOM RTSTRUCT that planning systems import: contours on voxel edges.

Contours. Each connected region of a label on a slice is traced along the *edges* of its voxels
(the staircase between inside and outside pixels), not through voxel centres and not across
corners: the enclosed area is exactly the voxel count times the pixel area (a planning system's
volume agrees with ours), every pixel centre lies half a pixel from the nearest edge (any
point-in-polygon fill gives the mask back exactly), and a polygon always has at least 4 points.
Diagonally touching pixels are separate regions (4-connectivity), so no polygon crosses or
touches itself; two regions may share a corner point.

Holes and islands. Every region and every hole is its own ``CLOSED_PLANAR`` contour on the slice;
a hole is the inside of a region's inner boundary, an island inside a hole is again a region. The
ROI on a slice is what the even-odd (XOR) rule over its contours gives. That is how PS3.3 C.8.8.6.3
describes inner contours and how Eclipse, RayStation and Monaco export and import them, and how
our reader (:mod:`pipeline.labels.rtstruct`) and plastimatch fill them (tests/test_rtstruct_output.py
checks both). Keyhole contours (one polygon with a zero-width cut to each hole) are not written:
they are the older workaround for systems without XOR filling, and their cut lines are visible in
every viewer.

Geometry: a contour's points are the LPS positions of voxel-corner index coordinates
``(i ± 0.5, j ± 0.5, k)`` through the label grid's affine, so oblique and feet-first grids need
nothing special; the label slice k must be one source image (the caller checks and passes the
image of each k).

Text: SpecificCharacterSet ISO_IR 192 (UTF-8), so ROI names such as ``Rückenmark`` survive.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, RTStructureSetStorage, generate_uid

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
    concept: object = None  # pipeline.labels.codes.Concept; None: no codes, RT type ORGAN


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

def voxel_edge_contours(plane: np.ndarray) -> list[np.ndarray]:
    """Closed polygons along the voxel edges of a 2D boolean mask indexed [i, j], as (n, 2) (i, j) arrays.

    Outer boundaries run counter-clockwise in (i, j), holes clockwise; fill them with the even-odd
    rule. Collinear points are dropped, so a single pixel is a 4-point square.
    """
    padded = np.pad(np.asarray(plane, dtype=bool), 1)
    ni, nj = padded.shape
    # directed boundary edges between corner points (a, b) of the padded grid, inside on the left;
    # pixel (p, q) has corners (p, q), (p + 1, q), (p + 1, q + 1), (p, q + 1)
    starts, ends = [], []
    for dp, dq, start, end in ((0, -1, (0, 0), (1, 0)), (1, 0, (1, 0), (1, 1)),
                               (0, 1, (1, 1), (0, 1)), (-1, 0, (0, 1), (0, 0))):
        neighbour = np.roll(padded, (-dp, -dq), axis=(0, 1))
        p, q = np.nonzero(padded & ~neighbour)
        starts.append(np.c_[p + start[0], q + start[1]])
        ends.append(np.c_[p + end[0], q + end[1]])
    start = np.concatenate(starts)
    end = np.concatenate(ends)
    if not len(start):
        return []
    width = nj + 1
    start_key = start[:, 0] * width + start[:, 1]
    outgoing: dict[int, list[int]] = {}
    for edge, key in enumerate(start_key.tolist()):
        outgoing.setdefault(key, []).append(edge)
    direction = end - start
    used = np.zeros(len(start), dtype=bool)
    polygons = []
    for first in range(len(start)):
        if used[first]:
            continue
        loop = []
        edge = first
        while not used[edge]:
            used[edge] = True
            loop.append(start[edge])
            key = int(end[edge, 0] * width + end[edge, 1])
            candidates = [e for e in outgoing[key] if not used[e]]
            if not candidates:
                break
            if len(candidates) > 1:  # a corner shared by diagonal pixels: turn left, keeping regions 4-connected
                dx, dy = direction[edge]
                candidates.sort(key=lambda e: -(dx * direction[e][1] - dy * direction[e][0]))
            edge = candidates[0]
        polygon = _drop_collinear(np.asarray(loop, dtype=np.float64)) - 1.5  # corners → index coordinates
        if len(polygon) >= 3:
            polygons.append(polygon)
    return polygons


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


def slice_contours_lps(labels: np.ndarray, grid: Grid, value: int) -> dict[int, list[np.ndarray]]:
    """Voxel-edge contours of label ``value`` per slice k, as (n, 3) LPS millimetre arrays."""
    affine_lps = lps_to_ras(grid.affine)
    planes = np.nonzero(np.any(labels == value, axis=(0, 1)))[0]
    out: dict[int, list[np.ndarray]] = {}
    for k in planes.tolist():
        polygons = voxel_edge_contours(labels[:, :, k] == value)
        out[k] = [(affine_lps @ np.c_[p, np.full(len(p), k), np.ones(len(p))].T).T[:, :3] for p in polygons]
    return out


# ---------------------------------------------------------------------------------------------
# The data set
# ---------------------------------------------------------------------------------------------

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


def rtstruct_dataset(labels: np.ndarray, grid: Grid, rois: list[Roi], source: SourceSeries,
                     software_version: str = "", series_description: str = "ctseg RTSTRUCT",
                     label: str = "CTSEG") -> tuple[Dataset, dict]:
    """The RTSTRUCT of ``labels`` (on ``grid``, the source series' grid) and a summary of what it holds."""
    header = source.header
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTStructureSetStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "CTSEG"
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.preamble = b"\x00" * 128
    dataset.SpecificCharacterSet = "ISO_IR 192"
    dataset.SOPClassUID = RTStructureSetStorage
    dataset.SOPInstanceUID = sop_uid
    now = _dt.datetime.now()
    dataset.InstanceCreationDate = now.strftime("%Y%m%d")
    dataset.InstanceCreationTime = now.strftime("%H%M%S")
    for keyword in COPIED_ATTRIBUTES:
        value = header.get(keyword, "")
        setattr(dataset, keyword, value if value is not None else "")
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
    summary = {"rois": [], "contours": 0, "points": 0, "unreferenced_contours": 0}
    for number, roi in enumerate(rois, start=1):
        item = Dataset()
        item.ROINumber = number
        item.ReferencedFrameOfReferenceUID = frame_uid
        item.ROIName = roi.name[:64]
        item.ROIGenerationAlgorithm = "AUTOMATIC"
        roi_items.append(item)
        roi_contour = Dataset()
        roi_contour.ROIDisplayColor = [int(c) for c in roi.color[:3]]
        roi_contour.ReferencedROINumber = number
        contours = []
        for k, polygons in slice_contours_lps(labels, grid, roi.value).items():
            image = source.image_of_slice.get(k)
            for points in polygons:
                contour = Dataset()
                if image is not None:
                    contour.ContourImageSequence = Sequence([_image_item(image)])
                else:
                    summary["unreferenced_contours"] += 1
                contour.ContourGeometricType = "CLOSED_PLANAR"
                contour.NumberOfContourPoints = len(points)
                contour.ContourNumber = len(contours) + 1
                contour.ContourData = [ds_text(round(float(v), 4)) for v in points.ravel()]
                contours.append(contour)
                summary["points"] += len(points)
        if contours:
            roi_contour.ContourSequence = Sequence(contours)
        contour_items.append(roi_contour)
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
    dataset.ROIContourSequence = Sequence(contour_items)
    dataset.RTROIObservationsSequence = Sequence(observation_items)
    dataset.ApprovalStatus = "UNAPPROVED"  # a model's contours are drafts until a clinician approves them
    summary["sop_instance_uid"] = sop_uid
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

