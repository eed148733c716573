"""The predict stage: an overnight batch that segments every case, resumes after any crash, and reports.

``run_predict(cfg, model_dir, input_path, output_dir, shard=None, retry_failed=False)``:

1. Finds the cases under ``input_path`` (:mod:`pipeline.predict.cases`), sorted, and keeps this
   shard's share (``--shard i/n``, or torchrun's ``RANK``/``WORLD_SIZE``).
2. Opens the ledger ``<OUT>/ledger.sqlite`` (:mod:`pipeline.predict.ledger`) and removes partial
   files left by interrupted writes of cases no live process is working on.
3. Loads the model once, then for each case it may claim: reads it, prepares it onto the model
   grid, runs sliding-window inference (:mod:`pipeline.predict.inference`), takes the argmax and
   maps it back onto the source grid (:mod:`pipeline.predict.reassemble`), applies the clean-up the
   model folder decided on its cross-validation (``postprocessing.json``, :mod:`pipeline.postprocessing`;
   ``predict.postprocess.model_decision``) and the configured one per label, checks it against the
   model's training data and scores its confidence (:mod:`pipeline.predict.trust`), and writes every
   output atomically
   (:mod:`pipeline.predict.writers`). The outputs' SHA-256 go into the ledger. A case that fails
   (unreadable, not CT, out of memory, any error) is recorded as failed with its message and the
   batch moves on.
4. Writes ``report.json``, ``report.csv`` and ``report.html`` (:mod:`pipeline.predict.report`)
   covering every case of the input (all shards: the last shard to finish has the full picture);
   the CSV and HTML list the least trustworthy cases first, under a "needs review" count.

Exit code (``PredictResult.exit_code``): **0** when every case of this shard is done; **3** when at
least one failed (in this run or an earlier one not retried with ``--retry-failed``). Errors that
stop the whole batch (no model, no input, bad configuration) raise
:class:`~pipeline.errors.CtsegError` instead (exit 1 or 2 from the CLI).
"""
from __future__ import annotations

import datetime as _dt
import errno
import json
import logging
import os
import platform
import shutil
import socket
import sqlite3
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import atomic, devices
from pipeline.config import Config, stable_hash, to_dict
from pipeline.errors import CtsegError, InputError
from pipeline.geometry import Volume, voxel_volume_ml
from pipeline.postprocessing import apply_rules, decided_rules
from pipeline.predict import cases as case_io
from pipeline.predict import privacy, trust, writers
from pipeline.predict import report as reporting
from pipeline.predict.inference import WindowPredictor, sliding_window_predict
from pipeline.predict.ledger import Ledger, open_ledger, process_start_time, sha256_file
from pipeline.predict.model import Predictor, load_predictor, resolve_device
from pipeline.predict.reassemble import (
    check_label_names,
    classes_to_values,
    configured_rules,
    has_configured_cleanup,
    postprocess,
    probabilities_to_source,
    refined_to_source,
    to_source_grid,
)
from pipeline.progress import Progress
from pipeline.stage import REPORT_FILE, check_output_outside_inputs, report_header, versions

log = logging.getLogger("ctseg.predict")

EXIT_OK = 0
EXIT_SOME_FAILED = 3
COLOR_TABLE = "labels.ctbl"
LOG_FILE = "predict.log"
SHARED_FILES = ("report.json", "report.csv", "report.html", COLOR_TABLE)
# files of the folder itself, never a case's output even when a case id equals their stem
_NOT_CASE_FILES = frozenset(SHARED_FILES + (LOG_FILE, "config.yaml", "ledger.sqlite", "ledger.sqlite-wal",
                                            "ledger.sqlite-shm", "ledger.sqlite-journal"))
# settings that change speed or bookkeeping but not the written labels
_NOT_IN_HASH = ("batch_size", "batch_size_2d", "device", "memory", "stale_minutes", "shard_by", "refuse_implausible",
                "full_paths", "ledger_mode", "host_name", "take_stale", "send_to")


@dataclass
class PredictResult:
    """What ``ctseg predict`` returns: the report dict (also in report.json) and the exit code."""

    report: dict
    exit_code: int


def options_folds(spec: dict, cfg: Config) -> list[int]:
    """The fold numbers this batch ensembles: ``predict.folds``, or every fold of the model folder."""
    from pipeline.models.folder import fold_numbers

    every = fold_numbers(spec)
    return every if cfg.predict.folds is None else [f for f in every if f in set(cfg.predict.folds)]


def settings_hash(model_json_sha256: str, cfg: Config, postprocessing_sha256: str | None = None) -> str:
    """What the written labels depend on; ``postprocessing_sha256``: the decided clean-up applied, if any."""
    predict = {k: v for k, v in to_dict(cfg.predict).items() if k not in _NOT_IN_HASH}
    decided = {"postprocessing": postprocessing_sha256} if postprocessing_sha256 else {}
    return stable_hash({"model": model_json_sha256, "predict": predict, **decided})


def decided_postprocessing(predictor: Predictor, options) -> tuple[dict, dict]:
    """The model folder's decided clean-up as this batch applies it: (rules by label value, what provenance says).

    ``predict.postprocess.model_decision: auto`` applies ``postprocessing.json``; a label that the config gives
    its own component settings (keep_largest_component, min_component_ml) keeps those instead.
    """
    setting = options.postprocess.model_decision
    decision = predictor.postprocessing
    info: dict = {"model_decision": setting}
    if setting == "none":
        return {}, {**info, "decided": False, "reason": "predict.postprocess.model_decision is none"}
    if decision is None:
        return {}, {**info, "decided": False,
                    "reason": "the model folder has no postprocessing.json (trained before ctseg decided its "
                              "postprocessing, or with cross-validation folds still to train): no decided clean-up"}
    configured = configured_rules(options.postprocess, predictor.labels)
    value_of = {label.name: label.value for label in predictor.labels}
    rules, overridden = {}, []
    for name, rule in decided_rules(decision).items():
        if value_of[name] in configured:
            overridden.append(name)
        else:
            rules[value_of[name]] = rule
    return rules, {**info, "decided": True, "source": decision.get("source"), "cases": decision.get("cases"),
                   "created": decision.get("created"),
                   "rules": {name: entry.get("rule") for name, entry in decision["classes"].items()},
                   "dice": {name: {"without": entry.get("dice_without"), "with": entry.get("dice_with")}
                            for name, entry in decision["classes"].items()},
                   "overridden_by_config": overridden}


