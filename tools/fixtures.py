"""Tiny DiffusionGemma checkpoints for tests and benchmarks, made with transformers' own class.

Random weights, but never trivial ones: norms, router scales, per-expert scales and both `layer_scalar`
buffers (encoder and decoder, deliberately different) get random values, so a runtime that mixes them up or
skips one cannot match transformers by luck. Embeddings are drawn wide (std 1) so logits are peaked and the
sampler accepts, stops and emits EOS the way a trained model makes it.

For the tensor types dgrun reads but cannot write (llama-quantize's i-quants, Q5_K), `random_blocks` makes
valid blocks and `write_retyped` a copy of a converted file with every matrix in one such type.
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


# A small vision tower: position table kept short (the released one has 10,240 entries per axis) so files stay small.
DEFAULT_VISION = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=8, position_embedding_size=64)


def vision_config(**overrides: Any) -> dict[str, Any]:
    """A Gemma 4 vision tower small enough for tests that still has every part the released one has: several
    layers and heads, 8-pixel patches pooled 2x2, standardization, a position table big enough for the
    processor's 70-token budget at moderate aspect ratios."""
    cfg = dict(model_type="gemma4_vision", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=2, head_dim=16, patch_size=8, pooling_kernel_size=2,
               position_embedding_size=64, standardize=True)
    cfg.update(overrides)
    return cfg


# Token ids of the vision fixtures' tokenizer (`train_bpe_tokenizer`): its special tokens come first.
VISION_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|image>", "<image|>", "<|image|>"]
VISION_TOKEN_IDS = dict(boi_token_id=4, eoi_token_id=5, image_token_id=6)
# The image processor settings of the vision fixtures (what a checkpoint's preprocessor_config.json holds).
VISION_PREPROCESSOR = dict(image_processor_type="Gemma4ImageProcessor", patch_size=8, pooling_kernel_size=2,
                           max_soft_tokens=70, do_resize=True, resample=3, do_rescale=True, rescale_factor=1 / 255,
                           do_normalize=False, image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0],
                           do_convert_rgb=True)
