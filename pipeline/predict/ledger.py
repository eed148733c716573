"""The batch ledger: one SQLite row per case, so a batch resumes, and shards and hosts never do a case twice.

Columns: case id, input, status (``pending``, ``running``, ``done``, ``failed``), error message, the traceback of
an unexpected error, whether a plain rerun retries a failure (disk full), timings, output files with their
SHA-256, shard, attempt count, the owning process (host, pid, process start time, run id), the settings hash and
the update time.

Two layouts, chosen by ``predict.ledger_mode`` (auto: by the output folder's file system, see
:func:`resolve_ledger_mode`); the report says which was used and why:

- **local** (every process on one host): ``<OUT>/ledger.sqlite`` in WAL mode with a busy timeout; every change is
  one short transaction, and a case is claimed with ``BEGIN IMMEDIATE``. SQLite's WAL needs all processes on
  the same host (its shared-memory index), so this layout is never used on a network file system.
- **shared** (several hosts on an NFS/SMB/Lustre/... folder, :class:`SharedLedger`): each host and shard writes
  its own ``<OUT>/ledger/<host>-<shard>.sqlite`` (rollback journal, one writer per file), readers merge all
  files, and a case is claimed by an exclusive create of ``<OUT>/claims/<case>.claim``.

A case is (re)done when it is pending, when its outputs are missing or their checksums changed, when it was made
with other settings (model or config hash), when it failed and ``retry_failed`` is set, or when it is
``running`` but its owner is gone: on this host the owner's pid no longer exists or now belongs to another
process (start time differs); from another host its heartbeat (refreshed every 30 s by a background thread)
has stopped for ``stale_minutes``, and in the shared layout only when the run takes stale claims over
(``--take-stale`` or ``--retry-failed``). At its start a run sets cases whose owner is gone back to ``pending``
(:meth:`Ledger.reset_abandoned`), so that ``running`` always means a live process holds the case.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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
    warnings TEXT, summary TEXT, traceback TEXT, retryable INTEGER NOT NULL DEFAULT 0);
"""
# columns newer than the first schema: added to older ledgers when they are opened
_ADDED_COLUMNS = {"traceback": "TEXT", "retryable": "INTEGER NOT NULL DEFAULT 0"}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def process_start_time(pid: int) -> str | None:
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
    error: str | None
    shard: str | None
    attempts: int
    settings_hash: str | None
    run_id: str | None
    host: str | None
    pid: int | None
    proc_start: str | None
    started: float | None
    updated: float
    seconds: float | None
    timings: dict
    outputs: dict
    warnings: list
    summary: dict
    traceback: str | None = None
    retryable: int = 0  # failed for a reason outside the input (disk full): a plain rerun tries again

    @classmethod
    def from_sql(cls, row: sqlite3.Row) -> CaseRow:
        data = dict(row)
        for key, empty in (("timings", {}), ("outputs", {}), ("warnings", []), ("summary", {})):
            data[key] = json.loads(data[key]) if data[key] else empty
        return cls(**data)


