"""`dgrun serve` end to end: a server on a free loopback port inside the test, driven by the openai client and httpx.

The server runs the numpy backend on a tiny fixture model with a few denoising steps; every answer is checked
against the Python API run in this process with the same seed (a second Model on the same file), so "the same
seed gives the same text" is checked alone, in streams, with n > 1 and among concurrent clients. Every request
loop here is bounded in count and time.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dgrun
from dgrun.chat import ThoughtChannel
from dgrun.server import GREEDY_SCALE, MAX_BODY_BYTES, SNIPPET, Server, Settings, create_app

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import fixtures  # noqa: E402

FAST = {"max_denoising_steps": 4}  # every generating request: a few steps, so the file runs in seconds
TIMEOUT = 60  # seconds any one request may take before the test fails (the machine may be loaded)
# A template in DiffusionGemma's shape: with thinking on, the generation prompt leaves the thought channel open
# (so the answer starts inside it); with it off, the channel is written empty and closed.
THOUGHT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|turn>{{ m['role'] }}\n{{ m['content'] }}<turn|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n<|channel>thought\n"
    "{% if not enable_thinking %}<channel|>{% endif %}{% endif %}")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tokenizer, chat template, a 256-token context and 16-token canvases."""
    from dgrun.converters.convert_hf import convert

    folder = tmp_path_factory.mktemp("server")
    hf = fixtures.make_model(fixtures.text_config(max_position_embeddings=256), seed=0, self_cond_std=0.01)
    fixtures.save_checkpoint(hf, folder / "hf", chat_template=fixtures.CHAT_TEMPLATE)
    convert(folder / "hf", folder / "tiny.dgf", "f32", quiet=True)
    return folder / "tiny.dgf"


@pytest.fixture(scope="module")
def ref(model_file):
    """The Python API on the same file: what every answer must equal."""
    with dgrun.load(model_file, backend="numpy") as model:
        yield model


@dataclass
class Running:
    url: str
    state: Any
    server: Server

    def client(self, key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, timeout=TIMEOUT, max_retries=0)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=TIMEOUT, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=TIMEOUT, **kwargs)


@contextmanager
def running(load, wait_loaded: bool = True, **settings: Any) -> Iterator[Running]:
    """The server in a thread on a free loopback port; stopped (and its model closed) on exit."""
    app = create_app(load, Settings(**settings))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = Server(app, grace=0.5)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    live = Running(f"http://127.0.0.1:{sock.getsockname()[1]}", app.state.dgrun, server)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not server.started or (wait_loaded and live.state.model is None):
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            assert live.state.load_error is None, live.state.load_error
            time.sleep(0.02)
        yield live
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)


@pytest.fixture(scope="module")
def srv(model_file):
    with running(lambda: dgrun.load(model_file, backend="numpy"), max_batch=4, max_queue=16,
                 max_body_bytes=1 << 16) as live:
        yield live


def visible(model, tokens: list[int]) -> str:
    eos = model.generation_config.eos_token_ids
    return model.detokenize(tokens[:-1] if tokens and tokens[-1] in eos else tokens)


def events(response: httpx.Response) -> list[tuple[str | None, str]]:
    """A server-sent-event stream as (event name, data) pairs."""
    out, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            out.append((name, line[6:]))
            name = None
    return out


