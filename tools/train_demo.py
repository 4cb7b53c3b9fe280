"""Train the demo DiffusionGemma that ships inside dgrun (`runtime/models/demo.dgf`), on CPU, from scratch.

The point is an end-to-end proof on weights that mean something: transformers' own
`DiffusionGemmaForBlockDiffusion` is trained here, saved with `save_pretrained`, converted by
`convert-hf-to-dgf` and run by dgrun. The corpus is the Python standard library's own source, so every
install of Python carries the training data and the result writes recognisable Python.

Data
    `*.py` files under `sysconfig.get_paths()["stdlib"]`, sorted by relative path, minus test suites,
    `site-packages`, codec tables (`encodings/`) and `pydoc_data/` (one giant string). Held out: files whose
    CRC-32 of the relative path is 0 mod 20 (`is_heldout`); the tokenizer never sees them either.
    Each file is cut into top-level blocks (a `def`/`class` with its decorators, or the code between them);
    every block becomes `<bos> block <eos>`, and all blocks are packed into one token stream. The model thus
    learns to end a function with EOS, which is what stops `dgrun -p "def fibonacci(n):"` after one function.

Tokenizer
    SentencePiece BPE, 4096 pieces, byte fallback, digits split, identity normalisation, no dummy prefix and no
    whitespace collapsing, whitespace-only pieces allowed (runs of indentation become one token), and "\\n"
    as a user-defined piece. `decode(encode(x)) == x` is checked on every training file.

Objective (as DiffusionGemma is trained: an autoregressive encoder that writes the KV cache, and a bidirectional
decoder that denoises a canvas reading that cache)
    A window of the stream is split into a context (the encoder's `input_ids`) and a canvas of `canvas_length`
    tokens. Every example draws a noise rate r ~ U(0, 1]; each canvas token is replaced, with probability r, by
    a uniformly random token of the whole vocabulary (the same distribution the sampler starts from).
    * Denoising loss: cross-entropy on *all* canvas positions. With uniform (not mask) noise the decoder cannot
      tell a corrupted token from a clean one, and at inference it re-predicts every position each step, so it
      must learn to reproduce clean tokens too; scoring only the noised positions would leave that untrained.
    * Autoregressive loss: next-token cross-entropy from `encoder_last_hidden_state` through the tied
      embedding and the same final-logit softcap (the encoder's last position predicts the first canvas token).
    * Self-conditioning on half the steps: a no-grad decoder pass on the same noisy canvas gives logits, which
      the graded pass receives as `self_conditioning_logits` (the decoder turns them into softmax-weighted
      embeddings, through its self-conditioning MLP). The other half trains the zero-signal first step.
    The encoder runs once per step; both decoder passes read its cache (the decoder never writes it).

Run: `python tools/train_demo.py --minutes 40 --out /tmp/demo-ckpt`, then
`convert-hf-to-dgf /tmp/demo-ckpt --outtype q8_0 -o runtime/models/demo.dgf`. `--init CKPT` continues a
checkpoint (its weights and tokenizer) under a fresh schedule; the shipped file took three runs, and the README's
"The demo model" section has their commands and numbers.
Everything is seeded; with `--steps` the run is reproducible step for step, while a `--minutes` budget stops
wherever the wall clock says (the learning-rate schedule follows whichever budget ends first).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import sysconfig
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "pydoc_data", "encodings", "__pycache__"}
# A top-level block starts at an unindented def/class/decorator (a decorator keeps its def in the same block).
_BLOCK_START = re.compile(r"^(?:@|def |async def |class )")

# Generation defaults written to generation_config.json (and so into the .dgf), chosen on samples: 8 function and
# class heads x 4 seeds, scored by the share of generated lines that parse as Python (`tools/eval_demo.py`) and
# the share of tokens inside runs of one repeated token. 192 new tokens = 6 canvases of 32: a small function,
# instant on a CPU. A 32-token canvas beats 64 and 16 at this size (the decoder fills fewer positions jointly,
# the encoder sees committed text sooner). A model this small is rarely sure of more than one token per step and
# every unaccepted position is re-noised, so it gets two steps per canvas position (64). Entropy bound 0.05, not
# transformers' 0.1: at 0.1 the sampler accepts several confident neighbours at once, which at this size are
# often the same token (6.2% of tokens in runs like `nnnnnn`, 0.7% at 0.05; parse rate 67% vs 62%, within the
# noise of 32 samples). Temperatures are transformers' 0.8 -> 0.4: 0.5-1.0, 0.3-0.6 and 0.8-1.0 parsed
# 67/65/62% against its 63% (16 samples each), differences within the noise.
GENERATION_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 192,
    "max_denoising_steps": 64,
    "t_min": 0.4,
    "t_max": 0.8,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
    "sampler_config": {"entropy_bound": 0.05},
}


# -- data ------------------------------------------------------------------------------------------------------


def stdlib_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """(relative path, path) of every stdlib source file we use, in a fixed (sorted) order."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if set(rel.parts[:-1]) & SKIP_DIRS:
            continue
        out.append((rel.as_posix(), path))
    return sorted(out)


