"""Options of the preprocess stage (``preprocess:`` in the config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class PreprocessConfig:
    """How images are resampled and their intensities scaled before the network sees them.

    Every field left null is planned from the data (see ``plan.json``); a value set here
    overrides the planned one.
    """

    target_spacing: list[float] | None = field(default=None, metadata={
        "help": "Voxel spacing in mm along R, A, S after reorientation. null = planned from the data "
                "(median; the coarse axis kept for strongly anisotropic data)."})
    anisotropy_threshold: float = field(default=3.0, metadata={
        "help": "When the median spacing's coarsest axis is more than this many times the finest, the coarse "
                "axis gets the 10th percentile of its spacings instead of the median (nnU-Net's rule), so that "
                "thick-slice scans are not interpolated into many invented slices."})
    intensity: Literal["window", "percentile_zscore"] = field(default="window", metadata={
        "help": "window: clip to [window_low, window_high] HU and scale to [0, 1]; percentile_zscore: clip "
                "to the dataset's 0.5-99.5 percentiles inside the labels, then z-score."})
    window_low: float = field(default=-200.0, metadata={"help": "Lower HU bound of the fixed window."})
    window_high: float = field(default=300.0, metadata={"help": "Upper HU bound of the fixed window."})
    percentile_low: float = field(default=0.5, metadata={
        "help": "Lower clip percentile of the HU inside the labels (percentile_zscore)."})
    percentile_high: float = field(default=99.5, metadata={
        "help": "Upper clip percentile of the HU inside the labels (percentile_zscore)."})
    crop_to_body: bool = field(default=True, metadata={
        "help": "Crop each volume to the bounding box of the body (voxels above body_threshold_hu)."})
    body_threshold_hu: float = field(default=-500.0, metadata={"help": "HU above which a voxel counts as body."})
    memory_budget_mb: float = field(default=4000.0, metadata={
        "help": "Training memory (MB of activations, gradients and weights) the planned patch and batch size "
                "must fit; estimated for the network in train.channels."})
    max_patch_voxels: int = field(default=128 ** 3, metadata={
        "help": "Upper bound on the planned 3D patch's voxel count, whatever the memory budget (CPU time "
                "grows with it)."})
    cpu_max_patch_voxels: int = field(default=64 ** 3, metadata={
        "help": "Upper bound on the patch planned for training on the CPU (plan.json configurations.<mode>.cpu): a "
                "2-core CPU trains a 64^3 patch about 8x faster per step than a 128^3 one, so within a time budget "
                "it sees many more patches. Ignored on a GPU and when train.patch_size is set."})
    max_batch_size: int = field(default=8, metadata={"help": "Upper bound on the planned batch size."})
    intensity_samples_per_case: int = field(default=10000, metadata={
        "help": "Foreground voxels sampled per case for the dataset's HU statistics."})
    cache_dtype: Literal["float32", "float16"] = field(default="float32", metadata={
        "help": "Storage type of the cached preprocessed images; float16 halves disk and memory use."})
