"""Which autocast precision train and predict use on each device, and why: one capability probe, one decision.

``resolve_precision(requested, device, stage)`` turns ``train.precision`` / ``predict.precision``
(``auto``, ``fp32``, ``bf16``, ``fp16``) into a :class:`Precision`: the autocast dtype (None = plain
fp32), whether training needs a GradScaler, and a one-line reason that train writes into its
report.json and model.json and predict into its report.json and every case's provenance.

The only hardware question asked is :func:`probe`: does this device compute bf16 natively?

- CUDA: compute capability 8.0 or newer (``torch.cuda.is_bf16_supported(including_emulation=False)``);
  V100 and T4 emulate bf16, and get fp16 (with a GradScaler in training) under ``auto``.
- CPU: AVX512-BF16 or AMX-BF16, as torch's own cpuinfo reports them. Elsewhere torch emulates bf16,
  several times slower than fp32 (measured 4-40x on an AVX2-only EPYC).

What ``auto`` then picks on a device with native bf16 is a measured decision per stage
(:data:`AUTO_WITH_NATIVE_BF16`, figures in bench/README.md "Precision"): predict may use bf16 only where
its labels agree with fp32 to a Dice of at least :data:`PREDICT_AGREEMENT_LIMIT` for every class.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Literal

import torch

from pipeline.errors import ConfigError

log = logging.getLogger("ctseg")

Stage = Literal["train", "predict"]
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PREDICT_AGREEMENT_LIMIT = 0.995  # per-class Dice of bf16 labels against fp32 labels that auto may accept

PREDICT_FP32_WHY = ("bf16 labels agreed with fp32 below the 0.995 per-class Dice that auto requires on a real-CT "
                    "model (sts_ct: 0.857 on one held-out CT; bench/README.md, Precision); bf16 and fp16 are opt-in "
                    "(predict.precision)")
# What ``auto`` picks, per (stage, device type), where the device computes bf16 natively, and why. Figures:
# bench/README.md "Precision" (AMD EPYC Zen 4 with AVX512-BF16, 2 cores, loaded machine).
AUTO_WITH_NATIVE_BF16: dict[tuple[str, str], tuple[str, str]] = {
    ("train", "cpu"): ("bf16", "measured 1.25x the steps/s of fp32 with the same validation Dice (demo, 400 steps: "
                               "0.912 bf16, 0.906 fp32) and 1.33x less CPU time per step for the spleen UNet at "
                               "96^3 (bench/README.md, Precision)"),
    ("train", "cuda"): ("bf16", "bf16 autocast, the standard mixed precision of GPUs with native bf16 (no "
                                "GradScaler needed)"),
    # predict stays fp32: bf16 labels failed the 0.995 per-class rule on a real-CT model (sts_ct GTV: pooled
    # Dice agreement 0.9969, but 0.857 on one of 4 held-out CTs) though they passed on the demo model (>= 0.9977)
    ("predict", "cpu"): ("fp32", PREDICT_FP32_WHY),
    ("predict", "cuda"): ("fp32", PREDICT_FP32_WHY),
}
# ... and where it does not (bf16 would be emulated)
AUTO_WITHOUT_NATIVE_BF16: dict[tuple[str, str], tuple[str, str]] = {
    ("train", "cpu"): ("fp32", "emulated bf16 is several times slower than fp32"),
    ("train", "cuda"): ("fp16", "fp16 autocast with a GradScaler, the mixed precision this GPU computes natively"),
    ("predict", "cpu"): ("fp32", "emulated bf16 is several times slower than fp32"),
    ("predict", "cuda"): ("fp32", PREDICT_FP32_WHY),
}


@dataclass(frozen=True)
class Capability:
    """The answer of :func:`probe` for one device."""

    native_bf16: bool
    detail: str  # what was found, e.g. "CPU AMD EPYC with AVX512-BF16"


@dataclass(frozen=True)
class Precision:
    """The resolved precision of one run: what was asked, what is used, and why."""

    requested: str
    name: str        # "fp32", "bf16" or "fp16"
    device_type: str  # "cpu" or "cuda"
    stage: str       # "train" or "predict"
    reason: str

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype; None for plain fp32 (no autocast at all)."""
        return DTYPES[self.name]

    @property
    def grad_scaler(self) -> bool:
        """True where training needs a GradScaler (fp16 on CUDA; bf16 has fp32's range; inference needs none)."""
        return self.stage == "train" and self.name == "fp16" and self.device_type == "cuda"

    def autocast(self):
        """A context manager running its block in this precision (a no-op for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def to_json(self) -> dict:
        return {"requested": self.requested, "used": self.name, "reason": self.reason}


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor(), else 'unknown CPU'."""
    import platform

    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _cpu_flag(name: str) -> bool:
    check = getattr(torch.cpu, name, None)  # torch's cpuinfo-based checks (private, present since torch 2.3)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


