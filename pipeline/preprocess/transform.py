"""The forward preprocessing of one volume onto the model grid, and the way back for labels.

A *plan* (a plain dict, stored in ``plan.json`` and in every model folder) fixes:
``target_spacing`` (mm along R, A, S), ``intensity`` (``{"mode": "window", "low", "high"}`` or
``{"mode": "percentile_zscore", "low", "high", "mean", "std"}``), ``crop_to_body`` and
``body_threshold_hu``.

The model grid is the source grid reoriented to the closest RAS axes, resampled to the target
spacing over the same field of view, then optionally cropped to the body (the box is found on
the source, and only the box is resampled). Every step is a change
of :class:`~pipeline.geometry.Grid`, so going back is one nearest-neighbour resampling from the
model grid onto the source grid (:func:`labels_to_source`): exact by construction, for oblique and
feet-first sources too.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.geometry import Grid, Volume, canonical_grid, crop_grid, regrid_spacing, resample_to_grid, world_to_index

AIR_HU = -1024.0
BODY_MARGIN_MM = 10.0


@dataclass
class Prepared:
    """A volume on the model grid: ``array`` float32 [i, j, k] plus the grid and the source grid."""

    array: np.ndarray
    grid: Grid
    source_grid: Grid


def resampled_grid(source: Grid, plan: dict) -> Grid:
    """The source's field of view on canonical axes at the plan's target spacing (before cropping)."""
    return regrid_spacing(canonical_grid(source), plan["target_spacing"])


def body_box(volume: Volume, target: Grid, threshold_hu: float) -> tuple[np.ndarray, np.ndarray]:
    """[start, stop) voxel box of ``target`` around every source voxel above ``threshold_hu``, plus 10 mm.

    Found on the source array, so that only the box is resampled afterwards: every body voxel's
    extent (half a voxel each side) is mapped into ``target`` indices, for oblique sources too.
    """
    inside = volume.array > threshold_hu
    present = [np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    if any(len(p) == 0 for p in present):
        return np.zeros(3, dtype=int), np.asarray(target.shape)
    edges = [(p[0] - 0.5, p[-1] + 0.5) for p in present]
    corners = np.array([[edges[0][a], edges[1][b], edges[2][c]] for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    world = corners @ volume.affine[:3, :3].T + volume.affine[:3, 3]
    in_target = world_to_index(target, world)
    margin = np.ceil(BODY_MARGIN_MM / target.spacing).astype(int)
    start = np.floor(in_target.min(axis=0) + 0.5).astype(int) - margin
    stop = np.ceil(in_target.max(axis=0) - 0.5).astype(int) + 1 + margin
    return np.clip(start, 0, target.shape), np.clip(stop, 1, target.shape)


def scale_intensity(hu: np.ndarray, intensity: dict) -> np.ndarray:
    """HU → network input, as the plan says. Uses MONAI's array transforms."""
    from monai.transforms import ScaleIntensityRange

    low, high = float(intensity["low"]), float(intensity["high"])
    if intensity["mode"] == "window":
        scaled = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True, dtype=np.float32)(hu)
    elif intensity["mode"] == "percentile_zscore":
        mean, std = float(intensity["mean"]), max(float(intensity["std"]), 1e-6)
        # clip to the dataset percentiles, then z-score: one affine map after the clip
        scaled = ScaleIntensityRange(a_min=low, a_max=high, b_min=(low - mean) / std, b_max=(high - mean) / std,
                                     clip=True, dtype=np.float32)(hu)
    else:
        raise ValueError(f"plan intensity mode must be 'window' or 'percentile_zscore', got {intensity['mode']!r}")
    return np.asarray(scaled, dtype=np.float32)


def air_input_value(intensity: dict | None) -> float:
    """The network-input value of air under a plan's intensity mapping: what the sliding window pads with.

    Training pads a case smaller than the patch with its minimum, which is this value for any CT that holds
    air; padding with 0 instead would be soft tissue under ``percentile_zscore`` (0 = the foreground mean).
    None (no intensity known, e.g. a test network) keeps 0.
    """
    if not intensity:
        return 0.0
    return float(scale_intensity(np.full((1, 1, 1), AIR_HU, dtype=np.float32), intensity).reshape(-1)[0])


def prepare_image(volume: Volume, plan: dict, crop_align: Sequence[int] = (1, 1, 1)) -> Prepared:
    """Resample (linear) onto the model grid, crop to the body and scale intensities.

    ``crop_align``: the body crop starts at a multiple of this many voxels per axis. Prediction
    passes the network's total stride: a strided network's output only shifts exactly with its
    input when the shift is a multiple of its stride, so an aligned crop gives the labels of
    uncropped inference (up to where the windows sit) at the cost of a few more air voxels.
    """
    source = volume.grid
    target = resampled_grid(source, plan)
    if plan.get("crop_to_body", False):
        start, stop = body_box(volume, target, plan.get("body_threshold_hu", -500.0))
        align = np.maximum(np.asarray(crop_align, dtype=int), 1)
        start = start - start % align
        target = crop_grid(target, start, stop)
    hu = resample_to_grid(volume.array, source, target, order=1, fill=AIR_HU, out_dtype=np.float32)
    return Prepared(scale_intensity(hu, plan["intensity"]), target, source)


def prepare_label(label: Volume, model_grid: Grid) -> np.ndarray:
    """Resample a label map (nearest) onto a model grid made by :func:`prepare_image`."""
    return resample_to_grid(label.array, label.grid, model_grid, order=0, fill=0)


def labels_to_source(labels: np.ndarray, model_grid: Grid, source_grid: Grid, dtype=np.uint8) -> np.ndarray:
    """Bring a label map from the model grid back onto the source grid (nearest neighbour)."""
    return resample_to_grid(labels, model_grid, source_grid, order=0, fill=0, out_dtype=dtype)