class Ledger:
    """Access to ``ledger.sqlite`` for one run (one process); see the module docstring."""

    #: SQLite journal of this ledger's file: WAL needs every process on one host (SQLite's own rule)
    journal_mode = "WAL"
    mode = "local"
    mode_reason = ""

    def __init__(self, folder: Path, shard: str = "", stale_minutes: float = 30.0, host: str = ""):
        self.folder = Path(folder)
        self.host = host or socket.gethostname()
        self.shard = shard
        self.path = self._file()
        self.pid = os.getpid()
        self.proc_start = process_start_time(self.pid)
        self.run_id = uuid.uuid4().hex
        self.stale_seconds = float(stale_minutes) * 60.0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._connection = self._connect()
        self._connection.executescript(_SCHEMA)
        self._add_columns()
        with self._transaction() as db:
            db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            db.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, NULL, ?)",
                       (self.run_id, self.host, self.pid, self.proc_start, time.time(), time.time(), shard))
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="ctseg-ledger-heartbeat", daemon=True)
        self._heartbeat.start()

    def _file(self) -> Path:
        return self.folder / LEDGER_FILE

    def describe(self) -> dict:
        """How this batch keeps its ledger, for the report."""
        return {"mode": self.mode, "reason": self.mode_reason, "journal_mode": self.journal_mode,
                "files": [str(self.path.relative_to(self.folder))]}

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(str(self.path), timeout=60.0, isolation_level=None, check_same_thread=False)
        connection.row_factory = sqlite3.Row
        connection.execute("PRAGMA busy_timeout = 60000")
        connection.execute(f"PRAGMA journal_mode = {self.journal_mode}")
        connection.execute("PRAGMA synchronous = NORMAL")
        return connection

    def _add_columns(self) -> None:
        have = {row["name"] for row in self._connection.execute("PRAGMA table_info(cases)")}
        for name, kind in _ADDED_COLUMNS.items():
            if name not in have:
                try:
                    self._connection.execute(f"ALTER TABLE cases ADD COLUMN {name} {kind}")
                except sqlite3.OperationalError as exc:  # another process added it meanwhile
                    if "duplicate column" not in str(exc):
                        raise

    @contextmanager
    def _transaction(self, connection: sqlite3.Connection | None = None) -> Iterator[sqlite3.Connection]:
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
                self._on_beat()
        finally:
            connection.close()

    def _on_beat(self) -> None:
        """Extra liveness signals of a subclass (claim files), refreshed with every heartbeat."""

    def close(self) -> None:
        """Mark this run finished (if the disk still allows it) and close; never raises for a full disk."""
        self._stop.set()
        try:
            with self._transaction() as db:
                db.execute("UPDATE runs SET finished = ?, heartbeat = ? WHERE run_id = ?",
                           (time.time(), time.time(), self.run_id))
        except sqlite3.Error:  # disk full: the run is then seen as gone once this process exits
            pass
        finally:
            self._connection.close()

    # -- liveness ------------------------------------------------------------------------------
    def owner_alive(self, host: str | None, pid: int | None, proc_start: str | None,
                    run_id: str | None) -> bool:
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

    def reset_abandoned(self) -> int:
        """Set cases left ``running`` by a process that is gone back to ``pending``; returns how many.

        So the ledger says "running" only for a case some live process is working on.
        """
        rows = self._connection.execute("SELECT case_id, host, pid, proc_start, run_id FROM cases "
                                        "WHERE status = 'running' AND run_id != ?", (self.run_id,)).fetchall()
        gone = [(r["case_id"], r["run_id"]) for r in rows
                if not self.owner_alive(r["host"], r["pid"], r["proc_start"], r["run_id"])]
        if gone:
            with self._transaction() as db:
                db.executemany("UPDATE cases SET status = 'pending', error = 'interrupted (its process ended before "
                               "the case finished); redone on the next run', updated = ? WHERE case_id = ? AND "
                               "status = 'running' AND run_id IS ?",
                               [(time.time(), case_id, run_id) for case_id, run_id in gone])
        return len(gone)

    # -- cases ---------------------------------------------------------------------------------
    def register(self, cases: list[tuple[str, str]]) -> None:
        """Add (case id, input) rows that are not in the ledger yet, as pending."""
        now = time.time()
        with self._transaction() as db:
            db.executemany("INSERT OR IGNORE INTO cases (case_id, input, status, updated) VALUES (?, ?, 'pending', ?)",
                           [(case_id, source, now) for case_id, source in cases])

    def get(self, case_id: str) -> CaseRow | None:
        row = self._connection.execute("SELECT * FROM cases WHERE case_id = ?", (case_id,)).fetchone()
        return CaseRow.from_sql(row) if row else None

    def rows(self, case_ids: list[str] | None = None) -> list[CaseRow]:
        rows = [CaseRow.from_sql(r) for r in self._connection.execute("SELECT * FROM cases ORDER BY case_id")]
        if case_ids is None:
            return rows
        wanted = set(case_ids)
        return [r for r in rows if r.case_id in wanted]

    def verify_outputs(self, row: CaseRow) -> str | None:
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

    def needs_doing(self, current: CaseRow | None, settings_hash: str, retry_failed: bool) -> tuple[bool, str]:
        """Whether a case in state ``current`` (None: never seen) is to be done now, and why; the one rule.

        A case ``running`` in a live process is not decided here: each layout checks its owner first.
        """
        if current is None:
            return True, "new"
        if current.status == "done":
            if current.settings_hash != settings_hash:
                return True, "done with other settings (model or config changed): redoing"
            problem = self.verify_outputs(current)
            if problem is None:
                return False, "done (outputs verified)"
            return True, f"done, but {problem}: redoing"
        if current.status == "failed":
            if current.retryable:
                return True, "retrying: failed earlier for a reason outside the input (disk full)"
            if not retry_failed:
                return False, "failed earlier (use --retry-failed to try again)"
            return True, "retrying a failed case"
        if current.status == "running":
            return True, "left running by a process that is gone: redoing"
        return True, "pending"

    def _mark_running(self, db: sqlite3.Connection, case_id: str, source: str, settings_hash: str,
                      attempts: int) -> None:
        now = time.time()
        db.execute("INSERT OR IGNORE INTO cases (case_id, input, status, updated) VALUES (?, ?, 'pending', ?)",
                   (case_id, source, now))
        db.execute("UPDATE cases SET status = 'running', input = ?, error = NULL, traceback = NULL, retryable = 0, "
                   "shard = ?, attempts = ?, settings_hash = ?, run_id = ?, host = ?, pid = ?, proc_start = ?, "
                   "started = ?, updated = ? WHERE case_id = ?",
                   (source, self.shard, attempts, settings_hash, self.run_id, self.host, self.pid, self.proc_start,
                    now, now, case_id))

    def claim(self, case_id: str, source: str, settings_hash: str, retry_failed: bool) -> tuple[bool, str]:
        """Take the case for this process if it needs doing; (taken, why)."""
        with self._transaction() as db:
            row = db.execute("SELECT * FROM cases WHERE case_id = ?", (case_id,)).fetchone()
            current = CaseRow.from_sql(row) if row else None
            if current is not None and current.status == "running" and current.run_id != self.run_id and \
                    self.owner_alive(current.host, current.pid, current.proc_start, current.run_id):
                return False, "running in another live process"
            taken, why = self.needs_doing(current, settings_hash, retry_failed)
            if taken:
                self._mark_running(db, case_id, source, settings_hash, (current.attempts if current else 0) + 1)
            return taken, why

    def finish(self, case_id: str, status: str, *, error: str | None = None, seconds: float = 0.0,
               timings: dict | None = None, outputs: dict | None = None, warnings: list | None = None,
               summary: dict | None = None, traceback: str | None = None, retryable: bool = False) -> None:
        with self._transaction() as db:
            db.execute("UPDATE cases SET status = ?, error = ?, seconds = ?, timings = ?, outputs = ?, warnings = ?, "
                       "summary = ?, traceback = ?, retryable = ?, updated = ? WHERE case_id = ? AND run_id = ?",
                       (status, error, round(seconds, 3), json.dumps(timings or {}), json.dumps(outputs or {}),
                        json.dumps(warnings or []), json.dumps(summary or {}, default=str), traceback, int(retryable),
                        time.time(), case_id, self.run_id))

    def release(self, case_id: str) -> None:
        """Put a case this process was working on back to pending (interrupted by the user)."""
        with self._transaction() as db:
            db.execute("UPDATE cases SET status = 'pending', updated = ? WHERE case_id = ? AND run_id = ? "
                       "AND status = 'running'", (time.time(), case_id, self.run_id))

    def reopen(self, case_id: str) -> bool:
        """Mark a done case pending again because its input changed (a received series grew); returns whether
        a done row of this ledger file was reopened. The next claim redoes it."""
        with self._transaction() as db:
            return db.execute("UPDATE cases SET status = 'pending', updated = ? WHERE case_id = ? AND status = 'done'",
                              (time.time(), case_id)).rowcount == 1