def is_heldout(rel: str) -> bool:
    """The held-out split: about one file in twenty, by a hash that does not depend on the Python version."""
    return zlib.crc32(rel.encode()) % 20 == 0


def read_split(heldout: bool, root: Path | None = None) -> list[tuple[str, str]]:
    """(relative path, text) of the training or the held-out files."""
    out = []
    for rel, path in stdlib_files(root):
        if is_heldout(rel) != heldout:
            continue
        text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        if text.strip():
            out.append((rel, text))
    return out


def top_level_blocks(text: str) -> list[str]:
    """Cut a module at its top-level definitions; the blocks concatenate back to `text` exactly."""
    blocks: list[list[str]] = [[]]
    previous = ""
    for line in text.splitlines(keepends=True):
        if _BLOCK_START.match(line) and not previous.startswith("@") and blocks[-1]:
            blocks.append([])
        blocks[-1].append(line)
        if line.strip():
            previous = line
    return ["".join(b) for b in blocks if b]


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 4096, seed: int = 0) -> Any:
    """The SentencePiece model described in the module docstring; returns the loaded processor."""
    import sentencepiece as spm

    # The trainer samples and shuffles sentences with its own generator; seed it so the pieces are reproducible.
    # (Two runs' files still differ in bytes: the proto records the output path as `model_prefix`.)
    spm.set_random_generator_seed(seed + 1)

    def lines() -> Any:
        for text in texts:
            yield from text.splitlines(keepends=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_prefix=str(out_dir / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID, byte_fallback=True,
        split_digits=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, user_defined_symbols=["\n"],
        character_coverage=0.9995, input_sentence_size=400_000, shuffle_input_sentence=True,
        seed_sentencepiece_size=1_000_000, max_sentence_length=16_384, num_threads=1, minloglevel=2)
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)
    sp = spm.SentencePieceProcessor(model_file=str(out_dir / "tokenizer.model"))
    # Indentation is syntax in Python: a tokenizer that loses one space would make the demo write broken code.
    for text in texts:
        if sp.decode(sp.encode(text)) != text:
            raise RuntimeError("the tokenizer does not round-trip a training file exactly")
    return sp


def token_stream(sp: Any, texts: list[str]) -> np.ndarray:
    """`<bos> block <eos>` for every top-level block of every file, packed into one int32 array."""
    pieces: list[list[int]] = []
    for text in texts:
        for block in top_level_blocks(text):
            pieces.append([BOS_ID, *sp.encode(block), EOS_ID])
    return np.fromiter((t for p in pieces for t in p), dtype=np.int32)


@dataclass
class Batch:
    context: Any  # (B, L) int64 tensor: the encoder's input_ids
    canvas: Any  # (B, C) int64 tensor: the clean canvas (targets)


