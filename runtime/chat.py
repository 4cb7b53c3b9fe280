"""Chat: the file's chat template rendered as transformers renders it, and multi-turn sessions.

`ChatTemplate` compiles a template in jinja2's immutable sandbox with the same options, globals and filters
as transformers 5.23.0 `chat_template_utils._cached_compile_jinja_template`, so `apply_chat_template` strings
match transformers character for character. Templates come from model files: untrusted code, hence the sandbox.

`ChatSession` keeps the encoder's KV cache between turns. Each turn encodes only what the cache has not seen:
the previous answer's last canvas (generation never encodes its final canvas) plus the new user turn, taken as
the part of the re-rendered conversation that follows what the model has already read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from dgrun.generate import Commit, Draft, Stats
from dgrun.rng import DefaultRng, Rng

if TYPE_CHECKING:
    from dgrun.engine import GenerationOutput, Model
    from dgrun.model import KVCache

Message = dict[str, Any]


class ChatTemplateError(ValueError):
    """A chat template that does not compile, or that refused a conversation (its `raise_exception`)."""


class ChatTemplate:
    """A compiled chat template plus the special-token strings it is rendered with (`bos_token`, `eos_token`, …)."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None):
        import jinja2

        self.source = source
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _compile(source)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template does not compile: {e}") from None

    def render(self, messages: list[Message], add_generation_prompt: bool = True, **variables: Any) -> str:
        """The conversation as text, exactly as transformers' `apply_chat_template(..., tokenize=False)`."""
        if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
            raise ChatTemplateError("messages must be a list of {'role': ..., 'content': ...} dicts")
        # As transformers: keys whose value is None are dropped (OpenAI-style `content=None`), and everything the
        # template sees is rebuilt from plain JSON types so no rich object's methods reach the sandbox.
        conversation = [_plain({k: v for k, v in m.items() if v is not None}) for m in messages]
        try:
            return self._template.render(messages=conversation, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **_plain({**self.special_tokens, **variables}))
        except Exception as e:  # untrusted code: whatever it raises (TemplateError, TypeError…) is its failure
            raise ChatTemplateError(f"chat template: {type(e).__name__}: {e}") from None


def _compile(source: str) -> Any:
    """transformers' chat-template environment: sandboxed, trim_blocks + lstrip_blocks, its globals and filters."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}…{% endgeneration %}` marks assistant text for transformers' masks; here it just renders."""

        tags = {"generation"}

        def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # jinja's own tojson HTML-escapes; templates expect plain JSON.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateDict:
        """`dict(...)` and `dict.fromkeys(...)` without handing the template the `dict` type itself."""

        def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        """`namespace(...)` that refuses underscore attributes, which could reach interpreter internals."""

        def __init__(*args: Any, **kwargs: Any):  # jinja's signature trick, so `namespace(self=...)` works
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace.check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace.check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check_name(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set the attribute {name!r}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=TemplateDict(), namespace=TemplateNamespace)
    return env.from_string(source)


def _plain(value: Any) -> Any:
    """Rebuild `value` from JSON types (str/int/float/bool/None, dicts, lists); anything else becomes "<Type>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (str, int, float):  # subclasses (enums, numpy scalars) lose their extra methods
        if isinstance(value, base) and not isinstance(value, bool):
            return base(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalar
        return _plain(value.item())
    return f"<{type(value).__name__}>"


@dataclass
class TurnStats:
    """What one chat turn cost: the tokens it had to encode and the generation's own counters."""

    encoded_tokens: int  # tokens fed to the encoder before denoising (pending answer + new turn)
    cache_tokens: int  # cache length once those were encoded (the whole conversation so far)
    reencoded: bool  # the whole conversation was encoded again (the template rewrote history, or a turn failed)
    generation: Stats

    def as_dict(self) -> dict[str, Any]:
        return {"encoded_tokens": self.encoded_tokens, "cache_tokens": self.cache_tokens,
                "reencoded": self.reencoded, **self.generation.as_dict()}


