"""`autoexperts serve`: the warm-up file, `auto` as the default experts implementation, and Transformers' server run
with it over loopback HTTP on a tiny local model (a bounded number of requests; never a server left behind)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

import autoexperts
from autoexperts.errors import UsageError
from autoexperts.serving.experts_default import HOOK, auto_by_default
from autoexperts.serving.warmup import DEFAULT_MAX_TOKENS, WarmUp, WarmUpRequest, read_warm_up, run_warm_up
from tests.conftest import TINY_CONFIGS, cli_in_fresh_python, tiny_model

ROOT = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
SERVER_START_SECONDS = 180  # imports, the model's process and the load (and with --tune-on, a tiny sweep)
REQUEST_SECONDS = 60


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


def test_auto_by_default_is_public_and_a_block_left_open_at_exit_closes_quietly():
    assert autoexperts.auto_by_default is auto_by_default
    # A block entered and never left (a script that ends inside it) is closed while the interpreter tears modules down.
    code = (
        "import autoexperts, transformers\n"
        "block = autoexperts.auto_by_default()\n"
        "block.__enter__()\n"
        "print(transformers.PreTrainedModel.get_correct_experts_implementation.__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "get_correct_experts_implementation" in result.stdout
    assert "Exception ignored" not in result.stderr, result.stderr


def test_the_default_is_restored_when_the_block_raises(model_dir):
    original = vars(PreTrainedModel)[HOOK]
    with pytest.raises(RuntimeError, match="boom"), auto_by_default():
        raise RuntimeError("boom")
    assert vars(PreTrainedModel)[HOOK] is original


# --- the command's own arguments: one line, exit status 2, no torch ------------------------------------------------


def test_serve_help_says_what_it_does_without_torch():
    result = cli_in_fresh_python(["serve", "--help"])
    assert result["status"] == 0 and result["heavy"] == []
    assert "usage: autoexperts serve" in result["out"] and "--tune-on FILE" in result["out"]
    assert "goes to transformers serve unchanged" in " ".join(result["out"].split())


@pytest.mark.parametrize(
    ("args", "file_text", "message"),
    [
        (["--tune-on", "{missing}"], None, "autoexperts: error: --tune-on {missing}: no such file"),
        (["--tune-on", "{file}"], "[]\n", "autoexperts: error: --tune-on {file}, line 1: expected a JSON string"),
        (["--tune-seconds-per-point", "0.1", "MODEL"], None, "--tune-seconds-per-point applies to --tune-on"),
        (["--tune-on", "{file}", "--tune-seconds-per-point", "0"], '"x"\n', "'0' must be positive"),
        (["--tune-on"], None, "argument --tune-on: expected one argument"),
    ],
)
def test_our_argument_errors_are_one_line_with_status_2_and_no_torch(tmp_path, args, file_text, message):
    file, missing = tmp_path / "warm.jsonl", tmp_path / "missing.jsonl"
    if file_text is not None:
        file.write_text(file_text)
    args = [arg.format(file=file, missing=missing) for arg in args]
    result = cli_in_fresh_python(["serve", *args])
    assert result["status"] == 2 and result["heavy"] == []
    assert result["err"].count("\n") == 1 and message.format(file=file, missing=missing) in result["err"]


def test_missing_serving_extras_are_named_in_one_line_with_status_2():
    # A module set to None in sys.modules cannot be imported: as if fastapi and uvicorn were not installed.
    before = "sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None"
    result = cli_in_fresh_python(["serve", "some/model", "--port", "8000"], before=before)
    assert result["status"] == 2 and result["heavy"] == []
    assert result["err"] == (
        "autoexperts: error: serve needs Transformers' serving extras; missing here: fastapi, uvicorn. "
        "Install them: pip install 'autoexperts[serve]'\n"
    )


def test_a_malformed_memory_budget_is_refused_before_serving():
    result = cli_in_fresh_python(
        ["serve", "some/model"], before="import os; os.environ['AUTOEXPERTS_MEMORY_BUDGET'] = 'x'"
    )
    assert result["status"] == 2 and result["heavy"] == []
    assert result["err"].startswith("autoexperts: error: AUTOEXPERTS_MEMORY_BUDGET") and result["err"].count("\n") == 1


def test_other_commands_still_refuse_unknown_arguments():
    result = cli_in_fresh_python(["presets", "--port", "8000"])
    assert result["status"] == 2 and "unrecognized arguments: --port 8000" in result["err"]


# --- Transformers' server, over loopback HTTP ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _http(url: str, body: dict | None = None, timeout: float = REQUEST_SECONDS) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, json.loads(response.read() or b"{}")


@contextlib.contextmanager
def _server(args: list[str], log: Path, env: dict):
    """`autoexperts serve ARGS` on a free loopback port, its stderr in `log`: its base URL once /health answers.
    On exit, Ctrl-C (SIGINT), then whatever of its process group is left is killed."""
    port = _free_port()
    command = [sys.executable, "-m", "autoexperts", "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    with log.open("w") as stderr:
        server = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + SERVER_START_SECONDS
        while True:
            assert server.poll() is None, f"the server exited with {server.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no answer on {url} in {SERVER_START_SECONDS} s:\n{log.read_text()}"
            with contextlib.suppress(OSError):
                if _http(f"{url}/health", timeout=2)[0] == 200:
                    break
            time.sleep(0.5)
        yield url
        server.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn shuts down, the model's process exits with it
        server.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)  # the session started above: the server and its children
        server.wait(timeout=60)


def _chat(url: str, model: str | None, text: str, max_tokens: int = 4) -> dict:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}
    if model is not None:
        body["model"] = model
    status, answer = _http(f"{url}/v1/chat/completions", body)
    assert status == 200, answer
    assert answer["choices"][0]["message"]["content"].strip()
    assert 1 <= answer["usage"]["completion_tokens"] <= max_tokens
    return answer


def _decisions(log_text: str) -> list[str]:
    """The `[autoexperts] <layer> num_tokens=N -> backend [source] ...` lines AUTOEXPERTS_LOG=1 prints."""
    return [line for line in log_text.splitlines() if line.startswith("[autoexperts] Qwen3MoeExperts(")]


@pytest.fixture
def server_env(tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("openai")
    profiles = tmp_path / "profiles"
    return profiles, {
        **os.environ,
        "AUTOEXPERTS_LOG": "1",
        "AUTOEXPERTS_PROFILE_DIR": str(profiles),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }


@pytest.mark.slow
def test_served_model_runs_auto_by_default_tuned_on_the_warm_up(model_dir, server_env, tmp_path):
    """The model of the command line loads with auto (Transformers 5.25: in a process of its own), runs the warm-up
    by the fallback rule (no profile yet), is tuned before the server listens, then serves from tune's profile."""
    profiles, env = server_env
    warm = tmp_path / "warm.jsonl"
    warm.write_text('"w1 w2 w3 w4"\n{"prompt": "w5 w6 w7 w8 w9 w10", "max_tokens": 3}\n')
    log = tmp_path / "server.log"
    args = [str(model_dir), "--device", "cpu", "--tune-on", str(warm), "--tune-seconds-per-point", "0.01"]
    with _server(args, log, env) as url:
        warm_up_log = log.read_text()  # the server listens only once the model is loaded and tuned
        _chat(url, None, "w1 w2 w3")
        _chat(url, str(model_dir), "w4 w5 w6 w7 w8")  # naming the model, as OpenAI clients do
    text = log.read_text()
    assert text.startswith(warm_up_log) and "Traceback" not in text
    warm_up, served = _decisions(warm_up_log), _decisions(text[len(warm_up_log) :])
    assert warm_up and all(line.endswith("[fallback]") for line in warm_up), text  # auto, before any profile
    assert served and all(" [profile] " in line for line in served), text
    (profile,) = profiles.glob("*/*.json")
    assert json.loads(profile.read_text())["sweep"]["routing"]["source"] == "autoexperts.tune, in place"
