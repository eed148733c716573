"""The morning report: per-label volumes and warnings per case, overlay thumbnails, report.html and report.csv.

``report.html`` is self-contained (thumbnails inlined as base64 PNG, no scripts, fonts or links
to fetch), so it opens offline from a USB stick. Thumbnails follow the radiological convention:
axial and coronal views show the patient's right on the viewer's left; axial has anterior at the
top, coronal and sagittal superior at the top, sagittal anterior on the left. Each view is labelled
with its orientation letters and drawn with the true aspect ratio of the voxel spacing.
"""
from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
from pathlib import Path

import numpy as np

from pipeline import atomic
from pipeline.errors import ConfigError
from pipeline.geometry import Grid, voxel_volume_ml
from pipeline.thumbnails import ORIENTATION_LETTERS, VIEW_AXIS, VIEWS, canonical_view, display_plane, display_spacing

WINDOW_HU = (-160.0, 240.0)
FACE_NAMES = {(0, 1): "right", (0, -1): "left", (1, 1): "anterior", (1, -1): "posterior", (2, 1): "superior",
              (2, -1): "inferior"}


# ---------------------------------------------------------------------------------------------
# Per-case statistics and warnings
# ---------------------------------------------------------------------------------------------

def volume_ranges(options) -> dict[str, tuple[float, float]]:
    ranges = {}
    for entry in options.volume_range_ml:
        try:
            name, bounds = entry.split("=", 1)
            low, high = (float(v) for v in bounds.split(":", 1))
        except ValueError:
            raise ConfigError(f"predict.report.volume_range_ml entries must look like 'name=min:max' (mL), got "
                              f"{entry!r}. Example: 'liver=800:3500'.") from None
        ranges[name.strip()] = (low, high)
    if len(options.default_volume_range_ml) != 2:
        raise ConfigError(f"predict.report.default_volume_range_ml must be [min, max] in mL, got "
                          f"{options.default_volume_range_ml}.")
    return ranges


def label_counts(labels: np.ndarray, top: int) -> np.ndarray:
    """Voxels per value 0..top (few labels: one comparison each; many: bincount), in bounded chunks.

    Chunks keep every temporary small: a whole-volume ``labels == value`` is a fresh 78 MB mask per value for a
    512x512x300 map, and fresh memory is paid for in page faults (0.2 s of predict's statistics there).
    """
    flat = labels.ravel(order="K")  # a view of a C- or Fortran-ordered map (counts do not depend on the order)
    if top <= 16:
        counts = np.zeros(top + 1, dtype=np.int64)
        mask = np.empty(min(flat.size, 1 << 20), dtype=bool)
        for start in range(0, flat.size, 1 << 20):
            chunk = flat[start:start + (1 << 20)]
            for value in range(top + 1):
                counts[value] += np.count_nonzero(np.equal(chunk, value, out=mask[:chunk.size]))
        return counts
    counts = np.zeros(max(top + 1, int(flat.max(initial=0)) + 1), dtype=np.int64)
    for start in range(0, flat.size, 1 << 22):
        chunk = np.bincount(flat[start:start + (1 << 22)])
        counts[:len(chunk)] += chunk
    return counts


def _face_name(grid: Grid, axis: int, high_end: bool) -> str:
    outward = grid.direction[:, axis] * (1 if high_end else -1)
    world = int(np.argmax(np.abs(outward)))
    return FACE_NAMES[(world, 1 if outward[world] > 0 else -1)]


