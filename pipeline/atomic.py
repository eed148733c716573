"""Atomic file writes: every output is written under a temporary name in its folder, then renamed.

A crash or ``kill -9`` therefore leaves either the old file, the new file, or a ``*.partial-*``
leftover that :func:`remove_partials` cleans up on the next run, never a truncated output.

Every file is fsync'd before its rename. Inside :func:`batch` (one thread's writes, e.g. one case's
outputs) the temporary files are kept until the batch ends and then fsync'd together, in parallel (the
file system commits them in one or a few journal transactions instead of one per file), and only then
renamed: the same guarantee, at a fraction of the cost for many small files.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

PARTIAL_MARK = ".partial-"


def _default_mode() -> int:
    """Permissions a plain open() would give (mkstemp's are 0600, too strict for shared results)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_batches = threading.local()  # .pending: [(temporary path, final path)] of this thread's open batch, or None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` that keeps its suffixes; rename it onto ``path`` on success.

    Inside :func:`batch` the rename waits for the end of the batch.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith((".nii.gz", ".seg.nrrd")) else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{PARTIAL_MARK}", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    pending = getattr(_batches, "pending", None)
    handed_over = False
    try:
        yield tmp_path
        os.chmod(tmp_path, _default_mode())
        if pending is not None:
            pending.append((tmp_path, path))
            handed_over = True
            return
        _fsync(tmp_path)  # data must be on disk before the rename makes it visible
        os.replace(tmp_path, path)
    finally:
        if not handed_over and tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def batch() -> Iterator[None]:
    """Make this thread's atomic writes inside the block durable together, at its end.

    Each file is written under its temporary name as usual; when the block ends without an exception,
    all of them are fsync'd (in parallel), then renamed onto their final names in the order written.
    Until then the final names hold what they held before (code inside the block must not read back
    what it wrote). On an exception no final name changes and the temporary files are removed. A
    crash leaves only ``*.partial-*`` files, or files that are complete under their final names. A batch
    inside a batch joins the outer one. Other threads' writes are not batched.
    """
    if getattr(_batches, "pending", None) is not None:
        yield
        return
    pending: list[tuple[Path, Path]] = []
    _batches.pending = pending
    try:
        yield
        _batches.pending = None
        _fsync_all([tmp for tmp, _ in pending])
        for tmp, final in pending:
            os.replace(tmp, final)
    finally:
        _batches.pending = None
        for tmp, _ in pending:
            if tmp.exists():
                tmp.unlink()


def _fsync(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_all(paths: list[Path]) -> None:
    """fsync ``paths`` concurrently: the journal commits them together (several times faster than in turn)."""
    if len(paths) <= 1:
        for path in paths:
            _fsync(path)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
        list(pool.map(_fsync, paths))  # re-raises the first failure: nothing is renamed then


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
