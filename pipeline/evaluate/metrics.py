"""Per-case, per-class segmentation metrics in world units, computed with MONAI on cropped class boxes.

For every class value, :func:`case_metrics` crops prediction and reference to the bounding box of
their union (plus a margin) and computes the metrics with MONAI on the crops: ``compute_dice``, and
the edge-to-edge distances of ``get_edge_surface_distance`` (the computation inside
``compute_hausdorff_distance`` and ``compute_surface_dice``, run once and reduced as both of them do,
see :func:`surface_metrics`) with the voxel spacing, so distances are in mm and anisotropic voxels
are handled. Cropping does not change any value: every foreground voxel lies inside the box and the
margin keeps background around it, so edges, distances and components are those of the full volume
(``tests/test_evaluate_metrics.py`` checks every value against MONAI's functions on full volumes).
Classes run in ``workers`` threads (MONAI's torch and KD-tree work releases the GIL).

Definitions (all per class, the class mask being ``labels == class_value``):

- ``dice``: 2|P∩R| / (|P|+|R|).
- ``hd95_mm``: MONAI's percentile Hausdorff distance between the edge voxels (mask minus its
  erosion) of P and R: the ``hd_percentile``-th percentile (95 by default) of each directed set of
  nearest-edge distances, the larger of the two directions.
- ``surface_dice``: MONAI's normalised surface Dice: the fraction of edge voxels of P and R that lie
  within ``surface_tolerance_mm`` of the other's edge (counted per edge voxel; with
  ``surface_dice_subvoxels`` weighted by surface area as in Nikolov et al. 2021).
- ``volume_*_ml``: voxel count × voxel volume (product of the spacing) / 1000.
  ``volume_abs_error_ml`` = |Vp − Vr|; ``volume_rel_error`` = |Vp − Vr| / Vr (a fraction, unsigned).
- ``fp_components``: connected components of P that touch no voxel of R; ``fn_components``:
  components of R that touch no voxel of P. Connectivity is ``component_connectivity``: 26 (faces,
  edges and corners; the default) or 6 (faces only).

Empty masks (``flags`` names the case; several flags are joined with ``;``):

- ``both_empty``: the class is absent from both: a perfect result, dice 1, hd95 0 mm, surface dice 1,
  volume errors 0, no components.
- ``pred_empty`` (reference present, prediction absent) and ``ref_empty`` (the reverse): dice 0,
  surface dice 0, and hd95 = the diagonal of the whole image in mm (the largest distance two voxels
  of this image can have, so a miss always scores worse than any hit and means stay finite). With
  ``empty_one_side_distance="nan_flagged"`` hd95 is NaN instead; the summary then counts these rows
  as ``n_missing`` rather than dropping them silently.
- ``volume_rel_error`` is undefined when the reference is empty and the prediction is not: it is
  NaN there (flag ``ref_empty``), and counted as ``n_missing`` by the summary.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipeline.errors import CaseError, ConfigError, InputError
from pipeline.evaluate.options import MetricOptions  # the evaluate section's settings; re-exported here
from pipeline.postprocessing import label_boxes

METRIC_KEYS = ("dice", "hd95_mm", "surface_dice", "volume_pred_ml", "volume_ref_ml", "volume_abs_error_ml",
               "volume_rel_error", "fp_components", "fn_components")
ROW_KEYS = ("case_id", "class_value", "class_name") + METRIC_KEYS + ("flags",)
# Direction of "better" for each metric; the summary, comparison and report use it.
HIGHER_IS_BETTER = {"dice": True, "hd95_mm": False, "surface_dice": True, "volume_pred_ml": None,
                    "volume_ref_ml": None, "volume_abs_error_ml": False, "volume_rel_error": False,
                    "fp_components": False, "fn_components": False}
# MONAI 1.5+ passes its own deprecated argument internally on every surface-distance call; the warning
# is about MONAI's code, not ours, and would otherwise repeat for every class of every case.
warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)

FLAG_BOTH_EMPTY, FLAG_PRED_EMPTY, FLAG_REF_EMPTY = "both_empty", "pred_empty", "ref_empty"


def check_options(options: MetricOptions) -> None:
    """Raise ConfigError when an option is out of range."""
    if not (math.isfinite(options.surface_tolerance_mm) and options.surface_tolerance_mm >= 0):
        raise ConfigError(f"evaluate surface_tolerance_mm must be a finite number >= 0, got "
                          f"{options.surface_tolerance_mm}. Set it in mm, e.g. 2.0.")
    if not 0 < options.hd_percentile <= 100:
        raise ConfigError(f"evaluate hd_percentile must be above 0 and at most 100, got {options.hd_percentile}. "
                          f"Use 95 for HD95 or 100 for the maximum.")
    if options.empty_one_side_distance not in ("diagonal", "nan_flagged"):
        raise ConfigError(f"evaluate empty_one_side_distance must be 'diagonal' or 'nan_flagged', got "
                          f"{options.empty_one_side_distance!r}. Pick one of the two.")
    if options.component_connectivity not in (6, 26):
        raise ConfigError(f"evaluate component_connectivity must be 6 or 26, got {options.component_connectivity}.")
    if options.crop_margin_voxels < 1:
        raise ConfigError(f"evaluate crop_margin_voxels must be >= 1, got {options.crop_margin_voxels}. "
                          f"A margin of 1 keeps edges exact; use 2 (the default).")
    if options.workers < 1:
        raise ConfigError(f"evaluate workers must be >= 1, got {options.workers}.")


def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], classes: dict[int, str],
                 options: MetricOptions | None = None, *, case_id: str = "") -> list[dict]:
    """Metrics of one case: one row per class (keys :data:`ROW_KEYS`, in the order of ``classes``).

    ``pred`` and ``ref`` are label volumes on the same grid (integer class values; 0 = background),
    ``spacing`` the voxel size in mm along the array axes, ``classes`` maps class value → name.
    ``case_id`` is copied into the rows and names the case in error messages.
    """
    options = options or MetricOptions()
    check_options(options)
    spacing = _check_spacing(spacing, case_id)
    _check_classes(classes)
    pred = _as_labels(pred, "prediction", case_id)
    ref = _as_labels(ref, "reference", case_id)
    if pred.shape != ref.shape:
        raise _case_error(case_id, f"prediction shape must equal reference shape, got {pred.shape} vs "
                                   f"{ref.shape}. Resample the reference onto the prediction grid first.")
    boxes = class_boxes(pred, ref, list(classes), options.crop_margin_voxels)
    diagonal_mm = float(np.linalg.norm(np.asarray(pred.shape) * np.asarray(spacing)))
    crops = {}
    for value, box in boxes.items():
        crops[value] = ((pred[box] == value, ref[box] == value) if box is not None
                        else (np.zeros((1, 1, 1), bool), np.zeros((1, 1, 1), bool)))

    # two tasks per class (overlap, surface), biggest boxes first, so that threads stay evenly loaded
    tasks = [(kind, value) for value in sorted(crops, key=lambda v: -crops[v][0].size)
             for kind in ("surface", "overlap")]

    def run(task):
        kind, value = task
        pred_mask, ref_mask = crops[value]
        if kind == "surface":
            return surface_metrics(pred_mask, ref_mask, spacing, options, diagonal_mm)
        return overlap_metrics(pred_mask, ref_mask, spacing, options)

    if options.workers > 1:
        with ThreadPoolExecutor(max_workers=min(options.workers, len(tasks))) as pool:
            results = dict(zip(tasks, pool.map(run, tasks)))
    else:
        results = {task: run(task) for task in tasks}
    rows = []
    for value, name in classes.items():
        values = {**results[("overlap", value)], **results[("surface", value)]}
        rows.append({"case_id": case_id, "class_value": int(value), "class_name": str(name),
                     **{key: values[key] for key in METRIC_KEYS + ("flags",)}})
    return rows


def mask_metrics(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float], options: MetricOptions,
                 diagonal_mm: float) -> dict:
    """Metric values (keys :data:`METRIC_KEYS` and ``flags``) of two boolean masks on the same grid.

    ``diagonal_mm`` is the value hd95 takes when exactly one mask is empty (see the module docstring).
    """
    spacing = [float(s) for s in spacing]
    values = {**overlap_metrics(pred_mask, ref_mask, spacing, options),
              **surface_metrics(pred_mask, ref_mask, spacing, options, diagonal_mm)}
    return {key: values[key] for key in METRIC_KEYS + ("flags",)}


def overlap_metrics(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float],
                    options: MetricOptions) -> dict:
    """Volumes, their errors, Dice (MONAI ``compute_dice``), FP/FN component counts and the empty flags."""
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    n_pred, n_ref = int(np.count_nonzero(pred_mask)), int(np.count_nonzero(ref_mask))
    volume_pred, volume_ref = n_pred * voxel_ml, n_ref * voxel_ml
    values = {"volume_pred_ml": volume_pred, "volume_ref_ml": volume_ref,
              "volume_abs_error_ml": abs(volume_pred - volume_ref)}
    if n_ref:
        values["volume_rel_error"] = abs(volume_pred - volume_ref) / volume_ref
    else:  # relative to an empty reference the error is undefined (0 when both are empty)
        values["volume_rel_error"] = 0.0 if n_pred == 0 else math.nan
    if n_pred == 0 and n_ref == 0:
        values.update(dice=1.0, flags=FLAG_BOTH_EMPTY)
    elif n_pred == 0 or n_ref == 0:
        values.update(dice=0.0, flags=FLAG_PRED_EMPTY if n_pred == 0 else FLAG_REF_EMPTY)
    else:
        from monai.metrics import compute_dice

        # [batch, channel, i, j, k] with one binary channel
        dice = compute_dice(_bool_tensor(pred_mask)[None, None], _bool_tensor(ref_mask)[None, None],
                            include_background=True)
        values.update(dice=float(dice[0, 0]), flags="")
    values["fp_components"], values["fn_components"] = unmatched_components(
        pred_mask, ref_mask, options.component_connectivity)
    return values


def dice_per_class(prediction: np.ndarray, reference: np.ndarray, n_classes: int) -> list[float]:
    """Dice of channel indices 1..K-1 between two class-index maps, for training validation; NaN where both are empty.

    Unlike :func:`overlap_metrics` (an absent class scores 1 there), a class absent from both maps is NaN, so
    that validation's per-class mean (``nanmean`` over the cases) counts only the cases that hold the class.
    """
    prediction = np.asarray(prediction).ravel()
    reference = np.asarray(reference).ravel()
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction and reference must have the same number of voxels, got {prediction.size} "
                         f"and {reference.size}")
    scores = []
    for cls in range(1, n_classes):
        p, r = prediction == cls, reference == cls
        denominator = int(np.count_nonzero(p)) + int(np.count_nonzero(r))
        scores.append(math.nan if denominator == 0 else 2.0 * int(np.count_nonzero(p & r)) / denominator)
    return scores


def surface_metrics(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float],
                    options: MetricOptions, diagonal_mm: float) -> dict:
    """hd95_mm and surface_dice of two boolean masks (empty masks as in the module docstring).

    MONAI's ``compute_hausdorff_distance`` and ``compute_surface_dice`` each extract the edges and
    measure the same nearest-edge distances (``get_edge_surface_distance``), which is most of the
    time evaluate takes. Here MONAI's ``get_edge_surface_distance`` runs once, and both metrics are
    reduced from its distances exactly as those two functions do (percentile per direction, larger
    direction; fraction of distances <= tolerance). Tests and bench/evaluate.py check that the
    values equal the two MONAI functions'. Area-weighted surface Dice (``surface_dice_subvoxels``)
    uses different edges and calls ``compute_surface_dice`` itself.
    """
    has_pred, has_ref = bool(pred_mask.any()), bool(ref_mask.any())
    if not has_pred and not has_ref:
        return {"hd95_mm": 0.0, "surface_dice": 1.0}
    if not has_pred or not has_ref:
        missing_distance = diagonal_mm if options.empty_one_side_distance == "diagonal" else math.nan
        return {"hd95_mm": missing_distance, "surface_dice": 0.0}

    import torch
    from monai.metrics import compute_surface_dice
    from monai.metrics.utils import get_edge_surface_distance

    spacing = [float(s) for s in spacing]
    tolerance = float(options.surface_tolerance_mm)
    y_pred, y_ref = _bool_tensor(pred_mask), _bool_tensor(ref_mask)
    _, distances, _ = get_edge_surface_distance(y_pred, y_ref, distance_metric="euclidean", spacing=spacing,
                                                symmetric=True)
    # as compute_hausdorff_distance: the percentile of each direction, then the larger of the two
    hd = max(float(torch.quantile(d, options.hd_percentile / 100)) for d in distances)
    if options.surface_dice_subvoxels:
        nsd = compute_surface_dice(y_pred[None, None], y_ref[None, None], class_thresholds=[tolerance],
                                   include_background=True, spacing=spacing, use_subvoxels=True)[0, 0]
    else:  # as compute_surface_dice: edge voxels within the tolerance over all edge voxels
        pred_to_ref, ref_to_pred = distances
        nsd = (torch.sum(pred_to_ref <= tolerance) + torch.sum(ref_to_pred <= tolerance)) / (
            len(pred_to_ref) + len(ref_to_pred))
    return {"hd95_mm": hd, "surface_dice": float(nsd)}


def _bool_tensor(mask: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(mask, dtype=bool))


def unmatched_components(pred_mask: np.ndarray, ref_mask: np.ndarray, connectivity: int = 26) -> tuple[int, int]:
    """(false-positive, false-negative) component counts: components of one mask touching none of the other."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(3, 3 if connectivity == 26 else 1)

    def unmatched(mask: np.ndarray, other: np.ndarray) -> int:
        labels, count = ndimage.label(mask, structure=structure)
        if count == 0:
            return 0
        matched = np.unique(labels[other & mask])
        return int(count - np.count_nonzero(matched))

    return unmatched(pred_mask, ref_mask), unmatched(ref_mask, pred_mask)


