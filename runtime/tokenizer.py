"""The tokenizer that travels inside a .dgf file.

dgrun's files carry the originals verbatim: an HF `tokenizer.json` as the string `tokenizer.huggingface.json`, or a
SentencePiece model as the uint8 tensor `tokenizer.sentencepiece_model` (a tensor, because GGUF readers parse
metadata arrays element by element). llama.cpp's `tokenizer.ggml.*` keys are written too, for other readers.

Files from llama.cpp's converter carry only those keys. For `tokenizer.ggml.model = "gemma4"` the tokenizer is
rebuilt from them (`gemma4_from_metadata`) as the pipeline transformers' `GemmaTokenizer` builds from Gemma 4's
tokenizer.json: BPE over raw UTF-8 (no GPT-2 byte mapping) with `<0xNN>` byte fallback, spaces replaced by `▁`,
no pre-splitting, and the CONTROL / USER_DEFINED / UNKNOWN tokens matched whole in text as added tokens.
llama.cpp's own gemma4 tokenizer also splits the text at newline runs and keeps a newline run whole when it is a
token; on a vocabulary where no merge joins a newline to anything else (Gemma 4's, built from SentencePiece
pieces) that gives the same ids, and where the two could differ transformers, the reference, decides.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gguf import TokenType

from dgrun.format import FormatError, GGUFFile

HF_JSON_KEY = "tokenizer.huggingface.json"
SPM_TENSOR = "tokenizer.sentencepiece_model"
CHAT_TEMPLATE_KEY = "tokenizer.chat_template"
# Token types llama.cpp matches whole in text before BPE, as transformers matches its added special tokens.
ADDED_TOKEN_TYPES = (int(TokenType.CONTROL), int(TokenType.USER_DEFINED), int(TokenType.UNKNOWN))


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
        """The file's tokenizer, or None when it has none. A tokenizer that cannot be built is a FormatError."""
        bos = gguf.get("tokenizer.ggml.bos_token_id")
        bos_id = bos if isinstance(bos, int) else None
        flag = gguf.get("tokenizer.ggml.add_bos_token", bos_id is not None)
        add_bos = bool(flag) if isinstance(flag, (bool, int)) else False
        try:
            if HF_JSON_KEY in gguf.metadata:
                from tokenizers import Tokenizer as HFTokenizer

                return cls(HFTokenizer.from_str(gguf.metadata[HF_JSON_KEY]), "huggingface", bos_id, add_bos)
            if SPM_TENSOR in gguf.tensors:
                import sentencepiece

                proto = gguf.raw(SPM_TENSOR).tobytes()
                return cls(sentencepiece.SentencePieceProcessor(model_proto=proto), "sentencepiece", bos_id, add_bos)
            if gguf.get("tokenizer.ggml.model") == "gemma4":
                # llama.cpp always prepends BOS to Gemma 4 prompts, whatever add_bos_token says (its PR #21500).
                return cls(gemma4_from_metadata(gguf.metadata), "gemma4", bos_id, bos_id is not None)
        except FormatError as e:
            raise FormatError(f"{gguf.path}: {e}") from None
        except Exception as e:  # tokenizers and sentencepiece raise their own types on malformed input
            message = " ".join(str(e).split())  # one line, whatever the library's message looks like
            raise FormatError(f"{gguf.path}: the tokenizer cannot be built: {message}") from None
        return None

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`, with BOS prepended as the file says (or as `add_bos` overrides)."""
        add_bos = self.add_bos if add_bos is None else add_bos
        if self.kind != "sentencepiece":
            ids = self._backend.encode(text, add_special_tokens=False).ids
        else:
            ids = self._backend.encode(text)
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return list(ids)

    def decode(self, ids: list[int]) -> str:
        if self.kind != "sentencepiece":
            return self._backend.decode(list(ids), skip_special_tokens=False)
        return self._backend.decode(list(ids))

    def token_text(self, token_id: int) -> str:
        """One token's text as it appears inside a decoded string (for drawing a canvas)."""
        if self.kind != "sentencepiece":
            return self._backend.decode([token_id], skip_special_tokens=False)
        return self._backend.decode([token_id]) if token_id != self.bos_id else ""


def gemma4_from_metadata(metadata: dict[str, Any]) -> Any:
    """A `tokenizers.Tokenizer` equal to transformers' GemmaTokenizer, from `tokenizer.ggml.*` arrays alone."""
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    tokens = metadata.get("tokenizer.ggml.tokens")
    merges = metadata.get("tokenizer.ggml.merges")
    types = metadata.get("tokenizer.ggml.token_type")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise FormatError("tokenizer.ggml.tokens is missing or is not an array of strings")
    if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
        raise FormatError("tokenizer.ggml.merges is missing or is not an array of strings")
    types_array = np.asarray([] if types is None else types)
    if types is None or types_array.shape != (len(tokens),) or not np.issubdtype(types_array.dtype, np.integer):
        raise FormatError(f"tokenizer.ggml.token_type is missing or is not {len(tokens)} integers")
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise FormatError("tokenizer.ggml.tokens holds the same token twice")
    pairs = []
    for merge in merges:
        # llama.cpp's reading: the first space after the first character separates the two halves.
        cut = merge.find(" ", 1)
        if cut < 0 or merge[:cut] + merge[cut + 1:] not in vocab:
            raise FormatError(f"tokenizer.ggml.merges entry {merge!r} does not merge two tokens into a token")
        pairs.append((merge[:cut], merge[cut + 1:]))
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")  # as transformers: a no-op
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    added = np.flatnonzero(np.isin(types_array, ADDED_TOKEN_TYPES))
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in added])
    return tokenizer
