"""Constrained output, measured: validity, tokens per decoder forward, answer lengths, what the masks cost and
how far they move the sampler.

    python tools/bench_constrained.py                      # the demo model, 5 seeds per case, then the mask cost
    python tools/bench_constrained.py --seeds 2 --steps 16 # quicker
    python tools/bench_constrained.py --mask-only          # only the mask cost at a 262,144-token vocabulary

Per case (a JSON schema, a regex longer than a canvas, a Lark grammar) and seed: one constrained answer, judged
by `jsonschema`, `re.fullmatch` or llguidance's matcher, and one unconstrained answer to the same prompt and
seed for the tokens-per-forward comparison. The skew the masks put on the sampler is measured where it acts:
at each masked row, the model's probability mass on the tokens the grammar allows (at the step's temperature);
KL(masked ‖ model) of that row is -log of it.

The mask cost is measured at the released model's vocabulary size, 262,144 tokens, with a synthetic vocabulary
of that size (every byte, then the most frequent words and word pieces of Python's standard library, with and
without a leading space): llguidance's cost grows with the vocabulary's size and its token trie. Masks are timed
twice along the same answer: on the first visit of each grammar state, and again (llguidance keeps what it
computed per lexer state in the compiled grammar, which a server's requests with the same schema share).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import statistics
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import numpy as np
from fixtures import PERSON_SCHEMA as PERSON

import dgrun
from dgrun import constrain, generate, sampler
from dgrun.backends import get_backend

LONG_REGEX = r"([a-z]{3}-[0-9]{2} ){8}(yes|no)"  # 58+ characters: more than one 32-token canvas of the demo
CALL_REGEX = r"(def|class) [a-z_]{1,20}\((self|x|y)?(, (x|y|n))*\):"
ARITHMETIC = """
start: expr
expr: term (("+" | "-" | "*") term)*
term: NUMBER | NAME | "(" expr ")"
NUMBER: /[0-9]{1,4}/
NAME: /[a-z_][a-z0-9_]{0,8}/
%ignore " "
"""
CASES: dict[str, dict[str, Any]] = {
    "json schema (nested, array, enum, bounded/unbounded strings, numbers)": {"json_schema": PERSON},
    "json object": {"json_schema": {"type": "object"}},
    "regex longer than a canvas": {"regex": LONG_REGEX},
    "regex (a Python def line)": {"regex": CALL_REGEX},
    "lark grammar (arithmetic)": {"grammar": ARITHMETIC},
}
PROMPTS = ["def fibonacci(n):", "import os\n", "class Config:\n    ", "x = "]


def judge(model: dgrun.Model, kind: dict[str, Any], tokens: list[int]) -> tuple[bool, str]:
    """(valid, text) by the grammar's own judge; the answer must end with EOS."""
    import jsonschema

    eos = model.generation_config.eos_token_ids
    if not tokens or tokens[-1] not in eos:
        return False, model.detokenize(tokens) or ""
    text = model.detokenize(tokens[:-1]) or ""
    try:
        if "json_schema" in kind:
            jsonschema.validate(json.loads(text), kind["json_schema"])
        elif "regex" in kind and not re.fullmatch(kind["regex"], text):
            return False, text
    except (ValueError, jsonschema.ValidationError):
        return False, text
    return model.constraint(**kind).accepts(tokens), text


class SkewProbe:
    """Wraps a backend's mask_rows to record, per masked row, the model's mass on the allowed tokens at the
    step's temperature (the temperature comes from `dgrun.generate.temperature`, called just before)."""

    def __init__(self, model: dgrun.Model):
        self.model, self.mass, self.frontier_mass = model, [], []
        self.temp = 1.0
        ops = model.backend
        self._mask_rows, self._temperature = ops.mask_rows, generate.temperature

        def temperature(*args: Any) -> float:
            self.temp = self._temperature(*args)
            return self.temp

        def mask_rows(logits: Any, start: int, bitmask: np.ndarray) -> Any:
            rows = np.asarray(ops.to_numpy(logits))[start:start + len(bitmask)] / np.float32(self.temp)
            probs = sampler.softmax(rows.astype(np.float64))
            allowed = (probs * sampler.allowed_tokens(bitmask, rows.shape[-1])).sum(axis=-1)
            self.mass.extend(allowed.tolist())
            self.frontier_mass.append(float(allowed[0]))
            return self._mask_rows(logits, start, bitmask)

        ops.mask_rows = mask_rows
        generate.temperature = temperature

    def close(self) -> None:
        self.model.backend.mask_rows = self._mask_rows
        generate.temperature = self._temperature


