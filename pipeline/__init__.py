"""ctseg: a CT segmentation pipeline (ingest → preprocess → train → predict → evaluate) built on MONAI.

The Python API mirrors the CLI verbs: ``from pipeline import api; api.ingest(config)``.
Heavy libraries (torch, MONAI) are imported lazily so that ``ctseg --help`` stays fast.
"""

from importlib import metadata as _metadata

try:  # one source for the version: pyproject.toml, as installed
    __version__ = _metadata.version("ctseg")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"


def _numpy_without_huge_pages() -> None:
    """Ask numpy not to request transparent huge pages for its large arrays (unless the user set it).

    numpy madvises every array of 4 MB or more for huge pages. Where the kernel defragments memory on such
    faults (``/sys/kernel/mm/transparent_hugepage/defrag`` = madvise, a common default), each fresh large
    array can then stall on compaction: on the development VM a fresh 512x512x300 float32 pair took 1.2-1.9 s
    to allocate and fill with it against 0.33 s without, and predict's first-touch phases (preparing the
    image, reassembly, clean-up) were slowed by as much (bench/README.md). An explicit
    ``NUMPY_MADVISE_HUGEPAGE`` in the environment wins.
    """
    import os
    import sys

    if "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        return
    if "numpy" not in sys.modules:
        os.environ["NUMPY_MADVISE_HUGEPAGE"] = "0"  # read by numpy at import; inherited by worker processes
        return
    import importlib

    # numpy already imported (ctseg used as a library): the same switch, through numpy's own setter
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):  # numpy >= 2, then numpy 1
        try:
            setter = importlib.import_module(module)._set_madvise_hugepage
        except (ImportError, AttributeError):
            continue
        setter(False)
        return


_numpy_without_huge_pages()
