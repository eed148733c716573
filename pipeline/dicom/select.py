"""Series selection: which scanned series ingest turns into volumes, and why the others are skipped.

Default rules keep original, primary, axial CT images (CT Image Storage, Enhanced CT or Legacy
Converted Enhanced CT) with enough slices, and skip localizers, secondary captures, derived images,
other modalities and label objects. Every series gets one decision with a reason, written to
``series.csv``/``series.json`` by :func:`write_series_table` (no patient name or ID in it).
"""
from __future__ import annotations

import csv
import io
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from pipeline import atomic
from pipeline.dicom.header import (
    CT_IMAGE_STORAGE,
    CT_SOP_CLASSES,
    ENHANCED_CT_IMAGE_STORAGE,
    LEGACY_ENHANCED_CT_IMAGE_STORAGE,
    SECONDARY_CAPTURE_SOP_CLASSES,
)
from pipeline.dicom.scan import SeriesInfo, _patient_hash
from pipeline.errors import ConfigError
from pipeline.ingest.options import SelectionRules  # the ingest section's settings; re-exported here

SOP_CLASS_NAMES = {
    CT_IMAGE_STORAGE: "CT Image Storage",
    ENHANCED_CT_IMAGE_STORAGE: "Enhanced CT Image Storage",
    LEGACY_ENHANCED_CT_IMAGE_STORAGE: "Legacy Converted Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.128": "PET Image Storage",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT Structure Set Storage",
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage",
    **{uid: "Secondary Capture Image Storage" for uid in SECONDARY_CAPTURE_SOP_CLASSES},
}


@dataclass
class SeriesDecision:
    """Whether one series is kept, and why (or why not)."""

    series: SeriesInfo
    selected: bool
    reason: str


def select_series(series: list[SeriesInfo], rules: SelectionRules | None = None) -> list[SeriesDecision]:
    """Decide for every series whether ingest keeps it; one decision per series, in input order."""
    rules = rules or SelectionRules()
    _validate(rules)
    decisions = []
    for info in series:
        problems = _problems(info, rules)
        decisions.append(SeriesDecision(info, not problems, "; ".join(problems) if problems else
                                        "qualifies"))
    if rules.policy == "largest":
        _keep_largest_per_study(decisions)
    for decision in decisions:
        if decision.selected and decision.reason == "qualifies":
            decision.reason = "selected: " + _summary(decision.series)
    return decisions


def _validate(rules: SelectionRules) -> None:
    for name in ("description_regex", "exclude_description_regex", "kernel_regex"):
        pattern = getattr(rules, name)
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"selection.{name} must be a valid regular expression, got '{pattern}' ({exc}). "
                              f"Fix the pattern, e.g. 'BRAIN|HEAD'.") from exc
    if rules.slice_thickness_range and len(rules.slice_thickness_range) != 2:
        raise ConfigError(f"selection.slice_thickness_range must be [min, max] in mm or empty, got "
                          f"{rules.slice_thickness_range}. Write e.g. [0.5, 5.0].")
    unknown = set(o.lower() for o in rules.allowed_orientations) - {"axial", "coronal", "sagittal"}
    if unknown:
        raise ConfigError(f"selection.allowed_orientations must hold axial, coronal or sagittal, got "
                          f"{sorted(unknown)}. Remove the unknown values.")
    if rules.policy not in ("largest", "all"):
        raise ConfigError(f"selection.policy must be 'largest' or 'all', got '{rules.policy}'.")


def _problems(info: SeriesInfo, rules: SelectionRules) -> list[str]:
    """Every reason why ``info`` does not qualify (empty when it does)."""
    modalities = [m.upper() for m in rules.modalities]
    if info.modality not in modalities:
        what = "label object" if info.modality in ("RTSTRUCT", "SEG") else "not a kept modality"
        return [f"modality {info.modality or 'missing'} ({what})"]
    if not info.is_image:
        return ["no image pixel data"]
    problems = []
    if info.sop_class_uid in SECONDARY_CAPTURE_SOP_CLASSES:
        if not rules.allow_secondary_capture:
            problems.append("secondary capture SOP class")
    elif info.sop_class_uid not in CT_SOP_CLASSES:
        problems.append(f"SOP class {SOP_CLASS_NAMES.get(info.sop_class_uid, info.sop_class_uid)} is not a CT "
                        f"image storage class")
    image_type = set(info.image_type)
    if "LOCALIZER" in image_type or "SCOUT" in image_type or "TOPOGRAM" in image_type:
        problems.append(f"localizer (ImageType {'LOCALIZER' if 'LOCALIZER' in image_type else 'SCOUT'})")
    elif not rules.allow_derived and (image_type & {"DERIVED", "SECONDARY"}):
        problems.append(f"derived image (ImageType {_backslash_joined(info.image_type)})")
    allowed = [o.lower() for o in rules.allowed_orientations]
    if info.orientation is None or info.pixel_spacing is None:
        problems.append("no ImageOrientationPatient/PixelSpacing: not a cross-sectional image")
    elif info.orientation_label not in allowed:
        problems.append(f"not {' or '.join(allowed)}: orientation is {info.orientation_label}")
    if info.slice_count < rules.min_slices:
        problems.append(f"{info.slice_count} slice{'s' if info.slice_count != 1 else ''} < min_slices "
                        f"{rules.min_slices}")
    if rules.slice_thickness_range:
        low, high = rules.slice_thickness_range
        thickness = info.slice_thickness or info.slice_spacing
        if thickness is None or not low <= thickness <= high:
            problems.append(f"slice thickness {_mm(thickness)} outside [{low:g}, {high:g}] mm")
    if rules.description_regex and not re.search(rules.description_regex, info.series_description, re.I):
        problems.append(f"description does not match '{rules.description_regex}'")
    if rules.exclude_description_regex and re.search(rules.exclude_description_regex,
                                                     info.series_description, re.I):
        problems.append(f"description matches exclude pattern '{rules.exclude_description_regex}'")
    if rules.kernel_regex and not re.search(rules.kernel_regex, info.convolution_kernel, re.I):
        problems.append(f"kernel '{info.convolution_kernel}' does not match '{rules.kernel_regex}'")
    return problems


