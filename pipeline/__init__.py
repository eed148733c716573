"""ctseg: a CT segmentation pipeline (ingest → preprocess → train → predict → evaluate) built on MONAI.

The Python API mirrors the CLI verbs: ``from pipeline import api; api.ingest(config)``.
Heavy libraries (torch, MONAI) are imported lazily so that ``ctseg --help`` stays fast.
"""

from importlib import metadata as _metadata

try:  # one source for the version: pyproject.toml, as installed
    __version__ = _metadata.version("ctseg")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
