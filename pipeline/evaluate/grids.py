"""The same-grid check between a predicted label volume and its reference."""
from __future__ import annotations

from pathlib import Path

from pipeline.errors import InputError
from pipeline.geometry import Grid


def check_same_grid(pred_path: str | Path, pred_grid: Grid, ref_path: str | Path, ref_grid: Grid) -> None:
    """Raise InputError naming both files and how their grids differ, unless they match within tolerance."""
    difference = pred_grid.difference(ref_grid)
    if difference:
        raise InputError(f"prediction {pred_path} and reference {ref_path} must be on the same voxel grid, got "
                         f"{difference} (prediction vs reference). Pass --resample-ref to resample the reference "
                         f"with nearest neighbour, or compare against the reference for this image.")
