"""Ingesting whole cases in parallel worker processes, with each case's outcome and log lines returned in case order.

Much of a case's work holds the GIL (header and RTSTRUCT parsing, building the masks and their records), so
threads cannot keep several cores busy across cases; processes can. :class:`CaseProcesses` forks its workers
from the main process once it is set up (imports, scan and case list done, no other thread running), so a
worker starts in milliseconds and inherits everything a case needs; only the case's index goes to it, and
only its result (manifest entry, inventory rows, record fields: small) comes back.

What stays as it is with one process:
- Outputs: a worker writes its case's files exactly as the main process would (one ``atomic.batch``:
  renamed only when the case succeeds); the main process writes the case record (the done marker) after
  that, the manifest, the report and the inventory, in case order.
- Failures: a case's exception is sent back and raised in the main process inside that case's record, so a
  refusal keeps its one-line reason and an unexpected error its type, message and (the worker's) traceback.
  A worker that dies (killed by the out-of-memory killer, a crash in a library) breaks the pool: the case
  being waited for is run again alone in a fresh process, and refused with a one-line reason if that
  process dies too; the other cases go on in a new pool.
- Log lines: a worker's log records are captured and emitted by the main process when it takes that
  case's result, so the log reads in case order whatever the order the workers finish in.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import sys
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from pipeline.errors import CaseError, InputError
from pipeline.torchrun import usable_cores  # noqa: F401 (re-exported for the ingest stage)

log = logging.getLogger("ctseg")

# estimated peak memory of one case per voxel of its image: the decoded stack, a resampled copy, the stored
# int16 copy and its NIfTI bytes, and the masks and label map with their bytes
CASE_BYTES_PER_VOXEL = 16

_WORK: dict[int, Callable[[int], Any]] = {}  # what each CaseProcesses runs, inherited by its forked workers
_captured: list[tuple[str, int, str]] = []  # a worker's log records of the current case: (logger, level, text)


def check_workers_setting(setting: int) -> None:
    if not isinstance(setting, int) or setting < 0:
        from pipeline.errors import ConfigError

        raise ConfigError(f"ingest.workers must be 0 (automatic) or a number of processes >= 1, got {setting}. "
                          f"Set --set ingest.workers=0.")


def choose_workers(setting: int, case_bytes: list[float], budget_bytes: float) -> int:
    """How many cases to ingest at once: ``setting`` when ≥ 1; for 0 one per core, as many as fit the budget.

    ``case_bytes``: the estimated peak memory of each case to do (0 when unknown).
    """
    check_workers_setting(setting)
    cases = len(case_bytes)
    if setting >= 1:
        return max(1, min(setting, cases))
    largest = max(case_bytes, default=0.0)
    fit = int(budget_bytes // largest) if largest > 0 else cases
    return max(1, min(usable_cores(), cases, fit))


class WorkerTraceback(Exception):
    """The traceback of an exception raised in a worker process, as text: the cause of its re-raise here."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


class WorkerRefusal(CaseError):
    """A case refused in a worker process: the same one-line reason ("case <id>: ..."), raised here."""

    def __init__(self, case_id: str, text: str):
        InputError.__init__(self, text)
        self.case_id = case_id


class _Capture(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        except Exception:  # noqa: BLE001 - a bad log call must not fail the case
            text = str(record.msg)
        _captured.append((record.name, record.levelno, text))


def fork_pool(processes: int, capture_logs: bool = False) -> ProcessPoolExecutor:
    """A pool of ``processes`` workers forked from this process (at its first submit) that die with it.

    ``capture_logs``: a worker's log records are kept for :func:`_run_in_worker` to return, not printed.
    """
    return ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("fork"),
                               initializer=_worker_start, initargs=(os.getpid(), capture_logs))


def _worker_start(parent: int, capture_logs: bool) -> None:
    """In each forked worker: it dies with the main process, and (``capture_logs``) its log records are captured.

    A worker that outlived a killed main process would go on writing its case's files while a rerun
    writes them too; with the parent-death signal it is killed with it (its unfinished files are
    ``.partial-`` files, removed by the rerun).
    """
    _die_with_parent()
    if os.getppid() != parent:  # the main process died before the signal was set up
        os._exit(1)
    if not capture_logs:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_Capture())


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG); elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _portable(exc: BaseException) -> BaseException:
    """``exc`` when it survives pickling (most do); else a RuntimeError with its type and message."""
    try:
        copy = pickle.loads(pickle.dumps(exc))
        if type(copy) is type(exc) and str(copy) == str(exc):
            return exc
    except Exception:  # noqa: BLE001 - an exception with a custom constructor, an unpicklable attribute
        pass
    return RuntimeError(f"{type(exc).__name__}: {exc}")


