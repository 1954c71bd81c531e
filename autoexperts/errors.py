"""Error and warning types: bad input (the CLI prints its message on one line and exits with status 2), an
interrupted calibration, and the warnings about profiles that `auto` could not use as they are; where such a warning
should point (`user_stacklevel`), and `warn_once`, which every warning the user can act on goes through."""

import logging
import os
import sys
import threading
import warnings
from collections.abc import Hashable

logger = logging.getLogger(__name__)

_warned_lock = threading.Lock()
_warned: set[tuple[str, Hashable]] = set()


class UsageError(ValueError):
    """Bad input from the user (an unknown model, a malformed option): its message is the whole explanation."""


class CalibrationInterrupted(KeyboardInterrupt):
    """Ctrl-C during `calibrate()`: the points measured so far are kept in `checkpoint` (if any was written)."""

    def __init__(self, checkpoint=None, points: int = 0):
        super().__init__(checkpoint)
        self.checkpoint = checkpoint
        self.points = points


class ProfileWarning(UserWarning):
    """Base class of the warnings about profiles; each names the file (or the layer) and the reason."""


class ProfileMissingWarning(ProfileWarning):
    """No calibrated profile matches a layer; `auto` uses the fallback rule until one is calibrated."""


class ProfileSkippedWarning(ProfileWarning):
    """A profile file was not used: unreadable, from a newer schema, for another layer or device than its name
    says, or stale under `AUTOEXPERTS_STALE_PROFILES=fallback`. `auto` goes on with the next profile or the
    fallback rule."""


class ProfileRefitWarning(ProfileWarning):
    """A profile's `.joblib` was missing, damaged, mismatched or written by another scikit-learn: its cost model
    was refit from the measurements in its `.json`, and the profile is used."""


class StaleProfileWarning(ProfileWarning):
    """A profile was measured with another torch, transformers or GPU driver version than the running ones."""


class BackendFailedWarning(RuntimeWarning):
    """The backend `auto` chose raised; another one ran in its place and the failing one is no longer chosen for
    that layer."""


class SettingWarning(UserWarning):
    """An `AUTOEXPERTS_*` environment variable has a value that cannot be used; the warning names the variable, the
    value and the default that applies instead."""


# Frames in these packages are not the user's: a warning raised under a model's forward points past them.
_LIBRARY_PACKAGES = ("autoexperts", "transformers", "torch", "accelerate")


def _library_folders() -> tuple[str, ...]:
    folders = []
    for name in _LIBRARY_PACKAGES:
        module = sys.modules.get(name)
        file = getattr(module, "__file__", None)
        if file:
            folders.append(os.path.dirname(file) + os.sep)
    return tuple(folders)


def user_stacklevel() -> int:
    """The `stacklevel` for a `warnings.warn` called by the caller of this function that points at the first frame
    outside autoexperts, Transformers, torch and accelerate: the user's line that ran the model (`model(...)`,
    `model.generate(...)`, a training step), wherever in the library the warning was raised. 1 (the warning's own
    line) when every frame is the library's."""
    folders = _library_folders()
    frame = sys._getframe(1)  # the function that calls warnings.warn: stacklevel 1
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(folders):
        frame = frame.f_back
        level += 1
    return level if frame is not None else 1


def warn_once(category: type[Warning], key: Hashable, message: str) -> None:
    """Warns with `message` once per process for `(category, key)`, pointing at the user's line, and logs it at
    INFO. A Python warning (shown by default, filterable) rather than a log record: the user can act on it."""
    with _warned_lock:
        if (category.__name__, key) in _warned:
            return
        _warned.add((category.__name__, key))
    warnings.warn(message, category, stacklevel=user_stacklevel())
    logger.info("%s", message)


def forget_warnings() -> None:
    """Lets every `warn_once` warning be given again (`autoexperts.reset()` calls it)."""
    with _warned_lock:
        _warned.clear()