# ---------------------------------------------------------------------------------------------
# Several hosts on one shared (network) folder
# ---------------------------------------------------------------------------------------------

LEDGER_DIR = "ledger"
CLAIMS_DIR = "claims"
CLAIM_SUFFIX = ".claim"
#: file systems on which SQLite's WAL (and POSIX locking in general) cannot be trusted across hosts
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph",
                                 "glusterfs", "9p", "afs", "ocfs2", "gfs2", "panfs", "wekafs"})


def filesystem_type(path: Path, mounts_text: str | None = None) -> str:
    """The type of the file system holding ``path`` (longest mount point of ``/proc/mounts``), or "unknown"."""
    if mounts_text is None:
        try:
            mounts_text = Path("/proc/mounts").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "unknown"
    target = str(Path(path).resolve())
    best, best_type = "", "unknown"
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        # /proc/mounts escapes spaces, tabs, newlines and backslashes in octal
        point = fields[1].encode("latin-1", "replace").decode("unicode_escape")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, best_type = point, fields[2]
    return best_type


def is_network_filesystem(fstype: str) -> bool:
    return fstype in NETWORK_FILESYSTEMS or fstype.startswith("fuse.")


def resolve_ledger_mode(folder: Path, requested: str) -> tuple[str, str]:
    """("local" or "shared", why) for the output ``folder``: ``predict.ledger_mode`` auto/local/shared."""
    if requested in ("local", "shared"):
        return requested, f"predict.ledger_mode={requested}"
    fstype = filesystem_type(folder)
    if is_network_filesystem(fstype):
        return "shared", f"the output folder is on a network file system ({fstype})"
    return "local", f"the output folder is on a local file system ({fstype})"


