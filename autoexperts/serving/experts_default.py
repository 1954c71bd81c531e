"""`auto_by_default()`: inside the block, a model built without an explicit experts implementation gets `"auto"`.

Transformers resolves a model's experts implementation when the model is built (`PreTrainedModel.__init__`, for the
model and each sub-model) through `get_correct_experts_implementation(requested)`: `requested` is what the caller
named (`from_pretrained(..., experts_implementation=...)`, or the config's `experts_implementation`), or `None`, which
becomes `"grouped_mm"` there (5.17 to 5.25). The block wraps that method on `PreTrainedModel` so that `None` asks for
`"auto"` instead; an explicit request passes through unchanged, and so does the default of a model class that sets
its own (one that overrides the method, e.g. to default to `"eager"`).

The wrap is process-wide (Transformers' server may load models from several threads) and counted: overlapping
blocks share one wrap, which the last block to end removes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Iterator

from ..choices import AUTO
from ..errors import UsageError

logger = logging.getLogger(__name__)

HOOK = "get_correct_experts_implementation"

_lock = threading.Lock()
_depth = 0
_original = None
_owner = None  # PreTrainedModel, while wrapped


@contextlib.contextmanager
def auto_by_default() -> Iterator[None]:
    """Models built inside the block without an explicit experts implementation get `"auto"` (see the module
    docstring): for code that builds its models itself (a pipeline, a trainer, a test suite).

    Example:

    ```python
    with autoexperts.auto_by_default():
        generator = transformers.pipeline("text-generation", model="Qwen/Qwen3-30B-A3B")
    ```

    Raises:
        `UsageError`: when this Transformers has no `PreTrainedModel.get_correct_experts_implementation`.
    """
    _enter()
    try:
        yield
    finally:
        _exit()


def check_hook() -> None:
    """Raises `UsageError` unless this Transformers resolves the default experts implementation where
    `auto_by_default` hooks in."""
    import transformers
    from transformers import PreTrainedModel

    if not callable(vars(PreTrainedModel).get(HOOK)):
        raise UsageError(
            f"this Transformers ({transformers.__version__}) has no PreTrainedModel.{HOOK}, where autoexperts "
            "makes auto the default (known: 5.17 to 5.25)"
        )


def _enter() -> None:
    global _depth, _original, _owner
    from transformers import PreTrainedModel  # "auto" is registered: importing this package registered it

    with _lock:
        if _depth == 0:
            check_hook()
            _original = vars(PreTrainedModel)[HOOK]
            _owner = PreTrainedModel
            setattr(PreTrainedModel, HOOK, _defaulting_to_auto(_original))
            logger.debug("models built without an experts implementation now get %r", AUTO)
        _depth += 1


def _exit() -> None:
    # No import here: a block left open until the interpreter exits is closed while modules are torn down.
    global _depth, _original, _owner
    with _lock:
        _depth -= 1
        if _depth > 0:
            return
        if getattr(vars(_owner)[HOOK], "__wrapped__", None) is _original:
            setattr(_owner, HOOK, _original)
            logger.debug("models built without an experts implementation get Transformers' default again")
        else:  # something wrapped it over ours meanwhile: unwrapping would drop theirs
            logger.warning("PreTrainedModel.%s was replaced while auto was the default; left as it is", HOOK)
        _original = _owner = None


def _defaulting_to_auto(original):
    @functools.wraps(original)
    def get_correct_experts_implementation(self, requested_experts, *args, **kwargs):
        return original(self, AUTO if requested_experts is None else requested_experts, *args, **kwargs)

    return get_correct_experts_implementation
