"""From the network's classes on the model grid back to a label map on the source's exact grid.

The preprocessing (:func:`pipeline.preprocess.transform.prepare_image`) only changes the grid:
reorient to RAS axes, resample to the target spacing, crop to the body. So the way back is one
nearest-neighbour lookup of the argmaxed label map from the model grid onto the source grid
(:func:`pipeline.preprocess.transform.labels_to_source`); voxels outside the cropped box are
background. The result has the source's shape and affine exactly.

Taking the argmax before going back (instead of resampling every class's probabilities linearly
to the source grid and taking the argmax there, as MONAI's ``Invertd`` does) moves a boundary by
up to half a model voxel; :func:`reassembly_agreement` measures the resulting Dice change.
:func:`refined_to_source` removes that change at a fraction of the cost: a source voxel whose 8
surrounding model voxels share one argmax gets that class (a convex combination of probability
vectors that share their largest entry keeps it, so linear resampling could not change it); only
voxels in cells that straddle a boundary are interpolated explicitly. The result is the labels of
linear probability resampling + argmax, computed on a thin band instead of the whole volume.
Optional per-class clean-up (:func:`postprocess`) runs on the source grid, so what it guarantees
(one component, no small islands, no holes) holds in the written file.
"""
from __future__ import annotations

import numpy as np

from pipeline.errors import ConfigError
from pipeline.geometry import Grid, axis_aligned_permutation, index_mapping, resample_to_grid, voxel_volume_ml
from pipeline.postprocessing import Rule, apply_rules, label_boxes
from pipeline.preprocess.transform import labels_to_source


def classes_to_values(classes: np.ndarray, class_values: list[int]) -> np.ndarray:
    """Map channel indices to label values (channel 0 → 0)."""
    table = np.asarray(class_values, dtype=np.uint16 if max(class_values) > 255 else np.uint8)
    if np.array_equal(table, np.arange(len(table))) and classes.dtype == table.dtype:
        return classes
    return table[classes]


def to_source_grid(labels_model: np.ndarray, model_grid: Grid, source_grid: Grid) -> np.ndarray:
    """Nearest-neighbour label map on the source grid (see module docstring)."""
    return labels_to_source(labels_model, model_grid, source_grid, dtype=labels_model.dtype)


def probabilities_to_source(probabilities: np.ndarray, model_grid: Grid, source_grid: Grid) -> np.ndarray:
    """Each class's probability resampled linearly onto the source grid; background outside the model grid."""
    out = np.empty((probabilities.shape[0], *source_grid.shape), dtype=np.float32)
    for c in range(probabilities.shape[0]):
        out[c] = resample_to_grid(probabilities[c], model_grid, source_grid, order=1, fill=1.0 if c == 0 else 0.0,
                                  out_dtype=np.float32)
    return out


