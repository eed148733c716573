"""Evaluation outputs: metrics.csv, summary.json, the self-contained evaluation.html, thumbnails, text table.

Every file is written atomically (:mod:`pipeline.atomic`). The HTML page inlines its images as
base64 PNG data URIs and has no scripts or external style sheets, so it can be mailed or archived
as one file. Plots use matplotlib's Agg renderer through ``matplotlib.figure.Figure`` (no pyplot,
no global backend switch).

Thumbnails follow the radiological convention: the patient's right is on the image left in the
axial and coronal views; axial has anterior up, coronal and sagittal superior up, and sagittal has
anterior on the left. Reference outlines are green, prediction outlines magenta.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline import atomic
from pipeline.errors import InputError
from pipeline.evaluate.metrics import HIGHER_IS_BETTER, METRIC_KEYS, ROW_KEYS
from pipeline.geometry import Grid, canonical_grid
from pipeline.thumbnails import ORIENTATION_LETTERS, VIEW_AXIS, VIEWS, canonical_view, display_plane, display_spacing

REFERENCE_COLOUR, PREDICTION_COLOUR = "#00e000", "#ff00ff"
THUMBNAIL_CAPTION = ("Radiological convention: the patient's right is on the image left (axial, coronal); axial "
                     "has anterior up, coronal and sagittal superior up, sagittal anterior on the left. "
                     "Green outline = reference, magenta outline = prediction. Slices pass through the centre "
                     "of mass of the reference (of the prediction when the reference is empty).")
PLOTTED_METRICS = ("dice", "hd95_mm", "surface_dice", "volume_abs_error_ml", "volume_rel_error",
                   "fp_components", "fn_components")
METRIC_LABELS = {"dice": "Dice", "hd95_mm": "HD95 (mm)", "surface_dice": "Surface Dice",
                 "volume_pred_ml": "Volume pred (mL)", "volume_ref_ml": "Volume ref (mL)",
                 "volume_abs_error_ml": "|Volume error| (mL)", "volume_rel_error": "Relative volume error",
                 "fp_components": "FP components", "fn_components": "FN components"}
_INT_COLUMNS = ("class_value", "fp_components", "fn_components")


# --- CSV and JSON ---------------------------------------------------------------------------------------------

def write_metrics_csv(rows: list[dict], path: str | Path) -> None:
    """metrics.csv: one line per case and class, columns :data:`ROW_KEYS`; floats at full precision, NaN as 'nan'."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(ROW_KEYS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: repr(float(value)) if isinstance(value, float) else value
                         for key, value in row.items()})
    atomic.write_text(path, buffer.getvalue())


def read_metrics_csv(path: str | Path) -> list[dict]:
    """Rows of a metrics.csv written by :func:`write_metrics_csv`, with their numeric types restored."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} must be an evaluation metrics.csv, got no such file. "
                         f"Point at the output folder of an earlier 'ctseg evaluate' run.")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [key for key in ROW_KEYS if key not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path} must have the columns {', '.join(ROW_KEYS)}, got none for "
                             f"{', '.join(missing)}. Re-run 'ctseg evaluate' to rewrite it.")
        rows = []
        for line_number, line in enumerate(reader, start=2):
            try:
                row = {key: line[key] for key in ROW_KEYS}
                for key in METRIC_KEYS:
                    row[key] = int(line[key]) if key in _INT_COLUMNS else float(line[key])
                row["class_value"] = int(line["class_value"])
            except (TypeError, ValueError) as exc:
                raise InputError(f"{path} line {line_number} must hold numbers in the metric columns, got "
                                 f"{exc}. Re-run 'ctseg evaluate' to rewrite it.") from exc
            rows.append(row)
    return rows


def write_summary_json(summary: dict, path: str | Path) -> None:
    """summary.json (the dict of :func:`pipeline.evaluate.summary.summarise`, plus whatever the caller adds).

    Any NaN or infinity is written as null, so the file is strict JSON that every parser accepts.
    """
    atomic.write_json(path, _strict_json(summary))


def _strict_json(value):
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(item) for item in value]
    if isinstance(value, (float, np.floating)) and not math.isfinite(float(value)):
        return None
    return value


COMPARISON_KEYS = ("class_value", "class_name", "metric", "n_cases", "n_missing", "mean_a", "mean_b",
                   "mean_difference", "median_difference", "p_value", "test_note", "higher_is_better",
                   "b_is_better", "cases_only_in_a", "cases_only_in_b")


def write_comparison_csv(comparison: list[dict], path: str | Path) -> None:
    """The rows of :func:`pipeline.evaluate.summary.compare_runs` as CSV (case lists joined by ';', None empty)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COMPARISON_KEYS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in comparison:
        writer.writerow({key: ";".join(value) if isinstance(value, list) else "" if value is None
                         else repr(value) if isinstance(value, float) else value for key, value in row.items()})
    atomic.write_text(path, buffer.getvalue())


