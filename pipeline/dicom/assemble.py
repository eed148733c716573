"""Assembling one scanned series into a HU volume with exact geometry (array [i, j, k], RAS affine).

Slices are sorted by their position along the slice normal ``n = row cosine × column cosine`` (never
by InstanceNumber), ascending, so k runs along +n. For a regular series the affine is exactly the one
implied by the DICOM attributes, in LPS::

    column i = IOP row cosine    × PixelSpacing[1]   (distance between columns)
    column j = IOP column cosine × PixelSpacing[0]   (distance between rows)
    column k = (IPP_last − IPP_first) / (n − 1)
    origin   = IPP_first

then converted with :func:`pipeline.geometry.lps_to_ras`. Feet-first and oblique series keep their
directions. A slice step that leans away from the normal by less than ``tilt_tolerance_deg`` stays
in column k as it is (a tiny shear), so no slice is misplaced.

Corrections, each recorded in ``provenance["corrections"]`` and in ``warnings``:

- Gantry tilt (the angle between the normal and the direction in which slice positions advance,
  measured from ImagePositionPatient/ImageOrientationPatient, never from GantryDetectorTilt): with
  ``tilt="correct"`` each slice is shifted within its plane by its own offset (linear interpolation)
  onto an orthogonal grid with axes row, column, normal that covers every acquired pixel; rows or
  columns outside a slice's acquired area get the series minimum (air or the outside-FOV value), as
  dcm2niix's ``_Tilt_1`` output does. The same in-plane correction handles slices whose positions
  wander off a straight line. ``tilt="refuse"`` raises instead.
- Uneven spacing or missing slices: positions further than ``max(spacing_tolerance × spacing,
  spacing_tolerance_mm)`` from a regular grid are resampled linearly along the slice axis to the
  median spacing; a gap above ``max_gap_slices`` spacings (or ``max_gap_mm``) is refused.
- Duplicates: images at one position with identical pixels are dropped with a warning; different
  pixels at one position are refused (scan already split what an attribute could separate).
- PixelPaddingValue pixels become ``padding_hu`` (air).

dcm2niix convention (checked in tests/test_dicom_assemble.py against dcm_qa_ct/ref): dcm2niix stores
the rows in reverse order. With R rows, its voxel ``[i, j, k]`` is our ``[i, R−1−j, k]``, and its
affine is ours times ``F = [[1,0,0,0], [0,−1,0,R−1], [0,0,1,0], [0,0,0,1]]``: column j negated and
the origin moved to the last row (``origin + (R−1)·column_j``). Columns and slice order agree.
:func:`to_dcm2niix_convention` applies exactly this.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.dicom.header import SliceRef
from pipeline.dicom.pixels import decode_into, output_dtype
from pipeline.dicom.scan import DUPLICATE_POSITION_MM, SeriesInfo, slice_normal, tilt_angle_deg
from pipeline.errors import InputError
from pipeline.geometry import Volume, lps_to_ras
from pipeline.ingest.options import AssemblyOptions  # the ingest section's settings; re-exported here

SUBPIXEL = 1e-3  # in-plane offsets below this many pixels are treated as zero


@dataclass
class AssembledVolume:
    """A series as one volume, what was done to it, and what the user should know."""

    volume: Volume
    provenance: dict
    warnings: list[str]


def assemble_series(series: SeriesInfo, options: AssemblyOptions | None = None) -> AssembledVolume:
    """Read ``series``'s pixels into one HU volume on its exact grid (see module docstring)."""
    options = options or AssemblyOptions()
    _check_assemblable(series, options)
    warnings: list[str] = []
    corrections: list[dict] = []
    _check_rescale(series, options, warnings)
    slices = _sorted_slices(series)
    damaged = list(series.damaged_files) + _pixel_module_outliers(slices) + _position_outliers(slices, series,
                                                                                                options)
    slices = _handle_damaged(slices, damaged, series, options, warnings, corrections)
    dtype = output_dtype(slices, options.dtype)
    _check_size(slices, series, options, dtype)
    stack = np.empty((len(slices), series.rows, series.columns), dtype=dtype)
    failures: list[tuple[Path, str]] = []
    stats = decode_into(slices, stack, options.padding_hu, options.workers, series.name, failures=failures)
    if failures:
        bad = {path for path, _ in failures}
        keep = [i for i, s in enumerate(slices) if s.path not in bad]
        _handle_damaged(slices, [_Damaged(path, reason) for path, reason in failures], series, options, warnings,
                        corrections)
        stack, slices = stack[keep], [slices[i] for i in keep]
    if series.split_reason:
        warnings.append(f"{series.name} is part {series.part} of a split series: {series.split_reason}")
    stack, slices = _drop_duplicates(stack, slices, series, warnings, corrections)
    if stats.padding_voxels:
        corrections.append({"type": "padding_to_air", "pixel_padding_value": slices[0].pixel.padding_value,
                            "voxels": stats.padding_voxels, "hu": options.padding_hu})
    if stats.clipped_voxels:
        warnings.append(f"{series.name}: {stats.clipped_voxels} voxels outside the int16 range were clipped")
    stack, affine_lps, geometry = _regular_grid(stack, slices, series, options, warnings, corrections)
    volume = Volume(stack.transpose(2, 1, 0), lps_to_ras(affine_lps))
    provenance = {
        "series_key": series.short_key,
        "series_description": series.series_description,
        "study_instance_uid": series.study_uid,
        "series_instance_uid": series.series_uid,
        "frame_of_reference_uid": series.frame_of_reference_uid,
        "part": series.part,
        "split_reason": series.split_reason,
        "modality": series.modality,
        "sop_class_uid": series.sop_class_uid,
        "transfer_syntaxes": sorted(stats.transfer_syntaxes),
        "source_images": series.slice_count,
        "output_slices": int(stack.shape[0]),
        "shape": list(volume.array.shape),
        "dtype": str(stack.dtype),
        "sorted_by": "position along the slice normal (ImagePositionPatient · row×column cosine)",
        "rescale_slopes": sorted({s.rescale_slope for s in slices}),
        "rescale_intercepts": sorted({s.rescale_intercept for s in slices}),
        "geometry": geometry,
        "corrections": corrections,
    }
    return AssembledVolume(volume, provenance, warnings)


