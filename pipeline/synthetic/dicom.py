"""Writing real DICOM: a CT Image Storage series per volume and an RTSTRUCT per label map.

Used to build test fixtures and the demo export (synthetic phantoms written the way scanners and
treatment-planning systems write them), including the awkward cases readers must survive: feet-first
and oblique geometry, gantry tilt, compressed transfer syntaxes, missing or duplicated slices,
shuffled instance numbers and padding outside the reconstruction circle.

Geometry (see :mod:`pipeline.geometry`): the volume's array is ``[i, j, k]`` with an index→RAS affine.
In DICOM (LPS) the row cosine is affine column i, the column cosine affine column j, the position of
slice k is the world point of voxel ``(0, 0, k)`` and the pixel data of slice k is ``array[:, :, k].T``.
"""
from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from pipeline import atomic
from pipeline.errors import ConfigError, InputError
from pipeline.geometry import Grid, Volume, lps_to_ras
from pipeline.labels.rtstruct_write import ds_text, new_file_dataset
from pipeline.synthetic.jpeg_lossless import encode_jpeg_lossless_sv1

TRANSFER_SYNTAXES = {
    "explicit_little": ExplicitVRLittleEndian,
    "implicit_little": ImplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg2000_lossless": JPEG2000Lossless,
    "jpegls_lossless": JPEGLSLossless,
    "jpeg_lossless": JPEGLosslessSV1,
}

TransferSyntaxName = Literal["explicit_little", "implicit_little", "rle", "jpeg2000_lossless", "jpegls_lossless",
                             "jpeg_lossless"]


@dataclass
class SeriesWriteOptions:
    """How a volume is written as a DICOM CT series (identity, encoding and deliberate export defects)."""

    patient_name: str = field(default="PHANTOM^000", metadata={"help": "PatientName (0010,0010)."})
    patient_id: str = field(default="PHANTOM000", metadata={"help": "PatientID (0010,0020)."})
    study_uid: str | None = field(default=None, metadata={"help": "StudyInstanceUID; generated when empty."})
    series_uid: str | None = field(default=None, metadata={"help": "SeriesInstanceUID; generated when empty."})
    frame_of_reference_uid: str | None = field(
        default=None, metadata={"help": "FrameOfReferenceUID; generated when empty."})
    series_description: str = field(default="PHANTOM CT", metadata={"help": "SeriesDescription (0008,103E)."})
    series_number: int = field(default=1, metadata={"help": "SeriesNumber (0020,0011)."})
    study_description: str = field(default="PHANTOM STUDY", metadata={"help": "StudyDescription (0008,1030)."})
    study_date: str = field(default="20240101", metadata={"help": "StudyDate/SeriesDate, YYYYMMDD."})
    patient_position: str = field(default="HFS", metadata={"help": "PatientPosition, e.g. HFS or FFS."})
    rescale_slope: float = field(default=1.0, metadata={"help": "RescaleSlope: HU = stored * slope + intercept."})
    rescale_intercept: float = field(default=-1024.0, metadata={"help": "RescaleIntercept (HU)."})
    unsigned: bool = field(default=False, metadata={"help": "Store unsigned pixels (PixelRepresentation 0)."})
    bits_stored: int = field(default=16, metadata={"help": "BitsStored: 16 or 12 (BitsAllocated is always 16)."})
    transfer_syntax: TransferSyntaxName = field(
        default="explicit_little", metadata={"help": "Encoding of the files, including lossless compression."})
    gantry_tilt_deg: float = field(
        default=0.0, metadata={"help": "Write a gantry-tilted acquisition: slice positions step along the "
                                       "volume's k axis while the image columns tilt by this angle "
                                       "(GantryDetectorTilt in the Philips sign convention)."})
    image_type: str = field(default="ORIGINAL\\PRIMARY\\AXIAL", metadata={"help": "ImageType, backslash-separated."})
    modality: str = field(default="CT", metadata={"help": "Modality (0008,0060)."})
    sop_class_uid: str = field(default=CTImageStorage, metadata={"help": "SOPClassUID; CT Image Storage."})
    convolution_kernel: str = field(default="STANDARD", metadata={"help": "ConvolutionKernel (0018,1210)."})
    manufacturer: str = field(default="ctseg phantom", metadata={"help": "Manufacturer (0008,0070)."})
    pixel_padding_value: int | None = field(
        default=None, metadata={"help": "Stored value written outside the circular reconstruction field of view "
                                        "(and as PixelPaddingValue), as scanners do; None writes every voxel."})
    drop_slices: list[int] = field(default_factory=list, metadata={"help": "Slice indices k not written."})
    duplicate_slices: list[int] = field(
        default_factory=list, metadata={"help": "Slice indices k written twice (second copy with a new SOP UID)."})
    shuffle_instance_numbers: bool = field(
        default=False, metadata={"help": "Give InstanceNumbers in random order, so sorting by them is wrong."})
    file_naming: Literal["sequential", "no_suffix", "sop_uid", "shuffled"] = field(
        default="sequential", metadata={"help": "IM0001.dcm…, IM0001… without suffix, <SOPInstanceUID>.dcm, or "
                                                "sequential names in random slice order."})
    file_prefix: str = field(default="IM", metadata={"help": "Start of sequential file names (IM0001.dcm); use "
                                                            "different prefixes to put several series in one folder."})
    seed: int = field(default=0, metadata={"help": "Seed for shuffled instance numbers and file names."})


