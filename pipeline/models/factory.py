"""Network specs (plain JSON dicts) and building the matching torch module from one.

A spec is ``{"name", "spatial_dims", "in_channels", "out_channels", "kwargs"}`` where ``kwargs``
are the exact extra constructor arguments. It is stored in ``model.json`` so that prediction
rebuilds the very network that was trained, without the training config.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.errors import ConfigError, InputError

NETWORKS = ("UNet", "DynUNet", "SegResNet", "ClassicUNet")


def network_class(name: str):
    """The torch module class of a network name (imported on first use)."""
    if name == "UNet":
        from monai.networks.nets import UNet
        return UNet
    if name == "DynUNet":
        from monai.networks.nets import DynUNet
        return DynUNet
    if name == "SegResNet":
        from monai.networks.nets import SegResNet
        return SegResNet
    if name == "ClassicUNet":
        from pipeline.models.classic_unet import ClassicUNet
        return ClassicUNet
    raise InputError(f"network name must be one of {', '.join(NETWORKS)}, got {name!r}. "
                     f"The model folder may come from a newer ctseg; upgrade ctseg.")


def check_network_kwargs(spec: dict, where: Path | None = None) -> None:
    """Refuse a ``kwargs`` key that the network's constructor does not take, naming the valid ones."""
    parameters = inspect.signature(network_class(spec["name"]).__init__).parameters
    valid = [n for n, p in parameters.items() if n not in ("self", "spatial_dims", "in_channels", "out_channels")
             and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(spec.get("kwargs") or {}) - set(valid))
    if unknown:
        raise InputError(f"{where or 'network spec'}: unknown key network.kwargs.{unknown[0]!r} for {spec['name']}; "
                         f"valid keys are {', '.join(valid)}. Fix model.json or re-run 'ctseg train'.")


def build_network(spec: dict) -> nn.Module:
    """Construct the network a spec describes (weights freshly initialised)."""
    if not isinstance(spec, dict):
        raise InputError(f"network spec must be a mapping, got {type(spec).__name__}. Check model.json.")
    missing = [k for k in ("name", "spatial_dims", "in_channels", "out_channels") if k not in spec]
    if missing:
        raise InputError(f"network spec must contain {', '.join(missing)}, got keys {sorted(spec)}. "
                         f"Re-export the model folder with 'ctseg train'.")
    name = spec["name"]
    common: dict[str, Any] = {"spatial_dims": int(spec["spatial_dims"]), "in_channels": int(spec["in_channels"]),
              "out_channels": int(spec["out_channels"])}
    kwargs = dict(spec.get("kwargs") or {})
    cls = network_class(name)
    try:
        return cls(**common, **kwargs)
    except (TypeError, ValueError, AssertionError, IndexError, KeyError) as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise InputError(f"network spec kwargs must be valid arguments of {name} ({', '.join(sorted(kwargs))}), got "
                         f"{type(exc).__name__}: {first}. Fix network.kwargs in model.json or re-run 'ctseg train'."
                         ) from exc


def levels_for_patch(patch_size: Sequence[int], wanted: int) -> int:
    """How many resolution levels (up to ``wanted``) a patch allows: each level halves every axis exactly."""
    levels = 1
    while levels < wanted and all(int(p) % (2 ** levels) == 0 for p in patch_size):
        levels += 1
    return levels


def network_spec(name: str, spatial_dims: int, in_channels: int, out_channels: int, channels: Sequence[int],
                 patch_size: Sequence[int], norm: str = "instance", num_res_units: int = 2,
                 dropout: float = 0.0, deep_supervision: bool = True) -> dict:
    """The spec of a network of ``name`` with per-level widths ``channels`` that fits ``patch_size``."""
    if name not in NETWORKS:
        raise ConfigError(f"train.network must be one of {', '.join(NETWORKS)}, got {name!r}.")
    channels = [int(c) for c in channels]
    n_levels = levels_for_patch(patch_size, len(channels))
    if n_levels < len(channels):
        raise ConfigError(f"train.patch_size {list(patch_size)} must be divisible by {2 ** (len(channels) - 1)} "
                          f"along every axis for {len(channels)} levels (train.channels={channels}). Use a patch "
                          f"size that is a multiple of {2 ** (len(channels) - 1)}, or fewer channels entries.")
    if name == "UNet":
        kwargs = {"channels": channels, "strides": [2] * (len(channels) - 1), "num_res_units": int(num_res_units),
                  "norm": norm.upper(), "dropout": float(dropout)}
    elif name == "DynUNet":
        n = len(channels)
        kwargs = {"kernel_size": [3] * n, "strides": [1] + [2] * (n - 1), "upsample_kernel_size": [2] * (n - 1),
                  "filters": channels, "norm_name": norm.upper(), "res_block": bool(num_res_units > 0),
                  "deep_supervision": bool(deep_supervision and n >= 3),
                  "deep_supr_num": max(1, min(2, n - 2))}
        if dropout:
            kwargs["dropout"] = float(dropout)
    elif name == "SegResNet":
        n = len(channels)
        blocks_down = ([1, 2, 2, 4] + [4] * n)[:n]
        kwargs = {"init_filters": channels[0], "blocks_down": blocks_down, "blocks_up": [1] * (n - 1),
                  "norm": "INSTANCE" if norm == "instance" else "BATCH"}
        if dropout:
            kwargs["dropout_prob"] = float(dropout)
    else:
        kwargs = {"features": channels, "padding": "same", "upsample": "interp", "norm": norm,
                  "dropout": float(dropout)}
    return {"name": name, "spatial_dims": int(spatial_dims), "in_channels": int(in_channels),
            "out_channels": int(out_channels), "kwargs": kwargs}


def downsampling_factor(spec: dict) -> int:
    """The network's total stride: outputs only shift exactly with inputs shifted by a multiple of it.

    Prediction aligns its crop to the body to this factor, so that cropped and uncropped inference
    see the same pixel phase (see :func:`pipeline.preprocess.transform.prepare_image`).
    """
    kwargs = spec.get("kwargs") or {}
    factor = 1
    if spec.get("name") in ("UNet", "DynUNet"):
        for stride in kwargs.get("strides") or []:
            factor *= int(max(stride) if isinstance(stride, (list, tuple)) else stride)
    elif spec.get("name") == "SegResNet":
        factor = 2 ** max(0, len(kwargs.get("blocks_down") or [1, 2, 2, 4]) - 1)
    elif spec.get("name") == "ClassicUNet":
        factor = 2 ** max(0, len(kwargs.get("features") or (64, 128, 256, 512, 1024)) - 1)
    return max(1, factor)
