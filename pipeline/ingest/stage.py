"""The ingest stage: finds cases, reads them in HU with exact geometry, and writes the training layout.

Output layout (``outputs/<experiment>/ingest/`` or ``--output DIR``)::

    imagesTr/<case>_0000.nii.gz   labelsTr/<case>.nii.gz     cases with role "train"
    imagesTs/<case>_0000.nii.gz   labelsTs/<case>.nii.gz     held-out cases (label when known)
    provenance/<case>.json        source UIDs, chosen series and rule, corrections, warnings
    manifest.json                 what later stages read
    series.csv / series.json      every scanned series and why it was or was not selected
    structures/<case>/*.nii.gz    one binary mask per RTSTRUCT ROI / SEG segment (pipeline.labels.structures)
    structures.csv / .json        the structure inventory: names, types, volumes, label mapped to or why not
    dataset.suggested.yaml        the structure names grouped into suggested labels (pipeline.labels.suggest)
    private/case_mapping.csv      case id → patient ID and UIDs (the only place patient IDs appear)
    private/sources.csv           case id → full input path; private/skipped_files.csv: every skipped file
    report.json, done.json        the stage contract (pipeline.stage); errors.log: unexpected failures

Privacy: input folder and file names often name the patient (``DOE_JOHN_12345/``). By default they
appear only under ``private/`` (owner-only); logs, report.json, ``cases/`` and provenance name a case
id, an input folder hash (``input folder #1a2b3c4d``) and file names within a series folder, and every
error text is passed through :meth:`PathPrivacy.redact`. ``ingest.full_paths: true`` writes full paths.

Isolation: any failure inside one case fails that case only (:class:`pipeline.stage.StageRun`);
the stage completes with the others, lists the failed ones in ``done.json`` and retries them on a
rerun. ``ctseg ingest`` exits 3 when some cases failed (as predict), 1 when none could be ingested.

Parallel: the export scan reads headers in forked processes, and cases are ingested in worker processes
(``ingest.workers``, one per core by default within the memory budget; :mod:`pipeline.ingest.workers`). This
process keeps the case records, manifest, report and inventory, written in case order; the outputs are the
same bytes as with ``ingest.workers: 1`` (one case at a time here, the next case's image read ahead).

Ingest needs no dataset description: without one the images, the inventory and the masks are
written, and no label maps. With one (``--set dataset=...``) each case's structures are mapped to
its labels (:func:`pipeline.labels.names.map_structures`); a case whose required label is missing,
empty or ambiguous is ingested but left out of training, with the reason in ``structures.csv`` and
the report. Where structures overlap in a label map, the smaller one wins (a GTV inside a PTV
inside BODY stays GTV). A rerun into the same folder whose export (file names, sizes, times) and
ingest settings are unchanged reuses the images and masks written before and reads no DICOM: it
only maps the structures again.

Case ids of scanned series come from :func:`pipeline.case_ids.series_case_id`, the same function
predict uses: stable across reruns, free of patient names or IDs, and safe as file names.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import atomic
from pipeline.config import Config, section_hash
from pipeline.dataset import DatasetCase, DatasetDescription, load_dataset
from pipeline.errors import CaseError, ConfigError, CtsegError, InputError
from pipeline.geometry import Grid, Volume
from pipeline.ingest.manifest import MANIFEST_FILE, read_manifest, write_manifest
from pipeline.ingest.workers import (
    CASE_BYTES_PER_VOXEL,
    CaseProcesses,
    check_workers_setting,
    choose_workers,
    usable_cores,
)
from pipeline.labels.structures import LabelObject, Structure
from pipeline.progress import Progress
from pipeline.stage import StageRun, check_output_outside_inputs, read_done, safe_name
from pipeline.volume_io import is_volume_file, load_volume, save_nifti, strip_volume_suffix

log = logging.getLogger("ctseg")

MANIFEST = MANIFEST_FILE
NO_LABEL_OBJECTS = "no RTSTRUCT or DICOM SEG in the export references this image series"
NOT_MAPPED = "not mapped: no dataset description given (see dataset.suggested.yaml)"


@dataclass
class CaseSource:
    """Where one case comes from: a DICOM series (scanned) or a volume file, plus its label source."""

    id: str
    role: str
    image_path: Path
    series: object | None = None        # pipeline.dicom.scan.SeriesInfo for DICOM images
    selection_reason: str = ""
    label_path: Path | None = None
    label_objects: list[LabelObject] = field(default_factory=list)  # RTSTRUCT/SEG drawn on this image
    private: dict = field(default_factory=dict)
    previous: dict | None = None      # manifest entry of an earlier run whose images and masks are reused


class PathPrivacy:
    """How ingest names input paths outside ``private/`` (see the module docstring)."""

    def __init__(self, roots: list[Path], full: bool):
        self.full = full
        forms = set()
        for root in roots:
            if root is not None:
                forms |= {str(Path(root).absolute()), str(Path(root).resolve())}
        self._pattern = re.compile("|".join(re.escape(f) + r"[^\s'\"(),;]*" for f in
                                            sorted(forms, key=len, reverse=True))) if forms else None

    @staticmethod
    def folder_id(folder: Path) -> str:
        return hashlib.sha1(str(Path(folder).resolve()).encode("utf-8")).hexdigest()[:8]

    def describe(self, path: Path | None) -> str | None:
        """A file as 'name in input folder #id', a folder as 'input folder #id' (full path with full_paths)."""
        if path is None:
            return None
        path = Path(path)
        if self.full:
            return str(path)
        if path.is_dir():
            return f"input folder #{self.folder_id(path)}"
        return f"{path.name} in input folder #{self.folder_id(path.parent)}"

    def relative(self, path: Path | None, folder: Path) -> str | None:
        """``path`` relative to a case's series folder (full path with full_paths)."""
        if path is None:
            return None
        if self.full:
            return str(path)
        relative = os.path.relpath(Path(path).resolve(), Path(folder).resolve())
        return relative if not relative.startswith("../..") else self.describe(path)

    def redact(self, text: str) -> str:
        """Replace every input path in ``text`` by its file name ('…/IM0001.dcm') or folder hash."""
        if self.full or self._pattern is None or not text:
            return text

        def short(match) -> str:
            path = Path(match.group(0).rstrip(".:"))
            tail = match.group(0)[len(str(path)):]
            return (f"<input folder #{self.folder_id(path)}>" if path.is_dir() else f"…/{path.name}") + tail

        return self._pattern.sub(short, text)


