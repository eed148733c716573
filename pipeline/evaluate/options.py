"""Options of the evaluate stage (``evaluate:`` in the config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# MetricOptions lives here (not in metrics.py, which needs numpy and MONAI) so that loading a config stays light.


@dataclass
class MetricOptions:
    """How evaluate computes its per-class metrics."""

    surface_tolerance_mm: float = field(default=2.0, metadata={
        "help": "Surface Dice counts boundary voxels within this distance (mm) of the other boundary as correct."})
    hd_percentile: float = field(default=95.0, metadata={
        "help": "Percentile of the surface distances reported as hd95_mm (100 gives the plain Hausdorff distance)."})
    empty_one_side_distance: Literal["diagonal", "nan_flagged"] = field(default="diagonal", metadata={
        "help": "hd95 when exactly one of prediction/reference is empty: 'diagonal' uses the image diagonal in mm "
                "(finite, worst possible); 'nan_flagged' writes NaN, which the summary counts as missing."})
    component_connectivity: Literal[6, 26] = field(default=26, metadata={
        "help": "Voxel connectivity for FP/FN component counts: 26 (faces, edges, corners) or 6 (faces only)."})
    surface_dice_subvoxels: bool = field(default=False, metadata={
        "help": "Weight surface Dice by boundary surface area (MONAI use_subvoxels) instead of counting edge voxels."})
    crop_margin_voxels: int = field(default=2, metadata={
        "help": "Background voxels kept around each class's bounding box before computing distances (>= 1)."})
    workers: int = field(default=2, metadata={
        "help": "Threads computing the classes of one case in parallel (1 = sequential)."})



@dataclass
class EvaluateConfig:
    """Metric settings."""

    metrics: MetricOptions = field(default_factory=MetricOptions)
    resample_ref: bool = field(default=False, metadata={
        "help": "Resample references onto the prediction grid (nearest) instead of refusing a mismatch."})