class Sampler:
    """Draws training windows from the packed stream (numpy Generator, so a seed fixes the whole sequence).

    Two kinds of batch: "start" windows begin at a block's BOS with a short context (2–32 tokens), which is
    what a user's prompt looks like (`<bos>def fibonacci(n):`); "middle" windows start anywhere with a longer
    context. Batch size shrinks as the context grows, keeping the tokens per step (and the step time) steady.
    """

    def __init__(self, stream: np.ndarray, canvas_length: int, seed: int, tokens_per_batch: int = 3072,
                 contexts: tuple[int, ...] = (32, 64, 96, 128), start_fraction: float = 0.3):
        self.stream = stream
        self.canvas_length = canvas_length
        self.rng = np.random.default_rng(seed)
        self.tokens_per_batch = tokens_per_batch
        self.contexts = contexts
        self.start_fraction = start_fraction
        self.bos_positions = np.flatnonzero(stream == BOS_ID)

    def batch_size(self, context_length: int) -> int:
        return max(4, self.tokens_per_batch // (context_length + self.canvas_length))

    def next(self) -> Batch:
        import torch

        C = self.canvas_length
        if self.rng.random() < self.start_fraction:
            L = int(self.rng.integers(2, 33))
            B = self.batch_size(L)
            limit = np.searchsorted(self.bos_positions, len(self.stream) - L - C)
            starts = self.bos_positions[self.rng.integers(0, limit, B)]
        else:
            L = int(self.rng.choice(self.contexts))
            B = self.batch_size(L)
            starts = self.rng.integers(0, len(self.stream) - L - C, B)
        windows = np.stack([self.stream[s: s + L + C] for s in starts]).astype(np.int64)
        return Batch(torch.from_numpy(windows[:, :L]), torch.from_numpy(windows[:, L:]))


# -- model -----------------------------------------------------------------------------------------------------


def build_model(vocab_size: int, canvas_length: int = 32, seed: int = 0) -> Any:
    """The demo architecture: DiffusionGemma's layout (3 sliding + 1 full layer, grouped KV, K=V full layer with
    partial RoPE, dense MLP + top-2 MoE in every layer, self-conditioning) at ~3M parameters."""
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    text = dict(
        vocab_size=vocab_size, hidden_size=160, intermediate_size=320, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=40, global_head_dim=80,
        num_global_key_value_heads=1, sliding_window=64, num_experts=8, top_k_experts=2,
        moe_intermediate_size=160, max_position_embeddings=8192,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        eos_token_id=EOS_ID, bos_token_id=BOS_ID, pad_token_id=PAD_ID,
    )
    config = DiffusionGemmaConfig(
        text_config=text,
        # A vision tower is part of the class; a 1-layer stub keeps it tiny (the converter skips it anyway).
        vision_config=dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, head_dim=8),
        canvas_length=canvas_length)
    return DiffusionGemmaForBlockDiffusion(config)


def softcapped_logits(model: Any, hidden: Any) -> Any:
    """The model's own head: tied lm_head, float32, tanh softcap (as in `DiffusionGemmaForBlockDiffusion.forward`)."""
    import torch

    cap = model.final_logit_softcapping
    return torch.tanh(model.lm_head(hidden).float() / cap) * cap


def losses(model: Any, batch: Batch, gen: Any, self_condition: bool) -> tuple[Any, Any]:
    """(denoising loss, encoder autoregressive loss) on one batch; see the module docstring."""
    import torch
    import torch.nn.functional as F

    vocab = model.config.text_config.vocab_size
    B, C = batch.canvas.shape
    rate = 1.0 - torch.rand(B, 1, generator=gen)  # r ~ U(0, 1]
    noised = torch.rand(B, C, generator=gen) < rate
    noise = torch.randint(0, vocab, (B, C), generator=gen)
    canvas_in = torch.where(noised, noise, batch.canvas)

    encoded = model.model.encoder(input_ids=batch.context, use_cache=True)
    cache = encoded.past_key_values
    sc_logits = None
    if self_condition:
        with torch.no_grad():
            first = model.model.decoder(decoder_input_ids=canvas_in, past_key_values=cache)
            sc_logits = softcapped_logits(model, first.last_hidden_state)
    decoded = model.model.decoder(decoder_input_ids=canvas_in, past_key_values=cache,
                                  self_conditioning_logits=sc_logits)
    logits = softcapped_logits(model, decoded.last_hidden_state)
    diffusion = F.cross_entropy(logits.reshape(-1, vocab), batch.canvas.reshape(-1))

    ar_logits = softcapped_logits(model, encoded.last_hidden_state)
    targets = torch.cat([batch.context[:, 1:], batch.canvas[:, :1]], dim=1)
    autoregressive = F.cross_entropy(ar_logits.reshape(-1, vocab), targets.reshape(-1))
    return diffusion, autoregressive


def adamw(model: Any, lr: float) -> Any:
    """AdamW with weight decay 0.05 on matrices other than the embedding, none on norms, scales and the embedding."""
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98), eps=1e-8)