def run_ingest(cfg: Config, source: Path | None = None, output: Path | None = None, force: bool = False) -> dict:
    """Ingest the dataset of ``cfg`` (or the export ``source``) into ``output`` (default: the experiment)."""
    check_workers_setting(cfg.ingest.workers)
    dataset = load_dataset(cfg.dataset) if cfg.dataset else None
    if source is None and dataset is None:
        raise ConfigError("ingest needs an input: give an export folder (ctseg ingest EXPORT --output DIR) or a "
                          "dataset description (--set dataset=datasets/<name>/dataset.yaml).")
    out = Path(output) if output else cfg.stage_dir("ingest")
    source = Path(source).absolute() if source else None
    dataset_root = dataset.resolve(dataset.source) if dataset is not None and dataset.source else None
    check_output_outside_inputs(out, [source, dataset_root], "--output" if output else "the ingest folder")
    inputs_key = {"source": str(source.resolve()) if source else None,
                  "dataset": dataset.content_hash() if dataset else None}
    root = _scan_root(dataset, Path(source) if source else None)
    images_key = _images_key(cfg, root)
    reusable = None if force or images_key is None else _reusable_cases(out, images_key)
    run = StageRun.open("ingest", out, section_hash(_ingest_settings(cfg), inputs_key), force=force)
    if run.skipped_up_to_date:
        log.info("ingest: %s is up to date (config and inputs unchanged); nothing to do", out)
        return {"stage": "ingest", "status": "up_to_date", "folder": str(out)}
    privacy = PathPrivacy([source, dataset_root, Path(dataset.path).parent if dataset is not None else None],
                          cfg.ingest.full_paths)
    run.redact = privacy.redact

    if reusable is not None:
        cases = _reused_cases(reusable, dataset)
        run.extra["scan"] = {"reused": f"the export is unchanged since the last run ({len(cases)} case(s)): "
                                       f"images and structure masks already written are reused, no DICOM is read"}
        log.info("ingest: export unchanged; relabelling %d case(s) from the masks already written", len(cases))
    else:
        cases, scan_summary = discover_cases(cfg, dataset, source, out, privacy)
        run.extra["scan"] = scan_summary
    manifest_cases, inventory = [], []
    todo = [index for index, case in enumerate(cases) if not run.is_case_done(case.id)]
    workers = choose_workers(cfg.ingest.workers, [_case_bytes(cases[i]) for i in todo],
                             _memory_budget(cfg))
    run.extra["workers"] = workers
    # the worker processes are forked before the progress display starts (tqdm runs a thread)
    with CaseRunner(cfg, dataset, out, privacy, cases, todo, workers) as runner, \
            Progress(len(cases), "ingest: cases", unit="case") as progress:
        for index, case in enumerate(cases):
            inputs = {"image": privacy.describe(case.image_path), "label": privacy.describe(case.label_path),
                      "label_objects": [o.object_id for o in case.label_objects]}
            with run.case(case.id, inputs) as record:
                if record is None:  # done in an earlier, interrupted run
                    entry = run.records[case.id].extra["manifest"]
                    manifest_cases.append(entry)
                    inventory.extend(_case_rows(out, entry))
                    progress.update()
                    continue
                entry, rows = runner.run(index, record)
                record.extra["manifest"] = entry
                manifest_cases.append(entry)
                inventory.extend(rows)
            progress.update()
    if not manifest_cases and cases:
        run.finish(complete=False)
        raise InputError(f"no case could be ingested: all {len(cases)} case(s) failed, each with the reason "
                         f"printed above and listed in {out / 'report.json'}. Fix those inputs and rerun.")
    labels = dataset.label_json() if dataset else []
    write_manifest(out, labels, images_key, manifest_cases)
    _write_private_mapping(out, cases)
    _finish_inventory(run, out, inventory, manifest_cases, root, dataset)
    # a failed case has its reason in report.json and cases/; the others are complete (exit 3, see cli)
    report = run.finish(allow_failed=True)
    return report


