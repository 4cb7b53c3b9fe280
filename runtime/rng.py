"""The RNG protocol: every random draw of generation goes through one object with two methods.

The sampler calls them exactly where, and in the order, transformers' `generate` calls `torch.randint` and
`torch.multinomial`: `tokens((canvas_length,), V)` for each new canvas; then at every denoising step one
`categorical(probs)` followed by one `tokens((canvas_length,), V)` for renoising. So a test can record
transformers' draws and replay them here (`ReplayRng`), and any backend can be checked token-exact.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import numpy as np


class Rng(Protocol):
    def tokens(self, shape: tuple[int, ...], vocab_size: int) -> np.ndarray:
        """Uniform integers in [0, vocab_size)."""
        ...

    def categorical(self, probs: np.ndarray) -> np.ndarray:
        """One draw per row of a float32 [n, vocab] probability matrix."""
        ...


class DefaultRng:
    """numpy's PCG64, seeded: reproducible across runs and machines for the same seed."""

    def __init__(self, seed: int | None = None):
        self.generator = np.random.default_rng(seed)

    def tokens(self, shape: tuple[int, ...], vocab_size: int) -> np.ndarray:
        return self.generator.integers(0, vocab_size, size=shape, dtype=np.int64)

    def categorical(self, probs: np.ndarray) -> np.ndarray:
        # Inverse CDF: one uniform per row, scaled by the row's total so float32 rounding cannot overflow it.
        cdf = np.cumsum(probs, axis=-1, dtype=np.float64)
        u = self.generator.random(probs.shape[0]) * cdf[:, -1]
        index = (cdf <= u[:, None]).sum(axis=-1)
        return np.minimum(index, probs.shape[-1] - 1).astype(np.int64)

    def uniform(self, n: int) -> np.ndarray:
        """Uniforms in [0, 1): what a device sampler consumes to make its categorical draw itself."""
        return self.generator.random(n)


class ReplayRng:
    """Replays recorded draws in order; fails loudly when the caller's order or shapes drift from the record."""

    def __init__(self, draws: Iterable[tuple[str, np.ndarray]]):
        self.draws = list(draws)
        self.position = 0

    def _next(self, kind: str, shape: tuple[int, ...]) -> np.ndarray:
        if self.position >= len(self.draws):
            raise AssertionError(f"replay exhausted: call {self.position} asked for {kind}{shape}")
        recorded_kind, value = self.draws[self.position]
        if recorded_kind != kind or tuple(value.shape) != tuple(shape):
            raise AssertionError(
                f"replay call {self.position}: asked for {kind}{tuple(shape)}, "
                f"recorded {recorded_kind}{tuple(value.shape)}")
        self.position += 1
        return np.asarray(value, dtype=np.int64)

    def tokens(self, shape: tuple[int, ...], vocab_size: int) -> np.ndarray:
        return self._next("tokens", tuple(shape))

    def categorical(self, probs: np.ndarray) -> np.ndarray:
        return self._next("categorical", (probs.shape[0],))
