"""Block diffusion generation: the loop of transformers' `generate`, one element at a time or many in a batch.

Per canvas: a random canvas; up to `max_denoising_steps` decoder passes, each followed by one sampler step;
commit the argmax canvas; stop at an EOS id or `max_new_tokens`; else re-encode the committed canvas.

That loop is written once, as `Generation`: one element's state, advanced by one decoder pass at a time.
`decode_step` advances several of them with one batched decoder pass; `batch_events` runs a fixed batch to the
end (elements leave as they finish), and a lone generation is a batch of one. `dgrun.Scheduler` drives the same
`decode_step` while elements come and go.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from dgrun.model import DiffusionGemma, KVCache
from dgrun.rng import Rng

if TYPE_CHECKING:
    from dgrun.vision import PromptImages
from dgrun.sampler import StableAndConfident, temperature

MAX_BATCH = 8  # elements per batched pass unless the caller says otherwise: each holds a canvas x vocab of logits


@dataclass
class GenerationParams:
    """Resolved generation parameters (no None left, except the thresholds when adaptive stopping is off)."""

    max_new_tokens: int
    max_denoising_steps: int
    t_min: float
    t_max: float
    entropy_bound: float
    stability_threshold: int | None
    confidence_threshold: float | None
    eos_token_ids: list[int] = field(default_factory=list)

    def validate(self) -> None:
        """Refuse values transformers refuses, with one-line messages naming the parameter."""
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(_is_int(self.max_new_tokens) and self.max_new_tokens > 0, f"max_new_tokens must be a positive "
              f"integer, got {self.max_new_tokens!r}")
        check(_is_int(self.max_denoising_steps) and 0 < self.max_denoising_steps <= 100_000,
              f"max_denoising_steps must be an integer in 1..100000, got {self.max_denoising_steps!r}")
        for name in ("t_min", "t_max", "entropy_bound"):
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0,
                  f"{name} must be a finite number >= 0, got {value!r}")
        check(self.t_max > self.t_min, f"t_max must be greater than t_min (got {self.t_max} <= {self.t_min})")
        check(self.entropy_bound > 0, f"entropy_bound must be > 0, got {self.entropy_bound!r}")
        if self.stability_threshold is not None:
            check(_is_int(self.stability_threshold) and 0 <= self.stability_threshold <= 1000,
                  f"stability_threshold must be an integer in 0..1000, got {self.stability_threshold!r}")
        if self.confidence_threshold is not None:
            check(isinstance(self.confidence_threshold, (int, float)) and math.isfinite(self.confidence_threshold)
                  and self.confidence_threshold > 0,
                  f"confidence_threshold must be a number > 0, got {self.confidence_threshold!r}")

    @property
    def adaptive_stopping(self) -> bool:
        return self.stability_threshold is not None and self.confidence_threshold is not None


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass
class Draft:
    """After every denoising step: the argmax canvas and which positions the sampler has accepted."""

    canvas_index: int
    step: int
    tokens: np.ndarray
    accepted: np.ndarray


@dataclass
class Commit:
    """After every canvas: its committed tokens (cut after an EOS and at max_new_tokens)."""

    canvas_index: int
    tokens: list[int]
    steps: int
    finished: bool


@dataclass
class Stats:
    canvases: int = 0
    encoder_passes: int = 0
    decoder_passes: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    steps_per_canvas: list[int] = field(default_factory=list)

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / self.decoder_passes if self.decoder_passes else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "canvases": self.canvases, "encoder_passes": self.encoder_passes,
            "decoder_passes": self.decoder_passes, "new_tokens": self.new_tokens,
            "tokens_per_forward": self.tokens_per_forward, "seconds": self.seconds,
            "tokens_per_second": self.tokens_per_second, "steps_per_canvas": list(self.steps_per_canvas),
        }


@dataclass
class CanvasLayout:
    """One canvas the caller lays out (infill, edit): fixed tokens, free positions, and what the result is.

    The free positions start as random tokens and the model writes them; the others are clamped (never change,
    always accepted). The result is the final canvas's tokens at `output`, without the `dropped` ids (EOS, pad)
    that the model wrote in free positions to leave them empty.
    """

    tokens: np.ndarray
    free: np.ndarray
    output: range
    dropped: frozenset[int]

    def start(self, rng: Rng, vocab_size: int) -> np.ndarray:
        """The first canvas: the layout with its free positions drawn at random (one full-canvas draw)."""
        return np.where(self.free, rng.tokens(self.tokens.shape, vocab_size), self.tokens).astype(np.int64)

    def result(self, final: np.ndarray) -> list[int]:
        return [int(final[i]) for i in self.output if not (self.free[i] and final[i] in self.dropped)]


@dataclass
class Request:
    """One generation, validated and ready to run alone or in a batch (see `Model.request`).

    `prompt_ids` are the tokens the encoder has not read yet: the whole prompt, or only the new ones when
    `cache` continues an earlier conversation. `layout` makes it a one-canvas infill or edit. `images` are the
    prompt's images, embedded by the vision tower when the encoder first reads the prompt. (With the mlx backend a
    `cache` must have been filled by the thread that runs the request: MLX evaluates lazily, per thread.)
    `time_limit` is a budget in seconds counted from the end of the prompt's encoding, as llama.cpp's
    `t_max_predict_ms` counts from the first token: once it is spent, the canvas in progress commits its current
    argmax draft at the end of that step, and generation ends.
    """

    prompt_ids: np.ndarray
    params: GenerationParams
    rng: Rng
    cache: KVCache | None = None
    layout: CanvasLayout | None = None
    images: PromptImages | None = None
    time_limit: float | None = None


class Generation:
    """One element's canvas loop as a state machine: `prepare`, one decoder pass, `advance`; until `finished`.

    `prepare` runs the encoder on what the cache has not read (the prompt, then each committed canvas) and draws
    the next canvas; `advance` takes that pass's logits for this element and does one sampler step, returning a
    `Draft` and, when the canvas ends, its `Commit`. The element's random draws go through its own `rng`, in
    the same order whatever else is in the batch. On finishing, `cache` holds every committed canvas except the
    last, exactly like transformers' returned cache.
    """

    def __init__(self, graph: DiffusionGemma, request: Request, stats: Stats | None = None):
        self.graph, self.params, self.rng, self.layout = graph, request.params, request.rng, request.layout
        self.cache = request.cache if request.cache is not None else graph.new_cache()
        self.stats = stats if stats is not None else Stats()
        self.finished = False
        self.canvas: np.ndarray | None = None  # what the next decoder pass reads; None between canvases
        self.self_cond: Any | None = None  # the last step's SelfCondition (None on a canvas's first step)
        self._unencoded = np.asarray(request.prompt_ids, dtype=np.int64)
        self._images = request.images  # embedded with the prompt's encoder pass, then dropped
        self._eos = np.asarray(self.params.eos_token_ids, dtype=np.int64)
        self._canvas_index = -1
        self._produced = 0
        self._started = time.perf_counter()
        self._time_limit = request.time_limit
        self._deadline: float | None = None  # set once the prompt is read: the time limit counts from there

    def prepare(self) -> None:
        """Make ready for the next decoder pass: between canvases, encode what is new and draw the next canvas."""
        if self.canvas is not None:
            return
        cfg, params = self.graph.cfg, self.params
        if len(self._unencoded):
            images, self._images = self._images, None
            self.graph.encode(self._unencoded, self.cache, None if images is None else images.encoder_input(
                self._unencoded))
            self.stats.encoder_passes += 1
            self._unencoded = self._unencoded[:0]
        if self._time_limit is not None and self._deadline is None:
            self._deadline = time.perf_counter() + self._time_limit
        self._canvas_index += 1
        self._clamp: np.ndarray | None = None
        if self.layout is not None:  # a layout is one canvas, the first
            self.canvas, self._clamp = self.layout.start(self.rng, cfg.vocab_size), ~self.layout.free
        else:
            self.canvas = self.rng.tokens((cfg.canvas_length,), cfg.vocab_size)
        self._stopper = (StableAndConfident(params.stability_threshold, params.confidence_threshold)
                         if params.adaptive_stopping else None)
        self.self_cond, self._argmax, self._steps = None, self.canvas, 0

    def advance(self, logits: Any) -> list[Draft | Commit]:
        """One sampler step on this element's logits of the pass: a Draft, then a Commit if the canvas ended."""
        assert self.canvas is not None, "prepare() comes before every decoder pass"
        params = self.params
        temp = temperature(params.max_denoising_steps - self._steps, params.max_denoising_steps, params.t_min,
                           params.t_max)
        self._steps += 1
        self.stats.decoder_passes += 1
        self.self_cond = None  # spent by this pass
        result = self.graph.ops.denoise_step(logits, self.canvas, temp, params.entropy_bound, self.rng,
                                             self._clamp)
        if math.isnan(result.mean_entropy):  # any NaN logit poisons the mean: a free check on every backend
            raise FloatingPointError(f"the decoder produced NaN logits (canvas {self._canvas_index}, step "
                                     f"{self._steps}); the model file or the backend is broken, so no tokens are "
                                     "emitted")
        self.canvas, self._argmax = result.canvas, result.argmax
        events: list[Draft | Commit] = [Draft(self._canvas_index, self._steps, result.argmax, result.accepted)]
        stop = self._stopper is not None and self._stopper(result.argmax, result.mean_entropy)
        out_of_time = self._deadline is not None and time.perf_counter() >= self._deadline
        if stop or out_of_time or self._steps == params.max_denoising_steps:
            events.append(self._commit(last=out_of_time))
        else:
            # The next pass's self-conditioning, made now: then no canvas x vocab array outlives the step.
            self.self_cond = self.graph.self_condition(result.processed_logits)
        return events

    def _commit(self, last: bool = False) -> Commit:
        committed = np.asarray(self._argmax, dtype=np.int64)
        if self.layout is not None:
            tokens, finished = self.layout.result(committed), True
        else:
            hits = np.flatnonzero(np.isin(committed, self._eos)) if self._eos.size else np.zeros(0, np.int64)
            cut = committed[: hits[0] + 1] if hits.size else committed
            tokens = cut[: self.params.max_new_tokens - self._produced].tolist()
            finished = last or hits.size > 0 or self._produced + len(tokens) >= self.params.max_new_tokens
        self._produced += len(tokens)
        stats = self.stats
        stats.canvases += 1
        stats.new_tokens = self._produced
        stats.steps_per_canvas.append(self._steps)
        stats.seconds = time.perf_counter() - self._started
        self.canvas, self.self_cond = None, None
        self.finished = finished
        if not finished:
            self._unencoded = committed  # the next canvas attends to this one: encoded before it starts
        return Commit(self._canvas_index, tokens, self._steps, finished)


