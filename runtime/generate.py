"""Block diffusion generation as a generator of events, the loop of transformers' `generate` for batch size 1.

Per canvas: a random canvas; up to `max_denoising_steps` decoder passes, each followed by one sampler step;
commit the argmax canvas; stop at an EOS id or `max_new_tokens`; else re-encode the committed canvas.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dgrun.model import DiffusionGemma, KVCache
from dgrun.rng import Rng
from dgrun.sampler import StableAndConfident, temperature


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


def generate_events(
    model: DiffusionGemma,
    new_ids: np.ndarray,
    params: GenerationParams,
    rng: Rng,
    cache: KVCache,
    stats: Stats,
    start_canvas: np.ndarray | None = None,
    clamp: np.ndarray | None = None,
) -> Iterator[Draft | Commit]:
    """Encode `new_ids` into `cache`, then denoise canvas after canvas, yielding Draft and Commit events.

    `start_canvas`/`clamp` replace the first canvas's random tokens and fix the clamped positions (infill, edit).
    On return `cache` holds every committed canvas except the last, exactly like transformers' returned cache.
    """
    cfg, ops = model.cfg, model.ops
    started = time.perf_counter()
    canvas_length = cfg.canvas_length
    eos = np.asarray(params.eos_token_ids, dtype=np.int64)
    if len(new_ids):
        model.encode(new_ids, cache)
        stats.encoder_passes += 1
    produced = 0
    for canvas_index in range(math.ceil(params.max_new_tokens / canvas_length)):
        canvas = rng.tokens((canvas_length,), cfg.vocab_size)
        canvas_clamp = None
        if canvas_index == 0 and start_canvas is not None:
            canvas = np.asarray(start_canvas, dtype=np.int64)
            canvas_clamp = clamp
        stopper = (StableAndConfident(params.stability_threshold, params.confidence_threshold)
                   if params.adaptive_stopping else None)
        self_cond, argmax, steps = None, canvas, 0
        for steps_remaining in range(params.max_denoising_steps, 0, -1):
            logits = model.decode(canvas, cache, self_cond)
            stats.decoder_passes += 1
            steps += 1
            temp = temperature(steps_remaining, params.max_denoising_steps, params.t_min, params.t_max)
            result = ops.denoise_step(logits, canvas, temp, params.entropy_bound, rng, canvas_clamp)
            if math.isnan(result.mean_entropy):  # any NaN logit poisons the mean: a free check on every backend
                raise FloatingPointError(f"the decoder produced NaN logits (canvas {canvas_index}, step {steps}); "
                                         "the model file or the backend is broken, so no tokens are emitted")
            canvas, argmax, accepted, mean_entropy = result.canvas, result.argmax, result.accepted, result.mean_entropy
            stop = stopper is not None and stopper(argmax, mean_entropy)
            # The next pass's self-conditioning, made now: then no canvas x vocab array outlives the step.
            self_cond = model.self_condition(result.processed_logits) if steps_remaining > 1 and not stop else None
            del logits, result
            yield Draft(canvas_index, steps, argmax, accepted)
            if stop:
                break
        committed = np.asarray(argmax, dtype=np.int64)
        hits = np.flatnonzero(np.isin(committed, eos)) if eos.size else np.zeros(0, dtype=np.int64)
        finished = hits.size > 0
        tokens = committed[: hits[0] + 1] if finished else committed
        tokens = tokens[: params.max_new_tokens - produced].tolist()
        produced += len(tokens)
        finished = finished or produced >= params.max_new_tokens
        stats.canvases += 1
        stats.new_tokens = produced
        stats.steps_per_canvas.append(steps)
        stats.seconds = time.perf_counter() - started
        yield Commit(canvas_index, tokens, steps, finished)
        if finished:
            return
        model.encode(committed, cache)
        stats.encoder_passes += 1
