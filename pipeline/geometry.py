"""Voxel grids, volumes and the resampling between grids that every stage shares.

Conventions, used everywhere in ctseg:
- An array is indexed ``[i, j, k]``: i runs along a DICOM row (columns of the image), j down the
  rows, k across slices. This is NIfTI's and ITK's index order, not NumPy-from-DICOM's ``[k, j, i]``.
- ``affine`` is a 4×4 matrix mapping ``(i, j, k, 1)`` to RAS+ world millimetres, as in nibabel.
  DICOM and ITK work in LPS; :func:`lps_to_ras` converts (negate the first two world rows).
- A :class:`Grid` is ``(shape, affine)``. Two grids are "the same" when shapes are equal and the
  affines agree to a small tolerance; labels must live on exactly their image's grid.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipeline import torchrun

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
PARALLEL_VOXELS = 1 << 21  # linear resampling onto a grid this large runs in slabs, one thread per core of the process


def lps_to_ras(affine_lps: np.ndarray) -> np.ndarray:
    """Convert an index→LPS affine (DICOM, ITK) into an index→RAS affine (NIfTI). Self-inverse."""
    return LPS_TO_RAS @ np.asarray(affine_lps, dtype=np.float64)


ras_to_lps = lps_to_ras


def affine_from_parts(direction: np.ndarray, spacing: Sequence[float] | np.ndarray,
                      origin: Sequence[float] | np.ndarray) -> np.ndarray:
    """Build a 4×4 affine whose column d is ``direction[:, d] * spacing[d]`` and whose translation is origin."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(direction, dtype=np.float64) * np.asarray(spacing, dtype=np.float64)[None, :]
    affine[:3, 3] = np.asarray(origin, dtype=np.float64)
    return affine


