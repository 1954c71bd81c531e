"""Whether a profile was measured with the software now running: the versions a profile records, and how they
differ from the running ones (a "stale" profile).

torch, transformers and the GPU driver change the kernels behind every backend, so their versions can move the
crossovers; a profile records them and a difference is reported. On CPU so do glibc's allocator settings
(`autoexperts.allocator`). What a profile does not record (older or hand-made profiles) is not held against it.
"""

from __future__ import annotations

import platform

import numpy as np
import torch
import transformers

from . import settings
from .allocator import allocator_settings, regime
from .device import gpu_driver_version
from .errors import StaleProfileWarning, warn_once

# The versions compared for staleness, as recorded under the profile's "versions".
STALENESS_LIBRARIES = ("torch", "transformers")


def library_versions() -> dict[str, str]:
    """The versions a new profile records."""
    import sklearn  # not at module import: the callers (calibration, bench) fit a cost model, which imports it anyway

    from . import __version__  # the package sets it after importing this module

    return {
        "autoexperts": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def stale_reasons(record: dict) -> list[str]:
    """How the versions a profile's JSON record lists differ from the running ones (empty when none differ).

    Args:
        record (`dict`): a profile's JSON record (`versions`, `device.type`, `device.gpu_driver`).

    Returns:
        `list[str]`: one phrase per difference, such as `"torch 2.11.0 (running 2.14.1)"`.
    """
    recorded = record.get("versions") or {}
    running = {"torch": torch.__version__, "transformers": transformers.__version__}
    reasons = [
        f"{name} {recorded[name]} (running {running[name]})"
        for name in STALENESS_LIBRARIES
        if recorded.get(name) and str(recorded[name]) != running[name]
    ]
    device = record.get("device") or {}
    recorded_driver = device.get("gpu_driver")
    running_driver = gpu_driver_version(device.get("type", ""))
    if recorded_driver and running_driver and str(recorded_driver) != running_driver:
        reasons.append(f"GPU driver {recorded_driver} (running {running_driver})")
    recorded_allocator = device.get("allocator_settings")
    if device.get("type") == "cpu" and isinstance(recorded_allocator, dict):
        recorded, running = regime(recorded_allocator), regime(allocator_settings())
        if recorded != running:
            reasons.append(f"allocator settings {recorded} (running {running})")
    return reasons


def admit_stale(what: str, json_path, stale: list[str], policy: str, command: str) -> bool:
    """Whether a file measured with other software (`stale`: its `stale_reasons`, empty when it is fresh) may be
    used under `policy` (`settings.STALE_USE` or `settings.STALE_FALLBACK`). A stale one gets one
    `StaleProfileWarning` saying so, whether it is used or skipped, with the command that recalibrates it.

    Args:
        what (`str`): what the file is, in words (`"profile"`, `"device model"`).
        command (`str`): the command that measures it again here.
    """
    if not stale:
        return True
    skipping = policy == settings.STALE_FALLBACK
    verdict = (
        f"skipping it ({settings.STALE_PROFILES_ENV}={settings.STALE_FALLBACK})"
        if skipping
        else f"using it anyway ({settings.STALE_PROFILES_ENV}={settings.STALE_USE}; set it to "
        f"{settings.STALE_FALLBACK} to skip stale files)"
    )
    warn_once(
        StaleProfileWarning,
        str(json_path),
        f"autoexperts: {what} {json_path} is stale: measured with {', '.join(stale)}; {verdict}. "
        f"Recalibrate with: {command}",
    )
    return not skipping
