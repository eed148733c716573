"""The ingest stage: finds cases, reads them in HU with exact geometry, and writes the training layout.

Output layout (``outputs/<experiment>/ingest/`` or ``--output DIR``)::

    imagesTr/<case>_0000.nii.gz   labelsTr/<case>.nii.gz     cases with role "train"
    imagesTs/<case>_0000.nii.gz   labelsTs/<case>.nii.gz     held-out cases (label when known)
    provenance/<case>.json        source UIDs, chosen series and rule, corrections, warnings
    manifest.json                 what later stages read
    series.csv / series.json      every scanned series and why it was or was not selected
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

Case ids from a scanned export are ``case_<hash of study+series UID>``: stable across reruns and free
of patient names or IDs, and sanitised so that no tag value can write outside the output folder.
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import atomic
from pipeline.config import Config, section_hash
from pipeline.dataset import DatasetCase, DatasetDescription, load_dataset
from pipeline.errors import CaseError, ConfigError, CtsegError, InputError
from pipeline.geometry import Volume
from pipeline.stage import StageRun, check_output_outside_inputs, safe_name
from pipeline.volume_io import is_volume_file, load_volume, save_nifti, strip_volume_suffix

log = logging.getLogger("ctseg")

MANIFEST = "manifest.json"


@dataclass
class CaseSource:
    """Where one case comes from: a DICOM series (scanned) or a volume file, plus its label source."""

    id: str
    role: str
    image_path: Path
    series: object | None = None        # pipeline.dicom.scan.SeriesInfo for DICOM images
    selection_reason: str = ""
    label_path: Path | None = None
    private: dict = field(default_factory=dict)


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
    run = StageRun.open("ingest", out, section_hash(cfg.ingest, inputs_key), force=force)
    if run.skipped_up_to_date:
        log.info("ingest: %s is up to date (config and inputs unchanged); nothing to do", out)
        return {"stage": "ingest", "status": "up_to_date", "folder": str(out)}
    privacy = PathPrivacy([source, dataset_root, Path(dataset.path).parent if dataset is not None else None],
                          cfg.ingest.full_paths)
    run.redact = privacy.redact

    cases, scan_summary = discover_cases(cfg, dataset, source, out, privacy)
    run.extra["scan"] = scan_summary
    manifest_cases = []
    for case in cases:
        inputs = {"image": privacy.describe(case.image_path), "label": privacy.describe(case.label_path)}
        with run.case(case.id, inputs) as record:
            if record is None:  # done in an earlier, interrupted run
                manifest_cases.append(run.records[case.id].extra["manifest"])
                continue
            entry = ingest_case(cfg, dataset, case, out, record, privacy)
            record.extra["manifest"] = entry
            manifest_cases.append(entry)
    _write_private_mapping(out, cases)
    if not manifest_cases and cases:
        first = run.failed[0].error if run.failed else "unknown"
        run.finish(complete=False)
        raise InputError(f"no case could be ingested; the first error was: {first}")
    labels = dataset.label_json() if dataset else []
    atomic.write_json(out / MANIFEST, {"format": "ctseg-ingest/1", "labels": labels,
                                       "cases": sorted(manifest_cases, key=lambda c: c["id"])})
    # a failed case has its reason in report.json and cases/; the others are complete (exit 3, see cli)
    report = run.finish(allow_failed=True)
    return report


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
    volumes = sorted(p for p in root.rglob("*") if p.is_file() and is_volume_file(p))
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
    from pipeline.dicom.scan import labels_for, scan_export
    from pipeline.dicom.select import select_series, write_series_table

    scan = scan_export(root, workers=cfg.workers)
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
        case_id = _case_id(cfg, series)
        matches = labels_for(series, scan.series)
        label = Path(matches[0].label.files[0]) if matches else None
        cases.append(CaseSource(case_id, "train", root / series.folder, series=series,
                                selection_reason=decision.reason, label_path=label,
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


def _case_id(cfg: Config, series) -> str:
    if cfg.ingest.anonymise_case_ids:
        digest = hashlib.sha256(f"{series.study_uid}|{series.series_uid}|{series.key}".encode()).hexdigest()
        return f"case_{digest[:10]}"
    return safe_name(f"{series.patient_id}_{series.series_number}")


# ---------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------

def ingest_case(cfg: Config, dataset: DatasetDescription | None, case: CaseSource, out: Path, record,
                privacy: PathPrivacy | None = None) -> dict:
    privacy = privacy or PathPrivacy([], True)
    try:
        image, provenance, warnings = _read_image(cfg, case, privacy)
        from pipeline.dicom.plausibility import check_training_volume

        warnings += check_training_volume(image, f"case {case.id}", cfg.ingest.plausibility)
        label = _read_label(cfg, dataset, case, image, privacy) if case.label_path else None
    except CtsegError as exc:
        raise CaseError(case.id, str(exc)) from exc
    except (OSError, ValueError, KeyError, AttributeError, IndexError) as exc:
        raise CaseError(case.id, f"{privacy.describe(case.image_path)} could not be ingested ({type(exc).__name__}: "
                                 f"{exc}). Check that the files are complete; run with --debug for details.") from exc
    warnings = [privacy.redact(w) for w in warnings]

    split = "Tr" if case.role == "train" else "Ts"
    image_rel = f"images{split}/{case.id}_0000.nii.gz"
    label_rel = f"labels{split}/{case.id}.nii.gz" if label is not None else None
    try:
        save_nifti(_as_storage_dtype(image), out / image_rel, compresslevel=cfg.ingest.compresslevel)
        if label is not None:
            dtype = np.uint8 if label.max(initial=0) < 256 else np.uint16
            save_nifti(Volume(label.astype(dtype), image.affine), out / label_rel)
    except BaseException:  # a failed case leaves no output under its final name (e.g. only the image)
        for rel in (image_rel, label_rel):
            if rel and (out / rel).exists():
                (out / rel).unlink()
        raise
    series_folder = case.image_path if case.image_path.is_dir() else case.image_path.parent
    provenance = {**provenance, "case": case.id, "role": case.role,
                  "image_source": privacy.describe(case.image_path),
                  "label_source": privacy.relative(case.label_path, series_folder),
                  "selected_because": case.selection_reason or "listed in the dataset description",
                  "warnings": warnings}
    provenance_rel = f"provenance/{case.id}.json"
    atomic.write_json(out / provenance_rel, provenance)
    record.outputs = {"image": str(out / image_rel), "label": str(out / label_rel) if label_rel else None,
                      "provenance": str(out / provenance_rel)}
    record.outputs = {k: v for k, v in record.outputs.items() if v}
    record.warnings = warnings
    for warning in warnings:
        log.warning("ingest: case %s: %s", case.id, warning)
    return {"id": case.id, "role": case.role, "image": image_rel, "label": label_rel, "provenance": provenance_rel}


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
    path = case.label_path
    if not path.exists():
        raise InputError(f"label {privacy.describe(path)} does not exist. Fix the 'label' path in the dataset "
                         f"description.")
    specs = dataset.labels if dataset else []
    if is_volume_file(path):
        from pipeline.labels.labelmap import load_label_map

        label = load_label_map(path, image.grid, image_path=case.image_path)
    else:
        label = _read_dicom_label(path, image, specs, privacy.describe(path))
    if dataset is not None:
        unknown = sorted(set(np.unique(label).tolist()) - dataset.label_values())
        if unknown:
            raise InputError(f"label {privacy.describe(path)} holds values {unknown} that {dataset.path} does not "
                             f"describe "
                             f"(known: {sorted(dataset.label_values())}). Add them to the dataset's labels.")
    return label


def _read_dicom_label(path: Path, image: Volume, specs, name: str) -> np.ndarray:
    import pydicom

    modality = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"]).get("Modality", "")
    if not specs:
        raise InputError(f"reading {modality or 'DICOM'} labels from {name} needs a dataset description that "
                         f"maps ROI names to label values. Pass --set dataset=datasets/<name>/dataset.yaml.")
    from pipeline.labels.names import map_names_to_values, merge_masks

    foreground = [spec for spec in specs if spec.value]
    if modality == "RTSTRUCT":
        from pipeline.labels.rtstruct import rasterise_rtstruct, read_rtstruct

        names = [roi.name for roi in read_rtstruct(path)]
        mapping = map_names_to_values(names, foreground, source=name)
        return merge_masks(rasterise_rtstruct(path, image.grid, list(mapping)), mapping)
    if modality == "SEG":
        from pipeline.labels.seg import read_dicom_seg

        _, segment_names = read_dicom_seg(path, image.grid)
        mapping = map_names_to_values(list(segment_names.values()), foreground, source=name)
        to_value = {number: mapping[name] for number, name in segment_names.items() if name in mapping}
        label, _ = read_dicom_seg(path, image.grid, segment_to_value=to_value)
        return label
    raise InputError(f"label {name} must be an RTSTRUCT, a DICOM SEG, or a NIfTI/NRRD label map, "
                     f"got DICOM modality '{modality}'.")


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


def read_manifest(ingest_dir: Path) -> dict:
    import json

    path = Path(ingest_dir) / MANIFEST
    if not path.is_file():
        raise CtsegError(f"{path} must exist: run 'ctseg ingest' first.")
    return json.loads(path.read_text())