# ---------------------------------------------------------------------------------------------
# CT series
# ---------------------------------------------------------------------------------------------

def tilted_affine(affine_ras: np.ndarray, gantry_tilt_deg: float) -> np.ndarray:
    """The index→RAS affine of a gantry-tilted acquisition written from a volume with ``affine_ras``.

    Slices keep their positions along the k axis; the j (column) axis turns by the tilt towards the
    k axis, so the grid is sheared. Sample an object on this affine to simulate a real tilted scan.
    """
    affine = np.asarray(affine_ras, dtype=np.float64).copy()
    if gantry_tilt_deg == 0:
        return affine
    spacing_j = np.linalg.norm(affine[:3, 1])
    column = affine[:3, 1] / spacing_j
    normal = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
    angle = math.radians(gantry_tilt_deg)
    affine[:3, 1] = (math.cos(angle) * column + math.sin(angle) * normal) * spacing_j
    return affine


def write_ct_series(volume: Volume, folder: Path, options: SeriesWriteOptions | None = None) -> list[Path]:
    """Write ``volume`` (HU, array [i, j, k]) as one CT Image Storage file per slice in ``folder``.

    Returns the written paths in slice order (a duplicated slice appears twice, a dropped one not at all).
    """
    options = options or SeriesWriteOptions()
    folder = Path(folder)
    if options.transfer_syntax not in TRANSFER_SYNTAXES:
        raise ConfigError(f"transfer_syntax must be one of {sorted(TRANSFER_SYNTAXES)}, got "
                          f"'{options.transfer_syntax}'.")
    if options.file_naming not in ("sequential", "no_suffix", "sop_uid", "shuffled"):
        raise ConfigError(f"file_naming must be sequential, no_suffix, sop_uid or shuffled, got "
                          f"'{options.file_naming}'.")
    if not options.file_prefix.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"file_prefix must be letters, digits, '-' or '_', got '{options.file_prefix}'.")
    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise InputError(f"volume for {folder} must be 3D, got shape {array.shape}. Pass one 3D volume per series.")
    geometry = _slice_geometry(volume.affine, options.gantry_tilt_deg, array.shape[2], folder)
    stored = _hu_to_stored(array, options, folder)
    if options.pixel_padding_value is not None:
        stored = _pad_outside_fov(stored, options)
    uids = _SeriesUids(options.study_uid or generate_uid(), options.series_uid or generate_uid(),
                       options.frame_of_reference_uid or generate_uid())
    rng = np.random.default_rng(options.seed)
    plan = _slice_plan(array.shape[2], options)
    instance_numbers = np.arange(1, len(plan) + 1)
    if options.shuffle_instance_numbers:
        instance_numbers = rng.permutation(instance_numbers)
    file_order = rng.permutation(len(plan)) if options.file_naming == "shuffled" else np.arange(len(plan))
    paths = []
    for position, k in enumerate(plan):
        dataset = _ct_slice_dataset(stored[:, :, k].T, k, geometry, uids, int(instance_numbers[position]), options)
        path = folder / _file_name(options, int(file_order[position]) + 1, dataset.SOPInstanceUID)
        _save(dataset, path)
        paths.append(path)
    return paths


