"""Options of the evaluate stage (``evaluate:`` in the config)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvaluateConfig:
    """Metric settings."""

    surface_tolerance_mm: float = field(default=2.0, metadata={
        "help": "Tolerance of the normalised surface Dice, in mm."})
    resample_ref: bool = field(default=False, metadata={
        "help": "Resample references onto the prediction grid (nearest) instead of refusing a mismatch."})
