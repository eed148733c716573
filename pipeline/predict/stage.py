"""The predict stage: an overnight batch that segments every case, resumes after any crash, and reports.

``run_predict(cfg, model_dir, input_path, output_dir, shard=None, retry_failed=False)``:

1. Finds the cases under ``input_path`` (:mod:`pipeline.predict.cases`), sorted, and keeps this
   shard's share (``--shard i/n``, or torchrun's ``RANK``/``WORLD_SIZE``).
2. Opens the ledger ``<OUT>/ledger.sqlite`` (:mod:`pipeline.predict.ledger`) and removes partial
   files left by interrupted writes of cases no live process is working on.
3. Loads the model once, then for each case it may claim: reads it, prepares it onto the model
   grid, runs sliding-window inference (:mod:`pipeline.predict.inference`), takes the argmax and
   maps it back onto the source grid (:mod:`pipeline.predict.reassemble`), optionally cleans it per
   label, checks it against the model's training data and scores its confidence
   (:mod:`pipeline.predict.trust`), and writes every output atomically
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
import hashlib
import json
import logging
import platform
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pipeline import atomic
from pipeline.config import Config, to_dict
from pipeline.errors import CtsegError
from pipeline.geometry import Volume
from pipeline.predict import cases as case_io
from pipeline.predict import report as reporting
from pipeline.predict import trust
from pipeline.predict import writers
from pipeline.predict.inference import WindowPredictor, sliding_window_predict
from pipeline.predict.ledger import Ledger, sha256_file
from pipeline.predict.model import Predictor, load_predictor, resolve_device
from pipeline.predict.reassemble import (check_label_names, classes_to_values, postprocess, probabilities_to_source,
                                         refined_to_source, to_source_grid)
from pipeline.stage import REPORT_FILE, versions

log = logging.getLogger("ctseg.predict")

EXIT_OK = 0
EXIT_SOME_FAILED = 3
COLOR_TABLE = "labels.ctbl"
SHARED_FILES = ("report.json", "report.csv", "report.html", COLOR_TABLE)
# settings that change speed or bookkeeping but not the written labels
_NOT_IN_HASH = ("batch_size", "batch_size_2d", "device", "memory", "stale_minutes", "shard_by", "refuse_implausible")


@dataclass
class PredictResult:
    """What ``ctseg predict`` returns: the report dict (also in report.json) and the exit code."""

    report: dict
    exit_code: int


def options_folds(spec: dict, cfg: Config) -> list[int]:
    """The fold numbers this batch ensembles: ``predict.folds``, or every fold of the model folder."""
    from pipeline.models.loader import fold_numbers

    every = fold_numbers(spec)
    return every if cfg.predict.folds is None else [f for f in every if f in set(cfg.predict.folds)]


def settings_hash(model_json_sha256: str, cfg: Config) -> str:
    predict = {k: v for k, v in to_dict(cfg.predict).items() if k not in _NOT_IN_HASH}
    text = json.dumps({"model": model_json_sha256, "predict": predict}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def run_predict(cfg: Config, model_dir: Path, input_path: Path, output_dir: Path,
                shard: Optional[tuple[int, int]] = None, retry_failed: bool = False) -> PredictResult:
    """Segment every case of ``input_path`` into ``output_dir`` (see module docstring)."""
    from pipeline.models.loader import MODEL_FILE, read_model_spec

    started = time.time()
    wall = time.perf_counter()
    model_dir, input_path, output_dir = Path(model_dir), Path(input_path), Path(output_dir)
    spec = read_model_spec(model_dir)  # a bad model folder stops the batch before anything is written
    shard = case_io.resolve_shard(shard)
    device = resolve_device(cfg.predict.device)
    output_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(output_dir, shard=f"{shard[0]}/{shard[1]}" if shard else "",
                    stale_minutes=cfg.predict.stale_minutes)
    try:
        removed = clean_partials(output_dir, ledger)
        if removed:
            log.info("predict: removed %d partial file(s) left by an interrupted run", removed)
        discovery = case_io.discover_cases(input_path, cfg.ingest, cfg.workers)
        mine = case_io.select_shard(discovery.cases, shard, cfg.predict.shard_by)
        ledger.register([(case.case_id, case.source) for case in discovery.cases])
        run_hash = settings_hash(sha256_file(model_dir / MODEL_FILE), cfg)
        batch = _Batch(cfg, model_dir, output_dir, device, run_hash, ledger)
        outcomes = {}
        for case in mine:
            outcomes[case.case_id] = batch.run_case(case, retry_failed)
        rows = ledger.rows([case.case_id for case in discovery.cases])
        mine_ids = {case.case_id for case in mine}
        failed = [row.case_id for row in rows if row.case_id in mine_ids and row.status == "failed"]
        report = _report(cfg, spec, model_dir, input_path, output_dir, shard, device, rows, mine_ids, outcomes,
                         discovery, batch, started, time.perf_counter() - wall, run_hash)
        label_names = [label["name"] for label in spec.get("labels", [])] if batch.predictor is None else \
            [info.name for info in batch.predictor.labels]
        atomic.write_json(output_dir / REPORT_FILE, report)
        ordered = trust.review_order(rows)  # least trustworthy first
        reporting.write_csv(output_dir / "report.csv", ordered, label_names)
        summary = {**trust.review_summary(rows),
                   **reporting.summary_block(rows, model_dir, str(device), time.perf_counter() - wall,
                                             discovery.skipped)}
        reporting.write_html(output_dir / "report.html", output_dir, ordered, summary, label_names)
    finally:
        ledger.close()
    exit_code = EXIT_SOME_FAILED if failed else EXIT_OK
    log.info("predict: %d case(s) in this shard, %d failed; report in %s", len(mine), len(failed),
             output_dir / "report.html")
    return PredictResult(report=report, exit_code=exit_code)


def clean_partials(folder: Path, ledger: Ledger) -> int:
    """Remove ``*.partial-*`` leftovers, except those a live process (another shard) is still writing."""
    busy_cases = ledger.running_elsewhere()
    others_alive = ledger.live_runs_elsewhere() > 0
    removed = 0
    for leftover in folder.rglob(f"*{atomic.PARTIAL_MARK}*"):
        if not leftover.is_file():
            continue
        target = leftover.name[1:].split(atomic.PARTIAL_MARK, 1)[0]
        if target in SHARED_FILES and others_alive:
            continue
        if target.split(".", 1)[0] in busy_cases:
            continue
        try:
            leftover.unlink()
            removed += 1
        except FileNotFoundError:  # its writer finished meanwhile
            pass
    return removed


class _Batch:
    """The model and per-batch state; runs one case at a time."""

    def __init__(self, cfg: Config, model_dir: Path, output_dir: Path, device: torch.device, run_hash: str,
                 ledger: Ledger):
        self.cfg = cfg
        self.model_dir = model_dir
        self.output_dir = output_dir
        self.device = device
        self.run_hash = run_hash
        self.ledger = ledger
        self.predictor: Optional[Predictor] = None
        self.window_predictor: Optional[WindowPredictor] = None
        self.model_seconds = 0.0

    def _load(self) -> None:
        start = time.perf_counter()
        options = self.cfg.predict
        self.predictor = load_predictor(self.model_dir, self.device, optimize=options.optimize_network,
                                        folds=options.folds)
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

    def run_case(self, case: case_io.Case, retry_failed: bool) -> str:
        taken, why = self.ledger.claim(case.case_id, case.source, self.run_hash, retry_failed)
        if not taken:
            log.info("predict: %s skipped: %s", case.case_id, why)
            return why
        log.info("predict: %s started (%s)", case.case_id, why)
        start = time.perf_counter()
        try:
            image, read_error, read_seconds = self._read_while_loading(case)
            try:
                if read_error is not None:
                    raise read_error
                outputs, summary, warnings, timings = predict_case(
                    case, self.predictor, self.window_predictor, self.cfg, self.output_dir, self.run_hash,
                    image=image, load_seconds=read_seconds)
            except Exception as exc:  # one bad case must not end the night; the error is recorded
                message = _describe_failure(case, exc)
                log.error("predict: %s failed: %s", case.case_id, message)
                if not isinstance(exc, (CtsegError, torch.OutOfMemoryError, MemoryError)):
                    log.debug("%s", "".join(traceback.format_exception(exc)))
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.ledger.finish(case.case_id, "failed", error=message, seconds=time.perf_counter() - start)
                return "failed"
        except BaseException:  # Ctrl-C, or the model itself cannot be loaded: hand the case back, stop the batch
            self.ledger.release(case.case_id)
            raise
        self.ledger.finish(case.case_id, "done", seconds=time.perf_counter() - start, timings=timings,
                           outputs=outputs, warnings=warnings, summary=summary)
        log.info("predict: %s done in %.1f s%s", case.case_id, time.perf_counter() - start,
                 f" ({len(warnings)} warning(s))" if warnings else "")
        return "done"

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
    return f"case {case.case_id}: unexpected {type(exc).__name__}: {first_line}"


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
    return int(peak - before)


# ---------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------

def predict_case(case: case_io.Case, predictor: Predictor, window_predictor: WindowPredictor, cfg: Config,
                 output_dir: Path, run_hash: str, image: Optional[case_io.SourceImage] = None,
                 load_seconds: Optional[float] = None) -> tuple[dict, dict, list[str], dict]:
    """Segment one case and write its outputs; returns (outputs with checksums, summary, warnings, timings).

    ``image``: the case already read (then ``load_seconds`` is how long that took).
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
    notes = postprocess(labels, source_grid, predictor.labels, options.postprocess)
    lap("postprocess")
    volumes, label_warnings = reporting.label_statistics(labels, source_grid, predictor.labels, options.report)
    warnings = list(image.warnings) + label_warnings
    lap("statistics")
    assessment = None
    if options.trust.enabled:
        assessment = trust.assess_case(image.volume.array, labels, source_grid, volumes, predictor.labels,
                                       predictor.training_fingerprint, result.probabilities, result.classes,
                                       agreement, options.trust)
        warnings += trust.warnings_for(assessment)
    lap("trust")

    paths: dict[str, Path] = {}
    base = output_dir / case.case_id
    outputs = options.outputs
    paths["labels"] = writers.write_label_nifti(labels, source_grid, Path(f"{base}.nii.gz"), outputs.compresslevel)
    if outputs.seg_nrrd:
        paths["slicer"] = writers.write_seg_nrrd(labels, source_grid, predictor.labels, Path(f"{base}.seg.nrrd"),
                                                 outputs.compresslevel)
    dicom_seg = None
    if outputs.dicom_seg and case.is_dicom:
        try:
            dicom_seg = writers.write_dicom_seg(labels, source_grid, predictor.labels, case.series,
                                                Path(f"{base}.seg.dcm"), case.case_id, _ctseg_version())
            if dicom_seg.get("written"):
                paths["dicom_seg"] = Path(f"{base}.seg.dcm")
        except CtsegError as exc:
            warnings.append(f"DICOM SEG not written: {exc}")
    elif outputs.dicom_seg:
        dicom_seg = {"written": False, "reason": "input is not DICOM"}
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
        "input": case.source,
        "input_info": _anonymous_info(image.info),
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
        "dicom_seg": dicom_seg,
        "warnings": warnings,
        "trust": assessment.to_json() if assessment else None,
        "outputs": relative,
    }
    paths["provenance"] = writers.write_provenance(Path(f"{base}.provenance.json"), provenance)
    checksums = {name: {"path": path.name, "sha256": sha256_file(path)} for name, path in paths.items()}
    summary = {"volumes": volumes, "postprocess": notes, "memory_plan": result.plan.mode,
               "windows": result.stats["windows"], "reassembly": reassembly["method"],
               "trust": assessment.to_json() if assessment else None}
    return checksums, summary, warnings, timings


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