def _finish_inventory(run: StageRun, out: Path, inventory: list[Structure], manifest_cases: list[dict],
                      root: Path | None, dataset: DatasetDescription | None) -> None:
    """structures.csv/.json, dataset.suggested.yaml, and the left-out cases in the report."""
    from pipeline.labels.structures import write_inventory
    from pipeline.labels.suggest import write_suggested

    left_out = [{"case": c["id"], "reason": c["left_out"]} for c in manifest_cases if c.get("left_out")]
    run.extra["left_out"] = left_out
    for item in left_out:
        log.warning("ingest: case %s left out of training: %s", item["case"], item["reason"])
    if not inventory:
        return
    write_inventory(out, inventory)
    suggested = write_suggested(out, inventory, len({r.case for r in inventory}),
                                root if root is not None and root.is_dir() else None)
    run.extra["structures"] = {"count": len(inventory), "cases": len({r.case for r in inventory}),
                               "inventory": str(out / "structures.csv"), "suggested_dataset": str(suggested)}
    if dataset is None:
        log.info("ingest: %d structure(s) inventoried in %s; no dataset description was given, so no label maps "
                 "were made. Edit %s and rerun with --set dataset=%s", len(inventory), out / "structures.csv",
                 suggested, suggested)


def _case_rows(out: Path, entry: dict) -> list[Structure]:
    from pipeline.labels.structures import read_case_inventory

    if not entry.get("structures"):
        return []
    return read_case_inventory(out, entry["id"]) or []


def _scan_root(dataset: DatasetDescription | None, source: Path | None) -> Path | None:
    if source is not None:
        return source
    if dataset is not None and not dataset.cases and dataset.source:
        return dataset.resolve(dataset.source)
    return None


def _images_key(cfg: Config, root: Path | None) -> str | None:
    """Hash of the ingest settings and the export's file listing (names, sizes, modification times).

    Equal keys mean the images and masks of the last run still hold, without reading a file.
    """
    if root is None or not root.is_dir():
        return None
    return section_hash(_ingest_settings(cfg), {"root": str(root.resolve()), "files": _file_listing(root)})


def _file_listing(root: Path) -> list[tuple[str, int, int]]:
    """(path relative to ``root``, size, mtime_ns) of every file below it, in ``os.walk`` order with sorted names.

    As ``os.walk`` (no descent into linked folders, unreadable folders left out) and ``Path.stat`` (links
    followed, a broken one left out) would list them, from the directory entries' own stat calls.
    """
    listing: list[tuple[str, int, int]] = []

    def visit(folder: str, prefix: str) -> None:
        try:
            with os.scandir(folder) as scan:
                entries = list(scan)
        except OSError:
            return
        folders: list[os.DirEntry] = []
        files: list[os.DirEntry] = []
        for entry in entries:
            try:
                is_folder = entry.is_dir()
            except OSError:
                is_folder = False
            (folders if is_folder else files).append(entry)
        for entry in sorted(files, key=lambda e: e.name):
            try:
                info = entry.stat()
            except OSError:
                continue
            listing.append((prefix + entry.name, info.st_size, info.st_mtime_ns))
        for entry in sorted(folders, key=lambda e: e.name):
            try:
                linked = entry.is_symlink()
            except OSError:
                linked = True
            if not linked:
                visit(entry.path, prefix + entry.name + "/")

    visit(str(root), "")
    return listing


def _reusable_cases(out: Path, images_key: str) -> list[dict] | None:
    """The manifest cases of a complete earlier run with the same images key, when all their files remain.

    An earlier run with failed cases is not reused: its failed cases must be read from the DICOM again (the rerun
    retries them, and the finished ones resume).
    """
    from pipeline.labels.structures import read_case_inventory

    done = read_done(out)
    if done is None or done.get("failed_cases") or not (out / MANIFEST).is_file():
        return None
    try:
        manifest = read_manifest(out)
    except InputError:  # damaged or of another version: read the export again
        return None
    if manifest.get("images_key") != images_key:
        return None
    cases = manifest.get("cases", [])
    for entry in cases:
        if not entry.get("scanned") or not (out / entry["image"]).is_file():
            return None
        if entry.get("structures") and read_case_inventory(out, entry["id"]) is None:
            return None
    return cases or None


def _reused_cases(entries: list[dict], dataset: DatasetDescription | None) -> list[CaseSource]:
    test_ids = set(dataset.test_cases) if dataset else set()
    cases = []
    for entry in entries:
        role = "test" if entry["id"] in test_ids else entry.get("source_role", "train")
        cases.append(CaseSource(entry["id"], role, Path(entry.get("image_source") or entry["image"]),
                                previous=entry))
    return cases


# ---------------------------------------------------------------------------------------------
# Finding cases
# ---------------------------------------------------------------------------------------------