# ---------------------------------------------------------------------------------------------
# Checks and sorting
# ---------------------------------------------------------------------------------------------

def _check_assemblable(series: SeriesInfo, options: AssemblyOptions) -> None:
    if not series.is_image:
        raise InputError(f"{series.name} must hold images to be assembled, got a {series.modality or 'non-image'} "
                         f"object without pixel data. Select an image series.")
    if series.split_reason and options.on_inconsistent == "refuse":
        raise InputError(f"{series.name} must be one consistent series, got part {series.part} of a split: "
                         f"{series.split_reason}. Set on_inconsistent to 'split' to ingest the parts separately, "
                         f"or fix the export.")
    missing = [s for s in series.slices if s.position is None or s.orientation is None or s.pixel_spacing is None]
    if missing:
        raise InputError(f"{series.name} must give ImagePositionPatient, ImageOrientationPatient and PixelSpacing "
                         f"for every image, got {len(missing)} of {series.slice_count} without them (e.g. "
                         f"{missing[0].path.name}). Without them slice order and spacing are unknown; re-export "
                         f"the series from the scanner or PACS.")
    if any(min(s.pixel_spacing) <= 0 for s in series.slices):
        raise InputError(f"{series.name} must have positive PixelSpacing, got {series.slices[0].pixel_spacing}. "
                         f"Re-export the series.")
    normal = slice_normal(series.orientation)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3) or \
            abs(float(np.dot(series.orientation[:3], series.orientation[3:6]))) > 1e-3:
        raise InputError(f"{series.name} must have perpendicular unit row and column cosines "
                         f"(ImageOrientationPatient), got {series.orientation}. Re-export the series.")


@dataclass(frozen=True)
class _Damaged:
    """A damaged slice (or file) of a series and what is wrong with it."""

    path: Path
    reason: str


SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"


