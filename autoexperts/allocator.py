"""glibc's allocator on CPU: the settings a calibration records, and fixing its thresholds in a running process.

PyTorch's CPU tensors come from glibc's `malloc`. By default glibc's thresholds move with what the process frees:
blocks above the mmap threshold get fresh pages on every call, and the heap's free top goes back to the kernel past
the trim threshold, to be faulted in again by the next call. Which experts calls pay for fresh pages then depends on
what ran before them (`calibrate/cpu_allocator_history.py`), so on CPU the backends' crossovers move from run to run
and no model of the shape can predict them. With both thresholds fixed high they stay put: the README's CPU notes.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import sys
from collections.abc import Mapping

logger = logging.getLogger(__name__)

# mallopt's parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# What `pin_cpu_allocator` sets by default: no tensor below 1 GiB gets its own mapping, and up to 2 GiB of freed heap
# (mallopt takes a C int) stays with the process.
PINNED_MMAP_THRESHOLD = 2**30
PINNED_TRIM_THRESHOLD = 2**31 - 1

# Settings count as pinned from these up: glibc's dynamic mmap threshold never rises above 32 MiB on 64-bit systems,
# and a trim threshold of 1 GiB never gives an experts call's heap back.
_DYNAMIC_MMAP_CEILING = 32 * 2**20
_PINNED_TRIM_FLOOR = 2**30
# mallopt takes a C int.
_MALLOPT_MAX = 2**31 - 1

# Allocators a process can be started with in glibc's place (`LD_PRELOAD`), and the prefixes of their settings.
_PRELOADED_ALLOCATORS = {"jemalloc": "MALLOC_CONF", "tcmalloc": "TCMALLOC_", "mimalloc": "MIMALLOC_"}

_pinned: dict[str, str] = {}


@functools.cache
def is_glibc() -> bool:
    """Whether this process's C library is glibc."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def preloaded_allocator(settings: Mapping[str, str]) -> str | None:
    """The allocator `settings`' `LD_PRELOAD` puts in glibc's place (`"jemalloc"`, ...), if any."""
    preload = settings.get("LD_PRELOAD", "")
    return next((name for name in _PRELOADED_ALLOCATORS if name in preload), None)


def uses_glibc_malloc() -> bool:
    """Whether this process's `malloc` is glibc's (whose thresholds this module reads and sets)."""
    return is_glibc() and preloaded_allocator(os.environ) is None


def allocator_settings() -> dict[str, str]:
    """The allocator settings of this process: glibc's (`MALLOC_*` and `GLIBC_TUNABLES` from its environment, and the
    thresholds `pin_cpu_allocator` set), or an allocator preloaded in its place (`LD_PRELOAD`) with its own
    variables. On CPU they move the crossovers, so a calibration records them."""
    preloaded = preloaded_allocator(os.environ)
    prefixes = ("MALLOC_", "GLIBC_TUNABLES") + ((_PRELOADED_ALLOCATORS[preloaded],) if preloaded else ())
    settings = {name: value for name, value in sorted(os.environ.items()) if name.startswith(prefixes)}
    if preloaded:
        settings["LD_PRELOAD"] = os.environ["LD_PRELOAD"]
    return {**settings, **_pinned}


def settings_text(settings: Mapping[str, str]) -> str:
    """`NAME=value, ...` of recorded settings, in their order."""
    return ", ".join(f"{name}={value}" for name, value in settings.items())


def _threshold(settings: Mapping[str, str], variable: str, tunable: str, mallopt: str) -> int | None:
    """One threshold as `settings` fix it (the pin over the tunable over the variable), `None` when left dynamic."""
    value = settings.get(variable)
    for part in settings.get("GLIBC_TUNABLES", "").split(":"):
        name, _, setting = part.partition("=")
        if name == f"glibc.malloc.{tunable}":
            value = setting
    value = settings.get(mallopt, value)
    try:
        return int(value, 0) if value is not None else None
    except ValueError:  # glibc ignores what it cannot parse
        return None


def regime(settings: Mapping[str, str]) -> str:
    """What recorded `settings` amount to, for telling whether crossovers measured under one set hold under
    another: `"glibc's defaults"`, `"pinned"` (no block below 32 MiB mapped afresh, no heap under 1 GiB given back:
    the environment variables of the README and `pin_cpu_allocator` alike), a preloaded allocator with its own
    settings (`"jemalloc (MALLOC_CONF=...)"`), or the settings themselves."""
    preloaded = preloaded_allocator(settings)
    if preloaded is not None:
        own = [
            f"{name}={value}"
            for name, value in sorted(settings.items())
            if name.startswith(_PRELOADED_ALLOCATORS[preloaded])
        ]
        return preloaded + (f" ({', '.join(own)})" if own else "")
    mmap = _threshold(settings, "MALLOC_MMAP_THRESHOLD_", "mmap_threshold", "mallopt_mmap_threshold")
    trim = _threshold(settings, "MALLOC_TRIM_THRESHOLD_", "trim_threshold", "mallopt_trim_threshold")
    if mmap is None and trim is None:
        return "glibc's defaults"
    if mmap is not None and trim is not None and mmap >= _DYNAMIC_MMAP_CEILING and trim >= _PINNED_TRIM_FLOOR:
        return "pinned"
    return settings_text(dict(sorted(settings.items())))


def pin_cpu_allocator(mmap_threshold: int = PINNED_MMAP_THRESHOLD, trim_threshold: int = PINNED_TRIM_THRESHOLD) -> bool:
    """Fixes glibc's mmap and trim thresholds in this process (`mallopt`), as `MALLOC_MMAP_THRESHOLD_` and
    `MALLOC_TRIM_THRESHOLD_` do when set before it starts: CPU experts calls then stop paying for fresh pages that
    depend on the process's history, and the crossovers a calibration measured under the same settings hold. The
    price: freed memory up to `trim_threshold` stays with the process.

    Calibrate under the same settings (`autoexperts calibrate --pin-allocator`, or the environment variables).

    Returns:
        `bool`: whether both were set (`False`, with a warning in the log, where `malloc` is not glibc's).

    Raises:
        `ValueError`: for a threshold that is negative or above what `mallopt` takes (2 GiB - 1).
    """
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if not 0 <= int(value) <= _MALLOPT_MAX:
            raise ValueError(f"pin_cpu_allocator: {name}={value} is outside 0..{_MALLOPT_MAX} (mallopt takes a C int)")
    if not uses_glibc_malloc():
        logger.warning(
            "pin_cpu_allocator: this process's malloc is not glibc's (another C library, or LD_PRELOAD); "
            "nothing changed"
        )
        return False
    libc = ctypes.CDLL(None)
    done = libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    done = libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1 and done
    if not done:
        logger.warning(
            "pin_cpu_allocator: glibc refused mmap_threshold=%d or trim_threshold=%d", mmap_threshold, trim_threshold
        )
        return False
    _pinned.update(mallopt_mmap_threshold=str(int(mmap_threshold)), mallopt_trim_threshold=str(int(trim_threshold)))
    logger.info("glibc's thresholds fixed: mmap %d B, trim %d B", mmap_threshold, trim_threshold)
    return True
