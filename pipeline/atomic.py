"""Atomic file writes: every output is written under a temporary name in its folder, then renamed.

A crash or ``kill -9`` therefore leaves either the old file, the new file, or a ``*.partial-*``
leftover that :func:`remove_partials` cleans up on the next run, never a truncated output.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

PARTIAL_MARK = ".partial-"


def _default_mode() -> int:
    """Permissions a plain open() would give (mkstemp's are 0600, too strict for shared results)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` that keeps its suffixes; rename it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith((".nii.gz", ".seg.nrrd")) else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{PARTIAL_MARK}", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:  # data must be on disk before the rename makes it visible
            os.fsync(handle.fileno())
        os.chmod(tmp_path, _default_mode())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def remove_partials(folder: str | os.PathLike) -> int:
    """Delete leftovers of interrupted atomic writes below ``folder``; return how many."""
    count = 0
    folder = Path(folder)
    if not folder.exists():
        return 0
    for leftover in folder.rglob(f"*{PARTIAL_MARK}*"):
        if leftover.is_file():
            leftover.unlink()
            count += 1
    return count