def _check_rescale(series: SeriesInfo, options: AssemblyOptions, warnings: list[str]) -> None:
    """CT needs a valid RescaleSlope/RescaleIntercept in every image, the same in all of them."""
    if series.modality != "CT" or series.sop_class_uid.startswith(SECONDARY_CAPTURE_PREFIX):
        return
    for slice_ref in series.slices:
        if slice_ref.has_modality_lut:
            raise InputError(f"{series.name} must map stored values to HU with RescaleSlope/RescaleIntercept, got a "
                             f"Modality LUT Sequence in {_frame_name(slice_ref)}, which ingest does not apply. "
                             f"Re-export the series with a linear rescale.")
        if slice_ref.rescale_problem:
            raise InputError(f"{series.name} must give a valid RescaleSlope and RescaleIntercept in every CT image "
                             f"(HU = stored × slope + intercept), got {slice_ref.rescale_problem} in "
                             f"{_frame_name(slice_ref)}. HU cannot be computed for it: re-copy or re-export the "
                             f"series.")
    pairs: dict[tuple[float, float], list[SliceRef]] = {}
    for slice_ref in series.slices:
        pairs.setdefault((slice_ref.rescale_slope, slice_ref.rescale_intercept), []).append(slice_ref)
    if len(pairs) < 2:
        return
    common = max(pairs, key=lambda pair: len(pairs[pair]))
    odd = [s for pair, members in pairs.items() if pair != common for s in members]
    listed = ", ".join(f"{_frame_name(s)} (slope {s.rescale_slope:g}, intercept {s.rescale_intercept:g})"
                       for s in odd[:3]) + (", …" if len(odd) > 3 else "")
    if options.varying_rescale == "refuse":
        raise InputError(f"{series.name} must use one RescaleSlope/RescaleIntercept for all its CT images, got "
                         f"{len(pairs)} different pairs: most images slope {common[0]:g}, intercept {common[1]:g}, "
                         f"but {listed}. In CT this is a sign of a damaged header: re-copy or re-export the "
                         f"series, or set varying_rescale to 'allow' if the scanner really wrote them.")
    warnings.append(f"{series.name}: {len(odd)} image(s) use their own RescaleSlope/RescaleIntercept ({listed}); "
                    f"each was applied to its own image (varying_rescale: allow)")


def _frame_name(slice_ref: SliceRef) -> str:
    return slice_ref.path.name if slice_ref.frame is None else f"{slice_ref.path.name} frame {slice_ref.frame + 1}"


PIXEL_MODULE = ("rows", "columns", "bits_allocated", "bits_stored", "pixel_representation", "samples_per_pixel",
                "photometric", "padding_value", "padding_range_limit")
_PIXEL_KEYWORDS = {"rows": "Rows", "columns": "Columns", "bits_allocated": "BitsAllocated",
                   "bits_stored": "BitsStored", "pixel_representation": "PixelRepresentation",
                   "samples_per_pixel": "SamplesPerPixel", "photometric": "PhotometricInterpretation",
                   "padding_value": "PixelPaddingValue", "padding_range_limit": "PixelPaddingRangeLimit"}


def _pixel_module_outliers(slices: list[SliceRef]) -> list[_Damaged]:
    """Slices whose pixel module disagrees with the most common one of the series."""
    def module(slice_ref: SliceRef) -> tuple:
        return tuple(getattr(slice_ref.pixel, name) for name in PIXEL_MODULE)

    counts: dict[tuple, int] = {}
    for slice_ref in slices:
        counts[module(slice_ref)] = counts.get(module(slice_ref), 0) + 1
    if len(counts) < 2:
        return []
    common = max(counts, key=counts.get)
    damaged = []
    for slice_ref in slices:
        values = module(slice_ref)
        if values == common:
            continue
        differences = ", ".join(f"{_PIXEL_KEYWORDS[name]} {value} (series: {expected})"
                                for name, value, expected in zip(PIXEL_MODULE, values, common) if value != expected)
        damaged.append(_Damaged(slice_ref.path, f"pixel module disagrees with the series: {differences}"))
    return damaged


