"""Options of the ingest stage (``ingest:`` in the config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# The settings dataclasses live here, with no import of the DICOM code, so that loading a config never loads
# pydicom; pipeline.dicom.* import them from here (and re-export them under their old names).


@dataclass
class AssemblyOptions:
    """How a DICOM series becomes one volume, and which irregularities are corrected or refused."""

    tilt: Literal["correct", "refuse"] = field(default="correct", metadata={
        "help": "Gantry-tilted (sheared) series: resample onto an orthogonal grid ('correct') or refuse."})
    tilt_tolerance_deg: float = field(default=0.05, metadata={
        "help": "Slice steps that lean less than this from the slice normal are kept as they are."})
    spacing_tolerance: float = field(default=0.01, metadata={
        "help": "Slice positions may deviate from a regular grid by this fraction of the slice spacing "
                "(or spacing_tolerance_mm, whichever is larger) before they are resampled."})
    spacing_tolerance_mm: float = field(default=0.01, metadata={
        "help": "Absolute floor of the slice position tolerance in mm (IPP values are often rounded)."})
    max_gap_slices: float = field(default=3.0, metadata={
        "help": "Largest gap between neighbouring slices, in slice spacings, that is filled by linear "
                "interpolation (3.0 = up to two missing slices); larger gaps are refused."})
    max_gap_mm: float = field(default=20.0, metadata={
        "help": "Largest gap in mm that is filled by interpolation; 0 disables this limit."})
    on_inconsistent: Literal["split", "refuse"] = field(default="split", metadata={
        "help": "Series that mix image sizes, orientations or acquisitions: assemble the parts the scan "
                "split them into ('split') or refuse them ('refuse')."})
    padding_hu: float = field(default=-1024.0, metadata={
        "help": "HU given to PixelPaddingValue pixels (outside the reconstructed field of view)."})
    dtype: Literal["auto", "int16", "float32"] = field(default="auto", metadata={
        "help": "Voxel type: 'auto' is int16 when the rescale gives integer HU, float32 otherwise."})
    workers: int = field(default=2, metadata={"help": "Threads decoding pixel data."})
    on_damaged: Literal["refuse", "exclude"] = field(default="refuse", metadata={
        "help": "A damaged slice (an unreadable or truncated file beside the series, pixel attributes that "
                "disagree with the series, pixel data that cannot be decoded, a position off the series' "
                "line): refuse the case naming the file ('refuse'), or leave the slice out, name it in the "
                "case's warnings and treat it as a missing slice, so the gap rules apply ('exclude')."})
    off_line_tolerance: float = field(default=0.5, metadata={
        "help": "A slice whose position is further than this fraction of the slice spacing from the line "
                "through the other slices' positions is damaged."})
    max_extent_mm: float = field(default=2000.0, metadata={
        "help": "Largest physical extent of the assembled grid along any axis, in mm; a series that would "
                "need more is refused (a corrupted position or spacing, not a body)."})
    memory_budget_mb: int = field(default=0, metadata={
        "help": "Largest memory one case may need, estimated from its headers before anything is "
                "allocated, in MB; a case above it is refused with the size it needs. 0 = half of this "
                "machine's physical memory."})
    varying_rescale: Literal["refuse", "allow"] = field(default="refuse", metadata={
        "help": "CT images of one series whose RescaleSlope or RescaleIntercept differ: refuse (a strong "
                "sign of a damaged header) or apply each image's own values and name them in the warnings."})


@dataclass
class PlausibilityOptions:
    """Which volumes are flagged as implausible CT, and whether that refuses them."""

    refuse: bool = field(default=False, metadata={
        "help": "Raise an error instead of warning when a check fails."})
    min_slices: int = field(default=3, metadata={"help": "Volumes with fewer slices are flagged."})
    min_field_of_view_mm: float = field(default=30.0, metadata={
        "help": "Volumes whose in-plane extent (either axis) is smaller than this are flagged."})
    orthonormal_tolerance: float = field(default=1e-3, metadata={
        "help": "Largest allowed deviation of the direction cosines' dot products from the identity."})
    air_threshold_hu: float = field(default=-500.0, metadata={
        "help": "A CT in HU holds air below this value somewhere; a volume whose minimum is higher is flagged."})
    max_display_value: float = field(default=255.0, metadata={
        "help": "Volumes with no air and a maximum at or below this look like 8-bit display values."})
    allow_non_finite: bool = field(default=False, metadata={
        "help": "Ingest refuses a volume with NaN or infinite voxels unless this is true (then a warning)."})
    allow_sheared: bool = field(default=False, metadata={
        "help": "Ingest refuses a volume whose direction cosines are not orthonormal (a sheared grid) unless "
                "this is true (then a warning)."})
    allow_few_slices: bool = field(default=False, metadata={
        "help": "Ingest refuses a volume with fewer than min_slices slices unless this is true (then a warning)."})


@dataclass
class SelectionRules:
    """Which series ingest keeps."""

    modalities: list[str] = field(default_factory=lambda: ["CT"], metadata={
        "help": "Modality values (0008,0060) that are kept."})
    description_regex: str = field(default="", metadata={
        "help": "Keep only series whose SeriesDescription matches this regular expression (case-insensitive "
                "search); empty keeps all."})
    exclude_description_regex: str = field(default="", metadata={
        "help": "Skip series whose SeriesDescription matches this regular expression (case-insensitive); "
                "empty skips none."})
    kernel_regex: str = field(default="", metadata={
        "help": "Keep only series whose ConvolutionKernel matches this regular expression (case-insensitive "
                "search); empty keeps all."})
    min_slices: int = field(default=10, metadata={"help": "Series with fewer slices are skipped."})
    slice_thickness_range: list[float] = field(default_factory=list, metadata={
        "help": "[min, max] SliceThickness in mm that is kept; empty keeps any thickness."})
    allowed_orientations: list[str] = field(default_factory=lambda: ["axial"], metadata={
        "help": "Slice orientations kept: any of axial, coronal, sagittal (from the slice normal)."})
    allow_derived: bool = field(default=False, metadata={
        "help": "Keep DERIVED or SECONDARY images (ImageType) too, e.g. reformats or post-processed series."})
    allow_secondary_capture: bool = field(default=False, metadata={
        "help": "Keep Secondary Capture objects (screenshots, summaries); almost never wanted."})
    policy: Literal["largest", "all"] = field(default="largest", metadata={
        "help": "Per study, keep only the qualifying series with the most slices ('largest') or every "
                "qualifying series ('all')."})



@dataclass
class IngestConfig:
    """How source scans become HU NIfTI volumes."""

    anonymise_case_ids: bool = field(default=True, metadata={
        "help": "Case IDs from a scanned export are hashes of the study/series UIDs; the link back to the "
                "patient is written only to ingest/private/case_mapping.csv. Set false to use sanitised "
                "PatientID_SeriesNumber names instead."})
    full_paths: bool = field(default=False, metadata={
        "help": "Write full input paths (folder and file names, which often name the patient) into logs, "
                "report.json, cases/ and provenance. By default they appear only under ingest/private/ "
                "(owner-only); everything else names a case id, a folder hash and a file name within its "
                "series folder."})
    compresslevel: int = field(default=1, metadata={
        "help": "gzip level for written .nii.gz files (1 = fast, 9 = small)."})
    workers: int = field(default=0, metadata={
        "help": "Cases ingested at once, each in its own worker process (forked after start-up; the scan, the "
                "case records, the report and the inventory stay in the main process, and the outputs are the "
                "same as with 1). 0 = one per CPU core, fewer when that many of the largest case would not fit "
                "ingest.assembly.memory_budget_mb together (half of physical memory by default). 1 = one case "
                "at a time in the main process, the next case's image read ahead in a thread. Not part of the "
                "stage hash: changing it redoes nothing."})
    select: SelectionRules = field(default_factory=SelectionRules)
    assembly: AssemblyOptions = field(default_factory=AssemblyOptions)
    plausibility: PlausibilityOptions = field(default_factory=PlausibilityOptions)
