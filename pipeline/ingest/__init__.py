"""Ingest stage: DICOM exports or NIfTI/NRRD files in, HU NIfTI volumes with exact geometry out."""
