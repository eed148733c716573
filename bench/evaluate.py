"""Benchmark of evaluate's metrics: ours (cropped, parallel classes) against plain MONAI on full volumes.

Synthetic cases (default 20 of 512×512×300 voxels at 0.8×0.8×2 mm, 3 classes) hold perturbed
ellipsoids of organ-like sizes; each prediction is the reference's ellipsoids slightly moved, scaled
and re-perturbed, sometimes with an extra false-positive blob. Only the metric computation is timed:
generating the volumes is not (it happens one case at a time, so at most one case's prediction and
reference, plus the reference path's one-hot copies, are in memory).

- ours: ``pipeline.evaluate.metrics.case_metrics`` (class bounding boxes, MONAI metrics on the crops,
  classes in ``--workers`` threads); it also computes volumes and FP/FN component counts.
- reference: the plain use of MONAI on whole volumes: ``monai.networks.utils.one_hot`` of both label
  volumes, then ``DiceMetric``, ``compute_hausdorff_distance(percentile=95)`` and
  ``compute_surface_dice`` on the full one-hot tensors. It is slow and memory-hungry, so it runs on
  the first ``--reference-cases`` cases only and its total is extrapolated from its mean per case
  (the JSON says so).

Both are warmed up on a small case first (imports, torch initialisation). The values of both on the
common cases are compared (max absolute difference per metric).

    python bench/evaluate.py --output bench/results/evaluate.json
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_machine import machine_info  # noqa: E402

from pipeline import atomic  # noqa: E402
from pipeline.evaluate.metrics import MetricOptions, case_metrics  # noqa: E402

CLASSES = {1: "liver", 2: "kidney", 3: "spleen"}
# organ-like ellipsoid radii in voxels at 0.8 × 0.8 × 2 mm (about 80, 30 and 45 mm in-plane)
ORGAN_RADII = {1: (100, 80, 40), 2: (35, 30, 28), 3: (55, 40, 25)}
COMPARED = ("dice", "hd95_mm", "surface_dice")


def perturbed_ellipsoid(labels: np.ndarray, value: int, centre, radii, rng: np.random.Generator,
                        wobble: float = 0.08) -> None:
    """Write ``value`` into an ellipsoid whose radius varies smoothly with direction (only its box is computed)."""
    radii = np.asarray(radii, dtype=np.float64)
    lower = np.maximum(0, np.floor(np.asarray(centre) - radii * (1 + wobble) - 1)).astype(int)
    upper = np.minimum(labels.shape, np.ceil(np.asarray(centre) + radii * (1 + wobble) + 2)).astype(int)
    axes = [(np.arange(lo, hi) - c) / r for lo, hi, c, r in zip(lower, upper, centre, radii)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    distance = np.sqrt(x ** 2 + y ** 2 + z ** 2) + 1e-9
    # a smooth bumpy surface: low-order harmonics of the direction, random phases
    frequencies = rng.integers(1, 4, size=(3, 3))
    phases = rng.uniform(0, 2 * np.pi, size=3)
    bumps = sum(np.sin(f[0] * x / distance * np.pi + f[1] * y / distance * np.pi + f[2] * z / distance * np.pi + p)
                for f, p in zip(frequencies, phases)) / 3
    inside = distance <= 1 + wobble * bumps
    region = labels[lower[0]:upper[0], lower[1]:upper[1], lower[2]:upper[2]]
    region[inside] = value


def synthetic_case(index: int, shape, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, reference) label volumes of one case."""
    rng = np.random.default_rng(seed * 1000 + index)
    shape_array = np.asarray(shape, dtype=np.float64)
    centres = {1: shape_array * (0.38, 0.45, 0.5), 2: shape_array * (0.68, 0.62, 0.42),
               3: shape_array * (0.66, 0.3, 0.55)}
    ref = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    for value, radii in ORGAN_RADII.items():
        centre = centres[value] + rng.uniform(-10, 10, size=3) * (1, 1, 0.4)
        radii = np.asarray(radii) * rng.uniform(0.85, 1.15, size=3)
        state = rng.integers(0, 2 ** 32)
        perturbed_ellipsoid(ref, value, centre, radii, np.random.default_rng(state))
        moved = centre + rng.normal(0, 1.5, size=3) * (1, 1, 0.5)
        scaled = radii * rng.uniform(0.96, 1.04, size=3)
        perturbed_ellipsoid(pred, value, moved, scaled, np.random.default_rng(state), wobble=0.085)
        if rng.random() < 0.3:  # a small false-positive blob away from the organ
            blob = centre + np.asarray(radii) * 1.4 * rng.choice([-1, 1], size=3)
            blob = np.clip(blob, 8, np.asarray(shape) - 8)
            perturbed_ellipsoid(pred, value, blob, (5, 5, 3), rng)
    return pred, ref


