"""What a profile needs to know about a device: its name, its free memory, and a slug for folder names."""

from __future__ import annotations

import functools
import os
import platform
import re

import torch


@functools.cache
def cpu_model_name() -> str:
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
        return cpu_model_name()
    return device.type


def local_device_names() -> dict[str, str]:
    """This machine's devices as profiles name them, each with its type: the CPU, then every CUDA device."""
    names = {cpu_model_name(): "cpu"}
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            names.setdefault(torch.cuda.get_device_name(index), "cuda")
    return names


def device_slug(name: str) -> str:
    """A folder-safe form of a device name: `"NVIDIA H100 80GB HBM3"` -> `"nvidia-h100-80gb-hbm3"`."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def driver_version(device: torch.device) -> str | None:
    """The CUDA (or HIP) runtime torch was built with, for the profile's staleness checks."""
    if device.type == "cuda":
        return torch.version.hip or torch.version.cuda
    return None


def gpu_driver_version(device_type: str) -> str | None:
    """The NVIDIA kernel driver's version (`"550.54.15"`) for CUDA devices on Linux, else `None`.

    Read from `/proc/driver/nvidia/version`, so no NVML binding is needed; a driver update can move the crossovers.
    """
    if device_type != "cuda":
        return None
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as version_file:
            match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]*)", version_file.readline())
    except OSError:
        return None
    return match.group(1) if match else None


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
