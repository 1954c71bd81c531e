"""Error and warning types: bad input (the CLI prints its message on one line and exits with status 2), an
interrupted calibration, and the warnings about profiles that `auto` could not use as they are."""


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
