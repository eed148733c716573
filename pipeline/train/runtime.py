"""Where and how training runs: device, mixed precision, determinism and torchrun/DDP process groups."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import ConfigError

log = logging.getLogger("ctseg")


@dataclass
class Runtime:
    """The resolved execution settings of one training process."""

    device: torch.device
    autocast_dtype: torch.dtype | None  # None = fp32
    use_grad_scaler: bool
    channels_last: bool
    rank: int = 0
    world_size: int = 1
    started_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def precision(self) -> str:
        names = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        return names[self.autocast_dtype]

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def memory_format(self, spatial_dims: int):
        if not self.channels_last:
            return torch.contiguous_format
        return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX), where bf16 autocast is faster than fp32.

    Elsewhere torch emulates bf16 and a training step gets several times slower (measured 4-40× on an
    AVX2-only EPYC), so ``precision: auto`` keeps fp32 there.
    """
    flags = ""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
    if not any(flag in flags for flag in ("avx512_bf16", "amx_bf16")):
        return False
    try:  # the instructions exist; check that this torch build runs a bf16 matmul at all
        a = torch.ones(8, 8, dtype=torch.bfloat16)
        return bool(torch.isfinite((a @ a).float()).all())
    except RuntimeError:
        return False


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device must be 'cpu' or 'auto' on this machine, got 'cuda' but torch sees no CUDA "
                          "GPU. Install a CUDA build of torch or set train.device=auto.")
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def resolve_precision(requested: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether a GradScaler is needed)."""
    if requested == "fp32":
        return None, False
    if device.type == "cuda":
        if requested == "fp16" or (requested == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.float16, True
        return torch.bfloat16, False
    if requested == "fp16":
        raise ConfigError("train.precision must be 'auto', 'fp32' or 'bf16' on the CPU, got 'fp16' (CPU fp16 "
                          "training is not supported). Use bf16 or auto.")
    if requested == "bf16":
        if not cpu_has_native_bf16():
            log.warning("train: bf16 requested on a CPU without native bf16; expect it to be slower than fp32")
        return torch.bfloat16, False
    return (torch.bfloat16 if cpu_has_native_bf16() else None), False


def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) in a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def setup_runtime(options) -> Runtime:
    """Resolve device and precision; join the torchrun process group when launched by torchrun."""
    rank, world, local_rank = distributed_env()
    device = resolve_device(options.device, local_rank)
    dtype, scaler = resolve_precision(options.precision, device)
    if options.threads:
        torch.set_num_threads(int(options.threads))
    started = False
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend=backend)
        started = True
    if world > 1:
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return Runtime(device=device, autocast_dtype=dtype, use_grad_scaler=scaler, channels_last=options.channels_last,
                   rank=rank, world_size=world, started_process_group=started)


def teardown_runtime(runtime: Runtime) -> None:
    if runtime.started_process_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def broadcast_object(runtime: Runtime, value):
    """Rank 0's ``value`` on every rank."""
    if not runtime.distributed:
        return value
    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        torch.distributed.barrier()


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed python, numpy and torch; in deterministic mode also force deterministic kernels."""
    if deterministic:
        from monai.utils import set_determinism

        set_determinism(seed=seed)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, numpy and torch RNG states as plain lists and tensors (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
