"""Writing a model folder in the ``ctseg-model/1`` format from networks in memory (benchmarks, tests, imports).

Training writes its own model folders; this is for networks that come from elsewhere (a benchmark's
fixed weights, a converted MONAI bundle) so they run through exactly the same prediction path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from pipeline import atomic


def write_model_folder(folder: Path, network_spec: dict, networks: list[nn.Module], plan: dict,
                       labels: list[dict], patch_size: list[int], mode: str = "3d", context_slices: int = 0,
                       extra: Optional[dict] = None) -> Path:
    """Write ``model.json`` and one ``fold_<n>.pt`` state dict per network; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    folds = []
    for n, network in enumerate(networks):
        name = f"fold_{n}.pt"
        with atomic.atomic_path(folder / name) as tmp:
            torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()}, tmp)
        folds.append({"fold": n, "checkpoint": name})
    spec = {"format": "ctseg-model/1", "network": network_spec, "mode": mode, "context_slices": int(context_slices),
            "patch_size": [int(p) for p in patch_size], "plan": plan, "labels": labels, "folds": folds,
            **(extra or {})}
    atomic.write_json(folder / "model.json", spec)
    return folder
