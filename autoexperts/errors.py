"""The error type for bad input: the CLI prints its message on one line and exits with status 2."""


class UsageError(ValueError):
    """Bad input from the user (an unknown model, a malformed option): its message is the whole explanation."""