def discover_cases(cfg: Config, dataset: DatasetDescription | None, source: Path | None,
                   out: Path, privacy: PathPrivacy | None = None) -> tuple[list[CaseSource], dict]:
    privacy = privacy or PathPrivacy([source], cfg.ingest.full_paths)
    test_ids = set(dataset.test_cases) if dataset else set()
    if source is None and dataset is not None and dataset.cases:
        return [_explicit_case(cfg, dataset, case) for case in dataset.cases], {"cases": "listed in dataset"}
    root = source if source is not None else dataset.resolve(dataset.source)
    if not root.exists():
        raise InputError(f"input folder {root} does not exist. Check the path (or 'source' in the dataset.yaml).")
    if root.is_file() and is_volume_file(root):
        return [CaseSource(safe_name(strip_volume_suffix(root.name)), "train", root)], {"files": 1}
    if not root.is_dir():
        raise InputError(f"{root} must be a folder of DICOM files or volumes, or a NIfTI/NRRD file.")
    volumes = sorted(p for p in root.rglob("*") if is_volume_file(p) and p.is_file())  # the name first: no stat
    if volumes and not _has_dicom(root):
        return _volume_folder_cases(volumes, test_ids), {"volume_files": len(volumes)}
    cases, summary = _scanned_cases(cfg, root, out, privacy)
    for case in cases:
        if case.id in test_ids:
            case.role = "test"
    return cases, summary


def _has_dicom(root: Path) -> bool:
    for path in root.rglob("*"):
        if path.is_file() and not is_volume_file(path):
            try:
                with open(path, "rb") as handle:
                    handle.seek(128)
                    if handle.read(4) == b"DICM":
                        return True
            except OSError:
                continue
    return False


def _volume_folder_cases(volumes: list[Path], test_ids: set[str]) -> list[CaseSource]:
    """nnU-Net style folders: images*/<case>_0000.nii.gz with labels*/<case>.nii.gz beside them."""
    labels = {strip_volume_suffix(p.name): p for p in volumes if p.parent.name.lower().startswith("labels")}
    cases = []
    for path in volumes:
        if path.parent.name.lower().startswith("labels"):
            continue
        stem = strip_volume_suffix(path.name)
        case_id = safe_name(stem[:-5] if stem.endswith("_0000") else stem)
        role = "test" if (case_id in test_ids or path.parent.name.endswith("Ts")) else "train"
        cases.append(CaseSource(case_id, role, path, label_path=labels.get(case_id)))
    return cases


def _explicit_case(cfg: Config, dataset: DatasetDescription, case: DatasetCase) -> CaseSource:
    image = dataset.resolve(case.image)
    role = "test" if case.id in set(dataset.test_cases) else case.role
    label = dataset.resolve(case.label) if case.label else None
    return CaseSource(safe_name(case.id), role, image, label_path=label)


def _scanned_cases(cfg: Config, root: Path, out: Path, privacy: PathPrivacy) -> tuple[list[CaseSource], dict]:
    from pipeline.case_ids import series_case_id
    from pipeline.dicom.scan import labels_for, scan_export
    from pipeline.dicom.select import select_series, write_series_table

    log.info("ingest: scanning %s", root)
    scan = scan_export(root, workers=cfg.workers, processes=cfg.ingest.workers or usable_cores())
    for skipped in scan.skipped:
        log.info("ingest: skipped %s (%s)", privacy.describe(skipped.path), privacy.redact(skipped.reason))
    _write_private_table(out, "skipped_files.csv", ["path", "reason"],
                         [[str(s.path), s.reason] for s in scan.skipped])
    decisions = select_series(scan.series, cfg.ingest.select)
    write_series_table(decisions, out)
    cases = []
    for decision in decisions:
        if not decision.selected:
            continue
        series = decision.series
        case_id = series_case_id(series, cfg.ingest.anonymise_case_ids)
        objects = [LabelObject(Path(path), match.label.modality, f"{match.label.modality} {match.label.short_key}")
                   for match in labels_for(series, scan.series) for path in sorted(match.label.files)]
        cases.append(CaseSource(case_id, "train", root / series.folder, series=series,
                                selection_reason=decision.reason, label_objects=objects,
                                private={"patient_id": series.patient_id, "study_uid": series.study_uid,
                                         "series_uid": series.series_uid}))
    summary = {"files_skipped": len(scan.skipped), "series": len(scan.series),
               "series_selected": len(cases),
               "skipped_files": [{"path": privacy.describe(s.path), "reason": privacy.redact(s.reason)}
                                 for s in scan.skipped]}
    if not cases:
        raise InputError(f"{root} holds no CT series that ingest can use ({len(scan.series)} series found, "
                         f"{len(scan.skipped)} files skipped). See {out / 'series.csv'} for the reason per "
                         f"series, or relax the ingest.select rules.")
    return cases, summary


# ---------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------

def _ingest_settings(cfg: Config) -> dict:
    """The ingest settings that decide the outputs (all but ``workers``): what the stage hash and images key hash."""
    from pipeline.config import to_dict

    return {key: value for key, value in to_dict(cfg.ingest).items() if key != "workers"}


def _case_bytes(case: CaseSource) -> float:
    """The estimated peak memory of ingesting ``case`` (0 when its size is not known before reading it)."""
    series: Any = case.series
    if series is not None and getattr(series, "slices", None):
        return float(series.slice_count * series.rows * series.columns * CASE_BYTES_PER_VOXEL)
    try:  # a volume file: a gzipped CT holds about 1.5 voxels per byte
        return float(case.image_path.stat().st_size * 1.5 * CASE_BYTES_PER_VOXEL) if case.image_path.is_file() \
            else 0.0
    except OSError:
        return 0.0


def _memory_budget(cfg: Config) -> float:
    from pipeline.dicom.assemble import memory_budget_bytes

    return memory_budget_bytes(cfg.ingest.assembly)


