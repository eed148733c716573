"""Benchmark: DICOM series → gzipped NIfTI, ours against dcm2niix and SimpleITK, wall time side by side.

Tools, each timed from the series folder to a written ``.nii.gz`` (median and minimum of ``--repeats``):

- ours: ``scan_export`` (parallel header reads) + ``assemble_series`` (parallel pixel decode into a
  preallocated array) + ``pipeline.volume_io.save_nifti`` (gzip level 1 on several threads, one standard
  gzip member, as pigz writes).
- dcm2niix: the PyPI ``dcm2niix`` binary, ``-z y`` (its internal compressor), pointed at the folder.
- simpleitk: ``ImageSeriesReader`` (GDCM file names, sorted) + ``WriteImage`` to ``.nii.gz``.

Cases: the shared Philips untilted head series (28 slices of 512×512, ../shared/data) and a synthetic
512×512×N int16 series (N = 400, or 100 with ``--quick``) written once with pydicom to a temp folder:
a body-like ellipse with noise, lungs, bone, air and padding outside the field of view. Our output is
checked voxel by voxel against dcm2niix's (after dcm2niix's row flip, see pipeline.dicom.assemble),
except the PixelPaddingValue pixels, which dcm2niix keeps as stored and we map to air (counted).

The machine may be shared with other jobs; the JSON records the load average before and after.

    python bench/ingest.py --output bench/results/ingest.json [--quick]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_machine import machine_info  # noqa: E402
from pipeline import atomic  # noqa: E402
from pipeline.dicom.assemble import AssemblyOptions, assemble_series, to_dcm2niix_convention  # noqa: E402
from pipeline.dicom.scan import scan_export  # noqa: E402
from pipeline.geometry import Volume  # noqa: E402
from pipeline.volume_io import save_nifti  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PHILIPS_UNTILTED = SHARED_DATA / "dcm_qa_ct" / "Philips" / "S21570" / "S2010"


# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------

def run_ours(folder: Path, output: Path, workers: int) -> dict:
    start = time.perf_counter()
    scan = scan_export(folder, workers=workers)
    scanned = time.perf_counter()
    (series,) = scan.image_series()
    assembled = assemble_series(series, AssemblyOptions(workers=workers))
    built = time.perf_counter()
    save_nifti(assembled.volume, output)
    done = time.perf_counter()
    return {"seconds": done - start, "scan": scanned - start, "assemble": built - scanned, "save": done - built}


def run_dcm2niix(folder: Path, output_dir: Path) -> dict:
    import dcm2niix

    start = time.perf_counter()
    subprocess.run([str(dcm2niix.bin), "-z", "y", "-b", "n", "-f", "series", "-o", str(output_dir), str(folder)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return {"seconds": time.perf_counter() - start}


def run_simpleitk(folder: Path, output: Path) -> dict:
    import SimpleITK as sitk

    start = time.perf_counter()
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    read = time.perf_counter()
    sitk.WriteImage(image, str(output))
    done = time.perf_counter()
    return {"seconds": done - start, "read": read - start, "write": done - read}


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------

def write_synthetic_series(folder: Path, slices: int) -> None:
    """A CT-like 512×512×slices int16 series (0.8×0.8×1.25 mm), one file per slice."""
    from pipeline.synthetic.dicom import SeriesWriteOptions, write_ct_series

    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.arange(512) - 255.5, np.arange(512) - 255.5, indexing="ij")
    body = (x / 210) ** 2 + (y / 150) ** 2 < 1
    lungs = ((np.abs(x) - 90) / 60) ** 2 + (y / 80) ** 2 < 1
    spine = x ** 2 + (y - 100) ** 2 < 25 ** 2
    array = np.empty((512, 512, slices), dtype=np.int16)
    for k in range(slices):
        plane = np.where(body, 40, -1000).astype(np.float32)
        plane[lungs & body] = -850 + 100 * np.sin(k / 30)
        plane[spine] = 700
        plane += rng.normal(0, 12, plane.shape).astype(np.float32) * np.where(body, 1.0, 0.3)
        array[:, :, k] = np.rint(plane)
    affine = np.diag([-0.8, -0.8, 1.25, 1.0])
    affine[:3, 3] = [204.4, 204.4, -250.0]
    write_ct_series(Volume(array, affine), folder, SeriesWriteOptions(
        transfer_syntax="explicit_little", pixel_padding_value=-2000, series_description="BENCH SYNTHETIC"))


def bench_case(name: str, folder: Path, repeats: int, workers: int, scratch: Path) -> dict:
    import nibabel as nib

    results: dict = {"name": name, "files": len([p for p in folder.iterdir() if p.is_file()])}
    timings: dict[str, list[dict]] = {"ours": [], "dcm2niix": [], "simpleitk": []}
    for repeat in range(repeats):
        for tool in timings:  # interleaved so that load changes hit every tool alike
            out_dir = scratch / f"{name}-{tool}-{repeat}"
            out_dir.mkdir(parents=True)
            if tool == "ours":
                timings[tool].append(run_ours(folder, out_dir / "ours.nii.gz", workers))
            elif tool == "dcm2niix":
                timings[tool].append(run_dcm2niix(folder, out_dir))
            else:
                timings[tool].append(run_simpleitk(folder, out_dir / "sitk.nii.gz"))
    for tool, runs in timings.items():
        seconds = [r["seconds"] for r in runs]
        summary = {"median_s": round(statistics.median(seconds), 3), "min_s": round(min(seconds), 3),
                   "runs_s": [round(s, 3) for s in seconds]}
        for part in runs[0]:
            if part != "seconds":
                summary[f"{part}_median_s"] = round(statistics.median(r[part] for r in runs), 3)
        outputs = list((scratch / f"{name}-{tool}-0").glob("*.nii.gz"))
        summary["output_mb"] = round(outputs[0].stat().st_size / 1e6, 2) if outputs else None
        results[tool] = summary
    for tool in ("ours", "simpleitk"):
        for statistic in ("median", "min"):
            results[f"ratio_{tool}_to_dcm2niix_{statistic}"] = round(
                results[tool][f"{statistic}_s"] / results["dcm2niix"][f"{statistic}_s"], 3)
    ours = nib.load(scratch / f"{name}-ours-0" / "ours.nii.gz")
    reference = nib.load(next((scratch / f"{name}-dcm2niix-0").glob("*.nii.gz")))
    flipped = to_dcm2niix_convention(Volume(np.asanyarray(ours.dataobj), ours.affine))
    results["shape"] = list(ours.shape)
    theirs = np.asanyarray(reference.dataobj)
    # dcm2niix keeps PixelPaddingValue pixels as stored (e.g. -2000 → -3024 HU); we map them to -1024
    padding = (flipped.array == AssemblyOptions().padding_hu) & (theirs != flipped.array)
    results["voxels_identical_to_dcm2niix"] = bool(np.array_equal(flipped.array[~padding], theirs[~padding]))
    results["padding_voxels_mapped_to_air"] = int(padding.sum())
    results["affine_max_difference_to_dcm2niix_mm"] = float(np.abs(flipped.affine - reference.affine).max())
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--quick", action="store_true", help="100 synthetic slices and one repeat")
    parser.add_argument("--repeats", type=int, default=None, help="runs per tool (default 3, quick 1)")
    parser.add_argument("--workers", type=int, default=2, help="threads for our header scan, decode and gzip")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    slices = 100 if args.quick else 400
    report = {
        "benchmark": "DICOM series -> .nii.gz wall time (s): ours vs dcm2niix -z y vs SimpleITK",
        "timing_method": "tools run interleaved, several times each; ratios compare runs of the same round",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_before": [round(v, 2) for v in os.getloadavg()]},
        "workers": args.workers, "repeats": repeats, "cases": [],
    }
    with tempfile.TemporaryDirectory(prefix="ctseg-bench-ingest-") as temp:
        scratch = Path(temp)
        if PHILIPS_UNTILTED.is_dir():
            report["cases"].append(bench_case("philips_untilted_512x512x28", PHILIPS_UNTILTED, repeats,
                                              args.workers, scratch / "runs"))
        else:
            report["philips_untilted"] = f"skipped: {PHILIPS_UNTILTED} not found"
        synthetic = scratch / "synthetic"
        start = time.perf_counter()
        write_synthetic_series(synthetic, slices)
        report["synthetic_write_s"] = round(time.perf_counter() - start, 2)
        report["cases"].append(bench_case(f"synthetic_512x512x{slices}", synthetic, repeats, args.workers,
                                          scratch / "runs"))
        shutil.rmtree(scratch / "runs", ignore_errors=True)
    report["machine"] = machine_info(report["machine"]["load_average_before"])
    atomic.write_json(args.output, report)
    for case in report["cases"]:
        print(f"{case['name']}: ours {case['ours']['median_s']} s, dcm2niix {case['dcm2niix']['median_s']} s, "
              f"SimpleITK {case['simpleitk']['median_s']} s; ratio ours/dcm2niix "
              f"{case['ratio_ours_to_dcm2niix_median']}; identical to dcm2niix: {case['voxels_identical_to_dcm2niix']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
