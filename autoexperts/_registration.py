"""How `import autoexperts` registers `"auto"` with Transformers without importing torch itself.

`"auto"` must be in Transformers' experts registries (`ExpertsInterface`, and the FP8 one) before any model looks a
backend up there, and `import autoexperts` is all a user writes for that. But the registries' modules import torch
and much of Transformers (seconds), which the `autoexperts` command's `--help` and argument errors do not need, and
Python runs the package's `__init__` before any of its modules, `autoexperts.cli` included. So `install()`:

- registers at once with each registry whose module is imported already;
- for the others, puts a finder first on `sys.meta_path` (a post-import hook, the mechanism `importlib` offers for
  this): the usual finders locate the module, and `"auto"` is registered right after the module has run, before the
  import that asked for it returns.

Either way, no code can reach a registry without `"auto"` in it. The experts forward lives in `autoexperts.dispatch`,
which the hook imports (when the registry is loaded while `autoexperts.dispatch` is being imported, `"auto"` is
registered once it has finished: the finder watches it too). This needs one rule of the package: no module that
`autoexperts.dispatch` imports may import the registry (or a Transformers model) at module level, since it could be
half-imported when the hook runs; `tests/test_imports.py` checks it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import logging
import sys
from collections.abc import Callable

from .choices import AUTO

logger = logging.getLogger(__name__)

EXPERTS_REGISTRY = "transformers.integrations.moe"
FP8_REGISTRY = "transformers.integrations.finegrained_fp8"
DISPATCH = "autoexperts.dispatch"


def install() -> None:
    """Registers `"auto"` with the registries imported already and arranges it for the others (idempotent)."""
    callbacks = {
        DISPATCH: _register_experts,
        EXPERTS_REGISTRY: _experts_registry_loaded,
        FP8_REGISTRY: _register_fp8,
    }
    pending = {name: callback for name, callback in callbacks.items() if name not in sys.modules}
    if pending and not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(pending))
    if EXPERTS_REGISTRY in sys.modules:
        _experts_registry_loaded()
    if FP8_REGISTRY in sys.modules:
        _register_fp8()


def register() -> None:
    """Registers `"auto"` with Transformers' experts registries now, importing them (idempotent). `import autoexperts`
    already arranges this; call it after something else replaced the registry's `"auto"` entry."""
    _register_experts()
    _register_fp8()


def _experts_registry_loaded() -> None:
    if DISPATCH in sys.modules:  # loaded, or its own import loaded the registry: registered once it has run
        if DISPATCH not in _pending():
            _register_experts()
        return
    importlib.import_module(DISPATCH)  # registers when it has run


def _register_experts() -> None:
    from transformers.integrations.moe import ExpertsInterface

    from .dispatch import auto_experts_forward

    ExpertsInterface.register(AUTO, auto_experts_forward)
    logger.debug("registered %r with Transformers' ExpertsInterface", AUTO)


def _register_fp8() -> None:
    from . import fp8

    fp8.register()


def _pending() -> set[str]:
    """The watched modules whose import has not finished yet."""
    return {name for finder in sys.meta_path if isinstance(finder, _AfterImport) for name in finder.callbacks}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a callback right after a watched module has been executed, once per module."""

    def __init__(self, callbacks: dict[str, Callable[[], None]]):
        self.callbacks = dict(callbacks)

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.callbacks:
            return None
        for finder in sys.meta_path:  # the finders that would have found it without this one
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _ThenCall(spec.loader, self, fullname)
        return spec

    def done(self, fullname: str) -> Callable[[], None] | None:
        """Stops watching `fullname` (and, with nothing left to watch, leaves `sys.meta_path`); its callback."""
        callback = self.callbacks.pop(fullname, None)
        if not self.callbacks:
            with contextlib.suppress(ValueError):  # another thread's import may have removed it
                sys.meta_path.remove(self)
        return callback


class _ThenCall(importlib.abc.Loader):
    """A module's own loader, followed by the finder's callback for it."""

    def __init__(self, loader, finder: _AfterImport, fullname: str):
        self.loader, self.finder, self.fullname = loader, finder, fullname

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self.loader  # the module then looks imported as usual
        callback = self.finder.done(self.fullname)
        if callback is not None:
            callback()

    def __getattr__(self, name):  # get_source, get_filename, get_resource_reader, ...
        if name == "loader":  # not set yet
            raise AttributeError(name)
        return getattr(self.loader, name)
