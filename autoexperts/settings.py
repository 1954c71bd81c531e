"""Every `AUTOEXPERTS_*` environment variable, read in this one place.

| variable                    | meaning                                                                  |
|-----------------------------|--------------------------------------------------------------------------|
| `AUTOEXPERTS_PROFILE_DIR`   | folder that `calibrate` writes to and `auto` reads from (default: the    |
|                             | user cache folder, `~/.cache/autoexperts/profiles`)                      |
| `AUTOEXPERTS_MEMORY_BUDGET` | most transient memory one experts call may take: a size (`8GiB`, `512MB`,|
|                             | or bare bytes from 1 MiB, `1e9`) or a fraction of the device's free      |
|                             | memory (`0.5`); default `0.8`; a bare number in (1, 1 MiB) is rejected   |
| `AUTOEXPERTS_LOG`           | `1` prints each new dispatch decision once, on stderr                    |
| `AUTOEXPERTS_STALE_PROFILES`| `use` (default): a profile or device model measured with another torch,  |
|                             | transformers, GPU driver or (CPU) allocator settings is used, with a     |
|                             | warning; `fallback`: it is skipped                                       |
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

from .errors import SettingWarning, user_stacklevel

PROFILE_DIR_ENV = "AUTOEXPERTS_PROFILE_DIR"
MEMORY_BUDGET_ENV = "AUTOEXPERTS_MEMORY_BUDGET"
LOG_ENV = "AUTOEXPERTS_LOG"
STALE_PROFILES_ENV = "AUTOEXPERTS_STALE_PROFILES"
# What `auto` does with a stale profile: use it (with a warning), or skip it for the next source.
STALE_USE, STALE_FALLBACK = "use", "fallback"
STALE_POLICIES = (STALE_USE, STALE_FALLBACK)

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


# Bare numbers from here up can only mean bytes; between 1 and this, a number is ambiguous (a typo of a fraction, or
# a size whose unit was left out: "1.5" for 1.5 GiB) and needs a unit.
_SMALLEST_BARE_BYTES = 2**20


def parse_memory_budget(text: str | float | int) -> tuple[str, float]:
    """Parses a memory budget.

    Args:
        text (`str`, `float` or `int`):
            A fraction of the device's free memory, a bare number in (0, 1] (`"0.5"`); or bytes, with a unit
            (`"8GiB"`, `"512MB"`, `"1.5GiB"`) or as a bare number of at least 1 MiB (`"1e9"`, `2**30`). A bare number
            between 1 and 1 MiB is ambiguous (`"1.5"`: a fraction mistyped, or 1.5 GiB without its unit) and rejected.

    Returns:
        `tuple[str, float]`: `("fraction", value)` or `("bytes", value)`.

    Raises:
        `ValueError`: with a one-line message when the text is none of those.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = _SIZE_PATTERN.match(str(text))
        if match is None or match.group(2).lower() not in _UNITS:
            negative = _SIZE_PATTERN.match(str(text).strip().removeprefix("-"))
            if str(text).strip().startswith("-") and negative is not None:
                raise ValueError(f"memory budget {text!r} must be positive")
            raise ValueError(
                f"memory budget {text!r} is neither a size such as '8GiB' nor a fraction of free memory such as '0.5'"
            )
        value, unit = float(match.group(1)), match.group(2).lower()
    if not value > 0 or value == float("inf"):
        raise ValueError(f"memory budget {text!r} must be a positive, finite amount")
    if unit == "" and value <= 1.0:
        return "fraction", value
    if unit == "" and value < _SMALLEST_BARE_BYTES:
        raise ValueError(
            f"memory budget {text!r} is ambiguous: a bare number is a fraction of free memory in (0, 1]; "
            f"for a size add a unit, e.g. '{text}GiB' or '{text}MB'"
        )
    return "bytes", value * _UNITS[unit]


def memory_budget_setting(strict: bool = False) -> tuple[str, float]:
    """The memory budget named by `AUTOEXPERTS_MEMORY_BUDGET` (unset or empty: the default, 0.8 of free memory).

    A malformed value is reported once per value with a `SettingWarning` naming the variable, when the first
    decision table is built (the first forward of an `auto` layer), and the default applies: a forward never fails
    over a setting. The CLI reads it with `strict=True` and exits with the message instead.

    Args:
        strict (`bool`): raise instead (the CLI's choice: it exits with the message).

    Raises:
        `ValueError`: naming the variable, when `strict` and its value cannot be parsed.
    """
    text = os.environ.get(MEMORY_BUDGET_ENV, "")
    if not text.strip():
        return parse_memory_budget(DEFAULT_MEMORY_BUDGET)
    try:
        return parse_memory_budget(text)
    except ValueError as error:
        message = f"{MEMORY_BUDGET_ENV}: {error}"
        if strict:
            raise ValueError(message) from None
        if text not in _reported_values:
            _reported_values.add(text)
            warnings.warn(
                f"{message}; using the default, {DEFAULT_MEMORY_BUDGET} of the free memory",
                SettingWarning,
                stacklevel=user_stacklevel(),
            )
        return parse_memory_budget(DEFAULT_MEMORY_BUDGET)


_reported_values: set[str] = set()


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
    value = os.environ.get(STALE_PROFILES_ENV, "").strip().lower() or STALE_USE
    if value not in STALE_POLICIES:
        raise ValueError(
            f"{STALE_PROFILES_ENV}: {os.environ[STALE_PROFILES_ENV]!r} is not one of {', '.join(STALE_POLICIES)}"
        )
    return value
