"""How much memory a device has free: the one reading used by training's memory estimate
(:mod:`lmforge.train.memory`) and by the native-transformer copy of a Hugging Face model (:mod:`lmforge.models.hf`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device``: CUDA's free memory; on the CPU Linux's MemAvailable (it counts the page
    cache the kernel would give back), else free physical pages. None when the system does not say."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type != "cpu":
            return None
        meminfo = Path("/proc/meminfo")
        if meminfo.is_file():
            for line in meminfo.read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError, RuntimeError):
        return None
