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

Whole-export mode (``--whole-export``): whole processes, ``python -m pipeline ingest EXPORT --output OUT``
against ``dcm2niix -z y -b n -o OUT EXPORT``, alternated run by run, medians and their ratio. Exports:

dcm2niix gets ``-f %j`` (files named by SeriesInstanceUID) so that no output overwrites another.

- ``sts_ct``: the shared 20-patient sarcoma export as it is (CT, MR, PET, RTSTRUCTs, README and NIfTI files
  mixed in), ours with ``--set dataset=datasets/sts_ct/dataset.yaml``. dcm2niix converts the MR and PET series
  too, which ours skips after reading their headers.
- ``sts_ct_ct_rtstruct`` / ``sts_ct_images``: the same export seen through symlinks to its CT slices and
  RTSTRUCTs only / to its CT slices only, so that both tools convert the same files; the second has no
  RTSTRUCT to rasterise (images alone).
- ``synthetic_N``: N patients (``--patients``, default 50), each a 192×192×64 CT series written with
  pipeline.synthetic.dicom plus an RTSTRUCT of two ROIs (BODY with a hole, TUMOUR), ingested without a
  dataset (every structure rasterised into its own mask and the inventory); ``synthetic_N_images`` is the CT
  alone.

    python bench/ingest.py --whole-export --output bench/results/ingest_export.json [--patients 50] [--repeats 3]
        [--base TREE]   # also an earlier source tree, interleaved: before/after as a ratio
        [--one-worker]  # also ours with ingest.workers=1: what the worker processes gain

Each tool's user + system CPU seconds (its process and the worker processes it waited for, from
``getrusage(RUSAGE_CHILDREN)``) are recorded beside its wall time: on a shared machine the load changes the
wall times much more than the CPU seconds.
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


# ---------------------------------------------------------------------------------------------
# Whole exports, whole processes
# ---------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
STS_CT = SHARED_DATA / "sts_ct"