def _position_outliers(slices: list[SliceRef], series: SeriesInfo, options: AssemblyOptions) -> list[_Damaged]:
    """Slices (sorted along the normal) off the line through the others, or far beyond the series' ends."""
    if len(slices) < 3:
        return []
    orientation = np.asarray(series.orientation, dtype=np.float64)
    row, column, normal = orientation[:3], orientation[3:6], slice_normal(orientation)
    positions = np.array([s.position for s in slices], dtype=np.float64)
    w = positions @ normal
    steps = np.diff(w)
    valid = steps >= DUPLICATE_POSITION_MM
    if not valid.any():
        return []
    spacing = float(np.median(steps[valid]))
    tolerance = max(options.off_line_tolerance * spacing, options.spacing_tolerance_mm)
    damaged = []
    residual = _line_residuals(positions, row, column, w, steps, valid)
    for index in np.flatnonzero(residual > tolerance):
        damaged.append(_Damaged(slices[index].path, f"ImagePositionPatient {_position_text(slices[index])} lies "
                                                    f"{residual[index]:.1f} mm off the line of the other slices "
                                                    f"(tolerance {tolerance:.2f} mm)"))
    # an end slice separated from the rest by more than the gap rules allow is misplaced, not a gap
    limit = options.max_gap_slices * spacing + max(options.spacing_tolerance * spacing, options.spacing_tolerance_mm)
    if options.max_gap_mm > 0:
        limit = min(limit, options.max_gap_mm + options.spacing_tolerance_mm)
    for index, gap in ((0, steps[0]), (len(slices) - 1, steps[-1])):
        if gap > limit and gap > 10 * spacing:
            damaged.append(_Damaged(slices[index].path, f"ImagePositionPatient {_position_text(slices[index])} lies "
                                                        f"{gap:.1f} mm beyond the other slices ({spacing:.2f} mm "
                                                        f"apart)"))
    unique: dict[Path, _Damaged] = {}
    for item in damaged:
        unique.setdefault(item.path, item)
    return list(unique.values())


def _line_residuals(positions: np.ndarray, row: np.ndarray, column: np.ndarray, w: np.ndarray, steps: np.ndarray,
                    valid: np.ndarray) -> np.ndarray:
    """In-plane distance (mm) of each position from the robust line through all of them (tilt allowed)."""
    squared = np.zeros(len(positions))
    for axis in (row, column):
        u = positions @ axis
        slope = float(np.median(np.diff(u)[valid] / steps[valid]))  # tilt: in-plane drift per mm along normal
        intercept = float(np.median(u - slope * w))
        squared += (u - (intercept + slope * w)) ** 2
    return np.sqrt(squared)


def _off_line_files(slices: list[SliceRef], orientation: np.ndarray, tolerance_mm: float) -> list[str]:
    """Names of the slices whose positions lie off the robust line of the others by more than tolerance_mm."""
    if len(slices) < 3:
        return []
    row, column = orientation[:3], orientation[3:6]
    positions = np.array([s.position for s in slices], dtype=np.float64)
    w = positions @ slice_normal(orientation)
    steps = np.diff(w)
    valid = steps >= DUPLICATE_POSITION_MM
    if not valid.any():
        return []
    residual = _line_residuals(positions, row, column, w, steps, valid)
    return [_frame_name(slices[i]) for i in np.flatnonzero(residual > tolerance_mm)]


def _position_text(slice_ref: SliceRef) -> str:
    return "(" + ", ".join(f"{v:g}" for v in slice_ref.position) + ")"


def _handle_damaged(slices: list[SliceRef], damaged: list, series: SeriesInfo, options: AssemblyOptions,
                    warnings: list[str], corrections: list[dict]) -> list[SliceRef]:
    """Refuse the series naming the damaged files, or leave them out and name them (on_damaged)."""
    if not damaged:
        return slices
    unique: dict[Path, str] = {}
    for item in damaged:
        unique.setdefault(Path(item.path), item.reason)
    listed = "; ".join(f"{path.name}: {reason}" for path, reason in list(unique.items())[:3])
    more = f" (and {len(unique) - 3} more)" if len(unique) > 3 else ""
    if options.on_damaged == "refuse":
        raise InputError(f"{series.name} must have every slice intact, got {len(unique)} damaged file(s) in its "
                         f"folder: {listed}{more}. A damaged file may be a lost slice: re-copy or re-export the "
                         f"series, or set ingest.assembly.on_damaged to 'exclude' to leave such files out "
                         f"(named in the warnings; the gap rules then apply).")
    kept = [s for s in slices if s.path not in unique]
    if not kept:
        raise InputError(f"{series.name} must keep at least one intact slice, got only damaged ones: {listed}{more}. "
                         f"Re-copy or re-export the series.")
    for path, reason in unique.items():
        warnings.append(f"{series.name}: left out damaged file {path.name} ({reason}); it is treated as a missing "
                        f"slice")
    corrections.append({"type": "damaged_files_excluded", "files": [p.name for p in unique],
                        "reasons": list(unique.values()), "slices_left_out": len(slices) - len(kept)})
    return kept


