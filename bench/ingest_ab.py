"""Benchmark: our ingest path (scan + assemble + save) in this checkout against another checkout, interleaved.

For the rule "nothing may slow a normal case by more than 5 %": export the commit before a change
(``git archive <commit> | tar -x -C /tmp/before``) and run::

    python bench/ingest_ab.py --reference /tmp/before --output bench/results/ingest_ab.json [--slices 400]

Each round runs both trees once, in fresh subprocesses and in alternating order, on the same series
(the shared Philips 512×512×28 series and a synthetic 512×512×N series written by bench/ingest.py),
so that load from other jobs hits both alike. Reports per-tree medians and minima and the ratio
this/reference of each (≤ 1.05 passes) and checks that both trees wrote identical voxels.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_machine import machine_info  # noqa: E402

from pipeline import atomic  # noqa: E402

CHILD = r"""
import hashlib, json, sys, time
from pathlib import Path
tree, folder, output, workers = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
sys.path.insert(0, tree)
from pipeline.dicom.assemble import AssemblyOptions, assemble_series
from pipeline.dicom.scan import scan_export
from pipeline.volume_io import save_nifti
start = time.perf_counter()
(series,) = scan_export(folder, workers=workers).image_series()
assembled = assemble_series(series, AssemblyOptions(workers=workers))
save_nifti(assembled.volume, output)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "voxels_sha256": hashlib.sha256(assembled.volume.array.tobytes()).hexdigest()}))
"""


def run_tree(tree: Path, folder: Path, output: Path, workers: int) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(tree), str(folder), str(output), str(workers)],
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(name: str, folder: Path, trees: dict[str, Path], rounds: int, workers: int, scratch: Path) -> dict:
    runs: dict[str, list[dict]] = {label: [] for label in trees}
    for index in range(rounds):
        order = list(trees) if index % 2 == 0 else list(trees)[::-1]
        for label in order:
            runs[label].append(run_tree(trees[label], folder, scratch / f"{name}-{label}-{index}.nii.gz", workers))
    result = {"name": name}
    for label, values in runs.items():
        seconds = [v["seconds"] for v in values]
        result[label] = {"median_s": round(statistics.median(seconds), 3), "min_s": round(min(seconds), 3),
                         "runs_s": [round(s, 3) for s in seconds]}
    for statistic in ("median", "min"):
        result[f"ratio_this_to_reference_{statistic}"] = round(
            result["this"][f"{statistic}_s"] / result["reference"][f"{statistic}_s"], 3)
    result["identical_voxels"] = len({v["voxels_sha256"] for values in runs.values() for v in values}) == 1
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="root of the other checkout")
    parser.add_argument("--output", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (each runs both trees)")
    parser.add_argument("--slices", type=int, default=400, help="slices of the synthetic 512x512 series")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    import os

    from ingest import PHILIPS_UNTILTED, write_synthetic_series

    load_before = [round(v, 2) for v in os.getloadavg()]
    trees = {"this": HERE.parent, "reference": args.reference.resolve()}
    report = {"benchmark": "ingest path wall time (s), this checkout vs a reference checkout, interleaved",
              "reference": str(trees["reference"]), "rounds": args.rounds, "workers": args.workers, "cases": []}
    with tempfile.TemporaryDirectory(prefix="ctseg-bench-ingest-ab-") as temp:
        scratch = Path(temp)
        if PHILIPS_UNTILTED.is_dir():
            report["cases"].append(compare("philips_untilted_512x512x28", PHILIPS_UNTILTED, trees, args.rounds,
                                           args.workers, scratch))
        synthetic = scratch / "synthetic"
        write_synthetic_series(synthetic, args.slices)
        report["cases"].append(compare(f"synthetic_512x512x{args.slices}", synthetic, trees, args.rounds,
                                       args.workers, scratch))
    report["machine"] = machine_info(load_before)
    atomic.write_json(args.output, report)
    for case in report["cases"]:
        print(f"{case['name']}: this {case['this']['median_s']} s, reference {case['reference']['median_s']} s "
              f"(median ratio {case['ratio_this_to_reference_median']}, min ratio "
              f"{case['ratio_this_to_reference_min']}); identical voxels: {case['identical_voxels']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
