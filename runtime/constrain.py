"""Constrained output on the canvas: JSON Schema, regular expressions and Lark grammars that always hold.

Token-mask libraries assume left-to-right decoding, while the entropy-bound sampler accepts tokens anywhere in
the canvas. They meet at a committed frontier (the design of constrained diffusion decoding: Mündler et al.
2025, DINGO 2025), with llguidance as the grammar engine:

1. Each generation holds one llguidance matcher: the committed prefix of its answer. The frontier f is where
   that prefix ends in the current canvas; positions before f are clamped (the sampler never changes them).
2. Before each sampler step, masks for positions f..f+LOOKAHEAD are computed along the model's argmax guesses
   (one llguidance call for the run of draft tokens), up to and including the first guess the grammar refuses;
   the backend masks those rows' logits, so their processed logits, entropy and argmax are those of the allowed
   tokens. Rows beyond stay as they are.
3. The entropy-bound step runs unchanged. The run of accepted positions from f is offered to the matcher; what
   it takes is committed and f advances; the first token it refuses is renoised. Accepted tokens beyond the run
   stay in the canvas (the decoder sees them) and are checked when f reaches them.
4. Tokens the grammar forces are committed at once; EOS is allowed only where the grammar may end. A canvas
   ends when f reaches its end or at EOS; one that is stable or out of steps before that is finished left to
   right from its last step's logits (the argmax where the grammar takes it, else the best allowed token). The
   matcher carries over to the next canvas.
5. Budget: near `max_new_tokens`, every commit must leave room for a way to finish (found by a bounded search
   over single-byte tokens, see `CanvasGuide._plan`); when no room for anything else is left, that way is
   forced. If even the shortest answer does not fit, the output stops at the budget, unfinished.

Nothing here runs without a constraint: `dgrun.generate.Generation` calls in only when one is given.
"""

from __future__ import annotations

import json
import re
import string
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from dgrun.rng import Rng
    from dgrun.sampler import StepResult
    from dgrun.tokenizer import Tokenizer

KINDS = ("json_schema", "regex", "grammar")
LOOKAHEAD = 8  # draft rows masked past the frontier each step (masks cost ~vocab/32 words each; see README)
# JSON is written in json.dumps's default layout unless the schema's "x-guidance" says otherwise: a fixed
# layout spends the canvas on content, and a model cannot wander into unbounded runs of whitespace.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
PLAN_BACKTRACK = 64  # states the finishing search may visit beyond one straight descent (~1 ms each)
COMPILED_CACHE = 32  # constraints kept compiled per model (a server sees the same schema again and again)

# The finishing search tries bytes in this order: closing quotes and brackets first (they end what is open),
# then digits (the shortest values), other punctuation, letters, whitespace, and the rest.
_CLOSERS = b"\"')]}>`"
_PLAN_ORDER = (_CLOSERS + string.digits.encode()
               + bytes(b for b in string.punctuation.encode() if b not in _CLOSERS)
               + string.ascii_letters.encode() + b" \n\t\r")
_PLAN_ORDER += bytes(b for b in range(256) if b not in _PLAN_ORDER)


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401  (the bitmask helpers)
    except ImportError:
        raise ValueError("constrained output (json_schema, regex, grammar) needs the llguidance package: "
                         "pip install llguidance") from None
    return llguidance


class ConstraintError(ValueError):
    """A JSON schema, regex or grammar that cannot be compiled; the message says why, in one line."""


def _one_line(message: str) -> str:
    """llguidance's errors as one line: its message lines, without the source excerpts and carets."""
    lines = (line.strip() for line in message.splitlines())
    return " ".join(line for line in lines if line and not re.fullmatch(r"\^+|\d+ \|.*", line))


