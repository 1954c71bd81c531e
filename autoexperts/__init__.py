"""autoexperts: `experts_implementation="auto"` for Hugging Face Transformers MoE models.

`import autoexperts` registers `"auto"` with Transformers; every experts call then runs the backend that this device's
calibrated profile predicts is fastest for that call's token count, within the memory budget.
"""

import logging

from . import settings as _settings
from .decisions import Decision, HookHandle, add_dispatch_hook, record_decisions
from .dispatch import ProfileMissingWarning, auto_experts_forward, register, reset, set_memory_budget
from .errors import (
    BackendFailedWarning,
    ProfileRefitWarning,
    ProfileSkippedWarning,
    ProfileWarning,
    SettingWarning,
    StaleProfileWarning,
)
from .layer import DEFAULT_BACKENDS, LayerSpec
from .table import Prediction

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
    "auto_experts_forward",
    "record_decisions",
    "register",
    "reset",
    "set_memory_budget",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())

if _settings.log_decisions_enabled():
    # AUTOEXPERTS_LOG=1: the user asked for every new decision on stderr.
    _printer = logging.StreamHandler()
    _printer.setFormatter(logging.Formatter("[autoexperts] %(message)s"))
    _dispatch_logger = logging.getLogger("autoexperts.dispatch")
    _dispatch_logger.addHandler(_printer)
    _dispatch_logger.setLevel(logging.DEBUG)

register()
