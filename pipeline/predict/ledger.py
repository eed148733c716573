"""The batch ledger: one SQLite row per case in ``<OUT>/ledger.sqlite``, shared safely by several processes.

Columns: case id, input, status (``pending``, ``running``, ``done``, ``failed``), error message,
timings, output files with their SHA-256, shard, attempt count, the owning process (host, pid,
process start time, run id), the settings hash and the update time. The database runs in WAL
mode with a busy timeout; every change is one short transaction, and a case is claimed with
``BEGIN IMMEDIATE`` so two processes never take the same case.

A case is (re)done when it is pending, when its outputs are missing or their checksums changed,
when it was made with other settings (model or config hash), when it failed and ``retry_failed``
is set, or when it is ``running`` but its owner is gone: on this host the owner's pid no longer
exists or now belongs to another process (start time differs); on another host its run has not
reported a heartbeat for ``stale_minutes``. Each live run refreshes its heartbeat from a
background thread.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

LEDGER_FILE = "ledger.sqlite"
SCHEMA_VERSION = "1"
HEARTBEAT_SECONDS = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL, proc_start TEXT,
    started REAL NOT NULL, heartbeat REAL NOT NULL, finished REAL, shard TEXT);
CREATE TABLE IF NOT EXISTS cases (
    case_id TEXT PRIMARY KEY, input TEXT NOT NULL, status TEXT NOT NULL, error TEXT, shard TEXT,
    attempts INTEGER NOT NULL DEFAULT 0, settings_hash TEXT, run_id TEXT, host TEXT, pid INTEGER,
    proc_start TEXT, started REAL, updated REAL NOT NULL, seconds REAL, timings TEXT, outputs TEXT,
    warnings TEXT, summary TEXT);
"""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def process_start_time(pid: int) -> Optional[str]:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None when no such process exists."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return fields[19]  # field 22 of stat; the first two fields (pid, comm) were split off
    except (OSError, IndexError):
        if not Path("/proc").is_dir():  # no procfs (macOS): fall back to "does the pid exist"
            try:
                os.kill(pid, 0)
                return "alive"
            except ProcessLookupError:
                return None
            except PermissionError:
                return "alive"
        return None


@dataclass
class CaseRow:
    case_id: str
    input: str
    status: str
    error: Optional[str]
    shard: Optional[str]
    attempts: int
    settings_hash: Optional[str]
    run_id: Optional[str]
    host: Optional[str]
    pid: Optional[int]
    proc_start: Optional[str]
    started: Optional[float]
    updated: float
    seconds: Optional[float]
    timings: dict
    outputs: dict
    warnings: list
    summary: dict

    @classmethod
    def from_sql(cls, row: sqlite3.Row) -> "CaseRow":
        data = dict(row)
        for key, empty in (("timings", {}), ("outputs", {}), ("warnings", []), ("summary", {})):
            data[key] = json.loads(data[key]) if data[key] else empty
        return cls(**data)