def write_comparison(comparison: list[dict], folder: str | Path, run_a: str | Path, run_b: str | Path) -> None:
    """Write ``comparison.csv``, ``comparison.json`` (with the two runs named) and ``comparison.txt`` in ``folder``.
    """
    folder = Path(folder)
    write_comparison_csv(comparison, folder / "comparison.csv")
    atomic.write_json(folder / "comparison.json", _strict_json(
        {"run_a": str(run_a), "run_b": str(run_b), "differences": "B - A", "comparison": comparison}))
    atomic.write_text(folder / "comparison.txt", f"A = {run_a}\nB = {run_b}\n\n{format_comparison(comparison)}\n")


def format_comparison(comparison: list[dict], metrics: Sequence[str] = ("dice", "hd95_mm", "surface_dice")) -> str:
    """A printable table of the paired comparison (B − A) for the main metrics."""
    header = ["class", "metric", "n", "mean A", "mean B", "B - A", "p (Wilcoxon)", "B better"]
    lines = []
    for row in comparison:
        if row["metric"] not in metrics:
            continue
        better = {True: "yes", False: "no", None: "-"}[row["b_is_better"]]
        lines.append([row["class_name"], METRIC_LABELS.get(row["metric"], row["metric"]), str(row["n_cases"]),
                      _number(row["mean_a"]), _number(row["mean_b"]), _number(row["mean_difference"]),
                      "-" if row["p_value"] is None else f"{row['p_value']:.3g}", better])
    widths = [max(len(line[c]) for line in [header] + lines) for c in range(len(header))]
    text = ["  ".join(cell.ljust(w) if c < 2 else cell.rjust(w) for c, (cell, w) in enumerate(zip(line, widths)))
            for line in [header] + lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    only_a = sorted({case for row in comparison for case in row["cases_only_in_a"]})
    only_b = sorted({case for row in comparison for case in row["cases_only_in_b"]})
    if only_a:
        text.append(f"cases only in run A (not compared): {', '.join(only_a)}")
    if only_b:
        text.append(f"cases only in run B (not compared): {', '.join(only_b)}")
    return "\n".join(text)


# --- text table -----------------------------------------------------------------------------------------------

def format_table(rows: list[dict], metric: str = "dice") -> str:
    """A printable table of one metric (Dice by default): a line per case, a column per class, a mean line.

    Values of rows with an empty-mask flag carry a ``*``.
    """
    classes = _class_order(rows)
    cases = _case_order(rows)
    lookup = {(row["case_id"], row["class_value"]): row for row in rows}
    header = ["case"] + [name for _, name in classes]
    lines = []
    for case in cases:
        cells = [case]
        for value, _ in classes:
            row = lookup.get((case, value))
            cells.append("-" if row is None else _number(row[metric]) + ("*" if row.get("flags") else ""))
        lines.append(cells)
    means = ["mean"]
    for value, _ in classes:
        numbers = [float(r[metric]) for r in rows if r["class_value"] == value and not _isnan(r[metric])]
        means.append(_number(float(np.mean(numbers))) if numbers else "-")
    widths = [max(len(str(line[c])) for line in [header, means] + lines) for c in range(len(header))]
    rule = "  ".join("-" * w for w in widths)

    def render(cells):
        return "  ".join(str(cell).ljust(w) if c == 0 else str(cell).rjust(w)
                         for c, (cell, w) in enumerate(zip(cells, widths)))

    text = [f"{METRIC_LABELS.get(metric, metric)} per case and class", render(header), rule]
    text += [render(line) for line in lines] + [rule, render(means)]
    if any(row.get("flags") for row in rows):
        text.append("* empty prediction and/or reference (see flags in metrics.csv)")
    return "\n".join(text)


# --- worst cases and thumbnails ---------------------------------------------------------------------------------

def worst_cases(rows: list[dict], count: int = 5) -> list[str]:
    """The ``count`` case ids with the lowest Dice averaged over their classes (ties: by case id)."""
    per_case: dict[str, list[float]] = {}
    for row in rows:
        per_case.setdefault(row["case_id"], []).append(float(row["dice"]))
    return sorted(per_case, key=lambda case: (float(np.mean(per_case[case])), case))[:count]


def overlay_thumbnails(image: np.ndarray | None, pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                       affine: np.ndarray | None = None, size_px: int = 256) -> dict[str, bytes]:
    """Axial, coronal and sagittal PNGs with prediction and reference outlines, in the radiological convention.

    Arrays are indexed [i, j, k]. Without ``affine`` they must already be in canonical RAS order (i towards
    the patient's right, j anterior, k superior); with ``affine`` (index → RAS) they are first reordered to
    that order, exactly (axes permuted and flipped, no interpolation). ``spacing`` gives the pixel aspect
    ratio (ignored when ``affine`` is given, which carries it). ``image`` (may be None) is drawn underneath.
    """
    from scipy import ndimage

    pred, ref = np.asarray(pred), np.asarray(ref)
    if affine is not None:  # reorder to R, A, S exactly (axes permuted and flipped, no interpolation)
        grid = Grid(pred.shape, np.asarray(affine, dtype=np.float64))
        image, pred, ref = [None if volume is None else canonical_view(np.asarray(volume), grid)[0]
                            for volume in (image, pred, ref)]
        spacing = canonical_grid(grid).spacing
    spacing = [float(s) for s in spacing]
    centre = _centre_voxel(ref, pred, ndimage)
    window = _display_window(image)
    thumbnails = {}
    for view in VIEWS:
        row_spacing, column_spacing = display_spacing(view, spacing)
        index = centre[VIEW_AXIS[view]]
        planes = [None if volume is None else display_plane(volume, view, index) for volume in (image, pred, ref)]
        thumbnails[view] = _render_plane(view, *planes, row_spacing, column_spacing, window, size_px)
    return thumbnails


def _centre_voxel(ref: np.ndarray, pred: np.ndarray, ndimage) -> list[int]:
    for volume in (ref, pred):
        if np.any(volume > 0):
            centre = ndimage.center_of_mass(volume > 0)
            return [int(round(c)) for c in centre]
    return [n // 2 for n in ref.shape]


def _display_window(image: np.ndarray | None) -> tuple[float, float] | None:
    if image is None:
        return None
    sample = np.asarray(image)[::4, ::4, ::2].astype(np.float32)
    if sample.min() < -500:  # Hounsfield units: a soft-tissue window
        return -160.0, 240.0
    low, high = np.percentile(sample, [1, 99])
    return float(low), float(max(high, low + 1e-3))


def _render_plane(view, image, pred, ref, row_spacing, column_spacing, window, size_px) -> bytes:
    from matplotlib.figure import Figure

    rows, columns = pred.shape
    height_mm, width_mm = rows * row_spacing, columns * column_spacing
    scale = size_px / max(height_mm, width_mm)
    dpi = 100
    figure = Figure(figsize=(max(width_mm * scale, 16) / dpi, max(height_mm * scale, 16) / dpi), dpi=dpi)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_axis_off()
    extent = (0, width_mm, 0, height_mm)  # world mm on both axes: correct aspect for anisotropic voxels
    if image is not None:
        axes.imshow(image, cmap="gray", vmin=window[0], vmax=window[1], extent=extent, interpolation="nearest")
    else:
        axes.imshow(np.zeros((rows, columns)), cmap="gray", vmin=0, vmax=1, extent=extent)
    x = (np.arange(columns) + 0.5) * column_spacing
    y = height_mm - (np.arange(rows) + 0.5) * row_spacing
    for labels, colour in ((ref, REFERENCE_COLOUR), (pred, PREDICTION_COLOUR)):
        for value in np.unique(labels[labels > 0]):
            mask = (labels == value).astype(np.float32)
            if min(mask.shape) >= 2:
                axes.contour(x, y, mask, levels=[0.5], colors=[colour], linewidths=1.0)
    axes.set_xlim(0, width_mm)
    axes.set_ylim(0, height_mm)
    axes.set_aspect("equal")
    top, bottom, left, right = ORIENTATION_LETTERS[view]
    style = {"color": "yellow", "fontsize": 8, "transform": axes.transAxes}
    axes.text(0.5, 0.98, top, ha="center", va="top", **style)
    axes.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
    axes.text(0.02, 0.5, left, ha="left", va="center", **style)
    axes.text(0.98, 0.5, right, ha="right", va="center", **style)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


# --- HTML -------------------------------------------------------------------------------------------------------

def write_evaluation_html(rows: list[dict], summary: dict, thumbnails: dict[str, dict[str, bytes]],
                          path: str | Path, notes: list[str] | None = None) -> None:
    """evaluation.html: notes, summary table, a box plot per metric (a box per class), the worst 5 cases with
    their thumbnails (``thumbnails[case_id][view]`` PNG bytes; missing cases are shown without images), and
    the table of every case and class. Self-contained: images are inline data URIs."""
    parts = [_HTML_HEAD, "<h1>Segmentation evaluation</h1>"]
    parts.append(f"<p>{summary.get('n_cases', len(_case_order(rows)))} cases, {len(_class_order(rows))} classes.</p>")
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_esc(note)}</li>" for note in notes) + "</ul>")
    parts.append(_summary_section(summary))
    parts.append(_box_plot_section(rows))
    parts.append(_worst_case_section(rows, thumbnails))
    parts.append("<h2>All cases</h2>" + _rows_table(rows))
    parts.append("</body></html>\n")
    atomic.write_text(path, "\n".join(parts))


_HTML_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ctseg evaluation</title>
<style>
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em 0; font-size: 0.85em; }
th, td { border: 1px solid #bbb; padding: 2px 6px; text-align: right; }
th { background: #eee; } td.text { text-align: left; }
tr.flagged td { background: #fff3d6; }
figure { display: inline-block; margin: 0.3em; vertical-align: top; }
figcaption { font-size: 0.8em; text-align: center; }
.caption { font-size: 0.85em; color: #555; max-width: 60em; }
</style></head><body>"""


def _summary_section(summary: dict) -> str:
    lines = ["<h2>Summary</h2>", "<table><tr><th>class</th><th>metric</th><th>mean</th><th>median</th>"
             "<th>std</th><th>95% CI of mean</th><th>n</th><th>missing</th></tr>"]
    for name, entry in summary.get("classes", {}).items():
        for metric, stats in entry.get("metrics", {}).items():
            ci = ("-" if stats.get("ci_low") is None
                  else f"{_number(stats['ci_low'])} – {_number(stats['ci_high'])}")
            lines.append(f"<tr><td class='text'>{_esc(name)}</td><td class='text'>"
                         f"{_esc(METRIC_LABELS.get(metric, metric))}</td><td>{_number(stats.get('mean'))}</td>"
                         f"<td>{_number(stats.get('median'))}</td><td>{_number(stats.get('std'))}</td>"
                         f"<td>{ci}</td><td>{stats.get('n', '')}</td><td>{stats.get('n_missing', '')}</td></tr>")
    lines.append("</table>")
    statistics = summary.get("statistics", {})
    if statistics:
        lines.append("<p class='caption'>" + _esc("; ".join(f"{k}: {v}" for k, v in statistics.items())) + "</p>")
    return "\n".join(lines)


def _box_plot_section(rows: list[dict]) -> str:
    parts = ["<h2>Distribution per metric and class</h2>"]
    for metric in PLOTTED_METRICS:
        parts.append(f"<figure><img alt='{_esc(metric)} box plot' src='{_data_uri(_box_plot_png(rows, metric))}'>"
                     f"<figcaption>{_esc(METRIC_LABELS[metric])}</figcaption></figure>")
    return "\n".join(parts)


def _box_plot_png(rows: list[dict], metric: str) -> bytes:
    from matplotlib.figure import Figure

    classes = _class_order(rows)
    data, labels = [], []
    for value, name in classes:
        values = [float(r[metric]) for r in rows if r["class_value"] == value]
        finite = [v for v in values if not math.isnan(v)]
        data.append(finite if finite else [math.nan])
        missing = len(values) - len(finite)
        labels.append(f"{name}\n(n={len(finite)}" + (f", {missing} missing)" if missing else ")"))
    figure = Figure(figsize=(max(3.0, 1.2 * len(classes) + 1.0), 3.0), dpi=90)
    axes = figure.add_subplot()
    axes.boxplot(data, showmeans=True)
    axes.set_xticks(range(1, len(labels) + 1), labels, fontsize=7)
    better = HIGHER_IS_BETTER.get(metric)
    axes.set_title(METRIC_LABELS[metric] + ("" if better is None else " (higher is better)" if better
                                            else " (lower is better)"), fontsize=9)
    axes.tick_params(axis="y", labelsize=7)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _worst_case_section(rows: list[dict], thumbnails: dict[str, dict[str, bytes]]) -> str:
    worst = worst_cases(rows, 5)
    parts = ["<h2>Worst cases (lowest mean Dice)</h2>", f"<p class='caption'>{_esc(THUMBNAIL_CAPTION)}</p>"]
    for rank, case in enumerate(worst, start=1):
        case_rows = [r for r in rows if r["case_id"] == case]
        mean_dice = float(np.mean([float(r["dice"]) for r in case_rows]))
        parts.append(f"<h3 id='worst-{rank}'>{rank}. {_esc(case)}: mean Dice {_number(mean_dice)}</h3>")
        parts.append(_rows_table(case_rows))
        views = thumbnails.get(case, {})
        if not views:
            parts.append("<p class='caption'>No thumbnails for this case.</p>")
        for view in VIEWS:
            if view in views:
                parts.append(f"<figure><img alt='{_esc(case)} {view}' src='{_data_uri(views[view])}'>"
                             f"<figcaption>{view}</figcaption></figure>")
    return "\n".join(parts)


def _rows_table(rows: list[dict]) -> str:
    header = "".join(f"<th>{_esc(c)}</th>" for c in ("case", "class") + tuple(METRIC_LABELS[m] for m in METRIC_KEYS)
                     + ("flags",))
    lines = [f"<table><tr>{header}</tr>"]
    for row in sorted(rows, key=lambda r: (str(r["case_id"]), int(r["class_value"]))):
        cells = [f"<td class='text'>{_esc(row['case_id'])}</td>", f"<td class='text'>{_esc(row['class_name'])}</td>"]
        cells += [f"<td>{_number(row[m])}</td>" for m in METRIC_KEYS]
        cells.append(f"<td class='text'>{_esc(row.get('flags', ''))}</td>")
        flagged = " class='flagged'" if row.get("flags") else ""
        lines.append(f"<tr{flagged}>{''.join(cells)}</tr>")
    lines.append("</table>")
    return "\n".join(lines)


# --- helpers ----------------------------------------------------------------------------------------------------

def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _isnan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _number(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    value = float(value)
    if math.isnan(value):
        return "nan"
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.1f}"


def _class_order(rows: list[dict]) -> list[tuple[int, str]]:
    seen: dict[tuple[int, str], None] = {}
    for row in rows:
        seen.setdefault((int(row["class_value"]), str(row["class_name"])), None)
    return sorted(seen)


def _case_order(rows: list[dict]) -> list[str]:
    return sorted({str(row["case_id"]) for row in rows})