def _safe_part(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)[:80] or "host"


class SharedLedger(Ledger):
    """The ledger for several hosts on one network folder: each writer has its own SQLite file, no WAL.

    ``<OUT>/ledger/<host>-<shard>.sqlite`` is written by one host only (rollback journal, so nothing relies on
    shared memory across hosts); every reader merges all files, a case's latest non-pending row winning. A case is
    claimed by creating ``<OUT>/claims/<case>.claim`` with ``O_CREAT | O_EXCL`` (atomic on NFS v3+ and SMB),
    holding the owner's host, pid and run; the owner refreshes the claim's modification time with every heartbeat
    and removes it when the case ends. A claim whose owner is gone is taken over: at once when the owner ran on this
    host and its pid is dead; from another host only after ``stale_minutes`` without a heartbeat, and only when
    the run was started with ``take_stale`` (``--take-stale`` or ``--retry-failed``), since a slow network is not a
    dead node.
    """

    journal_mode = "DELETE"
    mode = "shared"

    def __init__(self, folder: Path, shard: str = "", stale_minutes: float = 30.0, host: str = "",
                 take_stale: bool = False):
        self.take_stale = take_stale
        self._held: set[str] = set()
        self._lock = threading.Lock()
        super().__init__(folder, shard=shard, stale_minutes=stale_minutes, host=host)
        self.claims = self.folder / CLAIMS_DIR
        self.claims.mkdir(parents=True, exist_ok=True)

    def _file(self) -> Path:
        tag = self.shard.replace("/", "of") if self.shard else "all"
        return self.folder / LEDGER_DIR / f"{_safe_part(self.host)}-{_safe_part(tag)}.sqlite"

    def describe(self) -> dict:
        files = sorted(str(p.relative_to(self.folder)) for p in (self.folder / LEDGER_DIR).glob("*.sqlite"))
        return {"mode": self.mode, "reason": self.mode_reason, "journal_mode": self.journal_mode, "files": files}

    # -- the merged view -----------------------------------------------------------------------
    def _other_files(self) -> list[Path]:
        return sorted(p for p in (self.folder / LEDGER_DIR).glob("*.sqlite") if p != self.path)

    def _merged(self) -> dict[str, CaseRow]:
        merged: dict[str, CaseRow] = {}
        for path in [self.path, *self._other_files()]:
            for row in _read_rows(path, self._connection if path == self.path else None):
                known = merged.get(row.case_id)
                if known is None or _newer(row, known):
                    merged[row.case_id] = row
        return merged

    def get(self, case_id: str) -> CaseRow | None:
        return self._merged().get(case_id)

    def rows(self, case_ids: list[str] | None = None) -> list[CaseRow]:
        merged = self._merged()
        wanted = set(case_ids) if case_ids is not None else set(merged)
        return [merged[key] for key in sorted(merged) if key in wanted]

    # -- liveness ------------------------------------------------------------------------------
    def _claim_path(self, case_id: str) -> Path:
        return self.claims / f"{_safe_part(case_id)}{CLAIM_SUFFIX}"

    def _claim_owner(self, path: Path) -> dict | None:
        try:
            owner = json.loads(path.read_text(encoding="utf-8"))
            owner["age"] = time.time() - path.stat().st_mtime
            return owner
        except (OSError, ValueError):
            return None

    def _claim_alive(self, owner: dict) -> bool:
        if owner.get("run_id") == self.run_id:
            return True
        if owner.get("host") == self.host and owner.get("pid") is not None:
            now = process_start_time(int(owner["pid"]))
            return now is not None and (owner.get("proc_start") is None or now in ("alive", owner["proc_start"]))
        return float(owner.get("age", 0.0)) < self.stale_seconds

    def _on_beat(self) -> None:
        with self._lock:
            held = list(self._held)
        for case_id in held:
            try:
                os.utime(self._claim_path(case_id))
            except OSError:
                pass

    def running_elsewhere(self) -> set[str]:
        busy = set()
        for path in self.claims.glob(f"*{CLAIM_SUFFIX}"):
            owner = self._claim_owner(path)
            if owner and owner.get("run_id") != self.run_id and self._claim_alive(owner):
                busy.add(str(owner.get("case_id")))
        return busy

    def live_runs_elsewhere(self) -> int:
        live = 0
        for path in self._other_files():
            for run in _read_runs(path):
                if run["finished"] is None and time.time() - float(run["heartbeat"]) < self.stale_seconds:
                    live += 1
        return live + super().live_runs_elsewhere()

    # -- cases ---------------------------------------------------------------------------------
    def claim(self, case_id: str, source: str, settings_hash: str, retry_failed: bool) -> tuple[bool, str]:
        current = self.get(case_id)
        if current is not None and current.status == "running":  # the claim file says whether its owner lives
            why = "pending"
        else:
            taken, why = self.needs_doing(current, settings_hash, retry_failed)
            if not taken:
                return False, why
        taken, claim_why = self._take_claim(case_id, retry_failed)
        if not taken:
            return False, claim_why
        # read again now that the claim is ours: another host may have finished the case (row done, claim
        # dropped) between the first read and the claim; without this it was done twice (seen once in CI)
        latest = self.get(case_id)
        changed = latest is not None and (current is None or (latest.status, latest.updated) !=
                                          (current.status, current.updated))
        if changed and latest is not None and latest.status != "running":
            still, why = self.needs_doing(latest, settings_hash, retry_failed)
            if not still:
                self._drop_claim(case_id)
                return False, why
        if changed:
            current = latest
        with self._transaction() as db:
            self._mark_running(db, case_id, source, settings_hash, (current.attempts if current else 0) + 1)
        return True, claim_why or why

    def _take_claim(self, case_id: str, retry_failed: bool) -> tuple[bool, str]:
        path = self._claim_path(case_id)
        note = ""
        for _ in range(2):  # the second try follows the removal of a dead owner's claim
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._claim_owner(path)
                if owner is None:  # being written or removed this instant
                    return False, "claimed by another process (claim file being written)"
                if owner.get("run_id") == self.run_id:
                    return True, note
                if self._claim_alive(owner):
                    return False, f"running in another live process (host {owner.get('host')})"
                same_host = owner.get("host") == self.host
                if not same_host and not (self.take_stale or retry_failed):
                    minutes = float(owner.get("age", 0.0)) / 60.0
                    return False, (f"claimed by host {owner.get('host')}, whose heartbeat stopped {minutes:.1f} min "
                                   f"ago: rerun with --take-stale (or --retry-failed) to take it over")
                # whoever renames the dead claim away first owns the takeover; the others see it gone
                grave = path.with_name(f"{path.name}.stale-{self.run_id}")
                try:
                    os.rename(path, grave)
                    grave.unlink()
                except FileNotFoundError:
                    return False, "taken over by another process"
                note = (f"left running by {'a process that is gone' if same_host else 'host ' + str(owner.get('host'))}"
                        f" (stale claim taken over): redoing")
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump({"case_id": case_id, "run_id": self.run_id, "host": self.host, "pid": self.pid,
                           "proc_start": self.proc_start, "claimed": time.time()}, handle)
            with self._lock:
                self._held.add(case_id)
            return True, note
        return False, "claimed by another process"

    def _drop_claim(self, case_id: str) -> None:
        with self._lock:
            held = case_id in self._held
            self._held.discard(case_id)
        if held:
            try:
                self._claim_path(case_id).unlink()
            except FileNotFoundError:
                pass

    def finish(self, case_id: str, status: str, **kwargs) -> None:
        try:
            super().finish(case_id, status, **kwargs)
        finally:  # the row says done/failed before the claim goes, so no reader sees the case unowned and pending
            self._drop_claim(case_id)

    def release(self, case_id: str) -> None:
        try:
            super().release(case_id)
        finally:
            self._drop_claim(case_id)

    def close(self) -> None:
        try:
            super().close()
        finally:
            for case_id in list(self._held):
                self._drop_claim(case_id)


