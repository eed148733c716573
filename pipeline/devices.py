"""Which CUDA device a process uses and what it may rely on there: rank-to-GPU mapping, binding, free memory, kernels.

One place for the CUDA facts that training and prediction share (the autocast dtype is decided
elsewhere, by the precision module):

- :func:`cuda_device_for_rank`: the GPU of torchrun's local rank. Training refuses more ranks than
  GPUs (NCCL stops at the first collective with "Duplicate GPU detected"); prediction may share one.
- :func:`threads_per_process`: CPU threads per torchrun process (torchrun itself sets one).
- :func:`bind`: ``torch.cuda.set_device`` for the calling thread (the current device is per
  thread, so a model-loading thread binds again).
- :func:`cuda_free_bytes`: what the caching allocator can still hand out. ``cudaMemGetInfo``
  counts PyTorch's cached-but-free blocks as used, so a budget from it alone shrinks after every
  large case; the allocator releases those blocks and retries before it reports out of memory.
- :func:`configure_cuda_kernels`: ``cudnn.benchmark`` (patch sizes are fixed, so the autotuner's
  first-call cost is paid once) outside deterministic mode.
- :data:`CUBLAS_DETERMINISTIC` / :func:`request_deterministic_cublas`: cuBLAS reads
  ``CUBLAS_WORKSPACE_CONFIG`` when it first creates a handle, so the variable must be in the
  environment before CUDA starts; the CLI sets it at process start when the config asks for
  deterministic training.
- :func:`ieee_fp32`: TF32 off for fp32 convolutions and matmuls inside a block (numerical checks).
"""
from __future__ import annotations

import contextlib
import logging
import os

import torch

from pipeline.errors import ConfigError
from pipeline.torchrun import torchrun_env, usable_cores  # noqa: F401 (re-exported from devices)

log = logging.getLogger("ctseg")

CUBLAS_DETERMINISTIC = ":4096:8"  # one of the two values torch's reproducibility notes name


def cuda_device_for_rank(setting: str, exclusive: bool) -> torch.device:
    """The GPU of this process's local rank (call only when CUDA is available).

    ``exclusive``: one GPU per rank is required (DDP with NCCL); more ranks than GPUs is a ConfigError.
    Otherwise ranks beyond the GPU count share GPUs round-robin, with a warning.
    """
    _rank, _world, local_rank, local_world = torchrun_env()
    count = torch.cuda.device_count()
    if local_world > count:
        if exclusive:
            raise ConfigError(f"torchrun's processes per node (LOCAL_WORLD_SIZE) must be at most the number of GPUs "
                              f"for {setting}=cuda, got {local_world} processes for {count} GPU(s). Start torchrun "
                              f"with --nproc_per_node {count}, or set {setting}=cpu.")
        log.warning("%s: %d processes share %d GPU(s); each plans its memory from what is free when a case starts",
                    setting, local_world, count)
    return torch.device("cuda", local_rank % count)


def threads_per_process(requested, local_world: int) -> int | None:
    """torch CPU threads: ``requested``, else under torchrun the cores shared out per local process (None: leave
    torch's default). torchrun sets OMP_NUM_THREADS=1, which would leave rank 0's CPU work (validation stitching,
    checkpoints; in prediction resampling and writing) on one core while the other ranks wait for it."""
    if requested:
        return int(requested)
    if local_world <= 1:
        return None
    return max(1, usable_cores() // local_world)


def bind(device: torch.device) -> None:
    """Make ``device`` the calling thread's current CUDA device (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def cuda_free_bytes(device: torch.device) -> int:
    """Bytes this process can still allocate on ``device``: free on the GPU plus cached by PyTorch but unused."""
    free, _total = torch.cuda.mem_get_info(device)
    cached_unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + max(0, cached_unused))


def configure_cuda_kernels(deterministic: bool) -> None:
    """cuDNN autotuning for fixed patch sizes, except in deterministic mode (it picks algorithms by timing)."""
    torch.backends.cudnn.benchmark = not deterministic


def request_deterministic_cublas() -> None:
    """Put CUBLAS_WORKSPACE_CONFIG in the environment unless the user set it (before CUDA starts)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)


def cublas_is_deterministic() -> bool:
    return os.environ.get("CUBLAS_WORKSPACE_CONFIG") in (":4096:8", ":16:8")


@contextlib.contextmanager
def ieee_fp32():
    """Inside the block fp32 convolutions and matmuls on CUDA run in full fp32 (TF32 off); restored after."""
    conv = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    matmul = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if conv is None or matmul is None:  # torch before the fp32_precision API
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
        return
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cudnn.conv.fp32_precision = conv
        torch.backends.cuda.matmul.fp32_precision = matmul
