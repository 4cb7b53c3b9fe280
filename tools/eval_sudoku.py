"""Evaluate a Sudoku model through dgrun's edit path: the solve rate by band of givens, steps and seconds per puzzle.

Each puzzle goes through `Model.edit(grid, blank="0")`, exactly what `dgrun -m sudoku --edit "$(cat puzzle.txt)"
--blank 0` runs (`--cli N` also runs the first N puzzles of each band through that command and checks that it
prints the same grid). A puzzle is solved when the edited text is a complete valid grid that keeps every given.

The held-out set (`tools/sudoku_eval.txt`, made by `--make-set`) holds puzzles with unique solutions, on grids from
a generator seed the training pool never uses, in three bands of givens: 36-46 (Unsloth's notebook), 28-35 and
22-27; one line per puzzle, `puzzle solution` as 81 digits each.

    python tools/eval_sudoku.py [--model sudoku|FILE.dgf|CHECKPOINT_DIR] [--per-band 100] [--steps N ...]
    python tools/eval_sudoku.py --make-set --per-band 200
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_sudoku  # noqa: E402

import dgrun  # noqa: E402

EVAL_SET = Path(__file__).resolve().parent / "sudoku_eval.txt"
BANDS = [(36, 46), (28, 35), (22, 27)]
SET_SEED = 20_2611  # grids and removals of the held-out set; training pools use seeds 1000 + --seed


def make_set(per_band: int, path: Path = EVAL_SET) -> None:
    """Write `per_band` unique-solution puzzles per band (givens uniform in the band), band by band."""
    rng = np.random.default_rng(SET_SEED)
    lines = []
    for low, high in BANDS:
        for k in range(per_band):
            # Greedy removal seldom gets down to 22 givens: such a puzzle may take a few hundred grids.
            puzzle, solution = train_sudoku.unique_puzzle(rng, int(rng.integers(low, high + 1)), tries=2000)
            lines.append("".join(map(str, puzzle)) + " " + "".join(map(str, solution)))
            print(f"\rband {low}-{high}: {k + 1}/{per_band}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    path.write_text("\n".join(lines) + "\n")


def load_set(path: Path = EVAL_SET) -> list[tuple[list[int], list[int]]]:
    """(puzzle, solution) pairs of the held-out set, in file order."""
    pairs = []
    for line in path.read_text().split("\n"):
        if line.strip():
            puzzle, solution = line.split()
            pairs.append(([int(c) for c in puzzle], [int(c) for c in solution]))
    return pairs


def band_of(puzzle: list[int]) -> tuple[int, int]:
    givens = sum(1 for d in puzzle if d)
    return next(band for band in BANDS if band[0] <= givens <= band[1])


def solve_with(model: dgrun.Model, puzzle: list[int], seed: int, **params: Any) -> tuple[bool, str, dict[str, Any]]:
    """(solved, edited text, stats) for one puzzle through `Model.edit(..., blank="0")`."""
    out = model.edit(train_sudoku.format_grid(puzzle), blank="0", seed=seed, **params)
    grid = train_sudoku.parse_grid(out.text or "")
    return grid is not None and train_sudoku.is_valid_solution(grid, puzzle), out.text or "", out.stats


def show_steps(model: dgrun.Model, puzzle: list[int], seed: int, **params: Any) -> str:
    """The drafts of one solve side by side, as `--show-canvas` draws them on a terminal: accepted cells as digits,
    still-noisy ones as `.` (dimmed digits there). Givens are accepted from the start (they are clamped)."""
    frames = []
    for event in model.stream_edit(train_sudoku.format_grid(puzzle), blank="0", seed=seed, **params):
        if isinstance(event, dgrun.Draft):
            text = "".join(model.detokenize([int(t)]) if ok else "." for t, ok in
                           zip(event.tokens[:train_sudoku.GRID_TOKENS], event.accepted[:train_sudoku.GRID_TOKENS],
                               strict=True))
            frames.append((event.step, text.split("\n")))
    columns = [("puzzle", train_sudoku.format_grid(puzzle).replace("0", ".").split("\n"))]
    columns += [(f"step {step}", rows) for step, rows in frames]
    lines = ["   ".join(f"{title:<9}" for title, _ in columns)]
    lines += ["   ".join(f"{rows[r]:<9}" for _, rows in columns) for r in range(9)]
    return "\n".join(lines)


def cli_text(model_path: str, puzzle: list[int], seed: int, backend: str, **params: Any) -> str:
    """What `dgrun -m MODEL --edit "$(cat puzzle.txt)" --blank 0` prints (its trailing newline removed)."""
    command = [sys.executable, "-m", "dgrun", "-m", model_path, "--edit", train_sudoku.format_grid(puzzle),
               "--blank", "0", "--seed", str(seed), "--backend", backend]
    flags = {"max_denoising_steps": "--steps", "t_min": "--t-min", "t_max": "--t-max",
             "entropy_bound": "--entropy-bound"}
    for name, value in params.items():
        command += [flags[name], str(value)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"dgrun failed: {result.stderr.strip()}")
    return result.stdout.removesuffix("\n")


def evaluate(model: dgrun.Model, pairs: list[tuple[list[int], list[int]]], per_band: int, seed: int = 0,
             bands: list[tuple[int, int]] = BANDS, **params: Any) -> dict[tuple[int, int], dict[str, float]]:
    """Band → {solved, puzzles, steps, seconds} (means per puzzle) over the first `per_band` puzzles of each band."""
    results: dict[tuple[int, int], list[tuple[bool, int, float]]] = {band: [] for band in bands}
    for index, (puzzle, _) in enumerate(pairs):
        band = band_of(puzzle)
        if band not in results or len(results[band]) >= per_band:
            continue
        solved, _, stats = solve_with(model, puzzle, seed + index, **params)
        results[band].append((solved, stats["steps_per_canvas"][0], stats["seconds"]))
    table = {}
    for band, rows in results.items():
        if rows:
            solved, steps, seconds = zip(*rows, strict=True)
            table[band] = {"solved": float(np.mean(solved)), "puzzles": len(rows), "steps": float(np.mean(steps)),
                           "seconds": float(np.mean(seconds))}
    return table


def open_model(spec: str, backend: str, workdir: Path) -> tuple[dgrun.Model, str]:
    """A shipped model's name or a .dgf opens directly; a checkpoint folder is converted (f32) first."""
    path = Path(spec)
    if path.is_dir():
        from dgrun.converters.convert_hf import convert

        converted = workdir / "model.dgf"
        convert(path, converted, "f32", quiet=True)
        spec = str(converted)
    return dgrun.load(spec, backend=backend), spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sudoku", help="shipped model name, .dgf file or checkpoint folder")
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="cpu backend threads (one: on a loaded machine, more threads wait on each other)")
    parser.add_argument("--per-band", type=int, default=100, help="puzzles per band (the first N of the set)")
    parser.add_argument("--seed", type=int, default=0, help="puzzle i is solved with seed + i")
    parser.add_argument("--bands", nargs="+", default=[f"{low}-{high}" for low, high in BANDS],
                        help="bands of givens to evaluate (default: all three)")
    parser.add_argument("--steps", type=int, dest="max_denoising_steps")
    parser.add_argument("--t-min", type=float)
    parser.add_argument("--t-max", type=float)
    parser.add_argument("--entropy-bound", type=float)
    parser.add_argument("--cli", type=int, default=0, metavar="N",
                        help="also run the first N puzzles of each band through the dgrun command and compare")
    parser.add_argument("--show", type=int, metavar="INDEX", help="print the drafts of puzzle INDEX and exit")
    parser.add_argument("--make-set", action="store_true", help="write the held-out set and exit")
    args = parser.parse_args(argv)
    os.environ["DGRUN_THREADS"] = str(args.threads)  # read by the cpu backend when it starts
    if args.make_set:
        make_set(args.per_band)
        return 0
    params = {k: getattr(args, k) for k in ("max_denoising_steps", "t_min", "t_max", "entropy_bound")
              if getattr(args, k) is not None}
    pairs = load_set()
    with tempfile.TemporaryDirectory() as tmp:
        model, spec = open_model(args.model, args.backend, Path(tmp))
        with model:
            if args.show is not None:
                print(show_steps(model, pairs[args.show][0], args.seed + args.show, **params))
                return 0
            started = time.time()
            bands = [tuple(map(int, band.split("-"))) for band in args.bands]
            table = evaluate(model, pairs, args.per_band, args.seed, bands, **params)  # type: ignore[arg-type]
            print(f"{args.model} ({model.backend.name} backend, {params or 'the file defaults'}), "
                  f"{time.time() - started:.0f} s")
            print("| givens | solved | puzzles | steps per puzzle | seconds per puzzle |")
            print("|---|---|---|---|---|")
            for (low, high), row in table.items():
                print(f"| {low}-{high} | {100 * row['solved']:.1f}% | {row['puzzles']} | {row['steps']:.1f} | "
                      f"{row['seconds']:.3f} |")
            if args.cli:
                checked = 0
                for band in BANDS:
                    for index in [i for i, (puzzle, _) in enumerate(pairs) if band_of(puzzle) == band][:args.cli]:
                        puzzle = pairs[index][0]
                        _, text, _ = solve_with(model, puzzle, args.seed + index, **params)
                        if cli_text(spec, puzzle, args.seed + index, args.backend, **params) != text:
                            raise RuntimeError(f"puzzle {index}: the dgrun command printed another grid")
                        checked += 1
                print(f"dgrun --edit ... --blank 0 printed the same grid as Model.edit on {checked} puzzles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
