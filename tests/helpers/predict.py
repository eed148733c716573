"""Shared stand-ins for the predict tests: real model folders, an oracle network, phantom inputs.

(No tests here; pytest collects nothing from this module.)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.config import Config
from pipeline.geometry import Volume, canonical_grid
from pipeline.models.folder import write_model_folder
from pipeline.predict.model import LabelInfo, Predictor
from pipeline.synthetic.phantoms import PhantomOptions, make_phantom
from pipeline.volume_io import save_nifti

LABELS = [{"name": "liver", "value": 1, "color": [221, 130, 101]},
          {"name": "spleen", "value": 2, "color": [157, 108, 162]},
          {"name": "kidneys", "value": 3, "color": [185, 102, 83]}]
SMALL_UNET = {"name": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 4,
              "kwargs": {"channels": [4, 8], "strides": [2], "num_res_units": 1}}
PLAN = {"target_spacing": [3.0, 3.0, 4.0], "intensity": {"mode": "window", "low": -200.0, "high": 300.0},
        "crop_to_body": True, "body_threshold_hu": -500.0}
SMALL_PHANTOM = PhantomOptions(shape=64, slices=24, inplane_spacing_min=1.2, inplane_spacing_max=1.6,
                               slice_spacing_min=2.5, slice_spacing_max=3.5, noise_hu=5.0)

# the oracle reads label l from the image intensity HU = -1000 + STEP_HU * l
STEP_HU = 100.0
ORACLE_PLAN = {"intensity": {"mode": "window", "low": -1000.0, "high": 1000.0}, "crop_to_body": True,
               "body_threshold_hu": -950.0}


def write_small_model(folder: Path, seed: int = 0, folds: int = 1, plan: dict | None = None) -> Path:
    """A real model folder: a small random MONAI UNet per fold, saved and loaded the documented way."""
    from pipeline.models import build_network

    networks = []
    for fold in range(folds):
        torch.manual_seed(seed + fold)
        networks.append(build_network(SMALL_UNET))
    return write_model_folder(folder, SMALL_UNET, networks, plan or PLAN, LABELS, [32, 32, 32])


def write_phantom_nifti(path: Path, seed: int, options: PhantomOptions = SMALL_PHANTOM) -> Path:
    phantom = make_phantom(seed, options)
    save_nifti(phantom.image, path)
    return path


class IntensityOracle(nn.Module):
    """A stand-in network whose class c logit peaks where the input equals c × step (label encoded as intensity)."""

    def __init__(self, num_classes: int, step: float):
        super().__init__()
        self.register_buffer("levels", torch.arange(num_classes, dtype=torch.float32) * step)
        self.width = step / 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = self.levels.view(1, -1, *([1] * (x.ndim - 2)))
        return -((x[:, :1] - levels) / self.width) ** 2


def oracle_predictor(target_spacing, num_classes: int = 4, patch=(32, 32, 32)) -> Predictor:
    step = STEP_HU / (ORACLE_PLAN["intensity"]["high"] - ORACLE_PLAN["intensity"]["low"])
    plan = dict(ORACLE_PLAN, target_spacing=[float(s) for s in target_spacing])
    spec = {"format": "ctseg-model/1", "mode": "3d", "patch_size": list(patch), "plan": plan,
            "network": {"name": "oracle", "spatial_dims": 3, "in_channels": 1, "out_channels": num_classes},
            "labels": LABELS[:num_classes - 1], "folds": []}
    labels = [LabelInfo(lbl["value"], lbl["name"], tuple(lbl["color"])) for lbl in LABELS[:num_classes - 1]]
    return Predictor(folder=Path("oracle"), spec=spec, spec_sha256="0" * 64,
                     networks=[IntensityOracle(num_classes, step).eval()], class_values=list(range(num_classes)),
                     labels=labels, device=torch.device("cpu"), optimisation={})


def encoded_image(label: Volume) -> Volume:
    """A CT-like image (air -1000 HU) whose intensity encodes the label for :class:`IntensityOracle`."""
    array = (-1000.0 + STEP_HU * label.array.astype(np.float32)).astype(np.int16)
    return Volume(array, label.affine.copy())


def source_resolution(grid) -> list[float]:
    """Target spacing (R, A, S) that makes the model grid the source grid's voxels, only reordered."""
    return canonical_grid(grid).spacing.tolist()


class TinyNet(nn.Module):
    """A small convolutional stand-in that is not flip-equivariant (asymmetric kernels)."""

    def __init__(self, in_channels=1, classes=3, dims=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.a = conv(in_channels, 6, 3, padding=1)
        self.b = conv(6, classes, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) * 3.0


def _predictor(networks, patch, mode="3d", context=0, classes=3) -> Predictor:
    spec = {"mode": mode, "patch_size": list(patch), "context_slices": context, "plan": {},
            "network": {"name": "tiny", "spatial_dims": 3 if mode == "3d" else 2,
                        "in_channels": 2 * context + 1, "out_channels": classes}}
    labels = [LabelInfo(v, f"l{v}", (255, 0, 0)) for v in range(1, classes)]
    return Predictor(Path("tiny"), spec, "0" * 64, [n.eval() for n in networks], list(range(classes)), labels,
                     torch.device("cpu"), {})


def _options(**changes):
    """predict options pinned to fp32 (tests compare with fp32 references; the bf16 path has its own tests)."""
    cfg = Config().predict
    cfg.precision = "fp32"
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg
