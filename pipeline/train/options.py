"""Options of the train stage (``train:`` in the config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class TrainConfig:
    """Network, sampling and optimisation settings."""

    mode: Literal["3d", "2d"] = field(default="3d", metadata={
        "help": "3d: train on 3D patches; 2d: train slice-wise on axial slices."})
    network: Literal["UNet", "DynUNet", "SegResNet", "ClassicUNet"] = field(default="UNet", metadata={
        "help": "Network architecture."})
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128], metadata={
        "help": "Feature widths per resolution level."})
    patch_size: Optional[list[int]] = field(default=None, metadata={
        "help": "Patch size in voxels (3 values for 3d, 2 for 2d). null = planned to fit the memory budget."})
    batch_size: int = field(default=2, metadata={"help": "Patches per optimisation step."})
    max_steps: int = field(default=400, metadata={"help": "Optimisation steps in total."})
    val_every: int = field(default=100, metadata={"help": "Validate (sliding window, whole volumes) every N steps."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=1e-5, metadata={"help": "AdamW weight decay."})
    folds: int = field(default=1, metadata={
        "help": "1 = a single train/validation split (validation_fraction); k > 1 = k-fold cross-validation."})
    validation_fraction: float = field(default=0.2, metadata={"help": "Share of cases held out when folds = 1."})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={
        "help": "auto uses CUDA when present, else the CPU."})
