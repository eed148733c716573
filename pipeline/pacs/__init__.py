"""ctseg as a DICOM node: pull from a PACS, receive by C-STORE, send results back (optional extra ``ctseg[pacs]``)."""