def _run_in_worker(key: int, index: int) -> tuple[tuple, list]:
    """Run one case in a worker: ((kind, ...), log records) with kind "ok", "refused" or "error"."""
    _captured.clear()
    try:
        outcome: tuple = ("ok", _WORK[key](index))
    except CaseError as exc:
        outcome = ("refused", getattr(exc, "case_id", ""), str(exc))
    except Exception as exc:  # noqa: BLE001 - raised again in the main process, inside the case's record
        outcome = ("error", _portable(exc), "".join(traceback.format_exception(exc)))
    records = list(_captured)
    _captured.clear()
    return outcome, records


class CaseProcesses:
    """``work(index)`` for each of ``indices`` in ``processes`` forked workers; :meth:`result` in any order.

    ``work`` runs in a worker with the state the main process had when the pool was made (fork): it must
    return something picklable. Make this with no other thread running (forking a threaded process can
    copy a lock that some thread holds); all workers are forked here, before it returns.
    """

    def __init__(self, work: Callable[[int], Any], indices: list[int], processes: int, describe: Callable[[int], str]):
        self.key = id(self)
        _WORK[self.key] = work
        self.processes = processes
        self.describe = describe  # a case's id, for the reason of a case whose worker died
        self.pool = self._pool(processes)
        self.futures: dict[int, Future] = {i: self.pool.submit(_run_in_worker, self.key, i) for i in indices}

    def __enter__(self) -> CaseProcesses:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(abort=exc_type is not None)

    def close(self, abort: bool = False) -> None:
        """Shut the workers down; ``abort`` (Ctrl-C, an error in the main process): stop them mid-case.

        A case stopped mid-way leaves only ``.partial-`` files (removed by the next run) and no case record.
        """
        for future in self.futures.values():
            future.cancel()
        self.futures = {}
        if self.pool is not None:
            if abort:
                for process in list((getattr(self.pool, "_processes", None) or {}).values()):
                    process.terminate()
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        _WORK.pop(self.key, None)

    @staticmethod
    def _pool(processes: int) -> ProcessPoolExecutor:
        return fork_pool(processes, capture_logs=True)

    def result(self, index: int) -> Any:
        """What ``work(index)`` returned; its exception raised here; its log records emitted here first."""
        future = self.futures.pop(index)
        try:
            outcome, records = future.result()
        except BrokenProcessPool:
            outcome, records = self._recover(index)
        for name, level, text in records:
            logging.getLogger(name).log(level, "%s", text)
        kind = outcome[0]
        if kind == "ok":
            return outcome[1]
        if kind == "refused":
            raise WorkerRefusal(outcome[1], outcome[2])
        raise outcome[1] from WorkerTraceback(outcome[2])

    def _recover(self, index: int) -> tuple[tuple, list]:
        """A worker died: run case ``index`` again alone, then the cases not yet taken in a new pool."""
        pending = sorted(self.futures)
        self.pool.shutdown(wait=True, cancel_futures=True)
        log.warning("ingest: a worker process stopped abruptly while case %s or another one was ingested; case %s "
                    "is ingested again on its own", self.describe(index), self.describe(index))
        solo = self._pool(1)
        try:
            outcome = solo.submit(_run_in_worker, self.key, index).result()
        except BrokenProcessPool:
            case_id = self.describe(index)
            outcome = (("refused", case_id,
                        f"case {case_id}: the worker process ingesting it stopped abruptly, twice (killed by the "
                        f"system, e.g. out of memory, or a crash in a library reading its files); the other cases "
                        f"were ingested. Check the case's files and the memory (ingest.workers, "
                        f"ingest.assembly.memory_budget_mb), then rerun."), [])
        finally:
            solo.shutdown(wait=True, cancel_futures=True)
        self.pool = self._pool(self.processes)
        self.futures = {i: self.pool.submit(_run_in_worker, self.key, i) for i in pending}
        return outcome