def label_statistics(labels: np.ndarray, grid: Grid, label_infos, options) -> tuple[dict, list[str]]:
    """Volume per label (mL) and the report's warnings for one case's source-grid label map."""
    voxel_ml = voxel_volume_ml(grid)
    top = max([0, *(info.value for info in label_infos)])
    counts = label_counts(labels, top)
    faces = {}
    for axis in range(3):
        for high_end in (False, True):
            index = [slice(None)] * 3
            index[axis] = -1 if high_end else 0
            face = labels[tuple(index)]  # a view (np.take copies, slowly, along a non-contiguous axis)
            faces[_face_name(grid, axis, high_end)] = label_counts(face, top)
    ranges = volume_ranges(options)
    low_default, high_default = options.default_volume_range_ml
    volumes, warnings = {}, []
    for info in label_infos:
        voxels = int(counts[info.value]) if info.value < len(counts) else 0
        volume = voxels * voxel_ml
        border = sorted(name for name, face in faces.items() if info.value < len(face) and face[info.value] > 0)
        volumes[info.name] = {"voxels": voxels, "volume_ml": round(volume, 3), "present": voxels > 0,
                              "touches_border": border}
        if voxels == 0:
            warnings.append(f"{info.name}: not found (0 mL)")
            continue
        low, high = ranges.get(info.name, (low_default, high_default))
        if not low <= volume <= high:
            warnings.append(f"{info.name}: implausible volume {volume:.1f} mL (expected {low:g}-{high:g} mL)")
        if border and options.warn_border:
            warnings.append(f"{info.name}: touches the image border ({', '.join(border)}); it may be cut off")
    if not any(v["present"] for v in volumes.values()):
        warnings.insert(0, "empty prediction: no label found")
    return volumes, warnings


# ---------------------------------------------------------------------------------------------
# Thumbnails
# ---------------------------------------------------------------------------------------------

