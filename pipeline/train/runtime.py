"""Where and how training runs: device, mixed precision, determinism and torchrun/DDP process groups."""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from pipeline import devices
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
    loader_workers: int = 0
    pin_memory: bool = False

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


def resolve_device(requested: str) -> torch.device:
    """The training device; under torchrun one GPU per local rank (more ranks than GPUs is refused)."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device must be 'cpu' or 'auto' on this machine, got 'cuda' but torch sees no CUDA "
                          "GPU. Install a CUDA build of torch or set train.device=auto.")
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        return devices.cuda_device_for_rank("train.device", exclusive=True)
    return torch.device("cpu")




def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) in a plain process."""
    return devices.torchrun_env()[:3]


def setup_runtime(options) -> Runtime:
    """Resolve device and precision; join the torchrun process group when launched by torchrun."""
    rank, world, _ = distributed_env()
    device = resolve_device(options.device)
    if device.type == "cuda" and options.deterministic:
        require_deterministic_cuda_start()  # before anything below starts CUDA
    precision = resolve_precision(options.precision, device, "train")
    local_world = devices.torchrun_env()[3]
    threads = devices.threads_per_process(options.threads, local_world)
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        devices.bind(device)
        devices.configure_cuda_kernels(options.deterministic)
    started = False
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # generous: rank 0 may spend long on checkpoints and its share of validation while the others wait
        torch.distributed.init_process_group(backend=backend,
                                             timeout=datetime.timedelta(minutes=options.ddp_timeout_minutes))
        started = True
    if world > 1:
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    channels_last = options.channels_last if options.channels_last is not None else channels_last_default(device)
    workers, pin = loader_settings(options.loader_workers, device, local_world)
    return Runtime(device=device, autocast_dtype=precision.dtype, use_grad_scaler=precision.grad_scaler,
                   channels_last=channels_last, rank=rank, world_size=world, started_process_group=started,
                   loader_workers=workers, pin_memory=pin, precision_reason=precision.reason)


def require_deterministic_cuda_start() -> None:
    """train.deterministic on CUDA needs CUBLAS_WORKSPACE_CONFIG before cuBLAS starts (see :mod:`pipeline.devices`)."""
    if devices.cublas_is_deterministic():
        return
    if torch.cuda.is_initialized():
        raise ConfigError(f"CUBLAS_WORKSPACE_CONFIG must be set before CUDA starts for train.deterministic=true on "
                          f"a GPU, got {os.environ.get('CUBLAS_WORKSPACE_CONFIG')!r} after CUDA was initialised. "
                          f"Use the ctseg command (it sets it at start), or export "
                          f"CUBLAS_WORKSPACE_CONFIG={devices.CUBLAS_DETERMINISTIC} first.")
    devices.request_deterministic_cublas()


def channels_last_default(device: torch.device) -> bool:
    """The layout measured or known to be faster on each device type, for ``train.channels_last: null``.

    CPU: channels-last (several times faster 3D convolutions, bench/README.md). CUDA: contiguous. The
    networks use InstanceNorm, whose CUDA kernel has no channels-last path and copies every activation
    to contiguous and back (pytorch/pytorch#59168 measured nnU-Net-like networks 24-47% slower); not yet
    measured here on a GPU (bench/gpu/gpu_smoke.py times both).
    """
    return device.type != "cuda"


def loader_settings(requested, device: torch.device, local_world: int) -> tuple[int, bool]:
    """(DataLoader workers, pin_memory): ``train.loader_workers``, else 0 on the CPU and a few on CUDA.

    On the CPU, workers compete with the training threads for the same cores. On CUDA the GPU would
    otherwise wait while the CPU crops and augments each batch; pinned batches make the
    ``non_blocking`` copies asynchronous.
    """
    cuda = device.type == "cuda"
    if requested is not None:
        return max(0, int(requested)), cuda and int(requested) > 0
    if not cuda:
        return 0, False
    return max(1, min(8, devices.usable_cores() // max(1, local_world) - 2)), True


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
    """Seed python, numpy and torch; in deterministic mode also force deterministic kernels.

    Exact on the CPU. On CUDA the NLL loss inside DiceCE (nll_loss2d forward), interpolate backward (deep
    supervision, ClassicUNet) and MaxPool3d backward have no deterministic kernel, so torch only warns
    (``warn_only``) and :class:`~pipeline.train.loop.FoldTrainer` logs each such warning once: strict mode
    would stop the default configuration (DiceCE) at its first step on every GPU.
    """
    if deterministic:
        from monai.utils import set_determinism

        set_determinism(seed=seed)
        devices.request_deterministic_cublas()  # no-op when set at process start (see require_deterministic_cuda_start)
        torch.use_deterministic_algorithms(True, warn_only=True)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state(device: torch.device | None = None) -> dict:
    """Python, numpy and torch RNG states as plain lists and tensors (loadable with weights_only=True).

    On CUDA only the training device's generator is saved: the other GPUs' generators are unused by this
    process, and a resume may see fewer GPUs.
    """
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {"python": [version, list(internal), gauss],
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    saved = state.get("cuda")
    if saved is None or device is None or device.type != "cuda":
        return
    if isinstance(saved, (list, tuple)):  # older checkpoints hold every visible GPU's generator
        index = device.index or 0
        if index >= len(saved):
            log.warning("train: the checkpoint holds no CUDA random state for %s; dropout masks after the resume "
                        "differ from an uninterrupted run", device)
            return
        saved = saved[index]
    torch.cuda.set_rng_state(saved, device)
