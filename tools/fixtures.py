"""Tiny DiffusionGemma checkpoints for tests and benchmarks, made with transformers' own class.

Random weights, but never trivial ones: norms, router scales, per-expert scales and both `layer_scalar`
buffers (encoder and decoder, deliberately different) get random values, so a runtime that mixes them up or
skips one cannot match transformers by luck. Embeddings are drawn wide (std 1) so logits are peaked and the
sampler accepts, stops and emits EOS the way a trained model makes it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_TEXT = [
    "def fibonacci(n):", "    if n < 2:", "        return n", "    return fibonacci(n - 1) + fibonacci(n - 2)",
    "The quick brown fox jumps over the lazy dog.", "import os", "import sys", "for i in range(10):",
    "    print(i)", "class Point:", "    def __init__(self, x, y):", "        self.x = x", "        self.y = y",
    "hello world", "return None", "while True:", "    break", "x = [1, 2, 3]", "with open(path) as f:",
] * 4


# A small chat template in the common shape (role markers, EOS after assistant turns, generation prompt).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] | trim }}\n"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}\n"
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def text_config(**overrides: Any) -> dict[str, Any]:
    """A small text config exercising both layer types, grouped KV, K=V full layers, partial RoPE and top-k MoE."""
    cfg = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
        num_global_key_value_heads=1, sliding_window=8, num_experts=4, top_k_experts=2,
        moe_intermediate_size=32,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "full_attention"],
        eos_token_id=1, bos_token_id=2, pad_token_id=0,
    )
    cfg.update(overrides)
    return cfg


def make_model(text: dict[str, Any], canvas_length: int = 16, seed: int = 0, embed_std: float = 1.0,
               self_cond_std: float = 0.1) -> Any:
    """A `DiffusionGemmaForBlockDiffusion` with random, non-trivial weights (float32).

    `self_cond_std` scales the self-conditioning MLP. Random networks are chaotic under their own
    self-conditioning feedback: a 4e-6 float32 rounding difference (transformers' own f32-vs-f64 error on
    these fixtures) grows several-fold per denoising step and, after ~8 steps, flips a sampler decision. A
    generation-parity fixture therefore damps that loop (0.01); logit-parity fixtures keep it at full strength.
    """
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    config = DiffusionGemmaConfig(
        text_config=text,
        vision_config=dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, head_dim=8),
        canvas_length=canvas_length)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)

    def rand(shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
        return torch.rand(shape, generator=generator) * (high - low) + low

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vision" in name:
                continue
            if name.endswith("embed_tokens.weight"):
                param.normal_(0.0, embed_std, generator=generator)
            elif "norm" in name or name.endswith(("router.scale", "per_expert_scale")):
                param.copy_(rand(tuple(param.shape), 0.5, 1.5))
            elif param.ndim >= 2:
                std = self_cond_std if "self_conditioning" in name else 0.1
                param.normal_(0.0, std, generator=generator)
        for side in (model.model.decoder.layers, model.model.encoder.language_model.layers):
            for layer in side:
                layer.layer_scalar.copy_(rand((1,), 0.6, 1.4))
    return model


def train_sentencepiece(out_dir: Path, vocab_size: int) -> Path:
    """A tiny SentencePiece model (ids: 0 pad, 1 eos, 2 bos, 3 unk), trained in well under a second."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SAMPLE_TEXT), model_prefix=str(out_dir / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3, character_coverage=1.0,
        hard_vocab_limit=False, minloglevel=2, remove_extra_whitespaces=False)
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)
    return out_dir / "tokenizer.model"


# Training text for the byte-level BPE tokenizer of constrained-output tests: code, prose and JSON.
JSON_TEXT = [
    '{"name": "Ada", "age": 36, "tags": ["math", "code"], "address": {"city": "London", "zip": "10115"}}',
    '{"id": 7, "ok": true, "score": -1.5e3, "items": [], "note": null}', '[1, 2, 3]', '{"a": {"b": {"c": [0]}}}',
] * 8


def train_byte_bpe(out_dir: Path, vocab_size: int) -> Path:
    """A tiny byte-level BPE `tokenizer.json` (ids: 0 pad, 1 eos, 2 bos; every byte also a token of its own),
    the kind of tokenizer GPT-2 and Llama 3 ship, trained in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(SAMPLE_TEXT + JSON_TEXT, trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    return out_dir / "tokenizer.json"


def save_checkpoint(model: Any, out_dir: Path, *, tokenizer: bool = True, dtype: str = "float32",
                    generation: dict[str, Any] | None = None, chat_template: str | None = None) -> Path:
    """`save_pretrained` (optionally as bf16), plus a SentencePiece tokenizer and a generation_config.json."""
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(out_dir)
    gen = {"eos_token_id": [1], "pad_token_id": 0, **(generation or {})}
    (out_dir / "generation_config.json").write_text(json.dumps(gen))
    if tokenizer:
        train_sentencepiece(out_dir, min(model.config.text_config.vocab_size, 128))
        tok_cfg: dict[str, Any] = {"add_bos_token": True}
        if chat_template:
            tok_cfg["chat_template"] = chat_template
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return out_dir


@contextmanager
def record_torch_draws() -> Iterator[list[tuple[str, np.ndarray]]]:
    """Record every torch.randint / torch.multinomial result (flattened to the RNG protocol's shapes)."""
    import torch

    draws: list[tuple[str, np.ndarray]] = []
    randint, multinomial = torch.randint, torch.multinomial

    def recording_randint(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = randint(*args, **kwargs)
        draws.append(("tokens", out.reshape(-1).numpy().copy()))
        return out

    def recording_multinomial(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = multinomial(*args, **kwargs)
        draws.append(("categorical", out.reshape(-1).numpy().copy()))
        return out

    torch.randint, torch.multinomial = recording_randint, recording_multinomial
    try:
        yield draws
    finally:
        torch.randint, torch.multinomial = randint, multinomial


def hf_generate(model: Any, prompt: list[int], seed: int = 0,
                **params: Any) -> tuple[list[int], list[tuple[str, np.ndarray]]]:
    """transformers' generate on one prompt from torch seed `seed`: (new tokens, pads stripped; recorded draws)."""
    import torch
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    kwargs = dict(params)
    if "entropy_bound" in kwargs:
        kwargs["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=float(kwargs.pop("entropy_bound")))
    kwargs.setdefault("pad_token_id", 0)
    torch.manual_seed(seed)
    with record_torch_draws() as draws, torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), **kwargs)
    new = out.sequences[0, len(prompt):].tolist()
    # Padding replaces everything after the EOS; strip it (the pad id never appears before EOS in these tests).
    eos = set(kwargs.get("eos_token_id") or [])
    cut = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
    return new[:cut][: kwargs.get("max_new_tokens", 256)], draws
