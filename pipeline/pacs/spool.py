"""The receive spool: instances written atomically per series, and each series' state in ``spool.sqlite``.

Layout under the spool folder (``<OUT>/pacs/spool``)::

    spool.sqlite              one row per series: state, instance count, times, reason
    s<hash>/<hash>.dcm        the instances of one series (names are hashes of the UIDs: no patient data)

A series moves ``receiving`` → ``complete`` (its association was released, or it was quiet long
enough) → ``segmenting`` → ``done`` / ``failed`` / ``skipped``. An aborted association, or a
restart after the receiver was killed, leaves it ``incomplete``: it is reported and waits for a
resend (any new instance makes it ``receiving`` again); it is never segmented as it is. Every
instance is written to a temporary name and renamed, so a kill never leaves half a file under
its final name; a resend of the same SOP instance replaces the file.
"""
from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from pathlib import Path

from pipeline import atomic

SPOOL_DB = "spool.sqlite"
CLOSE_GRACE_SECONDS = 10.0  # a closed connection's release event may arrive this much later (thread scheduling)
FINAL_STATES = ("done", "failed", "skipped")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    key TEXT PRIMARY KEY, modality TEXT, instances INTEGER NOT NULL DEFAULT 0, first REAL, last REAL,
    state TEXT NOT NULL, reason TEXT, cases TEXT, updated REAL NOT NULL, segmented_instances INTEGER);
