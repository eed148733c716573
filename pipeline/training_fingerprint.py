"""The model folder's memory of its training data: ``training_fingerprint.json`` (format, writer, reader).

Written by ``ctseg train`` next to ``model.json`` (a separate file, so model.json's strict schema is
unchanged), read by ``ctseg predict`` to judge whether a new case and its result look like what the
model was trained on (:mod:`pipeline.predict.trust`). It holds, over the training cases:

- per label: the volume in mL of every training case (on the case's own grid), in how many cases
  the label is present, and the number of connected components (26-connectivity) of each case;
- the input fingerprint: voxel spacing and image extent (field of view) along R, A, S, the body's
  extent, and the HU histogram of the body (voxels above ``body_threshold_hu`` and what they
  enclose in each axial slice, so lungs and bowel gas count), as fractions in
  fixed 16 HU bins from -1024 HU; plus, per training case, the Wasserstein-1 distance of its
  histogram to that of the most similar other training case (the spread a new case is judged
  against).

No case ids, names or dates are stored: only numbers per case, in no particular order.
Per-case statistics are computed once where the case is loaded anyway (preprocess's fingerprint,
:func:`case_statistics`); :func:`build` pools them at training time.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from pipeline import atomic
from pipeline.errors import InputError
from pipeline.geometry import Grid, canonical_grid, voxel_volume_ml

FILE = "training_fingerprint.json"
FORMAT = "ctseg-training-fingerprint/1"
HU_LOW = -1024.0
BIN_HU = 16.0
BINS = 256          # -1024 ... 3072 HU; values outside are counted in the first or last bin
STATISTICS_VERSION = 2  # per-case statistics of another version (cached by preprocess) are computed again
SAMPLE_VOXELS = 1_000_000  # the histogram reads at most about this many voxels (a regular sub-grid)


# ---------------------------------------------------------------------------------------------
# Per-case statistics (shared by training and prediction so both measure the same way)
# ---------------------------------------------------------------------------------------------

def body_mask(sample: np.ndarray, grid: Grid, body_threshold_hu: float) -> np.ndarray:
    """Voxels above ``body_threshold_hu``, with what they enclose in each axial slice (lungs, bowel gas)."""
    from scipy import ndimage

    mask = sample > body_threshold_hu
    axial = int(np.argmax(np.abs(grid.direction[2, :])))  # the index axis closest to S
    structure = np.zeros((3, 3, 3), dtype=bool)  # 4-connectivity within each axial slice only
    centre = [slice(1, 2)] * 3
    for axis in range(3):
        if axis != axial:
            line = list(centre)
            line[axis] = slice(None)
            structure[tuple(line)] = True
    outside, _ = ndimage.label(~mask, structure=structure)
    border = set()
    for axis in range(3):  # background connected to a slice's edge is outside the body
        if axis != axial:
            border.update(np.unique(np.take(outside, [0, -1], axis=axis)).tolist())
    border.discard(0)
    return ~np.isin(outside, sorted(border)) if border else np.ones_like(mask)


def body_hu_fractions(array: np.ndarray, grid: Grid, body_threshold_hu: float) -> tuple[np.ndarray, int]:
    """Fractions of body voxels per 16 HU bin, and how many voxels were read.

    The body is every voxel above ``body_threshold_hu`` plus what that encloses in each axial slice,
    so the lungs and bowel gas count. Reads a regular sub-grid (every n-th voxel along each axis) of
    at most about ``SAMPLE_VOXELS`` voxels, so that a 500-slice CT costs a fraction of a second.
    """
    step = max(1, math.ceil((array.size / SAMPLE_VOXELS) ** (1.0 / 3.0)))
    sample = array[::step, ::step, ::step] if step > 1 else array
    values = sample[body_mask(sample, grid, body_threshold_hu)]
    if values.size == 0:
        return np.zeros(BINS), 0
    index = np.clip(((values.astype(np.float32) - HU_LOW) / BIN_HU).astype(np.int64), 0, BINS - 1)
    counts = np.bincount(index, minlength=BINS).astype(np.float64)
    return counts / counts.sum(), int(values.size)


def component_counts(labels: np.ndarray, values: list[int]) -> dict[int, int]:
    """Connected components (26-connectivity) of each label value in a label map (0 when absent)."""
    return {value: len(sizes) for value, sizes in component_sizes(labels, values).items()}


def component_sizes(labels: np.ndarray, values: list[int]) -> dict[int, np.ndarray]:
    """Voxel count of every connected component (26-connectivity) of each label value (empty when absent)."""
    from pipeline.postprocessing import components_by_class

    labels = labels if np.issubdtype(labels.dtype, np.integer) else labels.astype(np.int64)
    sizes = {value: np.zeros(0, dtype=np.int64) for value in values}
    for value, _, _, found in components_by_class(labels, list(values)):
        sizes[value] = found
    return sizes


def grid_fingerprint(grid: Grid) -> dict:
    """Spacing and image extent (mm) along R, A, S."""
    canonical = canonical_grid(grid)
    spacing = np.asarray(canonical.spacing, dtype=float)
    return {"spacing_mm": [round(float(s), 4) for s in spacing],
            "extent_mm": [round(float(e), 2) for e in np.asarray(canonical.shape) * spacing]}


def case_statistics(image: np.ndarray, label: np.ndarray, grid: Grid, label_values: list[int],
                    body_threshold_hu: float) -> dict:
    """What one training case contributes: label volumes (mL) and components, grid, body HU histogram."""
    voxel_ml = voxel_volume_ml(grid)
    values = [int(v) for v in label_values if int(v) != 0]
    counts = {v: int(np.count_nonzero(label == v)) for v in values}
    fractions, _ = body_hu_fractions(image, grid, body_threshold_hu)
    return {"version": STATISTICS_VERSION,"volumes_ml": {str(v): round(counts[v] * voxel_ml, 4) for v in values},
            "components": {str(v): c for v, c in component_counts(label, values).items()},
            **grid_fingerprint(grid),
            "body_threshold_hu": float(body_threshold_hu),
            "hu_fractions": [round(float(f), 7) for f in fractions]}


def wasserstein_hu(a: np.ndarray, b: np.ndarray) -> float:
    """Wasserstein-1 (earth mover's) distance in HU between two histograms on the fixed bins."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.sum() <= 0 or b.sum() <= 0:
        return float("inf")
    return float(np.abs(np.cumsum(a / a.sum()) - np.cumsum(b / b.sum())).sum() * BIN_HU)


# ---------------------------------------------------------------------------------------------
# Pooling, writing, reading
# ---------------------------------------------------------------------------------------------

def _range(values: list[float]) -> dict:
    array = np.asarray(values, dtype=float)
    return {"min": float(array.min()), "max": float(array.max()), "median": float(np.median(array)),
            "values": sorted(round(float(v), 4) for v in array)}


def build(statistics: list[dict], labels: list[dict]) -> dict:
    """Pool the per-case statistics of every training case into the file's content."""
    if not statistics:
        raise InputError("a training fingerprint needs at least one training case, got none.")
    histograms = np.asarray([s["hu_fractions"] for s in statistics], dtype=float)
    pooled = histograms.mean(axis=0)
    n = len(histograms)
    nearest = []
    for index, h in enumerate(histograms):  # each case against its most similar other training case
        others = [wasserstein_hu(h, g) for m, g in enumerate(histograms) if m != index]
        nearest.append(round(min(others), 3) if others else 0.0)
    per_label = {}
    for label in labels:
        value = int(label["value"])
        if value == 0:
            continue
        volumes = [float(s["volumes_ml"].get(str(value), 0.0)) for s in statistics]
        components = [int(s["components"].get(str(value), 0)) for s in statistics]
        present = [v for v in volumes if v > 0]
        per_label[str(label["name"])] = {
            "value": value, "cases": n, "present_in": len(present),
            "volume_ml": _range(present) if present else None,
            "components": _range([c for c, v in zip(components, volumes) if v > 0]) if present else None,
        }
    axes = {}
    for key in ("spacing_mm", "extent_mm"):
        array = np.asarray([s[key] for s in statistics], dtype=float)
        axes[key] = {"min": [float(v) for v in array.min(axis=0)], "max": [float(v) for v in array.max(axis=0)]}
    return {"format": FORMAT, "statistics_version": STATISTICS_VERSION, "cases": n, "axes": "R, A, S",
            "body_threshold_hu": float(statistics[0]["body_threshold_hu"]),
            "hu_histogram": {"low_hu": HU_LOW, "bin_hu": BIN_HU, "bins": BINS,
                             "pooled": [round(float(v), 7) for v in pooled],
                             "cases": [[round(float(v), 7) for v in h] for h in histograms],
                             "nearest_other_wasserstein_hu": nearest},
            **axes, "labels": per_label}


def write(model_dir: Path, content: dict) -> Path:
    path = Path(model_dir) / FILE
    atomic.write_json(path, content)
    return path


def read(model_dir: Path) -> dict | None:
    """The model folder's training fingerprint, or None when it has none (a model trained before it existed)."""
    path = Path(model_dir) / FILE
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} must be readable JSON, got {type(exc).__name__}: {exc}. Delete it (predict then "
                         f"runs without plausibility checks) or re-run 'ctseg train --force'.") from exc
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        got = content.get("format") if isinstance(content, dict) else type(content).__name__
        raise InputError(f"{path} must have format {FORMAT!r}, got {got!r}. Re-run 'ctseg train' with this "
                         f"version, or delete the file to predict without plausibility checks.")
    if content.get("statistics_version") != STATISTICS_VERSION:
        raise InputError(f"{path} must hold statistics of version {STATISTICS_VERSION} (how this version measures the "
                         f"body), got {content.get('statistics_version')!r}. Re-run 'ctseg train --force', or delete "
                         f"the file to predict without plausibility checks.")
    for key in ("hu_histogram", "spacing_mm", "extent_mm", "labels", "body_threshold_hu"):
        if key not in content:
            raise InputError(f"{path} must hold {key!r}, got keys {sorted(content)}. Re-run 'ctseg train'.")
    histogram = content["hu_histogram"]
    sizes = {len(histogram.get("pooled", []))} | {len(h) for h in histogram.get("cases", [])}
    if sizes != {BINS} or not histogram.get("cases"):
        raise InputError(f"{path}: hu_histogram must hold the pooled and per-case histograms of {BINS} bins, got "
                         f"{len(histogram.get('cases', []))} case(s) with sizes {sorted(sizes)}. Re-run 'ctseg train'.")
    return content