class _SentencePieceVocab:
    """What llguidance's TokenizerWrapper reads from a SentencePiece model: each token's bytes (special tokens
    marked with a leading 0xFF, as llguidance expects), the special ids, and encoding.

    llguidance tokenizes text from the middle of an answer (the bytes a grammar forces), so the encoding must give
    exactly those bytes: without the space a model with `add_dummy_prefix` puts in front, and without <unk> for
    characters it has no piece for, or whitespace its normalizer collapses (byte-exact pieces instead, longest
    first)."""

    def __init__(self, processor: Any, eos_ids: Sequence[int]):
        self._processor = processor
        self.tokens: list[bytes] = []
        self.special_token_ids: list[int] = []
        for i in range(processor.get_piece_size()):
            piece = processor.id_to_piece(i)
            if processor.is_byte(i):
                self.tokens.append(bytes([int(piece[3:5], 16)]))  # "<0x0A>"
            elif processor.is_control(i) or processor.is_unknown(i) or processor.is_unused(i):
                self.tokens.append(b"\xff" + piece.encode())
                self.special_token_ids.append(i)
            else:
                self.tokens.append(piece.replace("\u2581", " ").encode())
        self.eos_token_id = eos_ids[0] if eos_ids else processor.eos_id()
        self.bos_token_id = processor.bos_id() if processor.bos_id() >= 0 else None
        specials = set(self.special_token_ids)
        self._ids: dict[bytes, int] = {}
        for i, token in enumerate(self.tokens):
            if i not in specials and token:
                self._ids.setdefault(token, i)
        self._longest = max(map(len, self._ids), default=1)
        self._dummy_prefix = any(processor.id_to_piece(ids[0]).startswith("\u2581")
                                 for ids in map(processor.encode, ("a", "x", "0")) if ids)

    def __call__(self, text: str | bytes) -> list[int]:
        data = text if isinstance(text, bytes) else text.encode()
        ids = list(self._processor.encode(data.decode("utf-8", errors="replace")))
        if self._dummy_prefix and ids and not data.startswith(b" ") and self.tokens[ids[0]].startswith(b" "):
            ids[:1] = self._exact(self.tokens[ids[0]][1:])
        return ids if b"".join(self.tokens[i] for i in ids) == data else self._exact(data)

    def _exact(self, data: bytes) -> list[int]:
        """Pieces spelling `data` byte for byte, longest match first; it stops where no piece fits (the vocabulary
        cannot write that byte: the grammar then finds the answer cannot go on)."""
        ids, at = [], 0
        while at < len(data):
            for length in range(min(self._longest, len(data) - at), 0, -1):
                token = self._ids.get(data[at:at + length])
                if token is not None:
                    ids.append(token)
                    at += length
                    break
            else:
                break
        return ids


class GrammarVocab:
    """A model's vocabulary as llguidance sees it (built once per Model), and the constraints compiled for it."""

    def __init__(self, ll_tokenizer: Any, vocab_size: int, eos_ids: Sequence[int]):
        llg = _llguidance()
        self.ll = ll_tokenizer
        self.vocab_size, self.eos_ids = vocab_size, tuple(eos_ids)
        self.words = (vocab_size + 31) // 32  # int32 words per bitmask row
        self.executor = llg.LLExecutor(num_threads=1)  # one matcher per call: more threads would only spin
        self._compiled: dict[tuple[str, str], Constraint] = {}
        self._plan_tokens: np.ndarray | None = None

    @classmethod
    def of(cls, tokenizer: Tokenizer, vocab_size: int, eos_ids: Sequence[int]) -> GrammarVocab:
        """The vocabulary of a dgrun tokenizer: llguidance reads a `tokenizer.json` itself, and a SentencePiece
        model through its pieces."""
        llg = _llguidance()
        eos = list(eos_ids) or None
        if tokenizer.kind != "sentencepiece":  # a tokenizers.Tokenizer: read from a tokenizer.json, or built
            ll = llg.LLTokenizer(tokenizer.library.to_str(), n_vocab=vocab_size, eos_token=eos)
        else:
            wrapper = llg.TokenizerWrapper(_SentencePieceVocab(tokenizer.library, eos_ids))
            ll = llg.LLTokenizer(wrapper, n_vocab=vocab_size, eos_token=eos)
        return cls(ll, vocab_size, eos_ids)

    def compile(self, json_schema: dict[str, Any] | str | None = None, regex: str | None = None,
                grammar: str | None = None) -> Constraint | None:
        """The constraint for at most one of `json_schema` (a dict or JSON text), `regex` and `grammar` (Lark,
        in llguidance's dialect), or None when none is given. Compiled once, then kept (the last 32)."""
        given = [(kind, value) for kind, value in zip(KINDS, (json_schema, regex, grammar), strict=True)
                 if value is not None]
        if not given:
            return None
        if len(given) > 1:
            names = " and ".join(kind for kind, _ in given)
            raise ValueError(f"give at most one of json_schema, regex and grammar (got {names})")
        kind, value = given[0]
        key = (kind, _source(kind, value))
        constraint = self._compiled.pop(key, None) or Constraint(self, *key)
        self._compiled[key] = constraint  # most recently used last
        if len(self._compiled) > COMPILED_CACHE:
            del self._compiled[next(iter(self._compiled))]
        return constraint

    @property
    def plan_tokens(self) -> np.ndarray:
        """[bytes, 2] (byte value, token id) of the single-byte tokens, in the finishing search's order."""
        if self._plan_tokens is None:
            pairs = []
            for byte in _PLAN_ORDER:
                ids = self.ll.tokenize_bytes(bytes([byte]))
                if len(ids) == 1 and self.ll.decode_bytes(ids) == bytes([byte]):
                    pairs.append((byte, ids[0]))
            self._plan_tokens = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        return self._plan_tokens


