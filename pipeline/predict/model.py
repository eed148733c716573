"""The model as prediction uses it: loaded once per batch, its networks prepared for fast inference.

:func:`load_predictor` reads a model folder with :func:`pipeline.models.load_model_folder` and
then, with ``predict.optimize_network``, rewrites each network for inference without changing
its function: batch norms folded into the preceding convolutions (torch.fx) and, on the CPU, a
channels-last memory layout with an instance norm computed directly on that layout (PyTorch's own
converts to a contiguous copy first). The rewritten network is compared with the original on a
random patch, in full fp32 (TF32 off); if they disagree by more than float rounding it is not used.
"""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline import devices
from pipeline.errors import InputError
from pipeline.labels.codes import codes_json
from pipeline.predict.ledger import sha256_file

log = logging.getLogger("ctseg.predict")


@dataclass
class LabelInfo:
    """One output label: voxel value, name, colour (RGB 0-255) and what it is (coded concepts)."""

    value: int
    name: str
    color: tuple[int, int, int]
    codes: dict = field(default_factory=dict)  # category/type/modifier/rt_type given in the dataset description

    @property
    def concept(self):
        """The label's :class:`pipeline.labels.codes.Concept` (given codes, the rest from the default table)."""
        from pipeline.labels.codes import label_concept

        return label_concept(self.name, self.codes)


@dataclass
class Predictor:
    """Everything the batch needs from the model folder, loaded once."""

    folder: Path
    spec: dict
    spec_sha256: str
    networks: list[nn.Module]
    class_values: list[int]          # label value of each output channel (channel 0 = background)
    labels: list[LabelInfo]          # foreground labels, in channel order
    device: torch.device
    optimisation: dict = field(default_factory=dict)
    training_fingerprint: dict | None = None   # training_fingerprint.json, when the model folder has one
    postprocessing: dict | None = None   # postprocessing.json (the decided clean-up), when it has one

    @property
    def mode(self) -> str:
        return str(self.spec.get("mode", "3d"))

    @property
    def plan(self) -> dict:
        return self.spec["plan"]

    @property
    def pad_value(self) -> float:
        """Network-input value that pads a volume smaller than the window: air under the plan's intensity."""
        from pipeline.preprocess.transform import air_input_value

        return air_input_value(self.spec.get("plan", {}).get("intensity"))

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.spec["patch_size"])

    @property
    def context_slices(self) -> int:
        return int(self.spec.get("context_slices", 0) or 0)

    @property
    def in_channels(self) -> int:
        return int(self.spec["network"]["in_channels"])

    @property
    def num_classes(self) -> int:
        return len(self.class_values)

    @property
    def crop_align(self) -> tuple[int, int, int]:
        """Voxels per model-grid axis that the body crop is aligned to (the network's stride; 2D: in-plane only)."""
        from pipeline.models.factory import downsampling_factor

        factor = downsampling_factor(self.spec["network"])
        return (factor, factor, 1) if self.mode != "3d" else (factor, factor, factor)


def resolve_device(wanted: str) -> torch.device:
    """The prediction device; under torchrun each rank's own GPU (bound as this thread's current device)."""
    if wanted == "cuda" and not torch.cuda.is_available():
        raise InputError("predict.device must name a device this machine has, got 'cuda' but torch sees no CUDA "
                         "GPU. Use device: auto or cpu.")
    if wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    device = devices.cuda_device_for_rank("predict.device", exclusive=False)
    devices.bind(device)
    return device


def network_budget_bytes(device: torch.device, budget_gb: float | None = None) -> int:
    """Memory the networks may take: ``budget_gb``, else the available RAM (CPU) or the GPU's total memory."""
    if budget_gb:
        return int(budget_gb * 1e9)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    from pipeline.predict.inference import available_ram_bytes

    return int(available_ram_bytes())