class CaseRunner:
    """Runs each case of the loop in :func:`run_ingest`: in worker processes (``workers`` > 1, see
    :mod:`pipeline.ingest.workers`), or in this process with the next case's image read ahead (1)."""

    def __init__(self, cfg: Config, dataset: DatasetDescription | None, out: Path, privacy: PathPrivacy,
                 cases: list[CaseSource], todo: list[int], workers: int):
        self.cfg, self.dataset, self.out, self.privacy, self.cases = cfg, dataset, out, privacy, cases
        self.todo = todo
        self.processes: CaseProcesses | None = None
        self.ahead: ImagePrefetch | None = None
        if workers > 1:
            _import_case_modules()  # once here rather than in every worker
            self.processes = CaseProcesses(self._work, todo, workers, lambda index: cases[index].id)
        else:
            self.ahead = ImagePrefetch(cfg, privacy)

    def __enter__(self) -> CaseRunner:
        return self

    def __exit__(self, *exc) -> None:
        if self.processes is not None:
            self.processes.close(abort=exc[0] is not None)
        if self.ahead is not None:
            self.ahead.__exit__(*exc)

    def run(self, index: int, record) -> tuple[dict, list[Structure]]:
        """Case ``index``'s manifest entry and inventory rows; fills ``record`` (outputs, warnings, extra)."""
        if self.processes is not None:
            entry, rows, outputs, warnings, extra = self.processes.result(index)
            record.outputs, record.warnings = outputs, warnings
            record.extra.update(extra)
            return entry, rows
        following = [self.cases[i] for i in self.todo if i > index][:1]
        self.ahead.start([c for c in following if c.previous is None])
        case = self.cases[index]
        if case.previous is not None:
            return relabel_case(self.cfg, self.dataset, case, self.out, record)
        return ingest_case(self.cfg, self.dataset, case, self.out, record, self.privacy, self.ahead.reader(case),
                           self.ahead.structure_sets(case))

    def _work(self, index: int) -> tuple:
        """One case in a worker process: what :meth:`run` needs back (the record's fields filled in here)."""
        from pipeline.stage import CaseRecord

        case = self.cases[index]
        record = CaseRecord(id=case.id)
        if case.previous is not None:
            entry, rows = relabel_case(self.cfg, self.dataset, case, self.out, record)
        else:
            entry, rows = ingest_case(self.cfg, self.dataset, case, self.out, record, self.privacy)
        return entry, rows, record.outputs, record.warnings, record.extra


def _import_case_modules() -> None:
    """Import what ingesting a case imports on first use, before the worker processes are forked."""
    import nibabel  # noqa: F401

    import pipeline.dicom.assemble  # noqa: F401
    import pipeline.dicom.plausibility  # noqa: F401
    import pipeline.labels.names  # noqa: F401
    import pipeline.labels.rtstruct  # noqa: F401
    import pipeline.labels.structures  # noqa: F401


class ImagePrefetch:
    """Decode the next case's image, and parse its RTSTRUCTs, in a background thread while the current case is
    rasterised and written.

    Both cores stay busy across cases: pixel decoding (file reads, pydicom) overlaps with the gzip and
    fsync of the previous case's NIfTI files, which release the GIL. At most one image is read ahead, and
    only when it fits :data:`PREFETCH_BUDGET_BYTES` (estimated from the scanned headers), so the memory
    held is at most two images. The result is exactly what :func:`_read_image` returns in the main
    thread (the same function runs); its exceptions surface in the case they belong to. An RTSTRUCT is
    still parsed once (here instead of in the case) and rasterised once, in the case.
    """

    def __init__(self, cfg: Config, privacy: PathPrivacy):
        self.cfg, self.privacy = cfg, privacy
        self.futures: dict[str, Any] = {}  # concurrent.futures.Future of each case's image read
        self.parsed: dict[str, dict[Path, Any]] = {}  # and of its RTSTRUCTs' parses
        self.pool: Any = None  # a one-thread ThreadPoolExecutor, started with the first prefetch

    def __enter__(self) -> ImagePrefetch:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            for future in [*self.futures.values(), *(f for d in self.parsed.values() for f in d.values())]:
                future.cancel()
            self.pool.shutdown(wait=True)

    def start(self, cases: list[CaseSource]) -> None:
        for case in cases:
            series: Any = case.series
            if case.id in self.futures or series is None or not getattr(series, "slices", None):
                continue  # volume files and explicit folders are read in the case itself
            if series.slice_count * series.rows * series.columns * 4 > PREFETCH_BUDGET_BYTES:
                continue
            if self.pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctseg-prefetch")
            self.futures[case.id] = self.pool.submit(_read_image, self.cfg, case, self.privacy)
            from pipeline.labels import rtstruct

            self.parsed[case.id] = {obj.path: self.pool.submit(rtstruct.read_rtstruct, obj.path)
                                    for obj in case.label_objects if obj.modality == "RTSTRUCT"}

    def reader(self, case: CaseSource) -> Callable:
        """The image reader for ``case``: its prefetched result, or :func:`_read_image` when none was started."""
        future = self.futures.pop(case.id, None)
        if future is None:
            return _read_image
        return lambda *_args: future.result()

    def structure_sets(self, case: CaseSource) -> dict[Path, Callable]:
        """``{RTSTRUCT path: () -> its parsed ROIs}`` for the RTSTRUCTs of ``case`` parsed ahead (may be empty)."""
        return {path: future.result for path, future in self.parsed.pop(case.id, {}).items()}


