"""`dgrun serve`: an OpenAI- and llama.cpp-compatible HTTP server for editors, agents and apps.

    dgrun serve -m model.dgf --port 8080            # then point any OpenAI client at http://127.0.0.1:8080/v1

Endpoints: `GET /health` (`/healthz`, `/v1/health`), `GET /v1/models`, `POST /v1/chat/completions`,
`POST /v1/completions` (with `suffix`: infill), llama.cpp's `POST /infill`, `GET /props`, `POST /tokenize`,
`POST /detokenize`, `GET`/`POST /lora-adapters`, and dgrun's `POST /v1/edit`. Streaming answers are server-sent
events in OpenAI's chunk shapes (llama.cpp's on `/infill`); `"canvas": true` adds `event: canvas` frames, one per
denoising step.

How it runs: a request is parsed and validated on the event loop (FastAPI + pydantic), rendered and tokenized in a
worker thread, then becomes one Scheduler element per choice (`n`, `n_cmpl`; choice i uses seed + i). The Scheduler
owns the model and batches every element of every request in one loop on its own thread; a small thread per
element hands its events to the event loop, which only turns them into text and writes them out. A client that
goes away cancels its elements at the next step.

Errors are OpenAI's object, `{"error": {"message", "type", "param", "code"}}`; nothing a client sends makes a 500.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import anyio
import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request as HTTPRequest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dgrun._version import __version__
from dgrun.chat import ThoughtChannel
from dgrun.constrain import ConstraintError, response_format_args
from dgrun.engine import Model
from dgrun.generate import MAX_BATCH, Commit, Draft, Request
from dgrun.scheduler import Handle, Scheduler
from dgrun.tokenizer import NoTokenizerError
from dgrun.vision import chat_images

log = logging.getLogger("dgrun.server")

MAX_BODY_BYTES = 4 << 20  # a request body over this is refused with 413 before it is parsed
MAX_QUEUE = 64  # elements that may wait for a place in the batch; more → 503 with Retry-After
MAX_CHOICES = 16  # n / n_cmpl
MAX_STOPS = 16
SHUTDOWN_GRACE_S = 3.0  # on SIGTERM / Ctrl-C, in-flight requests get this long to finish before they are cancelled
GREEDY_SCALE = 1e-6  # temperature 0: the schedule at this fraction of the model's, where float32 softmax is one-hot
SNIPPET = "\n\n--- snippet ---\n\n"  # llama.cpp puts this before each input_extra chunk when a model has no FIM tokens
PUBLIC_PATHS = frozenset({"/health", "/healthz", "/v1/health"})  # answered without the API key (load balancers)

# Sampling fields clients send by default that mean nothing to the entropy-bound sampler: accepted and ignored.
IGNORED_FIELDS = frozenset({
    "top_p", "top_k", "min_p", "typical_p", "tfs_z", "top_n_sigma", "frequency_penalty", "presence_penalty",
    "repeat_penalty", "repetition_penalty", "repeat_last_n", "penalize_nl", "logit_bias", "mirostat", "mirostat_tau",
    "mirostat_eta", "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n",
    "dry_sequence_breakers", "xtc_probability", "xtc_threshold", "dynatemp_range", "dynatemp_exponent", "min_keep",
    "n_probs", "ignore_eos", "samplers", "cache_prompt", "id_slot", "n_indent", "n_keep", "n_discard",
    "t_max_prompt_ms", "return_progress",
    "timings_per_token", "user", "parallel_tool_calls", "service_tier", "store", "metadata", "reasoning_effort",
    "prediction", "safety_identifier", "prompt_cache_key", "verbosity", "web_search_options",
})

# Which request field a ValueError from the engine is about, by how its message starts.
_PARAM_OF_MESSAGE = {
    "max_new_tokens": "max_tokens", "fill_length": "max_tokens", "max_denoising_steps": "max_denoising_steps",
    "t_min": "t_min", "t_max": "t_max", "entropy_bound": "entropy_bound", "stability_threshold":
    "stability_threshold", "confidence_threshold": "confidence_threshold", "the suffix": "suffix", "span": "rewrite",
    "no span": "rewrite", "the text": "text", "json_schema": "response_format", "regex": "regex",
    "grammar": "grammar",
}


# -- errors --------------------------------------------------------------------------------------------------

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error",
               501: "not_supported_error", 503: "unavailable_error"}


class APIError(Exception):
    """An error answered as OpenAI's error object with this status (its `type` follows from the status)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        return _JSON(self.body(), status_code=self.status, headers=self.headers)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class _JSON(JSONResponse):
    """JSON that cannot fail to encode: text with a lone surrogate (valid JSON, invalid UTF-8) is \\u-escaped."""

    def render(self, content: Any) -> bytes:
        try:
            return _dumps(content).encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(content, separators=(",", ":")).encode("ascii")


def _sse(data: Any, event: str | None = None) -> str:
    try:
        text = _dumps(data)
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {text}\n\n"


# -- request bodies ------------------------------------------------------------------------------------------


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None
    return text