def _children_cpu_s() -> float:
    """User + system CPU seconds of every finished child process and its own children (their workers)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_ours_process(export: Path, output: Path, dataset: Path | None, repo: Path = REPO,
                     workers: int | None = None) -> dict:
    """``ctseg ingest`` of the tree ``repo`` (this one, or ``--base``'s) as a whole process.

    ``workers``: ``--set ingest.workers=N`` (this tree only; the default is the tree's own).
    """
    command = [sys.executable, "-m", "pipeline", "ingest", str(export), "--output", str(output)]
    if dataset is not None:
        command += ["--set", f"dataset={repo / dataset.relative_to(REPO)}"]
    if workers is not None:
        command += ["--set", f"ingest.workers={workers}"]
    env = dict(os.environ, PYTHONPATH=str(repo))
    cpu = _children_cpu_s()
    start = time.perf_counter()
    result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"ctseg ingest exited {result.returncode}: {result.stderr.strip().splitlines()[-1:]}")
    return {"seconds": seconds, "cpu_s": _children_cpu_s() - cpu, "volumes": len(list(output.rglob("*.nii.gz")))}


def run_dcm2niix_process(export: Path, output: Path) -> dict:
    import dcm2niix

    cpu = _children_cpu_s()
    start = time.perf_counter()
    # -f %j (SeriesInstanceUID): one file per series; its default name (folder, description, time, series
    # number) repeats across patients, and after suffixes a..z dcm2niix overwrites instead of writing
    subprocess.run([str(dcm2niix.bin), "-z", "y", "-b", "n", "-f", "%j", "-o", str(output), str(export)],
                   check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return {"seconds": time.perf_counter() - start, "cpu_s": _children_cpu_s() - cpu,
            "volumes": len(list(output.rglob("*.nii.gz")))}


def link_view(files: list[Path], view: Path, root: Path) -> Path:
    """A folder of symlinks to ``files`` (same relative layout under ``root``): both tools read the same files."""
    for path in files:
        target = view / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path)
    return view


def write_synthetic_export(root: Path, patients: int) -> None:
    """``patients`` folders, each a 192×192×64 CT series and an RTSTRUCT (BODY with a hole, TUMOUR)."""
    from pipeline.synthetic.dicom import SeriesWriteOptions, write_ct_series, write_rtstruct

    rng = np.random.default_rng(1)
    n, slices = 192, 64
    x, y, z = np.meshgrid(np.arange(n) - 95.5, np.arange(n) - 95.5, np.arange(slices) - 31.5, indexing="ij")
    for p in range(patients):
        a, b = 80 + 6 * rng.random(), 55 + 6 * rng.random()
        body = (x / a) ** 2 + (y / b) ** 2 < 1
        tumour = ((x - 20) / 14) ** 2 + ((y + 5) / 11) ** 2 + ((z - 3 * rng.random()) / 12) ** 2 < 1
        image = np.where(body, 30, -1000) + np.where(tumour, 25, 0) + rng.normal(0, 10, body.shape)
        affine = np.diag([-1.1, -1.1, 2.5, 1.0])
        affine[:3, 3] = [105.0, 105.0, -80.0 + 3 * p]
        patient = f"SYN{p:03d}"
        files = write_ct_series(Volume(np.rint(image).astype(np.int16), affine), root / patient / "ct",
                                SeriesWriteOptions(patient_id=patient, patient_name=f"BENCH^{patient}",
                                                   series_description="BENCH EXPORT"))
        labels = np.where(tumour, 2, np.where(body, 1, 0)).astype(np.uint8)
        write_rtstruct(Volume(labels, affine), files, root / patient / "rs" / "RS.dcm", {1: "BODY", 2: "TUMOUR"})


def bench_export(name: str, export: Path, dataset: Path | None, repeats: int, scratch: Path,
                 base: Path | None = None, one_worker: bool = False) -> dict:
    """Tools: ours (default ingest.workers), dcm2niix, and optionally base (``--base``) and ours_one_worker
    (``ingest.workers=1``: one case at a time, as before the worker processes)."""
    runs: dict[str, list[dict]] = {"ours": [], "dcm2niix": []}
    if base is not None:
        runs["base"] = []
    if one_worker:
        runs["ours_one_worker"] = []
    tools = list(runs)
    for repeat in range(repeats):
        for tool in (tools if repeat % 2 == 0 else tools[::-1]):  # alternated
            out = scratch / f"{name}-{tool}-{repeat}"
            out.mkdir(parents=True)
            if tool == "dcm2niix":
                runs[tool].append(run_dcm2niix_process(export, out))
            elif tool == "ours_one_worker":
                runs[tool].append(run_ours_process(export, out, dataset, REPO, workers=1))
            else:
                runs[tool].append(run_ours_process(export, out, dataset, base if tool == "base" else REPO))
            shutil.rmtree(out, ignore_errors=True)
    result: dict = {"name": name, "files": sum(1 for p in export.rglob("*") if p.is_file())}
    for tool, tool_runs in runs.items():
        seconds = [r["seconds"] for r in tool_runs]
        cpu = [r["cpu_s"] for r in tool_runs]
        result[tool] = {"median_s": round(statistics.median(seconds), 3), "min_s": round(min(seconds), 3),
                        "runs_s": [round(s, 3) for s in seconds],
                        "cpu_median_s": round(statistics.median(cpu), 3), "cpu_runs_s": [round(c, 3) for c in cpu],
                        "nifti_files": tool_runs[0]["volumes"]}
    result["ratio_ours_to_dcm2niix_median"] = round(result["ours"]["median_s"] / result["dcm2niix"]["median_s"], 3)
    result["ratio_ours_to_dcm2niix_min"] = round(result["ours"]["min_s"] / result["dcm2niix"]["min_s"], 3)
    result["cpu_ratio_ours_to_dcm2niix_median"] = round(result["ours"]["cpu_median_s"]
                                                        / result["dcm2niix"]["cpu_median_s"], 3)
    for other in ("base", "ours_one_worker"):
        if other in result:
            result[f"ratio_ours_to_{other}_median"] = round(result["ours"]["median_s"] / result[other]["median_s"], 3)
            result[f"cpu_ratio_ours_to_{other}_median"] = round(result["ours"]["cpu_median_s"]
                                                                / result[other]["cpu_median_s"], 3)
            result[f"ratio_{other}_to_dcm2niix_median"] = round(result[other]["median_s"]
                                                                / result["dcm2niix"]["median_s"], 3)
    if base is not None:
        result["base_tree"] = str(base)
    print(f"{name}: ours {result['ours']['median_s']} s ({result['ours']['cpu_median_s']} s CPU), dcm2niix "
          f"{result['dcm2niix']['median_s']} s ({result['dcm2niix']['cpu_median_s']} s CPU), ratio "
          f"{result['ratio_ours_to_dcm2niix_median']}"
          + "".join(f", {other} {result[other]['median_s']} s ({result[other]['cpu_median_s']} s CPU)"
                    for other in ("base", "ours_one_worker") if other in result), flush=True)
    return result


def whole_export(args) -> dict:
    report = {"benchmark": "whole export -> .nii.gz, whole processes (s): ctseg ingest vs dcm2niix -z y -b n",
              "timing_method": "one process per run, tools alternated run by run; medians and their ratio",
              "load_average_before": [round(v, 2) for v in os.getloadavg()], "repeats": args.repeats or 3,
              "exports": []}
    repeats = report["repeats"]
    with tempfile.TemporaryDirectory(prefix="ctseg-bench-export-") as temp:
        scratch = Path(temp)
        if STS_CT.is_dir():
            ct = sorted(STS_CT.glob("*/CT/image/*.dcm"))
            rs = sorted(STS_CT.glob("*/CT/mask/*.dcm"))
            dataset = REPO / "datasets" / "sts_ct" / "dataset.yaml"
            if "sts_ct" in args.exports:
                report["exports"].append(bench_export("sts_ct", STS_CT, dataset, repeats, scratch / "runs", args.base,
                                                      args.one_worker))
            if "sts_ct_views" in args.exports:
                view = link_view(ct + rs, scratch / "sts_ct_ct_rtstruct", STS_CT)
                report["exports"].append(bench_export("sts_ct_ct_rtstruct", view, dataset, repeats, scratch / "runs",
                                                      args.base, args.one_worker))
                view = link_view(ct, scratch / "sts_ct_images", STS_CT)
                report["exports"].append(bench_export("sts_ct_images", view, None, repeats, scratch / "runs",
                                                      args.base, args.one_worker))
        else:
            report["sts_ct"] = f"skipped: {STS_CT} not found"
        if "synthetic" in args.exports:
            synthetic = scratch / "synthetic"
            start = time.perf_counter()
            write_synthetic_export(synthetic, args.patients)
            report["synthetic_write_s"] = round(time.perf_counter() - start, 2)
            name = f"synthetic_{args.patients}"
            report["exports"].append(bench_export(name, synthetic, None, repeats, scratch / "runs", args.base,
                                                  args.one_worker))
            view = link_view(sorted(synthetic.glob("*/ct/*")), scratch / "synthetic_images", synthetic)
            report["exports"].append(bench_export(f"{name}_images", view, None, repeats, scratch / "runs",
                                                  args.base, args.one_worker))
    report["machine"] = machine_info(report.pop("load_average_before"))
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--quick", action="store_true", help="100 synthetic slices and one repeat")
    parser.add_argument("--repeats", type=int, default=None, help="runs per tool (default 3, quick 1)")
    parser.add_argument("--workers", type=int, default=2, help="threads for our header scan, decode and gzip")
    parser.add_argument("--whole-export", action="store_true",
                        help="whole exports as whole processes (sts_ct and a synthetic CT+RTSTRUCT export)")
    parser.add_argument("--patients", type=int, default=50, help="patients in the synthetic whole export")
    parser.add_argument("--base", type=Path, default=None,
                        help="whole-export mode: also time ctseg from this source tree (e.g. `git archive` of an "
                             "earlier commit), interleaved with ours and dcm2niix, for a before/after ratio")
    parser.add_argument("--one-worker", action="store_true",
                        help="whole-export mode: also time ours with --set ingest.workers=1 (one case at a time)")
    parser.add_argument("--exports", nargs="+", default=["sts_ct", "sts_ct_views", "synthetic"],
                        choices=["sts_ct", "sts_ct_views", "synthetic"], help="which whole exports to time")
    args = parser.parse_args(argv)
    if args.whole_export:
        atomic.write_json(args.output, whole_export(args))
        return 0
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