_STATUS_RANK = {"pending": 0, "running": 1, "failed": 1, "done": 1}


def _newer(row: CaseRow, known: CaseRow) -> bool:
    """A pending row (a registration) never hides what another host did with the case; else the latest wins."""
    rank, known_rank = _STATUS_RANK.get(row.status, 0), _STATUS_RANK.get(known.status, 0)
    if rank != known_rank:
        return rank > known_rank
    return float(row.updated or 0.0) > float(known.updated or 0.0)


def _open_other(path: Path) -> sqlite3.Connection:
    # not read-only: a file whose writer was killed mid-transaction holds a hot journal, which the first reader
    # must roll back (SQLite does that only with write access); it never does so while the writer holds its lock
    connection = sqlite3.connect(str(path), timeout=60.0, isolation_level=None)
    connection.row_factory = sqlite3.Row
    connection.execute("PRAGMA busy_timeout = 60000")
    return connection


def _query_other(path: Path, sql: str) -> list[sqlite3.Row]:
    """Rows of another writer's ledger file; its absence of tables (being created) is no rows, anything else is
    an error: a ledger that cannot be read must stop the batch, or its done cases would silently be redone."""
    last: Exception | None = None
    for attempt in range(3):
        try:
            with contextlib.closing(_open_other(path)) as db:
                return list(db.execute(sql))
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            last = exc
            time.sleep(1.0 + attempt)
        except sqlite3.DatabaseError as exc:
            last = exc
            break
    from pipeline.errors import InputError

    raise InputError(f"ledger file {path.name} of {path.parent.parent.name}/ must be readable, got: {last}. Check "
                     f"the shared folder; move a damaged file away only when its host will not run again.")