def run_predict(cfg: Config, model_dir: Path, input_path: Path, output_dir: Path,
                shard: tuple[int, int] | None = None, retry_failed: bool = False) -> PredictResult:
    """Segment every case of ``input_path`` into ``output_dir`` (see module docstring)."""
    from pipeline.models.folder import MODEL_FILE, read_model_spec

    started = time.time()
    wall = time.perf_counter()
    model_dir, input_path, output_dir = Path(model_dir), Path(input_path), Path(output_dir)
    spec = read_model_spec(model_dir)  # a bad model folder stops the batch before anything is written
    shard = case_io.resolve_shard(shard)
    device = resolve_device(cfg.predict.device)
    threads = devices.threads_per_process(None, devices.torchrun_env()[3])
    if threads:  # under torchrun only: each shard gets its share of the cores instead of torchrun's one thread
        torch.set_num_threads(threads)
    if device.type == "cuda":
        devices.configure_cuda_kernels(deterministic=False)  # every window has the model's patch size
    hide = not cfg.predict.full_paths
    check_output_outside_inputs(output_dir, [input_path])
    batch_redactor = privacy.input_redactor(input_path, hide)
    with _RunLog(batch_redactor) as run_log:
        try:
            discovery = case_io.discover_cases(input_path, cfg.ingest, cfg.workers)
        except InputError as exc:  # stderr and overnight logs get the message without the folder names
            raise InputError(batch_redactor(str(exc))) from (exc if not hide else None)
        check_output_outside_inputs(output_dir, discovery.folders)  # list entries are input folders too
        redactors = {case.case_id: privacy.case_redactor(case, input_path, hide) for case in discovery.cases}
        for redactor in redactors.values():
            batch_redactor.absorb(redactor)
        sources = {case.case_id: privacy.public_source(case, hide) for case in discovery.cases}
        output_dir.mkdir(parents=True, exist_ok=True)
        run_log.open_file(output_dir / LOG_FILE)
        try:
            if hide:
                privacy.write_private(output_dir, privacy.INPUTS_FILE, {
                    "input": str(input_path), "cases": {case.case_id: case.source for case in discovery.cases},
                    "skipped_inputs": discovery.skipped})
            ledger = open_ledger(output_dir, shard=f"{shard[0]}/{shard[1]}" if shard else "",
                                 stale_minutes=cfg.predict.stale_minutes, mode=cfg.predict.ledger_mode,
                                 host=cfg.predict.host_name, take_stale=cfg.predict.take_stale)
        except (OSError, sqlite3.Error) as exc:  # nothing can be recorded: one line, not a raw OperationalError
            if not disk_full(exc):
                raise
            raise CtsegError(f"predict: {disk_full_message(output_dir)} (nothing was started)") from None
        batch = None
        try:
            reset = ledger.reset_abandoned()
            if reset:
                log.info("predict: %d case(s) left running by a process that is gone are pending again", reset)
            removed = clean_partials(output_dir, ledger)
            if removed:
                log.info("predict: removed %d partial file(s) left by an interrupted run", removed)
            mine = case_io.select_shard(discovery.cases, shard, cfg.predict.shard_by)
            ledger.register([(case.case_id, sources[case.case_id]) for case in discovery.cases])
            run_hash = settings_hash(sha256_file(model_dir / MODEL_FILE), cfg, _decision_sha256(model_dir, cfg))
            batch = _Batch(cfg, model_dir, output_dir, device, run_hash, ledger, run_log)
            outcomes = {}
            with Progress(len(mine), "predict", unit="case") as progress:
                batch.progress = progress
                for case in mine:
                    outcomes[case.case_id] = batch.run_case(case, retry_failed, sources[case.case_id],
                                                            redactors[case.case_id])
                    progress.update()
                    if batch.stopped:
                        break
            mine_ids = {case.case_id for case in mine}
            # the live claims first, then the rows: an owner writes its final row before it drops its claim, so a
            # case that finishes in between is seen done, never as unfinished and unowned
            busy = ledger.running_elsewhere()
            rows = ledger.rows([case.case_id for case in discovery.cases])
            failed = [row.case_id for row in rows if row.case_id in mine_ids and row.status == "failed"]
            # a case of this shard left unfinished by a dead owner (a stale claim not taken over) is no success
            stuck = [] if batch.stopped else [
                row.case_id for row in rows if row.case_id in mine_ids and row.status in ("pending", "running")
                and row.case_id not in busy]
            if stuck:
                log.warning("predict: %d case(s) not finished, claimed by a process that stopped: %s; rerun with "
                            "--take-stale to take them over", len(stuck), ", ".join(stuck[:10]))
                failed += stuck
            skipped = batch_redactor.all(discovery.skipped)
            run = _RunInfo(cfg=cfg, spec=spec, model_dir=model_dir, output_dir=output_dir, shard=shard,
                           device=device, started=started, run_hash=run_hash,
                           input_label=str(input_path) if not hide else "<input> (see private/inputs.json)")
            report = _report(run, batch, rows, mine_ids=mine_ids, outcomes=outcomes, skipped=skipped,
                             seconds=time.perf_counter() - wall)
            report["ledger"] = ledger.describe()
            if batch.stopped:  # disk full: the cases not started stay pending for a plain rerun
                report.update(stopped=batch.stopped, status="failed", exit_code=EXIT_SOME_FAILED)
            if stuck:
                report.update(stuck_cases=stuck, status="failed", exit_code=EXIT_SOME_FAILED)
            legend = [(label["name"], label.get("color")) for label in spec.get("labels", [])] \
                if batch.predictor is None else [(info.name, info.color) for info in batch.predictor.labels]
            summary = {**trust.review_summary(rows),
                       **reporting.summary_block(rows, model_dir, str(device), time.perf_counter() - wall, skipped)}
            _write_reports(output_dir, report, rows, summary, legend)
        finally:
            ledger.close()
            if batch is not None:
                batch.reserve.release()
    exit_code = report["exit_code"]
    log.info("predict: %d case(s) in this shard, %d failed; report in %s", len(mine), len(failed),
             output_dir / "report.html")
    return PredictResult(report=report, exit_code=exit_code)