def _check_size(slices: list[SliceRef], series: SeriesInfo, options: AssemblyOptions, dtype: np.dtype) -> None:
    """Refuse a grid that is physically implausible or would not fit the memory budget, before allocating."""
    reference = slices[0]
    rows, columns = reference.pixel.rows, reference.pixel.columns
    row_spacing, column_spacing = series.pixel_spacing
    orientation = np.asarray(series.orientation, dtype=np.float64)
    positions = np.array([s.position for s in slices], dtype=np.float64)
    offsets = positions - positions[0]
    span = lambda axis: float(np.ptp(offsets @ axis)) if len(slices) > 1 else 0.0  # noqa: E731
    extents = {"along rows (i)": columns * column_spacing + span(orientation[:3]),
               "along columns (j)": rows * row_spacing + span(orientation[3:6]),
               "along the slice normal (k)": span(slice_normal(orientation))}
    # the stack, plus one resampled copy (tilt or spacing correction) and the stored copy written to disk
    in_plane_growth = (1 + span(orientation[:3]) / max(columns * column_spacing, 1e-6)) * (
        1 + span(orientation[3:6]) / max(rows * row_spacing, 1e-6))
    needed = len(slices) * rows * columns * np.dtype(dtype).itemsize * (2 + in_plane_growth)
    budget = memory_budget_bytes(options)
    if needed > budget:
        raise InputError(f"{series.name} must fit the memory budget of {budget / 2**20:.0f} MB, got an estimated "
                         f"{needed / 2**20:.0f} MB ({len(slices)} slices of {columns}x{rows} pixels, from the "
                         f"headers). Raise ingest.assembly.memory_budget_mb on a machine with more memory, or check "
                         f"Rows/Columns in the files.")
    for axis, extent in extents.items():
        if extent > options.max_extent_mm:
            raise InputError(f"{series.name} must fit a grid of at most {options.max_extent_mm:g} mm per axis, got "
                             f"{extent:.0f} mm {axis} (Rows {rows}, Columns {columns}, PixelSpacing "
                             f"{series.pixel_spacing}, slice positions from {_position_text(slices[0])} to "
                             f"{_position_text(slices[-1])}). A position or spacing is corrupted: re-export the "
                             f"series, or raise ingest.assembly.max_extent_mm.")


def memory_budget_bytes(options: AssemblyOptions) -> float:
    """The memory budget of one case in bytes (half of physical memory when not configured)."""
    if options.memory_budget_mb > 0:
        return float(options.memory_budget_mb) * 2**20
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2
    except (ValueError, OSError, AttributeError):
        return 8.0 * 2**30


def _sorted_slices(series: SeriesInfo) -> list[SliceRef]:
    normal = slice_normal(series.orientation)

    def key(slice_ref: SliceRef):
        along = float(np.dot(slice_ref.position, normal))
        number = slice_ref.instance_number if slice_ref.instance_number is not None else 1 << 30
        return (along, number, str(slice_ref.path), slice_ref.frame or 0)

    return sorted(series.slices, key=key)


def _drop_duplicates(stack: np.ndarray, slices: list[SliceRef], series: SeriesInfo, warnings: list[str],
                     corrections: list[dict]) -> tuple[np.ndarray, list[SliceRef]]:
    normal = slice_normal(series.orientation)
    along = np.array([np.dot(s.position, normal) for s in slices])
    keep = [0]
    dropped = []
    for index in range(1, len(slices)):
        first = keep[-1]
        if along[index] - along[first] >= DUPLICATE_POSITION_MM:
            keep.append(index)
            continue
        if not np.array_equal(stack[index], stack[first]):
            raise InputError(
                f"{series.name} must have one image per slice position, got different images at "
                f"{along[index]:.3f} mm along the normal ({slices[first].path.name} and {slices[index].path.name}) "
                f"and no attribute (acquisition number, temporal position, image type) that separates them. Export "
                f"the acquisitions as separate series.")
        dropped.append(slices[index].path.name)
    if not dropped:
        return stack, slices
    warnings.append(f"{series.name}: dropped {len(dropped)} duplicate image(s) with identical pixel data at the "
                    f"same position ({', '.join(dropped[:5])}{', …' if len(dropped) > 5 else ''})")
    corrections.append({"type": "duplicates_dropped", "count": len(dropped), "files": dropped})
    return stack[keep], [slices[i] for i in keep]


