"""Plausibility checks for a CT volume (from DICOM or NIfTI): does it look like CT in HU on a sane grid?

:func:`check_plausibility` returns one warning per problem, and raises :class:`InputError` instead
when :attr:`PlausibilityOptions.refuse` is set. :func:`check_training_volume` (ingest) also refuses
NaN/infinite voxels, a sheared grid and too few slices unless the matching ``allow_*`` option is set.
It flags intensities that are not HU (display values such as uint8 0–255, or no air anywhere), NaN
or infinite voxels, direction cosines that are not orthonormal, too few slices and a tiny field of view.
"""
from __future__ import annotations

import numpy as np

from pipeline.errors import InputError
from pipeline.geometry import Volume
from pipeline.ingest.options import PlausibilityOptions  # the ingest section's settings; re-exported here

AIR_HU = -1000.0


def check_plausibility(volume: Volume, source: str, options: PlausibilityOptions | None = None) -> list[str]:
    """Warnings for ``volume`` (named ``source`` in messages); raises instead when ``options.refuse``."""
    options = options or PlausibilityOptions()
    problems = _intensity_problems(volume.array, options) + _grid_problems(volume, options)
    if problems and options.refuse:
        raise InputError(f"{source} must look like a CT volume in HU on a valid grid, got: {'; '.join(problems)}. "
                         f"Check that the file is the original CT (not a screenshot or display export), or "
                         f"set plausibility refuse to false to accept it with warnings.")
    return [f"{source}: {problem}" for problem in problems]


NON_FINITE, SHEARED, FEW_SLICES = "voxels are not finite", "direction cosines are not orthonormal", "slice(s) <"


def check_training_volume(volume: Volume, source: str, options: PlausibilityOptions | None = None) -> list[str]:
    """:func:`check_plausibility` for ingest: NaN/inf voxels, a sheared grid and too few slices refuse.

    Each of the three refuses unless its ``allow_*`` option is set; the other checks stay warnings
    (unless ``refuse``). Returns the warnings.
    """
    options = options or PlausibilityOptions()
    warnings = check_plausibility(volume, source, options)
    refused = [(marker, setting) for marker, setting in ((NON_FINITE, "allow_non_finite"), (SHEARED, "allow_sheared"),
                                                         (FEW_SLICES, "allow_few_slices"))
               if not getattr(options, setting)]
    for warning in warnings:
        for marker, setting in refused:
            if marker in warning:
                raise InputError(f"{source} must be a finite CT volume on an orthonormal grid with at least "
                                 f"{options.min_slices} slices to be used for training, got: "
                                 f"{warning.split(': ', 1)[-1]}. Check the source, or set "
                                 f"ingest.plausibility.{setting}: true to accept it with a warning.")
    return warnings


def _intensity_problems(array: np.ndarray, options: PlausibilityOptions) -> list[str]:
    problems = []
    if array.size == 0:
        return ["the volume is empty"]
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        bad = int(array.size - np.count_nonzero(finite))
        if bad:
            nans = int(np.isnan(array).sum())
            problems.append(f"{bad} voxels are not finite ({nans} NaN, {bad - nans} infinite)")
            if bad == array.size:
                return problems
            low, high = float(array[finite].min()), float(array[finite].max())
        else:
            low, high = float(array.min()), float(array.max())
    else:
        low, high = float(array.min()), float(array.max())
    if array.dtype in (np.uint8, np.int8, np.bool_):
        problems.append(f"intensities are {array.dtype} ({low:g} to {high:g}), display values rather than HU")
    elif low >= 0 and high <= options.max_display_value:
        problems.append(f"intensities lie in {low:g} to {high:g} with no air: display values rather than HU")
    elif low > options.air_threshold_hu:
        problems.append(f"the lowest intensity is {low:g}, but CT in HU has air near {AIR_HU:g}: "
                        f"intensities may not be HU (missing rescale?)")
    return problems


def _grid_problems(volume: Volume, options: PlausibilityOptions) -> list[str]:
    problems = []
    affine = np.asarray(volume.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        return ["the affine holds NaN or infinite values"]
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing <= 0):
        return [f"voxel spacing must be positive, got {np.round(spacing, 4).tolist()} mm"]
    direction = affine[:3, :3] / spacing[None, :]
    deviation = float(np.abs(direction.T @ direction - np.eye(3)).max())
    if deviation > options.orthonormal_tolerance:
        problems.append(f"direction cosines are not orthonormal (largest dot-product deviation {deviation:.4g}): "
                        f"the grid is sheared")
    shape = volume.array.shape
    if len(shape) < 3 or shape[2] < options.min_slices:
        problems.append(f"{shape[2] if len(shape) >= 3 else 1} slice(s) < min_slices {options.min_slices}")
    extent = np.asarray(shape[:2]) * spacing[:2]
    if float(extent.min()) < options.min_field_of_view_mm:
        problems.append(f"tiny field of view: {extent[0]:.1f} x {extent[1]:.1f} mm in-plane "
                        f"(< {options.min_field_of_view_mm:g} mm)")
    return problems