"""


def series_key(study_uid: str, series_uid: str) -> str:
    return "s" + hashlib.sha256(f"{study_uid}/{series_uid}".encode()).hexdigest()[:16]


def instance_name(sop_instance_uid: str) -> str:
    return hashlib.sha256(sop_instance_uid.encode("utf-8")).hexdigest()[:24] + ".dcm"


class Spool:
    """The spool folder of one node process (thread-safe; one SQLite connection behind a lock)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.root / SPOOL_DB), timeout=60.0, isolation_level=None,
                                   check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.executescript(_SCHEMA)
        self._assocs: dict[str, set[str]] = {}  # live association id -> series keys it delivered to
        self._closed: dict[str, float] = {}  # association id -> when its connection closed (release may follow)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def folder(self, key: str) -> Path:
        return self.root / key

    # -- receiving ---------------------------------------------------------------------------
    def store(self, encoded: bytes, study_uid: str, series_uid: str, sop_uid: str, modality: str,
              association: str) -> str:
        """Write one instance atomically (file bytes with preamble and meta) and count it; returns the series key."""
        key = series_key(study_uid, series_uid)
        folder = self.folder(key)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / instance_name(sop_uid)
        new = not path.exists()
        atomic.write_bytes(path, encoded)
        now = time.time()
        with self._lock:
            self._assocs.setdefault(association, set()).add(key)
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute("SELECT state FROM series WHERE key = ?", (key,)).fetchone()
            if row is None:
                self._db.execute("INSERT INTO series (key, modality, instances, first, last, state, updated) "
                                 "VALUES (?, ?, 1, ?, ?, 'receiving', ?)", (key, modality[:16], now, now, now))
            else:
                self._db.execute("UPDATE series SET instances = instances + ?, last = ?, state = 'receiving', "
                                 "reason = NULL, updated = ? WHERE key = ?", (int(new), now, now, key))
            self._db.execute("COMMIT")
        return key

    def association_ended(self, association: str, released: bool, complete_on: str = "release") -> list[str]:
        """Series this association delivered to: complete on a normal release (when no other live association
        is still delivering to them, and ``complete_on`` is release); left receiving on an abort or in quiet
        mode (then check_quiet decides). Returns the keys that became complete."""
        with self._lock:
            keys = self._assocs.pop(association, set())
            self._closed.pop(association, None)
            if not released or complete_on != "release":
                return []
            busy = set().union(*self._assocs.values()) if self._assocs else set()
            done = sorted(k for k in keys if k not in busy)
            for key in done:
                self._set(key, "complete", None, only_from=("receiving",))
            return done

    def connection_closed(self, association: str) -> None:
        """The TCP connection of an association closed. pynetdicom may report this before the release that
        preceded it (two threads), so the association is only given up after a grace time without a release
        (see :meth:`check_quiet`): a peer that vanished leaves its series to the quiet rule."""
        with self._lock:
            if association in self._assocs:
                self._closed.setdefault(association, time.time())

    def mark_complete(self, key: str) -> None:
        with self._lock:
            self._set(key, "complete", None, only_from=("receiving",))

    def check_quiet(self, quiet_seconds: float, complete_on: str, now: float | None = None) -> list[str]:
        """Series receiving with no instance for ``quiet_seconds`` and no live association delivering to them:
        complete (complete_on quiet) or incomplete (complete_on release: the sender never released)."""
        now = time.time() if now is None else now
        with self._lock:
            for association, closed in list(self._closed.items()):
                if time.time() - closed > CLOSE_GRACE_SECONDS:  # closed without a release: an abort
                    self.association_ended(association, released=False)
            busy = set().union(*self._assocs.values()) if self._assocs else set()
            rows = self._db.execute("SELECT key FROM series WHERE state = 'receiving' AND last < ?",
                                    (now - quiet_seconds,)).fetchall()
            changed = []
            for row in rows:
                if row["key"] in busy:
                    continue
                if complete_on == "quiet":
                    self._set(row["key"], "complete", None, only_from=("receiving",))
                else:
                    self._set(row["key"], "incomplete", "the sending association ended without a normal release "
                              "(aborted or timed out): waiting for the sender to send the series again",
                              only_from=("receiving",))
                changed.append(row["key"])
            return changed

    def recover(self) -> dict[str, int]:
        """After a restart: half-received series become incomplete (await a resend); complete or segmenting
        ones are queued again (the predict ledger redoes or skips them). Temporary files of instances whose
        writing was interrupted are removed (those older than a minute: a concurrent pull may be writing)."""
        with self._lock:
            self._assocs.clear()
            self._closed.clear()
            now = time.time()
            for leftover in self.root.glob(f"s*/*{atomic.PARTIAL_MARK}*"):
                try:
                    if now - leftover.stat().st_mtime > 60.0:
                        leftover.unlink()
                except FileNotFoundError:
                    pass
            for row in self._db.execute("SELECT key FROM series WHERE state NOT IN ('done', 'failed', 'skipped')"
                                        ).fetchall():
                self._recount(row["key"])
            self._db.execute("BEGIN IMMEDIATE")
            interrupted = self._db.execute(
                "UPDATE series SET state = 'incomplete', reason = 'reception was interrupted (the receiver stopped '"
                " || 'mid-series): waiting for the sender to send the series again', updated = ? "
                "WHERE state = 'receiving'", (now,)).rowcount
            requeued = self._db.execute("UPDATE series SET state = 'complete', updated = ? "
                                        "WHERE state = 'segmenting'", (now,)).rowcount
            self._db.execute("COMMIT")
            return {"incomplete": interrupted, "requeued": requeued}

    def prune(self, days: float, now: float | None = None) -> int:
        """Delete the received files of series done or skipped more than ``days`` ago (their results are in the
        predict folder; the copy of the patient's images is not kept for ever). Failed and incomplete series are
        kept for investigation. ``days`` <= 0 keeps everything. Returns how many series were removed."""
        import shutil

        if days <= 0:
            return 0
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute("SELECT key FROM series WHERE state IN ('done', 'skipped') AND updated < ?",
                                    (now - days * 86400.0,)).fetchall()
            for row in rows:
                shutil.rmtree(self.folder(row["key"]), ignore_errors=True)
                self._db.execute("DELETE FROM series WHERE key = ?", (row["key"],))
            return len(rows)

    # -- segmenting ------------------------------------------------------------------------------
    def take_complete(self) -> tuple[str, int] | None:
        """Claim the oldest complete series for segmentation: (key, instances), or None."""
        with self._lock:
            row = self._db.execute("SELECT key, instances FROM series WHERE state = 'complete' "
                                   "ORDER BY last LIMIT 1").fetchone()
            if row is None:
                return None
            self._set(row["key"], "segmenting", None, only_from=("complete",))
            return row["key"], int(row["instances"])

    def take_complete_key(self, key: str) -> bool:
        """Claim one given series if it is complete (pull segments what it just retrieved)."""
        with self._lock:
            cursor = self._db.execute("UPDATE series SET state = 'segmenting', updated = ? WHERE key = ? AND "
                                      "state = 'complete'", (time.time(), key))
            return cursor.rowcount == 1

    def busy(self, key: str) -> bool:
        """Whether a live association is still delivering to this series."""
        with self._lock:
            return any(key in keys for keys in self._assocs.values())

    def finish(self, key: str, state: str, reason: str | None, cases: list[str], instances: int) -> bool:
        """Record the outcome, unless new instances arrived meanwhile (then the series is receiving again and is
        segmented again once complete). Returns whether the outcome was recorded."""
        import json

        with self._lock:
            now = time.time()
            cursor = self._db.execute(
                "UPDATE series SET state = ?, reason = ?, cases = ?, segmented_instances = ?, updated = ? "
                "WHERE key = ? AND state = 'segmenting'", (state, reason, json.dumps(cases), instances, now, key))
            return cursor.rowcount == 1

    def _recount(self, key: str) -> int:
        """Instances are counted from the files on disk (a kill between writing a file and counting it, or a
        resend, must not skew the count)."""
        count = sum(1 for p in self.folder(key).glob("*.dcm") if not p.name.startswith("."))
        self._db.execute("UPDATE series SET instances = ? WHERE key = ?", (count, key))
        return count

    def _set(self, key: str, state: str, reason: str | None, only_from: tuple[str, ...]) -> None:
        if state == "complete":
            self._recount(key)
        marks = ",".join("?" * len(only_from))
        self._db.execute(f"UPDATE series SET state = ?, reason = ?, updated = ? WHERE key = ? AND state IN ({marks})",
                         (state, reason, time.time(), key, *only_from))

    def rows(self) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self._db.execute("SELECT * FROM series ORDER BY first")]

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM series WHERE key = ?", (key,)).fetchone()
            return dict(row) if row else None
