"""`dgrun.load` and `Model`: the Python API that the CLI and embedding programs use."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from dgrun.backends import get_backend
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


def default_model_path() -> Path:
    """The small demo model shipped inside the package."""
    return Path(__file__).parent / "models" / "demo.dgf"


def load(path: str | Path | None = None, backend: str = "auto") -> Model:
    """Open a .dgf file (memory-mapped) on a backend: "auto", "numpy", "cpu", "cuda" or "mlx".

    With no path, the demo model shipped in the package. Bad files raise `dgrun.FormatError`.
    """
    return Model(default_model_path() if path is None else Path(path), backend)


class Model:
    """A loaded DiffusionGemma. One generation at a time: a second concurrent one raises ModelBusyError.

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
        self.backend = get_backend(backend)
        unsupported = {t.ggml_type.name for t in self._file.tensors.values()
                       if t.name in shapes and t.ggml_type not in self.backend.supported_types}
        if unsupported:
            self._file.close()
            raise FormatError(f"backend {self.backend.name} cannot run tensor types {sorted(unsupported)}")
        self.tokenizer = Tokenizer.from_file(self._file)
        self.chat_template: str | None = self._file.get(CHAT_TEMPLATE_KEY)
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
        tokens: list[int] = []
        for event in self.stream(prompt, seed=seed, rng=rng, stats=stats, max_new_tokens=max_new_tokens,
                                 max_denoising_steps=max_denoising_steps, t_min=t_min, t_max=t_max,
                                 entropy_bound=entropy_bound, stability_threshold=stability_threshold,
                                 confidence_threshold=confidence_threshold, adaptive_stopping=adaptive_stopping):
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
