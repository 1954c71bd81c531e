"""Ctrl-C during a sweep is never lost.

Python raises `KeyboardInterrupt` in whatever Python code runs when the signal arrives; if that is a finalizer (the
CPU memory tracker releases each tensor's bytes in a `weakref.finalize` callback, thousands per call), Python prints
"Exception ignored" and the sweep goes on. While `remember_interrupts()` is active, Ctrl-C still raises at once, and
is also remembered, so that `raise_if_interrupted()` (called by the sweep after every token count) raises it again.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_pending = threading.Event()


def _on_interrupt(signum, frame) -> None:
    _pending.set()
    raise KeyboardInterrupt


@contextlib.contextmanager
def remember_interrupts() -> Iterator[None]:
    """Within the block, Ctrl-C raises `KeyboardInterrupt` and is remembered for `raise_if_interrupted()`. Does
    nothing outside the main thread or where a program installed its own SIGINT handler."""
    _pending.clear()
    installed = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )
    if installed:
        signal.signal(signal.SIGINT, _on_interrupt)
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        _pending.clear()


def raise_if_interrupted() -> None:
    """Raises `KeyboardInterrupt` if Ctrl-C came since `remember_interrupts()` began (even if it was swallowed)."""
    if _pending.is_set():
        _pending.clear()
        raise KeyboardInterrupt
