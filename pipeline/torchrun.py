"""torchrun's process environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) and usable cores, without torch.

Kept apart from :mod:`pipeline.devices` so that stages which never touch torch (ingest) can ask "am I rank 0?"
without paying torch's import (about 3 s on a loaded 2-core machine).
"""
from __future__ import annotations

import os


def torchrun_env() -> tuple[int, int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) as torchrun sets them; (0, 1, 0, 1) in a plain process."""
    def number(name: str, default: int) -> int:
        text = os.environ.get(name, "").strip()
        return int(text) if text.isdigit() else default
    return number("RANK", 0), number("WORLD_SIZE", 1), number("LOCAL_RANK", 0), number("LOCAL_WORLD_SIZE", 1)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a Slurm allocation), not the machine's."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def cores_per_process() -> int:
    """Threads this process's own array work may use: its usable cores, shared out among torchrun's local ranks
    (the share :func:`pipeline.devices.threads_per_process` gives torch), so parallel shards do not oversubscribe."""
    return max(1, usable_cores() // max(1, torchrun_env()[3]))