def _backslash_joined(values) -> str:
    return "\\".join(values)


def _mm(value: float | None) -> str:
    return "unknown" if value is None else f"{value:g} mm"


def _keep_largest_per_study(decisions: list[SeriesDecision]) -> None:
    by_study: dict[str, list[SeriesDecision]] = defaultdict(list)
    for decision in decisions:
        if decision.selected:
            by_study[_study_key(decision.series)].append(decision)
    for members in by_study.values():
        if len(members) < 2:
            continue
        # most slices; then the thinnest slices; then the key, so the choice is reproducible
        best = min(members, key=lambda d: (-d.series.slice_count, d.series.slice_spacing or 1e9, d.series.key))
        for decision in members:
            if decision is not best:
                decision.selected = False
                decision.reason = (f"policy largest: {decision.series.slice_count} slices, the study's largest "
                                   f"qualifying series [{best.series.short_key}] has {best.series.slice_count}")


def _study_key(info: SeriesInfo) -> str:
    if info.study_uid:
        return f"study:{info.study_uid}"
    return f"folder:{info.folder}|patient:{_patient_hash(info.patient_id)}"


def _summary(info: SeriesInfo) -> str:
    spacing = info.spacing
    spacing_text = "x".join(f"{v:.3g}" for v in spacing) if spacing else "unknown"
    return f"{info.slice_count} slices, {spacing_text} mm, {info.orientation_label}"


# ---------------------------------------------------------------------------------------------
# series.csv / series.json
# ---------------------------------------------------------------------------------------------

TABLE_COLUMNS = ("series_key", "modality", "sop_class", "image_type", "description", "series_number",
                 "slice_count", "rows", "columns", "spacing_mm", "slice_thickness_mm", "orientation",
                 "obliquity_deg", "tilt_deg", "kernel", "part", "split_reason", "selected", "reason")


def series_row(decision: SeriesDecision) -> dict:
    """One table row: what the series is and the decision. Holds no patient name or ID."""
    info = decision.series
    return {
        "series_key": info.short_key,
        "modality": info.modality,
        "sop_class": SOP_CLASS_NAMES.get(info.sop_class_uid, info.sop_class_uid),
        "image_type": "\\".join(info.image_type),
        "description": info.series_description,
        "series_number": info.series_number,
        "slice_count": info.slice_count,
        "rows": info.rows,
        "columns": info.columns,
        "spacing_mm": [round(v, 6) for v in info.spacing] if info.spacing else None,
        "slice_thickness_mm": info.slice_thickness,
        "orientation": info.orientation_label,
        "obliquity_deg": round(info.obliquity_deg, 3),
        "tilt_deg": round(info.tilt_deg, 3),
        "kernel": info.convolution_kernel,
        "part": info.part,
        "split_reason": info.split_reason,
        "selected": decision.selected,
        "reason": decision.reason,
    }


def write_series_table(decisions: list[SeriesDecision], folder: Path) -> tuple[Path, Path]:
    """Write ``series.csv`` and ``series.json`` (one row per series) atomically into ``folder``."""
    folder = Path(folder)
    rows = [series_row(d) for d in decisions]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=TABLE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("x".join(f"{v:g}" for v in row[k]) if isinstance(row[k], list) else
                             "" if row[k] is None else row[k]) for k in TABLE_COLUMNS})
    csv_path, json_path = folder / "series.csv", folder / "series.json"
    atomic.write_text(csv_path, buffer.getvalue())
    atomic.write_json(json_path, {"series": rows})
    return csv_path, json_path
