"""Train the Sudoku DiffusionGemma that ships inside dgrun (`runtime/models/sudoku.dgf`), on CPU, from scratch.

The model solves a puzzle by editing it in place: `dgrun -m sudoku --edit "$(cat puzzle.txt)" --blank 0`.
It is transformers' own `DiffusionGemmaForBlockDiffusion`, trained here, saved with `save_pretrained` and
converted by `convert-hf-to-dgf`, as `tools/train_demo.py` does for the text demo.

Format
    The grid as Unsloth's DiffusionGemma notebook writes it: 9 lines of 9 digits, `0` for an empty cell (no
    trailing newline; one is tolerated). A tokenizers BPE model with no merges makes every character one token:
    `<pad> <eos> <bos> <unk>`, newline, the digits 0-9, then `<unusedN>` tokens up to the vocabulary size (see
    "Vocabulary" below).

Layout (exactly what `Model.edit(grid, blank="0")` builds)
    The encoder reads the prompt, BOS alone. The canvas (96 tokens) is the grid's 89 tokens, then EOS and pad
    tokens to its end. The givens, the newlines and the padding are clamped; every `0` is a free position, which
    the sampler starts from a uniformly random token of the whole vocabulary and re-noises the same way whenever
    it does not accept it.

Objective
    Training noise goes only where inference puts it: on free positions. Every example draws a noise rate r
    (r = 1, the first denoising step's canvas, a quarter of the time; else U(0, 1]) and replaces each free cell,
    with probability r, by a uniform token; the other free cells show their solution digit, as accepted cells do
    after some steps. Cross-entropy on every free position (noised or not: the decoder cannot tell an accepted
    cell from a given, and it re-predicts both). Self-conditioning on half the steps, as `train_demo.py` does it
    (a no-grad decoder pass on the same canvas; its logits, divided by a temperature drawn from the sampler's
    range, become `self_conditioning_logits`); the other half trains the zero-signal first step.

Puzzles, generated on the fly
    A pool of base grids from a randomized backtracking solver (seeded), each drawn grid then relabelled by
    random band, row-within-band, stack and column-within-stack permutations, a transpose and a digit
    permutation. (A single base pattern would give grids that all share its regular structure — mini-rows
    repeated across a band — a shortcut the model could learn and a user's puzzle would not have.) Blank cells
    are drawn at random; uniqueness is not checked for training. The number of givens follows a curriculum
    (`--givens`, widened over the first part of the run by `--curriculum`). The evaluation set
    (`tools/eval_sudoku.py`) is built from a different seed with unique solutions (`unique_puzzle`).

Vocabulary
    The sampler's noise is uniform over the vocabulary. With only the 15 tokens a grid needs, a noised cell would
    show a plausible digit 60% of the time and the model would first have to find which digits are wrong;
    `<unusedN>` tokens (Gemma's vocabularies carry them too) make a noised cell look like noise most of the time,
    which is what masked-diffusion solvers get from their mask token. `--vocab-size` sets the total.

Run: `python tools/train_sudoku.py --minutes 60 --out /tmp/sudoku-ckpt`, then
`convert-hf-to-dgf /tmp/sudoku-ckpt --outtype f16 -o runtime/models/sudoku.dgf`. `--init CKPT` continues a
checkpoint under a fresh schedule. Everything is seeded; with `--steps` the run is reproducible step for step.
The README's "The Sudoku model" section has the commands and times of the shipped file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_demo import (  # noqa: E402
    adamw,
    earlier_logs,
    learning_rate,
    optimizer_step,
    progress_clock,
    require_split_path,
    softcapped_logits,
)
from train_demo import generation_config as demo_generation_config  # noqa: E402

PAD_ID, EOS_ID, BOS_ID, UNK_ID, NEWLINE_ID = 0, 1, 2, 3, 4
DIGIT0_ID = 5  # "0".."9" are ids 5..14
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
CANVAS_LENGTH = 96
GRID_TOKENS = 89  # 9 rows of 9 digits and the 8 newlines between them
# Where cell i (row-major) sits in the canvas: 10 tokens per row (9 digits and a newline).
CELL_POSITIONS = np.array([10 * (i // 9) + i % 9 for i in range(81)])

# Written to generation_config.json (and so into the .dgf): tuned for this model with tools/eval_sudoku.py; the
# README's "The Sudoku model" section has the measurements behind each value.
GENERATION_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": CANVAS_LENGTH,
    # Twice the release's steps and a tenth of its entropy bound: fewer cells decided per step, each on more
    # settled neighbours (92% -> 97% solved at 36-46 givens; adaptive stopping ends most puzzles in ~9 steps).
    "max_denoising_steps": 96,
    "t_min": 0.4,
    "t_max": 0.8,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
    "sampler_config": {"entropy_bound": 0.01},
}


# -- grids, puzzles and a solver ---------------------------------------------------------------------------------

_ROW = [i // 9 for i in range(81)]
_COL = [i % 9 for i in range(81)]
_BOX = [(i // 27) * 3 + (i % 9) // 3 for i in range(81)]
_ALL = 0x3FE  # candidate bits 1..9


def _search(cells: list[int], rows: list[int], cols: list[int], boxes: list[int], limit: int,
            found: list[list[int]], rng: np.random.Generator | None) -> int:
    """Solutions of `cells` (0 = empty) up to `limit`, depth first from the cell with fewest candidates.

    The first solution is appended to `found`; with `rng`, candidate digits are tried in random order.
    """
    best, best_mask, best_count = -1, 0, 10
    for i in range(81):
        if cells[i] == 0:
            mask = _ALL & ~(rows[_ROW[i]] | cols[_COL[i]] | boxes[_BOX[i]])
            count = mask.bit_count()
            if count < best_count:
                best, best_mask, best_count = i, mask, count
                if count <= 1:
                    break
    if best < 0:
        if not found:
            found.append(list(cells))
        return 1
    digits = [d for d in range(1, 10) if best_mask >> d & 1]
    if rng is not None:
        rng.shuffle(digits)
    total = 0
    r, c, b = _ROW[best], _COL[best], _BOX[best]
    for d in digits:
        bit = 1 << d
        cells[best] = d
        rows[r] |= bit
        cols[c] |= bit
        boxes[b] |= bit
        total += _search(cells, rows, cols, boxes, limit - total, found, rng)
        cells[best] = 0
        rows[r] ^= bit
        cols[c] ^= bit
        boxes[b] ^= bit
        if total >= limit:
            break
    return total


def _masks(cells: Sequence[int]) -> tuple[list[int], list[int], list[int]] | None:
    """Row, column and box digit masks of a grid, or None when two givens already clash."""
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    for i, d in enumerate(cells):
        if d:
            bit = 1 << int(d)
            if (rows[_ROW[i]] | cols[_COL[i]] | boxes[_BOX[i]]) & bit:
                return None
            rows[_ROW[i]] |= bit
            cols[_COL[i]] |= bit
            boxes[_BOX[i]] |= bit
    return rows, cols, boxes


def count_solutions(cells: Sequence[int], limit: int = 2) -> int:
    """How many completions the puzzle has, counting no further than `limit` (2 answers "is it unique?")."""
    masks = _masks(cells)
    if masks is None:
        return 0
    return _search([int(d) for d in cells], *masks, limit, [], None)


def solve(cells: Sequence[int], rng: np.random.Generator | None = None) -> list[int] | None:
    """One completion of the puzzle (a random one with `rng`), or None if it has none."""
    masks = _masks(cells)
    found: list[list[int]] = []
    if masks is not None:
        _search([int(d) for d in cells], *masks, 1, found, rng)
    return found[0] if found else None


def is_valid_solution(grid: Sequence[int], puzzle: Sequence[int]) -> bool:
    """`grid` is a complete valid Sudoku that keeps every given of `puzzle`."""
    g = np.asarray(grid).reshape(9, 9)
    if g.shape != (9, 9) or not np.isin(g, np.arange(1, 10)).all():
        return False
    p = np.asarray(puzzle).reshape(9, 9)
    if ((p != 0) & (p != g)).any():
        return False
    boxes = g.reshape(3, 3, 3, 3).transpose(0, 2, 1, 3).reshape(9, 9)
    return all(len(set(line)) == 9 for part in (g, g.T, boxes) for line in part.tolist())


def random_grids(count: int, seed: int) -> np.ndarray:
    """`count` complete grids, (count, 81) int8, each a random completion of the empty grid."""
    rng = np.random.default_rng(seed)
    grids = [solve([0] * 81, rng) for _ in range(count)]
    return np.asarray(grids, dtype=np.int8)


def _random_permutations(rng: np.random.Generator, batch: int, n: int) -> np.ndarray:
    return np.argsort(rng.random((batch, n)), axis=1)


def _line_order(rng: np.random.Generator, batch: int) -> np.ndarray:
    """(batch, 9) row (or column) orders that keep Sudoku's rules: bands permuted, rows permuted inside bands."""
    bands = _random_permutations(rng, batch, 3)
    inside = _random_permutations(rng, batch * 3, 3).reshape(batch, 3, 3)
    return (bands[:, :, None] * 3 + inside).reshape(batch, 9)