def class_boxes(pred: np.ndarray, ref: np.ndarray, values: list[int],
                margin: int) -> dict[int, tuple[slice, slice, slice] | None]:
    """Per class value, the bounding box of its voxels in pred ∪ ref grown by ``margin`` (None when absent)."""
    parts: dict[int, list[tuple[slice, ...]]] = {value: [] for value in values}
    for volume in (pred, ref):
        for value, box in label_boxes(volume, max(values)).items():
            if value in parts:
                parts[value].append(box)
    boxes: dict[int, tuple[slice, slice, slice] | None] = {}
    for value, found in parts.items():
        boxes[value] = None if not found else tuple(
            slice(max(0, min(b[d].start for b in found) - margin), min(n, max(b[d].stop for b in found) + margin))
            for d, n in enumerate(pred.shape))
    return boxes


def _as_labels(array: np.ndarray, what: str, case_id: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 3:
        raise _case_error(case_id, f"{what} label volume must be 3-D, got shape {array.shape}. "
                                   f"Pass a single-channel [i, j, k] volume.")
    if array.dtype == bool:
        return array.view(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        return array
    if np.issubdtype(array.dtype, np.floating):
        # label files are sometimes stored as float; accept them only when every value is an integer
        as_int = array.astype(np.int32)
        if not np.array_equal(as_int, array):
            bad = array[as_int != array].flat[0]
            raise _case_error(case_id, f"{what} label volume must hold integer class values, got {bad!r}. "
                                       f"Pass the label map, not probabilities or an image.")
        return as_int
    raise _case_error(case_id, f"{what} label volume must have an integer dtype, got {array.dtype}.")


def _check_spacing(spacing: Sequence[float], case_id: str) -> list[float]:
    values = [float(s) for s in np.asarray(spacing, dtype=np.float64).ravel()]
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise _case_error(case_id, f"spacing must be three positive numbers (mm), got {list(spacing)}. "
                                   f"Take it from the volume's grid (Grid.spacing).")
    return values


def _check_classes(classes: dict[int, str]) -> None:
    if not classes:
        raise ConfigError("evaluate classes must name at least one class value, got none. "
                          "List the label values and names, e.g. {1: 'liver'}.")
    for value in classes:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"evaluate class values must be integers >= 1 (0 is background), got {value!r}. "
                              f"Fix the classes mapping.")


def _case_error(case_id: str, message: str) -> InputError:
    return CaseError(case_id, message) if case_id else InputError(message)