def refined_to_source(probabilities: np.ndarray, classes: np.ndarray, model_grid: Grid, source_grid: Grid,
                      class_values: list[int]) -> tuple[np.ndarray, dict]:
    """Labels equal to argmax(linear resampling of ``probabilities``), computed only near boundaries.

    ``probabilities`` ``[K, X, Y, Z]`` sum to one per voxel; ``classes`` is their argmax (channel
    index). Returns the source-grid label values and counts of the work done.
    """
    matrix = index_mapping(model_grid, source_grid)  # source index -> model index
    perm = axis_aligned_permutation(matrix)  # perm[d]: the source axis model axis d runs along
    if perm is None:  # not produced by our preprocessing; resample everything
        full = probabilities_to_source(probabilities, model_grid, source_grid).argmax(0).astype(classes.dtype)
        return classes_to_values(full, class_values), {"method": "full", "boundary_voxels": int(full.size)}
    lo, hi, weight, index = [], [], [], []
    for d in range(3):
        coords = matrix[d, perm[d]] * np.arange(source_grid.shape[perm[d]]) + matrix[d, 3]
        n = model_grid.shape[d]
        lower = np.floor(coords).astype(np.int64)
        lo.append(np.clip(lower, 0, n - 1))
        hi.append(np.clip(lower + 1, 0, n - 1))
        weight.append((coords - lower).astype(np.float32))
        # as in resample_to_grid: up to half a voxel outside the edge is clamped, further out is background,
        # which the padded cell array holds at index n
        index.append(np.where((coords >= -0.5) & (coords <= n - 0.5), lo[d], n))
    if int(classes.max(initial=0)) >= np.iinfo(classes.dtype).max:
        classes = classes.astype(np.uint16)
    sentinel = np.iinfo(classes.dtype).max
    padded = np.pad(classes, ((0, 1), (0, 1), (0, 1)), mode="edge")
    sx, sy, sz = classes.shape
    uniform = np.ones(classes.shape, dtype=bool)
    for a in (0, 1):
        for b in (0, 1):
            for c in (0, 1):
                if a or b or c:
                    uniform &= padded[a:a + sx, b:b + sy, c:c + sz] == classes
    cell = np.pad(np.where(uniform, classes, sentinel).astype(classes.dtype), ((0, 1), (0, 1), (0, 1)))
    # gather straight into the source's axis order (source axis s runs along model axis order[s]), one axis
    # at a time: cheaper than a 3D fancy index, and no transpose copy of the large result
    order = np.argsort(perm)
    out = np.ascontiguousarray(cell.transpose(order))
    for s_axis in range(3):
        out = np.take(out, index[order[s_axis]], axis=s_axis)
    flat_band = np.flatnonzero(out == sentinel)
    if len(flat_band):
        band = np.unravel_index(flat_band, out.shape)
        out.ravel()[flat_band] = _interpolated_argmax(probabilities, classes,
                                                      [band[perm[d]] for d in range(3)], lo, hi, weight)
        return classes_to_values(out, class_values), {"method": "refined", "boundary_voxels": int(len(flat_band))}
    return classes_to_values(out, class_values), {"method": "refined", "boundary_voxels": 0}


EXACT_CLASS_LIMIT = 8


def _interpolated_argmax(probabilities: np.ndarray, classes: np.ndarray, along: list[np.ndarray], lo, hi, weight,
                         chunk: int = 1 << 20) -> np.ndarray:
    """Argmax of the trilinearly interpolated probabilities at band points (``along[d]``: index into axis d's tables).

    With up to EXACT_CLASS_LIMIT classes every class is interpolated (exact). With more, only the
    classes that win one of the 8 surrounding model voxels compete (cost independent of the class
    count); another class can win the interpolation only in contrived near-ties.
    """
    num_classes = probabilities.shape[0]
    flat_probabilities = probabilities.reshape(num_classes, -1)
    flat_classes = classes.ravel()
    strides = np.array([probabilities.shape[2] * probabilities.shape[3], probabilities.shape[3], 1], dtype=np.int64)
    count = len(along[0])
    best = np.zeros(count, dtype=np.uint16 if num_classes > 255 else np.uint8)
    for start in range(0, count, chunk):
        part = [a[start:start + chunk] for a in along]
        ends = [(lo[d][part[d]] * strides[d], hi[d][part[d]] * strides[d]) for d in range(3)]
        w = [weight[d][part[d]] for d in range(3)]
        corners = []  # (flat index, weight) of the 8 cell corners
        for a in (0, 1):
            for b in (0, 1):
                for c in (0, 1):
                    flat = ends[0][a] + ends[1][b] + ends[2][c]
                    wabc = (w[0] if a else 1 - w[0]) * (w[1] if b else 1 - w[1]) * (w[2] if c else 1 - w[2])
                    corners.append((flat, wabc))
        best_value = np.full(len(part[0]), -1.0, dtype=np.float32)
        chosen = best[start:start + chunk]
        exact = num_classes <= EXACT_CLASS_LIMIT
        candidates = range(num_classes) if exact else [flat_classes[flat].astype(np.int64) for flat, _ in corners]
        for candidate in candidates:
            value = np.zeros(len(part[0]), dtype=np.float32)
            for flat, wabc in corners:
                value += wabc * (flat_probabilities[candidate][flat] if exact else flat_probabilities[candidate, flat])
            if exact:  # classes in increasing order: strict > keeps the lower class on ties, as argmax does
                better = value > best_value
                chosen[better] = candidate
            else:
                better = (value > best_value) | ((value == best_value) & (candidate < chosen))
                chosen[better] = candidate[better]
            best_value[better] = value[better]
    return best


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def reassembly_agreement(probabilities: np.ndarray, model_grid: Grid, source_grid: Grid, class_values: list[int],
                         names: list[str] | None = None) -> dict:
    """Dice per label between ours (argmax, then nearest) and MONAI-style (linear probabilities, then argmax)."""
    ours = to_source_grid(classes_to_values(probabilities.argmax(0).astype(np.uint8), class_values),
                          model_grid, source_grid)
    full = classes_to_values(probabilities_to_source(probabilities, model_grid, source_grid).argmax(0).astype(np.uint8),
                             class_values)
    names = names or [str(v) for v in class_values[1:]]
    per_label = {name: round(dice(ours == value, full == value), 6) for name, value in zip(names, class_values[1:])}
    changed = int(np.count_nonzero(ours != full))
    return {"dice": per_label, "min_dice": min(per_label.values()) if per_label else 1.0,
            "voxels_changed": changed, "fraction_changed": changed / ours.size}