def permuted(grids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each (81,) grid relabelled by random band/row/stack/column/digit permutations and a random transpose."""
    batch = len(grids)
    g = grids.reshape(batch, 9, 9)
    transpose = rng.random(batch) < 0.5
    g = np.where(transpose[:, None, None], g.transpose(0, 2, 1), g)
    g = np.take_along_axis(g, _line_order(rng, batch)[:, :, None], axis=1)
    g = np.take_along_axis(g, _line_order(rng, batch)[:, None, :], axis=2)
    digits = np.concatenate([np.zeros((batch, 1), dtype=np.int64), 1 + _random_permutations(rng, batch, 9)], axis=1)
    return np.take_along_axis(digits, g.reshape(batch, 81).astype(np.int64), axis=1)


def unique_puzzle(rng: np.random.Generator, givens: int, base: np.ndarray | None = None,
                  tries: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """(puzzle, solution): a random grid with cells removed in random order while the solution stays unique,
    down to exactly `givens` givens (a fresh grid is tried when removal gets stuck above that)."""
    for _ in range(tries):
        solution = (np.asarray(solve([0] * 81, rng)) if base is None else permuted(base[None], rng)[0])
        puzzle = solution.copy()
        for cell in rng.permutation(81):
            if (puzzle != 0).sum() == givens:
                return puzzle, solution
            digit, puzzle[cell] = puzzle[cell], 0
            if count_solutions(puzzle.tolist()) != 1:
                puzzle[cell] = digit
        if (puzzle != 0).sum() == givens:
            return puzzle, solution
    raise RuntimeError(f"no unique puzzle with {givens} givens after {tries} grids")


def format_grid(cells: Sequence[int]) -> str:
    """9 lines of 9 digits (0 = empty), no trailing newline."""
    digits = "".join(str(int(d)) for d in cells)
    return "\n".join(digits[9 * r: 9 * r + 9] for r in range(9))


def parse_grid(text: str) -> list[int] | None:
    """The 81 cells of a grid written as `format_grid` writes it, or None if `text` is not one."""
    digits = "".join(text.split())
    if len(digits) != 81 or not digits.isdigit():
        return None
    return [int(d) for d in digits]


# -- tokenizer -------------------------------------------------------------------------------------------------


def tokenizer_vocab(vocab_size: int) -> dict[str, int]:
    """Specials, newline, digits, then `<unusedN>` up to `vocab_size`."""
    vocab = {piece: i for i, piece in enumerate(SPECIALS)}
    vocab["\n"] = NEWLINE_ID
    vocab.update({str(d): DIGIT0_ID + d for d in range(10)})
    vocab.update({f"<unused{i}>": i + len(vocab) for i in range(vocab_size - len(vocab))})
    return vocab


def save_tokenizer(out: Path, vocab_size: int) -> None:
    """tokenizer.json (BPE with no merges: one token per character) and tokenizer_config.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    vocab = tokenizer_vocab(vocab_size)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()  # characters are joined as they are, with no space between tokens
    tok.add_special_tokens([AddedToken(p, special=True) for p in vocab if p.startswith("<")])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))


