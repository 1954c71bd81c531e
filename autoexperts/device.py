"""What a profile needs to know about a device: its name, its free memory, and a slug for folder names."""

from __future__ import annotations

import functools
import os
import platform
import re

import torch


@functools.cache
def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    """A human-readable name of the device, as recorded in profiles (`"NVIDIA H100 80GB HBM3"`, a CPU model)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return _cpu_model_name()
    return device.type


def device_slug(name: str) -> str:
    """A folder-safe form of a device name: `"NVIDIA H100 80GB HBM3"` -> `"nvidia-h100-80gb-hbm3"`."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def driver_version(device: torch.device) -> str | None:
    """The CUDA (or HIP) runtime torch was built with, for the profile's staleness checks."""
    if device.type == "cuda":
        return torch.version.hip or torch.version.cuda
    return None


def free_memory_bytes(device: torch.device) -> int:
    """The memory the device has free now: the CUDA driver's view, or the host's available memory on CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work to finish (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