def _ctseg_version() -> str:
    from pipeline import __version__

    return __version__


def _report(cfg, spec, model_dir, input_path, output_dir, shard, device, rows, mine_ids, outcomes, discovery, batch,
            started, seconds, run_hash) -> dict:
    mine_rows = [row for row in rows if row.case_id in mine_ids]
    failed_mine = [row for row in mine_rows if row.status == "failed"]
    return {
        "stage": "predict",
        "folder": str(output_dir),
        "hash": run_hash,
        "status": "failed" if failed_mine else "ok",
        "exit_code": EXIT_SOME_FAILED if failed_mine else EXIT_OK,
        "started": _dt.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "device": str(device),
        "versions": versions(),
        "model": {"folder": str(model_dir), "mode": spec.get("mode"), "network": spec["network"].get("name"),
                  "folds": options_folds(spec, cfg), "load_seconds": batch.model_seconds,
                  "inference_rewrites": batch.predictor.optimisation if batch.predictor else None},
        "input": str(input_path),
        "shard": list(shard) if shard else None,
        "counts": {
            "cases": len(rows),
            "this_shard": len(mine_rows),
            "ok": sum(row.status == "done" for row in rows),
            "failed": sum(row.status == "failed" for row in rows),
            "not_finished": sum(row.status in ("pending", "running") for row in rows),
            "done_this_run": sum(outcome == "done" for outcome in outcomes.values()),
            "failed_this_run": sum(outcome == "failed" for outcome in outcomes.values()),
            "resumed": sum(outcome.startswith("done (") for outcome in outcomes.values()),
        },
        "skipped_inputs": discovery.skipped,
        "cases": [{"id": row.case_id, "status": "ok" if row.status == "done" else row.status, "input": row.input,
                   "error": row.error, "warnings": row.warnings, "seconds": row.seconds, "attempts": row.attempts,
                   "shard": row.shard, "timings": row.timings,
                   "outputs": {name: entry["path"] for name, entry in row.outputs.items()},
                   "volumes_ml": {name: v.get("volume_ml") for name, v in row.summary.get("volumes", {}).items()},
                   "trust": trust.case_trust(row) or None}
                  for row in rows],
        "needs_review": [row.case_id for row in trust.review_order(rows) if trust.case_trust(row).get("needs_review")],
    }