def response_format_args(response_format: Any) -> dict[str, Any]:
    """OpenAI's `response_format` as the keyword arguments of `Model.generate`: `{"type": "json_schema",
    "json_schema": {"name", "schema", "strict"}}` → `json_schema=schema`; `{"type": "json_object"}` → any JSON
    object; `{"type": "text"}` or None → none. Anything else is a one-line ValueError (a server's 400)."""
    if response_format is None:
        return {}
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_schema": {"type": "object"}}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if schema is None:
            raise ConstraintError("response_format json_schema needs a json_schema.schema object")
        return {"json_schema": schema}
    raise ConstraintError(f"response_format type must be text, json_object or json_schema, got {kind!r}")


def _source(kind: str, value: Any) -> str:
    """The constraint as text, checked for type: the key it is compiled and cached under."""
    if kind == "json_schema":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConstraintError(f"json_schema is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ConstraintError(f"json_schema must be a JSON object (a dict or its text), got {type(value).__name__}")
        return json.dumps(value)  # key order kept: it is the order properties are written in
    if not isinstance(value, str) or not value:
        raise ConstraintError(f"{kind} must be a non-empty string")
    return value


class Constraint:
    """One compiled JSON schema, regex or Lark grammar for one model's vocabulary, shared by every generation
    that uses it (each gets its own matcher). Make one with `Model.constraint`."""

    def __init__(self, vocab: GrammarVocab, kind: str, source: str):
        llg = _llguidance()
        if kind == "json_schema":
            grammar = llg.LLMatcher.grammar_from_json_schema(source, defaults=JSON_LAYOUT)
        elif kind == "regex":
            grammar = llg.LLMatcher.grammar_from_regex(source)
        else:
            grammar = llg.LLMatcher.grammar_from_lark(source)
        matcher = llg.LLMatcher(vocab.ll, grammar, log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"the {kind.replace('_', ' ')} does not compile: {_one_line(matcher.get_error())}")
        self.vocab, self.kind, self.source = vocab, kind, source
        self._pristine = matcher  # copying it is ~1000x cheaper than compiling again

    def matcher(self) -> Any:
        """A fresh llguidance matcher at the start of the answer."""
        return self._pristine.deep_copy()

    def accepts(self, tokens: Sequence[int]) -> bool:
        """llguidance's own check: `tokens` (a trailing EOS aside) are a complete answer of the grammar."""
        tokens = list(tokens)
        if tokens and tokens[-1] in self.vocab.eos_ids:
            tokens.pop()
        matcher = self.matcher()
        return matcher.try_consume_tokens(tokens) == len(tokens) and matcher.is_accepting()


@dataclass
class GuideStats:
    """What the constraint did during one generation (`stats["constraint"]`)."""

    masked_rows: int = 0  # rows masked before sampler steps
    mask_seconds: float = 0.0  # computing those masks (llguidance) and applying them (the backend)
    frontier_tokens: int = 0  # tokens the sampler accepted at the frontier and the grammar took
    refused: int = 0  # accepted tokens at the frontier the grammar (or the budget) refused: renoised
    forced_tokens: int = 0  # tokens the grammar forced (and EOS after a complete answer)
    finished_tokens: int = 0  # tokens written by finishing a canvas left to right
    finish_masks: int = 0  # of those, the ones where the argmax was refused and a mask chose
    steered_tokens: int = 0  # tokens forced by the budget to finish in time
    plan_seconds: float = 0.0  # searching for ways to finish (budget steering)

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class CanvasGuide:
    """One generation's constrained state: its matcher, the frontier in the current canvas, the budget left.

    `Generation` calls `start_canvas` when it draws a canvas, `mask` before each sampler step, `after_step`
    after it, and `finish` when the canvas is stable or out of steps; the canvas is over when `canvas_done`.
    """

    def __init__(self, constraint: Constraint, canvas_length: int, max_new_tokens: int,
                 eos_ids: Sequence[int]):
        self.constraint, self.vocab = constraint, constraint.vocab
        self.matcher = constraint.matcher()
        self.canvas_length = canvas_length
        self.left = max_new_tokens  # tokens the answer may still take from the frontier on, EOS included
        self.eos = int(eos_ids[0]) if eos_ids else None
        self.eos_ids = frozenset(int(t) for t in eos_ids)
        self.canvas = np.zeros(canvas_length, dtype=np.int64)
        self.frontier = 0
        self.end = 0  # where this canvas's share of the answer ends: its length, or the budget's end
        self.ended = False  # the answer is complete (EOS placed, or the grammar ended and there is no EOS)
        self.stats = GuideStats()
        self._pending: list[int] = []  # taken by the matcher, not placed yet: forced past the canvas's end
        self._version = 0  # changes with the matcher's state: the cached plan is for one version
        self._plan_cache: tuple[int, int, list[int] | None] | None = None  # (version, limit, plan)
        self._need = 0  # the length of the last way to finish found
        plan = self._plan()
        # Steer only when even the shortest known answer fits; otherwise the budget ends it unfinished.
        self.steering = plan is not None and len(plan) + self._eos_cost <= self.left

    # -- the hooks Generation calls ---------------------------------------------------------------------

    @property
    def canvas_done(self) -> bool:
        return self.ended or self.frontier >= self.end

    @property
    def finished(self) -> bool:
        """Nothing more will be written: the answer is complete or the budget is spent."""
        return self.ended or self.left <= 0

    def clamp(self) -> np.ndarray:
        """The committed positions, which the sampler must keep."""
        return np.arange(self.canvas_length) < self.frontier

    def start_canvas(self, canvas: np.ndarray) -> np.ndarray:
        """A new random canvas: tokens forced past the last canvas's end go first, then any the grammar forces."""
        self.canvas = np.array(canvas, dtype=np.int64)
        self.frontier, self.end = 0, min(self.canvas_length, max(self.left, 0))
        pending, self._pending = self._pending, []
        self._place(pending)
        self._force()
        return self.canvas

    def committed(self) -> list[int]:
        """This canvas's share of the answer."""
        return self.canvas[: self.frontier].tolist()

    def mask(self, ops: Any, logits: Any) -> Any:
        """Mask the rows from the frontier along the model's argmax guesses (see the module notes)."""
        started = time.perf_counter()
        f = self.frontier
        rows = min(LOOKAHEAD + 1, self.end - f)
        guesses = ops.argmax_rows(logits, f, f + rows).tolist()
        drafts = guesses[: rows - 1]
        valid = self.matcher.validate_tokens(drafts)
        ends = [i + 1 for i, t in enumerate(drafts[:valid]) if t in self.eos_ids]  # nothing follows an EOS
        bitmask = self._masks(drafts[: min([valid, *ends])])
        logits = ops.mask_rows(logits, f, bitmask)
        self.stats.masked_rows += len(bitmask)
        self.stats.mask_seconds += time.perf_counter() - started
        return logits

    def after_step(self, result: StepResult, rng: Rng) -> None:
        """Commit the accepted run at the frontier; renoise the first token refused; update `result` to match."""
        self.canvas = np.array(result.canvas, dtype=np.int64)
        accepted = np.asarray(result.accepted, dtype=bool).copy()
        f = self.frontier
        run = 0
        while f + run < self.end and accepted[f + run]:
            run += 1
        if run:
            taken = self._commit(self.canvas[f:f + run].tolist())
            self.stats.frontier_tokens += taken
            refused = f + taken
            if taken < run and refused >= self.frontier and not self.canvas_done:
                self.canvas[refused] = int(rng.tokens((1,), self.vocab.vocab_size)[0])
                accepted[refused] = False
                self.stats.refused += 1
        self._merge(result, accepted)

    def finish(self, ops: Any, result: StepResult) -> None:
        """Finish the canvas left to right from its last step (the canvas is stable or out of steps)."""
        processed, argmax = result.processed_logits, np.asarray(result.argmax)
        while not self.canvas_done and not self._pending:
            f = self.frontier
            taken = self._commit(argmax[f:self.end].tolist())
            self.stats.finished_tokens += taken
            if taken or self.canvas_done or self._pending:
                continue
            # The argmax at f is refused: the best token the grammar allows there.
            token = int(ops.argmax_rows(processed, f, f + 1, self._masks([]))[0])
            self.stats.finish_masks += 1
            if self._commit([token]):
                self.stats.finished_tokens += 1
            elif self.steering:  # only the budget refuses an allowed token: finish the answer now, if it can
                self.steering = self._close()  # False: no way to finish in time is known; the budget cuts it
            else:  # the grammar allows no token of this vocabulary here: the answer cannot go on
                self.ended = True
        self._merge(result, np.ones(self.canvas_length, dtype=bool))

    # -- committing -----------------------------------------------------------------------------------------

    @property
    def _eos_cost(self) -> int:
        return 0 if self.eos is None else 1

    def _masks(self, drafts: list[int]) -> np.ndarray:
        """int32 bitmasks [len(drafts) + 1, words]: the frontier's, then after each draft token in turn."""
        from llguidance.numpy import fill_next_token_bitmask, fill_next_token_bitmask_par_with_draft_tokens

        bitmask = np.zeros((len(drafts) + 1, self.vocab.words), dtype=np.int32)
        if drafts:
            fill_next_token_bitmask_par_with_draft_tokens(self.vocab.executor, [(self.matcher, 0, drafts)], bitmask)
        else:  # the draft call refuses an empty run
            fill_next_token_bitmask(self.matcher, bitmask)
        return bitmask

    def _commit(self, tokens: list[int]) -> int:
        """Offer tokens at the frontier: commit the prefix the grammar and the budget allow, then whatever the
        grammar forces after it. Returns how many of `tokens` were committed."""
        tokens = tokens[: self.end - self.frontier]
        taken = self.matcher.try_consume_tokens(tokens)
        self._version += 1
        if self.steering and taken and tokens[taken - 1] not in self.eos_ids and self.left - taken <= self._watch():
            taken = self._affordable(tokens, taken)
        self._place(tokens[:taken])
        self._force()
        return taken

    def _affordable(self, tokens: list[int], taken: int) -> int:
        """How many of the `taken` tokens (all consumed now) leave room for a way to finish; the matcher is left
        after exactly those. A binary search: the state before them had room (or the budget was already lost)."""
        def fits(n: int) -> bool:
            room = self.left - n - self._eos_cost
            return room >= 0 and self._plan(room) is not None

        if fits(taken):
            return taken
        lo, hi, at = 0, taken, taken  # fits(lo) is assumed, fits(hi) is false; the matcher is after `at` tokens
        while hi - lo > 1:
            mid = (lo + hi) // 2
            self._move(tokens, at, mid)
            at = mid
            if fits(mid):
                lo = mid
            else:
                hi = mid
        self._move(tokens, at, lo)
        return lo

    def _move(self, tokens: list[int], at: int, to: int) -> None:
        """Take the matcher from after tokens[:at] to after tokens[:to]."""
        if to < at:
            self.matcher.rollback(at - to)
        else:
            self.matcher.consume_tokens(tokens[at:to])
        self._version += 1

    def _place(self, tokens: list[int]) -> None:
        """Write tokens the matcher has taken at the frontier; those past the canvas's end wait for the next."""
        here = tokens[: max(self.end - self.frontier, 0)]
        self.canvas[self.frontier:self.frontier + len(here)] = here
        self.frontier += len(here)
        self.left -= len(here)
        self._pending.extend(tokens[len(here):])
        if here and here[-1] in self.eos_ids:
            self.ended = True

    def _force(self) -> None:
        """Commit what the grammar forces: its fast-forward tokens, EOS after a complete answer, and the way to
        finish when the budget leaves no room for anything else."""
        while not self.ended and not self._pending and self.left > 0:
            if self.matcher.is_stopped():  # the grammar is complete (only EOS may follow), or it failed
                if self.matcher.is_accepting():
                    self._end()
                else:
                    self.ended = True
                return
            forced = self.matcher.compute_ff_tokens()
            if not forced:
                if self.steering and self.left <= self._watch():
                    plan = self._plan()
                    if plan is not None and len(plan) + self._eos_cost >= self.left:
                        self._close()
                return
            taken = self.matcher.try_consume_tokens(forced)
            self._version += 1
            self.stats.forced_tokens += taken
            self._place(forced[:taken])
            if taken < len(forced):  # the vocabulary cannot spell what the grammar forces: the answer cannot go on
                self.ended = True

    def _close(self) -> bool:
        """Force the shortest known way to finish, then EOS. False when none is known."""
        plan = self._plan()
        if plan is None:
            return False
        self.matcher.consume_tokens(plan)
        self._version += 1
        self.stats.steered_tokens += len(plan)
        self._place(plan)
        self._end()
        return True

    def _end(self) -> None:
        """The answer is complete: EOS follows (placed now, or first in the next canvas)."""
        if self.eos is None:
            self.ended = True
            return
        self.stats.forced_tokens += 1
        self._place([self.eos])  # when the canvas is full, the EOS opens the next one (and ends the answer there)

    def _merge(self, result: StepResult, accepted: np.ndarray) -> None:
        """The step's result as the guide left it: committed tokens in canvas and argmax, accepted."""
        f = self.frontier
        argmax = np.array(result.argmax, dtype=np.int64)
        argmax[:f] = self.canvas[:f]
        accepted[:f] = True
        result.canvas, result.argmax, result.accepted = self.canvas.copy(), argmax, accepted

    # -- budget steering --------------------------------------------------------------------------------

    def _watch(self) -> int:
        """Within this many tokens of the budget's end, commits are checked against a way to finish: one step
        commits at most a canvas, and the way to finish can grow by what it commits."""
        return self._need + 2 * self.canvas_length

    def _plan(self, limit: int | None = None) -> list[int] | None:
        """A short token sequence (at most `limit`, by default what the budget leaves before EOS) that takes
        the matcher to a state where the grammar may end; None if the search finds none in its node budget.

        A depth-first search over single-byte tokens (or the tokens the grammar forces), bytes tried in
        `_PLAN_ORDER` (closers first) after those that let the grammar end, visiting at most `limit` +
        PLAN_BACKTRACK states. Its length bounds the true shortest way in bytes (multi-byte tokens can only
        shorten it); the bytes found are then tokenized canonically if that is shorter and still valid.
        """
        limit = max(self.left - self._eos_cost if limit is None else limit, 0)
        if self._plan_cache is not None and self._plan_cache[:2] == (self._version, limit):
            return self._plan_cache[2]
        started = time.perf_counter()
        plan = self._search(limit)
        self._plan_cache = (self._version, limit, plan)
        if plan is not None:
            self._need = len(plan)
        self.stats.plan_seconds += time.perf_counter() - started
        return plan

    def _search(self, limit: int) -> list[int] | None:
        m = self.matcher
        if m.is_accepting() or m.is_stopped():
            return []
        table = self.vocab.plan_tokens
        path: list[list[int]] = []  # the edges taken: one single-byte token, or a run the grammar forces
        found: list[int] | None = None
        stack = [iter(self._edges(table))]
        nodes = 1
        while stack:
            edge = next(stack[-1], None)
            if edge is None:
                stack.pop()
                if path:
                    m.rollback(len(path.pop()))
                continue
            m.consume_tokens(edge)
            path.append(edge)
            length = sum(map(len, path))
            if m.is_accepting():
                found = [t for e in path for t in e]
                break
            nodes += 1
            if length < limit and nodes <= limit + PLAN_BACKTRACK:
                stack.append(iter(self._edges(table)))
            else:
                m.rollback(len(path.pop()))
        m.rollback(sum(map(len, path)))
        if found is None or len(found) > limit:
            return None
        return self._shorter(found)

    def _edges(self, table: np.ndarray) -> list[list[int]]:
        """Where the search may go from here: the tokens the grammar forces, if any (it allows nothing else: a
        forced run is allowed only as its canonical tokens), else the single-byte tokens it allows, those after
        which it may end first."""
        m = self.matcher
        forced = m.compute_ff_tokens()
        if forced:
            return [forced]
        mask = np.frombuffer(m.compute_bitmask(), dtype="<u4")
        ids = table[:, 1]
        allowed = ids[(mask[ids >> 5] >> (ids & 31).astype(np.uint32)) & 1 == 1].tolist()
        ending = []
        for token in allowed:
            m.consume_token(token)
            if m.is_accepting():
                ending.append(token)
            m.rollback(1)
        return [[t] for t in ending] + [[t] for t in allowed if t not in ending]

    def _shorter(self, plan: list[int]) -> list[int]:
        """The plan's bytes tokenized canonically, when that is shorter and still takes the grammar to its end."""
        canonical = self.vocab.ll.tokenize_bytes(self.vocab.ll.decode_bytes(plan))
        if len(canonical) >= len(plan):
            return plan
        m = self.matcher
        taken = m.try_consume_tokens(canonical)
        ok = taken == len(canonical) and m.is_accepting()
        m.rollback(taken)
        return canonical if ok else plan
