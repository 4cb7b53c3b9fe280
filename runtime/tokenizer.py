"""The tokenizer that travels inside a .dgf file.

The original files ride along verbatim: an HF `tokenizer.json` as the string `tokenizer.huggingface.json`, or a
SentencePiece model as the uint8 tensor `tokenizer.sentencepiece_model` (a tensor, because GGUF readers parse
metadata arrays element by element). llama.cpp's `tokenizer.ggml.*` keys are written too, for other readers.
"""

from __future__ import annotations

from typing import Any

from dgrun.format import GGUFFile

HF_JSON_KEY = "tokenizer.huggingface.json"
SPM_TENSOR = "tokenizer.sentencepiece_model"
CHAT_TEMPLATE_KEY = "tokenizer.chat_template"


class NoTokenizerError(ValueError):
    """Text was given to a model file that carries no tokenizer (converted with --no-tokenizer)."""


class Tokenizer:
    """Encode/decode with the library the original files were made for (tokenizers or sentencepiece)."""

    def __init__(self, backend: Any, kind: str, bos_id: int | None, add_bos: bool):
        self._backend = backend
        self.kind = kind
        self.bos_id = bos_id
        self.add_bos = add_bos

    @classmethod
    def from_file(cls, gguf: GGUFFile) -> Tokenizer | None:
        """The file's tokenizer, or None when it has none."""
        bos = gguf.get("tokenizer.ggml.bos_token_id")
        add_bos = bool(gguf.get("tokenizer.ggml.add_bos_token", bos is not None))
        if HF_JSON_KEY in gguf.metadata:
            from tokenizers import Tokenizer as HFTokenizer

            return cls(HFTokenizer.from_str(gguf.metadata[HF_JSON_KEY]), "huggingface",
                       None if bos is None else int(bos), add_bos)
        if SPM_TENSOR in gguf.tensors:
            import sentencepiece

            proto = gguf.raw(SPM_TENSOR).tobytes()
            return cls(sentencepiece.SentencePieceProcessor(model_proto=proto), "sentencepiece",
                       None if bos is None else int(bos), add_bos)
        return None

    @property
    def library(self) -> Any:
        """The underlying `tokenizers.Tokenizer` or `sentencepiece.SentencePieceProcessor` (see `kind`)."""
        return self._backend

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`, with BOS prepended as the file says (or as `add_bos` overrides)."""
        add_bos = self.add_bos if add_bos is None else add_bos
        if self.kind == "huggingface":
            ids = self._backend.encode(text, add_special_tokens=False).ids
        else:
            ids = self._backend.encode(text)
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return list(ids)

    def decode(self, ids: list[int]) -> str:
        if self.kind == "huggingface":
            return self._backend.decode(list(ids), skip_special_tokens=False)
        return self._backend.decode(list(ids))

    def token_text(self, token_id: int) -> str:
        """One token's text as it appears inside a decoded string (for drawing a canvas)."""
        if self.kind == "huggingface":
            return self._backend.decode([token_id], skip_special_tokens=False)
        return self._backend.decode([token_id]) if token_id != self.bos_id else ""