# ---------------------------------------------------------------------------------------------
# Per-class clean-up
# ---------------------------------------------------------------------------------------------

def _parse_named(entries: list[str], what: str) -> dict[str, str]:
    parsed = {}
    for entry in entries:
        if "=" not in entry:
            raise ConfigError(f"{what} entries must look like 'name=value', got {entry!r}. Example: 'spleen=5'.")
        name, value = entry.split("=", 1)
        parsed[name.strip()] = value.strip()
    return parsed


def _applies(names: list[str], label: str) -> bool:
    return "*" in names or label in names


def min_component_ml(options, label: str) -> float | None:
    table = _parse_named(options.min_component_ml, "predict.postprocess.min_component_ml")
    raw = table.get(label, table.get("*"))
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"predict.postprocess.min_component_ml for '{label}' must be a number of mL, got {raw!r}.") \
            from None


def check_label_names(options, known: list[str]) -> None:
    """Every name in the postprocess options must be a model label or '*'."""
    named = list(options.keep_largest_component) + list(options.fill_holes) + list(
        _parse_named(options.min_component_ml, "predict.postprocess.min_component_ml"))
    unknown = sorted({n for n in named if n != "*" and n not in known})
    if unknown:
        raise ConfigError(f"predict.postprocess must name labels of the model ({', '.join(known)}) or '*', got "
                          f"{unknown}. Fix the names in the config.")


def configured_rules(options, label_infos) -> dict[int, Rule]:
    """The component rules ``predict.postprocess`` gives each label (by value; labels without one left out)."""
    rules = {}
    for info in label_infos:
        rule = Rule(_applies(options.keep_largest_component, info.name), min_component_ml(options, info.name))
        if not rule.empty:
            rules[info.value] = rule
    return rules


def has_configured_cleanup(options) -> bool:
    """Whether ``predict.postprocess`` sets a clean-up of its own (:func:`postprocess` then may change labels)."""
    return bool(options.keep_largest_component or options.min_component_ml or options.fill_holes)


def postprocess(labels: np.ndarray, grid: Grid, label_infos, options) -> list[str]:
    """Clean ``labels`` in place as configured per label name; returns one note per change."""
    from scipy import ndimage

    if not has_configured_cleanup(options) or not labels.any():
        return []
    voxel_ml = voxel_volume_ml(grid)
    records = apply_rules(labels, voxel_ml, configured_rules(options, label_infos),
                          {info.value: info.name for info in label_infos})
    notes = [record["note"] for record in records if record["removed"]]
    if options.fill_holes:
        boxes = label_boxes(labels, max((info.value for info in label_infos), default=0))
        for info in label_infos:
            if not _applies(options.fill_holes, info.name) or info.value not in boxes:
                continue
            region = labels[boxes[info.value]]  # a view: edits land in ``labels``
            holes = ndimage.binary_fill_holes(region == info.value) & (region == 0)
            if holes.any():
                region[holes] = info.value
                notes.append(f"{info.name}: filled {float(holes.sum() * voxel_ml):.2f} mL of holes")
    return notes
