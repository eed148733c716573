"""Synthetic ingest folders and the tiny training settings shared by the train, preprocess and precision tests."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from pipeline import atomic
from pipeline.config import load_config
from pipeline.geometry import Grid, Volume, affine_from_parts
from pipeline.volume_io import save_nifti

LABELS = [{"name": "background", "value": 0, "color": [0, 0, 0], "synonyms": []},
          {"name": "liver", "value": 1, "color": [220, 130, 100], "synonyms": []},
          {"name": "spleen", "value": 2, "color": [150, 100, 160], "synonyms": []},
          {"name": "kidney", "value": 5, "color": [180, 100, 80], "synonyms": []}]


ORGANS = [((45.0, 5.0, 0.0), 28.0, 110.0, 1), ((-50.0, 10.0, 12.0), 16.0, 160.0, 2),
          ((0.0, -35.0, -15.0), 11.0, 230.0, 5)]


def synthetic_case(seed: int, spacing=(2.5, 2.5, 3.0), flip_i: bool = False) -> tuple[Volume, Volume]:
    """An HU image (int16) and its label map (uint8) on a grid with the given spacing."""
    rng = np.random.default_rng(seed)
    spacing = np.asarray(spacing, dtype=np.float64)
    shape = np.round(np.array([220.0, 170.0, 120.0]) / spacing).astype(int)
    direction = np.diag([-1.0 if flip_i else 1.0, 1.0, 1.0])
    shift = rng.uniform(-8, 8, size=3)
    origin = -direction @ ((shape - 1) * spacing / 2) + rng.uniform(-20, 20, size=3)
    grid = Grid(tuple(shape), affine_from_parts(direction, spacing, origin))
    ii, jj, kk = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    world = [grid.affine[r, 0] * ii + grid.affine[r, 1] * jj + grid.affine[r, 2] * kk + grid.affine[r, 3]
             for r in range(3)]
    centre = origin + direction @ ((shape - 1) * spacing / 2)
    rel = [w - c for w, c in zip(world, centre + shift)]
    image = np.full(tuple(shape), -1000.0, dtype=np.float32)
    body = (rel[0] / 95.0) ** 2 + (rel[1] / 70.0) ** 2 <= 1.0
    image[body] = 20.0
    label = np.zeros(tuple(shape), dtype=np.uint8)
    scale = rng.uniform(0.85, 1.15)
    for (cx, cy, cz), radius, hu, value in ORGANS:
        inside = (rel[0] - cx) ** 2 + (rel[1] - cy) ** 2 + (rel[2] - cz) ** 2 <= (radius * scale) ** 2
        image[inside] = hu
        label[inside] = value
    image += rng.normal(0, 12, size=image.shape).astype(np.float32)
    return Volume(image.round().astype(np.int16), grid.affine), Volume(label, grid.affine)


def write_ingest_folder(root: Path, n_train: int = 4, n_test: int = 0, spacings=None, labels=LABELS) -> Path:
    """An ingest stage output folder (manifest.json, imagesTr/labelsTr, done.json) with synthetic cases."""
    root = Path(root)
    cases = []
    for index in range(n_train + n_test):
        case_id = f"syn_{index:03d}"
        spacing = spacings[index % len(spacings)] if spacings else (2.5, 2.5, 3.0)
        image, label = synthetic_case(index, spacing=spacing, flip_i=index % 3 == 1)
        split = "Tr" if index < n_train else "Ts"
        save_nifti(image, root / f"images{split}" / f"{case_id}_0000.nii.gz")
        save_nifti(label, root / f"labels{split}" / f"{case_id}.nii.gz")
        cases.append({"id": case_id, "role": "train" if index < n_train else "test",
                      "image": f"images{split}/{case_id}_0000.nii.gz", "label": f"labels{split}/{case_id}.nii.gz",
                      "provenance": f"provenance/{case_id}.json"})
    atomic.write_json(root / "manifest.json", {"format": "ctseg-ingest/1", "labels": labels, "cases": cases})
    atomic.write_json(root / "done.json", {"stage": "ingest", "hash": f"synthetic-{n_train}-{n_test}"})
    return root


TINY = ["preprocess.target_spacing=[5,5,5]", "train.channels=[4,8,16]", "train.patch_size=[32,32,16]",
        "train.batch_size=2", "train.max_steps=12", "train.val_every=6", "train.threads=1",
        "train.precision=fp32"]  # exact comparisons: pinned (bf16 has its own test in test_precision.py)


def _experiment(prepared, tmp_path, name, *overrides):
    for stage in ("ingest", "preprocess"):
        shutil.copytree(prepared / "base" / stage, tmp_path / name / stage)
    return load_config([], [f"output_root={tmp_path}", f"experiment={name}", *TINY, *overrides])
