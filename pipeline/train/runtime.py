"""Where and how training runs: device, mixed precision, determinism and torchrun/DDP process groups."""
from __future__ import annotations

import contextlib
import logging
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import ConfigError
from pipeline.precision import resolve_precision

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
    precision_reason: str = ""  # why this precision (pipeline.precision.resolve_precision)

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


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device must be 'cpu' or 'auto' on this machine, got 'cuda' but torch sees no CUDA "
                          "GPU. Install a CUDA build of torch or set train.device=auto.")
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) in a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def setup_runtime(options) -> Runtime:
    """Resolve device and precision; join the torchrun process group when launched by torchrun."""
    rank, world, local_rank = distributed_env()
    device = resolve_device(options.device, local_rank)
    precision = resolve_precision(options.precision, device, "train")
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
    return Runtime(device=device, autocast_dtype=precision.dtype, use_grad_scaler=precision.grad_scaler,
                   channels_last=options.channels_last, rank=rank, world_size=world, started_process_group=started,
                   precision_reason=precision.reason)


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
