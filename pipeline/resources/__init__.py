"""Files that ship inside the package: the demo's config and the bundled dataset descriptions.

They are read through :mod:`importlib.resources`, so ``ctseg demo`` works from any folder after a plain
``pip install .``. The top-level ``configs/`` and ``datasets/`` folders of the repository hold the same files as
user-facing copies to read and adapt; ``tests/test_packaging.py`` keeps the two in step.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path


def resource_path(*parts: str) -> Path:
    """Path of a packaged file, e.g. ``resource_path("configs", "demo.yaml")``.

    The package is installed as plain files (setuptools' default, and an editable install), so the
    traversable is a real path; a zipped install is not supported and is refused with the reason.
    """
    item = resources.files(__name__).joinpath(*parts)
    path = Path(str(item))
    if not path.is_file():
        raise FileNotFoundError(f"packaged file {'/'.join(parts)} must exist in {path.parent}, got nothing there. "
                                f"Reinstall ctseg (pip install .); zipped installs are not supported.")
    return path