# -- batches ---------------------------------------------------------------------------------------------------


def canvases(grids: np.ndarray, trailing_newline: np.ndarray | None = None) -> np.ndarray:
    """(B, CANVAS_LENGTH) token ids of grids laid out as `Model.edit` lays out their text (see the docstring)."""
    batch = len(grids)
    canvas = np.full((batch, CANVAS_LENGTH), PAD_ID, dtype=np.int64)
    canvas[:, 9:GRID_TOKENS:10] = NEWLINE_ID
    canvas[:, CELL_POSITIONS] = DIGIT0_ID + np.asarray(grids, dtype=np.int64)
    canvas[:, GRID_TOKENS] = EOS_ID
    if trailing_newline is not None:
        canvas[trailing_newline, GRID_TOKENS] = NEWLINE_ID
        canvas[trailing_newline, GRID_TOKENS + 1] = EOS_ID
    return canvas


class PuzzleSampler:
    """Training puzzles: (clean canvas, free mask), from a pool of base grids (numpy Generator: seeded)."""

    def __init__(self, pool: np.ndarray, seed: int, givens: tuple[int, int]):
        self.pool = pool
        self.rng = np.random.default_rng(seed)
        self.givens = givens

    def next(self, batch: int, givens: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        low, high = givens or self.givens
        solutions = permuted(self.pool[self.rng.integers(0, len(self.pool), batch)], self.rng)
        counts = self.rng.integers(low, high + 1, batch)
        blank = np.argsort(self.rng.random((batch, 81)), axis=1).argsort(axis=1) < (81 - counts)[:, None]
        canvas = canvases(solutions, self.rng.random(batch) < 0.1)
        free = np.zeros_like(canvas, dtype=bool)
        free[:, CELL_POSITIONS] = blank
        return canvas, free


# -- model -----------------------------------------------------------------------------------------------------


def build_model(vocab_size: int, hidden: int, layers: int, heads: int, rope_theta: float, seed: int = 0) -> Any:
    """DiffusionGemma's layout (sliding layers then a K=V full-attention layer with partial RoPE, dense MLP plus
    top-2 of 4 experts in every layer, self-conditioning) at Sudoku size. The sliding window covers the whole
    canvas: every cell constrains cells anywhere in the grid."""
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    text = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=hidden // heads,
        global_head_dim=2 * hidden // heads, num_global_key_value_heads=1, sliding_window=128, num_experts=4,
        top_k_experts=2, moe_intermediate_size=hidden, max_position_embeddings=256,
        layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
        eos_token_id=EOS_ID, bos_token_id=BOS_ID, pad_token_id=PAD_ID,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": rope_theta},
                         "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                            "rope_theta": 1_000_000.0}},
    )
    config = DiffusionGemmaConfig(
        text_config=text,
        vision_config=dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, head_dim=8),
        canvas_length=CANVAS_LENGTH)
    return DiffusionGemmaForBlockDiffusion(config)


