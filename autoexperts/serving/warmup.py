"""The warm-up file of `autoexperts serve --tune-on FILE`, and running it through a loaded model under `tune`.

The file is JSON Lines, one request a line (blank lines are skipped):

- a JSON string: a prompt, sent as one user message through the model's chat template (what a client of
  `/v1/chat/completions` sends), or as plain text when the tokenizer has no chat template;
- an object with `"messages"` (a chat, a list of `{"role": ..., "content": ...}` as `/v1/chat/completions` takes it)
  or `"prompt"` (text, tokenized as it is, as `/v1/completions` takes it), and optionally `"max_tokens"` (how many
  new tokens to generate, default `DEFAULT_MAX_TOKENS`).

```
"Summarize the plot of Hamlet in two sentences."
{"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Why is the sky blue?"}]}
{"prompt": "def fibonacci(n):", "max_tokens": 64}
```

`read_warm_up` checks the whole file with the standard library only (the command reads it before it loads torch);
`run_warm_up` runs each request through `model.generate`, one at a time, inside `autoexperts.tune(model)`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from ..errors import UsageError

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16
_KEYS = ("messages", "prompt", "max_tokens")


@dataclasses.dataclass(frozen=True)
class WarmUpRequest:
    """One request of a warm-up file.

    Attributes:
        line (`int`): its line in the file.
        messages (`tuple[dict, ...]`, *optional*): the chat to send through the chat template.
        prompt (`str`, *optional*): the text to tokenize as it is. A bare string in the file sets both: the chat
            template is used when the tokenizer has one.
        max_tokens (`int`): how many new tokens to generate.
    """

    line: int
    messages: tuple[dict, ...] | None
    prompt: str | None
    max_tokens: int = DEFAULT_MAX_TOKENS


@dataclasses.dataclass(frozen=True)
class WarmUp:
    """What `--tune-on` asks for: the requests of `source`, and `tune`'s timing budget per token count."""

    source: Path
    requests: tuple[WarmUpRequest, ...]
    seconds_per_point: float | None = None


def read_warm_up(path: str | Path, seconds_per_point: float | None = None) -> WarmUp:
    """Reads and checks the warm-up file at `path` (see the module docstring).

    Raises:
        `UsageError`: on a missing or unreadable file, a malformed line, or a file without requests, naming the line.
    """
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{path}: {getattr(error, 'strerror', None) or error}") from None
    requests = tuple(
        _request(line, number, path) for number, line in enumerate(text.splitlines(), start=1) if line.strip()
    )
    if not requests:
        raise UsageError(f"{path}: no requests (one JSON string or object a line)")
    return WarmUp(path, requests, seconds_per_point)


def _request(line: str, number: int, path: Path) -> WarmUpRequest:
    where = f"{path}, line {number}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as error:
        raise UsageError(f"{where}: not JSON ({error.msg})") from None
    if isinstance(item, str):
        return WarmUpRequest(number, ({"role": "user", "content": item},), item)
    if not isinstance(item, dict):
        raise UsageError(f"{where}: expected a JSON string or object, got {type(item).__name__}")
    unknown = [key for key in item if key not in _KEYS]
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}: use {', '.join(_KEYS)}")
    if ("messages" in item) == ("prompt" in item):
        raise UsageError(f"{where}: give either 'messages' or 'prompt'")
    max_tokens = item.get("max_tokens", DEFAULT_MAX_TOKENS)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise UsageError(f"{where}: 'max_tokens' must be a positive integer, got {max_tokens!r}")
    if "prompt" in item:
        if not isinstance(item["prompt"], str) or not item["prompt"]:
            raise UsageError(f"{where}: 'prompt' must be a non-empty string")
        return WarmUpRequest(number, None, item["prompt"], max_tokens)
    messages = item["messages"]
    if not (
        isinstance(messages, list)
        and messages
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages)
    ):
        raise UsageError(f"{where}: 'messages' must be a non-empty list of objects with 'role' and 'content'")
    return WarmUpRequest(number, tuple(messages), None, max_tokens)


def run_warm_up(model, processor, warm_up: WarmUp):
    """Runs every request of `warm_up` through `model.generate` (its own generation config, one request at a time,
    as Transformers' server runs them without continuous batching) inside `autoexperts.tune(model)`, which then
    calibrates the model's experts layers on what ran.

    Args:
        model (`PreTrainedModel`): the model the server loaded.
        processor (`PreTrainedTokenizerBase` or `ProcessorMixin`): its tokenizer, or a processor holding one.
        warm_up (`WarmUp`): what `read_warm_up` read.

    Returns:
        `TuneReport`: what `tune` measured.
    """
    import torch

    from ..tuning import tune

    tokenizer = getattr(processor, "tokenizer", processor)
    with tune(model, seconds_per_point=warm_up.seconds_per_point) as report, torch.no_grad():
        for request in warm_up.requests:
            inputs = _encode(request, tokenizer, warm_up.source).to(model.device)
            model.generate(**inputs, max_new_tokens=request.max_tokens)
    return report


def _encode(request: WarmUpRequest, tokenizer, source: Path):
    """The request's `input_ids` and `attention_mask`, as a batch of one."""
    use_template = request.messages is not None and (request.prompt is None or tokenizer.chat_template is not None)
    if not use_template:
        return tokenizer(request.prompt, return_tensors="pt")
    if tokenizer.chat_template is None:
        raise UsageError(f"{source}, line {request.line}: the model's tokenizer has no chat template for 'messages'")
    return tokenizer.apply_chat_template(
        list(request.messages), add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
