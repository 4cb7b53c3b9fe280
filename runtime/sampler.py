"""The entropy-bound sampler, as plain numpy functions: the reference every backend is checked against.

Each function mirrors one piece of transformers 5.23.0 `generation_diffusion_gemma.py`:
`LinearTemperatureScheduleLogitsProcessor`, `EntropyBoundSampler.accept_canvas` / `renoise_canvas` and
`StableAndConfidentStoppingCriteria`. `denoise_step` strings them together in the order `_denoising_step`
does, and draws its randomness through an `Rng` in that same order (see `dgrun.rng`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dgrun.rng import Rng

# A forbidden token's logit under a grammar mask (dgrun.constrain). Finite on purpose: exp() of it underflows to
# exactly 0 after any temperature, and p·log p stays 0 in every backend's entropy, where -inf would give NaN.
MASKED_LOGIT = np.float32(-1e30)


def temperature(steps_remaining: int, max_steps: int, t_min: float, t_max: float) -> float:
    """Linear schedule: t_max on the first step (steps_remaining == max_steps), falling towards t_min."""
    return t_min + (t_max - t_min) * (steps_remaining / max_steps)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def entropy(logits: np.ndarray) -> np.ndarray:
    """Per-row entropy of softmax(logits), as torch.distributions.Categorical(logits=...).entropy()."""
    logp = log_softmax(logits.astype(np.float32, copy=False))
    return -(np.exp(logp) * logp).sum(axis=-1)


def accept_mask(token_entropy: np.ndarray, entropy_bound: float) -> np.ndarray:
    """Accept the k lowest-entropy tokens with sum(H) - max(H) <= bound (at least one is always accepted).

    Sorted ascending, the running maximum is the current element, so the test is cumsum - sorted <= bound.
    """
    order = np.argsort(token_entropy, kind="stable")
    sorted_entropy = token_entropy[order]
    selected = (np.cumsum(sorted_entropy) - sorted_entropy) <= entropy_bound
    mask = np.zeros(token_entropy.shape, dtype=bool)
    mask[order] = selected
    return mask


class StableAndConfident:
    """Adaptive stopping: the argmax canvas equals the last `stability_threshold` ones and mean entropy is low."""

    def __init__(self, stability_threshold: int, confidence_threshold: float):
        self.stability_threshold = stability_threshold
        self.confidence_threshold = confidence_threshold
        self.history: list[np.ndarray] = []

    def __call__(self, argmax_canvas: np.ndarray, mean_entropy: float) -> bool:
        if self.stability_threshold == 0:
            stable = True
        else:
            # transformers seeds its history with -1 canvases, so a fresh canvas is never "stable".
            stable = len(self.history) == self.stability_threshold and all(
                np.array_equal(h, argmax_canvas) for h in self.history)
            self.history = (self.history + [argmax_canvas.copy()])[-self.stability_threshold:]
        return bool(stable and mean_entropy < self.confidence_threshold)


@dataclass
class StepResult:
    """One denoising step's outcome: the next canvas, its argmax draft, and the logits for self-conditioning."""

    canvas: np.ndarray
    argmax: np.ndarray
    processed_logits: np.ndarray
    accepted: np.ndarray
    mean_entropy: float


def denoise_step(
    logits: np.ndarray,
    canvas: np.ndarray,
    temp: float,
    entropy_bound: float,
    rng: Rng,
    clamp: np.ndarray | None = None,
) -> StepResult:
    """One sampler step on [canvas, vocab] float32 logits.

    `clamp` (bool [canvas]) marks caller-fixed positions (infill suffix, edit context): they keep their token,
    are always accepted, are never renoised and take no part in the entropy budget or the confidence mean.
    Without a clamp this is exactly transformers' `_denoising_step` after the forward pass.
    """
    processed = logits / np.float32(temp)
    sampled = rng.categorical(softmax(processed))
    return finish_step(processed, sampled, processed.argmax(axis=-1), entropy(processed), canvas,
                       entropy_bound, rng, clamp)


def finish_step(
    processed: np.ndarray,
    sampled: np.ndarray,
    argmax: np.ndarray,
    token_entropy: np.ndarray,
    canvas: np.ndarray,
    entropy_bound: float,
    rng: Rng,
    clamp: np.ndarray | None = None,
) -> StepResult:
    """The canvas-sized rest of a step, after the vocabulary-wide work (a backend may do that part natively):
    entropy-bound acceptance, renoising with a full canvas of fresh tokens, and the clamp."""
    canvas = np.asarray(canvas, dtype=np.int64)
    free = np.ones(canvas.shape, dtype=bool) if clamp is None else ~clamp
    accepted = np.zeros(canvas.shape, dtype=bool)
    accepted[free] = accept_mask(token_entropy[free], entropy_bound)
    noise = rng.tokens(canvas.shape, processed.shape[-1])  # a full canvas every step, as transformers draws it
    new_canvas = np.where(accepted, sampled, noise)
    if clamp is not None:
        new_canvas = np.where(clamp, canvas, new_canvas)
        argmax = np.where(clamp, canvas, argmax)
        accepted = accepted | clamp
    mean_entropy = float(token_entropy[free].mean()) if free.any() else 0.0
    return StepResult(new_canvas.astype(np.int64), np.asarray(argmax, dtype=np.int64), processed, accepted,
                      mean_entropy)


def allowed_tokens(bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    """bool [rows, vocab] from llguidance's int32 [rows, ceil(vocab/32)] bitmasks: bit i % 32 of word i // 32
    allows token i."""
    words = np.ascontiguousarray(bitmask, dtype="<i4")
    return np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")[:, :vocab_size].astype(bool)


def mask_rows(logits: np.ndarray, start: int, bitmask: np.ndarray) -> np.ndarray:
    """Rows start.. of [canvas, vocab] logits, one per bitmask row, with every forbidden token set to
    MASKED_LOGIT (in place); returns the logits."""
    rows = logits[start:start + len(bitmask)]
    rows[~allowed_tokens(bitmask, logits.shape[-1])] = MASKED_LOGIT
    return logits


def argmax_rows(logits: np.ndarray, start: int, stop: int, bitmask: np.ndarray | None = None) -> np.ndarray:
    """Each row's argmax over rows start..stop-1, among the tokens `bitmask` (one row each) allows if given."""
    rows = np.asarray(logits[start:stop])
    if bitmask is not None:
        rows = np.where(allowed_tokens(bitmask, rows.shape[-1]), rows, -np.inf)
    return rows.argmax(axis=-1).astype(np.int64)
