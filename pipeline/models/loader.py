"""Loading a trained model folder (``model.json`` + state-dict weights) for prediction.

The folder is self-contained: ``model.json`` holds the network spec, the preprocessing plan, the
label names and values, and one weights file per fold, each a plain ``state_dict`` that
``torch.load(weights_only=True)`` reads without executing code.

``model.json`` is validated strictly (:func:`validate_spec`): an unknown key, a wrong type or an
invalid value is refused with one line naming the key and the valid choices. The network's
memory (weights of every fold plus the activations of one window, estimated on PyTorch's ``meta``
device, where nothing is allocated) is checked against a budget before any network is built.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from pipeline.errors import ConfigError, InputError
from pipeline.models.factory import build_network

MODEL_FORMAT = "ctseg-model/1"
MODEL_FILE = "model.json"
REQUIRED_KEYS = ("network", "mode", "patch_size", "plan", "labels", "folds")
OPTIONAL_KEYS = ("context_slices", "class_values", "training")
NETWORK_KEYS = ("name", "spatial_dims", "in_channels", "out_channels", "kwargs")
LABEL_KEYS = ("name", "value", "color")
FOLD_KEYS = ("fold", "checkpoint", "val_dice", "best_step")


@dataclass
class ModelBundle:
    """A loaded model folder: its ``model.json`` and one network per fold, in eval mode."""

    path: Path
    spec: dict
    networks: list[nn.Module] = field(default_factory=list)

    @property
    def class_values(self) -> list[int]:
        """Label value written for each output channel (channel 0 is background, value 0)."""
        return class_values(self.spec)


def class_values(spec: dict) -> list[int]:
    if "class_values" in spec:
        return [int(v) for v in spec["class_values"]]
    return [0] + [int(label["value"]) for label in spec["labels"]]


def read_model_spec(path: Path) -> dict:
    """Read and check ``model.json`` in a model folder; a clear InputError when it is not usable."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"model folder {path} must be a folder made by 'ctseg train', got "
                         f"{'a file' if path.exists() else 'nothing (it does not exist)'}. "
                         f"Point at <output_root>/<experiment>/train/model.")
    spec_path = path / MODEL_FILE
    if not spec_path.is_file():
        raise InputError(f"model folder {path} must contain {MODEL_FILE}, got none. Training may not have "
                         f"finished; run 'ctseg train' again (it resumes).")
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{spec_path} must be valid JSON, got a read error ({exc}). Re-run 'ctseg train'.") from exc
    if not isinstance(spec, dict) or spec.get("format") != MODEL_FORMAT:
        got = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise InputError(f"{spec_path} must have format {MODEL_FORMAT!r}, got {got!r}. It was written by another "
                         f"tool or ctseg version; re-export it with this version's 'ctseg train'.")
    missing = [key for key in REQUIRED_KEYS if key not in spec]
    if missing:
        raise InputError(f"{spec_path} must contain {', '.join(missing)}, got keys {sorted(spec)}. "
                         f"Re-run 'ctseg train' to rewrite the model folder.")
    if not spec["folds"]:
        raise InputError(f"{spec_path} must list at least one fold checkpoint, got none. Re-run 'ctseg train'.")
    validate_spec(spec, spec_path)
    return spec


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _refuse(where: Path, key: str, expected: str, got) -> None:
    raise InputError(f"{where}: {key} must be {expected}, got {got!r}. Fix model.json or re-run 'ctseg train'.")


def _no_unknown_keys(where: Path, prefix: str, mapping: dict, allowed) -> None:
    unknown = sorted(set(mapping) - set(allowed))
    if unknown:
        raise InputError(f"{where}: unknown key {prefix}{unknown[0]!r}; valid keys are {', '.join(allowed)}. Remove "
                         f"it (model.json from another tool or a newer ctseg?), or re-run 'ctseg train'.")


