"""`dgrun.load` and `Model`: the Python API that the CLI and embedding programs use."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from gguf import TokenType

from dgrun.backends import get_backend
from dgrun.chat import ChatTemplate, ChatTemplateError, Message
from dgrun.config import ConfigError, GenerationConfig, ModelConfig
from dgrun.format import FormatError, GGUFFile
from dgrun.generate import Commit, Draft, GenerationParams, Stats, generate_events
from dgrun.model import DiffusionGemma, KVCache, tensor_shapes
from dgrun.rng import DefaultRng, Rng
from dgrun.tokenizer import CHAT_TEMPLATE_KEY, NoTokenizerError, Tokenizer


@dataclass
class GenerationOutput:
    """What `Model.generate` returns: new tokens only (EOS included if one ended it), their text, and stats."""

    tokens: list[int]
    text: str | None
    stats: dict[str, Any]


class ModelBusyError(RuntimeError):
    """A second thread or stream tried to generate with a Model that is already generating."""


_SHIPPED_DIR = Path(__file__).parent / "models"


def default_model_path() -> Path:
    """The small demo model shipped inside the package."""
    return _SHIPPED_DIR / "demo.dgf"


def shipped_models() -> dict[str, Path]:
    """The models installed with the package, by name ("demo", "sudoku"): the .dgf files in dgrun/models."""
    return {path.stem: path for path in sorted(_SHIPPED_DIR.glob("*.dgf"))}


def resolve_model(model: str | Path | None) -> Path:
    """The file `model` names: a file that exists, else a shipped model's name; the demo model for None.

    A name that is neither raises `FormatError` listing the shipped models.
    """
    if model is None:
        return default_model_path()
    path = Path(model)
    if path.is_file():
        return path
    shipped = shipped_models()
    if isinstance(model, str) and model in shipped:
        return shipped[model]
    if path.exists():  # a folder, a FIFO...: the reader refuses it with its own message
        return path
    names = ", ".join(shipped) or "none installed"
    raise FormatError(f"cannot open {model}: no such file, and no shipped model of that name (shipped: {names})")


def load(path: str | Path | None = None, backend: str = "auto") -> Model:
    """Open a .dgf file (memory-mapped) on a backend: "auto", "numpy", "cpu", "cuda" or "mlx".

    `path` is a file, or the name of a model shipped in the package (`shipped_models()`: "demo", "sudoku");
    with no path, the demo model. A file that exists wins over a name. Bad files raise `dgrun.FormatError`.
    """
    return Model(resolve_model(path), backend)


class Model:
    """A loaded DiffusionGemma. One generation at a time: a second concurrent one raises ModelBusyError.

    Text: `tokenize`/`detokenize`. Generation: `generate`/`stream` (continuation), `chat` (chat template),
    `infill`/`stream_infill` (text between a prefix and a suffix), `edit`/`stream_edit` (rewrite character
    ranges in place); multi-turn chat with a kept encoder cache: `dgrun.ChatSession`.
    Use as a context manager or call `close()` to release the file mapping.
    """

    def __init__(self, path: Path, backend: str = "auto"):
        self.path = Path(path)
        self._file = GGUFFile(self.path)
        try:
            self.config = ModelConfig.from_metadata(self._file.metadata)
            self.generation_config = GenerationConfig.from_metadata(self._file.metadata)
            shapes = tensor_shapes(self.config, tied_output="output.weight" not in self._file.tensors)
            _check_tensors(self._file, shapes)
        except ConfigError as e:
            self._file.close()
            raise FormatError(f"{self.path}: {e}") from None
        try:
            self.backend = get_backend(backend)
        except BaseException:
            self._file.close()
            raise
        unsupported = {t.ggml_type.name for t in self._file.tensors.values()
                       if t.name in shapes and t.ggml_type not in self.backend.supported_types}
        if unsupported:
            self._file.close()
            raise FormatError(f"backend {self.backend.name} cannot run tensor types {sorted(unsupported)}")
        self.tokenizer = Tokenizer.from_file(self._file)
        self.chat_template: str | None = self._file.get(CHAT_TEMPLATE_KEY)
        self._compiled_template: ChatTemplate | None = None
        weights = self.backend.load_weights(self._file, list(shapes))
        self.graph = DiffusionGemma(self.config, weights, self.backend)
        self._lock = threading.Lock()

    # -- text ----------------------------------------------------------------------------------------

    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text` (BOS as the file says unless `add_bos` is given)."""
        if self.tokenizer is None:
            raise NoTokenizerError(f"{self.path.name} has no tokenizer (converted with --no-tokenizer): "
                                   "pass token ids instead of text")
        return self.tokenizer.encode(text, add_bos)

    def detokenize(self, ids: list[int]) -> str | None:
        """Text of `ids`, or None for a model without tokenizer."""
        return None if self.tokenizer is None else self.tokenizer.decode(ids)

    def token_piece(self, token_id: int) -> str:
        """A token's vocabulary entry as stored in the file: for special tokens, the text templates write ("<eos>")."""
        pieces = self._file.get("tokenizer.ggml.tokens")
        if pieces is None or not 0 <= token_id < len(pieces):
            raise NoTokenizerError(f"{self.path.name} has no vocabulary entry for token {token_id}")
        return pieces[token_id]

    def tokenize_chat(self, text: str, continuation: bool = False) -> list[int]:
        """Token ids of text a chat template wrote: special-token texts ("<bos>", "<end_of_turn>") become their ids.

        BOS is prepended as the file says unless the text already starts with it (the template wrote it) or
        `continuation` is set (the text continues a conversation the encoder has already read).
        """
        if self.tokenizer is None:
            return self.tokenize(text)  # raises NoTokenizerError
        bos = None if self.tokenizer.bos_id is None else self.token_piece(self.tokenizer.bos_id)
        add_bos = False if continuation or (bos and text.startswith(bos)) else None
        if self.tokenizer.kind == "huggingface":
            return self.tokenize(text, add_bos)  # tokenizers matches special tokens in text by itself
        # SentencePiece reads "<s>" as three characters: split the control tokens out first, as transformers'
        # tokenizers do, and encode the text between them without BOS.
        ids = self.tokenize("", add_bos)
        for part in self._control_tokens_pattern.split(text):
            if part in self._control_token_ids:
                ids.append(self._control_token_ids[part])
            elif part:
                ids.extend(self.tokenize(part, add_bos=False))
        return ids

    @cached_property
    def _control_token_ids(self) -> dict[str, int]:
        pieces = self._file.get("tokenizer.ggml.tokens") or []
        types = self._file.get("tokenizer.ggml.token_type")
        control: Any = [] if types is None else np.flatnonzero(np.asarray(types) == int(TokenType.CONTROL))
        return {pieces[i]: int(i) for i in control if pieces[i]}

    @cached_property
    def _control_tokens_pattern(self) -> re.Pattern[str]:
        # Longest first, so "<start_of_turn>" is not read as a shorter control token it happens to contain.
        names = sorted(self._control_token_ids, key=len, reverse=True)
        return re.compile("(" + "|".join(map(re.escape, names)) + ")" if names else "(?!)")

    # -- chat ----------------------------------------------------------------------------------------

    def _compiled_chat_template(self) -> ChatTemplate:
        if self.chat_template is None:
            raise ChatTemplateError(f"{self.path.name} has no chat template (tokenizer.chat_template)")
        if self._compiled_template is None or self._compiled_template.source != self.chat_template:
            special = {}  # the strings transformers passes as its special_tokens_map
            for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding"),
                              ("unk_token", "unknown")):
                token_id = self._file.get(f"tokenizer.ggml.{key}_token_id")
                if token_id is not None:
                    special[name] = self.token_piece(int(token_id))
            self._compiled_template = ChatTemplate(self.chat_template, special)
        return self._compiled_template

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True,
                            tokenize: bool = False) -> str | list[int]:
        """Render OpenAI-style messages ({"role", "content"} dicts) with the chat template.

        The text is exactly what transformers' `apply_chat_template(messages, tokenize=False)` renders; with
        `tokenize=True`, its token ids (see `tokenize_chat`). The template is the file's; assign another source
        to `Model.chat_template` to use that instead. Raises `ChatTemplateError` (a ValueError) when there is
        no template or the template refuses the conversation.
        """
        text = self._compiled_chat_template().render(messages, add_generation_prompt)
        return self.tokenize_chat(text) if tokenize else text

    def chat(self, messages: list[Message], **params: Any) -> GenerationOutput:
        """The assistant's answer to `messages`; parameters as in `generate`. For multi-turn, see `ChatSession`."""
        return self.generate(self.apply_chat_template(messages, tokenize=True), **params)

    # -- generation ----------------------------------------------------------------------------------

    def resolve_params(self, **overrides: Any) -> GenerationParams:
        """Caller's values over the file's generation_config over transformers' global defaults."""
        values = self.generation_config.resolved()
        adaptive = overrides.pop("adaptive_stopping", True)
        for name, value in overrides.items():
            if value is not None:
                values[name] = value
        params = GenerationParams(**values, eos_token_ids=list(self.generation_config.eos_token_ids))
        if not adaptive:
            params.stability_threshold = params.confidence_threshold = None
        params.validate()
        return params

    def _prompt_ids(self, prompt: str | list[int]) -> np.ndarray:
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        ids_array = np.asarray(ids)
        if ids_array.ndim != 1 or not np.issubdtype(ids_array.dtype, np.integer):
            raise ValueError("a prompt must be a string or a list of integer token ids")
        bad = ids_array[(ids_array < 0) | (ids_array >= self.config.vocab_size)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        return ids_array.astype(np.int64)

    def _check_context(self, used: int, params: GenerationParams) -> None:
        canvases = -(-params.max_new_tokens // self.config.canvas_length)
        needed = used + canvases * self.config.canvas_length
        if needed > self.config.max_position_embeddings:
            raise ValueError(f"prompt ({used} tokens) plus {canvases} canvas(es) of {self.config.canvas_length} "
                             f"exceeds the model's context of {self.config.max_position_embeddings} tokens")

    def stream(
        self,
        prompt: str | list[int],
        *,
        seed: int | None = None,
        rng: Rng | None = None,
        cache: KVCache | None = None,
        start_canvas: np.ndarray | None = None,
        clamp: np.ndarray | None = None,
        stats: Stats | None = None,
        **params: Any,
    ) -> Iterator[Draft | Commit]:
        """Generator of events: a `Draft` after every denoising step, a `Commit` after every canvas.

        Parameters as in `generate`. `cache` continues from an earlier encoder cache (multi-turn); the prompt
        is then only the new, uncached tokens.
        """
        ids = self._prompt_ids(prompt)
        resolved = self.resolve_params(**params)
        cache = self.graph.new_cache() if cache is None else cache
        self._check_context(cache.length + len(ids), resolved)
        if not self._lock.acquire(blocking=False):
            raise ModelBusyError("this Model is already generating (another thread or an unfinished stream); "
                                 "use one Model per thread")
        try:
            yield from generate_events(self.graph, ids, resolved, rng or DefaultRng(seed), cache,
                                       stats if stats is not None else Stats(), start_canvas, clamp)
        finally:
            self._lock.release()

    def generate(
        self,
        prompt: str | list[int],
        max_new_tokens: int | None = None,
        max_denoising_steps: int | None = None,
        t_min: float | None = None,
        t_max: float | None = None,
        entropy_bound: float | None = None,
        stability_threshold: int | None = None,
        confidence_threshold: float | None = None,
        seed: int | None = None,
        rng: Rng | None = None,
        adaptive_stopping: bool = True,
    ) -> GenerationOutput:
        """Generate after `prompt` (text, tokenized with BOS per the file, or token ids used verbatim).

        A None parameter takes the file's value (its generation_config.json), else transformers' default.
        `adaptive_stopping=False` runs every canvas for exactly `max_denoising_steps` steps.
        `seed` makes the default RNG reproducible; `rng` injects one (see `dgrun.rng`).
        """
        stats = Stats()
        events = self.stream(prompt, seed=seed, rng=rng, stats=stats, max_new_tokens=max_new_tokens,
                             max_denoising_steps=max_denoising_steps, t_min=t_min, t_max=t_max,
                             entropy_bound=entropy_bound, stability_threshold=stability_threshold,
                             confidence_threshold=confidence_threshold, adaptive_stopping=adaptive_stopping)
        return self._collect(events, stats)

    # -- infill and edit: one canvas, some positions clamped -----------------------------------------

    def stream_infill(self, prefix: str, suffix: str, fill_length: int | None = None, *, seed: int | None = None,
                      rng: Rng | None = None, stats: Stats | None = None, **params: Any) -> Iterator[Draft | Commit]:
        """Events of `infill`; its one `Commit` holds the gap's tokens. Bad arguments raise ValueError at once."""
        prompt = self.tokenize(prefix)
        suffix_ids = self.tokenize(suffix, add_bos=False)
        canvas_length = self.config.canvas_length
        if len(suffix_ids) >= canvas_length:
            raise ValueError(f"the suffix is {len(suffix_ids)} tokens; it must be shorter than the canvas "
                             f"({canvas_length} tokens)")
        room = canvas_length - len(suffix_ids)
        fill_length = room if fill_length is None else fill_length
        if not (isinstance(fill_length, (int, np.integer)) and 1 <= fill_length <= room):
            raise ValueError(f"fill_length must be an integer in 1..{room} (the canvas of {canvas_length} tokens "
                             f"minus the suffix's {len(suffix_ids)}), got {fill_length!r}")
        canvas = np.concatenate([np.zeros(fill_length, dtype=np.int64), np.asarray(suffix_ids, dtype=np.int64),
                                 self._end_padding(room - fill_length)])
        free = np.arange(canvas_length) < fill_length
        return self._stream_one_canvas(prompt, canvas, free, range(fill_length), seed, rng, stats, params)

    def infill(self, prefix: str, suffix: str, fill_length: int | None = None, **params: Any) -> GenerationOutput:
        """Write the text between `prefix` and `suffix`, in one canvas.

        The prefix is encoded as a prompt. The canvas is laid out as [gap | suffix | padding]: `fill_length`
        free positions (default: all the room the suffix leaves), then the suffix's tokens, then EOS and pad
        tokens up to the canvas length; suffix and padding are clamped (never change). The result is the gap's
        tokens, without the EOS/pad tokens the model may write to leave part of the gap empty.
        Parameters as in `generate`, except `max_new_tokens` (the canvas is the limit).
        """
        stats = Stats()
        return self._collect(self.stream_infill(prefix, suffix, fill_length, stats=stats, **params), stats)

    def stream_edit(self, text: str, spans: Sequence[tuple[int, int]] = (), context: str | list[int] | None = None,
                    *, blank: str | None = None, seed: int | None = None, rng: Rng | None = None,
                    stats: Stats | None = None, **params: Any) -> Iterator[Draft | Commit]:
        """Events of `edit`; its one `Commit` holds the edited text's tokens. Bad arguments raise ValueError at once."""
        ids, blanks = self._edit_tokens(text, blank)
        canvas_length = self.config.canvas_length
        if not ids:
            raise ValueError("the text to edit is empty")
        if len(ids) > canvas_length:
            raise ValueError(f"the text to edit is {len(ids)} tokens, longer than one canvas ({canvas_length} tokens)")
        starts, ends = self._token_char_ranges(ids, text)
        free = np.zeros(canvas_length, dtype=bool)
        free[: len(ids)] = blanks
        for span in spans:
            start, end = span
            if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= len(text)):
                raise ValueError(f"span {span!r} is not a non-empty character range inside the text (0..{len(text)})")
            free[: len(ids)] |= (starts < end) & (ends > start)
        if not free.any():
            raise ValueError("no span covers any token of the text" if blank is None or spans else
                             f"the text has no blank {blank!r} to fill")
        canvas = np.concatenate([np.asarray(ids, dtype=np.int64), self._end_padding(canvas_length - len(ids))])
        prompt = self.tokenize("") if context is None else context
        return self._stream_one_canvas(prompt, canvas, free, range(len(ids)), seed, rng, stats, params)

    def edit(self, text: str, spans: Sequence[tuple[int, int]] = (), context: str | list[int] | None = None, *,
             blank: str | None = None, **params: Any) -> GenerationOutput:
        """Rewrite the character ranges `spans` ([(start, end), ...]) of `text`, and/or fill its blanks, keeping the
        rest token-exact.

        `text` (at most one canvas of tokens, no BOS) follows `context` (a prompt; default: BOS alone). The
        canvas starts as `text`'s tokens: those overlapping a span are renoised, every other one is clamped, and
        the rest of the canvas is clamped EOS/pad padding. With `blank` (a string that is one token of the
        vocabulary, e.g. "0" for a Sudoku's empty cells), every occurrence of it in `text` is one position to
        fill: the text is tokenized around the occurrences, so each is exactly that one token. A rewritten span
        keeps its token count; EOS/pad tokens the model writes there are dropped, so it can shorten. Returns the
        whole edited text. Parameters as in `generate`, except `max_new_tokens`.
        """
        stats = Stats()
        return self._collect(self.stream_edit(text, spans, context, blank=blank, stats=stats, **params), stats)

    def _edit_tokens(self, text: str, blank: str | None) -> tuple[list[int], np.ndarray]:
        """`text`'s token ids, and which of them are `blank`: the text between blanks is tokenized piece by piece, so
        every occurrence of `blank` is one token of its own."""
        if blank is None:
            ids = self.tokenize(text, add_bos=False)
            return ids, np.zeros(len(ids), dtype=bool)
        blank_ids = self.tokenize(blank, add_bos=False) if isinstance(blank, str) and blank else []
        if len(blank_ids) != 1 or self.detokenize(blank_ids) != blank:
            raise ValueError(f"the blank {blank!r} is not one token of {self.path.name}'s vocabulary")
        ids: list[int] = []
        blanks: list[bool] = []
        for index, piece in enumerate(text.split(blank)):
            if index:
                ids.append(blank_ids[0])
                blanks.append(True)
            piece_ids = self.tokenize(piece, add_bos=False) if piece else []
            ids.extend(piece_ids)
            blanks.extend([False] * len(piece_ids))
        decoded = self.detokenize(ids)
        if decoded != text:  # e.g. SentencePiece's dummy prefix puts a space before every piece
            raise ValueError(f"the text does not survive tokenization around the blank {blank!r} unchanged (it "
                             f"decodes to {decoded!r})")
        return ids, np.asarray(blanks, dtype=bool)

    def _stream_one_canvas(self, prompt: str | list[int], canvas: np.ndarray, free: np.ndarray, output: range,
                           seed: int | None, rng: Rng | None, stats: Stats | None,
                           params: dict[str, Any]) -> Iterator[Draft | Commit]:
        """Denoise one canvas whose non-`free` positions are clamped; commit the non-special tokens of `output`."""
        if params.get("max_new_tokens") is not None:
            raise ValueError("infill and edit write exactly one canvas: max_new_tokens does not apply")
        params["max_new_tokens"] = self.config.canvas_length
        rng = rng or DefaultRng(seed)
        stats = stats if stats is not None else Stats()
        start = np.where(free, rng.tokens(canvas.shape, self.config.vocab_size), canvas)
        dropped = {t for t in (*self.generation_config.eos_token_ids, self._pad_id) if t is not None}
        last_draft = None
        for event in self.stream(prompt, rng=rng, stats=stats, start_canvas=start, clamp=~free, **params):
            if isinstance(event, Draft):
                last_draft = event
                yield event
                continue
            # The Commit is cut at the canvas's first EOS, which may be padding: read the whole final canvas.
            assert last_draft is not None, "a canvas is always denoised at least once before its commit"
            final = last_draft.tokens
            tokens = [int(final[i]) for i in output if not (free[i] and final[i] in dropped)]
            stats.new_tokens = len(tokens)
            yield Commit(event.canvas_index, tokens, event.steps, True)

    @property
    def _pad_id(self) -> int | None:
        pad = self.generation_config.pad_token_id
        return self._file.get("tokenizer.ggml.padding_token_id") if pad is None else int(pad)

    def _end_padding(self, count: int) -> np.ndarray:
        """`count` tokens that say "the text ended": EOS, then pad tokens (EOS again if the file has no pad)."""
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        eos = self.generation_config.eos_token_ids
        pad = self._pad_id if self._pad_id is not None else (eos[0] if eos else None)
        if pad is None:
            raise ValueError(f"{self.path.name} defines neither EOS nor pad tokens to fill the rest of the canvas")
        return np.asarray([eos[0] if eos else pad] + [pad] * (count - 1), dtype=np.int64)

    def _token_char_ranges(self, ids: list[int], text: str) -> tuple[np.ndarray, np.ndarray]:
        """Each token's [start, end) character range in `text`, from the lengths of decoded prefixes.

        Works for every tokenizer kind, provided `text` decodes back unchanged; otherwise a span could not be
        mapped faithfully (nor the untouched text reproduced byte for byte), so it is refused.
        """
        decoded = self.detokenize(ids)
        if decoded != text:
            raise ValueError(f"the text does not survive tokenization unchanged (it decodes to {decoded!r}), so "
                             "character spans cannot be mapped to tokens")
        ends = np.maximum.accumulate([len(self.detokenize(ids[: k + 1]) or "") for k in range(len(ids))])
        starts = np.concatenate([[0], ends[:-1]])
        return starts, ends

    def _collect(self, events: Iterator[Draft | Commit], stats: Stats) -> GenerationOutput:
        tokens: list[int] = []
        for event in events:
            if isinstance(event, Commit):
                tokens.extend(event.tokens)
        return GenerationOutput(tokens, self.detokenize(tokens), stats.as_dict())

    # -- introspection and lifetime ------------------------------------------------------------------

    @property
    def info(self) -> dict[str, Any]:
        """Config, generation defaults, quant mix (bytes per tensor type) and backend."""
        mix: dict[str, int] = {}
        for t in self._file.tensors.values():
            mix[t.ggml_type.name] = mix.get(t.ggml_type.name, 0) + t.nbytes
        return {
            "path": str(self.path), "backend": self.backend.name,
            "config": vars(self.config).copy(), "generation": vars(self.generation_config).copy(),
            "quant_mix_bytes": mix, "tokenizer": None if self.tokenizer is None else self.tokenizer.kind,
            "chat_template": self.chat_template is not None,
        }

    def close(self) -> None:
        """Release the memory map. The Model is unusable afterwards."""
        self._file.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_tensors(gguf: GGUFFile, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every tensor the graph reads exists with the shape the config implies (before any native call)."""
    for name, shape in shapes.items():
        info = gguf.tensors.get(name)
        if info is None:
            raise ConfigError(f"tensor {name} is missing")
        if tuple(info.shape) != tuple(shape):
            raise ConfigError(f"tensor {name} has shape {tuple(info.shape)}, the config implies {tuple(shape)}")
