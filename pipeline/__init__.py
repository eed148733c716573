"""ctseg: a CT segmentation pipeline (ingest → preprocess → train → predict → evaluate) built on MONAI.

The Python API mirrors the CLI verbs: ``from pipeline import api; api.ingest(config)``.
Heavy libraries (torch, MONAI) are imported lazily so that ``ctseg --help`` stays fast.
"""

__version__ = "0.1.0"