def noised_canvas(canvas: Any, free: Any, gen: Any, vocab: int, full_noise: float = 0.25,
                  min_noise: float = 0.0) -> tuple[Any, Any]:
    """(noisy canvas, noised mask): free cells replaced by uniform tokens at a per-example rate (see docstring)."""
    import torch

    batch = canvas.shape[0]
    rate = torch.where(torch.rand(batch, 1, generator=gen) < full_noise, torch.ones(batch, 1),
                       1.0 - (1.0 - min_noise) * torch.rand(batch, 1, generator=gen))
    noised = free & (torch.rand(canvas.shape, generator=gen) < rate)
    noise = torch.randint(0, vocab, canvas.shape, generator=gen)
    return torch.where(noised, noise, canvas), noised


def decoder_logits(model: Any, canvas_in: Any, cache: Any, self_conditioning: Any = None) -> Any:
    decoded = model.model.decoder(decoder_input_ids=canvas_in, past_key_values=cache,
                                  self_conditioning_logits=self_conditioning)
    return softcapped_logits(model, decoded.last_hidden_state)


def bos_cache(model: Any, batch: int) -> Any:
    """The encoder's cache of the prompt every Sudoku is edited after: BOS alone."""
    import torch

    return model.model.encoder(input_ids=torch.full((batch, 1), BOS_ID), use_cache=True).past_key_values