def _listify(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


Text = Annotated[str, AfterValidator(_unicode)]
Stops = Annotated[list[Text] | None, BeforeValidator(_listify), Field(max_length=MAX_STOPS)]
TokenIds = list[Annotated[int, Field(ge=0)]]
_BODY = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = _BODY
    include_usage: bool = False


class GenerationBody(BaseModel):
    """Fields every generating endpoint takes: OpenAI's, llama.cpp's, and dgrun's own sampler parameters."""

    model_config = _BODY
    model: str | None = Field(None, description="accepted whatever it names: this server runs one model")
    seed: int | None = Field(None, ge=-1, description="choice i uses seed + i; absent or -1: random")
    temperature: float | None = Field(None, ge=0, le=2, description="scales the t_min..t_max schedule; 0 is greedy")
    stop: Stops = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    canvas: bool = Field(False, description="streaming: add an `event: canvas` frame after every denoising step")
    max_denoising_steps: int | None = Field(None, ge=1, le=100_000)
    t_min: float | None = Field(None, ge=0)
    t_max: float | None = Field(None, ge=0)
    entropy_bound: float | None = Field(None, gt=0)
    stability_threshold: int | None = Field(None, ge=0, le=1000)
    confidence_threshold: float | None = Field(None, gt=0)
    adaptive_stopping: bool = True
    t_max_predict_ms: int | None = Field(None, ge=-1, description="time budget; when spent, the canvas commits")
    response_format: dict[str, Any] | None = Field(None, description="OpenAI's: text, json_object or json_schema")
    json_schema: dict[str, Any] | None = Field(None, description="llama.cpp's: the answer is JSON under this schema")
    regex: str | None = Field(None, description="the answer matches this regular expression")
    grammar: str | None = Field(None, description="the answer follows this Lark grammar (llguidance's dialect)")


class ContentPart(BaseModel):
    model_config = _BODY
    type: str
    text: Text | None = None
    image_url: dict[str, Any] | Text | None = None  # {"url": "data:image/...;base64,..."} (OpenAI's image part)


class ChatMessage(BaseModel):
    """One message; fields beyond role and content (name, tool_calls, reasoning_content…) reach the template."""

    model_config = _BODY
    role: Text
    content: Text | list[ContentPart] | None = None


class ChatBody(GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class CompletionBody(GenerationBody):
    prompt: Text | list[Text] | TokenIds | list[TokenIds]
    suffix: Text | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    max_tokens: int | None = Field(None, ge=1)
    echo: bool = False
    best_of: int | None = None
    logprobs: int | None = None


class ExtraChunk(BaseModel):
    model_config = _BODY
    filename: Text = ""
    text: Text = ""


class InfillBody(GenerationBody):
    """llama.cpp's /infill request (what llama.vim and llama.vscode send)."""

    input_prefix: Text = ""
    input_suffix: Text = ""
    input_extra: list[ExtraChunk] = Field(default_factory=list)
    prompt: Text = ""
    n_predict: int = Field(-1, ge=-1)
    n_cmpl: int = Field(1, ge=1, le=MAX_CHOICES)
    response_fields: list[str] | None = None
    return_tokens: bool = False


class EditBody(GenerationBody):
    text: Text
    rewrite: list[Annotated[list[int], Field(min_length=2, max_length=2)]] = Field(min_length=1)
    prompt: Text | TokenIds | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)


class TokenizeBody(BaseModel):
    model_config = _BODY
    content: Text
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeBody(BaseModel):
    model_config = _BODY
    tokens: TokenIds


class LoraScale(BaseModel):
    """One entry of llama.cpp's `POST /lora-adapters` body."""

    model_config = _BODY
    id: int = Field(ge=0)
    scale: float


def _check_supported(body: GenerationBody) -> None:
    """Refuse what this server cannot honour (rather than silently answering something else)."""
    if getattr(body, "tools", None) and body.tool_choice != "none":  # type: ignore[attr-defined]
        raise APIError(501, "tool calling is not supported", param="tools")
    if getattr(body, "functions", None):
        raise APIError(501, "function calling is not supported", param="functions")
    if getattr(body, "logprobs", None) or getattr(body, "top_logprobs", None):
        raise APIError(501, "logprobs are not supported: the sampler accepts whole canvases, not one token at a "
                            "time", param="logprobs")
    if getattr(body, "echo", False):
        raise APIError(501, "echo is not supported", param="echo")
    best_of = getattr(body, "best_of", None)
    if best_of is not None and best_of != body.n:  # type: ignore[attr-defined]
        raise APIError(501, "best_of is not supported (it may only equal n)", param="best_of")
    for name in sorted(set(body.model_extra or ()) - IGNORED_FIELDS):
        _warn_once(f"ignoring the unknown request field {name!r}")


def _constraint(model: Model, body: GenerationBody) -> dict[str, Any]:
    """The request's constraint as the engine's keywords (see dgrun.constrain): OpenAI's `response_format`, or
    one of the extra fields `json_schema` (llama.cpp's), `regex` and `grammar`. Compiled here, so that an error
    names the field it is about; the engine finds it compiled."""
    given = [name for name in ("json_schema", "regex", "grammar") if getattr(body, name) is not None]
    try:
        kwargs = response_format_args(body.response_format)
    except ConstraintError as e:
        raise APIError(400, str(e), param="response_format") from None
    if kwargs:
        given.insert(0, "response_format")
    if len(given) > 1:
        raise APIError(400, f"give at most one of response_format, json_schema, regex and grammar (got "
                            f"{' and '.join(given)})", param=given[1])
    if not given:
        return {}
    kwargs = kwargs or {given[0]: getattr(body, given[0])}
    try:
        model.constraint(**kwargs)
    except ConstraintError as e:
        raise APIError(400, str(e), param=given[0]) from None
    return kwargs


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned and len(_warned) < 1000:
        _warned.add(message)
        log.warning(message)


# -- the server's state: the model, its scheduler, and the bridge from scheduler threads to the event loop -----


@dataclass
class Settings:
    """How the server runs (the `dgrun serve` flags)."""

    model_id: str | None = None  # what /v1/models names; default: the model file's stem
    api_key: str | None = None
    max_batch: int = MAX_BATCH
    max_queue: int = MAX_QUEUE
    max_body_bytes: int = MAX_BODY_BYTES
    cors_origins: Sequence[str] = ()
    allow_image_urls: bool = False  # fetch http(s) image URLs named in requests (else only data: URIs)


class ServerState:
    """The model (None while it loads), its Scheduler, and counters; held by the app as `app.state.dgrun`."""

    def __init__(self, load: Callable[[], Model], settings: Settings):
        self.settings = settings
        self.model: Model | None = None
        self.scheduler: Scheduler | None = None
        self.load_error: BaseException | None = None
        self.closing = False  # shutting down: elements cancelled from now on answer 503
        self.created = 0  # the model file's time, for /v1/models
        self._load = load
        self._lock = threading.Lock()
        self._seconds_per_element = 1.0  # running mean of how long an element takes (for Retry-After)

    def start_loading(self, on_error: Callable[[BaseException], None] | None) -> None:
        def load() -> None:
            try:
                model = self._load()
                self.created = int(model.path.stat().st_mtime)
                self.scheduler = Scheduler(model, self.settings.max_batch)
                self.model = model
            except BaseException as e:  # reported by /health and by `dgrun serve` on its way out
                self.load_error = e
                if on_error is not None:
                    on_error(e)

        threading.Thread(target=load, name="dgrun-load", daemon=True).start()

    def ready(self) -> tuple[Model, Scheduler]:
        if self.model is None or self.scheduler is None:
            if self.load_error is not None:
                raise APIError(503, f"the model failed to load: {self.load_error}")
            raise APIError(503, "the model is loading", code="loading")
        return self.model, self.scheduler

    @property
    def model_id(self) -> str:
        if self.settings.model_id:
            return self.settings.model_id
        return self.model.path.stem if self.model is not None else "dgrun"

    def submit(self, requests: list[Request]) -> list[Handle]:
        """Queue one element per request, or refuse them all with 503 when the queue bound would be passed."""
        _, scheduler = self.ready()
        if self.closing:
            raise APIError(503, "the server is shutting down")
        limit = self.settings.max_batch + self.settings.max_queue
        if len(requests) > limit:
            raise APIError(400, f"{len(requests)} choices exceed what this server holds at once ({limit}: "
                                "--max-batch plus --max-queue)", param="n")
        waiting = scheduler.running + scheduler.queued + len(requests) - self.settings.max_batch
        if waiting > self.settings.max_queue:
            retry = max(1, min(60, math.ceil(self._seconds_per_element * (1 + scheduler.queued / scheduler.max_batch))))
            raise APIError(503, f"the server is busy ({scheduler.queued} waiting, --max-queue "
                                f"{self.settings.max_queue}); retry in {retry} s", code="queue_full",
                           headers={"Retry-After": str(retry)})
        try:
            return [scheduler.submit(r) for r in requests]
        except RuntimeError:  # closed: the server is shutting down
            raise APIError(503, "the server is shutting down") from None

    @property
    def steps(self) -> int:
        """Denoising steps run for all elements so far (one per element per decoder pass)."""
        return self.scheduler.steps if self.scheduler is not None else 0

    def element_took(self, seconds: float) -> None:
        with self._lock:
            self._seconds_per_element = 0.8 * self._seconds_per_element + 0.2 * seconds

    @property
    def busy(self) -> bool:
        """Elements running or waiting."""
        return self.scheduler is not None and (self.scheduler.running + self.scheduler.queued) > 0

    def stop_generating(self) -> None:
        """Cancel every element and wait for the step in progress; new work is refused with 503 from now on."""
        self.closing = True
        if self.scheduler is not None:
            self.scheduler.close()

    def close(self) -> None:
        self.stop_generating()
        if self.model is not None:
            self.model.close()


_END = object()  # an element's last event


class Job:
    """One request's elements on the Scheduler, each bridged by a small thread to an asyncio queue.

    `events()` yields (choice index, event) — `Draft` (only if `drafts`), `Commit`, then `_END` or the exception
    its generation raised — and cancels every element still running when the consumer stops early (a client
    that disconnected, an error). Times per choice (submitted, first step, end) feed llama.cpp's `timings`.
    """

    def __init__(self, state: ServerState, requests: list[Request], drafts: bool = False):
        self._state, self._drafts = state, drafts
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self.handles = state.submit(requests)
        self.submitted = time.perf_counter()
        self.first_step: list[float | None] = [None] * len(requests)
        self.ended: list[float | None] = [None] * len(requests)
        for index, handle in enumerate(self.handles):
            threading.Thread(target=self._pump, args=(index, handle), name="dgrun-element", daemon=True).start()

    def _pump(self, index: int, handle: Handle) -> None:
        item: Any = _END
        try:
            for event in handle:
                if isinstance(event, Draft):
                    if self.first_step[index] is None:
                        self.first_step[index] = time.perf_counter()
                    if not self._drafts:
                        continue
                if not self._put((index, event)):
                    handle.cancel()
                    return
        except Exception as e:  # its generation failed: the consumer reports it
            item = e
        self.ended[index] = time.perf_counter()
        if self.first_step[index] is not None:
            self._state.element_took(self.ended[index] - self.submitted)  # type: ignore[operator]
        self._put((index, item))

    def _put(self, item: tuple[int, Any]) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
            return True
        except RuntimeError:  # the event loop is gone (the server stopped): nobody will read this
            return False

    @property
    def closing(self) -> bool:
        return self._state.closing

    def cancel(self, index: int | None = None) -> None:
        for handle in self.handles if index is None else [self.handles[index]]:
            handle.cancel()

    async def events(self) -> AsyncIterator[tuple[int, Any]]:
        remaining = len(self.handles)
        try:
            while remaining:
                index, item = await self._queue.get()
                if not isinstance(item, (Draft, Commit)):
                    remaining -= 1
                yield index, item
        finally:
            self.cancel()


# -- from committed tokens to text ---------------------------------------------------------------------------


class ChoiceText:
    """One choice's committed tokens as text deltas: the EOS that ended it dropped, stop strings honoured
    (the text ends before the first one, and a tail that could start one is held back), and a character whose
    bytes are not all committed yet held back too. The deltas joined are the choice's whole text.
    """

    def __init__(self, model: Model, stops: Sequence[str] = (), fill: int | None = None):
        self.model, self.stops, self.fill = model, [s for s in stops if s], fill
        self.tokens: list[int] = []
        self.text = ""  # sent so far
        self.stop_word: str | None = None
        self.finish_reason: str | None = None
        self._eos = set(model.generation_config.eos_token_ids)
        self._hold = max((len(s) for s in self.stops), default=1) - 1

    def commit(self, tokens: list[int]) -> str:
        if self.finish_reason is not None or self.stop_word is not None:
            return ""  # a stop string already ended it; the element is being cancelled
        self.tokens.extend(tokens)
        return self._advance(final=False)

    def finish(self) -> str:
        """The rest of the text once the element ended, and why it ended (OpenAI's finish_reason)."""
        if self.finish_reason is not None:
            return ""
        delta = self._advance(final=True)
        if self.stop_word is not None or (self.tokens and self.tokens[-1] in self._eos):
            self.finish_reason = "stop"
        elif self.fill is not None:  # an infill: the model left part of its gap empty, or filled it all
            self.finish_reason = "stop" if len(self.tokens) < self.fill else "length"
        else:
            self.finish_reason = "length"
        return delta

    def _advance(self, final: bool) -> str:
        ids = self.tokens[:-1] if self.tokens and self.tokens[-1] in self._eos else self.tokens
        full = self.model.detokenize(ids) or ""
        hits = [(at, s) for s in self.stops if (at := full.find(s)) >= 0]
        if hits:
            at, self.stop_word = min(hits)
            full, final = full[:at], True
        end = len(full) if final else max(len(self.text), len(full.rstrip("\ufffd")) - self._hold)
        delta = full[len(self.text):end]
        self.text += delta
        return delta


@dataclass
class Update:
    """What one event means for a choice: new text, its end (finish_reason), or a draft for canvas frames."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    draft: Draft | None = None


async def _updates(job: Job, choices: list[ChoiceText]) -> AsyncIterator[Update]:
    async for index, item in job.events():
        choice = choices[index]
        if isinstance(item, Draft):
            yield Update(index, draft=item)
        elif isinstance(item, Commit):
            text = choice.commit(item.tokens)
            if choice.stop_word is not None:
                job.cancel(index)
            if text:
                yield Update(index, text=text)
        elif isinstance(item, Exception):
            log.error("generation failed: %s", item)
            raise APIError(500, f"generation failed: {item}")
        elif job.handles[index].cancelled and choice.stop_word is None and job.closing:
            raise APIError(503, "the server is shutting down: the answer was cancelled")
        else:
            yield Update(index, choice.finish(), choice.finish_reason)


async def _unless_disconnected(request: HTTPRequest, work: AsyncIterator[Update], job: Job) -> list[Update]:
    """Every update of a non-streaming answer; a client that goes away meanwhile cancels the work at once."""
    async def collect() -> list[Update]:
        return [update async for update in work]

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            job.cancel()
    if task.cancelled():
        raise _ClientGone
    return task.result()


class _ClientGone(Exception):
    """The client closed the connection before its answer was ready (nobody reads the reply)."""


# -- from request fields to generation parameters --------------------------------------------------------------


def _overrides(model: Model, body: GenerationBody, max_tokens: int | None) -> dict[str, Any]:
    """The engine's keyword arguments: dgrun's own fields, the temperature scaling, the token budget."""
    params: dict[str, Any] = {name: getattr(body, name) for name in (
        "max_denoising_steps", "t_min", "t_max", "entropy_bound", "stability_threshold", "confidence_threshold")}
    params["adaptive_stopping"] = body.adaptive_stopping
    if body.temperature is not None and body.temperature != 1:
        # Both ends of the schedule scale with the temperature; 0 is greedy (see GREEDY_SCALE and the README).
        scale = body.temperature or GREEDY_SCALE
        defaults = model.generation_config.resolved()
        for name in ("t_min", "t_max"):
            params[name] = (params[name] if params[name] is not None else defaults[name]) * scale
    params["max_new_tokens"] = max_tokens
    params.update(_constraint(model, body))
    return params


def _seeds(seed: int | None, n: int) -> list[int | None]:
    """Choice i gets seed + i, so each choice is the answer a lone request with that seed gets."""
    return [None] * n if seed is None or seed < 0 else [seed + i for i in range(n)]


def _budget(model: Model, max_tokens: int | None, prompt_length: int) -> int | None:
    """max_tokens, else the file's default cut to the canvases that still fit in the context (as vLLM fits it)."""
    if max_tokens is not None:
        return max_tokens
    cfg = model.config
    room = (cfg.max_position_embeddings - prompt_length) // cfg.canvas_length * cfg.canvas_length
    default = model.generation_config.resolved()["max_new_tokens"]
    return min(default, room) if room > 0 else None


def _time_limit(body: GenerationBody) -> float | None:
    ms = body.t_max_predict_ms
    return ms / 1000 if ms is not None and ms > 0 else None


@contextlib.contextmanager
def _as_request_errors(param: str) -> Iterator[None]:
    """The engine's ValueErrors as 400s naming the field they are about (`param` unless the message says)."""
    try:
        yield
    except NoTokenizerError as e:
        raise APIError(501, str(e), param=param) from None
    except ValueError as e:  # includes ChatTemplateError and UnicodeError from a tokenizer
        message = " ".join(str(e).split()) or type(e).__name__
        named = next((p for start, p in _PARAM_OF_MESSAGE.items() if message.startswith(start)), param)
        code = "context_length_exceeded" if "exceeds the model's context" in message else None
        raise APIError(400, message, param=named, code=code) from None


@dataclass
class Prepared:
    """A request turned into Scheduler requests (one per choice), with what answering it needs."""

    requests: list[Request]
    choices: list[ChoiceText]
    prompt_tokens: int
    thought_prompt: str | None = None  # the rendered chat prompt, when its template writes a thought channel
    truncated: bool = False


def _needs_tokenizer(model: Model) -> None:
    if model.tokenizer is None:
        raise APIError(501, f"{model.path.name} has no tokenizer (converted with --no-tokenizer): this server "
                            "speaks text")


def _prepare_chat(model: Model, body: ChatBody, fetch_image_urls: bool = False) -> Prepared:
    """Text parts are joined into one string; a message with images keeps its parts, each image_url part (a data:
    URI; an http(s) URL only with --allow-image-urls; never a file path) turned into the image part chat templates
    place, its image decoded once and laid out as `Model.chat` lays it out."""
    _needs_tokenizer(model)
    if model.chat_template is None:
        raise APIError(501, f"{model.path.name} has no chat template: use /v1/completions", param="messages")
    messages = []
    for i, message in enumerate(body.messages):
        entry = message.model_dump(exclude_none=True)
        if isinstance(message.content, list):
            kinds = {part.type for part in message.content}
            if not kinds <= {"text", "image_url"}:
                raise APIError(501, f"content parts of type {sorted(kinds - {'text', 'image_url'})[0]!r} are not "
                                    "supported (text and image_url are)", param=f"messages[{i}].content")
            if "image_url" not in kinds:
                entry["content"] = "\n".join(part.text or "" for part in message.content)
            elif model.vision is None:
                raise APIError(501, f"{model.path.name} has no vision tower (serve it with --mmproj FILE to take "
                                    "images)", param=f"messages[{i}].content")
        messages.append(entry)
    with _as_request_errors("messages"):
        conversation, images = chat_images(messages, allow_paths=False, fetch_urls=fetch_image_urls)
        text = model.apply_chat_template(conversation, **(body.chat_template_kwargs or {}))
        patches = None
        if images:
            ids, patches = model.tokenize_with_images(str(text), images)
        else:
            ids = model.tokenize_chat(str(text))
        budget = _budget(model, body.max_completion_tokens or body.max_tokens, len(ids))
        params = _overrides(model, body, budget)
        requests = [model.request(ids, seed=seed, images=patches, **params) for seed in _seeds(body.seed, body.n)]
    thoughts = str(text) if ThoughtChannel.used_by(model.chat_template) else None
    return Prepared(requests, [ChoiceText(model, body.stop or ()) for _ in requests], len(ids), thoughts)


def _prepare_completion(model: Model, body: CompletionBody) -> Prepared:
    _needs_tokenizer(model)
    prompt = body.prompt
    prompts: list[str | list[int]]
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompts = [prompt]  # type: ignore[list-item]
    else:
        prompts = list(prompt)  # type: ignore[arg-type]
    if not prompts:
        raise APIError(400, "prompt is empty", param="prompt")
    requests, choices, prompt_tokens = [], [], 0
    seeds = _seeds(body.seed, body.n * len(prompts))
    with _as_request_errors("prompt"):
        for p, text in enumerate(prompts):
            ids = model.tokenize(text) if isinstance(text, str) else list(text)
            prompt_tokens += len(ids)
            mine = seeds[p * body.n:(p + 1) * body.n]
            if body.suffix is None:
                params = _overrides(model, body, _budget(model, body.max_tokens, len(ids)))
                requests += [model.request(ids, seed=s, **params) for s in mine]
                choices += [ChoiceText(model, body.stop or ()) for _ in mine]
                continue
            room = model.config.canvas_length - len(model.tokenize(body.suffix, add_bos=False))
            fill = None if body.max_tokens is None or room < 1 else min(body.max_tokens, room)
            params = _overrides(model, body, None)
            requests += [model.infill_request(ids, body.suffix, fill, seed=s, **params) for s in mine]
            choices += [ChoiceText(model, body.stop or (), fill or room) for _ in mine]
    return Prepared(requests, choices, prompt_tokens)


def _prepare_infill(model: Model, body: InfillBody) -> Prepared:
    """llama.cpp's /infill: input_extra chunks, then the prefix and `prompt`, before the gap; the suffix after it.

    The suffix must fit in the canvas with the gap, so it keeps its first tokens (those nearest the cursor),
    leaving the gap n_predict tokens (half the canvas when n_predict is -1); the prefix keeps its last tokens to
    fit the context. Either cut sets `truncated`, as llama.cpp does when it trims an infill.
    """
    _needs_tokenizer(model)
    canvas, context = model.config.canvas_length, model.config.max_position_embeddings
    reserve = min(body.n_predict if body.n_predict > 0 else canvas // 2, canvas - 1)
    with _as_request_errors("input_suffix"):
        suffix, suffix_cut = _keep_first_tokens(model, body.input_suffix, canvas - reserve)
    prefix_text = "".join(SNIPPET + chunk.text for chunk in body.input_extra) + body.input_prefix + body.prompt
    with _as_request_errors("input_prefix"):
        prefix = model.tokenize(prefix_text)
        budget = context - canvas
        prefix_cut = len(prefix) > budget
        if prefix_cut:
            bos = model.tokenizer.bos_id if model.tokenizer is not None and model.tokenizer.add_bos else None
            prefix = ([bos] if bos is not None and prefix[:1] == [bos] else []) + prefix[-(budget - 1):]
        room = canvas - len(model.tokenize(suffix, add_bos=False))
        fill = min(body.n_predict, room) if body.n_predict > 0 else room
        params = _overrides(model, body, None)
        requests = [model.infill_request(prefix, suffix, fill, seed=s, **params)
                    for s in _seeds(body.seed, body.n_cmpl)]
    return Prepared(requests, [ChoiceText(model, body.stop or (), fill) for _ in requests], len(prefix),
                    truncated=suffix_cut or prefix_cut)


def _keep_first_tokens(model: Model, text: str, limit: int) -> tuple[str, bool]:
    """`text` cut to at most `limit` tokens (its beginning kept), and whether it was cut."""
    ids = model.tokenize(text, add_bos=False)
    if len(ids) <= limit:
        return text, False
    keep = limit
    while keep > 0:  # re-tokenizing a cut text can merge differently: shorten until it fits
        cut = model.detokenize(ids[:keep]) or ""
        if len(model.tokenize(cut, add_bos=False)) <= limit:
            return cut, True
        keep -= 1
    return "", True


def _prepare_edit(model: Model, body: EditBody) -> Prepared:
    _needs_tokenizer(model)
    spans = [(start, end) for start, end in body.rewrite]
    with _as_request_errors("text"):
        context = body.prompt if isinstance(body.prompt, list) else model.tokenize(body.prompt or "")
        params = _overrides(model, body, None)
        requests = [model.edit_request(body.text, spans, context, seed=s, **params) for s in _seeds(body.seed, body.n)]
    return Prepared(requests, [ChoiceText(model) for _ in requests], len(context))


def _prepare(model: Model, body: GenerationBody, prepare: Callable[[Model, Any], Prepared]) -> Prepared:
    prepared = prepare(model, body)
    limit = _time_limit(body)
    if limit is not None:
        for r in prepared.requests:
            r.time_limit = limit
    return prepared


# -- response shapes -------------------------------------------------------------------------------------------


def _usage(prepared: Prepared) -> dict[str, int]:
    completion = sum(len(c.tokens) for c in prepared.choices)
    return {"prompt_tokens": prepared.prompt_tokens, "completion_tokens": completion,
            "total_tokens": prepared.prompt_tokens + completion}


def _head(state: ServerState, prefix: str, kind: str) -> dict[str, Any]:
    model = state.model
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
            "model": state.model_id,
            "system_fingerprint": f"dgrun-{__version__}-{model.backend.name if model is not None else ''}"}


def _canvas_frame(model: Model, head: dict[str, Any], update: Update) -> str:
    """The live canvas of one choice after a denoising step; `choices: []` keeps OpenAI clients' loops quiet."""
    draft = update.draft
    assert draft is not None
    tokens = draft.tokens.tolist()
    return _sse({**head, "object": "dgrun.canvas", "choices": [], "canvas": {
        "index": update.index, "canvas": draft.canvas_index, "step": draft.step,
        "text": model.detokenize(tokens) or "", "tokens": tokens,
        "accepted": [bool(a) for a in draft.accepted.tolist()]}}, event="canvas")


def _chat_delta(splitter: ThoughtChannel | None, update: Update) -> dict[str, str]:
    """A chat update as a message delta: the thought channel's text goes to reasoning_content."""
    final = update.finish_reason is not None
    reasoning, content = splitter.feed(update.text, final) if splitter is not None else ("", update.text)
    delta = {}
    if reasoning:
        delta["reasoning_content"] = reasoning
    if content:
        delta["content"] = content
    return delta


def _event_stream(frames: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(frames, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _openai_stream(state: ServerState, job: Job, prepared: Prepared, body: GenerationBody,
                         head: dict[str, Any], choice: Callable[[Update], dict[str, Any] | None],
                         first: Callable[[int], dict[str, Any]] | None) -> AsyncIterator[str]:
    """SSE in OpenAI's shape: `first` chunks, one chunk per update, usage when asked, an error object if the
    generation fails, then `data: [DONE]`."""
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    tail = {"usage": None} if include_usage else {}
    model = state.model
    assert model is not None
    try:
        if first is not None:
            for index in range(len(prepared.choices)):
                yield _sse({**head, "choices": [first(index)], **tail})
        async for update in _updates(job, prepared.choices):
            if update.draft is not None:
                yield _canvas_frame(model, head, update)
                continue
            entry = choice(update)
            if entry is not None:
                yield _sse({**head, "choices": [entry], **tail})
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(prepared)})
    except APIError as e:
        yield _sse(e.body())
    yield "data: [DONE]\n\n"


# -- the app -----------------------------------------------------------------------------------------------------


def create_app(load: Callable[[], Model], settings: Settings | None = None,
               on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The server as an ASGI app. `load` opens the model; it runs in a thread once the app starts, and until it
    returns every endpoint but /health answers 503. The app owns the model from then on and closes it on shutdown.
    """
    settings = settings or Settings()
    state = ServerState(load, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start_loading(on_load_error)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(state.close)

    app = FastAPI(title="dgrun", version=__version__, lifespan=lifespan, default_response_class=_JSON,
                  description="An OpenAI- and llama.cpp-compatible server for DiffusionGemma models.")
    app.state.dgrun = state

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, error: APIError) -> Response:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: HTTPRequest, error: RequestValidationError) -> Response:
        return _validation_error(error.errors()).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: HTTPRequest, error: HTTPException) -> Response:
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(error.status_code, error.detail)
        return APIError(error.status_code, str(message), headers=getattr(error, "headers", None)).response()

    @app.exception_handler(_ClientGone)
    async def gone(request: HTTPRequest, error: _ClientGone) -> Response:
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def crashed(request: HTTPRequest, error: Exception) -> Response:
        log.exception("internal error on %s", request.url.path)
        return APIError(500, f"internal error: {type(error).__name__}: {error}").response()

    # -- health, models, props ---------------------------------------------------------------------------------

    async def health() -> dict[str, str]:
        state.ready()
        return {"status": "ok"}

    for path in sorted(PUBLIC_PATHS):
        app.get(path, summary="Health: 200 once the model is loaded, 503 while it loads")(health)

    def model_card() -> dict[str, Any]:
        model, _ = state.ready()
        return {"id": state.model_id, "object": "model", "created": state.created,
                "owned_by": "dgrun", "context_length": model.config.max_position_embeddings,
                "canvas_length": model.config.canvas_length, "backend": model.backend.name}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str) -> dict[str, Any]:
        card = model_card()
        if model_id != card["id"]:
            raise APIError(404, f"no model {model_id!r} here; this server runs {card['id']!r}", param="model",
                           code="model_not_found")
        return card

    @app.get("/props")
    async def props() -> dict[str, Any]:
        model, scheduler = state.ready()
        defaults = model.generation_config.resolved()
        return {
            "default_generation_settings": {
                "n_ctx": model.config.max_position_embeddings, "model": state.model_id,
                "params": {"n_predict": defaults["max_new_tokens"], "temperature": 1.0, "seed": -1, **defaults}},
            "total_slots": settings.max_batch, "model_path": model.path.name,
            "chat_template": model.chat_template or "", "modalities": {"vision": False, "audio": False},
            "build_info": f"dgrun {__version__}",
            "dgrun": {"canvas_length": model.config.canvas_length, "backend": model.backend.name,
                      "running": scheduler.running, "queued": scheduler.queued, "steps": state.steps},
        }

    # -- tokens --------------------------------------------------------------------------------------------------

    @app.post("/tokenize")
    async def tokenize(body: TokenizeBody) -> dict[str, Any]:
        model, _ = state.ready()
        _needs_tokenizer(model)

        def run() -> list[int]:
            with _as_request_errors("content"):
                if body.parse_special:
                    return model.tokenize_chat(body.content, continuation=not body.add_special)
                return model.tokenize(body.content, add_bos=body.add_special)

        ids = await anyio.to_thread.run_sync(run)
        if not body.with_pieces:
            return {"tokens": ids}
        return {"tokens": await anyio.to_thread.run_sync(_pieces, model, ids)}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeBody) -> dict[str, Any]:
        model, _ = state.ready()
        _needs_tokenizer(model)
        vocab = model.config.vocab_size
        bad = next((t for t in body.tokens if t >= vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param="tokens")
        return {"content": await anyio.to_thread.run_sync(model.detokenize, body.tokens) or ""}

    # -- LoRA adapters (llama.cpp's shapes) ----------------------------------------------------------------------

    def adapters(model: Model) -> list[dict[str, Any]]:
        return [{**a, "path": Path(a["path"]).name} for a in model.lora_adapters()]  # names, never directories

    @app.get("/lora-adapters")
    async def lora_adapters() -> list[dict[str, Any]]:
        model, _ = state.ready()
        return adapters(model)

    @app.post("/lora-adapters")
    async def set_lora_adapters(body: list[LoraScale]) -> dict[str, Any]:
        """New scales for every element from the next decoder pass on; an adapter left out gets 0."""
        model, scheduler = state.ready()
        try:
            await anyio.to_thread.run_sync(scheduler.set_lora_adapters, [e.model_dump() for e in body])
        except ValueError as e:
            raise APIError(400, str(e), param="id" if str(e).startswith("no LoRA") else "scale") from None
        except RuntimeError:  # the scheduler closed: shutting down
            raise APIError(503, "the server is shutting down") from None
        return {"success": True}

    # -- generation ---------------------------------------------------------------------------------------------

    async def start(body: GenerationBody, prepare: Callable[[Model, Any], Prepared]) -> tuple[Prepared, Job]:
        model, _ = state.ready()
        _check_supported(body)
        prepared = await anyio.to_thread.run_sync(_prepare, model, body, prepare)
        return prepared, Job(state, prepared.requests, drafts=body.stream and body.canvas)

    async def text_answer(body: GenerationBody, request: HTTPRequest, prepare: Callable[[Model, Any], Prepared],
                           prefix: str, kind: str) -> Response:
        prepared, job = await start(body, prepare)
        head = _head(state, prefix, kind)

        def chunk(update: Update) -> dict[str, Any] | None:
            if not update.text and update.finish_reason is None:
                return None
            return {"index": update.index, "text": update.text, "logprobs": None,
                    "finish_reason": update.finish_reason}

        if body.stream:
            return _event_stream(_openai_stream(state, job, prepared, body, head, chunk, None))
        await _unless_disconnected(request, _updates(job, prepared.choices), job)
        return _JSON({**head, "choices": [
            {"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
            for i, c in enumerate(prepared.choices)], "usage": _usage(prepared)})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: HTTPRequest) -> Response:
        prepared, job = await start(body, partial(_prepare_chat, fetch_image_urls=settings.allow_image_urls))
        splitters = [None if prepared.thought_prompt is None else ThoughtChannel(prepared.thought_prompt)
                     for _ in prepared.choices]
        head = _head(state, "chatcmpl", "chat.completion.chunk" if body.stream else "chat.completion")

        def chunk(update: Update) -> dict[str, Any] | None:
            delta = _chat_delta(splitters[update.index], update)
            if not delta and update.finish_reason is None:
                return None
            return {"index": update.index, "delta": delta, "logprobs": None, "finish_reason": update.finish_reason}

        def first(index: int) -> dict[str, Any]:
            return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None}

        if body.stream:
            return _event_stream(_openai_stream(state, job, prepared, body, head, chunk, first))
        messages: list[dict[str, Any]] = [{"role": "assistant", "content": ""} for _ in prepared.choices]
        for update in await _unless_disconnected(request, _updates(job, prepared.choices), job):
            for key, text in _chat_delta(splitters[update.index], update).items():
                messages[update.index][key] = messages[update.index].get(key, "") + text
        return _JSON({**head, "choices": [
            {"index": i, "message": m, "logprobs": None, "finish_reason": c.finish_reason}
            for i, (m, c) in enumerate(zip(messages, prepared.choices, strict=True))], "usage": _usage(prepared)})

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: HTTPRequest) -> Response:
        return await text_answer(body, request, _prepare_completion, "cmpl", "text_completion")

    @app.post("/v1/edit")
    async def edit(body: EditBody, request: HTTPRequest) -> Response:
        return await text_answer(body, request, _prepare_edit, "edit", "edit")

    @app.post("/infill")
    async def infill(body: InfillBody, request: HTTPRequest) -> Response:
        model, _ = state.ready()
        if body.n_predict == 0:  # an editor's warm-up: nothing to generate
            prepared = Prepared([], [ChoiceText(model) for _ in range(body.n_cmpl)], 0)
            for c in prepared.choices:
                c.finish_reason = "length"
            results = [_infill_result(state, body, prepared, None, i) for i in range(body.n_cmpl)]
            return _JSON(results[0] if body.n_cmpl == 1 else results)
        prepared, job = await start(body, _prepare_infill)
        if body.stream:
            return _event_stream(_infill_stream(state, body, prepared, job))
        await _unless_disconnected(request, _updates(job, prepared.choices), job)
        results = [_infill_result(state, body, prepared, job, i) for i in range(len(prepared.choices))]
        return _JSON(results[0] if len(results) == 1 else results)

    app.add_middleware(_Guard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])
    return app


def _pieces(model: Model, ids: list[int]) -> list[dict[str, Any]]:
    """Each token with its text as it reads inside the whole decoded string (a leading space included), as
    llama.cpp's /tokenize gives pieces: decoded after the token before it, minus that token's own text."""
    out = []
    for k, token in enumerate(ids):
        before = model.detokenize(ids[k - 1:k]) or ""
        both = model.detokenize(ids[max(k - 1, 0):k + 1]) or ""
        out.append({"id": token, "piece": both[len(before):]})
    return out


def _validation_error(errors: Sequence[Any]) -> APIError:
    """pydantic's first complaint as a 400 naming the field, e.g. `messages[0].content: Input should be …`."""
    error = errors[0] if errors else {}
    loc = [part for part in error.get("loc", ()) if part != "body"]
    if error.get("type") == "json_invalid":
        reason = (error.get("ctx") or {}).get("error", "")
        return APIError(400, f"the body is not valid JSON{': ' + str(reason) if reason else ''}", code="invalid_json")
    if not loc and error.get("type") in ("missing", "model_attributes_type", "dict_type"):
        return APIError(400, "the body must be a JSON object, sent with Content-Type: application/json",
                        code="invalid_json")
    param, field_name = "", ""
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif "[" in str(part) or part in ("str", "int"):  # pydantic's tag for a union member: which type failed
            message = f"must be {_UNION_HINTS.get(field_name, 'another type')}"
            if error.get("type") != "value_error":  # a member's own complaint would name one type of several
                return APIError(400, f"{param}: {message}", param=param)
            break
        else:
            field_name = str(part)
            param += ("." if param else "") + field_name
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return APIError(400, f"{param}: {message}" if param else message, param=param or None)


_UNION_HINTS = {"prompt": "a string, a list of strings, a list of token ids (integers >= 0) or a list of such lists",
                "content": "a string or a list of {\"type\": \"text\", \"text\": ...} parts"}


def _infill_result(state: ServerState, body: InfillBody, prepared: Prepared, job: Job | None,
                   index: int) -> dict[str, Any]:
    """One /infill answer in llama.cpp's shape (`response_fields` picks and flattens its fields)."""
    choice = prepared.choices[index]
    stop_type = {"stop": "eos", "length": "limit"}.get(choice.finish_reason or "", "none")
    if choice.stop_word is not None:
        stop_type = "word"
    prompt_ms = predicted_ms = 0.0
    if job is not None and job.first_step[index] is not None and job.ended[index] is not None:
        prompt_ms = (job.first_step[index] - job.submitted) * 1000  # type: ignore[operator]
        predicted_ms = (job.ended[index] - job.first_step[index]) * 1000  # type: ignore[operator]
    predicted = len(choice.tokens)
    result: dict[str, Any] = {
        "index": index, "content": choice.text, "tokens": choice.tokens if body.return_tokens else [],
        "id_slot": -1, "stop": True, "model": state.model_id, "tokens_predicted": predicted,
        "tokens_evaluated": prepared.prompt_tokens, "stop_type": stop_type, "stopping_word": choice.stop_word or "",
        "tokens_cached": prepared.prompt_tokens, "truncated": prepared.truncated, "has_new_line": "\n" in choice.text,
        "generation_settings": {"n_predict": body.n_predict, "seed": body.seed if body.seed is not None else -1,
                                "temperature": body.temperature if body.temperature is not None else 1.0,
                                "t_max_predict_ms": body.t_max_predict_ms or -1, "n_cmpl": body.n_cmpl},
        "timings": {**_rates("prompt", prepared.prompt_tokens, prompt_ms), **_rates("predicted", predicted,
                                                                                      predicted_ms)},
    }
    if body.response_fields is None:
        return result
    picked = {}
    for name in body.response_fields:
        value: Any = result
        for part in name.split("/"):
            value = value.get(part, _END) if isinstance(value, dict) else _END
        if value is not _END:
            picked[name] = value
    return picked


def _rates(name: str, n: int, ms: float) -> dict[str, float]:
    """llama.cpp's timing fields for `n` tokens in `ms` milliseconds."""
    return {f"{name}_n": n, f"{name}_ms": ms, f"{name}_per_token_ms": ms / n if n else 0.0,
            f"{name}_per_second": n / ms * 1000 if ms else 0.0}


async def _infill_stream(state: ServerState, body: InfillBody, prepared: Prepared, job: Job) -> AsyncIterator[str]:
    """llama.cpp's non-OpenAI stream: `data: {content, stop: false}` per piece, then the full result with
    `stop: true`; no `[DONE]`."""
    model = state.model
    assert model is not None
    head = _head(state, "infill", "infill")
    try:
        async for update in _updates(job, prepared.choices):
            if update.draft is not None:
                yield _canvas_frame(model, head, update)
            elif update.finish_reason is not None:
                yield _sse({**_infill_result(state, body, prepared, job, update.index), "content": update.text})
            elif update.text:
                yield _sse({"index": update.index, "content": update.text, "stop": False})
    except APIError as e:
        yield _sse(e.body())


class _Guard:
    """Checks made before anything is parsed: the API key (`Authorization: Bearer KEY` or `X-Api-Key`, compared in
    constant time; the health endpoints and CORS preflights are public), then the body size: 413 from its
    Content-Length, or once a chunked body passes the limit. (FastAPI's own body limit answers in plain text.)"""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope["headers"]}
        if self.key is not None and scope["path"] not in PUBLIC_PATHS and scope["method"] != "OPTIONS":
            given = headers.get(b"x-api-key", b"")
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() == b"bearer":
                given = token.strip()
            if not hmac.compare_digest(given, self.key):
                error = APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                                 code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_body_bytes:
            await self._refuse(scope, receive, send, declared.isdigit())
            return
        chunks, size, more = [], 0, True
        while more:  # the whole body first (at most the limit): a chunked one is bounded too
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                await self._refuse(scope, receive, send, True)
                return
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: http.disconnect when the client leaves
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, too_big: bool) -> None:
        error = (APIError(413, f"the request body is over {self.max_body_bytes} bytes", code="request_too_large")
                 if too_big else APIError(400, "Content-Length is not a number"))
        await error.response()(scope, receive, send)


