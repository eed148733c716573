"""Case ids of DICOM series: the one id a series gets in ingest, predict and evaluate alike.

The scheme (:func:`series_case_id`), documented here once:

- anonymous (the default, ``ingest.anonymise_case_ids: true``): ``case_`` + the first 12 hex digits
  of the SHA-256 of the series' scan key (:attr:`pipeline.dicom.scan.SeriesInfo.key`). For a series
  with Study and Series Instance UIDs the key is ``uid:<StudyInstanceUID>/<SeriesInstanceUID>``
  (plus ``#part<N>`` for a split series, ``#patient-<hash>`` for a UID pair shared by several
  patients), so the id depends only on the DICOM content, not on the folder the scan started
  from: ingesting an export and predicting straight from the same export (or one patient's
  folder of it) give the same id, and ``ctseg evaluate`` pairs them. A series with blank UIDs
  falls back to the scanner's folder key, whose folder is relative to the scanned root: scan the
  same root in both stages for such series.
- not anonymous (``ingest.anonymise_case_ids: false``): ``<PatientID>_<SeriesNumber>``, sanitised.

Ids hold only ``[A-Za-z0-9_-]`` (no dots: ``<case>.`` starts every per-case output file name) and
never a patient name or ID by default. The link back to the patient is written only to
``ingest/private/case_mapping.csv``.
"""
from __future__ import annotations

import hashlib
import re

ID_PREFIX = "case_"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def series_case_id(series, anonymise: bool = True) -> str:
    """The case id of a scanned DICOM series (``SeriesInfo``); see the module docstring."""
    if anonymise:
        return ID_PREFIX + hashlib.sha256(series.key.encode("utf-8")).hexdigest()[:12]
    text = f"{series.patient_id}_{series.series_number}"
    return (_UNSAFE.sub("_", text).strip("_-") or "case")[:64]
