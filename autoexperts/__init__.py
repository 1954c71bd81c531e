"""autoexperts: `experts_implementation="auto"` for Hugging Face Transformers MoE models.

`import autoexperts` registers `"auto"` with Transformers; every experts call then runs the backend that this device's
calibrated profile predicts is fastest for that call's token count, within the memory budget.

The import itself loads neither torch nor Transformers, so that the `autoexperts` command (which Python imports this
package for first) answers `--help` and argument errors at once: `"auto"` joins Transformers' experts registry the
moment that registry is imported, or at once when it already is (see `autoexperts._registration`), and the public
names below whose modules need torch are imported on first use.
"""

import importlib
import logging
from typing import TYPE_CHECKING

from . import _registration
from . import settings as _settings
from ._registration import register
from .errors import (
    BackendFailedWarning,
    ProfileMissingWarning,
    ProfileRefitWarning,
    ProfileSkippedWarning,
    ProfileWarning,
    SettingWarning,
    StaleProfileWarning,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BACKENDS",
    "BackendFailedWarning",
    "Decision",
    "HookHandle",
    "LayerSpec",
    "Prediction",
    "ProfileMissingWarning",
    "ProfileRefitWarning",
    "ProfileSkippedWarning",
    "ProfileWarning",
    "SettingWarning",
    "StaleProfileWarning",
    "__version__",
    "add_dispatch_hook",
    "auto_by_default",
    "auto_experts_forward",
    "pin_cpu_allocator",
    "record_decisions",
    "record_routing",
    "register",
    "reset",
    "set_memory_budget",
    "tune",
]

# The public names whose modules import torch, imported on first access (PEP 562 `__getattr__`). Registration does
# not wait for them: `_registration.install()` below sees to it.
_LAZY_MODULES = {
    "allocator": ("pin_cpu_allocator",),
    "capture": ("record_routing",),
    "decisions": ("Decision", "HookHandle", "add_dispatch_hook", "record_decisions"),
    "dispatch": ("auto_experts_forward", "reset", "set_memory_budget"),
    "layer": ("DEFAULT_BACKENDS", "LayerSpec"),
    "serving.experts_default": ("auto_by_default",),
    "table": ("Prediction",),
    "tuning": ("tune",),
}
_MODULE_OF = {name: module for module, names in _LAZY_MODULES.items() for name in names}

if TYPE_CHECKING:  # what static tools should see
    from .allocator import pin_cpu_allocator
    from .capture import record_routing
    from .decisions import Decision, HookHandle, add_dispatch_hook, record_decisions
    from .dispatch import auto_experts_forward, reset, set_memory_budget
    from .layer import DEFAULT_BACKENDS, LayerSpec
    from .serving.experts_default import auto_by_default
    from .table import Prediction
    from .tuning import tune


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups find it without this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULE_OF})


logging.getLogger(__name__).addHandler(logging.NullHandler())

if _settings.log_decisions_enabled():
    # AUTOEXPERTS_LOG=1: the user asked for every new decision on stderr.
    _printer = logging.StreamHandler()
    _printer.setFormatter(logging.Formatter("[autoexperts] %(message)s"))
    _dispatch_logger = logging.getLogger("autoexperts.dispatch")
    _dispatch_logger.addHandler(_printer)
    _dispatch_logger.setLevel(logging.DEBUG)
    # Printed here, once: a handler the application (or the CLI) put on the root logger would print each again.
    _dispatch_logger.propagate = False

_registration.install()
