"""`dgrun.load` and `Model`: the Python API that the CLI and embedding programs use."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from gguf import TokenType

from dgrun.backends import get_backend
from dgrun.chat import ChatTemplate, ChatTemplateError, Message
from dgrun.config import ConfigError, GenerationConfig, ModelConfig
from dgrun.constrain import Constraint, GrammarVocab
from dgrun.format import FormatError, GGUFFile
from dgrun.generate import (
    MAX_BATCH,
    CanvasLayout,
    Commit,
    Draft,
    Generation,
    GenerationParams,
    Request,
    Stats,
    _is_int,
    batch_events,
)
from dgrun.lora import LoraSet, LoraSpec, parse_specs
from dgrun.model import DiffusionGemma, KVCache, tensor_shapes
from dgrun.rng import DefaultRng, Rng
from dgrun.tokenizer import CHAT_TEMPLATE_KEY, NoTokenizerError, Tokenizer
from dgrun.vision import (
    ImagePatches,
    ImageSource,
    ImageTokens,
    PromptImages,
    VisionConfig,
    VisionTower,
    chat_images,
    check_runs,
    expand_placeholders,
    load_image,
    vision_tensor_shapes,
)


@dataclass
class GenerationOutput:
    """What `Model.generate` returns: new tokens only (EOS included if one ended it), their text, and stats."""

    tokens: list[int]
    text: str | None
    stats: dict[str, Any]


class ModelBusyError(RuntimeError):
    """A second thread or stream tried to generate with a Model that is already generating (or that an open
    `dgrun.Scheduler` owns)."""


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


def load(path: str | Path | None = None, backend: str = "auto", lora: Sequence[LoraSpec] | None = None,
         merge_lora: bool = False, mmproj: str | Path | None = None) -> Model:
    """Open a .dgf file (memory-mapped) on a backend: "auto", "numpy", "cpu", "cuda" or "mlx".

    `path` is a file, or the name of a model shipped in the package (`shipped_models()`: "demo", "sudoku");
    with no path, the demo model. A file that exists wins over a name. Bad files raise `dgrun.FormatError`.
    `lora`: LoRA adapter files (`convert-lora-to-dgf`), each a path (scale 1) or a (path, scale) pair, applied
    unmerged (y = W x + scale * alpha / r * B(A x)); the encoder's deltas act in encoder passes, the decoder's
    in decoder passes. `merge_lora=True` adds them into float32 copies of the weights at load instead (float
    bases only; faster passes, more memory, fixed scales). The vision tower is the file's own, or the one in
    `mmproj` (a llama.cpp-style mmproj file, as `convert-hf-to-dgf --mmproj-out` writes).
    """
    return Model(resolve_model(path), backend, lora, merge_lora, mmproj)


class Model:
    """A loaded DiffusionGemma. One generation at a time: a second concurrent one raises ModelBusyError.

    Text: `tokenize`/`detokenize`. Generation: `generate`/`stream` (continuation, optionally after `images`),
    `chat` (chat template; images as content parts),
    `infill`/`stream_infill` (text between a prefix and a suffix), `edit`/`stream_edit` (rewrite character
    ranges in place); multi-turn chat with a kept encoder cache: `dgrun.ChatSession`. Several prompts in one
    batch, each getting exactly its own tokens: `generate_batch`/`stream_batch`; requests that come and go:
    `request`/`infill_request`/`edit_request` submitted to a `dgrun.Scheduler`.
    Use as a context manager or call `close()` to release the file mapping.
    """

    def __init__(self, path: Path, backend: str = "auto", lora: Sequence[LoraSpec] | None = None,
                 merge_lora: bool = False, mmproj: str | Path | None = None):
        self.path = Path(path)
        lora_specs = parse_specs(lora)
        self._file = GGUFFile(self.path)
        self._vision_file: GGUFFile | None = None
        self.lora: LoraSet | None = None
        try:
            self.config = ModelConfig.from_file(self._file)
            self.generation_config = GenerationConfig.from_metadata(self._file.metadata)
            shapes = tensor_shapes(self.config, tied_output="output.weight" not in self._file.tensors)
            _check_tensors(self._file, shapes)
            self.image_tokens = ImageTokens.from_metadata(self._file.metadata, self.config.vocab_size)
            vision_file = self._file if mmproj is None else GGUFFile(mmproj)
            if vision_file is not self._file:
                self._vision_file = vision_file
            vision_config = self._vision_config(vision_file, mmproj)
            self.backend = get_backend(backend)
            vision_shapes = {} if vision_config is None else vision_tensor_shapes(vision_config)
            for file, names in ((self._file, shapes), (vision_file, vision_shapes)):
                unsupported = {file.tensors[n].ggml_type.name for n in names
                               if file.tensors[n].ggml_type not in self.backend.supported_types}
                if unsupported:
                    raise FormatError(f"backend {self.backend.name} cannot run tensor types {sorted(unsupported)}")
            self.tokenizer = Tokenizer.from_file(self._file)
            self.chat_template: str | None = self._file.get(CHAT_TEMPLATE_KEY)
            self._compiled_template: ChatTemplate | None = None
            weights = self.backend.load_weights(self._file, list(shapes))
            if lora_specs:
                self.lora = LoraSet.load(lora_specs, self.config, self.backend, weights, self._file, merge_lora)
            self.graph = DiffusionGemma(self.config, weights, self.backend, self.lora)
            self.vision = None if vision_config is None else VisionTower(vision_config, vision_file, self.backend)
        except ConfigError as e:
            self.close()
            raise FormatError(f"{self.path}: {e}") from None
        except BaseException:
            self.close()
            raise
        self._lock = threading.Lock()
        self._grammar_vocab: GrammarVocab | None = None

    def _vision_config(self, file: GGUFFile, mmproj: str | Path | None) -> VisionConfig | None:
        """The vision tower's config (its tensors checked), or None for a text-only file."""
        where = self.path if mmproj is None else Path(mmproj)
        meta = file.metadata
        if "clip.vision.projector_type" not in meta and "clip.projector_type" not in meta:
            if mmproj is not None:
                raise ConfigError(f"{where} is not an mmproj file (it has no clip.vision.projector_type)")
            return None
        try:
            config = VisionConfig.from_metadata(meta, file.tensors)
            _check_tensors(file, vision_tensor_shapes(config))
        except ConfigError as e:
            raise ConfigError(f"{where}: vision tower: {e}") from None
        if config.projection_dim != self.config.hidden_size:
            raise ConfigError(f"{where}: the vision projector maps to {config.projection_dim} values, this model's "
                              f"hidden size is {self.config.hidden_size}: not this model's mmproj file")
        if self.image_tokens is None:
            raise ConfigError(f"{self.path} does not name its image tokens (converted before dgrun read images): "
                              "convert the checkpoint again")
        return config

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
                            tokenize: bool = False, **variables: Any) -> str | list[int]:
        """Render OpenAI-style messages ({"role", "content"} dicts) with the chat template.

        The text is exactly what transformers' `apply_chat_template(messages, tokenize=False)` renders; with
        `tokenize=True`, its token ids (see `tokenize_chat`), each image's token expanded to its run of image tokens
        as transformers' processor expands it. `variables` reach the template as transformers passes its extra
        keyword arguments (e.g. `enable_thinking=True`). The template is the file's; assign another source to
        `Model.chat_template` to use that instead. Raises `ChatTemplateError` (a ValueError) when there is no
        template or the template refuses the conversation.
        """
        text, images = self._render_chat(messages, add_generation_prompt, **variables)
        if not tokenize:
            return text
        return self._prompt_with_images(text, images)[0].tolist() if images else self.tokenize_chat(text)

    def chat(self, messages: list[Message], **params: Any) -> GenerationOutput:
        """The assistant's answer to `messages`; parameters as in `generate`. For multi-turn, see `ChatSession`.

        A message's content may be a list of parts: {"type": "text", "text": ...} and images as
        {"type": "image", "image": PATH | PIL.Image | bytes} (or an OpenAI {"type": "image_url", "image_url":
        {"url": "data:image/...;base64,..."}}), placed where the chat template writes the image token.
        """
        rendered, images = self._render_chat(messages)
        return self.generate(rendered if images else self.tokenize_chat(rendered), images=images or None, **params)

    def _render_chat(self, messages: list[Message], add_generation_prompt: bool = True,
                     **variables: Any) -> tuple[str, list[ImageSource]]:
        """The rendered conversation and its images in order (image parts become plain image parts for the
        template, as transformers passes them)."""
        conversation, images = chat_images(messages)
        return self._compiled_chat_template().render(conversation, add_generation_prompt, **variables), images

    # -- generation ----------------------------------------------------------------------------------

    def constraint(self, json_schema: dict[str, Any] | str | None = None, regex: str | None = None,
                   grammar: str | None = None) -> Constraint | None:
        """Compile at most one of `json_schema` (a dict or JSON text), `regex` and `grammar` (Lark, in llguidance's
        dialect) for this model's vocabulary; None when none is given. Compiled constraints are kept, so a
        schema used again costs nothing. One that cannot compile raises `ConstraintError` (a ValueError)."""
        if json_schema is None and regex is None and grammar is None:
            return None
        if self.tokenizer is None:
            raise NoTokenizerError(f"{self.path.name} has no tokenizer: constrained output needs one")
        eos = self.generation_config.eos_token_ids
        if self._grammar_vocab is None or self._grammar_vocab.eos_ids != tuple(eos):
            self._grammar_vocab = GrammarVocab.of(self.tokenizer, self.config.vocab_size, eos)
        return self._grammar_vocab.compile(json_schema, regex, grammar)

    def resolve_params(self, **overrides: Any) -> GenerationParams:
        """Caller's values over the file's generation_config over transformers' global defaults; `json_schema`,
        `regex` or `grammar` compile into the params' constraint (see `constraint`)."""
        values = self.generation_config.resolved()
        adaptive = overrides.pop("adaptive_stopping", True)
        constraint = self.constraint(*(overrides.pop(kind, None) for kind in ("json_schema", "regex", "grammar")))
        for name, value in overrides.items():
            if value is not None:
                values[name] = value
        params = GenerationParams(**values, eos_token_ids=list(self.generation_config.eos_token_ids),
                                  constraint=constraint)
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

    def request(self, prompt: str | list[int], *, seed: int | None = None, rng: Rng | None = None,
                cache: KVCache | None = None, images: Sequence[ImageSource] | None = None,
                **params: Any) -> Request:
        """A validated generation, ready for `dgrun.Scheduler.submit` (bad arguments raise ValueError here).

        Arguments as in `stream`; for a chat, pass `apply_chat_template(messages, tokenize=True)` as the prompt.
        """
        return self._request(prompt, self.resolve_params(**params), rng or DefaultRng(seed), cache, images)

    def _request(self, prompt: str | list[int], params: GenerationParams, rng: Rng,
                 cache: KVCache | None, images: Sequence[ImageSource] | None = None) -> Request:
        used = 0 if cache is None else cache.length
        if images:
            ids, prompt_images = self._prompt_with_images(prompt, images, used)
        else:
            ids, prompt_images = self._prompt_ids(prompt), None
            if self.image_tokens is not None and (ids == self.image_tokens.image_token_id).any():
                # As transformers refuses image tokens without pixel_values: their embeddings would be garbage.
                raise ValueError("the prompt holds image tokens but no images were given: pass them with images=[...] "
                                 "(multi-turn sessions and batches take text only)")
        self._check_context(used + len(ids), params)
        return Request(ids, params, rng, cache, images=prompt_images)

    def tokenize_with_images(self, prompt: str | list[int],
                             images: Sequence[ImageSource]) -> tuple[list[int], list[ImagePatches]]:
        """(token ids, preprocessed images) of a prompt with images, laid out as `generate` lays them out (see
        there); pass both to `generate`/`stream` to decode each image once. ValueError for bad images."""
        ids, prompt_images = self._prompt_with_images(prompt, images)
        return ids.tolist(), prompt_images.images

    def _prompt_with_images(self, prompt: str | list[int], images: Sequence[ImageSource],
                            used: int = 0) -> tuple[np.ndarray, PromptImages]:
        """(token ids, the images preprocessed) of a prompt with images.

        A text prompt holds one image token per image where the image goes (its images go in front when it holds
        none); each becomes begin-of-image, the image's soft tokens, end-of-image, as transformers' processor
        writes them. Token ids are used verbatim: they must hold one run of image tokens per image, as long as
        that image's soft tokens. Images are decoded one at a time, and refused as soon as they outgrow the
        context."""
        if self.vision is None or self.image_tokens is None:
            raise ValueError(f"{self.path.name} has no vision tower (converted with --no-vision or from a checkpoint "
                             "without one): pass --mmproj / mmproj= with its mmproj file to give it images")
        if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
            raise ValueError("images must be a list of images (paths, bytes or PIL images)")
        patches: list[ImagePatches] = []
        for index, source in enumerate(images):
            patches.append(load_image(source, self.vision.cfg))
            used += patches[-1].tokens + 2
            if used > self.config.max_position_embeddings:
                raise ValueError(f"{index + 1} image(s) take {used} tokens, more than the model's context of "
                                 f"{self.config.max_position_embeddings}")
        tokens = self.image_tokens
        if isinstance(prompt, str):
            pieces = [self.token_piece(t) for t in (tokens.image_token_id, tokens.boi_token_id, tokens.eoi_token_id)]
            prompt = self.tokenize_chat(expand_placeholders(prompt, patches, *pieces))
        ids = self._prompt_ids(prompt)
        check_runs(ids, patches, tokens.image_token_id)
        return ids, PromptImages(self.vision, patches, tokens)

    def stream(
        self,
        prompt: str | list[int],
        *,
        seed: int | None = None,
        rng: Rng | None = None,
        cache: KVCache | None = None,
        stats: Stats | None = None,
        images: Sequence[ImageSource] | None = None,
        **params: Any,
    ) -> Iterator[Draft | Commit]:
        """Generator of events: a `Draft` after every denoising step, a `Commit` after every canvas.

        Parameters as in `generate`. `cache` continues from an earlier encoder cache (multi-turn); the prompt
        is then only the new, uncached tokens. Bad arguments raise ValueError at once.
        """
        return self._stream(self.request(prompt, seed=seed, rng=rng, cache=cache, images=images, **params), stats)

    def _stream(self, request: Request, stats: Stats | None) -> Iterator[Draft | Commit]:
        """One request's events: a batch of one."""
        events = self._run([request], [stats if stats is not None else Stats()])
        try:
            for _, event in events:
                yield event
        finally:
            events.close()

    def _run(self, requests: list[Request], stats: list[Stats]) -> Generator[tuple[int, Draft | Commit], None, None]:
        """Run requests as one batch to its end, holding the model (ModelBusyError if it is already running)."""
        if not self._lock.acquire(blocking=False):
            raise ModelBusyError("this Model is already generating (another thread, an unfinished stream or a "
                                 "running Scheduler); use one Model per thread")
        try:
            yield from batch_events(self.graph, [Generation(self.graph, r, s) for r, s in zip(requests, stats,
                                                                                               strict=True)])
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
        images: Sequence[ImageSource] | None = None,
        json_schema: dict[str, Any] | str | None = None,
        regex: str | None = None,
        grammar: str | None = None,
    ) -> GenerationOutput:
        """Generate after `prompt` (text, tokenized with BOS per the file, or token ids used verbatim).

        A None parameter takes the file's value (its generation_config.json), else transformers' default.
        `adaptive_stopping=False` runs every canvas for exactly `max_denoising_steps` steps.
        `seed` makes the default RNG reproducible; `rng` injects one (see `dgrun.rng`).
        `images` (paths, encoded bytes or PIL images) go where a text prompt writes the model's image token, in
        order, or before the text when it writes none; a token-id prompt must already hold each image's run of
        image tokens. Bad images raise ValueError.
        At most one of `json_schema` (a dict or JSON text), `regex` and `grammar` (Lark, llguidance's dialect)
        constrains the answer: it matches whenever `max_new_tokens` leaves room (see `dgrun.constrain`).
        """
        stats = Stats()
        events = self.stream(prompt, seed=seed, rng=rng, stats=stats, images=images, max_new_tokens=max_new_tokens,
                             max_denoising_steps=max_denoising_steps, t_min=t_min, t_max=t_max,
                             entropy_bound=entropy_bound, stability_threshold=stability_threshold,
                             confidence_threshold=confidence_threshold, adaptive_stopping=adaptive_stopping,
                             json_schema=json_schema, regex=regex, grammar=grammar)
        return self._collect(events, stats)

    # -- batches ---------------------------------------------------------------------------------------

    def stream_batch(self, prompts: Sequence[str | list[int]], *, seed: int | Sequence[int | None] | None = None,
                     rng: Sequence[Rng | None] | None = None, max_batch: int = MAX_BATCH,
                     **params: Any) -> Iterator[tuple[int, Draft | Commit]]:
        """Generate after several prompts at once: (element index, event) pairs, each event as `stream` gives it.

        Every element gets exactly the tokens `generate(prompt, seed=s)` gives it alone. Prompts are texts or
        token-id lists of any lengths; `seed` is one int for all or one per element; `rng` one Rng (or None)
        per element. The other parameters are shared. Elements leave the batch as they finish. At most
        `max_batch` elements: each holds a canvas x vocabulary of logits in the batched pass. Bad input (an
        empty list, a bad element, named by its index) raises ValueError before anything runs.
        """
        requests = self._batch_requests(prompts, seed, rng, max_batch, params)
        return self._run(requests, [Stats() for _ in requests])

    def generate_batch(self, prompts: Sequence[str | list[int]], *,
                       seed: int | Sequence[int | None] | None = None, rng: Sequence[Rng | None] | None = None,
                       max_batch: int = MAX_BATCH, **params: Any) -> list[GenerationOutput]:
        """`generate` for several prompts in one batch (see `stream_batch`): one output per prompt, in order."""
        requests = self._batch_requests(prompts, seed, rng, max_batch, params)
        stats = [Stats() for _ in requests]
        tokens: list[list[int]] = [[] for _ in requests]
        for j, event in self._run(requests, stats):
            if isinstance(event, Commit):
                tokens[j].extend(event.tokens)
        return [GenerationOutput(t, self.detokenize(t), s.as_dict()) for t, s in zip(tokens, stats, strict=True)]

    def _batch_requests(self, prompts: Sequence[str | list[int]], seed: int | Sequence[int | None] | None,
                        rng: Sequence[Rng | None] | None, max_batch: int, params: dict[str, Any]) -> list[Request]:
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
            raise ValueError("prompts must be a non-empty list of prompts (texts or token-id lists)")
        n = len(prompts)
        if not (_is_int(max_batch) and max_batch >= 1):
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        if n > max_batch:
            raise ValueError(f"{n} prompts exceed max_batch={max_batch}")
        seeds = _per_element("seed", seed, n, lambda s: s is None or (_is_int(s) and s >= 0))
        rngs = _per_element("rng", rng, n, lambda r: r is None or callable(getattr(r, "tokens", None)),
                            broadcast=False)
        resolved = self.resolve_params(**params)  # shared: refused once, not per element
        requests = []
        for j, (prompt, s, r) in enumerate(zip(prompts, seeds, rngs, strict=True)):
            try:
                requests.append(self._request(prompt, resolved, r or DefaultRng(s), None))
            except ValueError as e:
                raise ValueError(f"prompt {j}: {e}") from None
        return requests

    # -- infill and edit: one canvas, some positions clamped -----------------------------------------

    def stream_infill(self, prefix: str, suffix: str, fill_length: int | None = None, *, seed: int | None = None,
                      rng: Rng | None = None, stats: Stats | None = None, **params: Any) -> Iterator[Draft | Commit]:
        """Events of `infill`; its one `Commit` holds the gap's tokens. Bad arguments raise ValueError at once."""
        return self._stream(self.infill_request(prefix, suffix, fill_length, seed=seed, rng=rng, **params), stats)

    def infill_request(self, prefix: str | list[int], suffix: str, fill_length: int | None = None, *,
                       seed: int | None = None, rng: Rng | None = None, **params: Any) -> Request:
        """The `infill` as a validated request, e.g. for `dgrun.Scheduler.submit`; the prefix may be token ids."""
        prompt = self.tokenize(prefix) if isinstance(prefix, str) else prefix
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
        return self._canvas_request(prompt, canvas, free, range(fill_length), seed, rng, params)

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
        return self._stream(self.edit_request(text, spans, context, blank=blank, seed=seed, rng=rng, **params),
                            stats)

    def edit_request(self, text: str, spans: Sequence[tuple[int, int]] = (), context: str | list[int] | None = None,
                     *, blank: str | None = None, seed: int | None = None, rng: Rng | None = None,
                     **params: Any) -> Request:
        """The `edit` as a validated request, e.g. for `dgrun.Scheduler.submit`."""
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
        return self._canvas_request(prompt, canvas, free, range(len(ids)), seed, rng, params)

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

    def _canvas_request(self, prompt: str | list[int], canvas: np.ndarray, free: np.ndarray, output: range,
                        seed: int | None, rng: Rng | None, params: dict[str, Any]) -> Request:
        """One canvas whose non-`free` positions are clamped; its result is the non-special tokens of `output`."""
        if params.get("max_new_tokens") is not None:
            raise ValueError("infill and edit write exactly one canvas: max_new_tokens does not apply")
        for kind in ("json_schema", "regex", "grammar"):
            if params.get(kind) is not None:
                raise ValueError(f"{kind} constrains generate, stream, chat and generate_batch, not infill or edit")
        request = self.request(prompt, seed=seed, rng=rng, **{**params, "max_new_tokens": self.config.canvas_length})
        dropped = frozenset(t for t in (*self.generation_config.eos_token_ids, self._pad_id) if t is not None)
        request.layout = CanvasLayout(canvas, free, output, dropped)
        return request

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
        """Config, generation defaults, the preset the file was converted with and its real type mix (tensors and
        bytes per ggml type: a preset's type falls back where rows do not fit its blocks), and backend."""
        types = type_mix(self._file)
        vision = None
        if self.vision is not None:
            vision_file = self._vision_file or self._file
            vision = {"config": vars(self.vision.cfg).copy(), "path": str(vision_file.path),
                      "types": type_mix(vision_file, vision_tensor_shapes(self.vision.cfg))}
        return {
            "path": str(self.path), "backend": self.backend.name,
            "config": vars(self.config).copy(), "generation": vars(self.generation_config).copy(),
            "outtype": self._file.get("dgrun.outtype"), "types": types,
            "quant_mix_bytes": {name: t["bytes"] for name, t in types.items()},
            "tokenizer": None if self.tokenizer is None else self.tokenizer.kind,
            "chat_template": self.chat_template is not None, "vision": vision,
            "lora": self.lora_adapters(),
        }

    # -- LoRA adapters --------------------------------------------------------------------------------

    def lora_adapters(self) -> list[dict[str, Any]]:
        """The adapters loaded with the model, as llama.cpp's server lists them (`GET /lora-adapters`): id, path,
        scale, plus alpha, ranks, number of deltas and whether they were merged at load."""
        return [] if self.lora is None else self.lora.describe()

    def set_lora_adapters(self, entries: Sequence[dict[str, Any]]) -> None:
        """Set adapter scales as llama.cpp's `POST /lora-adapters` does: `[{"id": 0, "scale": 0.5}, ...]`; an
        adapter left out of the list gets scale 0 (disabled). Only between generations (else ModelBusyError);
        adapters merged at load keep their scales (ValueError)."""
        scales = self.lora_scales(entries)
        if self.lora is None:
            return
        if not self._lock.acquire(blocking=False):
            raise ModelBusyError("this Model is generating: change adapter scales between generations")
        try:
            self.lora.set_scales(scales)
        finally:
            self._lock.release()

    def lora_scales(self, entries: Sequence[dict[str, Any]]) -> list[float]:
        """The scale of every loaded adapter that `set_lora_adapters(entries)` would set (checked, not applied):
        a ValueError names a bad id or scale."""
        count = 0 if self.lora is None else len(self.lora.adapters)
        scales = [0.0] * count
        for entry in entries:
            index = entry.get("id") if isinstance(entry, dict) else None
            scale = entry.get("scale") if isinstance(entry, dict) else None
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
                raise ValueError(f"no LoRA adapter with id {index!r} (loaded: {count})")
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale):
                raise ValueError(f"LoRA adapter {index}: scale must be a finite number, got {scale!r}")
            scales[index] = float(scale)
        return scales

    def close(self) -> None:
        """Release the memory maps (model, vision tower, adapters). The Model is unusable afterwards."""
        self._file.close()
        if self._vision_file is not None:
            self._vision_file.close()
        if self.lora is not None:
            self.lora.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def type_mix(gguf: GGUFFile, names: Iterable[str] | None = None) -> dict[str, dict[str, int]]:
    """ggml type name → {"tensors": count, "bytes": size} over every tensor of a file (or those `names`)."""
    types: dict[str, dict[str, int]] = {}
    for tensor in gguf.tensors.values() if names is None else [gguf.tensors[n] for n in names]:
        entry = types.setdefault(tensor.ggml_type.name, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += tensor.nbytes
    return types


def _check_tensors(gguf: GGUFFile, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every tensor the graph reads exists with the shape the config implies (before any native call)."""
    for name, shape in shapes.items():
        info = gguf.tensors.get(name)
        if info is None:
            raise ConfigError(f"tensor {name} is missing")
        if tuple(info.shape) != tuple(shape):
            raise ConfigError(f"tensor {name} has shape {tuple(info.shape)}, the config implies {tuple(shape)}")


def _per_element(name: str, value: Any, n: int, valid: Callable[[Any], bool], broadcast: bool = True) -> list[Any]:
    """`value` as one entry per batch element: None for all, a single value for all (if `broadcast`), or a list
    of exactly n; an entry that `valid` refuses raises ValueError naming its index."""
    if value is None:
        return [None] * n
    if broadcast and not isinstance(value, (list, tuple)):
        values = [value] * n
    elif isinstance(value, (list, tuple)) and len(value) == n:
        values = list(value)
    else:
        raise ValueError(f"{name} must be {'one value or ' if broadcast else ''}a list of one per prompt ({n})")
    for j, v in enumerate(values):
        if not valid(v):
            raise ValueError(f"{name} {j} is not valid: {v!r}")
    return values
