"""The dataset fingerprint and the plan made from it (``fingerprint.json``, ``plan.json``).

The fingerprint records, per training case, the spacing and size on canonical (RAS) axes, the size
of the body box, and a sample of HU values inside the labels. The plan derives from it:

- ``target_spacing``: the median spacing; for strongly anisotropic data (coarsest / finest median
  spacing > ``anisotropy_threshold``) the coarse axis gets the 10th percentile of its spacings,
  but never finer than the other axes (nnU-Net's rule), so thick slices stay thick.
- ``intensity``: a fixed HU window from the config, or the 0.5–99.5 percentiles of the HU inside
  the labels followed by a z-score with the foreground mean and standard deviation.
- ``configurations``: for ``3d`` and ``2d``, a patch size and batch size whose estimated training
  memory fits ``memory_budget_mb`` (patch starts at the median cropped image size, the axis with
  the largest physical extent shrinks first; batch then fills the budget, at least 2). Each also holds a
  ``cpu`` patch and batch, capped at ``cpu_max_patch_voxels`` and a batch of 2 (8 in 2d): training on the
  CPU uses them, because there the step time, not the memory, limits what a time budget can train.

Any field the config sets explicitly replaces the planned value; ``overrides`` lists them.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from pipeline.config import Config, stable_hash
from pipeline.labels.codes import codes_json

PLAN_FORMAT = "ctseg-plan/1"
TRANSFORM_KEYS = ("target_spacing", "intensity", "crop_to_body", "body_threshold_hu")


# ---------------------------------------------------------------------------------------------
# Memory model
# ---------------------------------------------------------------------------------------------

# float32 values kept per voxel and feature channel at each level for the backward pass (plus the
# logits/softmax/one-hot terms below). Calibrated against /proc/self/status VmHWM of real training
# steps (AdamW, DiceCE, channels-last) of MONAI's UNet with num_res_units=2: 64³ × 2 and 96³ × 2 at
# [16, 32, 64, 128], 64³ × 2 at [32, ..., 256], 256² × 8 in 2D: estimates within -20 %…+25 %.
# The paper-style ClassicUNet needs about 2.5× more per voxel; give it a smaller budget or patch.
TENSORS_PER_CHANNEL = 6.0
OVERHEAD_MB = 450.0  # the interpreter with torch and MONAI imported


def estimate_training_mb(patch_size: Sequence[int], batch_size: int, channels: Sequence[int],
                         out_channels: int = 4) -> float:
    """Rough peak training memory (MB) of a U-Net with per-level ``channels`` on one batch."""
    dims = len(patch_size)
    voxels = float(np.prod(patch_size))
    per_voxel = sum(c * TENSORS_PER_CHANNEL / (2 ** dims) ** level for level, c in enumerate(channels))
    per_voxel += 6 * out_channels  # logits, softmax, one-hot, gradients
    activations = batch_size * voxels * per_voxel * 4
    weights = sum(27 * c * c * 2 for c in channels) * 4 * 4  # weights, gradients, two Adam moments
    return OVERHEAD_MB + (activations + weights) / 2 ** 20


def plan_patch(median_shape: Sequence[float], spacing: Sequence[float], channels: Sequence[int],
               budget_mb: float, max_voxels: int, max_batch: int, out_channels: int,
               dataset_voxels: float) -> tuple[list[int], int]:
    """Patch size (multiple of the network's total downsampling) and batch size within the budget."""
    unit = 2 ** (len(channels) - 1)
    patch = [max(unit, int(math.ceil(s / unit)) * unit) for s in median_shape]
    spacing = list(spacing)

    def fits(p, batch):
        return estimate_training_mb(p, batch, channels, out_channels) <= budget_mb and np.prod(p) <= max_voxels

    while not fits(patch, 2):
        # shrink the axis with the largest physical extent that can still shrink
        extents = [p * s if p > unit else -1 for p, s in zip(patch, spacing)]
        axis = int(np.argmax(extents))
        if extents[axis] < 0:
            break
        patch[axis] -= unit
    batch = 2
    # nnU-Net's cap: one batch should not cover more than 5% of the whole dataset's voxels
    batch_cap = max(2, int(0.05 * dataset_voxels / np.prod(patch)))
    while batch < min(max_batch, batch_cap) and fits(patch, batch + 1):
        batch += 1
    return patch, batch


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------

def plan_target_spacing(spacings: np.ndarray, anisotropy_threshold: float) -> tuple[list[float], bool]:
    """Median spacing, with nnU-Net's coarse-axis rule for anisotropic data; returns (spacing, anisotropic)."""
    spacings = np.asarray(spacings, dtype=np.float64).reshape(-1, 3)
    target = np.median(spacings, axis=0)
    coarse = int(np.argmax(target))
    others = [a for a in range(3) if a != coarse]
    anisotropic = bool(target[coarse] > anisotropy_threshold * target[others].min())
    if anisotropic:
        low = float(np.percentile(spacings[:, coarse], 10))
        target[coarse] = max(low, float(target[others].max()) + 1e-5)
    return [round(float(s), 5) for s in target], anisotropic


def intensity_statistics(samples: np.ndarray, low_percentile: float, high_percentile: float) -> dict:
    samples = np.asarray(samples, dtype=np.float64)
    if samples.size == 0:
        return {}
    return {"percentile_low": float(np.percentile(samples, low_percentile)),
            "percentile_high": float(np.percentile(samples, high_percentile)),
            "mean": float(samples.mean()), "std": float(samples.std()),
            "min": float(samples.min()), "max": float(samples.max()), "samples": int(samples.size)}


def make_plan(fingerprint: dict, cfg: Config) -> dict:
    """The plan for ``fingerprint`` under the config's preprocess (and network width) settings."""
    options = cfg.preprocess
    overrides = []
    cases = fingerprint["cases"]
    spacings = np.array([c["spacing"] for c in cases])
    planned_spacing, anisotropic = plan_target_spacing(spacings, options.anisotropy_threshold)
    if options.target_spacing is not None:
        target_spacing = [float(s) for s in options.target_spacing]
        overrides.append("target_spacing")
    else:
        target_spacing = planned_spacing

    stats = fingerprint["foreground_hu"]
    if options.intensity == "window":
        intensity = {"mode": "window", "low": options.window_low, "high": options.window_high}
        overrides.append("intensity")
    else:
        intensity = {"mode": "percentile_zscore", "low": stats["percentile_low"], "high": stats["percentile_high"],
                     "mean": stats["mean"], "std": stats["std"]}

    # sizes after resampling and cropping to the body, in voxels of the target grid
    extents = np.array([c["body_extent_mm"] if options.crop_to_body else c["extent_mm"] for c in cases])
    shapes = np.maximum(1, np.round(extents / np.asarray(target_spacing)))
    median_shape = np.median(shapes, axis=0)
    dataset_voxels = float(np.prod(shapes, axis=1).sum())
    labels = [label for label in fingerprint["labels"] if int(label["value"]) != 0]
    out_channels = len(labels) + 1
    channels = list(cfg.train.channels)
    patch3, batch3 = plan_patch(median_shape, target_spacing, channels, options.memory_budget_mb,
                                options.max_patch_voxels, options.max_batch_size, out_channels, dataset_voxels)
    patch2, batch2 = plan_patch(median_shape[:2], target_spacing[:2], channels, options.memory_budget_mb,
                                options.max_patch_voxels, 4 * options.max_batch_size, out_channels, dataset_voxels)
    # the CPU's own plan: compute, not memory, limits a CPU, so its patch is capped harder (train picks it there)
    cpu_voxels = min(options.max_patch_voxels, options.cpu_max_patch_voxels)
    cpu3, cpu_batch3 = plan_patch(median_shape, target_spacing, channels, options.memory_budget_mb, cpu_voxels, 2,
                                  out_channels, dataset_voxels)
    cpu2, cpu_batch2 = plan_patch(median_shape[:2], target_spacing[:2], channels, options.memory_budget_mb,
                                  cpu_voxels, 8, out_channels, dataset_voxels)
    plan = {
        "format": PLAN_FORMAT,
        "target_spacing": target_spacing,
        "intensity": intensity,
        "crop_to_body": bool(options.crop_to_body),
        "body_threshold_hu": float(options.body_threshold_hu),
        "labels": [{"name": lbl["name"], "value": int(lbl["value"]), "color": list(lbl.get("color") or []),
                    **codes_json(lbl)} for lbl in labels],
        "class_values": [0] + [int(lbl["value"]) for lbl in labels],
        "configurations": {
            "3d": {"patch_size": patch3, "batch_size": batch3,
                   "estimated_memory_mb": round(estimate_training_mb(patch3, batch3, channels, out_channels)),
                   "cpu": {"patch_size": cpu3, "batch_size": cpu_batch3}},
            "2d": {"patch_size": patch2, "batch_size": batch2,
                   "estimated_memory_mb": round(estimate_training_mb(patch2, batch2, channels, out_channels)),
                   "cpu": {"patch_size": cpu2, "batch_size": cpu_batch2}},
        },
        "planned": {"target_spacing": planned_spacing, "anisotropic": anisotropic,
                    "median_shape": [float(s) for s in median_shape], "memory_budget_mb": options.memory_budget_mb,
                    "network_channels": channels},
        "overrides": overrides,
    }
    plan["transform_key"] = transform_key(plan)
    return plan


def transform_key(plan: dict) -> str:
    """Hash of the plan fields that change the cached arrays (not patch or batch size)."""
    payload = {key: plan.get(key) for key in TRANSFORM_KEYS}
    payload["class_values"] = plan.get("class_values")
    return stable_hash(payload)
