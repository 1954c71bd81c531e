"""Transformers' serve model loader, subclassed: each model loads under `auto_by_default()` and, with a warm-up, is
tuned on it before it serves its first request.

The class that loads models (`load_model_and_processor(...) -> (model, processor)`) differs by version:

- 5.17 to 5.24: `ModelManager`, in the server's process; it is asked for every request and returns the cached model,
  so a model is tuned the first time it is returned (after an unload by `--model-timeout`, the reload is tuned again);
- 5.25: `ModelLoader`, which Transformers hands by pickling to a process it spawns for each model. `AutoExpertsLoader`
  is defined at module level, so that it travels by reference: that process imports this module (and `autoexperts`,
  which registers `"auto"`), and loads and tunes there.

`loader_in_place(warm_up)` puts `AutoExpertsLoader` in place of Transformers' class in
`transformers.cli.serving.model_manager`, where `transformers serve` looks it up when it starts, and puts the original
back on exit. Importing this module needs Transformers' serving extras.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Iterator

from transformers.cli.serving import model_manager

from ..errors import UsageError
from .experts_default import auto_by_default
from .warmup import WarmUp, run_warm_up

logger = logging.getLogger(__name__)

# The class each known layout loads models with, newest first.
_LOADING_CLASSES = ("ModelLoader", "ModelManager")


def _loading_class() -> type | None:
    for name in _LOADING_CLASSES:
        cls = getattr(model_manager, name, None)
        if isinstance(cls, type) and callable(getattr(cls, "load_model_and_processor", None)):
            return cls
    return None


_BASE = _loading_class()
if _BASE is None:
    _BASE = object  # check_layout() says why the command cannot run

_tuning_lock = threading.Lock()  # one tuning at a time, and no model returned while it is tuned
_tuned: weakref.WeakSet = weakref.WeakSet()  # the models of this process tuned already
_next_warm_up: WarmUp | None = None  # what the next AutoExpertsLoader made in this process gets


class AutoExpertsLoader(_BASE):
    """Transformers' model-loading class of this version (see the module docstring), loading every model under
    `auto_by_default()` and tuning it on the warm-up of `loader_in_place` once."""

    def __init__(self, *args, **kwargs):
        # Set first: 5.17's ModelManager loads the model of the command line in its own __init__.
        self.autoexperts_warm_up = _next_warm_up
        self.autoexperts_log_level = logging.getLogger("autoexperts").getEffectiveLevel()
        super().__init__(*args, **kwargs)

    def load_model_and_processor(self, *args, **kwargs):
        _log_like_the_command(self.autoexperts_log_level)
        with auto_by_default():
            model, processor = super().load_model_and_processor(*args, **kwargs)
        if self.autoexperts_warm_up is not None:
            _tune_once(model, processor, self.autoexperts_warm_up)
        return model, processor


def check_layout() -> None:
    """Raises `UsageError` unless this Transformers' serve loads models where `AutoExpertsLoader` can take over."""
    if _BASE is object:
        import transformers

        raise UsageError(
            f"this Transformers ({transformers.__version__}) serve has none of "
            f"{', '.join(f'model_manager.{name}' for name in _LOADING_CLASSES)} with load_model_and_processor, "
            "where autoexperts serve loads models (known: 5.17 to 5.25)"
        )


@contextlib.contextmanager
def loader_in_place(warm_up: WarmUp | None) -> Iterator[None]:
    """Inside the block, `transformers serve` loads its models with `AutoExpertsLoader`, tuning each on `warm_up`."""
    global _next_warm_up
    check_layout()
    name = _BASE.__name__
    _next_warm_up = warm_up
    setattr(model_manager, name, AutoExpertsLoader)
    try:
        yield
    finally:
        setattr(model_manager, name, _BASE)
        _next_warm_up = None


def _log_like_the_command(level: int) -> None:
    """In a process Transformers spawned for a model, where nothing set logging up, shows autoexperts' records from
    `level` (the command's, `-v`: INFO and decisions) as the command's process does."""
    package = logging.getLogger("autoexperts")
    configured = logging.getLogger().handlers or any(not isinstance(h, logging.NullHandler) for h in package.handlers)
    if level >= logging.WARNING or configured:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    package.addHandler(handler)
    package.setLevel(level)


def _tune_once(model, processor, warm_up: WarmUp) -> None:
    with _tuning_lock:
        if model in _tuned:
            return
        from ..layer import is_experts_module

        if not any(is_experts_module(module) for module in model.modules()):
            logger.warning("%s has no experts layer: not tuned", type(model).__name__)
        else:
            run_warm_up(model, processor, warm_up)  # tune logs what it measured (INFO)
        _tuned.add(model)
