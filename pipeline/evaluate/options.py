"""Options of the evaluate stage (``evaluate:`` in the config)."""
from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.evaluate.metrics import MetricOptions


@dataclass
class EvaluateConfig:
    """Metric settings."""

    metrics: MetricOptions = field(default_factory=MetricOptions)
    resample_ref: bool = field(default=False, metadata={
        "help": "Resample references onto the prediction grid (nearest) instead of refusing a mismatch."})