@dataclass
class _SeriesUids:
    study: str
    series: str
    frame_of_reference: str


@dataclass
class _SliceGeometry:
    row_cosine: np.ndarray      # LPS unit vector along i
    column_cosine: np.ndarray   # LPS unit vector along j
    positions: np.ndarray       # LPS position of voxel (0, 0, k), shape (n, 3)
    pixel_spacing: tuple[float, float]  # (between rows = j, between columns = i)
    slice_spacing: float
    tilt_deg: float


def _slice_geometry(affine_ras: np.ndarray, tilt_deg: float, n_slices: int, folder: Path) -> _SliceGeometry:
    affine_lps = lps_to_ras(tilted_affine(affine_ras, tilt_deg))
    spacing = np.linalg.norm(affine_lps[:3, :3], axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(affine_lps)):
        raise InputError(f"volume for {folder} must have a finite affine with non-zero spacing, got spacing "
                         f"{spacing.tolist()}. Fix the volume's affine.")
    row, column = affine_lps[:3, 0] / spacing[0], affine_lps[:3, 1] / spacing[1]
    if abs(float(row @ column)) > 1e-4:
        raise InputError(f"volume for {folder} must have perpendicular i and j axes to be written as DICOM, got "
                         f"cos(angle) {row @ column:.4g}. Resample the volume onto an orthogonal grid first.")
    positions = affine_lps[:3, 3][None, :] + np.arange(n_slices)[:, None] * affine_lps[:3, 2][None, :]
    return _SliceGeometry(row, column, positions, (float(spacing[1]), float(spacing[0])), float(spacing[2]),
                          tilt_deg)


def _stored_range(options: SeriesWriteOptions) -> tuple[int, int]:
    if options.bits_stored not in (12, 16):
        raise ConfigError(f"bits_stored must be 12 or 16, got {options.bits_stored}. Use 16 unless testing 12-bit.")
    if options.unsigned:
        return 0, 2 ** options.bits_stored - 1
    return -(2 ** (options.bits_stored - 1)), 2 ** (options.bits_stored - 1) - 1


def _hu_to_stored(array: np.ndarray, options: SeriesWriteOptions, folder: Path) -> np.ndarray:
    if options.rescale_slope == 0:
        raise ConfigError("rescale_slope must be non-zero, got 0. Use 1.0 for integer HU volumes.")
    low, high = _stored_range(options)
    stored = np.rint((array.astype(np.float64) - options.rescale_intercept) / options.rescale_slope)
    if stored.size and (stored.min() < low or stored.max() > high):
        hu_low = low * options.rescale_slope + options.rescale_intercept
        hu_high = high * options.rescale_slope + options.rescale_intercept
        raise InputError(f"volume for {folder} must lie within HU [{hu_low:g}, {hu_high:g}] for "
                         f"{'unsigned' if options.unsigned else 'signed'} {options.bits_stored}-bit storage with "
                         f"intercept {options.rescale_intercept:g}, got [{array.min():g}, {array.max():g}]. Clip "
                         f"the volume or change rescale_intercept/unsigned/bits_stored.")
    return stored.astype(np.uint16 if options.unsigned else np.int16)


