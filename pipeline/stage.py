"""The stage contract: run folders, per-case resume, completion records and ``report.json``.

Every stage writes into its own folder and follows the same life cycle:

1. ``StageRun.open`` computes the stage's hash from the config sections it depends on plus the
   hash of the upstream stage's completion record. If ``done.json`` already holds that hash the
   stage is up to date and is skipped.
2. Each case runs through :meth:`StageRun.case`. A case whose record in ``cases/<id>.json`` has
   status ``ok``, the same hash and outputs that still exist is skipped; this is how an
   interrupted stage resumes. A :class:`~pipeline.errors.CaseError` marks that case failed and the
   stage moves on. So does any other exception raised inside one case (MemoryError, a library's
   HeaderDataError, a bug): the case fails with a one-line reason, its traceback goes into the
   case's record and ``errors.log`` in the stage folder (on stderr only with ``--debug``), and the
   other cases carry on.
3. :meth:`StageRun.finish` writes ``report.json`` and then, last, ``done.json``. A batch stage may
   complete with failed cases (``allow_failed``): ``done.json`` then lists them, a rerun retries
   only those (finished cases resume) and downstream stages see a new upstream hash when the set
   of failed cases changes.

:func:`check_output_outside_inputs` is the one check that an output folder is not, and is not
inside, an input folder (its outputs would be read back as inputs).
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
import traceback as _traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from pipeline import atomic
from pipeline.errors import CaseError, ConfigError, CtsegError

log = logging.getLogger("ctseg")

DONE_FILE = "done.json"
REPORT_FILE = "report.json"
ERRORS_LOG = "errors.log"
_VERSIONED = ("ctseg", "torch", "monai", "numpy", "nibabel", "pydicom", "SimpleITK", "highdicom")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def report_header(stage: str, folder: Path, run_hash: str, failed: bool, started: float, seconds: float,
                  device: str) -> dict:
    """The fields every stage's report.json begins with (one function for all stages, predict included)."""
    return {"stage": stage, "folder": str(folder), "hash": run_hash, "status": "failed" if failed else "ok",
            "started": _dt.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
            "seconds": round(seconds, 3), "device": device, "versions": versions()}


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
    failed = done.get("failed_cases")
    if not failed:
        return done["hash"]
    # completed with failed cases: a rerun that fixes some of them changes what downstream stages read
    import hashlib

    return hashlib.sha256(json.dumps([done["hash"], sorted(failed)]).encode()).hexdigest()[:16]


def check_output_outside_inputs(output: Path, inputs: list[Path], option: str = "--output") -> None:
    """Refuse an output folder that is, or is inside, one of ``inputs`` (raises ConfigError, exit 2)."""
    out = Path(output).expanduser().resolve()
    for source in inputs:
        if source is None:
            continue
        folder = Path(source).expanduser().resolve()
        if folder.is_file() and out != folder:
            continue  # a single input file: only writing onto the file itself would read outputs back
        if out == folder or folder in out.parents:
            # named without the input's path: export folders are often named after the patient
            got = "the input folder itself" if out == folder else f"a folder inside an input folder ({out.name})"
            raise ConfigError(f"{option} must be outside the input folder, got {got}: its outputs would be read "
                              f"back as inputs on the next run. Choose an output folder outside the input.")


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
    traceback: str | None = None  # for a failure that was not a refusal of the input (see StageRun.case)
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
        # applied to error texts and tracebacks before they are written (e.g. to drop input paths that
        # may name the patient); the identity by default
        self.redact: Callable[[str], str] = lambda text: text

    @classmethod
    def open(cls, name: str, folder: Path, stage_hash: str, force: bool = False, device: str = "cpu") -> StageRun:
        run = cls(name, folder, stage_hash, device=device)
        run.resume_cases = not force
        done = read_done(run.folder)
        if done and done.get("hash") == stage_hash and not force and not done.get("failed_cases"):
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
            record.error = self.redact(str(exc))
            log.error("%s: %s", self.name, record.error)
        except Exception as exc:  # noqa: BLE001 - one case must never end the batch
            record.status = "failed"
            first = str(exc).splitlines()[0][:300] if str(exc) else ""
            record.error = self.redact(f"case {case_id}: unexpected {type(exc).__name__}: {first} (traceback in "
                                       f"{ERRORS_LOG} and cases/{safe_name(case_id)}.json; rerun with --debug to "
                                       f"see it on stderr)")
            record.traceback = self.redact("".join(_traceback.format_exception(exc)))
            self._append_error_log(case_id, record.traceback)
            log.error("%s: %s", self.name, record.error)
            log.debug("%s: case %s traceback:\n%s", self.name, case_id, record.traceback)
        finally:
            record.seconds = round(time.perf_counter() - start, 3)
            self.records[case_id] = record
            if record.status != "running":
                atomic.write_json(self._case_path(case_id), record.to_json())

    def _append_error_log(self, case_id: str, text: str) -> None:
        stamp = _dt.datetime.now().isoformat(timespec="seconds")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(self.folder / ERRORS_LOG, "a", encoding="utf-8") as handle:
                handle.write(f"--- {stamp} {self.name} case {case_id}\n{text}\n")
        except OSError as exc:  # a full disk must not hide the case's own failure
            log.error("%s: could not append to %s (%s)", self.name, self.folder / ERRORS_LOG, exc.strerror or exc)

    # -- completion ----------------------------------------------------------------------------
    @property
    def failed(self) -> list[CaseRecord]:
        return [r for r in self.records.values() if r.status == "failed"]

    def report(self) -> dict:
        return {
            **report_header(self.name, self.folder, self.hash, bool(self.failed), self.started,
                            time.time() - self.started, self.device),
            "counts": {
                "cases": len(self.records),
                "ok": sum(r.status == "ok" for r in self.records.values()),
                "failed": len(self.failed),
                "resumed": sum(bool(r.extra.get("resumed")) for r in self.records.values()),
            },
            "cases": [r.to_json() for r in self.records.values()],
            **self.extra,
        }

    def finish(self, complete: bool | None = None, allow_failed: bool = False) -> dict:
        """Write report.json, then done.json (last) unless a case failed or ``complete`` is False.

        With ``allow_failed`` a stage whose failed cases are each recorded with their reason still
        completes; ``done.json`` lists the failed cases (see the module docstring).
        """
        report = self.report()
        atomic.write_json(self.folder / REPORT_FILE, report)
        if complete is None:
            complete = allow_failed or not self.failed
        if complete:
            done = {"stage": self.name, "hash": self.hash,
                    "finished": _dt.datetime.now().isoformat(timespec="seconds")}
            if self.failed:
                done["failed_cases"] = sorted(r.id for r in self.failed)
            atomic.write_json(self.folder / DONE_FILE, done)
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