def quantiles(values: list[float]) -> str:
    if not values:
        return "-"
    q = np.percentile(values, [0, 25, 50, 75, 100])
    return "/".join(f"{v:.0f}" for v in q)


def run_cases(model: dgrun.Model, seeds: int, params: dict[str, Any], cases: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name, kind in CASES.items():
        if not any(word in name for word in cases):
            continue
        probe = SkewProbe(model)
        valid, lengths, chars, texts = 0, [], [], []
        passes = tokens = free_passes = free_tokens = 0
        stats: collections.Counter[str] = collections.Counter()
        seconds = free_seconds = 0.0
        try:
            for seed in range(seeds):
                prompt = PROMPTS[seed % len(PROMPTS)]
                out = model.generate(prompt, seed=seed, **params, **kind)
                ok, text = judge(model, kind, out.tokens)
                valid += ok
                lengths.append(len(out.tokens))
                chars.append(len(text))
                texts.append(text)
                passes += out.stats["decoder_passes"]
                tokens += out.stats["new_tokens"]
                seconds += out.stats["seconds"]
                stats.update({k: v for k, v in out.stats["constraint"].items()})
                free = model.generate(prompt, seed=seed, **params)
                free_passes += free.stats["decoder_passes"]
                free_tokens += free.stats["new_tokens"]
                free_seconds += free.stats["seconds"]
                print(f"  {name} seed {seed}: {'valid' if ok else 'INVALID'}, {len(out.tokens)} tokens, "
                      f"{out.stats['decoder_passes']} passes: {text[:100]!r}", file=sys.stderr, flush=True)
        finally:
            probe.close()
        masses = np.asarray(probe.mass) if probe.mass else np.ones(1)
        frontier = np.asarray(probe.frontier_mass) if probe.frontier_mass else np.ones(1)
        written = stats["frontier_tokens"] + stats["forced_tokens"] + stats["finished_tokens"] + \
            stats["steered_tokens"]
        rows.append({
            "case": name, "valid": valid, "runs": seeds,
            "tokens_per_forward": tokens / passes if passes else math.inf,
            "free_tokens_per_forward": free_tokens / free_passes if free_passes else math.inf,
            "seconds_per_token": seconds / max(tokens, 1), "free_seconds_per_token": free_seconds / max(free_tokens, 1),
            "lengths": quantiles(lengths), "chars": quantiles(chars), "distinct": len(set(texts)),
            "mask_ms_per_step": 1e3 * stats["mask_seconds"] / max(passes, 1),
            "plan_ms_per_answer": 1e3 * stats["plan_seconds"] / seeds,
            "frontier_share": stats["frontier_tokens"] / max(written, 1),
            "forced_share": stats["forced_tokens"] / max(written, 1),
            "finished_share": stats["finished_tokens"] / max(written, 1),
            "steered_share": stats["steered_tokens"] / max(written, 1),
            "refused_per_frontier": stats["refused"] / max(stats["frontier_tokens"] + stats["refused"], 1),
            "allowed_mass_mean": float(masses.mean()), "allowed_mass_frontier": float(frontier.mean()),
            "kl_mean": float(-np.log(np.clip(masses, 1e-300, None)).mean()),
            "kl_frontier_median": float(np.median(-np.log(np.clip(frontier, 1e-300, None)))),
            "argmax_allowed": float((masses > 0.5).mean()),
        })
    return rows


# -- the mask cost at a 262,144-token vocabulary ------------------------------------------------------------


class _GreedyVocab:
    """A TokenizerWrapper source for a synthetic vocabulary; it encodes by llguidance's greedy tokenizer."""

    def __init__(self, tokens: list[bytes]):
        self.tokens, self.special_token_ids = tokens, [0]
        self.eos_token_id, self.bos_token_id = 0, None
        self.ll: Any = None

    def __call__(self, text: str | bytes) -> list[int]:
        data = text.encode() if isinstance(text, str) else text
        return [] if self.ll is None else self.ll.greedy_tokenize(data.decode("utf-8", "replace"))


def big_vocabulary(size: int) -> list[bytes]:
    """`size` tokens: EOS, every byte, then the most frequent words and pieces of Python's standard library."""
    counts: collections.Counter[bytes] = collections.Counter()
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        text = path.read_bytes()
        counts.update(re.findall(rb" ?[A-Za-z_]+| ?[0-9]+| ?[^\sA-Za-z0-9_]+|\s+", text))
        if len(counts) > 4 * size:
            break
    tokens = [b"\xff<eos>"] + [bytes([b]) for b in range(256)]
    seen = set(tokens)
    for piece, _ in counts.most_common():
        for cut in range(2, len(piece) + 1):  # the piece and its prefixes, as BPE vocabularies hold them
            candidate = piece[:cut]
            if candidate not in seen:
                seen.add(candidate)
                tokens.append(candidate)
        if len(tokens) >= size:
            break
    n = 0
    while len(tokens) < size:  # filler, should the corpus run short
        tokens.append(f"<{n}>".encode())
        n += 1
    return tokens[:size]


def mask_cost(vocab_size: int, lookahead: int, repeats: int) -> list[dict[str, Any]]:
    import llguidance

    source = _GreedyVocab(big_vocabulary(vocab_size))
    started = time.perf_counter()
    ll = llguidance.LLTokenizer(llguidance.TokenizerWrapper(source), n_vocab=vocab_size, eos_token=0)
    source.ll = ll
    build = time.perf_counter() - started
    vocab = constrain.GrammarVocab(ll, vocab_size, [0])
    started = time.perf_counter()
    vocab.plan_tokens  # noqa: B018  (built on first use: time it)
    table = time.perf_counter() - started
    print(f"llguidance tokenizer of {vocab_size} tokens built in {build:.2f} s, single-byte table in "
          f"{table:.2f} s (once per model)", file=sys.stderr)
    ops = get_backend("numpy")
    rows = []
    answers = {
        "json schema": ({"json_schema": PERSON}, '{"name": "Ada Lovelace", "age": 36, "role": "admin", "tags": '
                        '["math", "poetry"], "address": {"city": "London", "zip": "10115"}, "score": 1.5}'),
        "regex": ({"regex": LONG_REGEX}, "abc-12 def-34 ghi-56 jkl-78 mno-90 pqr-12 stu-34 vwx-56 yes"),
        "lark": ({"grammar": ARITHMETIC}, "(12 + x_1) * 345 - (y * (7 + 8))"),
    }
    canvas = 256
    for name, (kind, answer) in answers.items():
        started = time.perf_counter()
        constraint = vocab.compile(**kind)
        compile_s = time.perf_counter() - started
        tokens = ll.tokenize_str(answer)
        assert constraint.accepts(tokens), name
        timings: list[list[float]] = [[], []]  # the first visit of each grammar state, then a second visit
        apply_t = []
        logits = np.random.default_rng(0).normal(0, 1, (canvas, vocab_size)).astype(np.float32)
        starts = np.linspace(0, len(tokens) - lookahead - 1, repeats).astype(int).tolist()
        for visit in range(2):  # llguidance caches per lexer state in the compiled grammar, shared by requests
            for start in starts:
                guide = constrain.CanvasGuide(constraint, canvas, 4096, [0])
                guide.matcher.consume_tokens(tokens[:start])
                drafts = tokens[start:start + lookahead]  # guesses that follow the answer: every row is masked
                t0 = time.perf_counter()
                bitmask = guide._masks(drafts)
                t1 = time.perf_counter()
                ops.mask_rows(logits, start, bitmask)
                ops.argmax_rows(logits, start, start + len(bitmask))
                t2 = time.perf_counter()
                timings[visit].append(t1 - t0)
                apply_t.append(t2 - t1)
        plan_t = []
        for start in range(0, len(tokens), max(len(tokens) // 6, 1)):
            guide = constrain.CanvasGuide(constraint, canvas, 4096, [0])
            guide.matcher.consume_tokens(tokens[:start])
            guide._version += 1
            t0 = time.perf_counter()
            guide._plan()
            plan_t.append(time.perf_counter() - t0)
        rows.append({"case": name, "compile_ms": 1e3 * compile_s, "rows": lookahead + 1,
                     "llguidance_ms": 1e3 * statistics.median(timings[0]),
                     "llguidance_warm_ms": 1e3 * statistics.median(timings[1]),
                     "apply_ms": 1e3 * statistics.median(apply_t),
                     "plan_ms": 1e3 * statistics.median(plan_t), "build_s": build})
    for name in ("cpu", "numpy"):  # for scale: the sampler step those masks ride on, on the host
        try:
            step_ops = get_backend(name)
        except dgrun.BackendUnavailable:
            continue
        t0 = time.perf_counter()
        step_ops.denoise_step(logits, np.zeros(canvas, np.int64), 0.6, 0.1, dgrun.DefaultRng(0))
        rows.append({"case": f"for scale: one {name} sampler step, {canvas} x {vocab_size:,} logits",
                     "step_ms": 1e3 * (time.perf_counter() - t0), "build_s": build, "table_s": table})
        break
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", help="the .dgf file (default: the demo model)")
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, help="max_denoising_steps (default: the file's)")
    parser.add_argument("-n", "--max-new-tokens", type=int, default=160)
    parser.add_argument("--vocab", type=int, default=262_144, help="vocabulary size of the mask-cost test")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--mask-only", action="store_true")
    parser.add_argument("--lookahead", type=int, default=constrain.LOOKAHEAD,
                        help="draft rows masked past the frontier (dgrun.constrain.LOOKAHEAD)")
    parser.add_argument("--case", action="append", help="only the cases whose name contains this (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON lines too")
    args = parser.parse_args(argv)
    constrain.LOOKAHEAD = args.lookahead
    results: list[dict[str, Any]] = []
    if not args.mask_only:
        with dgrun.load(args.model, backend=args.backend) as model:
            params = {"max_new_tokens": args.max_new_tokens, "max_denoising_steps": args.steps}
            print(f"model {model.path.name}, backend {model.backend.name}, {args.seeds} seeds, {params}, "
                  f"lookahead {args.lookahead}",
                  file=sys.stderr)
            rows = run_cases(model, args.seeds, params, args.case or [""])
        results += rows
        print("| case | valid | tokens/forward (unconstrained) | answer tokens min/q1/median/q3/max | distinct |"
              " frontier / forced / finish / steered share | refused | allowed mass (frontier) | KL frontier median"
              " | mask ms/step | plan ms/answer |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['case']} | {r['valid']}/{r['runs']} | {r['tokens_per_forward']:.2f} "
                  f"({r['free_tokens_per_forward']:.2f}) | {r['lengths']} | {r['distinct']} | "
                  f"{r['frontier_share']:.0%} / {r['forced_share']:.0%} / {r['finished_share']:.0%} / "
                  f"{r['steered_share']:.0%} | {r['refused_per_frontier']:.0%} | {r['allowed_mass_mean']:.2f} "
                  f"({r['allowed_mass_frontier']:.2f}) | {r['kl_frontier_median']:.2f} | "
                  f"{r['mask_ms_per_step']:.2f} | {r['plan_ms_per_answer']:.0f} |")
    rows = mask_cost(args.vocab, constrain.LOOKAHEAD, args.repeats)
    results += rows
    print(f"\nmask cost at a {args.vocab:,}-token vocabulary ({constrain.LOOKAHEAD + 1} rows per step):")
    print("| case | compile ms | llguidance masks ms, first visit (again) | numpy apply + argmax ms |"
          " way-to-finish search ms |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "step_ms" in r:
            print(f"| {r['case']} | | | {r['step_ms']:.0f} | |")
        else:
            print(f"| {r['case']} | {r['compile_ms']:.1f} | {r['llguidance_ms']:.2f} ({r['llguidance_warm_ms']:.2f}) | "
                  f"{r['apply_ms']:.2f} | {r['plan_ms']:.1f} |")
    if args.json:
        for r in results:
            print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
