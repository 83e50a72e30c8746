"""Helpers shared by the benchmark scripts (imported as a sibling module)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def machine_name(device: torch.device | str) -> str:
    """The GPU's name, or the CPU model and core count: what every result must be labelled with."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return platform.processor() or "cpu"