def _pad_outside_fov(stored: np.ndarray, options: SeriesWriteOptions) -> np.ndarray:
    low, high = _stored_range(options)
    if not low <= options.pixel_padding_value <= high:
        raise ConfigError(f"pixel_padding_value must fit the stored range [{low}, {high}], got "
                          f"{options.pixel_padding_value}. Use e.g. -2000 for signed or 0 for unsigned storage.")
    ni, nj = stored.shape[:2]
    i, j = np.meshgrid(np.arange(ni) - (ni - 1) / 2, np.arange(nj) - (nj - 1) / 2, indexing="ij")
    outside = (i / (ni / 2)) ** 2 + (j / (nj / 2)) ** 2 > 1.0
    padded = stored.copy()
    padded[outside] = options.pixel_padding_value
    return padded


def _slice_plan(n_slices: int, options: SeriesWriteOptions) -> list[int]:
    for name, indices in (("drop_slices", options.drop_slices), ("duplicate_slices", options.duplicate_slices)):
        bad = [k for k in indices if not 0 <= k < n_slices]
        if bad:
            raise ConfigError(f"{name} must hold slice indices in [0, {n_slices - 1}], got {bad}.")
    dropped = set(options.drop_slices)
    plan = []
    for k in range(n_slices):
        if k in dropped:
            continue
        plan.append(k)
        if k in options.duplicate_slices:
            plan.append(k)
    return plan


def _file_name(options: SeriesWriteOptions, number: int, sop_uid: str) -> str:
    if options.file_naming == "sop_uid":
        return f"{sop_uid}.dcm"
    name = f"{options.file_prefix}{number:04d}"
    return name if options.file_naming == "no_suffix" else f"{name}.dcm"