@dataclass
class ChatSession:
    """A multi-turn conversation that keeps the encoder KV cache between turns instead of re-encoding history.

        session = ChatSession(model, system="Answer briefly.", seed=0)
        print(session.send("What is a canvas?").text)
        print(session.send("And a denoising step?").text)

    `messages` is the conversation so far. Generation parameters given to the constructor apply to every
    turn; those given to `send`/`stream` override them for one turn. A turn that does not finish (an exception,
    or a stream closed early) keeps its partial answer in `messages` and makes the next turn re-encode it all.
    """

    model: Model
    system: str | None = None
    seed: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    messages: list[Message] = field(default_factory=list)
    turns: list[TurnStats] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.model.chat_template is None:
            raise ChatTemplateError(f"{self.model.path.name} has no chat template")
        if self.system is not None and not self.messages:
            self.messages.append({"role": "system", "content": self.system})
        self.rng: Rng = DefaultRng(self.seed)
        self._cache: KVCache | None = None
        self._seen_text = ""  # the rendered conversation the cache (plus pending tokens) stands for
        self._pending: list[int] = []  # the last answer's final canvas: committed, never encoded

    def send(self, content: str, **params: Any) -> GenerationOutput:
        """Add a user turn and generate the answer; returns it like `Model.generate`, stats per turn."""
        from dgrun.engine import GenerationOutput

        tokens: list[int] = []
        for event in self.stream(content, **params):
            if isinstance(event, Commit):
                tokens.extend(event.tokens)
        return GenerationOutput(tokens, self.model.detokenize(tokens), self.turns[-1].as_dict())

    def stream(self, content: str, *, seed: int | None = None, rng: Rng | None = None,
               **params: Any) -> Iterator[Draft | Commit]:
        """Add a user turn and yield the answer's `Draft`/`Commit` events (see `Model.stream`).

        `seed` or `rng` replace the session's random generator for this turn only.
        """
        model = self.model
        params = {**self.params, **params}
        self.messages.append({"role": "user", "content": content})
        try:
            model.resolve_params(**params)  # refuse bad values while the cache is still intact
            rendered = model.apply_chat_template(self.messages)
            new_ids, from_scratch = self._new_tokens(rendered)
        except BaseException:
            self.messages.pop()
            raise
        cache: KVCache = model.graph.new_cache() if from_scratch else self._cache
        stats = Stats()
        turn = TurnStats(len(new_ids), cache.length + len(new_ids), from_scratch and bool(self.turns), stats)
        self._cache = None  # in flux until the turn finishes: a failed turn makes the next one start afresh
        answer: list[int] = []
        last: Commit | None = None
        try:
            for event in model.stream(new_ids, rng=rng or (DefaultRng(seed) if seed is not None else self.rng),
                                      cache=cache, stats=stats, **params):
                if isinstance(event, Commit):
                    answer.extend(event.tokens)
                    last = event
                yield event
        finally:
            if last is None:  # nothing generated (refused, or stopped while encoding): the turn never happened
                self.messages.pop()
            else:
                self.messages.append({"role": "assistant", "content": self._answer_text(answer)})
                self.turns.append(turn)
                if last.finished:
                    self._cache, self._seen_text, self._pending = cache, rendered, list(last.tokens)

    def _answer_text(self, answer: list[int]) -> str:
        """The answer as the conversation records it: its text without the EOS that ended it."""
        eos = set(self.model.generation_config.eos_token_ids)
        return self.model.detokenize(answer[:-1] if answer and answer[-1] in eos else answer) or ""

    def _new_tokens(self, rendered: str) -> tuple[list[int], bool]:
        """(token ids the encoder has not seen, whether they are the whole conversation from scratch)."""
        model = self.model
        if self._cache is None:
            return model.tokenize_chat(rendered), True
        # What the model has read: the previous prompt, then its answer, which ended with the EOS (whose text a
        # template usually writes to close the turn) or, when it ran out of tokens, without it.
        answer = self.messages[-2]["content"]
        ended_with_eos = bool(self._pending) and self._pending[-1] in model.generation_config.eos_token_ids
        eos_text = model.token_piece(self._pending[-1]) if ended_with_eos else ""
        for seen in (self._seen_text + answer + eos_text, self._seen_text + answer):
            if rendered.startswith(seen):
                return self._pending + model.tokenize_chat(rendered[len(seen):], continuation=True), False
        # The template rewrote history (e.g. it strips earlier answers' reasoning): encode it all again.
        return model.tokenize_chat(rendered), True


# Gemma 4's markers, as transformers' Gemma 4 response template reads an answer (transformers.cli.serving.utils,
# `_RESPONSE_TEMPLATE_FALLBACKS["gemma4"]`): the model's turn starts after "<|turn>model\n"; reasoning sits between
# "<|channel>thought\n" and "<channel|>"; the rest is the answer.
MODEL_TURN = "<|turn>model\n"
THOUGHT_OPEN = "<|channel>thought\n"
THOUGHT_CLOSE = "<channel|>"


class ThoughtChannel:
    """Splits an answer that streams in pieces into Gemma 4's thought channel and the reply, as it arrives.

    `feed(text)` returns the (reasoning, content) text that can be shown now; `feed(text, final=True)` flushes.
    Each region is stripped of surrounding whitespace as transformers strips its fields, and a marker split across
    two pieces is held back until it is whole, so the joined pieces equal the split of the whole answer. `prompt`
    is the rendered chat prompt: a thought channel that it opens after the model's turn starts (and does not
    close) means the answer begins inside the channel.
    """

    def __init__(self, prompt: str):
        start = prompt.rfind(MODEL_TURN)
        opened = prompt[start + len(MODEL_TURN):] if start >= 0 else ""
        self.thinking = opened.rfind(THOUGHT_OPEN) > opened.rfind(THOUGHT_CLOSE)
        self._pending = ""  # a tail that may be the start of a marker
        self._region_started = False  # the current region has shown non-whitespace text
        self._held_space = ""  # whitespace shown only if more text follows it in the region

    @staticmethod
    def used_by(template: str | None) -> bool:
        """Whether a chat template writes Gemma 4's thought channel (so answers should be split)."""
        return template is not None and THOUGHT_OPEN.rstrip("\n") in template

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        out = {True: "", False: ""}  # by `thinking`
        buffer = self._pending + text
        while True:
            marker = THOUGHT_CLOSE if self.thinking else THOUGHT_OPEN
            at = buffer.find(marker)
            if at < 0:
                break
            out[self.thinking] += self._show(buffer[:at])
            buffer = buffer[at + len(marker):]
            self.thinking = not self.thinking
            self._region_started, self._held_space = False, ""
        keep = 0 if final else next((k for k in range(min(len(marker) - 1, len(buffer)), 0, -1)
                                     if marker.startswith(buffer[-k:])), 0)
        out[self.thinking] += self._show(buffer[:len(buffer) - keep])
        self._pending = buffer[len(buffer) - keep:]
        return out[True], out[False]

    def _show(self, text: str) -> str:
        if not self._region_started:
            text = text.lstrip()
            if not text:
                return ""
            self._region_started = True
        text = self._held_space + text
        shown = text.rstrip()
        self._held_space = text[len(shown):]
        return shown
