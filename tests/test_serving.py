"""`autoexperts serve`'s parts: the warm-up file, running it under `tune`, and `auto` as the default experts
implementation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

import autoexperts
from autoexperts.errors import UsageError
from autoexperts.serving.experts_default import HOOK, auto_by_default
from autoexperts.serving.warmup import DEFAULT_MAX_TOKENS, WarmUp, WarmUpRequest, read_warm_up, run_warm_up
from tests.conftest import TINY_CONFIGS, tiny_model

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def _tiny_tokenizer():
    """A word-level tokenizer over the tiny models' 128 ids (`w0` ... and a few specials), with a chat template: what
    the server needs beside the weights, built here without any download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    words = ["user", "assistant", "system", ":"]
    words += [f"w{i}" for i in range(TINY_CONFIGS["qwen3_moe"]["vocab_size"] - len(specials) - len(words))]
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Qwen3-MoE checkpoint with its tokenizer, saved as a server loads it (no experts implementation named)."""
    folder = tmp_path_factory.mktemp("tiny-qwen3-moe-chat")
    tiny_model("qwen3_moe", "eager").save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    assert "experts_implementation" not in json.loads((folder / "config.json").read_text())
    return folder


# --- the warm-up file ------------------------------------------------------------------------------------------------


def test_warm_up_file_reads_each_kind_of_line(tmp_path):
    path = tmp_path / "warm.jsonl"
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "w1 w2"}]
    path.write_text(
        '"w1 w2 w3"\n\n'
        + json.dumps({"messages": chat, "max_tokens": 3})
        + "\n"
        + json.dumps({"prompt": "w4 w5"})
        + "\n  \n"
    )
    warm_up = read_warm_up(path, seconds_per_point=0.1)
    assert warm_up == WarmUp(
        path,
        (
            WarmUpRequest(1, ({"role": "user", "content": "w1 w2 w3"},), "w1 w2 w3"),
            WarmUpRequest(3, tuple(chat), None, 3),
            WarmUpRequest(4, None, "w4 w5", DEFAULT_MAX_TOKENS),
        ),
        0.1,
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('"ok"\n{"prompt": \n', "line 2: not JSON"),
        ("[1, 2]\n", "line 1: expected a JSON string or object, got list"),
        ('{"prompt": "x", "max_new_tokens": 3}\n', "line 1: unknown key(s) 'max_new_tokens': use messages, prompt"),
        ('{"prompt": "x", "messages": []}\n', "line 1: give either 'messages' or 'prompt'"),
        ('{"max_tokens": 3}\n', "line 1: give either 'messages' or 'prompt'"),
        ('{"prompt": "x", "max_tokens": 0}\n', "line 1: 'max_tokens' must be a positive integer, got 0"),
        ('{"prompt": "x", "max_tokens": true}\n', "line 1: 'max_tokens' must be a positive integer, got True"),
        ('{"prompt": ""}\n', "line 1: 'prompt' must be a non-empty string"),
        ('{"messages": [{"content": "x"}]}\n', "line 1: 'messages' must be a non-empty list of objects"),
        ("\n \n", "no requests"),
    ],
)
def test_a_bad_warm_up_file_is_refused_naming_the_line(tmp_path, text, message):
    path = tmp_path / "warm.jsonl"
    path.write_text(text)
    with pytest.raises(UsageError) as error:
        read_warm_up(path)
    assert str(error.value).startswith(f"{path}") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_run_warm_up_tunes_the_model_on_its_requests(model_dir, profile_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, experts_implementation="auto").eval()
    tokenizer = _tiny_tokenizer()
    warm_up = WarmUp(
        Path("warm.jsonl"),
        (
            WarmUpRequest(1, ({"role": "user", "content": "w1 w2 w3"},), "w1 w2 w3", 2),  # 11 tokens, templated
            WarmUpRequest(2, None, "w4 w5 w6", 2),  # 3 tokens, as they are
        ),
        seconds_per_point=0.005,
    )
    report = run_warm_up(model, tokenizer, warm_up)
    (layer,) = report.layers
    # Each request: a prefill, then one decode step (2 new tokens), through both layers.
    assert layer.calls_by_tokens == {len(["user", ":", "w1", "w2", "w3", "assistant", ":"]): 2, 3: 2, 1: 4}
    with autoexperts.record_decisions() as decisions, torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]))
    assert decisions and {d.profile for d in decisions} == {str(layer.profile)}


def test_messages_need_a_chat_template(model_dir, profile_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, experts_implementation="auto").eval()
    tokenizer = _tiny_tokenizer()
    tokenizer.chat_template = None
    chat = WarmUp(Path("warm.jsonl"), (WarmUpRequest(4, ({"role": "user", "content": "w1"},), None, 1),))
    with pytest.raises(UsageError, match=r"warm.jsonl, line 4: the model's tokenizer has no chat template"):
        run_warm_up(model, tokenizer, chat)
    # A bare string falls back to plain text.
    text = WarmUp(chat.source, (WarmUpRequest(1, ({"role": "user", "content": "w1"},), "w1", 1),), 0.005)
    assert run_warm_up(model, tokenizer, text).layers


# --- auto as the default -------------------------------------------------------------------------------------------


def test_auto_is_the_default_only_inside_the_block_and_an_explicit_choice_is_kept(model_dir, tmp_path):
    original = vars(PreTrainedModel)[HOOK]
    named = tmp_path / "named-eager"
    AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(named)
    config = json.loads((named / "config.json").read_text())
    (named / "config.json").write_text(json.dumps({**config, "experts_implementation": "eager"}))

    with auto_by_default():
        with auto_by_default():  # nested blocks share the wrap
            assert AutoModelForCausalLM.from_pretrained(model_dir).config._experts_implementation == "auto"
        assert AutoModelForCausalLM.from_pretrained(model_dir).config._experts_implementation == "auto"
        explicit = AutoModelForCausalLM.from_pretrained(model_dir, experts_implementation="batched_mm")
        assert explicit.config._experts_implementation == "batched_mm"
        assert AutoModelForCausalLM.from_pretrained(named).config._experts_implementation == "eager"
    assert vars(PreTrainedModel)[HOOK] is original
    assert AutoModelForCausalLM.from_pretrained(model_dir).config._experts_implementation == "grouped_mm"


def test_the_default_is_restored_when_the_block_raises(model_dir):
    original = vars(PreTrainedModel)[HOOK]
    with pytest.raises(RuntimeError, match="boom"), auto_by_default():
        raise RuntimeError("boom")
    assert vars(PreTrainedModel)[HOOK] is original
