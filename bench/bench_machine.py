"""What every benchmark records about the machine it ran on, including how busy it was."""
from __future__ import annotations

import os
import platform


def load_note(load_before: list[float], load_after: list[float]) -> str:
    """Say, from the 1-minute load averages, whether other work shared the CPU while timing."""
    cpus = os.cpu_count() or 1
    busiest = max(load_before[0], load_after[0])
    if load_before[0] > 0.75 * cpus:
        return (f"other work was running before this benchmark started (1-min load {load_before[0]:.2f} on {cpus} "
                f"CPUs): absolute seconds are inflated; the ratios come from same-run, interleaved measurements")
    return (f"machine otherwise idle when the benchmark started (1-min load {load_before[0]:.2f} on {cpus} CPUs; "
            f"the highest of before/after, {busiest:.2f}, includes the benchmark itself)")


def machine_info(load_before: list[float]) -> dict:
    load_after = list(os.getloadavg())
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in load_after],
            "load_note": load_note(list(load_before), load_after)}
    try:
        import torch

        info.update({"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                     "cuda": torch.cuda.is_available(),
                     "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None})
    except ImportError:
        pass
    return info
