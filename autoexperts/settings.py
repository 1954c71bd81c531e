"""Every `AUTOEXPERTS_*` environment variable, read in this one place.

| variable                    | meaning                                                                  |
|-----------------------------|--------------------------------------------------------------------------|
| `AUTOEXPERTS_PROFILE_DIR`   | folder that `calibrate` writes to and `auto` reads from (default: the    |
|                             | user cache folder, `~/.cache/autoexperts/profiles`)                      |
| `AUTOEXPERTS_MEMORY_BUDGET` | most transient memory one experts call may take: bytes (`8GiB`, `512MB`, |
|                             | `1e9`) or a fraction of the device's free memory (`0.5`); default `0.8`  |
| `AUTOEXPERTS_LOG`           | `1` prints each new dispatch decision once, on stderr                    |
| `AUTOEXPERTS_STALE_PROFILES`| `use` (default): a profile measured with another torch, transformers or  |
|                             | GPU driver is used, with a warning; `fallback`: it is skipped            |
"""

from __future__ import annotations

import os
import re
from pathlib import Path

PROFILE_DIR_ENV = "AUTOEXPERTS_PROFILE_DIR"
MEMORY_BUDGET_ENV = "AUTOEXPERTS_MEMORY_BUDGET"
LOG_ENV = "AUTOEXPERTS_LOG"
STALE_PROFILES_ENV = "AUTOEXPERTS_STALE_PROFILES"
STALE_POLICIES = ("use", "fallback")

DEFAULT_MEMORY_BUDGET = "0.8"

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_memory_budget(text: str | float | int) -> tuple[str, float]:
    """Parses a memory budget.

    Args:
        text (`str`, `float` or `int`):
            Bytes with an optional unit (`"8GiB"`, `"512MB"`, `"1e9"`, `2**30`) or, for a value in (0, 1], a fraction
            of the device's free memory (`"0.5"`).

    Returns:
        `tuple[str, float]`: `("fraction", value)` or `("bytes", value)`.

    Raises:
        `ValueError`: with a one-line message when the text is neither.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = _SIZE_PATTERN.match(str(text))
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(
                f"memory budget {text!r} is neither a size such as '8GiB' nor a fraction of free memory such as '0.5'"
            )
        value, unit = float(match.group(1)), match.group(2).lower()
    if value <= 0:
        raise ValueError(f"memory budget {text!r} must be positive")
    if unit == "" and value <= 1.0:
        return "fraction", value
    return "bytes", value * _UNITS[unit]


def memory_budget_setting() -> tuple[str, float]:
    """The memory budget named by `AUTOEXPERTS_MEMORY_BUDGET` (or the default, 0.8 of free memory).

    Raises:
        `ValueError`: naming the variable, when its value cannot be parsed.
    """
    try:
        return parse_memory_budget(os.environ.get(MEMORY_BUDGET_ENV, DEFAULT_MEMORY_BUDGET))
    except ValueError as error:
        raise ValueError(f"{MEMORY_BUDGET_ENV}: {error}") from None


def user_profile_dir() -> Path:
    """The folder `calibrate` writes to by default and `auto` reads first."""
    configured = os.environ.get(PROFILE_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "autoexperts" / "profiles"


def shipped_profile_dir() -> Path:
    """The profiles the project ships: inside the installed wheel, or the repository's `profiles/` folder."""
    package_dir = Path(__file__).resolve().parent
    installed = package_dir / "_shipped_profiles"
    return installed if installed.is_dir() else package_dir.parent / "profiles"


def log_decisions_enabled() -> bool:
    """Whether `AUTOEXPERTS_LOG` asks for every new decision to be printed."""
    return os.environ.get(LOG_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def stale_profiles_policy() -> str:
    """What `auto` does with a stale profile, per `AUTOEXPERTS_STALE_PROFILES`: `"use"` (default) or `"fallback"`.

    Raises:
        `ValueError`: naming the variable, when its value is neither.
    """
    value = os.environ.get(STALE_PROFILES_ENV, "").strip().lower() or STALE_POLICIES[0]
    if value not in STALE_POLICIES:
        raise ValueError(
            f"{STALE_PROFILES_ENV}: {os.environ[STALE_PROFILES_ENV]!r} is not one of {', '.join(STALE_POLICIES)}"
        )
    return value