# ---------------------------------------------------------------------------------------------
# Geometry: regular grid, tilt and uneven spacing
# ---------------------------------------------------------------------------------------------

def _regular_grid(stack: np.ndarray, slices: list[SliceRef], series: SeriesInfo, options: AssemblyOptions,
                  warnings: list[str], corrections: list[dict]):
    """Return (stack on a regular grid, LPS affine, geometry facts for provenance)."""
    orientation = np.asarray(series.orientation, dtype=np.float64)
    row, column = orientation[:3], orientation[3:6]
    normal = slice_normal(orientation)
    row_spacing, column_spacing = series.pixel_spacing  # between rows (j), between columns (i)
    positions = np.array([s.position for s in slices], dtype=np.float64)
    affine = np.eye(4)
    affine[:3, 0] = row * column_spacing
    affine[:3, 1] = column * row_spacing
    affine[:3, 3] = positions[0]
    n = len(slices)
    if n == 1:
        thickness = series.slice_spacing or series.slice_thickness or 1.0
        affine[:3, 2] = normal * thickness
        warnings.append(f"{series.name} has a single slice; its k spacing ({thickness:g} mm) comes from "
                        f"SpacingBetweenSlices/SliceThickness")
        return stack, affine, {"tilt_deg": 0.0, "slice_spacing_mm": float(thickness), "regular": True}

    offsets = positions - positions[0]
    step = offsets[-1] / (n - 1)
    tilt = tilt_angle_deg(orientation, offsets[-1])
    direction = offsets[-1] / np.linalg.norm(offsets[-1])
    off_line = offsets - np.outer(offsets @ direction, direction)
    wander_mm = float(np.abs(off_line).max())
    tolerance = lambda spacing: max(options.spacing_tolerance * spacing, options.spacing_tolerance_mm)  # noqa: E731
    geometry = {"tilt_deg": round(tilt, 4), "off_line_mm": round(wander_mm, 4)}

    if tilt <= options.tilt_tolerance_deg and wander_mm <= tolerance(np.linalg.norm(step)):
        along = offsets @ direction
        stack, spacing, regular = _even_along(stack, along, series, options, warnings, corrections, tolerance, slices)
        affine[:3, 2] = step if regular else direction * spacing
        geometry.update(slice_spacing_mm=float(np.linalg.norm(affine[:3, 2])), regular=regular,
                        max_position_residual_mm=_residual(along))
        return stack, affine, geometry

    off_files = _off_line_files(slices, orientation, tolerance(np.linalg.norm(step)))
    named = f" ({', '.join(off_files[:5])}{', …' if len(off_files) > 5 else ''})" if off_files else ""
    reason = (f"gantry tilt {tilt:.2f}°{named}" if tilt > options.tilt_tolerance_deg
              else f"slice positions {wander_mm:.3f} mm off a straight line{named}")
    if options.tilt == "refuse":
        raise InputError(f"{series.name} must have slices stacked along their normal, got {reason} (measured from "
                         f"ImagePositionPatient and ImageOrientationPatient). Set tilt to 'correct' to resample it "
                         f"onto an orthogonal grid, or reconstruct the series without tilt.")
    shift_i = offsets @ row / column_spacing     # in-plane offset of each slice, in columns
    shift_j = offsets @ column / row_spacing     # ... in rows
    stack, start_i, start_j, fill = _shift_in_plane(stack, shift_i, shift_j)
    affine[:3, 3] = positions[0] + start_i * column_spacing * row + start_j * row_spacing * column
    corrections.append({"type": "gantry_tilt" if tilt > options.tilt_tolerance_deg else "in_plane_shift",
                        "angle_deg": round(tilt, 4), "max_shift_rows": round(float(np.abs(shift_j).max()), 3),
                        "max_shift_columns": round(float(np.abs(shift_i).max()), 3),
                        "rows_added": int(stack.shape[1] - series.rows),
                        "columns_added": int(stack.shape[2] - series.columns),
                        "fill_hu": fill, "interpolation": "linear within each slice", "off_line_files": off_files})
    warnings.append(f"{series.name}: corrected {reason} by shifting each slice within its plane onto an "
                    f"orthogonal grid ({stack.shape[2]}x{stack.shape[1]} pixels)")
    along = offsets @ normal
    stack, spacing, regular = _even_along(stack, along, series, options, warnings, corrections, tolerance, slices)
    affine[:3, 2] = normal * spacing
    geometry.update(slice_spacing_mm=float(spacing), regular=regular, max_position_residual_mm=_residual(along))
    return stack, affine, geometry