def loss_and_accuracy(model: Any, canvas: Any, free: Any, gen: Any, self_condition: bool,
                      full_noise: float = 0.25, min_noise: float = 0.0) -> tuple[Any, float]:
    """(cross-entropy over free cells, argmax accuracy on noised cells) of one batch."""
    import torch
    import torch.nn.functional as F

    vocab = model.config.text_config.vocab_size
    canvas_in, noised = noised_canvas(canvas, free, gen, vocab, full_noise, min_noise)
    cache = bos_cache(model, canvas.shape[0])
    sc_logits = None
    if self_condition:
        with torch.no_grad():
            # The sampler feeds back logits divided by the step's temperature (its 0.8 -> 0.4 range).
            temp = 0.4 + 0.4 * torch.rand(canvas.shape[0], 1, 1, generator=gen)
            sc_logits = decoder_logits(model, canvas_in, cache) / temp
    logits = decoder_logits(model, canvas_in, cache, sc_logits)
    loss = F.cross_entropy(logits[free], canvas[free])
    with torch.no_grad():
        accuracy = float((logits[noised].argmax(-1) == canvas[noised]).float().mean()) if noised.any() else 1.0
    return loss, accuracy


def full_forward_check(model: Any, canvas: Any) -> float:
    """Max |difference| between our split encoder/decoder path and the class's own `forward` (sanity check)."""
    import torch

    with torch.no_grad():
        ours = decoder_logits(model, canvas, bos_cache(model, canvas.shape[0]))
        theirs = model(input_ids=torch.full((canvas.shape[0], 1), BOS_ID), decoder_input_ids=canvas).logits
    return float((ours - theirs).abs().max())


# -- training --------------------------------------------------------------------------------------------------


def generation_config() -> Any:
    """The Sudoku model's `DiffusionGemmaGenerationConfig` (train_demo builds it from these defaults and ids)."""
    return demo_generation_config(GENERATION_DEFAULTS, EOS_ID, PAD_ID, BOS_ID)


