"""Runs Transformers' `transformers serve` command in this process, with `AutoExpertsLoader` loading its models.

The arguments go unchanged to Transformers' own serve command (`transformers.cli.serve.Serve`, made a command line
with typer as `transformers serve` makes it), so its options, help and errors are Transformers'. Only `serve` is
built, not the rest of Transformers' command line (5.17's `chat` needs `requests`, which serving does not), nor its
check for a newer release (network). What it changes is undone on return: the loading class, and the exception hook
typer installs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
from collections.abc import Iterator, Sequence

from ..errors import UsageError
from .warmup import WarmUp

logger = logging.getLogger(__name__)

# What Transformers' server imports beyond Transformers itself (its `is_serve_available`, and typer for its command
# line); `pip install "autoexperts[serve]"` installs them.
SERVING_MODULES = ("fastapi", "uvicorn", "pydantic", "openai", "typer")


def check_extras() -> None:
    """Raises `UsageError` naming the serving packages missing here, before anything heavy is imported."""
    missing = [name for name in SERVING_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(
            f"serve needs Transformers' serving extras; missing here: {', '.join(missing)}. "
            "Install them: pip install 'autoexperts[serve]'"
        )


def run(transformers_args: Sequence[str], warm_up: WarmUp | None = None) -> int:
    """Runs `transformers serve TRANSFORMERS_ARGS...` here until it stops; its exit status.

    Raises:
        `UsageError`: when the serving extras are missing, or this Transformers' serve or model construction differ
            from what `AutoExpertsLoader` and `auto_by_default` hook into.
    """
    check_extras()
    if importlib.util.find_spec("transformers.cli.serve") is None:
        raise UsageError("this Transformers has no `transformers serve` command (transformers.cli.serve)")
    if warm_up is not None:
        from ..store import check_writable, default_write_dir

        check_writable(default_write_dir())  # where tune saves its profiles
    import typer
    from transformers.cli.serve import Serve

    from . import loaders
    from .experts_default import check_hook

    check_hook()
    loaders.check_layout()
    # One command: typer makes it the application itself, whose usage line reads `autoexperts serve [OPTIONS] ...`.
    app = typer.Typer(add_completion=False, context_settings={"help_option_names": ["-h", "--help"]})
    app.command()(Serve)
    with loaders.loader_in_place(warm_up), _excepthook_restored():
        try:
            app(list(transformers_args), prog_name="autoexperts serve")
        except SystemExit as exit_:
            return _status(exit_.code)
    return 0


def _status(code) -> int:
    """The exit status of `SystemExit(code)` (click exits with an int, or None for 0)."""
    if code is None or isinstance(code, int):
        return code or 0
    return 1


@contextlib.contextmanager
def _excepthook_restored() -> Iterator[None]:
    hook = sys.excepthook  # typer's app installs its own
    try:
        yield
    finally:
        sys.excepthook = hook