def _decision_sha256(model_dir: Path, cfg: Config) -> str | None:
    """SHA-256 of the postprocessing.json this batch applies (checked now: a bad one stops the batch at once)."""
    from pipeline.models.folder import POSTPROCESSING_FILE, read_model_spec, read_postprocessing

    if cfg.predict.postprocess.model_decision != "auto":
        return None
    if read_postprocessing(model_dir, read_model_spec(model_dir)) is None:
        return None
    return sha256_file(model_dir / POSTPROCESSING_FILE)


def _write_reports(output_dir: Path, report: dict, rows, summary: dict, legend: list[tuple[str, object]]) -> None:
    """report.json, report.csv and report.html, each on its own: a full disk loses only what does not fit."""
    label_names = [name for name, _ in legend]
    colors = [color for _, color in legend]
    rows = trust.review_order(rows)  # the CSV and HTML list the least trustworthy cases first
    writes = ((REPORT_FILE, lambda: atomic.write_json(output_dir / REPORT_FILE, report)),
              ("report.csv", lambda: reporting.write_csv(output_dir / "report.csv", rows, label_names)),
              ("report.html", lambda: reporting.write_html(output_dir / "report.html", output_dir, rows, summary,
                                                           label_names, colors)))
    for name, write in writes:
        try:
            write()
            continue
        except OSError as exc:
            if not disk_full(exc):
                raise
        # an earlier run's report must not stand in for this one: drop the old ones, then try again
        for old, _ in writes[list(dict(writes)).index(name):]:
            (output_dir / old).unlink(missing_ok=True)
        try:
            write()
        except OSError as exc:
            if not disk_full(exc):
                raise
            log.error("predict: %s not written: %s", name, disk_full_message(output_dir))


