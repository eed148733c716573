"""Options of the ingest stage (``ingest:`` in the config)."""
from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.dicom.assemble import AssemblyOptions
from pipeline.dicom.plausibility import PlausibilityOptions
from pipeline.dicom.select import SelectionRules


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
    select: SelectionRules = field(default_factory=SelectionRules)
    assembly: AssemblyOptions = field(default_factory=AssemblyOptions)
    plausibility: PlausibilityOptions = field(default_factory=PlausibilityOptions)