# -- `dgrun serve` ---------------------------------------------------------------------------------------------


class Server(uvicorn.Server):
    """uvicorn's server for an app from `create_app`, with dgrun's way of stopping.

    On SIGTERM / Ctrl-C it stops accepting, gives in-flight work `grace` seconds to finish, then cancels the rest
    (a stream still open ends with an `unavailable_error` event, a request still waiting gets 503) and returns,
    so `dgrun serve` exits 0. (uvicorn's own server re-raises the signal once it is down, killing the process
    with it.) `on_started` runs once the socket accepts connections.
    """

    def __init__(self, app: FastAPI, *, verbose: bool = False, grace: float = SHUTDOWN_GRACE_S,
                 on_started: Callable[[], None] | None = None):
        super().__init__(uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=verbose,
                                        timeout_graceful_shutdown=math.ceil(grace) + 1, server_header=False))
        self.dgrun: ServerState = app.state.dgrun
        self.grace, self.on_started = grace, on_started

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            self.on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:  # stop accepting before waiting for anyone
            server.close()
        state = self.dgrun
        state.closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace
        while state.busy and loop.time() < deadline and not self.force_exit:
            await asyncio.sleep(0.05)
        await anyio.to_thread.run_sync(state.stop_generating)
        await super().shutdown(sockets)


