"""Loading a trained model folder for prediction: its networks, built and checked against a memory budget.

The format itself (``model.json``: version, writer, reader and strict validation) is owned by
:mod:`pipeline.models.folder`; this module builds the networks it describes. The network's
memory (weights of every fold plus the activations of one window, estimated on PyTorch's ``meta``
device, where nothing is allocated) is checked against a budget before any network is built.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import ConfigError, InputError
from pipeline.models.factory import build_network
from pipeline.models.folder import MODEL_FILE, class_values, fold_numbers, read_model_spec


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


# layer outputs per resolution level, as a multiple of (voxels x channels) of that level: an upper bound of
# what MONAI's UNet (3.4), ClassicUNet (13), DynUNet (15) and SegResNet (18) produce (measured on the meta device)
_OUTPUTS_PER_LEVEL = 20


def level_channels(spec: dict) -> list[int] | None:
    """Feature widths per resolution level of a network spec, or None when the spec does not say."""
    kwargs = spec.get("kwargs") or {}
    for key in ("channels", "filters", "features"):
        if isinstance(kwargs.get(key), (list, tuple)) and kwargs[key]:
            return [int(c) for c in kwargs[key]]
    if spec.get("name") == "SegResNet":
        levels = len(kwargs.get("blocks_down") or (1, 2, 2, 4))
        return [int(kwargs.get("init_filters", 8)) * 2 ** level for level in range(levels)]
    return None


def network_memory_bytes(spec: dict, window: Sequence[int], exact: bool = False) -> tuple[int, int | None]:
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
        activations: int | None = total[0]
    except Exception:  # an architecture the meta device cannot run: weights alone are checked
        activations = None
    finally:
        for hook in hooks:
            hook.remove()
    return int(weights), activations


def check_network_size(spec: dict, folds: int, budget_bytes: int | None, where: Path) -> dict:
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


def load_model_folder(path: Path, device: str = "cpu", folds: Sequence[int] | None = None,
                      memory_budget_bytes: int | None = None) -> ModelBundle:
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
