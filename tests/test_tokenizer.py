"""Tokenizers travel inside the file: an HF tokenizer.json (BPE) and a SentencePiece model both round-trip."""

from __future__ import annotations

import shutil

import pytest
from fixtures import SAMPLE_TEXT
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import dgrun
from dgrun.converters.convert_hf import convert
from dgrun.format import GGUFFile


@pytest.fixture(scope="module")
def hf_json_checkpoint(checkpoints, tmp_path_factory):
    """The base checkpoint with a BPE tokenizer.json (vocab 120; metaspace keeps spaces) for tokenizer.model."""
    folder = tmp_path_factory.mktemp("hfjson") / "hf"
    shutil.copytree(checkpoints["base"].folder, folder)
    (folder / "tokenizer.model").unlink()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.decoder = decoders.Metaspace(prepend_scheme="never")
    tok.train_from_iterator([*SAMPLE_TEXT, "\n"], trainers.BpeTrainer(vocab_size=120,
                                                                    special_tokens=["<pad>", "<eos>", "<bos>"]))
    tok.save(str(folder / "tokenizer.json"))
    out = folder.parent / "hfjson.dgf"
    convert(folder, out, "q8_0", quiet=True)
    return folder, out


def test_hf_tokenizer_json_travels_verbatim_and_tokenizes_identically(hf_json_checkpoint):
    folder, path = hf_json_checkpoint
    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    with GGUFFile(path) as f:
        assert f.get("tokenizer.huggingface.json") == (folder / "tokenizer.json").read_text()
        assert f.get("tokenizer.ggml.model") == "gemma4" and len(f.get("tokenizer.ggml.merges")) > 0
        tokens = f.get("tokenizer.ggml.tokens")
        assert tokens[2] == "<bos>" and f.get("tokenizer.ggml.token_type")[2] == 3  # control
    with dgrun.load(path, backend="numpy") as model:
        for text in ("def fibonacci(n):", "    return fibonacci(n - 1)", "x = [1, 2, 3]\n"):
            assert model.tokenize(text) == [2, *reference.encode(text, add_special_tokens=False).ids]
            assert model.detokenize(model.tokenize(text, add_bos=False)) == text


def test_sentencepiece_model_travels_as_a_tensor(checkpoints):
    import sentencepiece

    ckpt = checkpoints["base"]
    with GGUFFile(ckpt.dgf("f32")) as f:
        blob = f.raw("tokenizer.sentencepiece_model").tobytes()
        assert blob == (ckpt.folder / "tokenizer.model").read_bytes()
        assert "tokenizer.ggml.tokens" in f.metadata and f.get("tokenizer.ggml.add_bos_token") is True
    sp = sentencepiece.SentencePieceProcessor(model_file=str(ckpt.folder / "tokenizer.model"))
    with dgrun.load(ckpt.dgf("f32"), backend="numpy") as model:
        assert model.tokenize("import os") == [2, *sp.encode("import os")]
