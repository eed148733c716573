"""Whole-volume inference on the model grid: sliding windows in 3D, or slice by slice (2D / 2.5D).

Used by validation during training. Prediction has its own memory-planned sliding window
(:mod:`pipeline.predict.inference`: budgets, streaming, GPU plans), which follows the same rules: Gaussian
blending of the windows' softmax, the same slice axis and context for 2D models; the predict tests compare it
with MONAI's ``sliding_window_inference``. Merging the two is open work. For 2D models the slices are the model
grid's k axis (axial after reorientation to RAS);
a 2.5D model with ``context_slices = n`` gets slices k-n..k+n as channels, the edge slice repeated
beyond the volume.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

SLICE_CHUNK = 32  # 2D slices per sliding-window call (bounds memory on large volumes)


@torch.no_grad()
def predict_probabilities(networks: Sequence[nn.Module], image: np.ndarray | torch.Tensor, mode: str,
                          patch_size: Sequence[int], context_slices: int = 0, overlap: float = 0.5,
                          sw_batch_size: int = 2, device: torch.device | str = "cpu",
                          autocast_dtype: torch.dtype | None = None, channels_last: bool = False) -> torch.Tensor:
    """Softmax probabilities ``[K, i, j, k]`` (float32, CPU) of ``image`` [i, j, k], averaged over networks."""
    device = torch.device(device)
    volume = torch.as_tensor(np.asarray(image, dtype=np.float32) if isinstance(image, np.ndarray) else image)
    volume = volume.float()
    if not networks:
        raise ValueError("predict_probabilities needs at least one network, got none")
    total: torch.Tensor | None = None
    for network in networks:
        if mode == "2d":
            probs = _predict_2d(network, volume, patch_size, context_slices, overlap, sw_batch_size, device,
                                autocast_dtype, channels_last)
        else:
            probs = _predict_3d(network, volume, patch_size, overlap, sw_batch_size, device, autocast_dtype,
                                channels_last)
        total = probs if total is None else total + probs
    assert total is not None  # at least one network ran (checked above)
    return total / len(networks)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _predictor(network: nn.Module, device: torch.device, dtype: torch.dtype | None, memory_format):
    def run(x: torch.Tensor) -> torch.Tensor:
        with _autocast(device, dtype):
            out = network(x.to(device).contiguous(memory_format=memory_format))
        return out.float().contiguous()
    return run


def _predict_3d(network, volume, patch_size, overlap, sw_batch_size, device, dtype, channels_last):
    from monai.inferers import sliding_window_inference

    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    logits = sliding_window_inference(volume[None, None], roi_size=list(patch_size), sw_batch_size=sw_batch_size,
                                      predictor=_predictor(network, device, dtype, memory_format), overlap=overlap,
                                      mode="gaussian", padding_mode="replicate", sw_device=device,
                                      device=torch.device("cpu"))
    return torch.softmax(torch.as_tensor(logits)[0].float(), dim=0)


def _predict_2d(network, volume, patch_size, context, overlap, sw_batch_size, device, dtype, channels_last):
    from monai.inferers import sliding_window_inference

    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    n_slices = volume.shape[2]
    padded = volume
    if context:
        padded = torch.cat([volume[:, :, :1].expand(-1, -1, context), volume,
                            volume[:, :, -1:].expand(-1, -1, context)], dim=2)
    result = None
    for start in range(0, n_slices, SLICE_CHUNK):
        stop = min(n_slices, start + SLICE_CHUNK)
        # slice k of the volume is slice k + context of ``padded``; its window is k .. k + 2 * context
        windows = padded[:, :, start:stop + 2 * context].unfold(2, 2 * context + 1, 1)  # [i, j, n, 2c+1]
        batch = windows.permute(2, 3, 0, 1).contiguous()  # [n, 2c+1, i, j]
        logits = sliding_window_inference(batch, roi_size=list(patch_size), sw_batch_size=sw_batch_size,
                                          predictor=_predictor(network, device, dtype, memory_format),
                                          overlap=overlap, mode="gaussian", padding_mode="replicate",
                                          sw_device=device, device=torch.device("cpu"))
        probs = torch.softmax(torch.as_tensor(logits).float(), dim=1).permute(1, 2, 3, 0)  # [K, i, j, n]
        if result is None:
            result = torch.empty((probs.shape[0], *volume.shape), dtype=torch.float32)
        result[:, :, :, start:stop] = probs
    return result


def dice_per_class(prediction: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray,
                   n_classes: int) -> list[float]:
    """Dice of classes 1..K-1 between two class-index maps; NaN where both are empty."""
    prediction = torch.as_tensor(np.asarray(prediction)).long().ravel()
    reference = torch.as_tensor(np.asarray(reference)).long().ravel()
    scores = []
    for cls in range(1, n_classes):
        p, r = prediction == cls, reference == cls
        denominator = int(p.sum() + r.sum())
        scores.append(float("nan") if denominator == 0 else 2.0 * int((p & r).sum()) / denominator)
    return scores
