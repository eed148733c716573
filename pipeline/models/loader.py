"""Loading a trained model folder (``model.json`` + state-dict weights) for prediction.

The folder is self-contained: ``model.json`` holds the network spec, the preprocessing plan, the
label names and values, and one weights file per fold, each a plain ``state_dict`` that
``torch.load(weights_only=True)`` reads without executing code.
"""
from __future__ import annotations

import json
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
    return spec


def fold_numbers(spec: dict) -> list[int]:
    """The fold number of each network listed in a model spec, in order."""
    return [int(f.get("fold", i)) for i, f in enumerate(spec.get("folds", []))]


def load_model_folder(path: Path, device: str = "cpu", folds: Optional[Sequence[int]] = None) -> ModelBundle:
    """Load every fold's network of a model folder (or only ``folds``) onto ``device`` in eval mode.

    With ``folds`` the returned spec lists only those folds, so provenance says what was used.
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