def from_training_cases(cases, labels: list[dict], body_threshold_hu: float, known: dict | None = None) -> dict:
    """Build the fingerprint of ``cases`` (preprocess TrainingCase entries), reusing ``known`` per-case statistics.

    ``known`` maps case id → statistics already computed by preprocess; the others are loaded now.
    """
    from pipeline.preprocess.fingerprint import load_case

    allowed = {int(lbl["value"]) for lbl in labels} | {0}
    values = sorted(allowed - {0})
    statistics = []
    for case in cases:
        stats = (known or {}).get(case.id)
        if stats is None or stats.get("version") != STATISTICS_VERSION:
            image, label = load_case(case, allowed)
            stats = case_statistics(image.array, label.array, image.grid, values, body_threshold_hu)
        statistics.append(stats)
    return build(statistics, labels)


def write_for_training(model_dir: Path, preprocess_dir: Path, ingest_dir: Path, labels: list[dict],
                       body_threshold_hu: float) -> Path:
    """Write the model folder's fingerprint of every preprocessed training case (the train stage's hook).

    Per-case statistics come from preprocess's ``fingerprint.json``; cases it lacks them for (a
    preprocess folder written by an older version) are read again from the ingest folder.
    """
    from pipeline.preprocess.stage import training_cases

    known = {}
    path = Path(preprocess_dir) / "fingerprint.json"
    if path.is_file():
        for record in json.loads(path.read_text(encoding="utf-8")).get("cases", []):
            if record.get("training_statistics"):
                known[record["id"]] = record["training_statistics"]
    cases, _ = training_cases(Path(ingest_dir))
    return write(model_dir, from_training_cases(cases, labels, body_threshold_hu, known))
