"""Reading DICOM Segmentation (SEG) objects into a label map on an image's voxel grid.

highdicom parses the SEG (segment descriptions, frame decoding, the volume geometry); every frame
is then placed by its own ImagePositionPatient, so frame order, feet-first series, segments that
cover only some slices and BINARY / FRACTIONAL / LABELMAP encodings all map exactly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import InputError
from pipeline.geometry import Grid, lps_to_ras, world_to_index

log = logging.getLogger("ctseg.labels")

# frame corners must land this close (in voxels) to voxel centres of the image grid
INDEX_TOLERANCE = 0.05


def read_dicom_seg(seg_path: Path, image_grid: Grid | None = None, segment_to_value: dict[int, int] | None = None
                   ) -> tuple[np.ndarray, dict[int, str]]:
    """Label map (array [i, j, k], uint8 or uint16) and {value: segment label} from a DICOM SEG.

    ``image_grid``: the grid of the image the SEG annotates (None: the SEG's own regular grid).
    ``segment_to_value``: SEG segment number → output label value (None: the segment numbers;
    segments left out of the mapping are skipped). Where segments overlap the higher value wins.
    """
    seg_path = Path(seg_path)
    return _label_map(_read(seg_path), seg_path, image_grid, segment_to_value)


@dataclass
class SegSegment:
    """One segment of a DICOM SEG as a boolean mask on an image grid, with its label and colour."""

    number: int
    label: str
    mask: np.ndarray
    color: tuple[int, int, int] | None = None
    property_type: str = ""   # SegmentedPropertyType code meaning, e.g. "Liver"


def read_seg_segments(seg_path: Path, image_grid: Grid) -> list[SegSegment]:
    """Every segment of a DICOM SEG as its own mask on ``image_grid`` (the file is parsed once).

    Unlike :func:`read_dicom_seg` overlapping segments keep all their voxels.
    """
    seg_path = Path(seg_path)
    seg = _read(seg_path)
    segments = []
    for number in [int(n) for n in seg.get_segment_numbers()]:
        label, _ = _label_map(seg, seg_path, image_grid, {number: 1})
        description = seg.get_segment_description(number)
        segments.append(SegSegment(number, _segment_label(seg, number), label.astype(bool),
                                   _segment_color(description), _property_type(description)))
    return segments


def _segment_color(description) -> tuple[int, int, int] | None:
    lab = description.get("RecommendedDisplayCIELabValue")
    if lab is None or len(lab) != 3:
        return None
    try:
        from highdicom.color import CIELabColor

        return tuple(int(v) for v in CIELabColor.from_dicom_value([int(v) for v in lab]).to_rgb())
    except (ValueError, TypeError, AttributeError):
        return None


def _property_type(description) -> str:
    try:
        return str(description.SegmentedPropertyTypeCodeSequence[0].CodeMeaning)
    except (AttributeError, IndexError, KeyError):
        return ""


def _label_map(seg, seg_path: Path, image_grid: Grid | None, segment_to_value: dict[int, int] | None
               ) -> tuple[np.ndarray, dict[int, str]]:
    numbers = [int(n) for n in seg.get_segment_numbers()]
    mapping = {n: n for n in numbers} if segment_to_value is None else dict(segment_to_value)
    unknown = sorted(set(mapping) - set(numbers))
    if unknown:
        raise InputError(f"{seg_path} must contain segment number(s) {unknown}, got {numbers} "
                         f"({_describe_segments(seg, numbers)}). Fix segment_to_value.")
    values = [v for v in mapping.values()]
    if any(v < 0 or v > 65535 for v in values):
        raise InputError(f"segment_to_value for {seg_path} must map to values in [0, 65535], got {values}.")
    grid = image_grid if image_grid is not None else _seg_grid(seg, seg_path)
    dtype = np.uint8 if max(values, default=0) <= 255 else np.uint16
    label = np.zeros(grid.shape, dtype=dtype)
    written = np.zeros(grid.shape, dtype=bool)
    overlaps = 0
    frames = np.asarray(seg.pixel_array)
    if frames.ndim == 2:
        frames = frames[None]
    kind = seg.segmentation_type.value
    threshold = float(seg.get("MaximumFractionalValue", 255)) / 2 if kind == "FRACTIONAL" else 0
    for index, frame in enumerate(frames):
        i, j, k = _frame_to_grid(seg, index, frame.shape, grid, seg_path)
        if kind == "LABELMAP":
            segments = [(n, frame == n) for n in np.unique(frame) if n != 0]
        else:
            segments = [(_frame_segment(seg, index), frame > threshold)]
        for number, inside in sorted(segments, key=lambda item: mapping.get(int(item[0]), -1)):
            value = mapping.get(int(number))
            if value is None or not inside.any():
                continue
            rows, cols = np.nonzero(inside)
            ti, tj, tk = i[rows, cols], j[rows, cols], k[rows, cols]
            outside = (ti < 0) | (ti >= grid.shape[0]) | (tj < 0) | (tj >= grid.shape[1])
            if outside.any():
                raise InputError(f"{seg_path}: segment {number} has {int(outside.sum())} pixels outside the image "
                                 f"grid {grid.shape}. Check that the SEG belongs to this image series.")
            overlaps += int((written[ti, tj, tk] & (label[ti, tj, tk] != value)).sum())
            label[ti, tj, tk] = value
            written[ti, tj, tk] = True
    if overlaps:
        log.warning("%s: %d voxels belong to more than one segment; the higher label value was kept",
                    seg_path.name, overlaps)
    names = {value: _segment_label(seg, number) for number, value in mapping.items()}
    return label, names


def _read(seg_path: Path):
    import highdicom as hd

    if not seg_path.is_file():
        raise InputError(f"{seg_path} does not exist. Check the label path.")
    try:
        return hd.seg.segread(seg_path)
    except Exception as exc:  # highdicom raises ValueError/AttributeError/... for non-SEG files
        raise InputError(f"{seg_path} must be a DICOM Segmentation (SEG), could not read it as one "
                         f"({type(exc).__name__}: {exc}). Point the label input at the SEG file.") from exc


def _segment_label(seg, number: int) -> str:
    return str(seg.get_segment_description(number).segment_label)


def _describe_segments(seg, numbers: list[int]) -> str:
    return ", ".join(f"{n}={_segment_label(seg, n)}" for n in numbers)


def _frame_segment(seg, index: int) -> int:
    group = seg.PerFrameFunctionalGroupsSequence[index]
    return int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)


def _functional(seg, index: int, sequence: str):
    """An item of a functional group sequence, per-frame first, then shared."""
    per_frame = seg.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and sequence in per_frame[index]:
        return per_frame[index][sequence].value[0]
    shared = seg.get("SharedFunctionalGroupsSequence")
    if shared is not None and sequence in shared[0]:
        return shared[0][sequence].value[0]
    return None


def _frame_to_grid(seg, index: int, shape: tuple[int, int], grid: Grid, seg_path: Path
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grid indices (i, j, k arrays of the frame's shape) of every pixel of frame ``index``."""
    position = _functional(seg, index, "PlanePositionSequence")
    orientation = _functional(seg, index, "PlaneOrientationSequence")
    measures = _functional(seg, index, "PixelMeasuresSequence")
    if position is None or orientation is None or measures is None:
        raise InputError(f"{seg_path} frame {index + 1} must have a plane position, orientation and pixel spacing, "
                         f"got none. Only SEGs of 3D images (not slide microscopy) are supported.")
    origin = np.array([float(v) for v in position.ImagePositionPatient])
    cosines = np.array([float(v) for v in orientation.ImageOrientationPatient])
    spacing = np.array([float(v) for v in measures.PixelSpacing])  # (between rows, between columns)
    rows, cols = shape
    corners_rc = np.array([[0, 0], [0, cols - 1], [rows - 1, 0], [rows - 1, cols - 1]], dtype=np.float64)
    world_lps = (origin[None, :] + corners_rc[:, 1:2] * spacing[1] * cosines[None, :3]
                 + corners_rc[:, 0:1] * spacing[0] * cosines[None, 3:])
    corners = world_to_index(grid, world_lps * np.array([-1.0, -1.0, 1.0]))  # LPS → RAS
    rounded = np.rint(corners)
    if np.abs(corners - rounded).max() > INDEX_TOLERANCE or np.ptp(rounded[:, 2]) != 0:
        raise InputError(f"{seg_path} frame {index + 1} must lie on the image grid's voxel centres, got corner "
                         f"indices {np.round(corners, 3).tolist()}. The SEG was made on a different image; "
                         f"resample it or pass the matching series.")
    k = int(rounded[0, 2])
    if not 0 <= k < grid.shape[2]:
        raise InputError(f"{seg_path} frame {index + 1} lies on slice {k}, outside the image's {grid.shape[2]} "
                         f"slices. Check that the SEG belongs to this image series.")
    start = rounded[0, :2]
    per_col = (rounded[1, :2] - start) / max(cols - 1, 1)
    per_row = (rounded[2, :2] - start) / max(rows - 1, 1)
    unit_steps = {(1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0)}
    if (cols > 1 and tuple(per_col) not in unit_steps) or (rows > 1 and tuple(per_row) not in unit_steps):
        raise InputError(f"{seg_path} frame {index + 1} must have the image's pixel spacing and in-plane axes, got "
                         f"one column step = {per_col.tolist()} and one row step = {per_row.tolist()} image voxels. "
                         f"Resample the segmentation onto the image grid first.")
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    i = np.rint(start[0] + c * per_col[0] + r * per_row[0]).astype(np.int64)
    j = np.rint(start[1] + c * per_col[1] + r * per_row[1]).astype(np.int64)
    return i, j, np.full_like(i, k)


def read_seg_grid(seg_path: Path) -> Grid:
    """The SEG's own regular grid: what :func:`read_dicom_seg` uses when no image grid is given."""
    seg_path = Path(seg_path)
    return _seg_grid(_read(seg_path), seg_path)


def _seg_grid(seg, seg_path: Path) -> Grid:
    """The SEG's own regular 3D grid in our [i, j, k] / RAS convention."""
    geometry = seg.get_volume_geometry()
    if geometry is None:
        raise InputError(f"{seg_path} frames do not form a regular 3D volume. Pass the image grid "
                         f"(image_grid=...) so each frame can be placed by its position.")
    affine_lps = np.asarray(geometry.affine, dtype=np.float64)  # index (slice, row, column) → LPS
    ours = np.eye(4)
    ours[:3, 0], ours[:3, 1], ours[:3, 2] = affine_lps[:3, 2], affine_lps[:3, 1], affine_lps[:3, 0]
    ours[:3, 3] = affine_lps[:3, 3]
    slices, rows, cols = geometry.spatial_shape
    return Grid((cols, rows, slices), lps_to_ras(ours))
