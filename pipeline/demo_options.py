"""Typed settings of ``ctseg demo`` (the ``demo:`` config section), kept apart from the demo's code.

``pipeline.config`` imports this module; the demo itself (``pipeline.demo``) pulls in the phantom and DICOM
writers, which the config must not load.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DemoConfig:
    """The synthetic data of ``ctseg demo``."""

    train_cases: int = field(default=8, metadata={"help": "Phantoms used for training and validation."})
    test_cases: int = field(default=3, metadata={"help": "Held-out phantoms predicted and scored at the end."})
    in_plane_size: int = field(default=160, metadata={"help": "Rows and columns of each phantom slice."})
    slices: int = field(default=80, metadata={
        "help": "Slices per phantom (spacing random, 1.25-5 mm); 0.5 x in_plane_size or more keeps organs whole."})
    min_dice: float = field(default=0.90, metadata={"help": "Mean foreground Dice the demo must reach to pass."})
