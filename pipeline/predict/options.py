"""Options of the predict stage (``predict:`` in the config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class PredictConfig:
    """Inference and output settings."""

    overlap: float = field(default=0.5, metadata={"help": "Sliding-window overlap between patches (0-1)."})
    batch_size: int = field(default=2, metadata={"help": "Patches per forward pass."})
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field(default="auto", metadata={
        "help": "auto = bf16 autocast where supported (CPU with bf16, CUDA), fp32 otherwise."})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={
        "help": "auto uses CUDA when present, else the CPU."})
