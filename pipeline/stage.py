"""The stage contract: run folders, per-case resume, completion records and ``report.json``.

Every stage writes into its own folder and follows the same life cycle:

1. ``StageRun.open`` computes the stage's hash from the config sections it depends on plus the
   hash of the upstream stage's completion record. If ``done.json`` already holds that hash the
   stage is up to date and is skipped.
2. Each case runs through :meth:`StageRun.case`. A case whose record in ``cases/<id>.json`` has
   status ``ok``, the same hash and outputs that still exist is skipped; this is how an
   interrupted stage resumes. A :class:`~pipeline.errors.CaseError` marks that case failed and the
   stage moves on.
3. :meth:`StageRun.finish` writes ``report.json`` and then, last, ``done.json``.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import platform
import re
import shutil
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Iterator

from pipeline import atomic
from pipeline.errors import CaseError, CtsegError

log = logging.getLogger("ctseg")

DONE_FILE = "done.json"
REPORT_FILE = "report.json"
_VERSIONED = ("ctseg", "torch", "monai", "numpy", "nibabel", "pydicom", "SimpleITK", "highdicom")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def read_done(stage_dir: Path) -> dict | None:
    path = Path(stage_dir) / DONE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def upstream_hash(stage_dir: Path, stage_name: str) -> str:
    """Hash recorded by a finished upstream stage; a clear error when it has not run."""
    done = read_done(stage_dir)
    if done is None:
        raise CtsegError(f"the {stage_name} stage output {stage_dir} must be complete before this stage runs, "
                         f"but it has no {DONE_FILE}. Run 'ctseg {stage_name}' (or 'ctseg run') first.")
    return done["hash"]


_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(text: str, max_length: int = 64) -> str:
    """Sanitise text from a header or user into a file name that cannot leave its folder."""
    cleaned = re.sub(r"\.{2,}", "_", _SAFE.sub("_", str(text))).strip("._")
    return (cleaned or "unnamed")[:max_length]


@dataclass
class CaseRecord:
    id: str
    status: str = "pending"
    inputs: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    hash: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return dict(self.__dict__)


class StageRun:
    """One execution of a stage in ``folder``; see the module docstring for the life cycle."""

    def __init__(self, name: str, folder: Path, stage_hash: str, device: str = "cpu"):
        self.name = name
        self.folder = Path(folder)
        self.hash = stage_hash
        self.device = device
        self.records: dict[str, CaseRecord] = {}
        self.started = time.time()
        self.extra: dict = {}
        self.skipped_up_to_date = False
        self.resume_cases = True  # False after open(force=True): every case is done again

    @classmethod
    def open(cls, name: str, folder: Path, stage_hash: str, force: bool = False, device: str = "cpu") -> "StageRun":
        run = cls(name, folder, stage_hash, device=device)
        run.resume_cases = not force
        done = read_done(run.folder)
        if done and done.get("hash") == stage_hash and not force:
            run.skipped_up_to_date = True
            return run
        run.folder.mkdir(parents=True, exist_ok=True)
        removed = atomic.remove_partials(run.folder)
        if removed:
            log.info("%s: removed %d partial file(s) left by an interrupted run", name, removed)
        if done:  # the config changed: the old completion record no longer holds
            (run.folder / DONE_FILE).unlink()
        return run

    # -- cases ---------------------------------------------------------------------------------
    def _case_path(self, case_id: str) -> Path:
        return self.folder / "cases" / f"{safe_name(case_id)}.json"

    def previous(self, case_id: str) -> CaseRecord | None:
        path = self._case_path(case_id)
        if not path.is_file():
            return None
        try:
            return CaseRecord(**json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, TypeError):
            return None

    def is_case_done(self, case_id: str) -> bool:
        if not self.resume_cases:
            return False
        record = self.previous(case_id)
        if record is None or record.status != "ok" or record.hash != self.hash:
            return False
        return all(Path(p).exists() for p in _flatten_paths(record.outputs))

    @contextlib.contextmanager
    def case(self, case_id: str, inputs: dict | None = None) -> Iterator[CaseRecord | None]:
        """Run one case; yields None when it is already done (resume), else a record to fill in."""
        if self.is_case_done(case_id):
            record = self.previous(case_id)
            record.extra["resumed"] = True
            self.records[case_id] = record
            yield None
            return
        record = CaseRecord(id=case_id, inputs=dict(inputs or {}), hash=self.hash, status="running")
        start = time.perf_counter()
        try:
            yield record
            record.status = "ok"
        except CaseError as exc:
            record.status = "failed"
            record.error = str(exc)
            log.error("%s: %s", self.name, exc)
        finally:
            record.seconds = round(time.perf_counter() - start, 3)
            self.records[case_id] = record
            if record.status != "running":
                atomic.write_json(self._case_path(case_id), record.to_json())

    # -- completion ----------------------------------------------------------------------------
    @property
    def failed(self) -> list[CaseRecord]:
        return [r for r in self.records.values() if r.status == "failed"]

    def report(self) -> dict:
        return {
            "stage": self.name,
            "folder": str(self.folder),
            "hash": self.hash,
            "status": "failed" if self.failed else "ok",
            "started": _dt.datetime.fromtimestamp(self.started).isoformat(timespec="seconds"),
            "seconds": round(time.time() - self.started, 3),
            "device": self.device,
            "versions": versions(),
            "counts": {
                "cases": len(self.records),
                "ok": sum(r.status == "ok" for r in self.records.values()),
                "failed": len(self.failed),
                "resumed": sum(bool(r.extra.get("resumed")) for r in self.records.values()),
            },
            "cases": [r.to_json() for r in self.records.values()],
            **self.extra,
        }

    def finish(self, complete: bool | None = None) -> dict:
        """Write report.json, then done.json (last) unless a case failed or ``complete`` is False."""
        report = self.report()
        atomic.write_json(self.folder / REPORT_FILE, report)
        if complete is None:
            complete = not self.failed
        if complete:
            atomic.write_json(self.folder / DONE_FILE, {
                "stage": self.name, "hash": self.hash,
                "finished": _dt.datetime.now().isoformat(timespec="seconds"),
            })
        return report


def _flatten_paths(outputs) -> list[str]:
    if isinstance(outputs, dict):
        return [p for value in outputs.values() for p in _flatten_paths(value)]
    if isinstance(outputs, (list, tuple)):
        return [p for value in outputs for p in _flatten_paths(value)]
    return [str(outputs)] if outputs else []


def reset_folder(folder: Path) -> None:
    """Remove a stage folder entirely (used by --force)."""
    if Path(folder).exists():
        shutil.rmtree(folder)