def _parser() -> argparse.ArgumentParser:
    from dgrun.cli import add_lora_arguments

    parser = argparse.ArgumentParser(
        prog="dgrun serve", description="Serve a DiffusionGemma model over HTTP: OpenAI's API, llama.cpp's /infill.")
    parser.add_argument("-m", "--model", help="the .dgf file (default: the demo model shipped with dgrun)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, loopback)")
    parser.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0 picks a free one)")
    parser.add_argument("--api-key", default=os.environ.get("DGRUN_API_KEY") or None,
                        help="require 'Authorization: Bearer KEY' (default: $DGRUN_API_KEY)")
    parser.add_argument("--backend", default="auto", choices=["auto", "numpy", "cpu", "cuda", "mlx"],
                        help="compute backend (default: auto)")
    parser.add_argument("-t", "--threads", type=int, metavar="N", help="CPU threads for the cpu backend")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH, metavar="N",
                        help=f"elements in one decoder pass (default: {MAX_BATCH})")
    parser.add_argument("--max-queue", type=int, default=MAX_QUEUE, metavar="N",
                        help=f"elements that may wait for the batch; beyond, 503 (default: {MAX_QUEUE})")
    parser.add_argument("--model-id", metavar="NAME", help="the model's name in the API (default: the file's stem)")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="allow browser requests from ORIGIN (repeatable; '*' for any); default: no CORS")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request on stderr")
    parser.add_argument("--mmproj", metavar="FILE",
                        help="the vision tower as a separate mmproj file (convert-hf-to-dgf --mmproj-out)")
    parser.add_argument("--allow-image-urls", action="store_true",
                        help="fetch http(s) image URLs that requests name (default: only data: URIs; the server "
                             "then downloads whatever URL a client sends, from its own network)")
    add_lora_arguments(parser)
    return parser