def decode_step(graph: DiffusionGemma,
                generations: Sequence[Generation]) -> list[list[Draft | Commit] | Exception]:
    """Advance every generation by one step: encoder passes where one is due, one batched decoder pass, one
    sampler step each. Returns each one's events, or the exception its own work raised (its encoder pass or
    sampler step; it must then leave the batch); a failure of the shared decoder pass raises."""
    outcomes: list[list[Draft | Commit] | Exception] = [[] for _ in generations]
    ready = []
    for j, generation in enumerate(generations):
        try:
            generation.prepare()
            ready.append(j)
        except Exception as e:  # this element's failure: reported to its caller, the others go on
            outcomes[j] = e
    if ready:
        chosen = [generations[j] for j in ready]
        logits = graph.decode_batch([g.canvas for g in chosen], [g.cache for g in chosen],
                                    [g.self_cond for g in chosen])
        for j, element_logits in zip(ready, logits, strict=True):
            try:
                outcomes[j] = generations[j].advance(element_logits)
            except Exception as e:
                outcomes[j] = e
    return outcomes


def batch_events(graph: DiffusionGemma, generations: Sequence[Generation]) -> Iterator[tuple[int, Draft | Commit]]:
    """Run a batch to its end, yielding (element index, event); each element leaves the pass when it finishes.

    An element's failure raises here (the batch stops): a caller that must keep the others going uses
    `decode_step` itself, as `dgrun.Scheduler` does.
    """
    active = [j for j, g in enumerate(generations) if not g.finished]
    while active:
        for j, outcome in zip(active, decode_step(graph, [generations[j] for j in active]), strict=True):
            if isinstance(outcome, Exception):
                raise outcome
            for event in outcome:
                yield j, event
        active = [j for j in active if not generations[j].finished]
