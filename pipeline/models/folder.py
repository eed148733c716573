"""The model folder on disk, format ``ctseg-model/1``: its version, writer and reader (one owner).

A model folder is self-contained: ``model.json`` holds the network spec, the preprocessing plan, the label names,
values, colours and coded concepts, and one weights file per fold, each a plain ``state_dict`` that
``torch.load(weights_only=True)`` reads without executing code. ``training_fingerprint.json`` beside it
(:mod:`pipeline.training_fingerprint`) describes the training data. ``model.json`` is written last, so its presence
means the folder is complete.

``postprocessing.json`` (format ``ctseg-postprocessing/1``, :func:`write_postprocessing` / :func:`read_postprocessing`)
holds the clean-up decided from the cross-validation when every fold was finished (:mod:`pipeline.postprocessing`):
per class the rule kept (or none), the mean Dice with and without it and the case count. Training writes it before
``model.json``; a folder without it (trained before ctseg decided postprocessing, or with folds still to train)
loads and predicts without a decided clean-up, and predict's provenance says so.

``model.json`` is validated strictly (:func:`validate_spec`): an unknown key, a wrong type or an invalid value is
refused with one line naming the key and the valid choices. :mod:`pipeline.models.loader` builds the networks.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import atomic
from pipeline.errors import InputError
from pipeline.labels.codes import CODE_KEYS

if TYPE_CHECKING:
    from torch import nn

MODEL_FORMAT = "ctseg-model/1"
MODEL_FILE = "model.json"
REQUIRED_KEYS = ("network", "mode", "patch_size", "plan", "labels", "folds")
OPTIONAL_KEYS = ("context_slices", "class_values", "training")
NETWORK_KEYS = ("name", "spatial_dims", "in_channels", "out_channels", "kwargs")
LABEL_KEYS = ("name", "value", "color", *CODE_KEYS)
FOLD_KEYS = ("fold", "checkpoint", "val_dice", "best_step")
POSTPROCESSING_FORMAT = "ctseg-postprocessing/1"
POSTPROCESSING_FILE = "postprocessing.json"



def write_model_json(folder: Path, spec: dict) -> Path:
    """Write ``model.json`` (the format key first), atomically; call it after every weights file is in place."""
    path = Path(folder) / MODEL_FILE
    atomic.write_json(path, {"format": MODEL_FORMAT, **{k: v for k, v in spec.items() if k != "format"}})
    return path


def write_model_folder(folder: Path, network_spec: dict, networks: list[nn.Module], plan: dict,
                       labels: list[dict], patch_size: list[int], *, mode: str = "3d", context_slices: int = 0,
                       extra: dict | None = None) -> Path:
    """A model folder from networks in memory (benchmarks, tests, converted bundles): one ``fold_<n>.pt`` state
    dict per network, then ``model.json``; returns the folder. Training writes its folder with
    :func:`write_model_json` after copying each fold's best checkpoint."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    folds = []
    for n, network in enumerate(networks):
        name = f"fold_{n}.pt"
        with atomic.atomic_path(folder / name) as tmp:
            torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()}, tmp)
        folds.append({"fold": n, "checkpoint": name})
    spec = {"network": network_spec, "mode": mode, "context_slices": int(context_slices),
            "patch_size": [int(p) for p in patch_size], "plan": plan, "labels": labels, "folds": folds,
            **(extra or {})}
    write_model_json(folder, spec)
    return folder


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


def fold_numbers(spec: dict) -> list[int]:
    """The fold number of each network listed in a model spec, in order."""
    return [int(f.get("fold", i)) for i, f in enumerate(spec.get("folds", []))]


def write_postprocessing(folder: Path, decision: dict) -> Path:
    """Write ``postprocessing.json`` (the format key first), atomically."""
    path = Path(folder) / POSTPROCESSING_FILE
    atomic.write_json(path, {"format": POSTPROCESSING_FORMAT, **{k: v for k, v in decision.items() if k != "format"}})
    return path


def read_postprocessing(folder: Path, spec: dict | None = None) -> dict | None:
    """The model folder's postprocessing decision, or None when it has none (see module docstring).

    A file that is there but unreadable, of another format, or naming a class the model does not have (``spec``)
    is refused: predicting with a half-understood clean-up would be silently wrong.
    """
    path = Path(folder) / POSTPROCESSING_FILE
    if not path.is_file():
        return None
    how = "Re-run 'ctseg train' with this version, or delete the file to predict without the decided clean-up."
    try:
        decision = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} must be readable JSON, got {type(exc).__name__}: {exc}. {how}") from exc
    if not isinstance(decision, dict) or decision.get("format") != POSTPROCESSING_FORMAT:
        got = decision.get("format") if isinstance(decision, dict) else type(decision).__name__
        raise InputError(f"{path} must have format {POSTPROCESSING_FORMAT!r}, got {got!r}. {how}")
    classes = decision.get("classes")
    if not isinstance(classes, dict):
        raise InputError(f"{path}: classes must be a mapping of label name to decision, got {classes!r}. {how}")
    known = [label["name"] for label in spec["labels"]] if spec else None
    for name, entry in classes.items():
        if known is not None and name not in known:
            raise InputError(f"{path}: classes must name labels of the model ({', '.join(known)}), got {name!r}. "
                             f"{how}")
        rule = entry.get("rule") if isinstance(entry, dict) else entry
        if rule is None:
            continue
        largest, ml = (rule.get("keep_largest_component"), rule.get("min_component_ml")) \
            if isinstance(rule, dict) else (None, None)
        if not isinstance(rule, dict) or set(rule) - {"keep_largest_component", "min_component_ml"} \
                or not isinstance(largest, bool) or not (ml is None or (_is_number(ml) and ml > 0)):
            raise InputError(f"{path}: classes.{name}.rule must be null or {{keep_largest_component: true/false, "
                             f"min_component_ml: a positive number or null}}, got {rule!r}. {how}")
    return decision
