"""Options of the preprocess stage (``preprocess:`` in the config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class PreprocessConfig:
    """How images are resampled and their intensities scaled before the network sees them."""

    target_spacing: Optional[list[float]] = field(default=None, metadata={
        "help": "Voxel spacing in mm along R, A, S after reorientation. null = planned from the data "
                "(median; the coarse axis kept for strongly anisotropic data)."})
    intensity: Literal["window", "percentile_zscore"] = field(default="window", metadata={
        "help": "window: clip to [window_low, window_high] HU and scale to [0, 1]; percentile_zscore: clip "
                "to the dataset's 0.5-99.5 percentiles inside the labels, then z-score."})
    window_low: float = field(default=-200.0, metadata={"help": "Lower HU bound of the fixed window."})
    window_high: float = field(default=300.0, metadata={"help": "Upper HU bound of the fixed window."})
    crop_to_body: bool = field(default=True, metadata={
        "help": "Crop each volume to the bounding box of the body (voxels above body_threshold_hu)."})
    body_threshold_hu: float = field(default=-500.0, metadata={"help": "HU above which a voxel counts as body."})