def _read_rows(path: Path, connection: sqlite3.Connection | None = None) -> list[CaseRow]:
    if connection is not None:
        return [CaseRow.from_sql(r) for r in connection.execute("SELECT * FROM cases")]
    return [CaseRow.from_sql(r) for r in _query_other(path, "SELECT * FROM cases")]


def _read_runs(path: Path) -> list[sqlite3.Row]:
    return _query_other(path, "SELECT * FROM runs")


def open_ledger(folder: Path, shard: str = "", stale_minutes: float = 30.0, mode: str = "auto", host: str = "",
                take_stale: bool = False) -> Ledger:
    """The ledger of a batch in ``folder``: one WAL file on a local disk, one file per host on a network folder."""
    resolved, why = resolve_ledger_mode(Path(folder), mode)
    if resolved == "shared":
        ledger: Ledger = SharedLedger(folder, shard=shard, stale_minutes=stale_minutes, host=host,
                                      take_stale=take_stale)
    else:
        ledger = Ledger(folder, shard=shard, stale_minutes=stale_minutes, host=host)
    ledger.mode_reason = why
    return ledger


def read_case_rows(folder: Path) -> list[CaseRow]:
    """Every case row of a batch folder, read-only, whichever layout it has (for reports and evaluate)."""
    folder = Path(folder)
    merged: dict[str, CaseRow] = {}
    paths = [folder / LEDGER_FILE, *sorted((folder / LEDGER_DIR).glob("*.sqlite"))]
    for path in paths:
        if not path.is_file():
            continue
        for row in _read_rows(path):
            known = merged.get(row.case_id)
            if known is None or _newer(row, known):
                merged[row.case_id] = row
    return [merged[key] for key in sorted(merged)]


def has_ledger(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / LEDGER_FILE).is_file() or any((folder / LEDGER_DIR).glob("*.sqlite"))
