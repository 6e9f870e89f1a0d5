"""GPU samples for the monitor: torch.cuda memory of this process, utilisation via
nvidia-ml-py (`pynvml`) where it is installed. None on a machine without CUDA."""

from __future__ import annotations

import os

_nvml = None  # the pynvml module once initialised, False when unavailable


def sample() -> dict | None:
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    dev = torch.cuda.current_device()
    mb = 1 << 20
    total = torch.cuda.get_device_properties(dev).total_memory
    return {"device": dev, "rank": int(os.environ.get("RANK", "0")),
            "mem_used_mb": round(torch.cuda.memory_reserved(dev) / mb, 1),
            "mem_peak_mb": round(torch.cuda.max_memory_allocated(dev) / mb, 1),
            "mem_total_mb": round(total / mb, 1), "util_pct": _utilisation(dev)}


def _utilisation(dev: int) -> float | None:
    global _nvml
    if _nvml is None:
        try:
            import pynvml

            pynvml.nvmlInit()
            _nvml = pynvml
        except Exception:  # not installed, or no driver library: memory alone is still real
            _nvml = False
    if not _nvml:
        return None
    try:
        handle = _nvml.nvmlDeviceGetHandleByIndex(dev)
        return float(_nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except Exception:
        return None