# A Gemma-like template that places one image token per image content part, as Gemma 4's template does.
VISION_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|image|>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_model(text: dict[str, Any], canvas_length: int = 16, seed: int = 0, embed_std: float = 1.0,
               self_cond_std: float = 0.1, tie_word_embeddings: bool = True, vision: dict[str, Any] | None = None,
               **top: Any) -> Any:
    """A `DiffusionGemmaForBlockDiffusion` with random, non-trivial weights (float32).

    `tie_word_embeddings=False` unties everything transformers ties: lm_head and the encoder's copies of the
    decoder's weights then get random values of their own.

    `vision` (see `vision_config`) gives the model a vision tower with random weights of its own (norms,
    position table and standardization included); without it the default small tower keeps transformers'
    initial weights. `top` sets other top-level config keys (the image token ids).

    `self_cond_std` scales the self-conditioning MLP. Random networks are chaotic under their own
    self-conditioning feedback: a 4e-6 float32 rounding difference (transformers' own f32-vs-f64 error on
    these fixtures) grows several-fold per denoising step and, after ~8 steps, flips a sampler decision. A
    generation-parity fixture therefore damps that loop (0.01); logit-parity fixtures keep it at full strength.
    """
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    config = DiffusionGemmaConfig(text_config=text, vision_config=vision or DEFAULT_VISION,
                                  canvas_length=canvas_length, tie_word_embeddings=tie_word_embeddings, **top)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)

    def rand(shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
        return torch.rand(shape, generator=generator) * (high - low) + low

    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if vision is not None and name.endswith(("std_bias", "std_scale")):
                buffer.copy_(rand(tuple(buffer.shape), 0.5, 1.5) if name.endswith("scale")
                             else torch.randn(tuple(buffer.shape), generator=generator))
        for name, param in model.named_parameters():
            if "vision" in name and vision is None:
                continue
            if name.endswith("position_embedding_table"):
                param.normal_(0.0, 0.5, generator=generator)
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


def train_bpe_tokenizer(out_dir: Path, vocab_size: int, special_tokens: list[str], byte_level: bool = False) -> Path:
    """A tiny HF tokenizer.json (BPE) whose first ids are `special_tokens`, trained in well under a second.

    Metaspace pre-tokenization (SentencePiece-like) by default; `byte_level=True` makes the kind GPT-2 and Llama 3
    ship (every byte also a token of its own), trained on JSON too, for constrained-output tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    if byte_level:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        text, alphabet = SAMPLE_TEXT + JSON_TEXT, pre_tokenizers.ByteLevel.alphabet()
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
        tokenizer.decoder = decoders.Metaspace(prepend_scheme="never")
        text, alphabet = [*SAMPLE_TEXT, "\n"], []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=alphabet,
                                  show_progress=False)
    tokenizer.train_from_iterator(text, trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    return out_dir / "tokenizer.json"


def save_checkpoint(model: Any, out_dir: Path, *, tokenizer: bool = True, dtype: str = "float32",
                    generation: dict[str, Any] | None = None, chat_template: str | None = None,
                    vision_files: bool = False) -> Path:
    """`save_pretrained` (optionally as bf16), plus a SentencePiece tokenizer and a generation_config.json.

    `vision_files`: instead, the files of a multimodal checkpoint: a tokenizer.json whose special tokens include
    the image tokens (`VISION_SPECIALS`, named in tokenizer_config.json as Gemma 4's are), the vision chat
    template, and the image processor's preprocessor_config.json."""
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(out_dir)
    gen = {"eos_token_id": [1], "pad_token_id": 0, **(generation or {})}
    (out_dir / "generation_config.json").write_text(json.dumps(gen))
    if vision_files:
        train_bpe_tokenizer(out_dir, min(model.config.text_config.vocab_size, 120), VISION_SPECIALS)
        (out_dir / "tokenizer_config.json").write_text(json.dumps({
            "add_bos_token": True, "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
            "unk_token": "<unk>", "chat_template": chat_template or VISION_CHAT_TEMPLATE,
            "extra_special_tokens": {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>"}}))
        (out_dir / "preprocessor_config.json").write_text(json.dumps(VISION_PREPROCESSOR))
    elif tokenizer:
        train_sentencepiece(out_dir, min(model.config.text_config.vocab_size, 128))
        tok_cfg: dict[str, Any] = {"add_bos_token": True}
        if chat_template:
            tok_cfg["chat_template"] = chat_template
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return out_dir


def gemma4_processor(folder: Path, chat_template: str | None = None) -> Any:
    """transformers' `Gemma4Processor` (the processor of record for DiffusionGemma) over a vision checkpoint's
    tokenizer and image processor. Built without its audio and video parts: the video processor needs
    torchvision, which images never touch."""
    from transformers import AutoImageProcessor, Gemma4Processor, PreTrainedTokenizerFast
    from transformers.processing_utils import ProcessorMixin

    config = json.loads((folder / "tokenizer_config.json").read_text())
    specials = {key: config[key] for key in ("bos_token", "eos_token", "pad_token", "unk_token",
                                             "extra_special_tokens")}
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **specials)

    class ImageProcessorOnly(Gemma4Processor):
        def __init__(self, image_processor: Any, tokenizer: Any, chat_template: str | None = None):
            # Gemma4Processor.__init__'s attributes, without the video token it adds and the audio parts.
            self.image_seq_length, self.image_token_id = 280, tokenizer.image_token_id
            self.boi_token, self.eoi_token, self.image_token = tokenizer.boi_token, tokenizer.eoi_token, \
                tokenizer.image_token
            self.video_token, self.video_token_id, self.audio_token, self.audio_token_id = None, -1, None, -2
            self.boa_token, self.eoa_token = "<boa>", "<eoa>"  # validate_inputs requires them to be set
            ProcessorMixin.__init__(self, image_processor=image_processor, tokenizer=tokenizer,
                                    chat_template=chat_template)

    return ImageProcessorOnly(AutoImageProcessor.from_pretrained(folder), tokenizer,
                              chat_template or config["chat_template"])


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


# -- a Gemma-4-style tokenizer -------------------------------------------------------------------------------

# Special tokens first (ids 0..), as Gemma 4 numbers them: pad, eos, bos, unk, mask, then the chat and tool markers.
# The fork's converter types the markers in GEMMA4_VISIBLE_TOKENS USER_DEFINED (they must render as text for its
# chat parser) and the rest CONTROL.
GEMMA4_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>", "<|channel>",
                         "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>",
                         '<|"|>']
GEMMA4_VISIBLE_TOKENS = ["<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                         "<tool_response|>", '<|"|>']
GEMMA4_TRAINING_TEXT = [*SAMPLE_TEXT[:19], "\n\n".join(SAMPLE_TEXT[:6]), "\n".join(SAMPLE_TEXT[6:19]),
                        "Les élèves répondent: très bien!", "naïve café über straße", "if x:\n\n\n    pass\n"]


def gemma4_tokenizer_json(vocab_size: int) -> str:
    """A tokenizer.json in the layout of Gemma 4's: BPE over raw UTF-8 with `<0xNN>` byte fallback, spaces as `▁`.

    Like Gemma 4's (built from a SentencePiece BPE model), no merge joins a newline to another character or a
    word to the next one, and every one of the 256 byte tokens is in the vocabulary. The file's pipeline is what
    transformers' `GemmaTokenizer` builds: a Replace(" " → "▁") normalizer, a Split(" ") pre-tokenizer (a no-op
    after the normalizer), and a Replace/ByteFallback/Fuse decoder. Deterministic for a given `vocab_size`.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    specials, byte_tokens = GEMMA4_SPECIAL_TOKENS, [f"<0x{b:02X}>" for b in range(256)]
    learned = vocab_size - len(specials) - len(byte_tokens)
    if learned < 64:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for learned tokens beside bytes and specials")
    # Train on words that never cross a newline or a space-to-word boundary (SentencePiece's pieces don't).
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.pre_tokenizer = pre_tokenizers.Split(Regex("\n+|▁*[^▁\n]+|▁+"), behavior="isolated")
    trainer_tok.train_from_iterator(GEMMA4_TRAINING_TEXT, trainers.BpeTrainer(vocab_size=learned,
                                                                              show_progress=False))
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = {token: i for i, token in enumerate(specials + byte_tokens)}
    for token, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in trained["merges"]], unk_token="<unk>",
                               fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(specials)
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)
    return tok.to_str(pretty=True)


def save_gemma4_tokenizer(out_dir: Path, vocab_size: int, chat_template: str | None = None) -> None:
    """tokenizer.json and tokenizer_config.json of a Gemma-4-style tokenizer (see `gemma4_tokenizer_json`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(gemma4_tokenizer_json(vocab_size), encoding="utf-8")
    config: dict[str, Any] = {
        "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>",
        "mask_token": "<mask>", "extra_special_tokens": GEMMA4_SPECIAL_TOKENS[5:],
    }
    if chat_template:
        config["chat_template"] = chat_template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")


# -- checkpoints for the llama.cpp fork's converter (tests/data/peer, made by tools/make_peer_fixtures.py) --------

# `generation` is the checkpoint's generation_config.json beyond its EOS and pad ids; the "gen" one sets every
# sampler key so the fork's converter writes all its `diffusion.eb_*` keys, the "quant" one none of them.
PEER_CHECKPOINTS: dict[str, dict[str, Any]] = {
    # Token-exact generation (f32, bf16): the tests' "gen" architecture with a Gemma-4-style vocabulary.
    "gen": dict(text=text_config(vocab_size=384), seed=11, self_cond_std=0.01,
                generation=dict(max_denoising_steps=12, t_min=0.3, t_max=0.7, sampler_config={"entropy_bound": 0.2},
                                stability_threshold=2, confidence_threshold=0.01)),
    # Quantized files: rows of 256 (hidden, the full layers' attention output) take K- and i-quants; the sliding
    # layers' attention output (128), the dense down projection (96) and the experts' (64) are not multiples of
    # 256, so llama-quantize falls back there, as it does for the released model's 2112 and 704.
    "quant": dict(text=text_config(vocab_size=384, hidden_size=256, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=64, global_head_dim=128,
                                   num_global_key_value_heads=1, num_experts=2, top_k_experts=1,
                                   moe_intermediate_size=64, layer_types=["sliding_attention", "full_attention"]),
                  seed=12, self_cond_std=0.1, generation={}),
}


def peer_model(name: str) -> Any:
    """The transformers model of `PEER_CHECKPOINTS[name]` (deterministic: the same weights on every run)."""
    spec = PEER_CHECKPOINTS[name]
    return make_model(spec["text"], seed=spec["seed"], self_cond_std=spec["self_cond_std"])


def save_peer_checkpoint(name: str, out_dir: Path) -> Path:
    """`peer_model(name)` saved as the released checkpoint is laid out, for the fork's converter.

    The Gemma-4-style tokenizer replaces the SentencePiece one, and config.json also states the full layers' head
    dim and KV heads as `global_head_dim` / `num_global_key_value_heads` (the release's keys, which transformers
    5.11, the version the fork's converter runs under, reads; 5.23 writes only `per_layer_config`).
    """
    spec = PEER_CHECKPOINTS[name]
    save_checkpoint(peer_model(name), out_dir, tokenizer=False, generation=spec["generation"])
    save_gemma4_tokenizer(out_dir, spec["text"]["vocab_size"], CHAT_TEMPLATE)
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    text = spec["text"]
    config["text_config"]["global_head_dim"] = text["global_head_dim"]
    config["text_config"]["num_global_key_value_heads"] = text["num_global_key_value_heads"]
    config_path.write_text(json.dumps(config, indent=2))
    return out_dir


# Byte offsets of the fp16 fields (scales, mins) inside one block of each block-quantized type with such fields.
FP16_FIELDS: dict[str, tuple[int, ...]] = {
    "Q8_0": (0,), "Q4_0": (0,), "Q5_0": (0,), "Q5_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
    "IQ4_NL": (0,), "IQ4_XS": (0,), "IQ3_S": (0,), "IQ2_S": (0,),
}


def random_blocks(ggml_type: Any, rows: int, width: int, rng: np.random.Generator,
                  scale_log2: tuple[int, int] = (-20, 4), std: float | None = None) -> np.ndarray:
    """Raw uint8 [rows, row_bytes] of random valid blocks: random bytes, with every fp16 field a finite value.

    The way to test decoders of types dgrun cannot write (i-quants): every code, sign, grid index and sub-block
    scale pattern occurs. The fp16 fields are normal draws times 2^e, e uniform in `scale_log2`: by default
    normal and subnormal magnitudes of both signs. With `std`, they are then scaled together so the decoded
    values have that standard deviation (weights of a chosen size for a model).
    """
    from dgrun import quants

    qt = quants.get_quant_type(ggml_type)
    fields = FP16_FIELDS[qt.ggml_type.name]
    raw = rng.integers(0, 256, (rows, width // qt.block_size, qt.type_size), dtype=np.uint8)
    for offset in fields:
        scale = rng.normal(0, 1, raw.shape[:2]) * np.exp2(rng.integers(*scale_log2, raw.shape[:2]))
        raw[..., offset:offset + 2] = scale.astype("<f2")[..., None].view(np.uint8)
    if std is not None:
        factor = np.float32(std / quants.dequantize_tensor(raw.reshape(rows, -1), ggml_type).std())
        for offset in fields:
            scale = raw[..., offset:offset + 2].copy().view("<f2").astype(np.float32) * factor
            raw[..., offset:offset + 2] = scale.astype("<f2").view(np.uint8)
    return raw.reshape(rows, -1)


def quantized_or_random(x: np.ndarray, ggml_type: Any) -> tuple[np.ndarray, float | None]:
    """(raw uint8 [..., row_bytes], tensor scale or None): `x` quantized to `ggml_type`, or for a type dgrun only
    reads (the i-quants) random valid blocks of x's shape (fp16 scales 2^-12..2^-7: weights of roughly 0.01-0.1)."""
    from dgrun import quants

    if quants.can_quantize(ggml_type, x.shape[-1]):
        return quants.quantize_tensor(np.asarray(x, dtype=np.float32), ggml_type)
    rows = random_blocks(ggml_type, int(np.prod(x.shape[:-1])), x.shape[-1], np.random.default_rng(x.size), (-12, -7))
    return rows.reshape(*x.shape[:-1], -1), None


# llama-quantize's type for a matrix whose rows do not split into 256-value super-blocks (llama.cpp's fallback).
ROW_FALLBACK = {"Q5_K": "Q5_1", "IQ4_XS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ2_S": "IQ4_NL"}


def write_retyped(src: Path, dst: Path, type_name: str, seed: int = 0) -> dict[str, int]:
    """Copy the .dgf `src` with every matrix a quantizing preset would quantize stored as `type_name` instead (or
    its `ROW_FALLBACK` where the row width needs it), everything else as it is. Values: `src`'s quantized
    when dgrun writes the type, else random valid blocks with the tensor's standard deviation (fixtures are
    random anyway). Returns the tensor count per type written. For backend parity tests on every read type."""
    from gguf import GGMLQuantizationType as T

    from dgrun import quants
    from dgrun.config import ModelConfig
    from dgrun.converters.convert_hf import add_metadata, atomic_writer, write_file
    from dgrun.converters.presets import tensor_type
    from dgrun.format import GGUFFile

    rng = np.random.default_rng(seed)
    counts: dict[str, int] = {}
    with GGUFFile(src) as f, atomic_writer(dst) as writer:
        cfg = ModelConfig.from_metadata(f.metadata)
        sliding = [cfg.is_sliding(i) for i in range(cfg.num_hidden_layers)]
        for key, value in f.metadata.items():
            if not key.startswith("general."):
                add_metadata(writer, key, value.tolist() if isinstance(value, np.ndarray) else value)
        payloads = []
        for name, info in f.tensors.items():
            shape = tuple(info.shape)
            keep = tensor_type(name, shape, "q8_0", cfg.num_hidden_layers, sliding) == T.F32
            chosen = T[type_name] if shape[-1] % 256 == 0 else T[ROW_FALLBACK.get(type_name, type_name)]
            if keep or info.ggml_type != T.F32:
                raw, ggml_type = np.asarray(f.raw(name)), info.ggml_type
            else:
                dense = f.array(name).reshape(shape)
                if quants.can_quantize(chosen, shape[-1]):
                    raw = quants.quantize_tensor(dense, chosen)[0]
                else:
                    rows = int(np.prod(shape[:-1]))
                    raw = random_blocks(chosen, rows, shape[-1], rng, (0, 1), std=float(dense.std()))
                ggml_type = chosen
            writer.add_tensor_info(name, shape, np.dtype(np.float32), raw.nbytes, raw_dtype=ggml_type)
            payloads.append(np.ascontiguousarray(raw).reshape(-1))
            counts[ggml_type.name] = counts.get(ggml_type.name, 0) + 1
        write_file(writer, payloads)
    return counts


# Nested objects, an array, an enum, bounded and unbounded strings, integers and numbers: the JSON schema constrained
# output is tested (tests/test_constrain.py) and measured (tools/bench_constrained.py) with.
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "score": {"type": "number"},
        "note": {"type": "string"},
    },
    "required": ["name", "age", "role", "address", "score"],
    "additionalProperties": False,
}