def _overlay(labels2d: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """Labels at 45% opacity with their outlines opaque: similar colours (liver, kidneys) stay apart."""
    rgba = np.zeros((*labels2d.shape, 4), dtype=np.float32)
    present = labels2d > 0
    rgba[present, :3] = colors[labels2d[present]]
    rgba[present, 3] = 0.45
    padded = np.pad(labels2d, 1, mode="edge")
    edge = np.zeros(labels2d.shape, dtype=bool)
    for shift in ((0, 1), (2, 1), (1, 0), (1, 2)):
        edge |= padded[shift[0]:shift[0] + labels2d.shape[0], shift[1]:shift[1] + labels2d.shape[1]] != labels2d
    rgba[present & edge, 3] = 1.0
    return rgba


def write_thumbnail(image: np.ndarray, labels: np.ndarray, grid: Grid, label_infos, path: Path,
                    title: str = "") -> Path:
    """Axial, coronal and sagittal overlays through the labels' centre (radiological convention)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ct, spacing = canonical_view(image, grid)
    lab, _ = canonical_view(labels, grid)
    top = max([0, *(info.value for info in label_infos)])
    colors = np.zeros((top + 1, 3), dtype=np.float32)
    for info in label_infos:
        colors[info.value] = np.asarray(info.color, dtype=np.float32) / 255.0
    centre = _centre(lab)
    # each view: 2D arrays as displayed [row, column], plus the aspect (row spacing / column spacing)
    views = []
    for name in VIEWS:
        row_spacing, column_spacing = display_spacing(name, spacing)
        index = centre[VIEW_AXIS[name]]
        views.append((name, display_plane(ct, name, index), display_plane(lab, name, index),
                      row_spacing / column_spacing, ORIENTATION_LETTERS[name]))
    present = [info for info in label_infos if info.value <= lab.max() and np.any(lab == info.value)]
    figure = Figure(figsize=(9.0, 3.3 + (0.3 if present else 0.0)), dpi=72)
    FigureCanvasAgg(figure)
    for n, (name, ct_rows, lab_rows, aspect, letters) in enumerate(views):
        axes = figure.add_subplot(1, 3, n + 1)
        axes.imshow(ct_rows, cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], aspect=aspect,
                    interpolation="nearest")
        axes.imshow(_overlay(lab_rows, colors), aspect=aspect, interpolation="nearest")
        axes.set_title(name, fontsize=9)
        axes.set_xticks([])
        axes.set_yticks([])
        top_letter, bottom_letter, left_letter, right_letter = letters
        for text, x, y, ha, va in ((top_letter, 0.5, 0.98, "center", "top"), (bottom_letter, 0.5, 0.02, "center",
                                   "bottom"), (left_letter, 0.02, 0.5, "left", "center"),
                                   (right_letter, 0.98, 0.5, "right", "center")):
            axes.text(x, y, text, color="yellow", fontsize=8, ha=ha, va=va, transform=axes.transAxes)
    if title:
        figure.suptitle(title, fontsize=9)
    if present:  # the colour legend travels with the picture
        from matplotlib.patches import Patch

        handles = [Patch(facecolor=colors[info.value], edgecolor="black", label=info.name) for info in present]
        figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.08 if present else 0, 1, 1))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic.write_bytes(path, buffer.getvalue())
    return Path(path)


def _centre(labels: np.ndarray) -> tuple[int, int, int]:
    """Centre of the labelled voxels (middle of the volume when there are none), from cheap projections."""
    centre = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        profile = np.count_nonzero(labels, axis=other) if labels.size < 5e7 else \
            np.count_nonzero(labels[tuple(slice(None, None, 2) if a in other else slice(None) for a in range(3))],
                             axis=other)
        total = profile.sum()
        centre.append(int(round(float((profile * np.arange(len(profile))).sum() / total))) if total
                      else labels.shape[axis] // 2)
    return tuple(centre)


# ---------------------------------------------------------------------------------------------
# report.html and report.csv
# ---------------------------------------------------------------------------------------------

def write_csv(path: Path, rows, label_names: list[str]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["case_id", "status", "confidence", "needs_review", "seconds", "attempts", "input", "error",
                     "warnings"] + [f"{name}_ml" for name in label_names])
    for row in rows:
        volumes = row.summary.get("volumes", {})
        trust = row.summary.get("trust") or {}
        writer.writerow([row.case_id, row.status, trust.get("confidence", ""),
                         "" if not trust else ("yes" if trust.get("needs_review") else "no"),
                         row.seconds if row.seconds is not None else "", row.attempts,
                         row.input, row.error or "", "; ".join(row.warnings)] +
                        [volumes.get(name, {}).get("volume_ml", "") for name in label_names])
    atomic.write_text(path, buffer.getvalue())
    return Path(path)


def _thumbnail_tag(folder: Path, row) -> str:
    entry = row.outputs.get("thumbnail") if row.outputs else None
    if not entry:
        return ""
    path = folder / entry["path"]
    try:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError:
        return "<em>thumbnail missing</em>"
    return f'<img alt="{html.escape(row.case_id)} overlays" src="data:image/png;base64,{data}">'


_STYLE = """
body{font-family:sans-serif;margin:1.5em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:0.6em 0;max-width:100%}
th,td{border:1px solid #bbb;padding:4px 8px;vertical-align:top;text-align:left;font-size:13px;overflow-wrap:anywhere}
th{background:#eee}
.ok{color:#176317;font-weight:bold}.failed{color:#b00;font-weight:bold}.pending,.running{color:#a60}
.warn{color:#a60}.summary td{font-size:14px}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;margin:0.5em 0;padding:0;list-style:none}
.swatch{display:inline-block;width:14px;height:14px;border:1px solid #333;vertical-align:middle;margin-right:4px}
section.case{border-top:2px solid #ccc;padding:0.4em 0 1em 0}
section.case h2{font-size:16px;margin:0.3em 0}
.case-body{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
.notes{flex:1 1 320px;min-width:0;font-size:13px}
.notes div{overflow-wrap:anywhere;margin:2px 0}
.files{font-size:12px;color:#555;overflow-wrap:anywhere}
img{max-width:100%;height:auto;display:block}
"""


def _css_color(color) -> str:
    values = list(color or [128, 128, 128])[:3]
    if values and all(isinstance(v, float) for v in values) and max(values) <= 1.0:
        values = [round(v * 255) for v in values]
    return "rgb({},{},{})".format(*(int(v) for v in values))


def _swatch(color) -> str:
    return f"<span class='swatch' style='background:{_css_color(color)}'></span>"


def write_html(path: Path, folder: Path, rows, summary: dict, label_names: list[str],
               label_colors: list | None = None) -> Path:
    """report.html: the summary, a colour legend, an overview table, then one section per case.

    Each case's section holds its volumes (with the label colours), its warnings, which wrap instead
    of widening the page, the files written, and the thumbnails on a row of their own (never behind
    a horizontal scrollbar).
    """
    colors = list(label_colors or [None] * len(label_names))
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>ctseg predict report</title>",
             f"<style>{_STYLE}</style></head><body>", "<h1>ctseg predict: morning report</h1>",
             "<table class='summary'>"]
    for key, value in summary.items():
        parts.append(f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(str(value))}</td></tr>")
    parts.append("</table>")
    parts.append("<ul class='legend' aria-label='label colours'>" + "".join(
        f"<li>{_swatch(color)}{html.escape(name)}</li>" for name, color in zip(label_names, colors)) + "</ul>")
    parts.append("<p>Thumbnails are in the radiological convention: the patient's right is on the viewer's left "
                 "(axial: anterior at the top; coronal and sagittal: superior at the top; sagittal: anterior on the "
                 "left). Letters on each view name the patient directions. Aspect ratios follow the voxel "
                 "spacing. Labels are drawn at 45% opacity with opaque outlines, in the colours above.</p>")
    parts.append("<p>Cases are listed least trustworthy first: failed cases, then by increasing confidence (see "
                 "the README: entropy, agreement between ensemble members, and one halving per flag).</p>")
    parts.append("<table class='overview'><tr><th>case</th><th>status</th><th>confidence</th><th>seconds</th>"
                 "<th>warnings</th></tr>")
    for row in rows:
        status = "ok" if row.status == "done" else row.status
        seconds = f"{row.seconds:.1f}" if row.seconds is not None else ""
        count = "error" if row.error else (str(len(row.warnings)) if row.warnings else "")
        trust = row.summary.get("trust") or {}
        confidence = "" if not trust else (f"{trust['confidence']:.3f}" +
                                           ("<br><span class='failed'>needs review</span>" if trust.get("needs_review")
                                            else ""))
        parts.append(f"<tr><td><a href='#{html.escape(row.case_id)}'>{html.escape(row.case_id)}</a></td>"
                     f"<td class='{html.escape(status)}'>{html.escape(status)}</td><td>{confidence}</td>"
                     f"<td>{seconds}</td><td>{count}</td></tr>")
    parts.append("</table>")
    for row in rows:
        parts.append(_case_section(folder, row, label_names, colors))
    parts.append("</body></html>")
    atomic.write_text(path, "\n".join(parts) + "\n")
    return Path(path)


def _case_section(folder: Path, row, label_names: list[str], colors: list) -> str:
    volumes = row.summary.get("volumes", {})
    status = "ok" if row.status == "done" else row.status
    seconds = f" in {row.seconds:.1f} s" if row.seconds is not None else ""
    lines = [f"<section class='case' id='{html.escape(row.case_id)}'>",
             f"<h2>{html.escape(row.case_id)} <span class='{html.escape(status)}'>{html.escape(status)}</span>"
             f"<small>{seconds}</small></h2>", f"<div class='files'>input: {html.escape(row.input)}</div>",
             "<div class='case-body'>"]
    if volumes:
        lines.append("<table class='volumes'><tr><th>label</th><th>mL</th></tr>" + "".join(
            f"<tr><td>{_swatch(color)}{html.escape(name)}</td>"
            f"<td>{volumes.get(name, {}).get('volume_ml', '')}</td></tr>"
            for name, color in zip(label_names, colors)) + "</table>")
    notes = [f"<div class='failed'>{html.escape(row.error)}</div>"] if row.error else []
    notes += [f"<div class='warn'>{html.escape(w)}</div>" for w in row.warnings]
    if not notes and row.status == "done":
        notes.append("<div class='ok'>no warnings</div>")
    files = sorted(entry["path"] for entry in (row.outputs or {}).values())
    if files:
        notes.append(f"<div class='files'>files: {html.escape(', '.join(files))}</div>")
    lines.append(f"<div class='notes'>{''.join(notes)}</div>")
    lines.append("</div>")
    lines.append(_thumbnail_tag(folder, row))
    lines.append("</section>")
    return "\n".join(lines)


def summary_block(rows, model_dir: Path, device: str, total_seconds: float, skipped: list[str] | None = None
                  ) -> dict:
    counts = {status: sum(r.status == status for r in rows) for status in ("done", "failed", "running", "pending")}
    block = {
        "generated": _dt.datetime.now().isoformat(timespec="seconds"),
        "cases": len(rows),
        "ok": counts["done"],
        "failed": counts["failed"],
        "not finished": counts["running"] + counts["pending"],
        "with warnings": sum(bool(r.warnings) for r in rows if r.status == "done"),
        "total case time (s)": round(sum(r.seconds or 0.0 for r in rows if r.status == "done"), 1),
        "this run's wall time (s)": round(total_seconds, 1),
        "model": str(model_dir),
        "device": device,
    }
    if skipped:
        block["inputs passed over"] = f"{len(skipped)} (see report.json)"
    return block