def learning_rate(base: float, step: int, warmup: int, progress: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to a tenth of `base` as `progress` goes 0 -> 1."""
    return base * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def earlier_logs(init: Path | None) -> list[dict[str, Any]]:
    """The train logs of the runs a continued run builds on (oldest first), so a checkpoint carries its history."""
    if init is None or not (init / "train_log.json").is_file():
        return []
    previous = json.loads((init / "train_log.json").read_text())
    return [*previous.pop("previous", []), previous]


def full_forward_check(model: Any, batch: Batch) -> float:
    """Max |difference| between our split encoder/decoder path and the class's own `forward` (sanity check)."""
    import torch

    with torch.no_grad():
        ours = softcapped_logits(model, model.model.decoder(
            decoder_input_ids=batch.canvas, past_key_values=model.model.encoder(
                input_ids=batch.context, use_cache=True).past_key_values).last_hidden_state)
        theirs = model(input_ids=batch.context, decoder_input_ids=batch.canvas).logits
    return float((ours - theirs).abs().max())


# -- training --------------------------------------------------------------------------------------------------


def save(model: Any, out: Path, tokenizer_dir: Path, log: dict[str, Any]) -> None:
    """save_pretrained + tokenizer.model + tokenizer_config.json + generation_config.json + train_log.json."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer_dir.resolve() != out.resolve():
        (out / "tokenizer.model").write_bytes((tokenizer_dir / "tokenizer.model").read_bytes())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "<unk>", "tokenizer_class": "GemmaTokenizer"}, indent=2))
    generation_config().save_pretrained(out)
    (out / "train_log.json").write_text(json.dumps(log, indent=1))


def generation_config(defaults: dict[str, Any] = GENERATION_DEFAULTS, eos_id: int = EOS_ID, pad_id: int = PAD_ID,
                      bos_id: int = BOS_ID) -> Any:
    """A `DiffusionGemmaGenerationConfig` of `defaults` (the demo's unless given), built by the class so
    `from_pretrained` reads it back."""
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig,
        EntropyBoundSamplerConfig,
    )

    values = {k: v for k, v in defaults.items() if k != "sampler_config"}
    return DiffusionGemmaGenerationConfig(
        **values, sampler_config=EntropyBoundSamplerConfig(**defaults["sampler_config"]),
        eos_token_id=[eos_id], pad_token_id=pad_id, bos_token_id=bos_id)


def require_split_path(max_diff: float) -> None:
    """Stop unless the trainer's split encoder/decoder path gave the class's own `forward` logits (a
    `full_forward_check` result)."""
    print(f"split encoder/decoder path vs model.forward: max |diff| {max_diff:.2e}", flush=True)
    if max_diff > 1e-4:
        raise RuntimeError("the training path disagrees with DiffusionGemmaForBlockDiffusion.forward")


def progress_clock(minutes: float, steps: int) -> Callable[[int], float]:
    """progress(step) in [0, 1+): the share of the time budget spent, or of `steps` when that is further."""
    budget_s, started = minutes * 60.0, time.time()

    def progress(step: int) -> float:
        by_time = (time.time() - started) / budget_s
        return max(by_time, step / steps) if steps else by_time

    return progress


def optimizer_step(model: Any, optim: Any, loss: Any, lr: float) -> None:
    """One AdamW step at learning rate `lr`, gradients clipped to norm 1."""
    import torch

    for group in optim.param_groups:
        group["lr"] = lr
    optim.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optim.step()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/dgrun-demo"), help="checkpoint folder")
    parser.add_argument("--minutes", type=float, default=60.0, help="wall-clock training budget")
    parser.add_argument("--steps", type=int, default=0, help="step budget (0: only the wall clock)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, default=None,
                        help="continue from this checkpoint folder (its weights and its tokenizer) with a fresh "
                             "schedule; give a different --seed so the windows differ from the first run's")
    parser.add_argument("--canvas-length", type=int, default=32,
                        help="canvas of the model (with --init: trains and saves the checkpoint with this canvas; "
                             "no weight depends on it)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--tokens-per-batch", type=int, default=3072)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--eval-minutes", type=float, default=4.0, help="held-out loss every this many minutes")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()

    train_files, heldout_files = read_split(False), read_split(True)
    print(f"data: {len(train_files)} training files, {len(heldout_files)} held out", flush=True)
    if args.init is None:
        sp = train_tokenizer([t for _, t in train_files], args.out, seed=args.seed)
    else:
        import sentencepiece as spm

        # The checkpoint's token ids are its tokenizer's: reuse it rather than train a new one.
        sp = spm.SentencePieceProcessor(model_file=str(args.init / "tokenizer.model"))
    train_stream = token_stream(sp, [t for _, t in train_files])
    heldout_stream = token_stream(sp, [t for _, t in heldout_files])
    print(f"tokenizer: {sp.get_piece_size()} pieces, {len(train_stream):,} training tokens, "
          f"{len(heldout_stream):,} held-out tokens ({time.time() - started:.0f}s)", flush=True)

    if args.init is None:
        model = build_model(sp.get_piece_size(), args.canvas_length, seed=args.seed)
    else:
        from transformers import DiffusionGemmaForBlockDiffusion

        model = DiffusionGemmaForBlockDiffusion.from_pretrained(args.init, dtype=torch.float32)
        model.config.canvas_length = args.canvas_length
        print(f"continuing from {args.init}", flush=True)
    model.train()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"model: {n_params:,} parameters (vision stub included)", flush=True)
    canvas_length = model.config.canvas_length

    sampler = Sampler(train_stream, canvas_length, args.seed, args.tokens_per_batch)
    # A fixed held-out set: the same windows and the same noise at every evaluation, so the curve is comparable.
    heldout = Sampler(heldout_stream, canvas_length, 1, args.tokens_per_batch)
    heldout_batches = [heldout.next() for _ in range(6)]
    require_split_path(full_forward_check(model, heldout_batches[0]))

    optim = adamw(model, args.lr)
    gen = torch.Generator().manual_seed(args.seed + 2)
    flips = np.random.default_rng(args.seed + 3)
    train_started = time.time()
    progress = progress_clock(args.minutes, args.steps)

    def evaluate() -> tuple[float, float]:
        model.eval()
        g = torch.Generator().manual_seed(12345)
        d = a = 0.0
        with torch.no_grad():
            for b in heldout_batches:
                dl, al = losses(model, b, g, self_condition=False)
                d, a = d + float(dl), a + float(al)
        model.train()
        return d / len(heldout_batches), a / len(heldout_batches)

    log: dict[str, Any] = {"config": model.config.text_config.to_dict(), "train": [], "heldout": [],
                           "args": {k: str(v) for k, v in vars(args).items()}}
    log["previous"] = earlier_logs(args.init)
    step, tokens, window = 0, 0, []
    last_eval = time.time()
    d0, a0 = evaluate()
    log["heldout"].append({"step": 0, "diffusion": d0, "ar": a0})
    print(f"step 0 held-out: diffusion {d0:.3f}  ar {a0:.3f}  (ln V = {math.log(sp.get_piece_size()):.3f})",
          flush=True)
    while True:
        p = progress(step)
        if p >= 1.0:
            break
        lr = learning_rate(args.lr, step, args.warmup, p)
        batch = sampler.next()
        diffusion, autoregressive = losses(model, batch, gen, self_condition=bool(flips.random() < 0.5))
        optimizer_step(model, optim, diffusion + autoregressive, lr)
        step += 1
        tokens += batch.context.numel() + batch.canvas.numel()
        window.append((diffusion.item(), autoregressive.item()))
        if step % args.log_every == 0:
            d, a = np.mean(window, axis=0)
            window.clear()
            elapsed = time.time() - train_started
            log["train"].append({"step": step, "seconds": round(elapsed), "diffusion": float(d), "ar": float(a)})
            print(f"step {step:5d}  {elapsed / 60:5.1f} min  lr {lr:.2e}  diffusion {d:.3f}  ar {a:.3f}  "
                  f"{tokens / elapsed:,.0f} tok/s", flush=True)
        if time.time() - last_eval > args.eval_minutes * 60:
            d, a = evaluate()
            last_eval = time.time()
            log["heldout"].append({"step": step, "diffusion": d, "ar": a})
            print(f"step {step:5d} held-out: diffusion {d:.3f}  ar {a:.3f}", flush=True)
    d, a = evaluate()
    log["heldout"].append({"step": step, "diffusion": d, "ar": a})
    log["steps"], log["tokens"], log["train_seconds"] = step, tokens, round(time.time() - train_started)
    print(f"done: {step} steps, {tokens:,} tokens, {(time.time() - train_started) / 60:.1f} min; "
          f"held-out diffusion {d:.3f}  ar {a:.3f}", flush=True)
    model.eval()
    save(model, args.out, args.init or args.out, log)
    print(f"saved to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