def save(model: Any, out: Path, log: dict[str, Any]) -> None:
    """save_pretrained + tokenizer.json + tokenizer_config.json + generation_config.json + train_log.json."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_tokenizer(out, model.config.text_config.vocab_size)
    generation_config().save_pretrained(out)
    (out / "train_log.json").write_text(json.dumps(log, indent=1))


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    return int(low), int(high or low)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/dgrun-sudoku"), help="checkpoint folder")
    parser.add_argument("--minutes", type=float, default=60.0, help="wall-clock training budget")
    parser.add_argument("--steps", type=int, default=0, help="step budget (0: only the wall clock)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, default=None,
                        help="continue from this checkpoint folder with a fresh schedule (give another --seed)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--rope-theta", type=float, default=10_000.0, help="RoPE base of the sliding layers")
    parser.add_argument("--vocab-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--givens", type=_range, default=(22, 50), metavar="MIN:MAX",
                        help="givens per training puzzle, uniform in MIN..MAX")
    parser.add_argument("--curriculum", type=float, default=0.0, metavar="FRACTION",
                        help="over this fraction of the run, start at the easiest third of --givens and widen")
    parser.add_argument("--full-noise", type=float, default=0.25,
                        help="share of examples with every free cell noised (the first denoising step)")
    parser.add_argument("--min-noise", type=float, default=0.0,
                        help="the other examples' noise rate is uniform in (MIN, 1]")
    parser.add_argument("--pool", type=int, default=2000, help="base grids to permute")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--eval-minutes", type=float, default=3.0)
    parser.add_argument("--save-minutes", type=float, default=15.0, help="save the checkpoint this often too")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    pool = random_grids(args.pool, seed=1000 + args.seed)
    print(f"pool: {len(pool)} base grids ({time.time() - started:.1f}s)", flush=True)

    if args.init is None:
        model = build_model(args.vocab_size, args.hidden, args.layers, args.heads, args.rope_theta, seed=args.seed)
    else:
        from transformers import DiffusionGemmaForBlockDiffusion

        model = DiffusionGemmaForBlockDiffusion.from_pretrained(args.init, dtype=torch.float32)
        print(f"continuing from {args.init}", flush=True)
    model.train()
    vocab = model.config.text_config.vocab_size
    n_params = sum(p.numel() for n, p in model.named_parameters() if "vision" not in n)
    print(f"model: {n_params:,} parameters (vision stub excluded), vocab {vocab}", flush=True)

    sampler = PuzzleSampler(pool, args.seed, args.givens)
    # Held out: other base grids, 36-46 givens (the target band), the same noise at every evaluation.
    heldout_sampler = PuzzleSampler(random_grids(64, seed=999_999), 12345, (36, 46))
    heldout = [tuple(map(torch.from_numpy, heldout_sampler.next(128)))]
    require_split_path(full_forward_check(model, heldout[0][0][:4]))

    optim = adamw(model, args.lr)
    gen = torch.Generator().manual_seed(args.seed + 2)
    flips = np.random.default_rng(args.seed + 3)
    train_started = time.time()
    progress = progress_clock(args.minutes, args.steps)

    def givens_now(p: float) -> tuple[int, int]:
        low, high = args.givens
        if args.curriculum <= 0 or p >= args.curriculum:
            return low, high
        easiest = high - (high - low) // 3
        return round(easiest - (easiest - low) * p / args.curriculum), high

    def evaluate() -> dict[str, float]:
        """Held-out loss and accuracy at the first step (every free cell noised, no self-conditioning) and at
        mixed noise with self-conditioning."""
        model.eval()
        out = {}
        with torch.no_grad():
            for name, full, sc in (("first_step", 1.0, False), ("mixed", args.full_noise, True)):
                g = torch.Generator().manual_seed(54321)
                results = [loss_and_accuracy(model, c, f, g, sc, full) for c, f in heldout]
                out[f"{name}_loss"] = float(np.mean([float(r[0]) for r in results]))
                out[f"{name}_acc"] = float(np.mean([r[1] for r in results]))
        model.train()
        return out

    log: dict[str, Any] = {"config": model.config.text_config.to_dict(), "train": [], "heldout": [],
                           "args": {k: str(v) for k, v in vars(args).items()}}
    log["previous"] = earlier_logs(args.init)
    step, window = 0, []
    last_eval = last_save = time.time()
    log["heldout"].append({"step": 0, **evaluate()})
    print(f"step 0 held-out: {log['heldout'][-1]}  (ln 9 = {math.log(9):.3f})", flush=True)
    while True:
        p = progress(step)
        if p >= 1.0:
            break
        lr = learning_rate(args.lr, step, args.warmup, p)
        canvas, free = map(torch.from_numpy, sampler.next(args.batch, givens_now(p)))
        loss, accuracy = loss_and_accuracy(model, canvas, free, gen, bool(flips.random() < 0.5), args.full_noise,
                                           args.min_noise)
        optimizer_step(model, optim, loss, lr)
        step += 1
        window.append((loss.item(), accuracy))
        if step % args.log_every == 0:
            mean_loss, mean_acc = np.mean(window, axis=0)
            window.clear()
            elapsed = time.time() - train_started
            log["train"].append({"step": step, "seconds": round(elapsed), "loss": float(mean_loss),
                                 "noised_acc": float(mean_acc)})
            print(f"step {step:5d}  {elapsed / 60:5.1f} min  lr {lr:.2e}  givens {givens_now(p)}  loss {mean_loss:.3f}"
                  f"  noised acc {mean_acc:.3f}  {elapsed / step:.2f} s/step", flush=True)
        if time.time() - last_eval > args.eval_minutes * 60:
            last_eval = time.time()
            log["heldout"].append({"step": step, "seconds": round(time.time() - train_started), **evaluate()})
            print(f"step {step:5d} held-out: " + "  ".join(f"{k} {v:.3f}" for k, v in log["heldout"][-1].items()
                                                          if k not in ("step", "seconds")), flush=True)
        if time.time() - last_save > args.save_minutes * 60:
            last_save = time.time()
            model.eval()
            save(model, args.out, {**log, "steps": step})
            model.train()
    log["heldout"].append({"step": step, "seconds": round(time.time() - train_started), **evaluate()})
    log["steps"], log["train_seconds"] = step, round(time.time() - train_started)
    print(f"done: {step} steps, {(time.time() - train_started) / 60:.1f} min; held-out {log['heldout'][-1]}",
          flush=True)
    model.eval()
    save(model, args.out, log)
    print(f"saved to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
