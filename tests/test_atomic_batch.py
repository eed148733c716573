"""pipeline.atomic.batch: one thread's writes fsync'd together, renamed at the end, nothing renamed on failure."""
from __future__ import annotations

import os
import threading

import pytest

from pipeline import atomic


def _partials(folder) -> list[str]:
    return sorted(p.name for p in folder.rglob(f"*{atomic.PARTIAL_MARK}*"))


def test_batch_renames_at_the_end_after_fsync(tmp_path, monkeypatch):
    old = tmp_path / "a.json"
    old.write_text("old")
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                       real_fsync(fd)))
    with atomic.batch():
        atomic.write_text(old, "new")
        atomic.write_bytes(tmp_path / "sub" / "b.bin", b"\x00\x01")
        assert old.read_text() == "old" and not (tmp_path / "sub" / "b.bin").exists()
        assert len(_partials(tmp_path)) == 2 and not synced  # written under temporary names, not yet synced
    assert old.read_text() == "new" and (tmp_path / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    assert _partials(tmp_path) == []
    assert len(synced) == 2 and all(atomic.PARTIAL_MARK in name for name in synced)  # fsync'd before the rename
    assert oct(old.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_batch_changes_no_final_name_on_failure(tmp_path):
    kept = tmp_path / "kept.txt"
    kept.write_text("before")
    with pytest.raises(RuntimeError), atomic.batch():
        atomic.write_text(kept, "after")
        atomic.write_text(tmp_path / "new.txt", "x")
        raise RuntimeError("case failed")
    assert kept.read_text() == "before" and not (tmp_path / "new.txt").exists()
    assert _partials(tmp_path) == []


def test_batch_end_raises_when_fsync_fails_and_leaves_no_final_file(tmp_path, monkeypatch):
    with pytest.raises(OSError), atomic.batch():
        atomic.write_text(tmp_path / "a.txt", "a")
        atomic.write_text(tmp_path / "b.txt", "b")
        monkeypatch.setattr(atomic.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "I/O error")))
    assert not (tmp_path / "a.txt").exists() and not (tmp_path / "b.txt").exists()
    assert _partials(tmp_path) == []


def test_nested_batch_joins_the_outer_one_and_other_threads_write_at_once(tmp_path):
    with atomic.batch():
        with atomic.batch():
            atomic.write_text(tmp_path / "inner.txt", "i")
        assert not (tmp_path / "inner.txt").exists()  # the outer batch commits it
        worker = threading.Thread(target=atomic.write_text, args=(tmp_path / "thread.txt", "t"))
        worker.start()
        worker.join()
        assert (tmp_path / "thread.txt").read_text() == "t"  # not part of this thread's batch
    assert (tmp_path / "inner.txt").read_text() == "i"


def test_without_batch_each_write_is_final_at_once(tmp_path):
    atomic.write_json(tmp_path / "x.json", {"a": 1})
    assert (tmp_path / "x.json").read_text().startswith("{") and _partials(tmp_path) == []