# the image read ahead (int16/float32 voxels, estimated at 4 bytes each) may use at most this much memory
PREFETCH_BUDGET_BYTES = 1 << 30


def ingest_case(cfg: Config, dataset: DatasetDescription | None, case: CaseSource, out: Path, record,
                privacy: PathPrivacy | None = None, read_image: Callable | None = None,
                parsed: dict[Path, Callable] | None = None) -> tuple[dict, list[Structure]]:
    """Read one case's image and labels and write them; returns its manifest entry and inventory rows.

    ``read_image``: a stand-in for :func:`_read_image` with its signature (the prefetched result);
    ``parsed``: RTSTRUCTs already parsed, by path (see :func:`pipeline.labels.structures.read_structures`).

    The case's files (image, label, masks, inventory, provenance) are one :func:`pipeline.atomic.batch`:
    fsync'd together and renamed when the case succeeds, before its case record (the done marker) is
    written; a failed case changes no final name.
    """
    with atomic.batch():
        return _ingest_case(cfg, dataset, case, out, record, privacy, read_image, parsed)


def _ingest_case(cfg: Config, dataset: DatasetDescription | None, case: CaseSource, out: Path, record,
                 privacy: PathPrivacy | None, read_image: Callable | None,
                 parsed: dict[Path, Callable] | None) -> tuple[dict, list[Structure]]:
    from pipeline.labels.structures import read_structures, write_case_structures

    privacy = privacy or PathPrivacy([], True)
    rows: list[Structure] = []
    left_out = None
    objects: list[LabelObject] = []
    try:
        image, provenance, warnings = (read_image or _read_image)(cfg, case, privacy)
        from pipeline.dicom.plausibility import check_training_volume

        warnings += check_training_volume(image, f"case {case.id}", cfg.ingest.plausibility)
        image_warnings = warnings  # what reading the image and its structures found (not the label mapping)
        objects = case.label_objects or _dicom_label_objects(case.label_path)
        label = None
        if objects:
            found = read_structures(case.id, objects, image.grid, warnings, parsed)
            rows, masks = write_case_structures(out, case.id, found, image.grid, cfg.ingest.compresslevel)
            if dataset is not None:
                image_warnings = list(warnings)
                label, left_out, mapping_warnings = label_from_structures(rows, masks, image.grid.shape, dataset)
                warnings += mapping_warnings
            else:
                for row in rows:
                    row.note = "; ".join(n for n in (row.problem, NOT_MAPPED) if n)
            write_case_inventory_rows(out, case.id, rows)
        elif case.label_path:
            label = _read_label(cfg, dataset, case, image, privacy)
        elif dataset is not None and case.series is not None and case.role == "train":
            left_out = NO_LABEL_OBJECTS
    except CtsegError as exc:
        raise CaseError(case.id, str(exc)) from exc
    except (OSError, ValueError, KeyError, AttributeError, IndexError) as exc:
        raise CaseError(case.id, f"{privacy.describe(case.image_path)} could not be ingested ({type(exc).__name__}: "
                                 f"{exc}). Check that the files are complete; run with --debug for details.") from exc
    warnings = [privacy.redact(w) for w in warnings]
    image_warnings = [privacy.redact(w) for w in image_warnings]

    split = "Tr" if case.role == "train" else "Ts"
    image_rel = f"images{split}/{case.id}_0000.nii.gz"
    label_rel = f"labels{split}/{case.id}.nii.gz" if label is not None else None
    try:
        save_nifti(_as_storage_dtype(image), out / image_rel, compresslevel=cfg.ingest.compresslevel)
        label_rel = _write_label(out, case.id, split, label, image.affine)
    except BaseException:  # a failed case leaves no output under its final name (e.g. only the image)
        for rel in (image_rel, label_rel):
            if rel and (out / rel).exists():
                (out / rel).unlink()
        raise
    series_folder = case.image_path if case.image_path.is_dir() else case.image_path.parent
    provenance = {**provenance, "case": case.id, "role": case.role,
                  "image_source": privacy.describe(case.image_path),
                  "label_source": privacy.relative(case.label_path, series_folder),
                  "label_objects": [o.object_id for o in objects],
                  "selected_because": case.selection_reason or "listed in the dataset description",
                  "structures": _structure_summary(rows), "left_out_of_training": left_out,
                  "image_warnings": image_warnings, "warnings": warnings}
    provenance_rel = f"provenance/{case.id}.json"
    atomic.write_json(out / provenance_rel, provenance)
    entry = {"id": case.id, "role": case.role, "image": image_rel, "label": label_rel,
             "provenance": provenance_rel, "scanned": case.series is not None and bool(case.private),
             "source_role": "train", "image_source": privacy.describe(case.image_path),
             "structures": f"structures/{case.id}/structures.json" if rows else None, "left_out": left_out}
    _record(record, out, entry, warnings, rows)
    return entry, rows


