"""The export's file listing behind ingest's images key: the same list (hence key) as the os.walk it replaced."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.ingest.stage import _file_listing


def _walked(root: Path) -> list[tuple[str, int, int]]:
    """The listing as it was computed before (os.walk, sorted names, Path.stat): reruns must keep their key."""
    listing = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            try:
                info = path.stat()
            except OSError:
                continue
            listing.append((path.relative_to(root).as_posix(), info.st_size, info.st_mtime_ns))
    return listing


def test_listing_with_links_and_odd_names(tmp_path):
    root = tmp_path / "export"
    (root / "b" / "c").mkdir(parents=True)
    (root / "a").mkdir()
    (root / "B").mkdir()
    (root / "a" / "IM1.dcm").write_bytes(b"1")
    (root / "b" / "c" / "IM2").write_bytes(b"22")
    (root / "B" / "Z").write_bytes(b"4444")
    (root / "readme.txt").write_bytes(b"333")
    (root / "broken").symlink_to(tmp_path / "missing")  # a broken link: left out
    (root / "linked_folder").symlink_to(root / "b")     # a linked folder: not walked into
    (root / "b" / "linked_file").symlink_to(root / "readme.txt")  # a linked file: listed, its target's size
    listing = _file_listing(root)
    assert listing == _walked(root)
    assert [name for name, _, _ in listing] == ["readme.txt", "B/Z", "a/IM1.dcm", "b/linked_file", "b/c/IM2"]


@pytest.mark.shared_data
def test_listing_of_the_shared_data(shared_data):
    assert _file_listing(shared_data) == _walked(shared_data)