def assert_error(response: httpx.Response, status: int, type_: str, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == type_, error
    if param is not None:
        assert error["param"] == param, error
    return error


# -- health, models, props -----------------------------------------------------------------------------------


def test_health_is_503_while_loading_then_ok(model_file):
    release = threading.Event()

    def slow_load():
        assert release.wait(TIMEOUT)
        return dgrun.load(model_file, backend="numpy")

    with running(slow_load, wait_loaded=False) as live:
        for path in ("/health", "/healthz", "/v1/health"):
            assert_error(live.get(path), 503, "unavailable_error")
        assert_error(live.post("/v1/completions", {"prompt": "x"}), 503, "unavailable_error")
        release.set()
        deadline = time.monotonic() + TIMEOUT
        while live.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for path in ("/health", "/healthz", "/v1/health"):
            assert live.get(path).json() == {"status": "ok"}


def test_models_and_props(srv, ref, model_file):
    models = srv.client().models.list().data
    assert [m.id for m in models] == [model_file.stem]
    card = srv.get(f"/v1/models/{model_file.stem}").json()
    assert card["context_length"] == ref.config.max_position_embeddings == 256
    assert card["canvas_length"] == ref.config.canvas_length == 16
    assert_error(srv.get("/v1/models/other"), 404, "not_found_error", "model")
    props = srv.get("/props").json()
    assert props["default_generation_settings"]["n_ctx"] == 256 and props["total_slots"] == 4
    assert props["model_path"] == model_file.name  # the file's name, never its directory
    assert props["chat_template"] == fixtures.CHAT_TEMPLATE


# -- chat and completions --------------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "def fibonacci(n):"}]


def test_chat_completion_is_the_engines_answer(srv, ref):
    answer = srv.client().chat.completions.create(model="anything", messages=MESSAGES, seed=3, max_tokens=24,
                                                  extra_body=FAST)
    expected = ref.chat(MESSAGES, seed=3, max_new_tokens=24, **FAST)
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == visible(ref, expected.tokens)
    assert choice.finish_reason == ("stop" if expected.tokens[-1] == 1 else "length")
    assert answer.object == "chat.completion" and answer.model == srv.state.model_id
    prompt = ref.apply_chat_template(MESSAGES, tokenize=True)
    assert answer.usage.prompt_tokens == len(prompt) and answer.usage.completion_tokens == len(expected.tokens)


def test_chat_stream_is_openais_chunks_and_joins_to_the_unstreamed_text(srv, ref):
    body = {"messages": MESSAGES, "seed": 4, "max_tokens": 40, "stream": True,
            "stream_options": {"include_usage": True}, **FAST}
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = events(response)
    assert frames[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in frames[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert all(c["usage"] is None for c in chunks[:-1])
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    unstreamed = srv.post("/v1/chat/completions", {**body, "stream": False}).json()
    assert streamed == unstreamed["choices"][0]["message"]["content"]
    assert streamed == visible(ref, ref.chat(MESSAGES, seed=4, max_new_tokens=40, **FAST).tokens)
    assert len([c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]) > 1  # per canvas


def test_the_openai_client_streams_too(srv, ref):
    stream = srv.client().completions.create(model="m", prompt="import os", seed=2, max_tokens=40, stream=True,
                                            extra_body=FAST)
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert text == visible(ref, ref.generate("import os", seed=2, max_new_tokens=40, **FAST).tokens)


def test_n_choices_are_seed_plus_i(srv, ref):
    answer = srv.client().chat.completions.create(model="m", messages=MESSAGES, seed=10, n=3, max_tokens=16,
                                                  extra_body=FAST)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    for i, choice in enumerate(answer.choices):
        assert choice.message.content == visible(ref, ref.chat(MESSAGES, seed=10 + i, max_new_tokens=16,
                                                               **FAST).tokens)


def test_completion_prompt_forms(srv, ref):
    ids = ref.tokenize("for i in range(10):")
    cases = [("for i in range(10):", ["for i in range(10):"]), (ids, [ids]),
             (["import os", "x = [1, 2, 3]"], ["import os", "x = [1, 2, 3]"]), ([ids, ids[:3]], [ids, ids[:3]])]
    for prompt, prompts in cases:
        answer = srv.post("/v1/completions", {"prompt": prompt, "seed": 7, "n": 2, "max_tokens": 16, **FAST}).json()
        texts = [c["text"] for c in sorted(answer["choices"], key=lambda c: c["index"])]
        expected = [visible(ref, ref.generate(p, seed=7 + i, max_new_tokens=16, **FAST).tokens)
                    for i, p in enumerate(p for p in prompts for _ in range(2))]
        assert texts == expected, prompt


def test_completion_with_a_suffix_is_an_infill(srv, ref):
    answer = srv.client().completions.create(model="m", prompt="def add(a, b):", suffix="return c", max_tokens=6,
                                            seed=1, extra_body=FAST)
    expected = ref.infill("def add(a, b):", "return c", fill_length=6, seed=1, **FAST)
    assert answer.choices[0].text == expected.text
    assert answer.choices[0].finish_reason == ("stop" if len(expected.tokens) < 6 else "length")


def test_temperature_scales_the_schedule_and_zero_is_greedy(srv, ref):
    defaults = ref.generation_config.resolved()
    for temperature, scale in ((0.5, 0.5), (0.0, GREEDY_SCALE), (1.0, 1.0)):
        answer = srv.post("/v1/completions", {"prompt": "hello", "seed": 5, "max_tokens": 16, "temperature":
                                              temperature, **FAST}).json()
        expected = ref.generate("hello", seed=5, max_new_tokens=16, t_min=defaults["t_min"] * scale,
                                t_max=defaults["t_max"] * scale, **FAST)
        assert answer["choices"][0]["text"] == visible(ref, expected.tokens), temperature


def test_stop_strings_end_the_text_before_them(srv, ref):
    full = visible(ref, ref.generate("import os", seed=2, max_new_tokens=48, **FAST).tokens)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    body = {"prompt": "import os", "seed": 2, "max_tokens": 48, "stop": [stop, "\x00never"], **FAST}
    answer = srv.post("/v1/completions", body).json()["choices"][0]
    assert answer["text"] == full[:full.index(stop)] and answer["finish_reason"] == "stop"
    with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True}, timeout=TIMEOUT) as r:
        chunks = [json.loads(d) for _, d in events(r)[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == answer["text"]


def test_reasoning_content_from_the_thought_channel(srv, ref):
    model = srv.state.model
    model.chat_template = ref.chat_template = THOUGHT_TEMPLATE
    try:
        user = [{"role": "user", "content": "hello"}]
        for thinking in (True, False):
            answer = srv.client().chat.completions.create(
                model="m", messages=user, seed=1, max_tokens=24,
                extra_body={**FAST, "chat_template_kwargs": {"enable_thinking": thinking}})
            ids = ref.apply_chat_template(user, tokenize=True, enable_thinking=thinking)
            text = visible(ref, ref.generate(ids, seed=1, max_new_tokens=24, **FAST).tokens).strip()
            message = answer.choices[0].message.model_dump()
            if thinking:  # the prompt opened the channel and this random model never closes it
                assert message["reasoning_content"] == text and message["content"] == ""
            else:
                assert message["content"] == text and "reasoning_content" not in message
    finally:
        model.chat_template = ref.chat_template = fixtures.CHAT_TEMPLATE


def test_the_thought_channel_splits_as_transformers_parses_it():
    """Gemma 4's response template in transformers is the parser of record; any split into pieces gives the same."""
    from transformers.cli.serving.utils import _RESPONSE_TEMPLATE_FALLBACKS
    from transformers.utils.chat_parsing import parse_response

    template = _RESPONSE_TEMPLATE_FALLBACKS[("gemma4",)]
    prompt = "<bos><|turn>user\nhi<turn|>\n<|turn>model\n"
    cases = [(prompt, "<|channel>thought\nLet me think.\n<channel|>\nThe answer is 4.\n"),
             (prompt + "<|channel>thought\n<channel|>", "  The answer is 4."),
             (prompt + "<|channel>thought\n", "hmm\nok <channel|>  Answer"),
             (prompt, "Plain answer, no < channel|> markers"), (prompt, "<|channel>thought\nunfinished  "),
             (prompt, "x<channel|>y"), ("", "no template prompt at all")]
    rng = random.Random(0)
    for prefix, answer in cases:
        parsed = parse_response(answer, template, prefix=prefix)
        for _ in range(20):
            cuts = sorted(rng.sample(range(len(answer) + 1), k=min(4, len(answer))))
            pieces = [answer[a:b] for a, b in zip([0, *cuts], [*cuts, len(answer)], strict=True)]
            channel, reasoning, content = ThoughtChannel(prefix), "", ""
            for k, piece in enumerate(pieces):
                r, c = channel.feed(piece, final=k == len(pieces) - 1)
                reasoning, content = reasoning + r, content + c
            assert (reasoning or None, content or None) == (parsed.get("reasoning_content"), parsed.get("content"))


# -- llama.cpp's endpoints and dgrun's own -------------------------------------------------------------------


def test_infill_in_llamacpps_shape(srv, ref):
    body = {"input_prefix": "def add(a, b):\n", "input_suffix": "return c", "prompt": "    ", "n_predict": 6,
            "input_extra": [{"filename": "util.py", "text": "import os"}], "seed": 3, "top_k": 40, "top_p": 0.9,
            "samplers": ["top_k"], "cache_prompt": True, "t_max_predict_ms": 60_000, **FAST}
    result = srv.post("/infill", body).json()
    prefix = SNIPPET + "import os" + "def add(a, b):\n" + "    "
    expected = ref.infill(prefix, "return c", fill_length=6, seed=3, **FAST)
    assert result["content"] == expected.text and result["stop"] is True
    assert result["stop_type"] == ("eos" if len(expected.tokens) < 6 else "limit") and result["truncated"] is False
    timings = result["timings"]
    assert timings["prompt_n"] == len(ref.tokenize(prefix)) == result["tokens_cached"]
    assert timings["predicted_n"] == len(expected.tokens) and timings["predicted_ms"] > 0
    several = srv.post("/infill", {**body, "n_cmpl": 2, "response_fields": ["content", "timings/prompt_n"]}).json()
    assert isinstance(several, list) and [set(r) for r in several] == [{"content", "timings/prompt_n"}] * 2
    assert several[1]["content"] == ref.infill(prefix, "return c", fill_length=6, seed=4, **FAST).text


def test_infill_warm_up_answers_at_once_and_a_long_suffix_is_cut(srv, ref):
    started = time.monotonic()
    warm = srv.post("/infill", {"input_prefix": "x", "input_suffix": "y", "n_predict": 0}).json()
    assert warm["content"] == "" and warm["stop"] is True and time.monotonic() - started < 5
    long_suffix = "return value\n" * 40  # far more than a 16-token canvas
    result = srv.post("/infill", {"input_prefix": "def f():\n", "input_suffix": long_suffix, "n_predict": 4,
                                  "seed": 0, **FAST}).json()
    assert result["truncated"] is True and result["tokens_predicted"] <= 4


def test_a_time_budget_commits_the_canvas_it_has(srv, ref):
    """t_max_predict_ms: the canvas commits its draft once the budget is spent, long before its steps run out."""
    before = srv.state.steps
    body = {"input_prefix": "def f(x):", "input_suffix": "", "n_predict": 8, "seed": 0, "t_max_predict_ms": 1,
            "max_denoising_steps": 100_000, "adaptive_stopping": False}
    result = srv.post("/infill", body).json()
    assert result["stop"] is True and result["tokens_predicted"] > 0
    assert srv.state.steps - before < 1000  # a budget of 1 ms: a step or a few, not 100,000


def test_a_time_limit_commits_after_the_step_that_spends_it(ref):
    request = ref.request("import os", seed=0, max_new_tokens=64, max_denoising_steps=50, adaptive_stopping=False)
    request.time_limit = 0.0
    with dgrun.Scheduler(ref) as scheduler:
        handle = scheduler.submit(request)
        out = handle.result(TIMEOUT)
    assert out.stats["decoder_passes"] == 1 and out.stats["canvases"] == 1 and len(out.tokens) > 0


def test_edit(srv, ref):
    answer = srv.post("/v1/edit", {"text": "x = [1, 2, 3]", "rewrite": [[5, 9]], "seed": 2, **FAST}).json()
    assert answer["object"] == "edit"
    assert answer["choices"][0]["text"] == ref.edit("x = [1, 2, 3]", [(5, 9)], seed=2, **FAST).text
    assert_error(srv.post("/v1/edit", {"text": "x = 1", "rewrite": [[3, 99]]}), 400, "invalid_request_error",
                 "rewrite")


def test_tokenize_and_detokenize(srv, ref):
    text = "def fibonacci(n):"
    assert srv.post("/tokenize", {"content": text}).json() == {"tokens": ref.tokenize(text, add_bos=False)}
    assert srv.post("/tokenize", {"content": text, "add_special": True}).json()["tokens"] == ref.tokenize(text)
    pieces = srv.post("/tokenize", {"content": text, "with_pieces": True}).json()["tokens"]
    assert "".join(p["piece"] for p in pieces).strip() == text and [p["id"] for p in pieces] == ref.tokenize(
        text, add_bos=False)
    assert srv.post("/detokenize", {"tokens": ref.tokenize(text, add_bos=False)}).json() == {"content": text}
    assert_error(srv.post("/detokenize", {"tokens": [10**6]}), 400, "invalid_request_error", "tokens")


def test_canvas_frames_show_every_step(srv, ref):
    body = {"prompt": "import os", "seed": 2, "max_tokens": 32, "stream": True, "canvas": True,
            "adaptive_stopping": False, **FAST}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=TIMEOUT) as response:
        frames = events(response)
    expected = ref.generate("import os", seed=2, max_new_tokens=32, adaptive_stopping=False, **FAST)
    canvases = [json.loads(d)["canvas"] for name, d in frames if name == "canvas"]
    assert [c["step"] for c in canvases] == [1, 2, 3, 4] * expected.stats["canvases"]
    assert [c["canvas"] for c in canvases] == [k // 4 for k in range(len(canvases))]
    assert all(len(c["tokens"]) == len(c["accepted"]) == 16 and c["text"] == ref.detokenize(c["tokens"])
               for c in canvases)
    text = "".join(json.loads(d)["choices"][0]["text"] for name, d in frames if name is None and d != "[DONE]")
    assert text == visible(ref, expected.tokens)
    # The openai client yields canvas frames as chunks with no choices; a loop over choices skips them.
    stream = srv.client().completions.create(model="m", prompt="import os", seed=2, max_tokens=32, stream=True,
                                            extra_body={**FAST, "canvas": True, "adaptive_stopping": False})
    assert "".join(c.text for chunk in stream for c in chunk.choices) == text


# -- under load -----------------------------------------------------------------------------------------------


def test_concurrent_clients_get_what_each_gets_alone(srv, ref):
    """Twelve clients at once (more than the batch of 4, so some wait): chat, completions, streams, infill."""
    jobs = [("chat", s) for s in (1, 2, 1)] + [("text", s) for s in (3, 4, 3, 5)] + [("stream", s) for s in (3, 6)] \
        + [("infill", s) for s in (1, 2, 1)]

    def call(job: tuple[str, int]) -> str:
        kind, seed = job
        client = srv.client()
        if kind == "chat":
            return client.chat.completions.create(model="m", messages=MESSAGES, seed=seed, max_tokens=32,
                                                  extra_body=FAST).choices[0].message.content
        if kind == "infill":
            return srv.post("/infill", {"input_prefix": "def add(a, b):", "input_suffix": "return c", "n_predict": 6,
                                        "seed": seed, **FAST}).json()["content"]
        stream = kind == "stream"
        answer = client.completions.create(model="m", prompt="import os", seed=seed, max_tokens=40, stream=stream,
                                          extra_body=FAST)
        return "".join(c.choices[0].text for c in answer if c.choices) if stream else answer.choices[0].text

    def alone(job: tuple[str, int]) -> str:
        kind, seed = job
        if kind == "chat":
            return visible(ref, ref.chat(MESSAGES, seed=seed, max_new_tokens=32, **FAST).tokens)
        if kind == "infill":
            return ref.infill("def add(a, b):", "return c", fill_length=6, seed=seed, **FAST).text
        return visible(ref, ref.generate("import os", seed=seed, max_new_tokens=40, **FAST).tokens)

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(call, jobs, timeout=TIMEOUT * 2))
    assert answers == [alone(job) for job in jobs]


def wait_until(condition, what: str, seconds: float = TIMEOUT) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_stops_its_work(srv, stream):
    """The work stops, not just the socket: no element left in the batch, and the step counter stands still."""
    body = {"prompt": "import os", "seed": 0, "max_tokens": 240, "max_denoising_steps": 100_000,
            "adaptive_stopping": False, "stream": stream, "canvas": stream}
    if stream:
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=TIMEOUT) as response:
            lines = response.iter_lines()  # kept: dropping it would close the connection here already
            assert next(lines) == "event: canvas"  # a step is out: it is running
            steps = srv.state.steps
            wait_until(lambda: srv.state.steps > steps + 2, "steps to run")
    else:  # no answer comes before the end: write the request on a socket, then hang up
        payload = json.dumps(body).encode()
        host, port = srv.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
            wait_until(lambda: srv.state.scheduler.running == 1, "the element to start")
            steps = srv.state.steps
            wait_until(lambda: srv.state.steps > steps + 2, "steps to run")
    wait_until(lambda: srv.state.scheduler.running == 0 and srv.state.scheduler.queued == 0, "the element to leave")
    steps = srv.state.steps
    time.sleep(0.3)
    assert srv.state.steps == steps


# -- LoRA adapters --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_file(model_file) -> Path:
    """A random PEFT adapter on the fixture's checkpoint, made as tests/test_lora.py makes them, converted."""
    from peft import LoraConfig, get_peft_model
    from test_lora import SPECS, randomize
    from transformers import DiffusionGemmaForBlockDiffusion

    from dgrun.converters.convert_lora import convert_lora

    hf = model_file.parent / "hf"
    model = get_peft_model(DiffusionGemmaForBlockDiffusion.from_pretrained(hf), LoraConfig(**SPECS["full"]))
    randomize(model, seed=0)
    model.save_pretrained(model_file.parent / "peft")
    convert_lora(model_file.parent / "peft", hf, model_file.parent / "adapter.dgf", "f32", quiet=True)
    return model_file.parent / "adapter.dgf"


def test_lora_adapters_in_llamacpps_shape(model_file, lora_file):
    """GET/POST /lora-adapters: scale 0 is the base model token for token, scale 1 the adapted one; left out is 0."""
    prompt = {"input_prefix": "def add(a, b):", "input_suffix": "return c", "n_predict": 8, "seed": 1,
              "return_tokens": True, **FAST}
    with dgrun.load(model_file, backend="numpy") as base:
        plain = base.infill("def add(a, b):", "return c", fill_length=8, seed=1, **FAST).tokens
    with dgrun.load(model_file, backend="numpy", lora=[lora_file]) as adapted:
        changed = adapted.infill("def add(a, b):", "return c", fill_length=8, seed=1, **FAST).tokens
    assert changed != plain  # the adapter matters on this prompt
    with running(lambda: dgrun.load(model_file, backend="numpy", lora=[lora_file])) as live:
        listed = live.get("/lora-adapters").json()
        assert [(a["id"], a["path"], a["scale"]) for a in listed] == [(0, lora_file.name, 1.0)]  # no directory
        assert live.post("/infill", prompt).json()["tokens"] == changed
        assert live.post("/lora-adapters", [{"id": 0, "scale": 0}]).json() == {"success": True}
        assert live.get("/lora-adapters").json()[0]["scale"] == 0.0
        assert live.post("/infill", prompt).json()["tokens"] == plain
        live.post("/lora-adapters", [{"id": 0, "scale": 1.0}])
        assert live.post("/infill", prompt).json()["tokens"] == changed
        live.post("/lora-adapters", [])  # llama.cpp's rule: an adapter left out gets 0
        assert live.post("/infill", prompt).json()["tokens"] == plain
        assert_error(live.post("/lora-adapters", [{"id": 1, "scale": 1}]), 400, "invalid_request_error", "id")
        assert_error(live.post("/lora-adapters", [{"id": 0, "scale": "x"}]), 400, "invalid_request_error")
        assert_error(live.post("/lora-adapters", {"id": 0, "scale": 1}), 400, "invalid_request_error")
    with running(lambda: dgrun.load(model_file, backend="numpy", lora=[lora_file], merge_lora=True)) as live:
        assert_error(live.post("/lora-adapters", [{"id": 0, "scale": 0.5}]), 400, "invalid_request_error")


def test_adapter_scales_change_between_decoder_passes(model_file, lora_file, monkeypatch):
    """A scale change waits for the pass in progress: no decoder pass ever runs while the adapter set changes."""
    import dgrun.scheduler as scheduler_module

    passing = threading.Event()
    real = scheduler_module.decode_step

    def decode_step(*args: Any) -> Any:
        passing.set()
        try:
            return real(*args)
        finally:
            passing.clear()

    monkeypatch.setattr(scheduler_module, "decode_step", decode_step)
    with dgrun.load(model_file, backend="numpy", lora=[lora_file]) as model, dgrun.Scheduler(model) as scheduler:
        handle = scheduler.submit(model.request("import os", seed=0, max_new_tokens=240, max_denoising_steps=100_000,
                                                adaptive_stopping=False))
        wait_until(passing.is_set, "a decoder pass")
        seen = []
        for k in range(10):
            scheduler.between_steps(lambda: seen.append(passing.is_set()))
            scheduler.set_lora_adapters([{"id": 0, "scale": k / 10}])
        assert seen == [False] * 10 and not handle.done
        assert model.lora_adapters()[0]["scale"] == 0.9
        with pytest.raises(ValueError, match="id"):
            scheduler.set_lora_adapters([{"id": 3, "scale": 1.0}])
    with pytest.raises(RuntimeError, match="closed"):
        scheduler.between_steps(lambda: None)


def test_serve_takes_the_clis_lora_flags(model_file, tmp_path):
    from dgrun.cli import UsageError
    from dgrun.server import _parser, main

    args = _parser().parse_args(["--lora", "a.dgf", "--lora-scaled", "b.dgf", "0.5", "--lora-merge"])
    assert args.lora == [("a.dgf", 1.0), ("b.dgf", 0.5)] and args.lora_merge
    with pytest.raises(UsageError, match="no LoRA adapter file at"):  # before the port is taken
        main(["-m", str(model_file), "--lora", str(tmp_path / "none.dgf")])
    with pytest.raises(UsageError, match="--lora-merge needs"):
        main(["-m", str(model_file), "--lora-merge"])


def test_a_server_without_adapters_lists_none(srv):
    assert srv.get("/lora-adapters").json() == []
    assert srv.post("/lora-adapters", []).json() == {"success": True}
    assert_error(srv.post("/lora-adapters", [{"id": 0, "scale": 1}]), 400, "invalid_request_error", "id")


# -- errors ---------------------------------------------------------------------------------------------------


def test_the_error_table(srv, ref):
    post = srv.post
    bad_json = httpx.post(srv.url + "/v1/chat/completions", content=b'{"messages": [', timeout=TIMEOUT,
                          headers={"content-type": "application/json"})
    assert_error(bad_json, 400, "invalid_request_error")
    not_json = httpx.post(srv.url + "/v1/completions", content=b'{"prompt": "x"}', timeout=TIMEOUT,
                          headers={"content-type": "text/plain"})  # what a cross-site form could send
    assert_error(not_json, 400, "invalid_request_error")
    assert_error(post("/v1/chat/completions", {"messages": "hi"}), 400, "invalid_request_error", "messages")
    assert_error(post("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}), 400,
                 "invalid_request_error", "messages[0].content")
    assert_error(post("/v1/completions", {"prompt": "x", "temperature": 3}), 400, "invalid_request_error",
                 "temperature")
    assert_error(post("/v1/completions", {"prompt": "x", "max_tokens": 0}), 400, "invalid_request_error",
                 "max_tokens")
    assert_error(post("/v1/completions", {"prompt": "x", "max_tokens": "5"}), 400, "invalid_request_error",
                 "max_tokens")
    assert_error(post("/v1/completions", {"prompt": "x", "n": 99}), 400, "invalid_request_error", "n")
    assert_error(post("/v1/completions", {"prompt": "x", "seed": -5}), 400, "invalid_request_error", "seed")
    assert_error(post("/v1/completions", {"prompt": "x", "t_min": 0.9, "t_max": 0.5}), 400, "invalid_request_error",
                 "t_max")
    assert_error(post("/v1/completions", {"prompt": [10**6]}), 400, "invalid_request_error", "prompt")
    assert_error(post("/v1/completions", {"prompt": "x", "stop": 5}), 400, "invalid_request_error", "stop")
    too_long = post("/v1/completions", {"prompt": "x = [1, 2, 3]\n" * 60, "max_tokens": 16})
    assert assert_error(too_long, 400, "invalid_request_error", "prompt")["code"] == "context_length_exceeded"
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    assert_error(post("/v1/chat/completions", {"messages": MESSAGES, "response_format": schema}), 400,
                 "not_supported_error", "response_format")
    assert_error(post("/v1/chat/completions", {"messages": MESSAGES, "tools": [{"type": "function"}]}), 501,
                 "not_supported_error", "tools")
    assert_error(post("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True}), 501, "not_supported_error")
    assert_error(post("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}), 501, "not_supported_error")
    assert_error(post("/v1/chat/completions", {"messages": [{"role": "tool?", "content": "x"}]}), 400,
                 "invalid_request_error", "messages")  # the template refuses the role
    assert_error(srv.get("/v1/nothing"), 404, "not_found_error")
    assert_error(srv.get("/v1/completions"), 405, "invalid_request_error")
    assert_error(post("/v1/completions", {"prompt": "x" * (1 << 16)}), 413, "invalid_request_error")
    chunked = httpx.post(srv.url + "/v1/completions", content=iter([b'{"prompt": "', b"x" * (1 << 16), b'"}']),
                         headers={"content-type": "application/json"}, timeout=TIMEOUT)
    assert_error(chunked, 413, "invalid_request_error")
    assert srv.get("/health").status_code == 200  # still serving
    assert srv.post("/v1/completions", {"prompt": "x", "max_tokens": 4, **FAST}).status_code == 200


def test_the_default_body_limit_is_4_mib():
    assert MAX_BODY_BYTES == Settings().max_body_bytes == 4 * 1024 * 1024


def test_a_full_queue_answers_503_with_retry_after(model_file):
    with running(lambda: dgrun.load(model_file, backend="numpy"), max_batch=1, max_queue=1) as live:
        long = {"prompt": "import os", "max_tokens": 240, "max_denoising_steps": 100_000, "adaptive_stopping": False}
        with ThreadPoolExecutor(2) as pool:
            pending = [pool.submit(live.post, "/v1/completions", long) for _ in range(2)]
            wait_until(lambda: live.state.scheduler.running == 1 and live.state.scheduler.queued == 1, "a full queue")
            refused = live.post("/v1/completions", {"prompt": "x", "max_tokens": 4})
            assert_error(refused, 503, "unavailable_error")
            assert int(refused.headers["retry-after"]) >= 1
            assert_error(live.post("/v1/completions", {"prompt": "x", "n": 3}), 400, "invalid_request_error", "n")
            live.server.should_exit = True  # shutting down cancels the two long ones: they answer 503
            assert [f.result(TIMEOUT).status_code for f in pending] == [503, 503]


def test_api_key(model_file):
    with running(lambda: dgrun.load(model_file, backend="numpy"), api_key="s3cret") as live:
        assert_error(live.get("/v1/models"), 401, "authentication_error")
        assert_error(live.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401, "authentication_error")
        assert live.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert live.get("/props", headers={"X-Api-Key": "s3cret"}).status_code == 200
        assert live.get("/health").status_code == 200  # public, for load balancers and editors' probes
        with pytest.raises(openai.AuthenticationError):
            live.client("wrong").models.list()
        assert live.client("s3cret").completions.create(model="m", prompt="x", max_tokens=4, extra_body=FAST).choices
        assert "access-control-allow-origin" not in live.get("/health", headers={"Origin": "http://x"}).headers


def test_a_model_without_tokenizer_answers_501(model_file):
    from dgrun.converters.convert_hf import convert

    bare = model_file.parent / "bare.dgf"
    convert(model_file.parent / "hf", bare, "f32", with_tokenizer=False, quiet=True)
    with running(lambda: dgrun.load(bare, backend="numpy")) as live:
        assert_error(live.post("/v1/completions", {"prompt": [2, 5, 6]}), 501, "not_supported_error")
        assert_error(live.post("/tokenize", {"content": "x"}), 501, "not_supported_error")
        assert live.get("/health").status_code == 200


def test_only_loopback_counts_as_private():
    from dgrun.server import _is_loopback

    assert all(_is_loopback(h) for h in ("127.0.0.1", "127.8.9.1", "::1", "localhost"))
    assert not any(_is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.2", "example.com"))


def test_cors_only_when_asked(model_file):
    with running(lambda: dgrun.load(model_file, backend="numpy"), cors_origins=["http://editor.local"]) as live:
        response = live.get("/health", headers={"Origin": "http://editor.local"})
        assert response.headers["access-control-allow-origin"] == "http://editor.local"


# A fuzz of request bodies: any JSON value in any known field (and unknown ones) gets an answer, never a 500.
_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats(allow_nan=False)
                     | st.text(max_size=20), lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
_SMALL = st.integers(-3, 6) | _JSON  # cost fields: valid values stay small so a fuzz run stays fast
_FIELDS = {
    "/v1/chat/completions": ["messages", "n", "seed", "stop", "temperature", "stream", "response_format", "tools",
                             "chat_template_kwargs", "logprobs", "top_p"],
    "/v1/completions": ["prompt", "suffix", "n", "seed", "stop", "temperature", "stream", "echo", "best_of"],
    "/infill": ["input_prefix", "input_suffix", "input_extra", "prompt", "n_cmpl", "response_fields",
                "t_max_predict_ms", "stream"],
    "/v1/edit": ["text", "rewrite", "prompt", "seed"],
    "/tokenize": ["content", "add_special", "with_pieces"],
    "/detokenize": ["tokens"],
}


@st.composite
def _bodies(draw: st.DrawFn) -> tuple[str, Any]:
    path = draw(st.sampled_from(sorted(_FIELDS)))
    if draw(st.integers(0, 9)) == 0:
        return path, draw(_JSON)  # not even an object
    body = {name: draw(_JSON) for name in draw(st.lists(st.sampled_from(_FIELDS[path]), max_size=4, unique=True))}
    for name in ("max_tokens", "n_predict", "max_denoising_steps"):
        body[name] = draw(_SMALL)
    if path == "/v1/chat/completions" and draw(st.booleans()):  # often a well-formed conversation
        body["messages"] = draw(st.lists(st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", 3]), "content": _JSON}), max_size=2))
    return path, body


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(request=_bodies())
def test_no_request_body_makes_a_500(srv, request):
    path, body = request
    response = httpx.post(srv.url + path, content=json.dumps(body), headers={"content-type": "application/json"},
                          timeout=TIMEOUT)
    assert response.status_code < 500, (path, body, response.text)
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


# -- the command --------------------------------------------------------------------------------------------


def serve(*args: object, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "dgrun", "serve", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def test_sigterm_cancels_in_flight_work_and_exits_0(model_file):
    process = serve("-m", model_file, "--port", 0, "--backend", "numpy")
    try:
        lines = [process.stderr.readline() for _ in range(1)]
        while not lines[-1].startswith("dgrun: listening on ") and len(lines) < 5:
            lines.append(process.stderr.readline())
        assert lines[-1].startswith("dgrun: listening on http://127.0.0.1:"), lines
        url = lines[-1].split()[-1]
        wait_until(lambda: httpx.get(url + "/health", timeout=TIMEOUT).status_code == 200, "the model to load")
        body = {"prompt": "import os", "max_tokens": 240, "max_denoising_steps": 100_000, "adaptive_stopping": False,
                "stream": True, "canvas": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT) as response:
            lines = response.iter_lines()
            assert next(lines) == "event: canvas"
            process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert json.loads(rest[-2][6:])["error"]["type"] == "unavailable_error" and rest[-1] == "data: [DONE]"
        assert process.wait(timeout=30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=5)
    finally:
        process.kill()
        process.wait()


def test_command_errors_are_one_line(model_file, tmp_path):
    missing = subprocess.run([sys.executable, "-m", "dgrun", "serve", "-m", tmp_path / "none.dgf"],
                             capture_output=True, text=True, timeout=TIMEOUT)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "dgrun: error:" in missing.stderr
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = subprocess.run([sys.executable, "-m", "dgrun", "serve", "-m", model_file, "--port",
                           str(taken.getsockname()[1])], capture_output=True, text=True, timeout=TIMEOUT)
    taken.close()
    assert busy.returncode == 2 and busy.stderr.startswith("dgrun: error: cannot listen on")
    no_extra = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['fastapi'] = None; from dgrun.cli import main; "
                               "sys.exit(main(['serve']))"], capture_output=True, text=True, timeout=TIMEOUT)
    assert no_extra.returncode == 2 and no_extra.stderr.count("\n") == 1
    assert "pip install 'dgrun[server]'" in no_extra.stderr