@dataclasses.dataclass(frozen=True)
class Grid:
    """A voxel grid: array shape plus the index→RAS affine."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "affine", np.asarray(self.affine, dtype=np.float64))

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def direction(self) -> np.ndarray:
        """3×3 matrix of unit column vectors (RAS) of the i, j, k axes."""
        return self.affine[:3, :3] / self.spacing[None, :]

    @property
    def origin(self) -> np.ndarray:
        """RAS position of the centre of voxel (0, 0, 0)."""
        return self.affine[:3, 3].copy()

    def world(self, index: Sequence[float] | np.ndarray) -> np.ndarray:
        return (self.affine @ np.append(np.asarray(index, dtype=np.float64), 1.0))[:3]

    def difference(self, other: Grid, atol_mm: float = 1e-3, atol_dir: float = 1e-4) -> str | None:
        """Describe how this grid differs from ``other``, or None when they match within tolerance."""
        problems = []
        if self.shape != other.shape:
            problems.append(f"shape {self.shape} vs {other.shape}")
        if not np.allclose(self.spacing, other.spacing, atol=atol_mm):
            problems.append(f"spacing {_fmt(self.spacing)} vs {_fmt(other.spacing)} mm")
        if not np.allclose(self.origin, other.origin, atol=atol_mm):
            problems.append(f"origin {_fmt(self.origin)} vs {_fmt(other.origin)} mm (RAS)")
        if not np.allclose(self.direction, other.direction, atol=atol_dir):
            problems.append(f"direction {_fmt(self.direction.ravel())} vs {_fmt(other.direction.ravel())}")
        return "; ".join(problems) or None

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "affine": self.affine.tolist()}

    @classmethod
    def from_json(cls, data: dict) -> Grid:
        return cls(tuple(data["shape"]), np.array(data["affine"], dtype=np.float64))


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in np.asarray(values).ravel()) + ")"


@dataclasses.dataclass
class Volume:
    """An array on a grid. ``array`` is indexed [i, j, k] (see module docstring)."""

    array: np.ndarray
    affine: np.ndarray

    @property
    def grid(self) -> Grid:
        return Grid(self.array.shape[:3], self.affine)


# ---------------------------------------------------------------------------------------------
# Canonical grids and resampling
# ---------------------------------------------------------------------------------------------

def canonical_grid(grid: Grid) -> Grid:
    """The same voxels with axes permuted/flipped so i, j, k point closest to R, A, S.

    Only the index order changes; every voxel keeps its world position (oblique stays oblique).
    """
    axis_for = np.argmax(np.abs(grid.direction), axis=1)  # for each RAS world axis, the closest index axis
    if len(set(axis_for.tolist())) != 3:  # pathological 45° cases: fall back to a greedy assignment
        axis_for = _greedy_axis_assignment(np.abs(grid.direction))
    affine = np.eye(4)
    shape = []
    origin = grid.origin.copy()
    for world_axis, index_axis in enumerate(axis_for):
        column = grid.affine[:3, index_axis].copy()
        n = grid.shape[index_axis]
        if column[world_axis] < 0:  # flip so this axis increases along the world axis
            origin = origin + column * (n - 1)
            column = -column
        affine[:3, world_axis] = column
        shape.append(n)
    affine[:3, 3] = origin
    return Grid((shape[0], shape[1], shape[2]), affine)


def _greedy_axis_assignment(weights: np.ndarray) -> np.ndarray:
    assignment = np.full(3, -1)
    used: set[int] = set()
    for flat in np.argsort(-weights, axis=None):
        world_axis, index_axis = divmod(int(flat), 3)
        if assignment[world_axis] < 0 and index_axis not in used:
            assignment[world_axis] = index_axis
            used.add(index_axis)
    return assignment


def regrid_spacing(grid: Grid, spacing: Sequence[float]) -> Grid:
    """A grid with the same axes and field of view (outer voxel edges) but the given spacing.

    The size along each axis is ``round(n * s / t)`` (at least 1); the spacing is then adjusted
    slightly so that the outer voxel edges coincide exactly, which keeps resampling symmetric.
    """
    old_spacing = grid.spacing
    target = np.asarray(spacing, dtype=np.float64)
    extent = np.asarray(grid.shape) * old_spacing
    new_shape = np.maximum(1, np.round(extent / target)).astype(int)
    new_spacing = extent / new_shape
    direction = grid.direction
    # first voxel centre moves from half an old voxel inside the edge to half a new voxel inside
    edge = grid.origin - direction @ (old_spacing / 2)
    origin = edge + direction @ (new_spacing / 2)
    return Grid(tuple(new_shape.tolist()), affine_from_parts(direction, new_spacing, origin))


def crop_grid(grid: Grid, start: Sequence[int], stop: Sequence[int]) -> Grid:
    """The sub-grid of voxels ``[start, stop)`` along each axis."""
    first = np.asarray(start, dtype=int)
    affine = grid.affine.copy()
    affine[:3, 3] = grid.world(first)
    return Grid(tuple((np.asarray(stop) - first).tolist()), affine)


def index_mapping(src: Grid, dst: Grid) -> np.ndarray:
    """4×4 matrix taking a dst index to the src index at the same world point."""
    return np.linalg.inv(src.affine) @ dst.affine


def axis_aligned_permutation(matrix: np.ndarray, tol: float = 1e-6) -> list[int] | None:
    """If each src axis depends on exactly one dst axis, return perm with src axis d ← dst axis perm[d].

    ``matrix`` is an :func:`index_mapping` (dst index → src index); None when the grids' axes are not parallel.
    """
    linear = matrix[:3, :3]
    scale = np.abs(linear).max()
    perm = []
    for row in linear:
        nonzero = np.flatnonzero(np.abs(row) > tol * max(scale, 1.0))
        if len(nonzero) != 1:
            return None
        perm.append(int(nonzero[0]))
    return perm if sorted(perm) == [0, 1, 2] else None


def resample_to_grid(array: np.ndarray, src: Grid, dst: Grid, order: int = 0, fill: float = 0.0,
                     out_dtype=None) -> np.ndarray:
    """Resample ``array`` (on ``src``) onto ``dst``: order 0 = nearest (labels), 1 = linear (images).

    When the two grids' axes are parallel (reorientation, new spacing, crop, pad: everything the
    preprocessing does) this runs as separable per-axis index lookups, which is exact and fast.
    Otherwise it falls back to ``scipy.ndimage.affine_transform``.
    """
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order}")
    out_dtype = out_dtype or array.dtype
    matrix = index_mapping(src, dst)
    perm = axis_aligned_permutation(matrix)
    if perm is None:
        from scipy import ndimage

        result = ndimage.affine_transform(array.astype(np.float32) if order else array, matrix[:3, :3],
                                          offset=matrix[:3, 3], output_shape=dst.shape, order=order,
                                          mode="constant", cval=fill, prefilter=False)
        return result.astype(out_dtype, copy=False)

    # src axis d is sampled at coordinate scale*dst_index[perm[d]] + offset
    coords = []
    for d in range(3):
        n_dst = dst.shape[perm[d]]
        coords.append(matrix[d, perm[d]] * np.arange(n_dst) + matrix[d, 3])
    # output axis order after sampling is (perm[0], perm[1], perm[2]); transpose back to dst order
    inverse = np.argsort(perm)
    if order == 0:
        idx = [np.floor(c + 0.5).astype(np.int64) for c in coords]
        valid = [(ix >= 0) & (ix < n) for ix, n in zip(idx, array.shape)]
        clipped = [np.clip(ix, 0, n - 1) for ix, n in zip(idx, array.shape)]
        result = array[np.ix_(*clipped)]
        if not all(v.all() for v in valid):
            mask = valid[0][:, None, None] & valid[1][None, :, None] & valid[2][None, None, :]
            result = np.where(mask, result, np.asarray(fill, dtype=result.dtype))
        return np.ascontiguousarray(result.transpose(inverse)).astype(out_dtype, copy=False)

    # Pass by pass in the source's memory order, slowest axis first: the first pass copies whole contiguous
    # slabs straight from the stored type (int16 CT), so only the reduced array is ever float32. Converting
    # the whole box to float32 first (a 512x512x300 CT: 315 MB of fresh memory) and gathering along the
    # fastest axis of a Fortran-ordered array (nibabel's default) were the slow parts.
    pass_order = sorted(range(3), key=lambda d: -abs(array.strides[d]))
    first = pass_order[0]

    def passes(part: np.ndarray) -> np.ndarray:
        """The destination points ``part`` of the first pass's axis (all of the others); axes as ``pass_order``."""
        box, shifted = _touched_box(array.shape, [part if axis == first else coords[axis] for axis in range(3)])
        result = array[tuple(box)].transpose(pass_order)
        for view_axis, axis in enumerate(pass_order):
            result = _linear_along_axis(result, view_axis, shifted[axis], fill)
        return result

    # large volumes in slabs along the first pass's axis, one thread each: numpy releases the GIL in these
    # gathers and products, and every output voxel is computed by the same operations (identical result)
    parts = min(torchrun.cores_per_process(), len(coords[first])) if math.prod(dst.shape) >= PARALLEL_VOXELS else 1
    if parts > 1:
        with ThreadPoolExecutor(max_workers=parts) as pool:
            result = np.concatenate(list(pool.map(passes, np.array_split(coords[first], parts))), axis=0)
    else:
        result = passes(coords[first])
    # result axes are source axes ``pass_order``; back to source order, then to the destination's
    to_source = np.argsort(pass_order)
    return np.ascontiguousarray(result.transpose(to_source).transpose(inverse)).astype(out_dtype, copy=False)