def disk_full(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) is the disk or quota being full, from the OS or from SQLite."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(exc, sqlite3.Error) and (getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
                                               or "disk is full" in str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_message(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free / 2 ** 20
    except OSError:
        free = 0.0
    return f"output disk full ({free:.0f} MB free); free space and rerun"


def clean_partials(folder: Path, ledger: Ledger) -> int:
    """Remove ``*.partial-*`` leftovers (files and case staging folders), except those a live process is writing."""
    busy_cases = ledger.running_elsewhere()
    others_alive = ledger.live_runs_elsewhere() > 0
    removed = 0
    for leftover in sorted(folder.rglob(f"*{atomic.PARTIAL_MARK}*"), key=lambda p: len(p.parts)):
        if privacy.PRIVATE_DIR in leftover.relative_to(folder).parts[:1]:
            continue
        target = leftover.name[1:].split(atomic.PARTIAL_MARK, 1)[0]
        if target in SHARED_FILES and others_alive:
            continue
        if target.split(".", 1)[0] in busy_cases:
            continue
        try:
            if leftover.is_dir():
                shutil.rmtree(leftover)
            elif leftover.is_file():
                leftover.unlink()
            else:
                continue
            removed += 1
        except FileNotFoundError:  # its writer finished meanwhile, or it was inside a removed staging folder
            pass
    return removed


def case_outputs(folder: Path, case_id: str) -> list[Path]:
    """Files under their final names that belong to ``case_id`` (``<case>.<suffix>``; ids have no dots)."""
    return [p for p in folder.glob(f"{case_id}.*")
            if p.is_file() and p.name.split(".", 1)[0] == case_id and p.name not in _NOT_CASE_FILES]


def publish(staging: Path, folder: Path, case_id: str) -> None:
    """Move a case's finished outputs from its staging folder into place, all together, then drop the folder.

    Earlier outputs of the case that this run did not write are removed first, so the folder never
    mixes two runs' files of one case. Renames within one file system cannot fail for lack of space.
    """
    new = {p.name for p in staging.iterdir()}
    for old in case_outputs(folder, case_id):
        if old.name not in new:
            old.unlink()
    for name in sorted(new):
        os.replace(staging / name, folder / name)
    staging.rmdir()


def withdraw(folder: Path, case_id: str, staging: Path | None) -> None:
    """Remove everything an unfinished case left: its staging folder and any of its final-named outputs."""
    if staging is not None and staging.exists():
        shutil.rmtree(staging, ignore_errors=True)
    for path in case_outputs(folder, case_id):
        try:
            path.unlink()
        except OSError:
            pass


class _Reserve:
    """A small file kept free for the ledger: released on a full disk so the case's failure can still be recorded."""

    SIZE = 256 * 1024
    PREFIX = ".ctseg-reserve-"

    def __init__(self, folder: Path):
        host = socket.gethostname()
        for stale in folder.glob(f"{self.PREFIX}{host}-*"):  # left by a killed run on this host
            pid = stale.name.rsplit("-", 1)[-1]
            if pid.isdigit() and process_start_time(int(pid)) is None:
                stale.unlink(missing_ok=True)
        self.path: Path | None = folder / f"{self.PREFIX}{host}-{os.getpid()}"
        try:
            with open(self.path, "wb") as handle:
                handle.write(b"\0" * self.SIZE)
        except OSError:
            self.release()

    def release(self) -> bool:
        """Free the reserve; False when there was none left to free."""
        if self.path is None:
            return False
        self.path.unlink(missing_ok=True)
        self.path = None
        return True


class _QuietFileHandler(logging.FileHandler):
    """A log file that never disturbs the batch: a full disk drops log lines instead of raising."""

    def handleError(self, record) -> None:
        pass


class _RunLog:
    """The run's log: redaction of every ctseg log record, and ``<OUT>/predict.log`` with tracebacks."""

    def __init__(self, redactor: privacy.Redactor):
        self.filter = privacy.RedactingFilter(redactor)
        self.handler: logging.Handler | None = None
        self._filtered: list[logging.Handler] = []

    def __enter__(self) -> _RunLog:
        for handler in logging.getLogger().handlers:
            handler.addFilter(self.filter)
            self._filtered.append(handler)
        return self

    def open_file(self, path: Path) -> None:
        handler = _QuietFileHandler(path, mode="a", encoding="utf-8", delay=True)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler.setLevel(logging.INFO)
        handler.addFilter(self.filter)
        logging.getLogger("ctseg").addHandler(handler)
        self.handler = handler

    def traceback(self, case_id: str, text: str) -> None:
        """A failed case's traceback: always into the log file; on stderr only with --debug (debug level)."""
        log.debug("predict: %s traceback:\n%s", case_id, text)
        if self.handler is not None:
            record = logging.LogRecord("ctseg.predict", logging.ERROR, __file__, 0, "predict: %s traceback:\n%s",
                                       (case_id, text), None)
            if self.filter.filter(record):
                self.handler.handle(record)

    def __exit__(self, *exc) -> None:
        for handler in self._filtered:
            handler.removeFilter(self.filter)
        if self.handler is not None:
            logging.getLogger("ctseg").removeHandler(self.handler)
            try:
                self.handler.close()
            except OSError:  # a full disk: the last lines are lost, the batch's outcome is not
                pass


class _Batch:
    """The model and per-batch state; runs one case at a time."""

    def __init__(self, cfg: Config, model_dir: Path, output_dir: Path, device: torch.device, run_hash: str,
                 ledger: Ledger, run_log: _RunLog | None = None):
        self.cfg = cfg
        self.model_dir = model_dir
        self.output_dir = output_dir
        self.device = device
        self.run_hash = run_hash
        self.ledger = ledger
        self.run_log = run_log
        self.predictor: Predictor | None = None
        self.window_predictor: WindowPredictor | None = None
        self.model_seconds = 0.0
        self.stopped: str | None = None  # why the batch stopped early (disk full)
        self.reserve = _Reserve(output_dir)
        self.progress: Progress | None = None  # the batch's k/N display, set by run_predict

    def _at(self) -> str:
        return f"{self.progress.prefix()} " if self.progress is not None else ""

    def _load(self) -> None:
        start = time.perf_counter()
        options = self.cfg.predict
        devices.bind(self.device)  # this runs in a worker thread, and the current CUDA device is per thread
        self.predictor = load_predictor(self.model_dir, self.device, optimize=options.optimize_network,
                                        folds=options.folds, memory_budget_gb=options.memory.network_budget_gb)
        check_label_names(options.postprocess, [info.name for info in self.predictor.labels])
        reporting.volume_ranges(options.report)
        self.window_predictor = WindowPredictor(self.predictor, options.precision, options.tta, options.tta_axes)
        if self.device.type == "cuda":
            self.predictor.optimisation["activation_bytes"] = _measure_activations(self.predictor,
                                                                                   self.window_predictor, options)
        writers.write_color_table(self.predictor.labels, self.output_dir / COLOR_TABLE)
        self.model_seconds = round(time.perf_counter() - start, 3)
        log.info("predict: model %s loaded on %s in %.1f s (%d fold(s); %s)", self.model_dir, self.device,
                 self.model_seconds, len(self.predictor.networks),
                 ", ".join(self.predictor.optimisation.get("applied", [])) or "as trained")

    def run_case(self, case: case_io.Case, retry_failed: bool, source: str | None = None,
                 redact: privacy.Redactor | None = None) -> str:
        """Claim, predict, publish and record one case; any error inside the case fails that case only."""
        source = case.source if source is None else source
        redact = redact or privacy.Redactor(enabled=False)
        try:
            taken, why = self._ledger_write(self.ledger.claim, case.case_id, source, self.run_hash, retry_failed)
        except sqlite3.Error as exc:
            if not disk_full(exc):
                raise
            self.stopped = f"case {case.case_id} and later ones not started: {disk_full_message(self.output_dir)}"
            log.error("predict: %s", self.stopped)
            return "not started"
        if not taken:
            log.info("%s%s: skipped, %s", self._at(), case.case_id, why)
            return why
        if why not in ("new", "pending"):  # a first try needs no explanation; a redo does
            log.info("%s%s: %s", self._at(), case.case_id, why)
        start = time.perf_counter()
        staging: Path | None = None
        try:
            image, read_error, read_seconds = self._read_while_loading(case)
            try:
                if read_error is not None:
                    raise read_error
                withdraw(self.output_dir, case.case_id, None)  # an earlier run's outputs are not this run's
                staging = Path(tempfile.mkdtemp(prefix=f".{case.case_id}{atomic.PARTIAL_MARK}", dir=self.output_dir))
                outputs, summary, warnings, timings = predict_case(
                    case, self.predictor, self.window_predictor, self.cfg, staging, self.run_hash,
                    image=image, load_seconds=read_seconds, source=source, redact=redact)
                publish(staging, self.output_dir, case.case_id)
                self._ledger_write(self.ledger.finish, case.case_id, "done", seconds=time.perf_counter() - start,
                                   timings=timings,
                                   outputs=outputs, warnings=warnings, summary=summary)
            except Exception as exc:  # one bad case must not end the night; the error is recorded
                withdraw(self.output_dir, case.case_id, staging)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                return self._fail(case, exc, redact, time.perf_counter() - start)
        except BaseException:  # Ctrl-C, or the model itself cannot be loaded: hand the case back, stop the batch
            withdraw(self.output_dir, case.case_id, staging)
            try:
                self.ledger.release(case.case_id)
            except sqlite3.Error:
                pass
            raise
        count = len(warnings)
        log.info("%s%s: done in %.1f s%s", self._at(), case.case_id, time.perf_counter() - start,
                 f" ({count} warning{'s' if count != 1 else ''})" if count else "")
        return "done"

    def _fail(self, case: case_io.Case, exc: Exception, redact: privacy.Redactor, seconds: float) -> str:
        full = disk_full(exc)
        message = redact(f"case {case.case_id}: {disk_full_message(self.output_dir)}" if full
                         else _describe_failure(case, exc))
        trace = None
        if full or not isinstance(exc, CtsegError):  # an unexpected error leaves its traceback behind
            trace = redact("".join(traceback.format_exception(exc)))
        log.error("%s%s: failed: %s", self._at(), case.case_id, message)
        if trace and self.run_log is not None:
            self.run_log.traceback(case.case_id, trace)
        if full:  # later cases would fail the same way: they stay pending for a plain rerun
            self.stopped = f"stopped after case {case.case_id}: {disk_full_message(self.output_dir)}"
        try:
            self._ledger_write(self.ledger.finish, case.case_id, "failed", error=message, seconds=seconds,
                               traceback=trace, retryable=full)
        except sqlite3.Error as ledger_exc:
            if not disk_full(ledger_exc):
                raise
            try:  # not even the failure fits: the case goes back to pending rather than staying "running"
                self.ledger.release(case.case_id)
            except sqlite3.Error:
                pass
            self.stopped = f"the ledger cannot be written: {disk_full_message(self.output_dir)}"
            log.error("predict: stopping the batch: %s", self.stopped)
        return "failed"

    def _ledger_write(self, write, *args, **kwargs):
        """A ledger change; on a full disk the reserve is freed and the change tried once more."""
        try:
            return write(*args, **kwargs)
        except sqlite3.Error as exc:
            if not disk_full(exc) or not self.reserve.release():
                raise
            log.warning("predict: output disk full; released the ledger's reserve to record the outcome")
            return write(*args, **kwargs)

    def _read_while_loading(self, case: case_io.Case):
        """Read the case; the first time, load the model meanwhile in a second thread (both mostly release the GIL)."""
        with ThreadPoolExecutor(max_workers=1) as pool:
            loading = pool.submit(self._load) if self.predictor is None else None
            clock = time.perf_counter()
            image, error = None, None
            try:
                image = case_io.read_case(case, self.cfg.ingest, self.cfg.predict.refuse_implausible)
            except Exception as exc:  # reported with the case once the model is known to be fine
                error = exc
            seconds = round(time.perf_counter() - clock, 3)
            if loading is not None:
                loading.result()  # a model that cannot be loaded stops the batch (raised to run_case's caller)
        return image, error, seconds


def _describe_failure(case: case_io.Case, exc: Exception) -> str:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return (f"case {case.case_id}: out of memory during prediction ({type(exc).__name__}). Lower "
                f"predict.batch_size, set predict.memory.stitch: streaming, or run this case on a larger machine.")
    if isinstance(exc, CtsegError):
        text = str(exc)
        return text if text.startswith(f"case {case.case_id}") else f"case {case.case_id}: {text}"
    first_line = (str(exc).splitlines() or [""])[0]
    return (f"case {case.case_id}: unexpected {type(exc).__name__}: {first_line} (traceback in predict.log and the "
            f"ledger)")


def _measure_activations(predictor: Predictor, window_predictor: WindowPredictor, options) -> int:
    """Peak GPU memory of one batch of windows, so the memory plan can reserve it."""
    from pipeline.predict.inference import network_input

    batch = options.batch_size_2d if predictor.mode == "2d" else options.batch_size
    roi = network_input(np.zeros((1, 1, 1), dtype=np.float32), predictor)[1]
    sample = torch.zeros((batch, predictor.in_channels, *roi), device=predictor.device)
    torch.cuda.synchronize(predictor.device)
    before = torch.cuda.memory_allocated(predictor.device)
    torch.cuda.reset_peak_memory_stats(predictor.device)
    with torch.inference_mode():
        window_predictor(sample)
    peak = torch.cuda.max_memory_allocated(predictor.device)
    del sample
    # hand the measured peak back: the plan reserves it once as activations, and must not also find it
    # missing from the free memory (pipeline.devices.cuda_free_bytes counts cached blocks as free anyway)
    torch.cuda.empty_cache()
    return int(peak - before)


# ---------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------

def predict_case(case: case_io.Case, predictor: Predictor, window_predictor: WindowPredictor, cfg: Config,
                 output_dir: Path, run_hash: str, image: case_io.SourceImage | None = None,
                 load_seconds: float | None = None, source: str | None = None,
                 redact: privacy.Redactor | None = None) -> tuple[dict, dict, list[str], dict]:
    """Segment one case and write its outputs; returns (outputs with checksums, summary, warnings, timings).

    ``image``: the case already read (then ``load_seconds`` is how long that took). ``source``: how
    provenance names the input (default ``case.source``); ``redact``: applied to warnings and
    provenance (see :mod:`pipeline.predict.privacy`).
    """
    from pipeline.preprocess.transform import prepare_image

    options = cfg.predict
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    total_start = clock
    if image is None:
        image = case_io.read_case(case, cfg.ingest, options.refuse_implausible)
        lap("load")
    else:
        timings["load"] = load_seconds if load_seconds is not None else 0.0
        total_start -= timings["load"]
    redact = redact or privacy.Redactor(enabled=False)
    fit_warnings = check_model_fit(image.volume, case, predictor, options)
    source_grid = image.volume.grid
    working, transposed = memory_order_view(image.volume)
    prepared = prepare_image(working, predictor.plan, predictor.crop_align)
    lap("prepare")
    need_probabilities = options.outputs.probabilities != "none"
    agreement = trust.MemberAgreement.attach(window_predictor) if options.trust.enabled else None
    try:
        result = sliding_window_predict(prepared.array, predictor, options, need_probabilities, window_predictor,
                                        prefer_probabilities=options.reassembly != "nearest")
    finally:
        if agreement is not None:
            agreement.detach()
    lap("infer")
    if result.probabilities is not None and options.reassembly != "nearest":
        labels, reassembly = refined_to_source(result.probabilities, result.classes, prepared.grid, working.grid,
                                               predictor.class_values)
    else:
        labels_model = classes_to_values(result.classes, predictor.class_values)
        labels = to_source_grid(labels_model, prepared.grid, working.grid)
        reassembly = {"method": "nearest"}
        if options.reassembly == "refined":
            reassembly["note"] = "probabilities did not fit the memory budget: nearest used"
    if transposed:
        labels = labels.T  # back to the source's [i, j, k] axes (a view; NIfTI writes it without a copy)
    lap("reassemble")
    rules, decided = decided_postprocessing(predictor, options)
    kept_sizes: dict = {}  # components the clean-up left, per ruled class: the trust step's counts
    decided["applied"] = apply_rules(labels, voxel_volume_ml(source_grid), rules,
                                     {info.value: info.name for info in predictor.labels}, kept_sizes)
    notes = [record["note"] for record in decided["applied"]]
    if has_configured_cleanup(options.postprocess):
        kept_sizes = {}  # the configured clean-up may change components again: the trust step counts them
    notes += postprocess(labels, source_grid, predictor.labels, options.postprocess)
    lap("postprocess")
    volumes, label_warnings = reporting.label_statistics(labels, source_grid, predictor.labels, options.report)
    warnings = redact.all(list(image.warnings) + fit_warnings + label_warnings)
    lap("statistics")
    assessment = None
    if options.trust.enabled:
        assessment = trust.assess_case(image.volume.array, labels, source_grid, volumes, predictor.labels,
                                       predictor.training_fingerprint, result.probabilities, result.classes,
                                       agreement, options.trust, kept_sizes)
        warnings += trust.warnings_for(assessment)
    lap("trust")

    paths: dict[str, Path] = {}
    base = output_dir / case.case_id
    outputs = options.outputs
    paths["labels"] = writers.write_label_nifti(labels, source_grid, Path(f"{base}.nii.gz"), outputs.compresslevel)
    if outputs.seg_nrrd:
        paths["slicer"] = writers.write_seg_nrrd(labels, source_grid, predictor.labels, Path(f"{base}.seg.nrrd"),
                                                 outputs.compresslevel, outputs.seg_nrrd_closed_surface)
    # the DICOM objects that reference the source series: each written, or not written with the reason named
    dicom_seg = _dicom_object("DICOM SEG", outputs.dicom_seg, case, Path(f"{base}.seg.dcm"), "dicom_seg", paths,
                              warnings, lambda path: writers.write_dicom_seg(
                                  labels, source_grid, predictor.labels, case.series, path, case.case_id,
                                  _ctseg_version(), outputs.dicom_seg_type))
    rtstruct = _dicom_object("RTSTRUCT", outputs.rtstruct, case, Path(f"{base}.rtstruct.dcm"), "rtstruct", paths,
                             warnings, lambda path: writers.write_case_rtstruct(
                                 labels, source_grid, predictor.labels, case.series, path, case.case_id,
                                 _ctseg_version(), outputs.rtstruct_holes))
    if need_probabilities:
        probabilities, grid = result.probabilities, prepared.grid
        if outputs.probabilities_grid == "source":
            probabilities, grid = probabilities_to_source(probabilities, prepared.grid, source_grid), source_grid
        suffix = ".probabilities.nii.gz" if outputs.probabilities == "nifti" else ".probabilities.npz"
        names = ["background"] + [info.name for info in predictor.labels]
        paths["probabilities"] = writers.write_probabilities(probabilities, grid, names, Path(f"{base}{suffix}"),
                                                             outputs.probabilities, outputs.compresslevel)
    if outputs.thumbnails:
        paths["thumbnail"] = reporting.write_thumbnail(image.volume.array, labels, source_grid, predictor.labels,
                                                       Path(f"{base}.thumb.png"), title=case.case_id)
    relative = {name: path.name for name, path in paths.items()}
    writers.write_label_sidecar(Path(f"{base}.labels.json"), predictor.labels, volumes, source_grid, relative)
    paths["sidecar"] = Path(f"{base}.labels.json")
    lap("write")
    timings["total"] = round(time.perf_counter() - total_start, 3)
    provenance = {
        "case_id": case.case_id,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "input": case.source if source is None else source,
        "input_info": json.loads(redact(json.dumps(_anonymous_info(image.info), default=str))),
        "model": {"folder": str(predictor.folder), "model_json_sha256": predictor.spec_sha256,
                  "mode": predictor.mode, "patch_size": list(predictor.patch_size),
                  "network": predictor.spec["network"].get("name"),
                  "folds": options_folds(predictor.spec, cfg),
                  "plan": predictor.plan, "inference_rewrites": predictor.optimisation},
        "settings_hash": run_hash,
        "config": {"predict": to_dict(options)},
        "device": str(predictor.device),
        "host": platform.node(),
        "versions": versions(),
        "source_grid": source_grid.to_json(),
        "model_grid": prepared.grid.to_json(),
        "memory_plan": result.plan.to_json(),
        "reassembly": reassembly,
        "inference": result.stats,
        "timings_s": timings,
        "postprocess": notes,
        "postprocessing": decided,
        "dicom_seg": dicom_seg,
        "rtstruct": rtstruct,
        "warnings": warnings,
        "trust": assessment.to_json() if assessment else None,
        "outputs": relative,
    }
    paths["provenance"] = writers.write_provenance(Path(f"{base}.provenance.json"), provenance)
    checksums = {name: {"path": path.name, "sha256": sha256_file(path)} for name, path in paths.items()}
    summary = {"volumes": volumes, "postprocess": notes, "postprocessing": _applied_summary(decided),
               "memory_plan": result.plan.mode,
               "windows": result.stats["windows"], "reassembly": reassembly["method"],
               "trust": assessment.to_json() if assessment else None}
    return checksums, summary, warnings, timings


def _applied_summary(decided: dict) -> dict:
    """What the ledger and report.json keep of a case's decided clean-up."""
    return {"decided": decided.get("decided"), "model_decision": decided.get("model_decision"),
            "applied": [{k: record[k] for k in ("label", "components", "removed", "removed_ml", "note")}
                        for record in decided.get("applied", [])]}


def check_model_fit(volume: Volume, case: case_io.Case, predictor: Predictor, options) -> list[str]:
    """Refuse (or, with ``predict.refuse_implausible: false``, warn about) a volume the model cannot segment.

    Fewer than ``predict.min_slices`` slices, for a 3D model a volume shorter along the body axis
    than ``predict.min_patch_coverage`` of the model's patch (the network would see mostly padding,
    as with a 3D model on a single slice), or an extent beyond ``predict.max_extent_mm`` along any
    axis (spacing in the wrong unit, a damaged header). A volume whose model grid would not fit the
    available memory is refused whatever the setting, with the size it would need: never a MemoryError.
    """
    from pipeline.geometry import canonical_grid
    from pipeline.predict.inference import available_ram_bytes
    from pipeline.preprocess.transform import resampled_grid

    problems = []
    extent_mm = np.asarray(volume.grid.shape, dtype=float) * volume.grid.spacing
    if float(extent_mm.max()) > options.max_extent_mm:
        problems.append(f"its extent {' x '.join(f'{e:.0f}' for e in extent_mm)} mm exceeds predict.max_extent_mm "
                        f"({options.max_extent_mm:g} mm) along an axis")
    slices = int(volume.array.shape[2])
    if slices < options.min_slices:
        problems.append(f"{slices} slice(s), fewer than predict.min_slices ({options.min_slices})")
    if predictor.mode == "3d" and predictor.plan.get("target_spacing"):
        canon = canonical_grid(volume.grid)
        extent = float(canon.shape[2] * canon.spacing[2])
        needed = float(predictor.patch_size[2] * float(predictor.plan["target_spacing"][2]))
        if extent < options.min_patch_coverage * needed:
            problems.append(f"it spans {extent:.1f} mm along the body axis, less than predict.min_patch_coverage "
                            f"({options.min_patch_coverage:g}) of the 3D model's patch ({needed:.0f} mm)")
    if problems and options.refuse_implausible:
        raise InputError(f"{case.source} must be a volume the model can segment, got: {'; '.join(problems)}. Use a "
                         f"model trained for such scans, or set predict.refuse_implausible: false to segment it "
                         f"anyway (named in the case's warnings).")
    if predictor.plan.get("target_spacing"):
        shape = resampled_grid(volume.grid, predictor.plan).shape
        # the model-grid image in float32, its resampling temporaries and the class map: ~12 bytes a voxel
        need, have = float(np.prod(np.asarray(shape, dtype=float))) * 12.0, float(available_ram_bytes())
        if need > have:
            raise InputError(f"{case.source} must fit in memory on the model grid, got a grid of "
                             f"{' x '.join(str(s) for s in shape)} voxels needing about {need / 1e9:.1f} GB, more "
                             f"than the {have / 1e9:.1f} GB available. Check the file's voxel spacing, or run this "
                             f"case on a larger machine.")
    return [f"segmented although implausible for the model: {problem}" for problem in problems]


def memory_order_view(volume: Volume) -> tuple[Volume, bool]:
    """The same voxels with the array's axes in memory order (a view), and whether axes were reversed.

    NIfTI and DICOM volumes arrive Fortran-ordered ([i, j, k] with i fastest). Resampling gathers
    along each axis and is many times faster on a C-ordered array, so a Fortran-ordered volume is
    handed on as its transpose ``[k, j, i]`` with the affine's columns reversed: the same grid in
    world space, so the model grid it leads to is the same.
    """
    array = volume.array
    if array.flags.c_contiguous or not array.flags.f_contiguous:
        return volume, False
    affine = volume.affine.copy()
    affine[:, :3] = volume.affine[:, [2, 1, 0]]
    return Volume(array.T, affine), True


def _anonymous_info(info: dict) -> dict:
    """Input details without UIDs or anything that could identify the patient."""
    dicom = info.get("dicom")
    if not dicom:
        return info
    hidden = ("study_instance_uid", "series_instance_uid", "frame_of_reference_uid")
    return {"dicom": {k: v for k, v in dicom.items() if k not in hidden}}


def _dicom_object(kind: str, wanted: bool, case: case_io.Case, path: Path, name: str, paths: dict[str, Path],
                  warnings: list[str], write) -> dict | None:
    """Write one DICOM object of a case (``write(path)`` returns its summary); a refusal is a warning, not a failure.

    Returns the summary for the provenance (None when the output is off): ``written`` and, when not written, the
    reason (not DICOM input, a tilt-corrected grid, a missing UID, ...); corrections it made are named as warnings.
    """
    if not wanted:
        return None
    if not case.is_dicom:
        return {"written": False, "reason": "input is not DICOM"}
    try:
        summary = write(path)
    except CtsegError as exc:
        warnings.append(f"{kind} not written: {exc}")
        return {"written": False, "reason": str(exc)}
    if summary.get("written"):
        paths[name] = path
    warnings.extend(f"{kind}: {note}" for note in summary.get("corrected", []))
    return summary


def _ctseg_version() -> str:
    from pipeline import __version__

    return __version__


@dataclass
class _RunInfo:
    """What one predict run is: settings, model, folders, shard and device (the fixed part of its report)."""

    cfg: Config
    spec: dict
    model_dir: Path
    output_dir: Path
    input_label: str  # the input as the report may name it (no folder names unless predict.full_paths)
    shard: tuple[int, int] | None
    device: torch.device
    started: float
    run_hash: str


def _report(run: _RunInfo, batch: _Batch, rows, *, mine_ids: set[str], outcomes: dict[str, str],
            skipped: list[str], seconds: float) -> dict:
    mine_rows = [row for row in rows if row.case_id in mine_ids]
    failed_mine = [row for row in mine_rows if row.status == "failed"]
    return {
        **report_header("predict", run.output_dir, run.run_hash, bool(failed_mine), run.started, seconds,
                        str(run.device)),
        "exit_code": EXIT_SOME_FAILED if failed_mine else EXIT_OK,
        "precision": batch.window_predictor.precision.to_json() if batch.window_predictor else None,
        "model": {"folder": str(run.model_dir), "mode": run.spec.get("mode"),
                  "network": run.spec["network"].get("name"), "folds": options_folds(run.spec, run.cfg),
                  "postprocessing": decided_postprocessing(batch.predictor, run.cfg.predict)[1]
                  if batch.predictor else None,
                  "load_seconds": batch.model_seconds,
                  "inference_rewrites": batch.predictor.optimisation if batch.predictor else None},
        "input": run.input_label,
        "shard": list(run.shard) if run.shard else None,
        "counts": {
            **_batch_counts(rows),
            "this_shard": len(mine_rows),
            "done_this_run": sum(outcome == "done" for outcome in outcomes.values()),
            "failed_this_run": sum(outcome == "failed" for outcome in outcomes.values()),
            "resumed": sum(outcome.startswith("done (") for outcome in outcomes.values()),
        },
        "skipped_inputs": skipped,
        "cases": _case_entries(rows),
        "needs_review": [row.case_id for row in trust.review_order(rows) if trust.case_trust(row).get("needs_review")],
    }


def _batch_counts(rows) -> dict:
    return {"cases": len(rows), "ok": sum(row.status == "done" for row in rows),
            "failed": sum(row.status == "failed" for row in rows),
            "not_finished": sum(row.status in ("pending", "running") for row in rows)}


def _case_entries(rows) -> list[dict]:
    return [{"id": row.case_id, "status": "ok" if row.status == "done" else row.status, "input": row.input,
             "error": row.error, "warnings": row.warnings, "seconds": row.seconds, "attempts": row.attempts,
             "shard": row.shard, "timings": row.timings, **({"traceback": row.traceback} if row.traceback else {}),
             "outputs": {name: entry["path"] for name, entry in row.outputs.items()},
             "volumes_ml": {name: v.get("volume_ml") for name, v in row.summary.get("volumes", {}).items()},
             "postprocess": row.summary.get("postprocess"),
             "postprocessing": row.summary.get("postprocessing"),
             "trust": trust.case_trust(row) or None}
            for row in rows]


def rewrite_report(output_dir: Path) -> dict:
    """``ctseg predict --report-only OUT``: the batch report (json, csv, html) again, from every ledger of OUT.

    Shards each write the merged report when they finish, so the last one's is complete; this rebuilds it at any
    time (after a shard died, or while others still run) without loading a model or reading an image.
    """
    from pipeline.models.folder import read_model_spec
    from pipeline.predict.ledger import has_ledger, read_case_rows

    output_dir = Path(output_dir)
    if not has_ledger(output_dir):
        raise InputError(f"{output_dir} must hold a predict ledger (ledger.sqlite or ledger/*.sqlite), got none. "
                         f"Give the --output folder of a 'ctseg predict' run.")
    previous_path = output_dir / REPORT_FILE
    report = json.loads(previous_path.read_text(encoding="utf-8")) if previous_path.is_file() else {"stage": "predict"}
    rows = read_case_rows(output_dir)
    model_dir = Path(report.get("model", {}).get("folder", ""))
    try:
        legend = [(label["name"], label.get("color")) for label in read_model_spec(model_dir).get("labels", [])]
    except Exception:  # the model folder moved: name the volumes as the rows do
        legend = [(name, None) for name in sorted({name for row in rows for name in row.summary.get("volumes", {})})]
    failed = [row for row in rows if row.status == "failed"]
    report.update({"folder": str(output_dir), "status": "failed" if failed else "ok",
                   "exit_code": EXIT_SOME_FAILED if failed else EXIT_OK, "counts": _batch_counts(rows),
                   "cases": _case_entries(rows),
                   "needs_review": [row.case_id for row in trust.review_order(rows)
                                    if trust.case_trust(row).get("needs_review")],
                   "rewritten": _dt.datetime.now().isoformat(timespec="seconds")})
    summary = {**trust.review_summary(rows), **reporting.summary_block(
        rows, model_dir, str(report.get("device", "")), 0.0, report.get("skipped_inputs"))}
    _write_reports(output_dir, report, rows, summary, legend)
    return report
