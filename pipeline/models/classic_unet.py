"""The original U-Net (Ronneberger et al. 2015) in 2D or 3D, with 'valid' or 'same' padding.

With ``padding="valid"``, ``upsample="transposed"``, ``norm=None`` and 1 input / 2 output channels
this is the paper's network: a 572×572 tile maps to a 388×388 output and it has 31,030,658
parameters. Skips are centre-cropped to the upsampled size in 'valid' mode; in 'same' mode the
upsampled tensor is padded to the skip size so that odd input sizes come back at their own size.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _layers(spatial_dims: int):
    if spatial_dims == 2:
        return nn.Conv2d, nn.ConvTranspose2d, nn.MaxPool2d, nn.BatchNorm2d, nn.InstanceNorm2d, nn.Dropout2d
    if spatial_dims == 3:
        return nn.Conv3d, nn.ConvTranspose3d, nn.MaxPool3d, nn.BatchNorm3d, nn.InstanceNorm3d, nn.Dropout3d
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")


class DoubleConv(nn.Module):
    """Two 3×3 convolutions, each followed by optional normalisation and a ReLU."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, padding: str, norm: str | None,
                 dropout: float = 0.0):
        super().__init__()
        conv, _, _, batch_norm, instance_norm, drop = _layers(spatial_dims)
        pad = 1 if padding == "same" else 0
        layers: list[nn.Module] = []
        for c_in in (in_channels, out_channels):
            # a bias before a normalisation layer is cancelled by it, so only keep it without one
            layers.append(conv(c_in, out_channels, kernel_size=3, padding=pad, bias=norm is None))
            if norm == "batch":
                layers.append(batch_norm(out_channels))
            elif norm == "instance":
                layers.append(instance_norm(out_channels, affine=True))
            layers.append(nn.ReLU(inplace=True))
        if dropout > 0:
            layers.append(drop(dropout))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Down(nn.Module):
    """2× max pooling, then a :class:`DoubleConv`."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, padding: str, norm: str | None,
                 dropout: float = 0.0):
        super().__init__()
        pool = _layers(spatial_dims)[2]
        self.pool = pool(kernel_size=2)
        self.conv = DoubleConv(spatial_dims, in_channels, out_channels, padding, norm, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


class Up(nn.Module):
    """2× upsampling that halves the channels, concatenation with the skip, then a :class:`DoubleConv`."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, padding: str, upsample: str,
                 norm: str | None):
        super().__init__()
        conv, conv_transpose, *_ = _layers(spatial_dims)
        self.spatial_dims = spatial_dims
        self.padding = padding
        self.upsample = upsample
        if upsample == "transposed":
            self.up = conv_transpose(in_channels, in_channels // 2, kernel_size=2, stride=2)
        else:  # interpolation keeps the channels; a 1×1 convolution halves them like the transposed one
            self.up = conv(in_channels, in_channels // 2, kernel_size=1)
        self.conv = DoubleConv(spatial_dims, in_channels // 2 + out_channels, out_channels, padding, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.upsample == "transposed":
            x = self.up(x)
        else:
            mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
            x = self.up(F.interpolate(x, scale_factor=2, mode=mode, align_corners=False))
        if self.padding == "valid":
            skip = _centre_crop(skip, x.shape[2:])
        else:
            x = _pad_to(x, skip.shape[2:])
        return self.conv(torch.cat([skip, x], dim=1))


def _centre_crop(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    slices = [slice(None), slice(None)]
    for have, want in zip(x.shape[2:], size):
        start = (have - want) // 2
        slices.append(slice(start, start + want))
    return x[tuple(slices)]


def _pad_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Zero-pad the trailing spatial dims of x up to ``size`` (odd sizes lose a voxel when pooled)."""
    pads: list[int] = []
    for have, want in reversed(list(zip(x.shape[2:], size))):
        extra = max(0, int(want) - int(have))
        pads.extend([extra // 2, extra - extra // 2])
    return F.pad(x, pads) if any(pads) else x


class ClassicUNet(nn.Module):
    """The paper's U-Net: DoubleConv, 4 × Down, 4 × Up, 1×1 output convolution."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 features: Sequence[int] = (64, 128, 256, 512, 1024),
                 padding: Literal["same", "valid"] = "same",
                 upsample: Literal["interp", "transposed"] = "interp",
                 norm: Literal["batch", "instance"] | None = "batch",
                 dropout: float = 0.0, checkpointing: bool = False):
        super().__init__()
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
        if upsample not in ("interp", "transposed"):
            raise ValueError(f"upsample must be 'interp' or 'transposed', got {upsample!r}")
        if norm not in ("batch", "instance", None):
            raise ValueError(f"norm must be 'batch', 'instance' or None, got {norm!r}")
        features = [int(f) for f in features]
        if len(features) < 2:
            raise ValueError(f"features must list at least 2 widths, got {features}")
        self.spatial_dims = spatial_dims
        self.checkpointing = checkpointing
        self.inc = DoubleConv(spatial_dims, in_channels, features[0], padding, norm)
        # as in the paper, dropout sits at the end of the contracting path (the bottleneck)
        self.downs = nn.ModuleList(
            Down(spatial_dims, features[i], features[i + 1], padding, norm,
                 dropout if i == len(features) - 2 else 0.0)
            for i in range(len(features) - 1))
        self.ups = nn.ModuleList(
            Up(spatial_dims, features[i + 1], features[i], padding, upsample, norm)
            for i in reversed(range(len(features) - 1)))
        conv = _layers(spatial_dims)[0]
        self.out = conv(features[0], out_channels, kernel_size=1)

    def _run(self, module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            # recompute activations in the backward pass: less memory for the same result
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self._run(self.inc, x)]
        for down in self.downs:
            skips.append(self._run(down, skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = self._run(up, x, skips.pop())
        return self.out(x)