def validate_spec(spec: dict, where: Path) -> None:
    """Refuse any unknown key, wrong type or invalid value of a ``ctseg-model/1`` spec (see module docstring)."""
    from pipeline.models.factory import NETWORKS, check_network_kwargs

    _no_unknown_keys(where, "", spec, ("format",) + REQUIRED_KEYS + OPTIONAL_KEYS)
    network = spec["network"]
    if not isinstance(network, dict):
        _refuse(where, "network", "a mapping", network)
    _no_unknown_keys(where, "network.", network, NETWORK_KEYS)
    for key in NETWORK_KEYS[:4]:
        if key not in network:
            _refuse(where, f"network.{key}", "present", None)
    if network["name"] not in NETWORKS:
        _refuse(where, "network.name", f"one of {', '.join(NETWORKS)}", network["name"])
    if network["spatial_dims"] not in (2, 3) or not _is_int(network["spatial_dims"]):
        _refuse(where, "network.spatial_dims", "2 or 3", network["spatial_dims"])
    if not _is_int(network["in_channels"]) or network["in_channels"] < 1:
        _refuse(where, "network.in_channels", "a positive integer", network["in_channels"])
    if not _is_int(network["out_channels"]) or network["out_channels"] < 2:
        _refuse(where, "network.out_channels", "an integer >= 2 (background and at least one label)",
                network["out_channels"])
    if not isinstance(network.get("kwargs", {}), dict):
        _refuse(where, "network.kwargs", "a mapping of constructor arguments", network["kwargs"])
    check_network_kwargs(network, where)
    mode = spec["mode"]
    if mode not in ("3d", "2d"):
        _refuse(where, "mode", "one of 3d, 2d", mode)
    if network["spatial_dims"] != (3 if mode == "3d" else 2):
        _refuse(where, "network.spatial_dims", f"{3 if mode == '3d' else 2} for mode {mode}", network["spatial_dims"])
    context = spec.get("context_slices", 0)
    if not _is_int(context) or context < 0 or (mode == "3d" and context != 0):
        _refuse(where, "context_slices", "0 in mode 3d, an integer >= 0 in mode 2d", context)
    if mode == "2d" and network["in_channels"] != 2 * context + 1:
        _refuse(where, "network.in_channels", f"2 * context_slices + 1 = {2 * context + 1} in mode 2d",
                network["in_channels"])
    patch = spec["patch_size"]
    dims = 3 if mode == "3d" else 2
    if not isinstance(patch, list) or len(patch) not in (dims, 3) or not all(_is_int(p) and p >= 1 for p in patch):
        _refuse(where, "patch_size", f"a list of {dims} positive integers for mode {mode}", patch)
    plan = spec["plan"]
    if not isinstance(plan, dict):
        _refuse(where, "plan", "a mapping (the preprocessing plan)", plan)
    spacing = plan.get("target_spacing")
    if not isinstance(spacing, list) or len(spacing) != 3 or not all(_is_number(v) and v > 0 for v in spacing):
        _refuse(where, "plan.target_spacing", "a list of 3 positive numbers (mm)", spacing)
    if not isinstance(plan.get("intensity"), dict):
        _refuse(where, "plan.intensity", "a mapping (the intensity normalisation)", plan.get("intensity"))
    labels = spec["labels"]
    if not isinstance(labels, list) or not labels:
        _refuse(where, "labels", "a non-empty list of {name, value, color}", labels)
    values = []
    for n, label in enumerate(labels):
        if not isinstance(label, dict):
            _refuse(where, f"labels[{n}]", "a mapping with keys name, value, color", label)
        _no_unknown_keys(where, f"labels[{n}].", label, LABEL_KEYS)
        if not isinstance(label.get("name"), str) or not label["name"].strip():
            _refuse(where, f"labels[{n}].name", "a non-empty text", label.get("name"))
        if not _is_int(label.get("value")) or not 1 <= label["value"] <= 65535:
            _refuse(where, f"labels[{n}].value", "an integer 1-65535", label.get("value"))
        color = label.get("color", [])
        if not isinstance(color, list) or len(color) not in (0, 3, 4) or not all(_is_number(c) and 0 <= c <= 255
                                                                                 for c in color):
            _refuse(where, f"labels[{n}].color", "a list of 3 numbers 0-255 (or empty)", color)
        values.append(label["value"])
    if len(set(values)) != len(values):
        _refuse(where, "labels[].value", "unique", values)
    if "class_values" in spec:
        classes = spec["class_values"]
        if (not isinstance(classes, list) or not all(_is_int(v) and v >= 0 for v in classes) or not classes
                or classes[0] != 0 or len(set(classes)) != len(classes)):
            _refuse(where, "class_values", "a list of distinct integers starting with 0 (background)", classes)
    folds = spec["folds"]
    if not isinstance(folds, list):
        _refuse(where, "folds", "a list of {fold, checkpoint}", folds)
    for n, fold in enumerate(folds):
        if not isinstance(fold, dict):
            _refuse(where, f"folds[{n}]", "a mapping with keys fold, checkpoint", fold)
        _no_unknown_keys(where, f"folds[{n}].", fold, FOLD_KEYS)
        if not isinstance(fold.get("checkpoint"), str) or not fold["checkpoint"]:
            _refuse(where, f"folds[{n}].checkpoint", "a file name inside the model folder", fold.get("checkpoint"))
        if "fold" in fold and (not _is_int(fold["fold"]) or fold["fold"] < 0):
            _refuse(where, f"folds[{n}].fold", "an integer >= 0", fold["fold"])
        if fold.get("best_step") is not None and not _is_int(fold["best_step"]):
            _refuse(where, f"folds[{n}].best_step", "an integer or null", fold["best_step"])
    if "training" in spec and not isinstance(spec["training"], dict):
        _refuse(where, "training", "a mapping", spec["training"])