def reference_metrics(pred: np.ndarray, ref: np.ndarray, spacing, tolerance_mm: float) -> list[dict]:
    """Plain MONAI on the whole volumes (one-hot, background channel excluded by include_background=False)."""
    import torch
    from monai.metrics import DiceMetric, compute_hausdorff_distance, compute_surface_dice
    from monai.networks.utils import one_hot

    n_channels = max(CLASSES) + 1
    y_pred = one_hot(torch.from_numpy(pred)[None, None].long(), num_classes=n_channels)
    y_ref = one_hot(torch.from_numpy(ref)[None, None].long(), num_classes=n_channels)
    dice = DiceMetric(include_background=False, reduction="none")(y_pred, y_ref)
    hd95 = compute_hausdorff_distance(y_pred, y_ref, include_background=False, percentile=95, spacing=list(spacing))
    nsd = compute_surface_dice(y_pred, y_ref, class_thresholds=[tolerance_mm] * (n_channels - 1),
                               include_background=False, spacing=list(spacing))
    return [{"class_value": value, "dice": float(dice[0, value - 1]), "hd95_mm": float(hd95[0, value - 1]),
             "surface_dice": float(nsd[0, value - 1])} for value in sorted(CLASSES)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="bench/results/evaluate.json", help="JSON file to write.")
    parser.add_argument("--cases", type=int, default=20, help="Number of synthetic cases.")
    parser.add_argument("--reference-cases", type=int, default=3,
                        help="Cases the plain-MONAI reference runs on (its total is extrapolated).")
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300], help="Volume shape [i j k].")
    parser.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 2.0], help="Voxel spacing in mm.")
    parser.add_argument("--workers", type=int, default=2, help="Threads per case for ours.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the synthetic cases.")
    args = parser.parse_args(argv)


    options = MetricOptions(workers=args.workers)
    spacing = tuple(args.spacing)
    load_before = os.getloadavg()

    warm_pred, warm_ref = synthetic_case(0, (96, 96, 48), args.seed + 99)  # imports and first-call costs
    case_metrics(warm_pred, warm_ref, spacing, CLASSES, options)
    reference_metrics(warm_pred, warm_ref, spacing, options.surface_tolerance_mm)

    ours_seconds, reference_seconds, generate_seconds = [], [], 0.0
    differences = {metric: 0.0 for metric in COMPARED}
    ours_values: dict[str, list[float]] = {metric: [] for metric in COMPARED}
    for index in range(args.cases):
        start = time.perf_counter()
        pred, ref = synthetic_case(index, tuple(args.shape), args.seed)
        generate_seconds += time.perf_counter() - start

        start = time.perf_counter()
        rows = case_metrics(pred, ref, spacing, CLASSES, options, case_id=f"case{index:02d}")
        ours_seconds.append(time.perf_counter() - start)
        for row in rows:
            for metric in COMPARED:
                ours_values[metric].append(row[metric])

        if index < args.reference_cases:
            start = time.perf_counter()
            expected = reference_metrics(pred, ref, spacing, options.surface_tolerance_mm)
            reference_seconds.append(time.perf_counter() - start)
            for row, reference_row in zip(rows, expected):
                for metric in COMPARED:
                    differences[metric] = max(differences[metric], abs(row[metric] - reference_row[metric]))
        print(f"case {index + 1}/{args.cases}: ours {ours_seconds[-1]:.2f} s"
              + (f", reference {reference_seconds[-1]:.2f} s" if index < args.reference_cases else ""), flush=True)
        del pred, ref

    ours_total = float(sum(ours_seconds))
    reference_per_case = float(np.mean(reference_seconds)) if reference_seconds else math.nan
    reference_total = reference_per_case * args.cases
    ours_on_reference_cases = float(sum(ours_seconds[:len(reference_seconds)]))
    result = {
        "benchmark": "evaluate metrics: ctseg case_metrics vs plain MONAI on full volumes",
        "cases": args.cases,
        "shape": list(args.shape),
        "spacing_mm": list(spacing),
        "classes": CLASSES,
        "options": {"surface_tolerance_mm": options.surface_tolerance_mm, "hd_percentile": options.hd_percentile,
                    "workers": options.workers, "crop_margin_voxels": options.crop_margin_voxels},
        "ours_seconds_total": round(ours_total, 3),
        "ours_seconds_per_case": round(ours_total / args.cases, 3),
        "ours_seconds_per_case_max": round(max(ours_seconds), 3),
        "goal_seconds": 60.0,
        "ours_meets_goal": ours_total < 60.0,
        "reference_cases_timed": len(reference_seconds),
        "reference_seconds_per_case": round(reference_per_case, 3),
        "reference_seconds_total_extrapolated": round(reference_total, 3),
        "reference_note": (f"the plain-MONAI reference ran on the first {len(reference_seconds)} of {args.cases} "
                           f"cases; its {args.cases}-case total is its mean seconds per case × {args.cases}"),
        "speedup_reference_over_ours": round(reference_total / ours_total, 2),
        "speedup_on_common_cases": round(float(sum(reference_seconds)) / ours_on_reference_cases, 2)
        if reference_seconds else None,
        "max_abs_difference_vs_reference": differences,
        "values_equal_reference": all(v <= 1e-6 for v in differences.values()),
        "ours_value_ranges": {metric: [round(min(v), 4), round(max(v), 4)] for metric, v in ours_values.items()},
        "ours_also_computes": "volumes (mL), absolute/relative volume error, FP/FN component counts (26-connected)",
        "generation_seconds_not_timed": round(generate_seconds, 2),
        "machine": machine_info(load_before),
    }
    atomic.write_json(args.output, result)
    print(f"ours {ours_total:.1f} s for {args.cases} cases; reference ≈ {reference_total:.1f} s "
          f"(extrapolated); ratio {result['speedup_reference_over_ours']}×; max |diff| {differences}")
    return result


if __name__ == "__main__":
    main()