def load_predictor(model_dir: Path, device: torch.device, optimize: bool = True,
                   folds: Sequence[int] | None = None, memory_budget_gb: float | None = None) -> Predictor:
    """Load the model folder's networks (all folds, or ``folds``) onto ``device`` (see module docstring).

    A model whose estimated memory exceeds :func:`network_budget_bytes` is refused before it is built.
    """
    from pipeline.models.folder import MODEL_FILE, class_values, read_postprocessing
    from pipeline.models.loader import load_model_folder

    model_dir = Path(model_dir)
    bundle = load_model_folder(model_dir, device="cpu", folds=folds,
                               memory_budget_bytes=network_budget_bytes(device, memory_budget_gb))
    spec = bundle.spec
    values = class_values(spec)
    out_channels = int(spec["network"]["out_channels"])
    if len(values) != out_channels:
        raise InputError(f"{model_dir / MODEL_FILE} must give one label value per output channel "
                         f"({out_channels}), got {len(values)} ({values}). Re-run 'ctseg train'.")
    if str(spec.get("mode", "3d")) not in ("3d", "2d"):
        raise InputError(f"{model_dir / MODEL_FILE}: mode must be '3d' or '2d', got {spec.get('mode')!r}.")
    labels = _labels(spec, values)
    networks: list[nn.Module] = []
    report: dict = {}
    for network in bundle.networks:
        network = network.to(device).eval()
        for parameter in network.parameters():
            parameter.requires_grad_(False)
        if optimize:
            network, report = optimise_for_inference(network, spec, device)
        networks.append(network)
    from pipeline import training_fingerprint

    return Predictor(folder=model_dir, spec=spec, spec_sha256=sha256_file(model_dir / MODEL_FILE),
                     networks=networks, class_values=values, labels=labels, device=device, optimisation=report,
                     training_fingerprint=training_fingerprint.read(model_dir),
                     postprocessing=read_postprocessing(model_dir, spec))


def _labels(spec: dict, values: list[int]) -> list[LabelInfo]:
    by_value = {int(label["value"]): label for label in spec.get("labels", [])}
    labels = []
    for value in values[1:]:
        label = by_value.get(int(value), {})
        color = label.get("color") or _default_color(value)
        color = tuple(int(round(c * 255)) if isinstance(c, float) and max(color) <= 1.0 else int(c) for c in color)
        labels.append(LabelInfo(int(value), str(label.get("name") or f"label_{value}"), color[:3],
                                codes_json(label)))
    return labels


def _default_color(value: int) -> list[int]:
    palette = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
               (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]
    return list(palette[(int(value) - 1) % len(palette)])


# ---------------------------------------------------------------------------------------------
# Inference rewrites
# ---------------------------------------------------------------------------------------------

class ChannelsLastInstanceNorm(nn.Module):
    """Instance norm (no running statistics) computed with reductions that keep a channels-last layout."""

    def __init__(self, norm: nn.modules.instancenorm._InstanceNorm):
        super().__init__()
        self.eps = norm.eps
        self.weight = norm.weight
        self.bias = norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=tuple(range(2, x.ndim)), keepdim=True, correction=0)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            shape = (1, -1) + (1,) * (x.ndim - 2)
            y = torch.addcmul(self.bias.view(shape), y, self.weight.view(shape))
        return y


def _swap_instance_norms(module: nn.Module) -> int:
    swapped = 0
    for name, child in module.named_children():
        if isinstance(child, nn.modules.instancenorm._InstanceNorm) and not child.track_running_stats:
            setattr(module, name, ChannelsLastInstanceNorm(child))
            swapped += 1
        else:
            swapped += _swap_instance_norms(child)
    return swapped


