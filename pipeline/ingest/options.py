"""Options of the ingest stage (``ingest:`` in the config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class IngestConfig:
    """How source scans become HU NIfTI volumes."""

    anonymise_case_ids: bool = field(default=True, metadata={
        "help": "Case IDs from a scanned export are hashes of the study/series UIDs; the link back to the "
                "patient is written only to ingest/private/case_mapping.csv. Set false to use sanitised "
                "PatientID_SeriesNumber names instead."})
    on_implausible: Literal["warn", "refuse"] = field(default="warn", metadata={
        "help": "What to do when a volume does not look like CT in HU (e.g. uint8 0-255 display values)."})
    compresslevel: int = field(default=1, metadata={
        "help": "gzip level for written .nii.gz files (1 = fast, 9 = small)."})