# layer outputs per resolution level, as a multiple of (voxels x channels) of that level: an upper bound of
# what MONAI's UNet (3.4), ClassicUNet (13), DynUNet (15) and SegResNet (18) produce (measured on the meta device)
_OUTPUTS_PER_LEVEL = 20


def level_channels(spec: dict) -> Optional[list[int]]:
    """Feature widths per resolution level of a network spec, or None when the spec does not say."""
    kwargs = spec.get("kwargs") or {}
    for key in ("channels", "filters", "features"):
        if isinstance(kwargs.get(key), (list, tuple)) and kwargs[key]:
            return [int(c) for c in kwargs[key]]
    if spec.get("name") == "SegResNet":
        levels = len(kwargs.get("blocks_down") or (1, 2, 2, 4))
        return [int(kwargs.get("init_filters", 8)) * 2 ** level for level in range(levels)]
    return None


def network_memory_bytes(spec: dict, window: Sequence[int], exact: bool = False) -> tuple[int, Optional[int]]:
    """(bytes of the network's fp32 weights, bytes of the activations of one window or None if unknown).

    The network is built on the ``meta`` device (shapes only, nothing allocated). Activations are
    bounded from the widths per level (:data:`_OUTPUTS_PER_LEVEL`); with ``exact`` (or when the spec
    has no widths) the network is run on a meta tensor and every layer's output summed instead (an
    upper bound of what inference holds at once; the first meta run costs seconds, so it is done
    only when the bound comes near the budget).
    """
    import torch

    with torch.device("meta"):
        network = build_network(spec)
    weights = sum(p.numel() * 4 for p in network.parameters()) + sum(b.numel() * 4 for b in network.buffers())
    channels = level_channels(spec)
    if channels and not exact:
        voxels = math.prod(int(w) for w in window)
        shrink = 2 ** len(window)
        bound = sum(voxels / shrink ** level * width for level, width in enumerate(channels))
        return int(weights), int(bound * _OUTPUTS_PER_LEVEL * 4)
    total = [0]

    def count(_module, _inputs, output) -> None:
        for item in output if isinstance(output, (list, tuple)) else (output,):
            if isinstance(item, torch.Tensor):
                total[0] += item.numel() * 4

    hooks = [m.register_forward_hook(count) for m in network.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            network.eval()(torch.empty((1, int(spec["in_channels"]), *[int(w) for w in window]), device="meta"))
        activations: Optional[int] = total[0]
    except Exception:  # an architecture the meta device cannot run: weights alone are checked
        activations = None
    finally:
        for hook in hooks:
            hook.remove()
    return int(weights), activations


def check_network_size(spec: dict, folds: int, budget_bytes: Optional[int], where: Path) -> dict:
    """Refuse a model whose networks would not fit ``budget_bytes``; returns the estimate."""
    window = [int(p) for p in spec["patch_size"]][: int(spec["network"]["spatial_dims"])]
    weights, activations = network_memory_bytes(spec["network"], window)
    # the weights of every fold, a copy while each is rewritten for inference, and one window's activations
    need = weights * (folds + 1) + (activations or 0)
    if budget_bytes is not None and need > budget_bytes / 2 and weights * (folds + 1) <= budget_bytes:
        weights, activations = network_memory_bytes(spec["network"], window, exact=True)  # near the budget: measure
        need = weights * (folds + 1) + (activations or 0)
    estimate = {"weights_bytes": weights, "activation_bytes": activations, "needed_bytes": need,
                "budget_bytes": budget_bytes}
    if budget_bytes is not None and need > budget_bytes:
        window_part = f", {activations / 1e9:.1f} GB of activations for one {window} window" if activations else ""
        raise InputError(f"{where}: the network must fit the memory budget of {budget_bytes / 1e9:.1f} GB, got an "
                         f"estimated {need / 1e9:.1f} GB ({weights / 4:.3g} parameters per fold x {folds} fold(s)"
                         f"{window_part}). Check network.kwargs in model.json, use fewer folds (predict.folds), "
                         f"or raise "
                         f"predict.memory.network_budget_gb on a larger machine.")
    return estimate


def fold_numbers(spec: dict) -> list[int]:
    """The fold number of each network listed in a model spec, in order."""
    return [int(f.get("fold", i)) for i, f in enumerate(spec.get("folds", []))]


def load_model_folder(path: Path, device: str = "cpu", folds: Optional[Sequence[int]] = None,
                      memory_budget_bytes: Optional[int] = None) -> ModelBundle:
    """Load every fold's network of a model folder (or only ``folds``) onto ``device`` in eval mode.

    With ``folds`` the returned spec lists only those folds, so provenance says what was used.
    ``memory_budget_bytes``: refuse the model before building it when its estimated memory exceeds it.
    """
    path = Path(path)
    spec = read_model_spec(path)
    if folds is not None:
        available = fold_numbers(spec)
        missing = [int(f) for f in folds if int(f) not in available]
        if missing or not folds:
            raise ConfigError(f"predict.folds must name folds of the model folder {path} ({available}), got "
                              f"{list(folds)}. Use null for all folds, or a subset of {available}.")
        wanted = {int(k) for k in folds}
        spec = {**spec, "folds": [f for f, number in zip(spec["folds"], available) if number in wanted]}
    if memory_budget_bytes is not None:
        check_network_size(spec, len(spec["folds"]), memory_budget_bytes, path / MODEL_FILE)
    networks = []
    for fold in spec["folds"]:
        weights = path / fold["checkpoint"]
        if not weights.resolve().is_relative_to(path.resolve()):
            raise InputError(f"{path / MODEL_FILE}: checkpoint path must stay inside the model folder, "
                             f"got {fold['checkpoint']!r}. The model.json was edited or is not trustworthy.")
        if not weights.is_file():
            raise InputError(f"model folder {path} must contain {fold['checkpoint']} (fold {fold.get('fold')}), "
                             f"got no such file. Copy the whole model folder, or re-run 'ctseg train'.")
        try:
            state = torch.load(weights, map_location=device, weights_only=True)
        except Exception as exc:  # pickle/zip errors have many types
            raise InputError(f"{weights} must be a PyTorch state_dict, got a load error "
                             f"({type(exc).__name__}: {exc}). The file is damaged; re-run 'ctseg train'.") from exc
        network = build_network(spec["network"])
        try:
            network.load_state_dict(state)
        except (RuntimeError, KeyError) as exc:
            first = str(exc).splitlines()[0]
            raise InputError(f"{weights} must match the network in model.json, got: {first}. "
                             f"The folder mixes files from different trainings; re-run 'ctseg train'.") from exc
        networks.append(network.to(device).eval())
    return ModelBundle(path=path, spec=spec, networks=networks)