class Ledger:
    """Access to ``ledger.sqlite`` for one run (one process); see the module docstring."""

    def __init__(self, folder: Path, shard: str = "", stale_minutes: float = 30.0):
        self.folder = Path(folder)
        self.path = self.folder / LEDGER_FILE
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.proc_start = process_start_time(self.pid)
        self.run_id = uuid.uuid4().hex
        self.shard = shard
        self.stale_seconds = float(stale_minutes) * 60.0
        self.folder.mkdir(parents=True, exist_ok=True)
        self._connection = self._connect()
        self._connection.executescript(_SCHEMA)
        with self._transaction() as db:
            db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            db.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, NULL, ?)",
                       (self.run_id, self.host, self.pid, self.proc_start, time.time(), time.time(), shard))
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="ctseg-ledger-heartbeat", daemon=True)
        self._heartbeat.start()

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(str(self.path), timeout=60.0, isolation_level=None, check_same_thread=False)
        connection.row_factory = sqlite3.Row
        connection.execute("PRAGMA busy_timeout = 60000")
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = NORMAL")
        return connection

    @contextmanager
    def _transaction(self, connection: Optional[sqlite3.Connection] = None) -> Iterator[sqlite3.Connection]:
        db = connection or self._connection
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _beat(self) -> None:
        connection = self._connect()
        try:
            while not self._stop.wait(HEARTBEAT_SECONDS):
                try:
                    with self._transaction(connection) as db:
                        db.execute("UPDATE runs SET heartbeat = ? WHERE run_id = ?", (time.time(), self.run_id))
                except sqlite3.Error:
                    pass  # a busy database only delays the heartbeat
        finally:
            connection.close()

    def close(self) -> None:
        self._stop.set()
        with self._transaction() as db:
            db.execute("UPDATE runs SET finished = ?, heartbeat = ? WHERE run_id = ?",
                       (time.time(), time.time(), self.run_id))
        self._connection.close()

    # -- liveness ------------------------------------------------------------------------------
    def owner_alive(self, host: Optional[str], pid: Optional[int], proc_start: Optional[str],
                    run_id: Optional[str]) -> bool:
        if run_id == self.run_id:
            return True
        if host == self.host and pid is not None:
            now = process_start_time(int(pid))
            return now is not None and (proc_start is None or now == "alive" or now == proc_start)
        row = self._connection.execute("SELECT heartbeat, finished FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None or row["finished"] is not None:
            return False
        return time.time() - float(row["heartbeat"]) < self.stale_seconds

    def live_runs_elsewhere(self) -> int:
        """How many other runs on this folder are still alive."""
        rows = self._connection.execute("SELECT run_id, host, pid, proc_start FROM runs WHERE finished IS NULL "
                                        "AND run_id != ?", (self.run_id,)).fetchall()
        return sum(self.owner_alive(r["host"], r["pid"], r["proc_start"], r["run_id"]) for r in rows)

    def running_elsewhere(self) -> set[str]:
        """Case ids currently being processed by another live process."""
        rows = self._connection.execute("SELECT case_id, host, pid, proc_start, run_id FROM cases "
                                        "WHERE status = 'running' AND run_id != ?", (self.run_id,)).fetchall()
        return {r["case_id"] for r in rows if self.owner_alive(r["host"], r["pid"], r["proc_start"], r["run_id"])}

    # -- cases ---------------------------------------------------------------------------------
    def register(self, cases: list[tuple[str, str]]) -> None:
        """Add (case id, input) rows that are not in the ledger yet, as pending."""
        now = time.time()
        with self._transaction() as db:
            db.executemany("INSERT OR IGNORE INTO cases (case_id, input, status, updated) VALUES (?, ?, 'pending', ?)",
                           [(case_id, source, now) for case_id, source in cases])

    def get(self, case_id: str) -> Optional[CaseRow]:
        row = self._connection.execute("SELECT * FROM cases WHERE case_id = ?", (case_id,)).fetchone()
        return CaseRow.from_sql(row) if row else None

    def rows(self, case_ids: Optional[list[str]] = None) -> list[CaseRow]:
        rows = [CaseRow.from_sql(r) for r in self._connection.execute("SELECT * FROM cases ORDER BY case_id")]
        if case_ids is None:
            return rows
        wanted = set(case_ids)
        return [r for r in rows if r.case_id in wanted]

    def verify_outputs(self, row: CaseRow) -> Optional[str]:
        """None when every recorded output exists with its checksum; otherwise what is wrong."""
        if not row.outputs:
            return "no outputs recorded"
        for name, entry in row.outputs.items():
            path = self.folder / entry["path"]
            if not path.is_file():
                return f"{name} output {entry['path']} is missing"
            if sha256_file(path) != entry["sha256"]:
                return f"{name} output {entry['path']} changed since it was written (checksum differs)"
        return None

    def claim(self, case_id: str, source: str, settings_hash: str, retry_failed: bool) -> tuple[bool, str]:
        """Take the case for this process if it needs doing; (taken, why)."""
        with self._transaction() as db:
            row = db.execute("SELECT * FROM cases WHERE case_id = ?", (case_id,)).fetchone()
            current = CaseRow.from_sql(row) if row else None
            why = "new"
            if current is not None:
                if current.status == "running" and current.run_id != self.run_id and self.owner_alive(
                        current.host, current.pid, current.proc_start, current.run_id):
                    return False, "running in another live process"
                if current.status == "done":
                    if current.settings_hash != settings_hash:
                        why = "done with other settings (model or config changed): redoing"
                    else:
                        problem = self.verify_outputs(current)
                        if problem is None:
                            return False, "done (outputs verified)"
                        why = f"done, but {problem}: redoing"
                elif current.status == "failed":
                    if not retry_failed:
                        return False, "failed earlier (use --retry-failed to try again)"
                    why = "retrying a failed case"
                elif current.status == "running":
                    why = "left running by a process that is gone: redoing"
                else:
                    why = "pending"
            now = time.time()
            db.execute("INSERT OR IGNORE INTO cases (case_id, input, status, updated) VALUES (?, ?, 'pending', ?)",
                       (case_id, source, now))
            db.execute("UPDATE cases SET status = 'running', input = ?, error = NULL, shard = ?, "
                       "attempts = attempts + 1, settings_hash = ?, run_id = ?, host = ?, pid = ?, proc_start = ?, "
                       "started = ?, updated = ? WHERE case_id = ?",
                       (source, self.shard, settings_hash, self.run_id, self.host, self.pid, self.proc_start, now, now,
                        case_id))
            return True, why

    def finish(self, case_id: str, status: str, *, error: Optional[str] = None, seconds: float = 0.0,
               timings: Optional[dict] = None, outputs: Optional[dict] = None, warnings: Optional[list] = None,
               summary: Optional[dict] = None) -> None:
        with self._transaction() as db:
            db.execute("UPDATE cases SET status = ?, error = ?, seconds = ?, timings = ?, outputs = ?, warnings = ?, "
                       "summary = ?, updated = ? WHERE case_id = ? AND run_id = ?",
                       (status, error, round(seconds, 3), json.dumps(timings or {}), json.dumps(outputs or {}),
                        json.dumps(warnings or []), json.dumps(summary or {}, default=str), time.time(), case_id,
                        self.run_id))

    def release(self, case_id: str) -> None:
        """Put a case this process was working on back to pending (interrupted by the user)."""
        with self._transaction() as db:
            db.execute("UPDATE cases SET status = 'pending', updated = ? WHERE case_id = ? AND run_id = ? "
                       "AND status = 'running'", (time.time(), case_id, self.run_id))

    def reopen(self, case_id: str) -> bool:
        """Mark a done case pending again because its input changed (e.g. a received series grew); returns
        whether a done row was reopened. The next claim redoes it."""
        with self._transaction() as db:
            return db.execute("UPDATE cases SET status = 'pending', updated = ? WHERE case_id = ? AND status = 'done'",
                              (time.time(), case_id)).rowcount == 1