def _residual(along: np.ndarray) -> float:
    regular = np.linspace(along[0], along[-1], len(along))
    return round(float(np.abs(along - regular).max()), 5)


def _even_along(stack: np.ndarray, along: np.ndarray, series: SeriesInfo, options: AssemblyOptions,
                warnings: list[str], corrections: list[dict], tolerance, slices: list[SliceRef]):
    """Make slices equidistant along the stacking axis; return (stack, spacing, was it regular)."""
    n = len(along)
    spacing = (along[-1] - along[0]) / (n - 1)
    if float(np.abs(along - np.linspace(along[0], along[-1], n)).max()) <= tolerance(spacing):
        return stack, float(spacing), True
    gaps = np.diff(along)
    nominal = float(np.median(gaps))
    largest = float(gaps.max())
    where = int(np.argmax(gaps))
    between = f"{_frame_name(slices[where])} and {_frame_name(slices[where + 1])}"
    if largest > options.max_gap_slices * nominal + tolerance(nominal) or \
            (options.max_gap_mm > 0 and largest > options.max_gap_mm + tolerance(nominal)):
        raise InputError(
            f"{series.name} must have evenly spaced slices or gaps of at most {options.max_gap_slices:g} slice "
            f"spacings ({options.max_gap_mm:g} mm), got a {largest:.2f} mm gap between slices {where} and "
            f"{where + 1} ({between}) where slices are {nominal:.2f} mm apart. Slices are missing: re-export the "
            f"complete series, or raise max_gap_slices/max_gap_mm to interpolate across the gap.")
    count = int(round((along[-1] - along[0]) / nominal)) + 1
    targets = np.linspace(along[0], along[-1], count)
    # the files whose positions are off the regular grid of the median spacing (named in the warning)
    index = np.round((along - along[0]) / nominal)
    anchor = float(np.median(along - nominal * index))  # the grid most slices sit on, whichever slice moved
    grid = anchor + nominal * index
    off = [_frame_name(slices[i]) for i in np.flatnonzero(np.abs(along - grid) > tolerance(nominal))]
    missing = int(round(float(np.sum(np.maximum(np.round(gaps / nominal) - 1, 0)))))
    stack = _interpolate_slices(stack, along, targets)
    new_spacing = float((along[-1] - along[0]) / (count - 1))
    corrections.append({"type": "uneven_spacing_resampled", "source_slices": n, "output_slices": count,
                        "median_spacing_mm": round(nominal, 5), "largest_gap_mm": round(largest, 5),
                        "largest_gap_between": [_frame_name(slices[where]), _frame_name(slices[where + 1])],
                        "missing_slices_interpolated": missing, "off_grid_files": off,
                        "output_spacing_mm": round(new_spacing, 6), "interpolation": "linear along k"})
    detail = []
    if missing:
        detail.append(f"{missing} missing slice(s) interpolated, largest gap between {between}")
    if off:
        detail.append(f"positions off the {nominal:.2f} mm grid: {', '.join(off[:5])}{', …' if len(off) > 5 else ''}")
    warnings.append(f"{series.name}: uneven slice spacing (largest gap {largest:.2f} mm, median {nominal:.2f} mm"
                    f"{'; ' + '; '.join(detail) if detail else ''}) resampled linearly to {count} slices "
                    f"{new_spacing:.3f} mm apart")
    return stack, new_spacing, False