def _fold_transposed_batchnorms(graph_module) -> int:
    """Fold eval-mode batch norms that directly follow a transposed convolution into its weights."""
    modules = dict(graph_module.named_modules())
    folded = 0
    for node in list(graph_module.graph.nodes):
        norm = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(norm, nn.modules.batchnorm._BatchNorm) or norm.running_mean is None:
            continue
        source = node.args[0] if node.args else None
        conv = modules.get(source.target) if getattr(source, "op", None) == "call_module" else None
        if not isinstance(conv, nn.modules.conv._ConvTransposeNd) or conv.groups != 1 or len(source.users) != 1:
            continue
        with torch.no_grad():
            scale = torch.rsqrt(norm.running_var + norm.eps)
            if norm.weight is not None:
                scale = scale * norm.weight
            shift = -norm.running_mean * scale + (norm.bias if norm.bias is not None else 0.0)
            # transposed convolution weights are (in, out, *kernel): scale each output channel
            conv.weight.mul_(scale.view(1, -1, *([1] * (conv.weight.ndim - 2))))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
            conv.bias = nn.Parameter(bias * scale + shift, requires_grad=False)
        node.replace_all_uses_with(source)
        graph_module.graph.erase_node(node)
        folded += 1
    if folded:
        graph_module.graph.lint()
        graph_module.recompile()
    return folded


def _first(output):
    return output[0] if isinstance(output, (list, tuple)) else output


def optimise_for_inference(network: nn.Module, spec: dict, device: torch.device) -> tuple[nn.Module, dict]:
    """A faster network with the same outputs, and what was changed (see module docstring).

    The channels-last layout (with the layout-keeping instance norm) is applied on the CPU only: on CUDA,
    PyTorch's instance norm copies a channels-last tensor to contiguous at every layer (pytorch/pytorch#59168),
    so the network keeps the contiguous layout there and gets the batch-norm folding alone.
    """
    spatial_dims = int(spec["network"]["spatial_dims"])
    channels_last = device.type == "cpu"
    layout = (torch.channels_last_3d if spatial_dims == 3 else torch.channels_last) if channels_last else \
        torch.contiguous_format
    report: dict = {"applied": [], "checked": False}
    candidate = copy.deepcopy(network)
    try:
        from torch.fx.experimental.optimization import fuse

        candidate = fuse(candidate, inplace=True)
        folded = _fold_transposed_batchnorms(candidate)
        report["applied"].append("conv-batchnorm folding (torch.fx)" +
                                 (f", {folded} after transposed convolutions" if folded else ""))
    except Exception as exc:  # networks with data-dependent control flow cannot be traced; skip the fold
        log.debug("batch-norm folding skipped: %s", exc)
        candidate = copy.deepcopy(network)
    if channels_last:
        swapped = _swap_instance_norms(candidate)
        if swapped:
            report["applied"].append(f"channels-last instance norm ({swapped} layers)")
        candidate = candidate.to(memory_format=layout)
        report["applied"].append("channels-last layout")
    start = time.perf_counter()
    patch = [int(p) for p in spec["patch_size"]]
    # a small patch keeps the check cheap: 32 voxels per axis fits four 2x downsamplings; else the real patch
    sizes = [[min(p, 32) for p in patch], patch]
    generator = torch.Generator().manual_seed(0)
    for n, size in enumerate(sizes):
        sample = torch.rand((1, int(spec["network"]["in_channels"]), *size), generator=generator).to(device)
        try:
            # full fp32 on both sides: with TF32 convolutions (CUDA's default) and the different cuDNN
            # algorithms of two layouts, float rounding alone could exceed the limit below
            with torch.inference_mode(), devices.ieee_fp32():
                expected = _first(network(sample)).float()
                got = _first(candidate(sample.contiguous(memory_format=layout))).float()
            break
        except RuntimeError:
            if n == len(sizes) - 1:
                raise
    report["check_seconds"] = round(time.perf_counter() - start, 3)
    error = float((expected - got).abs().max())
    scale = float(expected.abs().max()) + 1.0
    report["max_abs_difference"] = error
    if not torch.isfinite(got).all() or error > 1e-3 * scale:
        log.warning("network rewrite for inference changed the outputs by %.3g; using the network as trained", error)
        return network, {"applied": [], "checked": True, "rejected": f"max difference {error:.3g}"}
    report["checked"] = True
    report["layout"] = "channels_last" if channels_last else "contiguous"
    return candidate, report
