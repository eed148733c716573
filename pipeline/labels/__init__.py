"""Label inputs: RTSTRUCT contours, DICOM SEG and NIfTI/NRRD label maps turned into masks on an image's grid."""