def relabel_case(cfg: Config, dataset: DatasetDescription | None, case: CaseSource, out: Path, record
                 ) -> tuple[dict, list[Structure]]:
    """Map a case of an earlier run again from its written masks (no DICOM is read); move it if its role changed."""
    from pipeline.labels.structures import load_mask, read_case_inventory

    previous = dict(case.previous)
    try:
        image_path = out / previous["image"]
        grid = _nifti_grid(image_path)
        rows = read_case_inventory(out, case.id) or [] if previous.get("structures") else []
        for row in rows:
            row.label, row.note = "", row.problem or ("" if dataset is not None else NOT_MAPPED)
        label: np.ndarray | None = None
        left_out: str | None = None
        warnings: list[str] = []
        if rows and dataset is not None:
            label, left_out, warnings = label_from_structures(rows, lambda i: load_mask(out, rows[i], grid),
                                                              grid.shape, dataset)
        elif dataset is not None and case.role == "train":
            left_out = NO_LABEL_OBJECTS
        if rows:
            write_case_inventory_rows(out, case.id, rows)
    except CtsegError as exc:
        raise CaseError(case.id, str(exc)) from exc
    except (OSError, ValueError, KeyError) as exc:
        raise CaseError(case.id, f"the files of the earlier run in {out} could not be reused ({type(exc).__name__}: "
                                 f"{exc}). Rerun ingest with --force.") from exc
    split = "Tr" if case.role == "train" else "Ts"
    image_rel = f"images{split}/{case.id}_0000.nii.gz"
    if image_rel != previous["image"]:
        os.replace(out / previous["image"], out / image_rel)
    old_label = previous.get("label")
    label_rel = _write_label(out, case.id, split, label, grid.affine)
    if old_label and old_label != label_rel and (out / old_label).is_file():
        (out / old_label).unlink()
    provenance_path = out / previous["provenance"]
    provenance = json.loads(provenance_path.read_text(encoding="utf-8")) if provenance_path.is_file() else {}
    kept = list(provenance.get("image_warnings", []))
    provenance.update({"role": case.role, "structures": _structure_summary(rows), "left_out_of_training": left_out,
                       "image_warnings": kept, "warnings": kept + warnings,
                       "relabelled": "from the structure masks of the earlier run; no DICOM read"})
    atomic.write_json(provenance_path, provenance)
    entry = {**previous, "role": case.role, "image": image_rel, "label": label_rel, "left_out": left_out}
    _record(record, out, entry, kept + warnings, rows)
    return entry, rows


def _record(record, out: Path, entry: dict, warnings: list[str], rows: list[Structure]) -> None:
    outputs = {"image": str(out / entry["image"]), "label": str(out / entry["label"]) if entry.get("label") else None,
               "provenance": str(out / entry["provenance"]),
               "structures": [str(out / r.mask) for r in rows if r.mask]}
    record.outputs = {k: v for k, v in outputs.items() if v}
    record.warnings = warnings
    mapped = {row.label: row.name for row in rows if row.label}
    if mapped:
        record.extra["labels"] = mapped  # which structure became which label, per case
    if entry.get("left_out"):
        record.extra["left_out"] = entry["left_out"]
    for warning in warnings:
        log.warning("ingest: case %s: %s", entry["id"], warning)


def _write_label(out: Path, case_id: str, split: str, label: np.ndarray | None, affine: np.ndarray) -> str | None:
    if label is None:
        return None
    label_rel = f"labels{split}/{case_id}.nii.gz"
    dtype = np.uint8 if label.max(initial=0) < 256 else np.uint16
    save_nifti(Volume(label.astype(dtype), affine), out / label_rel)
    return label_rel


def _nifti_grid(path: Path) -> Grid:
    from pipeline.volume_io import load_volume

    return load_volume(path).grid


def _structure_summary(rows: list[Structure]) -> list[dict]:
    return [{"object": r.object, "number": r.number, "name": r.name, "voxels": r.voxels, "label": r.label,
             "note": r.note} for r in rows]


def write_case_inventory_rows(out: Path, case_id: str, rows: list[Structure]) -> None:
    from pipeline.labels.structures import write_case_inventory

    write_case_inventory(out, case_id, rows)


def label_from_structures(rows: list[Structure], mask_of: Callable[[int], np.ndarray], shape: tuple[int, ...],
                          dataset: DatasetDescription) -> tuple[np.ndarray | None, str | None, list[str]]:
    """The case's label map (None when the case is left out), the reason it is left out, and warnings.

    ``mask_of(i)`` gives the boolean mask of ``rows[i]`` (only mapped structures are asked for).
    Fills each row's ``label`` / ``note``. Where mapped structures overlap, the smaller one wins.
    """
    from pipeline.labels.names import map_structures

    specs = dataset.foreground()
    mapping = map_structures([r.name for r in rows], [r.empty for r in rows], specs,
                             dataset.exclude, where=f"dataset description {dataset.path}")
    for index, row in enumerate(rows):
        row.label = mapping.label_of.get(index, "")
        note = mapping.notes.get(index, "")
        row.note = "; ".join(n for n in (row.problem, note) if n)
    warnings = list(mapping.warnings)
    if mapping.left_out is not None:
        return None, mapping.left_out, warnings
    high = max((s.value for s in specs), default=0)
    label = np.zeros(shape, dtype=np.uint8 if high <= 255 else np.uint16)
    by_size = sorted(mapping.chosen.items(), key=lambda item: -rows[item[1]].voxels)  # larger first, smaller win
    names = {s.value: s.name for s in specs}
    for value, index in by_size:
        mask = mask_of(index)
        overlap = int(np.count_nonzero(mask & (label != 0)))
        if overlap:
            below = sorted({names[int(v)] for v in np.unique(label[mask & (label != 0)])})
            warnings.append(f"{overlap} voxel(s) of '{rows[index].name}' (label {names[value]}) overlap {below}; "
                            f"the smaller structure '{rows[index].name}' wins there")
        label[mask] = value
    return label, None, warnings