@functools.cache
def _probe_cached(device_type: str, index: int | None) -> Capability:
    if device_type == "cuda":
        with torch.cuda.device(index if index is not None else torch.cuda.current_device()):
            name = torch.cuda.get_device_name()
            major, minor = torch.cuda.get_device_capability()
            native = bool(torch.cuda.is_bf16_supported(including_emulation=False))
        return Capability(native, f"CUDA GPU {name} (compute capability {major}.{minor}) "
                                  f"{'computes' if native else 'lacks native'} bf16")
    if device_type != "cpu":
        return Capability(False, f"device type {device_type}: no native-bf16 probe")
    found = [label for attr, label in (("_is_avx512_bf16_supported", "AVX512-BF16"),
                                       ("_is_amx_tile_supported", "AMX")) if _cpu_flag(attr)]
    cpu = cpu_model_name()
    if found:
        return Capability(True, f"CPU {cpu} with {' and '.join(found)} (native bf16)")
    return Capability(False, f"CPU {cpu} without AVX512-BF16 or AMX (bf16 would be emulated)")


def probe(device: torch.device) -> Capability:
    """Whether ``device`` computes bf16 natively (cached per device). Tests replace this function."""
    return _probe_cached(device.type, device.index)


def resolve_precision(requested: str, device: torch.device, stage: Stage) -> Precision:
    """The precision ``stage`` runs in on ``device`` for the configured ``requested`` value (see module docstring)."""
    key = f"{stage}.precision"
    if requested not in ("auto", *DTYPES):
        raise ConfigError(f"{key} must be one of auto, fp32, bf16, fp16, got {requested!r}. Use auto unless you "
                          f"have measured otherwise.")
    device_type = device.type if device.type in ("cpu", "cuda") else "cpu"
    if requested == "fp32":
        return Precision(requested, "fp32", device_type, stage, f"{key}=fp32 (plain fp32, no autocast)")
    capability = probe(device)
    if requested == "auto":
        table = AUTO_WITH_NATIVE_BF16 if capability.native_bf16 else AUTO_WITHOUT_NATIVE_BF16
        name, why = table[(stage, device_type)]
        return Precision(requested, name, device_type, stage, f"auto: {capability.detail}; {name}: {why}")
    if requested == "fp16" and device_type == "cpu" and stage == "train":
        raise ConfigError("train.precision must be 'auto', 'fp32' or 'bf16' on the CPU, got 'fp16' (CPU fp16 "
                          "training is not supported). Use bf16 or auto.")
    reason = f"{key}={requested} as configured; {capability.detail}"
    if requested == "bf16" and not capability.native_bf16:
        log.warning("%s: bf16 requested on a device without native bf16 (%s); expect it to be slower than fp32",
                    stage, capability.detail)
        reason += " (emulated: slower than fp32)"
    if requested == "fp16" and device_type == "cpu":
        reason += " (fp16 on the CPU is emulated: slower than fp32)"
    return Precision(requested, requested, device_type, stage, reason)
