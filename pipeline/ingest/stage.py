"""The ingest stage: finds cases, reads them in HU with exact geometry, and writes the training layout.

Output layout (``outputs/<experiment>/ingest/`` or ``--output DIR``)::

    imagesTr/<case>_0000.nii.gz   labelsTr/<case>.nii.gz     cases with role "train"
    imagesTs/<case>_0000.nii.gz   labelsTs/<case>.nii.gz     held-out cases (label when known)
    provenance/<case>.json        source UIDs, chosen series and rule, corrections, warnings
    manifest.json                 what later stages read
    series.csv / series.json      every scanned series and why it was or was not selected
    private/case_mapping.csv      case id → patient ID and UIDs (the only place patient IDs appear)
    report.json, done.json        the stage contract (pipeline.stage)

Case ids from a scanned export are ``case_<hash of study+series UID>``: stable across reruns and free
of patient names or IDs, and sanitised so that no tag value can write outside the output folder.
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import atomic
from pipeline.config import Config, section_hash
from pipeline.dataset import DatasetCase, DatasetDescription, load_dataset
from pipeline.errors import CaseError, ConfigError, CtsegError, InputError
from pipeline.geometry import Volume
from pipeline.stage import StageRun, safe_name
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


def run_ingest(cfg: Config, source: Path | None = None, output: Path | None = None, force: bool = False) -> dict:
    """Ingest the dataset of ``cfg`` (or the export ``source``) into ``output`` (default: the experiment)."""
    dataset = load_dataset(cfg.dataset) if cfg.dataset else None
    if source is None and dataset is None:
        raise ConfigError("ingest needs an input: give an export folder (ctseg ingest EXPORT --output DIR) or a "
                          "dataset description (--set dataset=datasets/<name>/dataset.yaml).")
    out = Path(output) if output else cfg.stage_dir("ingest")
    inputs_key = {"source": str(Path(source).resolve()) if source else None,
                  "dataset": dataset.content_hash() if dataset else None}
    run = StageRun.open("ingest", out, section_hash(cfg.ingest, inputs_key), force=force)
    if run.skipped_up_to_date:
        log.info("ingest: %s is up to date (config and inputs unchanged); nothing to do", out)
        return {"stage": "ingest", "status": "up_to_date", "folder": str(out)}

    cases, scan_summary = discover_cases(cfg, dataset, Path(source) if source else None, out)
    run.extra["scan"] = scan_summary
    manifest_cases = []
    for case in cases:
        inputs = {"image": str(case.image_path), "label": str(case.label_path) if case.label_path else None}
        with run.case(case.id, inputs) as record:
            if record is None:  # done in an earlier, interrupted run
                manifest_cases.append(run.records[case.id].extra["manifest"])
                continue
            entry = ingest_case(cfg, dataset, case, out, record)
            record.extra["manifest"] = entry
            manifest_cases.append(entry)
    if not manifest_cases and cases:
        first = run.failed[0].error if run.failed else "unknown"
        run.finish(complete=False)
        raise InputError(f"no case could be ingested; the first error was: {first}")
    labels = dataset.label_json() if dataset else []
    atomic.write_json(out / MANIFEST, {"format": "ctseg-ingest/1", "labels": labels,
                                       "cases": sorted(manifest_cases, key=lambda c: c["id"])})
    _write_private_mapping(out, cases)
    report = run.finish()
    return report


# ---------------------------------------------------------------------------------------------
# Finding cases
# ---------------------------------------------------------------------------------------------

def discover_cases(cfg: Config, dataset: DatasetDescription | None, source: Path | None,
                   out: Path) -> tuple[list[CaseSource], dict]:
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
    cases, summary = _scanned_cases(cfg, root, out)
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


def _scanned_cases(cfg: Config, root: Path, out: Path) -> tuple[list[CaseSource], dict]:
    from pipeline.dicom.scan import labels_for, scan_export
    from pipeline.dicom.select import select_series, write_series_table

    scan = scan_export(root, workers=cfg.workers)
    for skipped in scan.skipped:
        log.info("ingest: skipped %s (%s)", skipped.path, skipped.reason)
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
               "skipped_files": [{"path": str(s.path), "reason": s.reason} for s in scan.skipped]}
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

def ingest_case(cfg: Config, dataset: DatasetDescription | None, case: CaseSource, out: Path, record) -> dict:
    try:
        image, provenance, warnings = _read_image(cfg, case)
        from pipeline.dicom.plausibility import check_plausibility

        warnings += check_plausibility(image, f"case {case.id}", cfg.ingest.plausibility)
        label = _read_label(cfg, dataset, case, image) if case.label_path else None
    except CtsegError as exc:
        raise CaseError(case.id, str(exc)) from exc
    except (OSError, ValueError, KeyError, AttributeError, IndexError) as exc:
        raise CaseError(case.id, f"{case.image_path} could not be ingested ({type(exc).__name__}: {exc}). "
                                 f"Check that the files are complete; run with --debug for details.") from exc

    split = "Tr" if case.role == "train" else "Ts"
    image_rel = f"images{split}/{case.id}_0000.nii.gz"
    save_nifti(_as_storage_dtype(image), out / image_rel, compresslevel=cfg.ingest.compresslevel)
    label_rel = None
    if label is not None:
        label_rel = f"labels{split}/{case.id}.nii.gz"
        dtype = np.uint8 if label.max(initial=0) < 256 else np.uint16
        save_nifti(Volume(label.astype(dtype), image.affine), out / label_rel)
    provenance = {**provenance, "case": case.id, "role": case.role, "image_source": str(case.image_path),
                  "label_source": str(case.label_path) if case.label_path else None,
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


def _read_image(cfg: Config, case: CaseSource) -> tuple[Volume, dict, list[str]]:
    if case.image_path.is_file() and is_volume_file(case.image_path):
        return load_volume(case.image_path), {"source_format": "volume"}, []
    if case.series is None:  # an explicit case pointing at a DICOM folder
        case.series, case.selection_reason = _single_series(cfg, case.image_path)
    from pipeline.dicom.assemble import assemble_series

    assembled = assemble_series(case.series, cfg.ingest.assembly)
    return assembled.volume, {"source_format": "dicom", **assembled.provenance}, list(assembled.warnings)


def _single_series(cfg: Config, folder: Path):
    from pipeline.dicom.scan import scan_export
    from pipeline.dicom.select import select_series

    if not folder.exists():
        raise InputError(f"image folder {folder} does not exist. Fix the 'image' path in the dataset description.")
    scan = scan_export(folder, workers=cfg.workers)
    chosen = [d for d in select_series(scan.series, cfg.ingest.select) if d.selected]
    if not chosen:
        raise InputError(f"{folder} must hold one usable CT series, got none ({len(scan.series)} series, "
                         f"{len(scan.skipped)} files skipped). Check the folder or the ingest.select rules.")
    if len(chosen) > 1:
        largest = max(chosen, key=lambda d: d.series.slice_count)
        return largest.series, f"largest of {len(chosen)} qualifying series in the case folder"
    return chosen[0].series, chosen[0].reason


def _read_label(cfg: Config, dataset: DatasetDescription | None, case: CaseSource, image: Volume) -> np.ndarray:
    path = case.label_path
    if not path.exists():
        raise InputError(f"label {path} does not exist. Fix the 'label' path in the dataset description.")
    specs = dataset.labels if dataset else []
    if is_volume_file(path):
        from pipeline.labels.labelmap import load_label_map

        label = load_label_map(path, image.grid, image_path=case.image_path)
    else:
        label = _read_dicom_label(path, image, specs)
    if dataset is not None:
        unknown = sorted(set(np.unique(label).tolist()) - dataset.label_values())
        if unknown:
            raise InputError(f"label {path} holds values {unknown} that {dataset.path} does not describe "
                             f"(known: {sorted(dataset.label_values())}). Add them to the dataset's labels.")
    return label


def _read_dicom_label(path: Path, image: Volume, specs) -> np.ndarray:
    import pydicom

    modality = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"]).get("Modality", "")
    if not specs:
        raise InputError(f"reading {modality or 'DICOM'} labels from {path} needs a dataset description that "
                         f"maps ROI names to label values. Pass --set dataset=datasets/<name>/dataset.yaml.")
    from pipeline.labels.names import map_names_to_values, merge_masks

    foreground = [spec for spec in specs if spec.value]
    if modality == "RTSTRUCT":
        from pipeline.labels.rtstruct import rasterise_rtstruct, read_rtstruct

        names = [roi.name for roi in read_rtstruct(path)]
        mapping = map_names_to_values(names, foreground, source=str(path))
        return merge_masks(rasterise_rtstruct(path, image.grid, list(mapping)), mapping)
    if modality == "SEG":
        from pipeline.labels.seg import read_dicom_seg

        _, segment_names = read_dicom_seg(path, image.grid)
        mapping = map_names_to_values(list(segment_names.values()), foreground, source=str(path))
        to_value = {number: mapping[name] for number, name in segment_names.items() if name in mapping}
        label, _ = read_dicom_seg(path, image.grid, segment_to_value=to_value)
        return label
    raise InputError(f"label {path} must be an RTSTRUCT, a DICOM SEG, or a NIfTI/NRRD label map, "
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


def _write_private_mapping(out: Path, cases: list[CaseSource]) -> None:
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
