"""Radiological thumbnail geometry, shared by the morning report and the evaluation report.

One place decides how a volume becomes three pictures: the volume is viewed along R, A, S without resampling
(:func:`canonical_view`: axes permuted and flipped only), and each view is shown in the radiological convention
(:func:`display_plane`): the patient's right on the viewer's left (axial, coronal), anterior on the left
(sagittal), anterior (axial) or superior (coronal, sagittal) at the top, with :data:`ORIENTATION_LETTERS` naming
the patient directions at the top, bottom, left and right edges. Each report draws its own overlay on top.
"""
from __future__ import annotations

import numpy as np

from pipeline.geometry import Grid, canonical_grid

VIEWS = ("axial", "coronal", "sagittal")
#: the canonical (RAS) axis each view cuts across
VIEW_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}
#: patient directions at the (top, bottom, left, right) edges of each displayed view
ORIENTATION_LETTERS = {"axial": ("A", "P", "R", "L"), "coronal": ("S", "I", "R", "L"),
                       "sagittal": ("S", "I", "A", "P")}


def canonical_view(array: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """A zero-copy view of ``array`` with axes along R, A, S (increasing), and the spacing of those axes.

    An oblique grid is viewed along its nearest canonical axes (no interpolation: the stored voxels are shown).
    """
    canon = canonical_grid(grid)
    mapping = np.linalg.inv(grid.affine) @ canon.affine
    order, flips = [], []
    for dst_axis in range(3):
        src_axis = int(np.argmax(np.abs(mapping[:3, dst_axis])))
        order.append(src_axis)
        flips.append(mapping[src_axis, dst_axis] < 0)
    view = np.transpose(array, order)
    for axis, flip in enumerate(flips):
        if flip:
            view = np.flip(view, axis)
    return view, canon.spacing


def display_plane(canonical: np.ndarray, view: str, index: int) -> np.ndarray:
    """The slice ``index`` of a canonical (RAS) volume across ``view``'s axis, as display [row, column]."""
    plane = np.take(canonical, index, axis=VIEW_AXIS[view])
    # [first, second] index plane → rows top-down along the second axis descending, columns along the first
    # axis descending: superior/anterior at the top, patient's right (or anterior) on the viewer's left
    return np.asarray(plane).T[::-1, ::-1]


def display_spacing(view: str, spacing) -> tuple[float, float]:
    """(row spacing, column spacing) in mm of the displayed plane of a canonical volume with ``spacing``."""
    sx, sy, sz = (float(s) for s in spacing)
    return {"axial": (sy, sx), "coronal": (sz, sx), "sagittal": (sz, sy)}[view]
