"""``ctseg demo``: writes a synthetic phantom DICOM export and runs every stage on it.

The export (``outputs/demo/export/<patient>/<study>/<series>/*.dcm``) is real DICOM; the label maps
are NIfTI on each series' grid; ``outputs/demo/dataset.yaml`` ties them together from the label
names in the packaged ``datasets/phantom/dataset.yaml`` (:mod:`pipeline.resources`). Held-out phantoms are
predicted and scored at the end.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import yaml

from pipeline import atomic
from pipeline.resources import resource_path

log = logging.getLogger("ctseg")


def demo_config_path() -> Path:
    """The demo's config file as shipped in the package (``configs/demo.yaml`` in the repository is a copy)."""
    return resource_path("configs", "demo.yaml")


def write_demo_export(cfg, root: Path) -> Path:
    """Generate the phantoms (once; reruns reuse them) and return the dataset.yaml describing them."""
    from pipeline.geometry import Volume
    from pipeline.synthetic.dicom import SeriesWriteOptions, write_ct_series
    from pipeline.synthetic.phantoms import PhantomOptions, make_phantom
    from pipeline.volume_io import save_nifti

    dataset_path = root / "dataset.yaml"
    marker = root / "export" / "phantoms.json"
    demo = cfg.demo
    count = demo.train_cases + demo.test_cases
    wanted = {"cases": count, "train_cases": demo.train_cases, "size": [demo.in_plane_size, demo.slices],
              "seed": cfg.seed}
    if dataset_path.is_file() and marker.is_file() and json.loads(marker.read_text()) == wanted:
        return dataset_path
    template = yaml.safe_load(resource_path("datasets", "phantom", "dataset.yaml").read_text())
    options = PhantomOptions(shape=demo.in_plane_size, slices=demo.slices)
    cases = []
    for index in range(count):
        case_id = f"phantom_{index:03d}"
        phantom = make_phantom(seed=cfg.seed * 1000 + index, options=options)
        series_dir = root / "export" / f"PAT{index:03d}" / "STUDY1" / "SERIES1"
        label_path = root / "labels" / f"{case_id}.nii.gz"
        if not series_dir.exists() or not label_path.exists():
            tmp = series_dir.with_name(series_dir.name + ".partial")
            write_ct_series(phantom.image, tmp, SeriesWriteOptions(
                patient_name=f"PHANTOM^{index:03d}", patient_id=f"PHANTOM{index:03d}",
                series_description="PHANTOM ABDOMEN CT", seed=index))
            if series_dir.exists():
                import shutil

                shutil.rmtree(series_dir)
            tmp.rename(series_dir)
            save_nifti(Volume(phantom.label.array, phantom.label.affine), label_path)
        role = "train" if index < demo.train_cases else "test"
        cases.append({"id": case_id, "image": str(series_dir.relative_to(root)),
                      "label": str(label_path.relative_to(root)), "role": role})
    dataset = {"name": "phantom-demo", "description": "Synthetic abdominal CT phantoms written by ctseg demo.",
               "labels": template["labels"], "cases": cases}
    atomic.write_text(dataset_path, yaml.safe_dump(dataset, sort_keys=False))
    atomic.write_json(marker, wanted)
    return dataset_path


def run_demo(cfg, cases: int | None = None) -> dict:
    from pipeline import api
    from pipeline.config import load_config, to_dict

    start = time.perf_counter()
    if cases is not None:
        cfg.demo.train_cases = max(2, cases - cfg.demo.test_cases)
    root = cfg.experiment_dir
    root.mkdir(parents=True, exist_ok=True)
    print(f"ctseg demo: writing {cfg.demo.train_cases + cfg.demo.test_cases} phantom CT series to {root / 'export'}")
    dataset_path = write_demo_export(cfg, root)
    cfg = load_config([], [], base={**to_dict(cfg), "dataset": str(dataset_path)})
    # the phantoms are regenerated and valid, so a case that failed before (an interrupted run) is retried
    reports = api.run(cfg, retry_failed=True)
    evaluation = reports["evaluate"]
    mean_dice = evaluation.get("mean_foreground_dice", 0.0)
    passed = mean_dice >= cfg.demo.min_dice
    minutes = (time.perf_counter() - start) / 60
    predict_dir = cfg.stage_dir("predict")
    print()
    print(evaluation.get("table", ""))
    print(f"Mean foreground Dice on {cfg.demo.test_cases} held-out phantoms: {mean_dice:.3f} "
          f"({'PASS' if passed else 'FAIL'}: target >= {cfg.demo.min_dice}); "
          f"{minutes:.1f} min for this run (stages already up to date are skipped).")
    print(f"Outputs: {cfg.experiment_dir}/ (ingest/, preprocess/, train/model/, predict/, evaluate/)")
    print(f"Open in 3D Slicer: File > Add Data > {cfg.stage_dir('ingest') / 'imagesTs'}/<case>_0000.nii.gz, then "
          f"{predict_dir}/<case>.seg.nrrd (loads as a Segmentation with named, coloured segments).")
    print(f"Morning report: {predict_dir / 'report.html'}; metrics: {cfg.stage_dir('evaluate') / 'metrics.csv'}")
    return {"passed": passed, "mean_foreground_dice": mean_dice, "minutes": minutes, "reports": reports}