def _interpolate_slices(stack: np.ndarray, along: np.ndarray, targets: np.ndarray) -> np.ndarray:
    result = np.empty((len(targets),) + stack.shape[1:], dtype=stack.dtype)
    upper = np.clip(np.searchsorted(along, targets, side="right"), 1, len(along) - 1)
    for index, (target, high) in enumerate(zip(targets, upper)):
        low = high - 1
        weight = (target - along[low]) / (along[high] - along[low])
        if weight <= 1e-6:
            result[index] = stack[low]
        elif weight >= 1 - 1e-6:
            result[index] = stack[high]
        else:
            blended = stack[low].astype(np.float32) * np.float32(1 - weight) + \
                stack[high].astype(np.float32) * np.float32(weight)
            result[index] = np.rint(blended) if np.issubdtype(stack.dtype, np.integer) else blended
    return result


def _shift_in_plane(stack: np.ndarray, shift_i: np.ndarray, shift_j: np.ndarray):
    """Shift slice k by (shift_i[k], shift_j[k]) pixels onto one grid covering every slice.

    Returns (new stack, first column index, first row index, fill value) where the first indices
    are in slice 0's pixel coordinates.
    """
    n, rows, columns = stack.shape
    start_j, rows_out = _extent(shift_j, rows)
    start_i, columns_out = _extent(shift_i, columns)
    fill = stack.min().item()
    result = np.full((n, rows_out, columns_out), fill, dtype=stack.dtype)
    integer = np.issubdtype(stack.dtype, np.integer)
    for k in range(n):
        plane = _shift_axis(stack[k], shift_j[k] - start_j, rows_out, axis=0, fill=fill)
        plane = _shift_axis(plane, shift_i[k] - start_i, columns_out, axis=1, fill=fill)
        result[k] = np.rint(plane) if integer and plane.dtype != stack.dtype else plane
    return result, start_i, start_j, fill


def _extent(shifts: np.ndarray, size: int) -> tuple[int, int]:
    low = math.floor(float(shifts.min()) + SUBPIXEL)
    high = math.ceil(float(shifts.max()) - SUBPIXEL)
    low, high = min(low, 0), max(high, 0)
    return low, size + high - low


def _shift_axis(plane: np.ndarray, shift: float, size_out: int, axis: int, fill) -> np.ndarray:
    """Output index t takes input coordinate t − shift along ``axis`` (linear; outside → fill)."""
    size_in = plane.shape[axis]
    if abs(shift - round(shift)) < SUBPIXEL:  # whole-pixel shift: copy, no interpolation
        offset = int(round(shift))
        out_shape = list(plane.shape)
        out_shape[axis] = size_out
        result = np.full(out_shape, fill, dtype=plane.dtype)
        source = slice(max(0, -offset), min(size_in, size_out - offset))
        target = slice(source.start + offset, source.stop + offset)
        if source.stop > source.start:
            index_in = [slice(None)] * 2
            index_out = [slice(None)] * 2
            index_in[axis], index_out[axis] = source, target
            result[tuple(index_out)] = plane[tuple(index_in)]
        return result
    coordinate = np.arange(size_out) - shift
    # an acquired pixel covers ±half a pixel: the edge rows extend that far, beyond lies the fill
    valid = (coordinate >= -0.5) & (coordinate <= size_in - 0.5)
    low = np.clip(np.floor(coordinate[valid]).astype(np.int64), 0, size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    weight = np.clip(coordinate[valid] - low, 0.0, 1.0).astype(np.float32)
    shape = [1, 1]
    shape[axis] = len(weight)
    weight = weight.reshape(shape)
    out_shape = list(plane.shape)
    out_shape[axis] = size_out
    result = np.full(out_shape, fill, dtype=np.float32)
    values = np.take(plane, low, axis=axis).astype(np.float32) * (1 - weight) + \
        np.take(plane, high, axis=axis).astype(np.float32) * weight
    index = [slice(None)] * 2
    index[axis] = np.flatnonzero(valid)
    result[tuple(index)] = values
    return result


# ---------------------------------------------------------------------------------------------
# Interoperability
# ---------------------------------------------------------------------------------------------

def to_dcm2niix_convention(volume: Volume) -> Volume:
    """Reorder our volume as dcm2niix writes it: rows reversed (see module docstring)."""
    rows = volume.array.shape[1]
    flip = np.eye(4)
    flip[1, 1] = -1.0
    flip[1, 3] = rows - 1
    return Volume(volume.array[:, ::-1, :], volume.affine @ flip)
