"""Benchmark of the RTSTRUCT writer: our direct encoding against building the same contours as pydicom datasets.

Label map: a synthetic phantom CT series (``--shape`` × ``--shape`` × ``--slices``,
:mod:`pipeline.synthetic.phantoms`, 20 HU noise) written as DICOM; its labels are three HU bands of the noisy
image (ragged, many islands and holes: tens of thousands of contours, the size of a large clinical
structure set). Both sides write the
same voxel-edge contours (:func:`pipeline.labels.rtstruct_write.voxel_edge_contours`, traced once
per side and timed with it):

- ours: :func:`pipeline.labels.rtstruct_write.rtstruct_dataset` + save (Implicit VR, ROI Contour
  Sequence encoded directly);
- reference: the plain pydicom way, one ``Dataset`` per contour with ContourData as a list of
  numbers (what rt-utils and most writers do), saved with pydicom.

Both files are read back with our reader; the masks must be identical. Runs interleave
(ours, reference, ours, ...) ``--repeats`` times; medians are compared as a ratio.

    python bench/rtstruct.py --output bench/results/rtstruct.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_machine import machine_info  # noqa: E402

from pipeline import atomic  # noqa: E402


def reference_write(labels, grid, rois, source, path: Path) -> None:
    """The same RTSTRUCT built element by element with pydicom (Explicit VR, DS lists)."""
    from pydicom.sequence import Sequence

    from pipeline.labels.rtstruct_write import ImageRef, _image_item, rtstruct_dataset, slice_contours_lps

    dataset, _ = rtstruct_dataset(np.zeros_like(labels), grid, rois, source)  # header and references only
    del dataset[0x30060039]
    dataset.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    items = []
    for number, roi in enumerate(rois, start=1):
        from pydicom.dataset import Dataset

        item = Dataset()
        item.ROIDisplayColor = list(roi.color)
        item.ReferencedROINumber = number
        contours = []
        for k, polygons in slice_contours_lps(labels, grid, roi.value).items():
            image: ImageRef = source.image_of_slice[k]
            for points in polygons:
                contour = Dataset()
                contour.ContourImageSequence = Sequence([_image_item(image)])
                contour.ContourGeometricType = "CLOSED_PLANAR"
                contour.NumberOfContourPoints = len(points)
                contour.ContourNumber = len(contours) + 1
                contour.ContourData = [round(float(v), 4) for v in points.ravel()]
                contours.append(contour)
        item.ContourSequence = Sequence(contours)
        items.append(item)
    dataset.ROIContourSequence = Sequence(items)
    dataset.save_as(path, enforce_file_format=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, default=256)
    parser.add_argument("--slices", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("bench/results/rtstruct.json"))
    args = parser.parse_args(argv)
    load_before = list(os.getloadavg())

    from pipeline.labels.rtstruct import rasterise_rtstruct
    from pipeline.labels.rtstruct_write import (
        ImageRef,
        Roi,
        SourceSeries,
        rtstruct_dataset,
        save_rtstruct,
        source_header,
    )
    from pipeline.synthetic.dicom import write_ct_series
    from pipeline.synthetic.phantoms import LABEL_NAMES, PhantomOptions, make_phantom

    phantom = make_phantom(1, PhantomOptions(shape=args.shape, slices=args.slices, noise_hu=20.0))
    labels = np.digitize(phantom.image.array, [-200.0, 20.0, 80.0]).astype(np.uint8)
    grid = phantom.image.grid
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        files = write_ct_series(phantom.image, folder / "ct")
        header = source_header(files[0])
        images = [ImageRef(str(header.SOPClassUID), str(source_header(f).SOPInstanceUID)) for f in files]
        source = SourceSeries(header, images, {k: image for k, image in enumerate(images)})
        rois = [Roi(value, name, (200, 100, 50)) for value, name in sorted(LABEL_NAMES.items())]
        ours_seconds, reference_seconds = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            dataset, summary = rtstruct_dataset(labels, grid, rois, source)
            save_rtstruct(dataset, folder / "ours.dcm")
            ours_seconds.append(time.perf_counter() - start)
            start = time.perf_counter()
            reference_write(labels, grid, rois, source, folder / "reference.dcm")
            reference_seconds.append(time.perf_counter() - start)
        ours_masks = rasterise_rtstruct(folder / "ours.dcm", grid)
        reference_masks = rasterise_rtstruct(folder / "reference.dcm", grid)
        identical = all(np.array_equal(ours_masks[n], reference_masks[n]) for n in ours_masks)
        exact = all(np.array_equal(ours_masks[name], labels == value) for value, name in sorted(LABEL_NAMES.items()))
        sizes = {"ours_bytes": (folder / "ours.dcm").stat().st_size,
                 "reference_bytes": (folder / "reference.dcm").stat().st_size}
    ours, reference = statistics.median(ours_seconds), statistics.median(reference_seconds)
    result = {
        "benchmark": "rtstruct",
        "label_map": {"shape": list(labels.shape), "labels": len(rois), "contours": summary["contours"],
                      "points": summary["points"]},
        "ours_seconds": [round(s, 3) for s in ours_seconds],
        "reference_seconds": [round(s, 3) for s in reference_seconds],
        "ours_median_s": round(ours, 3),
        "reference_median_s": round(reference, 3),
        "speedup_reference_over_ours": round(reference / ours, 2),
        "masks_identical_to_reference": identical,
        "masks_equal_label_map": exact,
        **sizes,
        "machine": machine_info(load_before),
    }
    atomic.write_json(args.output, result)
    print(f"ours {ours:.2f} s, pydicom reference {reference:.2f} s: {result['speedup_reference_over_ours']}× "
          f"({summary['contours']} contours, {summary['points']} points); masks identical {identical}, exact {exact}")
    return result


if __name__ == "__main__":
    main()
