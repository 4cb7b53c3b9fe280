"""The autoregressive baseline for the Sudoku model: the same architecture, size, data and budget, left to right.

The model is `train_sudoku.build_model`'s DiffusionGemma, trained and run through its causal encoder stack only
(what an autoregressive Gemma is): the sequence is `<bos>`, the puzzle as `train_sudoku.format_grid` writes it,
a newline, then the solution grid and `<eos>`. Cross-entropy on the solution's blank cells, the positions the
diffusion model is trained on. Solving writes the solution left to right, greedily, with the givens and newlines
forced (the analogue of `edit` clamping them): the model decides only the blanks, each seeing the whole puzzle
and the cells already written.

    python tools/train_sudoku_ar.py --minutes 60 --out /tmp/sudoku-ar
    python tools/train_sudoku_ar.py --eval /tmp/sudoku-ar --per-band 100
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_sudoku as ts  # noqa: E402
from train_demo import learning_rate, optimizer_step, softcapped_logits  # noqa: E402

PROMPT_TOKENS = 1 + ts.GRID_TOKENS + 1  # <bos>, the puzzle, a newline


def sequences(puzzles: np.ndarray, solutions: np.ndarray) -> np.ndarray:
    """(B, PROMPT_TOKENS + GRID_TOKENS + 1) token ids: `<bos> puzzle \\n solution <eos>`."""
    batch = len(puzzles)
    head = np.full((batch, 1), ts.BOS_ID)
    newline = np.full((batch, 1), ts.NEWLINE_ID)
    grid = ts.canvases(puzzles)[:, :ts.GRID_TOKENS]
    answer = ts.canvases(solutions)[:, :ts.GRID_TOKENS + 1]  # the grid and its EOS
    return np.concatenate([head, grid, newline, answer], axis=1)


def batch(sampler: ts.PuzzleSampler, size: int) -> tuple[Any, Any]:
    """(token ids, mask of the positions whose next token is a blank cell of the solution)."""
    import torch

    canvas, free = sampler.next(size)
    cells = ts.CELL_POSITIONS
    solutions = canvas[:, cells] - ts.DIGIT0_ID
    puzzles = np.where(free[:, cells], 0, solutions)
    ids = sequences(puzzles, solutions)
    targets = np.zeros_like(ids, dtype=bool)
    targets[:, PROMPT_TOKENS - 1 + cells] = free[:, cells]  # position p predicts token p + 1
    return torch.from_numpy(ids), torch.from_numpy(targets)


def ar_logits(model: Any, ids: Any) -> Any:
    return softcapped_logits(model, model.model.encoder(input_ids=ids).last_hidden_state)


def solve(model: Any, puzzle: list[int]) -> list[int]:
    """Greedy left-to-right solution with the givens forced; the encoder's KV cache grows by each run of forced
    tokens and written cells."""
    import torch

    ids = sequences(np.asarray([puzzle]), np.asarray([puzzle]))[0].tolist()[:PROMPT_TOKENS + ts.GRID_TOKENS]
    cache, fed = None, 0
    with torch.no_grad():
        for cell, position in enumerate(ts.CELL_POSITIONS):
            if puzzle[cell] == 0:
                index = PROMPT_TOKENS + position
                out = model.model.encoder(input_ids=torch.tensor([ids[fed:index]]), past_key_values=cache,
                                          use_cache=True)
                cache, fed = out.past_key_values, index
                logits = softcapped_logits(model, out.last_hidden_state[0, -1])
                digits = logits[ts.DIGIT0_ID + 1: ts.DIGIT0_ID + 10]  # a blank is written as a digit 1-9
                ids[index] = ts.DIGIT0_ID + 1 + int(digits.argmax())
    return [ids[PROMPT_TOKENS + p] - ts.DIGIT0_ID for p in ts.CELL_POSITIONS]


def evaluate(path: Path, per_band: int) -> None:
    import eval_sudoku
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    torch.set_num_threads(1)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32).eval()
    counts: dict[tuple[int, int], list[tuple[bool, float]]] = {band: [] for band in eval_sudoku.BANDS}
    for puzzle, _ in eval_sudoku.load_set():
        rows = counts[eval_sudoku.band_of(puzzle)]
        if len(rows) < per_band:
            started = time.time()
            rows.append((ts.is_valid_solution(solve(model, puzzle), puzzle), time.time() - started))
    print("| givens | solved | puzzles | seconds per puzzle |\n|---|---|---|---|")
    for (low, high), rows in counts.items():
        solved, seconds = zip(*rows, strict=True)
        print(f"| {low}-{high} | {100 * np.mean(solved):.1f}% | {len(rows)} | {np.mean(seconds):.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/dgrun-sudoku-ar"))
    parser.add_argument("--eval", type=Path, help="evaluate this checkpoint on the held-out set and exit")
    parser.add_argument("--per-band", type=int, default=100)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--rope-theta", type=float, default=41.17)
    parser.add_argument("--vocab-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.eval is not None:
        evaluate(args.eval, args.per_band)
        return 0

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    sampler = ts.PuzzleSampler(ts.random_grids(2000, seed=1000 + args.seed), args.seed, (22, 50))
    model = ts.build_model(args.vocab_size, args.hidden, args.layers, args.heads, args.rope_theta, seed=args.seed)
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.05)
    log: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "train": []}
    started, step, window = time.time(), 0, []
    while (elapsed := time.time() - started) < args.minutes * 60:
        ids, targets = batch(sampler, args.batch)
        logits = ar_logits(model, ids[:, :-1])
        loss = F.cross_entropy(logits[targets[:, :-1]], ids[:, 1:][targets[:, :-1]])
        optimizer_step(model, optim, loss, learning_rate(args.lr, step, args.warmup, elapsed / (args.minutes * 60)))
        step += 1
        window.append(loss.item())
        if step % 25 == 0:
            log["train"].append({"step": step, "seconds": round(elapsed), "loss": float(np.mean(window))})
            print(f"step {step:5d}  {elapsed / 60:5.1f} min  loss {np.mean(window):.3f}", flush=True)
            window.clear()
    model.eval()
    model.save_pretrained(args.out)
    (args.out / "train_log.json").write_text(json.dumps({**log, "steps": step}, indent=1))
    print(f"done: {step} steps; saved to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
