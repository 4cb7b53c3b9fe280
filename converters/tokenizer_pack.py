"""Pack a checkpoint's tokenizer into .dgf metadata: llama.cpp's `tokenizer.ggml.*` keys plus the originals.

The originals travel verbatim (HF `tokenizer.json` as a string, SentencePiece `tokenizer.model` as a uint8
tensor) so dgrun tokenizes exactly as transformers does; the ggml keys let other GGUF readers see the vocab.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gguf import TokenType

from dgrun.config import ModelConfig
from dgrun.tokenizer import CHAT_TEMPLATE_KEY, HF_JSON_KEY


class TokenizerError(ValueError):
    """Tokenizer files that are missing or do not fit the model."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path.name} is not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _chat_template(model_dir: Path, tokenizer_config: dict[str, Any]) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = _read_json(model_dir / "chat_template.json").get("chat_template") or tokenizer_config.get(
        "chat_template")
    if isinstance(template, list):  # named templates: keep the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def _from_hf_json(path: Path) -> dict[str, Any]:
    from tokenizers import Tokenizer

    text = path.read_text(encoding="utf-8")
    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises its own exception types for malformed files
        raise TokenizerError(f"tokenizer.json cannot be loaded: {e}") from None
    model = json.loads(text).get("model", {})
    vocab = tok.get_vocab(with_added_tokens=True)
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    for piece, i in vocab.items():
        tokens[i] = piece
    types = [int(TokenType.UNUSED if t.startswith("[PAD") else TokenType.NORMAL) for t in tokens]
    for i, piece in enumerate(tokens):
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            types[i] = int(TokenType.BYTE)
    for added in tok.get_added_tokens_decoder().items():
        i, token = added
        types[i] = int(TokenType.CONTROL if token.special else TokenType.USER_DEFINED)
    meta: dict[str, Any] = {HF_JSON_KEY: text, "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}
    if model.get("type") == "BPE":
        meta["tokenizer.ggml.model"] = "gemma4"
        merges = model.get("merges", [])
        meta["tokenizer.ggml.merges"] = [m if isinstance(m, str) else " ".join(m) for m in merges]
    else:
        meta["tokenizer.ggml.model"] = "llama"
        scores = [0.0] * n
        for i, entry in enumerate(model.get("vocab", [])):
            if isinstance(entry, list) and len(entry) == 2 and i < n:
                scores[i] = float(entry[1])
        meta["tokenizer.ggml.scores"] = scores
    return meta


def _from_sentencepiece(blob: bytes) -> dict[str, Any]:
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_proto=blob)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError variants for bad protos
        raise TokenizerError(f"tokenizer.model is not a SentencePiece model: {e}") from None
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        kind = (TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i)
                else TokenType.BYTE if sp.is_byte(i) else TokenType.UNUSED if sp.is_unused(i) else TokenType.NORMAL)
        types.append(int(kind))
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types}


def pack_tokenizer(model_dir: Path, cfg: ModelConfig, hf_config: dict[str, Any]) -> tuple[dict[str, Any], bytes | None]:
    """(metadata, sentencepiece model bytes or None) for the checkpoint's tokenizer; TokenizerError if absent."""
    hf_json, spm = model_dir / "tokenizer.json", model_dir / "tokenizer.model"
    spm_bytes = spm.read_bytes() if spm.is_file() else None
    if hf_json.is_file():
        meta = _from_hf_json(hf_json)
        # tokenizer.json is what dgrun tokenizes with; a tokenizer.model beside it would only be an extra tensor,
        # which llama.cpp's loaders refuse ("wrong number of tensors").
        spm_bytes = None
    elif spm_bytes is not None:
        meta = _from_sentencepiece(spm_bytes)
    else:
        raise TokenizerError(f"{model_dir} has no tokenizer.json or tokenizer.model "
                             "(pass --no-tokenizer to convert a model that takes token ids only)")
    if len(meta["tokenizer.ggml.tokens"]) > cfg.vocab_size:
        raise TokenizerError(f"the tokenizer has {len(meta['tokenizer.ggml.tokens'])} tokens, "
                             f"more than the model's vocab_size {cfg.vocab_size}")
    tokenizer_config = _read_json(model_dir / "tokenizer_config.json")
    text_config = hf_config.get("text_config", {})
    for key, source in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        value = text_config.get(source)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int) and 0 <= value < cfg.vocab_size:
            meta[f"tokenizer.ggml.{key}_token_id"] = value
    # The mask token, which llama.cpp's diffusion runtimes require (the fork's llama-diffusion-cli asserts it).
    mask = tokenizer_config.get("mask_token")
    mask = mask.get("content") if isinstance(mask, dict) else mask
    if isinstance(mask, str) and mask in meta["tokenizer.ggml.tokens"]:
        meta["tokenizer.ggml.mask_token_id"] = meta["tokenizer.ggml.tokens"].index(mask)
    meta["tokenizer.ggml.add_bos_token"] = bool(
        tokenizer_config.get("add_bos_token", "tokenizer.ggml.bos_token_id" in meta))
    template = _chat_template(model_dir, tokenizer_config)
    if template:
        meta[CHAT_TEMPLATE_KEY] = template
    return meta, spm_bytes
