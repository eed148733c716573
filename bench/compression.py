"""Benchmark: the project's gzip writer (pipeline.volume_io.parallel_gzip) with ISA-L against zlib level 1.

    python bench/compression.py --output bench/results/gzip.json [--repeats 5]

Payloads are the bytes our writers gzip, from real and synthetic data: a real chest CT as NIfTI
(``../shared/data/pyradiomics/lung1_image.nrrd``, int16, 512×512×48) and its label map (uint8), and a
synthetic 512×512×300 phantom CT and its organ labels (pipeline.synthetic.phantoms). For each payload, every
variant is timed interleaved (zlib level 1 | ISA-L level 0, 1, 2), on 1 thread and on the default
thread count; the output is checked to be a standard gzip stream (``gzip.decompress`` gives the
payload back) and the JSON holds seconds, MB/s, compressed size, and the ratios against zlib level 1.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
SHARED = REPO.parent / "shared" / "data"


def payloads() -> dict[str, bytes]:
    import nibabel as nib
    import numpy as np

    from pipeline.geometry import Volume
    from pipeline.synthetic.phantoms import PhantomOptions, make_phantom
    from pipeline.volume_io import load_volume

    def nifti_bytes(volume, dtype) -> bytes:
        image = nib.Nifti1Image(volume.array.astype(dtype), volume.affine)
        return image.to_bytes()

    out = {}
    lung = SHARED / "pyradiomics" / "lung1_image.nrrd"
    if lung.is_file():
        out["real_ct_int16_512x512x48"] = nifti_bytes(load_volume(lung), np.int16)
        out["real_label_uint8_512x512x48"] = nifti_bytes(load_volume(lung.with_name("lung1_label.nrrd")), np.uint8)
    phantom = make_phantom(7, PhantomOptions(shape=512, slices=300, inplane_spacing_min=0.75,
                                             inplane_spacing_max=0.75, slice_spacing_min=1.0,
                                             slice_spacing_max=1.0, random_origin=False))
    out["phantom_ct_int16_512x512x300"] = nifti_bytes(phantom.image, np.int16)
    out["phantom_label_uint8_512x512x300"] = nifti_bytes(Volume(phantom.label.array, phantom.label.affine), np.uint8)
    return out


def zlib_level1(data: bytes, threads: int) -> bytes:
    """The writer as it was before ISA-L: the same chunked parallel gzip, deflated by zlib level 1."""
    from pipeline import volume_io

    saved = volume_io._isal_zlib
    volume_io._isal_zlib = None
    try:
        return volume_io.parallel_gzip(data, level=1, threads=threads)
    finally:
        volume_io._isal_zlib = saved


def isal_level(level: int):
    def run(data: bytes, threads: int) -> bytes:
        from pipeline import volume_io

        saved = dict(volume_io._ISAL_LEVEL), volume_io.ISAL_MAX_ZLIB_LEVEL
        volume_io._ISAL_LEVEL[1], volume_io.ISAL_MAX_ZLIB_LEVEL = level, 2  # compresslevel 1 -> this ISA-L level
        try:
            return volume_io.parallel_gzip(data, level=1, threads=threads)
        finally:
            volume_io._ISAL_LEVEL.clear()
            volume_io._ISAL_LEVEL.update(saved[0])
            volume_io.ISAL_MAX_ZLIB_LEVEL = saved[1]
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "gzip.json")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from bench_machine import machine_info

    from pipeline.precision import cpu_model_name
    from pipeline.volume_io import gzip_backend

    load_before = list(os.getloadavg())
    variants = {"zlib_level1": zlib_level1, "isal_level0": isal_level(0), "isal_level1": isal_level(1),
                "isal_level2": isal_level(2)}
    default_threads = min(4, os.cpu_count() or 1)
    results = {}
    for name, data in payloads().items():
        mb = len(data) / 1e6
        rows = {}
        for threads in sorted({1, default_threads}):
            times = {v: [] for v in variants}
            sizes = {}
            for _ in range(args.repeats):  # interleaved
                for variant, function in variants.items():
                    start = time.perf_counter()
                    compressed = function(data, threads)
                    times[variant].append(time.perf_counter() - start)
                    sizes[variant] = len(compressed)
                    if _ == 0 and gzip.decompress(compressed) != data:
                        raise SystemExit(f"{variant} did not give a standard gzip stream of {name}")
            base = statistics.median(times["zlib_level1"])
            rows[f"threads_{threads}"] = {v: {
                "seconds_median": round(statistics.median(t), 4), "mb_per_s": round(mb / statistics.median(t), 1),
                "compressed_fraction": round(sizes[v] / len(data), 4),
                "speedup_vs_zlib_level1": round(base / statistics.median(t), 2),
                "size_vs_zlib_level1": round(sizes[v] / sizes["zlib_level1"], 3)} for v, t in times.items()}
        results[name] = {"mb": round(mb, 1), **rows}
        print(name, json.dumps({k: {v: (r["speedup_vs_zlib_level1"], r["size_vs_zlib_level1"])
                                    for v, r in row.items()} for k, row in rows.items()}), flush=True)
    import isal

    result = {"benchmark": "gzip writer: ISA-L levels against zlib level 1, same chunked parallel writer",
              "default_threads": default_threads, "repeats": args.repeats, "results": results,
              "writer_default": f"compresslevel 1 -> {gzip_backend(1)}", "isal": isal.__version__,
              "zlib": zlib.ZLIB_RUNTIME_VERSION,
              "machine": {**machine_info(load_before), "cpu_model": cpu_model_name()}}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