def _touched_box(shape, coords: list[np.ndarray]) -> tuple[list[slice], list[np.ndarray]]:
    """The source box the destination's linear samples touch, and the coordinates shifted into it.

    Only the source voxels the destination touches are converted and interpolated: a crop of a large volume
    (the body box of a 512x512x300 CT) then costs what the crop costs.
    """
    box, shifted = [], []
    for d in range(3):
        n = shape[d]
        low = int(np.clip(np.floor(coords[d].min()), 0, n - 1)) if len(coords[d]) else 0
        high = int(np.clip(np.floor(coords[d].max()) + 2, 1, n)) if len(coords[d]) else n
        box.append(slice(low, max(high, low + 1)))
        # clamping and fill are decided on the full axis, so shift coordinates but keep out-of-volume ones out
        shifted.append(np.where((coords[d] >= -0.5) & (coords[d] <= n - 0.5),
                                np.clip(coords[d] - low, 0, box[d].stop - low - 1), -1.0e9))
    return box, shifted


def _linear_along_axis(array: np.ndarray, axis: int, coords: np.ndarray, fill: float) -> np.ndarray:
    """One separable linear pass along ``axis``; returns a C-ordered float32 array (any input type)."""
    n = array.shape[axis]
    lower = np.floor(coords).astype(np.int64)
    weight = (coords - lower).astype(np.float32)
    # points within half a voxel outside the edge are clamped (edge padding), further out get fill
    inside = (coords >= -0.5) & (coords <= n - 0.5)
    lo = np.clip(lower, 0, n - 1)
    hi = np.clip(lower + 1, 0, n - 1)
    shape = [1, 1, 1]
    shape[axis] = len(coords)
    w = weight.reshape(shape)
    if array.flags.c_contiguous:
        low_values, high_values = np.take(array, lo, axis=axis), np.take(array, hi, axis=axis)
    else:  # a strided view (a crop): index it directly, np.take would first copy all of it
        index = (slice(None),) * axis
        low_values, high_values = array[index + (lo,)], array[index + (hi,)]
    result = np.array(low_values, dtype=np.float32, order="C")
    result *= 1 - w
    result += high_values * w
    if not inside.all():
        result[(slice(None),) * axis + (~inside,)] = fill
    return result


def world_to_index(grid: Grid, points_ras: np.ndarray) -> np.ndarray:
    """Continuous voxel indices of world points (N×3, RAS mm)."""
    points = np.c_[np.asarray(points_ras, dtype=np.float64), np.ones(len(points_ras))]
    return (np.linalg.inv(grid.affine) @ points.T).T[:, :3]


def is_orthonormal(direction: np.ndarray, tol: float = 1e-3) -> bool:
    return bool(np.allclose(direction.T @ direction, np.eye(3), atol=tol))


def voxel_volume_ml(grid: Grid) -> float:
    return float(abs(np.linalg.det(grid.affine[:3, :3])) / 1000.0)


def physical_extent_mm(grid: Grid) -> np.ndarray:
    return np.asarray(grid.shape) * grid.spacing


def isclose_spacing(a: Sequence[float], b: Sequence[float], rel: float = 1e-3) -> bool:
    return all(math.isclose(x, y, rel_tol=rel) for x, y in zip(a, b))