def _base_dataset(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> Dataset:
    return new_file_dataset(sop_class_uid, sop_instance_uid, transfer_syntax, "ISO_IR 100", "CTSEG_PHANTOM")


def _ct_slice_dataset(pixels: np.ndarray, k: int, geometry: _SliceGeometry, uids: _SeriesUids,
                      instance_number: int, options: SeriesWriteOptions) -> Dataset:
    syntax = TRANSFER_SYNTAXES[options.transfer_syntax]
    dataset = _base_dataset(options.sop_class_uid, generate_uid(), syntax)
    now = _dt.datetime.now()
    dataset.ImageType = options.image_type.split("\\")
    dataset.InstanceCreationDate = now.strftime("%Y%m%d")
    dataset.InstanceCreationTime = now.strftime("%H%M%S")
    dataset.StudyDate = dataset.SeriesDate = dataset.ContentDate = options.study_date
    dataset.StudyTime = dataset.SeriesTime = dataset.ContentTime = "120000"
    dataset.AccessionNumber = ""
    dataset.Modality = options.modality
    dataset.Manufacturer = options.manufacturer
    dataset.ReferringPhysicianName = ""
    dataset.StudyDescription = options.study_description
    dataset.SeriesDescription = options.series_description
    dataset.PatientName = options.patient_name
    dataset.PatientID = options.patient_id
    dataset.PatientBirthDate = ""
    dataset.PatientSex = "O"
    dataset.SliceThickness = ds_text(geometry.slice_spacing)
    dataset.SpacingBetweenSlices = ds_text(geometry.slice_spacing)
    dataset.KVP = "120"
    dataset.ConvolutionKernel = options.convolution_kernel
    dataset.GantryDetectorTilt = ds_text(geometry.tilt_deg)
    dataset.PatientPosition = options.patient_position
    dataset.StudyInstanceUID = uids.study
    dataset.SeriesInstanceUID = uids.series
    dataset.StudyID = "1"
    dataset.SeriesNumber = options.series_number
    dataset.AcquisitionNumber = 1
    dataset.InstanceNumber = instance_number
    position = geometry.positions[k]
    dataset.ImagePositionPatient = [ds_text(v) for v in position]
    dataset.ImageOrientationPatient = [ds_text(v) for v in np.r_[geometry.row_cosine, geometry.column_cosine]]
    dataset.FrameOfReferenceUID = uids.frame_of_reference
    dataset.PositionReferenceIndicator = ""
    normal = np.cross(geometry.row_cosine, geometry.column_cosine)
    dataset.SliceLocation = ds_text(float(position @ normal))
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.Rows, dataset.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    dataset.PixelSpacing = [ds_text(v) for v in geometry.pixel_spacing]
    dataset.BitsAllocated = 16
    dataset.BitsStored = options.bits_stored
    dataset.HighBit = options.bits_stored - 1
    dataset.PixelRepresentation = 0 if options.unsigned else 1
    if options.pixel_padding_value is not None:
        dataset.add_new(0x00280120, "US" if options.unsigned else "SS", int(options.pixel_padding_value))
    dataset.WindowCenter = "40"
    dataset.WindowWidth = "400"
    dataset.RescaleIntercept = ds_text(options.rescale_intercept)
    dataset.RescaleSlope = ds_text(options.rescale_slope)
    dataset.RescaleType = "HU"
    _set_pixel_data(dataset, np.ascontiguousarray(pixels), options)
    return dataset


def _set_pixel_data(dataset: Dataset, pixels: np.ndarray, options: SeriesWriteOptions) -> None:
    syntax = TRANSFER_SYNTAXES[options.transfer_syntax]
    if not syntax.is_compressed:
        dataset.PixelData = pixels.astype("<u2" if options.unsigned else "<i2").tobytes()
        dataset["PixelData"].VR = "OW"
        return
    if syntax == JPEGLosslessSV1:  # pydicom has no encoder for this one, so ours writes the codestream
        from pydicom.encaps import encapsulate

        dataset.PixelData = encapsulate([encode_jpeg_lossless_sv1(pixels, options.bits_stored)])
        dataset["PixelData"].VR = "OB"
        dataset["PixelData"].is_undefined_length = True
    else:
        if syntax == JPEG2000Lossless and min(pixels.shape) < 32:  # OpenJPEG's 6 resolution levels need 32 px
            raise ConfigError(f"transfer_syntax 'jpeg2000_lossless' needs slices of at least 32×32 pixels, got "
                              f"{pixels.shape[1]}×{pixels.shape[0]}. Use a larger volume or another syntax.")
        try:
            dataset.compress(syntax, pixels, generate_instance_uid=False)
        except RuntimeError as exc:
            raise ConfigError(f"transfer_syntax '{options.transfer_syntax}' needs an encoder plugin that could not "
                              f"run ({exc}). Install pylibjpeg-openjpeg / pyjpegls, or choose explicit_little.") \
                from exc
    dataset.LossyImageCompression = "00"


def _save(dataset: Dataset, path: Path) -> None:
    with atomic.atomic_path(path) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)


# ---------------------------------------------------------------------------------------------
# JPEG Lossless, Non-Hierarchical, First-Order Prediction (process 14, selection value 1)
# ---------------------------------------------------------------------------------------------

ROI_COLOURS = [[220, 60, 60], [60, 160, 220], [240, 200, 40], [90, 200, 90], [200, 90, 200], [250, 140, 40]]


@dataclass
class _SeriesSlice:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    position: np.ndarray


def write_rtstruct(label: Volume, series_files: list[Path], path: Path, roi_names: dict[int, str]) -> Path:
    """Write an RTSTRUCT with one ROI per label value, contouring ``label`` (on the series' grid) slice by slice.

    The contours are those of the product writer (:mod:`pipeline.labels.rtstruct_write`: voxel edges)
    with holes as separate CLOSED_PLANAR contours, as planning systems export them; a fixture may also
    contour slices the series lacks (dropped on export), whose contours then reference no image.
    """
    from pipeline.labels.rtstruct_write import ImageRef, Roi, SourceSeries, rtstruct_dataset, save_rtstruct

    path = Path(path)
    slices, reference = _read_series_headers(series_files)
    _check_label_matches_series(label, reference, path)
    slice_for_k = _match_slices(label.grid, slices, path)

    def image(item: _SeriesSlice) -> ImageRef:
        return ImageRef(item.sop_class_uid, item.sop_instance_uid)

    source = SourceSeries(header=reference, images=[image(s) for s in {s.sop_instance_uid: s for s in slices}.values()],
                          image_of_slice={k: image(s) for k, s in slice_for_k.items()})
    rois = [Roi(value, name, tuple(ROI_COLOURS[(n - 1) % len(ROI_COLOURS)]))
            for n, (value, name) in enumerate(sorted(roi_names.items()), start=1)]
    dataset, _ = rtstruct_dataset(np.asarray(label.array), label.grid, rois, source,
                                  series_description="ctseg RTSTRUCT", label="CTSEG", holes="separate")
    return save_rtstruct(dataset, path)