def main(argv: list[str]) -> int:
    """`dgrun serve`: parse flags, bind the port, load the model in the background, serve until SIGTERM/Ctrl-C."""
    from dgrun.cli import UsageError, _load_model
    from dgrun.engine import default_model_path

    args = _parser().parse_args(argv)
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                             ("--threads", args.threads, 1), ("--port", args.port, 0)):
        if value is not None and value < low:
            raise UsageError(f"{flag} must be at least {low}, got {value}")
    path = Path(args.model) if args.model else default_model_path()
    if not path.is_file():
        raise UsageError(f"no model file at {path}")
    for adapter, _ in args.lora:  # before the port is taken (the model and its adapters load once it is)
        if not Path(adapter).is_file():
            raise UsageError(f"no LoRA adapter file at {adapter}")
    if args.lora_merge and not args.lora:
        raise UsageError("--lora-merge needs --lora FILE or --lora-scaled FILE SCALE")
    settings = Settings(model_id=args.model_id or path.stem, api_key=args.api_key, max_batch=args.max_batch,
                        max_queue=args.max_queue, cors_origins=args.cors_origin,
                        allow_image_urls=args.allow_image_urls)
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    if not _is_loopback(args.host) and not args.api_key:
        print(f"dgrun: warning: listening on {args.host} without --api-key: anyone who can reach this port can use "
              "the model", file=sys.stderr)

    server: Server | None = None

    def failed(error: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(lambda: _load_model(args), settings, on_load_error=failed)
    shown = f"[{host}]" if ":" in host else host

    def announce() -> None:
        # One write: the loading thread prints to stderr meanwhile, and print() writes text and newline apart,
        # so two print()s can interleave into a line that a client waiting for this one never sees.
        sys.stderr.write(f"dgrun: listening on http://{shown}:{port}\n")
        sys.stderr.flush()

    server = Server(app, verbose=args.verbose, on_started=announce)
    server.run(sockets=[sock])
    error = app.state.dgrun.load_error
    if error is not None:
        raise error
    return 0


def _bind(host: str, port: int) -> socket.socket:
    from dgrun.cli import UsageError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