def _dicom_label_objects(path: Path | None) -> list[LabelObject]:
    """An explicit DICOM label file (RTSTRUCT or SEG) as a label object; [] for none or a volume file."""
    if path is None or is_volume_file(path):
        return []
    import pydicom

    if not path.exists():
        raise InputError(f"label {path} does not exist. Fix the 'label' path in the dataset description.")
    header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
    modality = str(header.get("Modality", ""))
    if modality not in ("RTSTRUCT", "SEG"):
        raise InputError(f"label {path} must be an RTSTRUCT, a DICOM SEG, or a NIfTI/NRRD label map, "
                         f"got DICOM modality '{modality}'.")
    return [LabelObject(path, modality, f"{modality} {safe_name(path.name)}")]


def _read_image(cfg: Config, case: CaseSource, privacy: PathPrivacy) -> tuple[Volume, dict, list[str]]:
    if case.image_path.is_file() and is_volume_file(case.image_path):
        return load_volume(case.image_path), {"source_format": "volume"}, []
    if case.series is None:  # an explicit case pointing at a DICOM folder
        case.series, case.selection_reason = _single_series(cfg, case.image_path, privacy)
    from pipeline.dicom.assemble import assemble_series

    assembled = assemble_series(case.series, cfg.ingest.assembly)
    return assembled.volume, {"source_format": "dicom", **assembled.provenance}, list(assembled.warnings)


def _single_series(cfg: Config, folder: Path, privacy: PathPrivacy):
    from pipeline.dicom.scan import scan_export
    from pipeline.dicom.select import select_series

    if not folder.exists():
        raise InputError(f"image folder {privacy.describe(folder) if privacy.full else folder.name} does not exist. "
                         f"Fix the 'image' path in the dataset description.")
    scan = scan_export(folder, workers=cfg.workers)
    chosen = [d for d in select_series(scan.series, cfg.ingest.select) if d.selected]
    if not chosen:
        raise InputError(f"{privacy.describe(folder)} must hold one usable CT series, got none "
                         f"({len(scan.series)} series, "
                         f"{len(scan.skipped)} files skipped). Check the folder or the ingest.select rules.")
    if len(chosen) > 1:
        largest = max(chosen, key=lambda d: d.series.slice_count)
        return largest.series, f"largest of {len(chosen)} qualifying series in the case folder"
    return chosen[0].series, chosen[0].reason


def _read_label(cfg: Config, dataset: DatasetDescription | None, case: CaseSource, image: Volume,
                privacy: PathPrivacy) -> np.ndarray:
    """A NIfTI/NRRD label map on the image's grid, with values the dataset describes."""
    path = case.label_path
    if not path.exists():
        raise InputError(f"label {privacy.describe(path)} does not exist. Fix the 'label' path in the dataset "
                         f"description.")
    from pipeline.labels.labelmap import load_label_map

    label = load_label_map(path, image.grid, image_path=case.image_path)
    if dataset is not None:
        unknown = sorted(set(np.unique(label).tolist()) - dataset.label_values())
        if unknown:
            raise InputError(f"label {privacy.describe(path)} holds values {unknown} that {dataset.path} does not "
                             f"describe "
                             f"(known: {sorted(dataset.label_values())}). Add them to the dataset's labels.")
    return label


def _as_storage_dtype(volume: Volume) -> Volume:
    """Store integral HU as int16 (half the size, exact); anything else as float32."""
    array = volume.array
    if np.issubdtype(array.dtype, np.integer) and array.min(initial=0) >= -32768 and array.max(initial=0) <= 32767:
        return Volume(array.astype(np.int16, copy=False), volume.affine)
    if np.issubdtype(array.dtype, np.floating):
        rounded = np.rint(array)
        if np.array_equal(rounded, array) and array.min(initial=0) >= -32768 and array.max(initial=0) <= 32767:
            return Volume(rounded.astype(np.int16), volume.affine)
    return Volume(array.astype(np.float32, copy=False), volume.affine)


def _write_private_table(out: Path, name: str, header: list[str], rows: list[list]) -> None:
    """A CSV under ``private/`` (owner-only folder and file): the one place full input paths are kept."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    folder = out / "private"
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    atomic.write_text(folder / name, buffer.getvalue())
    os.chmod(folder / name, 0o600)


def _write_private_mapping(out: Path, cases: list[CaseSource]) -> None:
    _write_private_table(out, "sources.csv", ["case_id", "image_source", "label_source"],
                         [[c.id, str(c.image_path), str(c.label_path or "")] for c in cases])
    rows = [c for c in cases if c.private]
    if not rows:
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["case_id", "patient_id", "study_instance_uid", "series_instance_uid"])
    for case in rows:
        writer.writerow([case.id, case.private.get("patient_id", ""), case.private.get("study_uid", ""),
                         case.private.get("series_uid", "")])
    path = out / "private" / "case_mapping.csv"
    atomic.write_text(path, buffer.getvalue())
    os.chmod(path, 0o600)