def _read_series_headers(series_files: list[Path]) -> tuple[list[_SeriesSlice], Dataset]:
    if not series_files:
        raise InputError("series_files must list the CT files the RTSTRUCT refers to, got none. Pass the paths "
                         "that write_ct_series returned.")
    slices, first = [], None
    for file in series_files:
        header = pydicom.dcmread(file, stop_before_pixels=True)
        for keyword in ("SOPInstanceUID", "ImagePositionPatient", "FrameOfReferenceUID", "SeriesInstanceUID"):
            if keyword not in header:
                raise InputError(f"{file} must have {keyword} to be referenced by an RTSTRUCT, got none. "
                                 f"Pass the CT image files of one series.")
        first = first or header
        slices.append(_SeriesSlice(Path(file), str(header.SOPClassUID), str(header.SOPInstanceUID),
                                   np.array([float(v) for v in header.ImagePositionPatient])))
    return slices, first


def _check_label_matches_series(label: Volume, reference: Dataset, path: Path) -> None:
    affine_lps = lps_to_ras(label.affine)
    spacing = np.linalg.norm(affine_lps[:3, :3], axis=0)
    orientation = np.r_[affine_lps[:3, 0] / spacing[0], affine_lps[:3, 1] / spacing[1]]
    series_orientation = np.array([float(v) for v in reference.ImageOrientationPatient])
    series_shape = (int(reference.Columns), int(reference.Rows))
    series_spacing = np.array([float(v) for v in reference.PixelSpacing])[::-1]
    if (not np.allclose(orientation, series_orientation, atol=1e-4) or label.array.shape[:2] != series_shape
            or not np.allclose(spacing[:2], series_spacing, atol=1e-3)):
        raise InputError(f"label for {path} must lie on the series' grid (orientation {series_orientation.tolist()}, "
                         f"{series_shape[0]}×{series_shape[1]} pixels of {series_spacing.tolist()} mm), got "
                         f"orientation {np.round(orientation, 5).tolist()}, {label.array.shape[:2]} pixels of "
                         f"{np.round(spacing[:2], 5).tolist()} mm. Resample the label onto the CT grid first.")


def _match_slices(grid: Grid, slices: list[_SeriesSlice], path: Path) -> dict[int, _SeriesSlice]:
    """CT slice at each label slice k's position (ContourImageSequence is optional where none is)."""
    positions = np.array([s.position for s in slices])
    affine_lps = lps_to_ras(grid.affine)
    tolerance = 0.01 * max(float(np.linalg.norm(affine_lps[:3, 2])), 1.0)
    matched: dict[int, _SeriesSlice] = {}
    for k in range(grid.shape[2]):
        world = affine_lps[:3, 3] + k * affine_lps[:3, 2]
        distance = np.linalg.norm(positions - world[None, :], axis=1)
        best = int(np.argmin(distance))
        if distance[best] <= tolerance:
            matched[k] = slices[best]
    if not matched:
        raise InputError(f"label for {path} must share slice positions with the series, got no slice within "
                         f"{tolerance:.3g} mm. Pass the label map on the CT grid and that CT's files.")
    return matched  # slices the series lacks (dropped on export) get contours without an image reference
