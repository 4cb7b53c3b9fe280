"""GGUF files written by the llama.cpp fork of PR #24423 (the converter and quantizer of the published files).

The files in tests/data/peer were made by that fork's convert_hf_to_gguf.py and llama-quantize from the
checkpoints of `fixtures.PEER_CHECKPOINTS` (tests/data/peer/README.md has the commands). Checked here:
- config, generation defaults and tokenizer read from the fork's keys match transformers' model and tokenizer;
- the f32 file generates token-exact with transformers (its random draws replayed) on numpy and cpu;
- each quantized file runs on numpy bit-identically to its twin dequantized by gguf-py (which is bit-exact with
  ggml), so every ggml type in it is decoded as ggml decodes it; the cpu backend stays within the tolerances of
  test_cpu_backend.py (relative L2 2e-6 on encoder K/V, 1e-5 on logits: summation order only, justified there);
  with its integer arithmetic on (the default for quantized files) each one loads, generates, and its logits move
  by the activations' int8 rounding only;
- truncated and corrupted variants are refused with one FormatError line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, assert_close
from fixtures import GEMMA4_SPECIAL_TOKENS, PEER_CHECKPOINTS, hf_generate, peer_model, save_gemma4_tokenizer
from peer_files import DROP, rewrite_gguf
from test_reference import GENERATION_CASES, replay_generate

import dgrun
from dgrun.backends import get_backend
from dgrun.config import ConfigError, GenerationConfig, ModelConfig
from dgrun.format import FormatError, GGUFFile
from dgrun.rng import ReplayRng
from dgrun.tokenizer import gemma4_from_metadata

PEER = REPO / "tests" / "data" / "peer"
QUANTIZED = sorted(PEER.glob("quant-*.gguf"))
KV_RTOL, LOGITS_RTOL = 2e-6, 1e-5  # cpu vs numpy, as test_cpu_backend.py (same float32 weights, summation order)


class _Reference:
    """What `replay_generate` needs of a checkpoint: transformers' model."""

    def __init__(self, model):
        self.model = model


@pytest.fixture(scope="module")
def gen_model():
    model = peer_model("gen")
    with GGUFFile(PEER / "gen-f32.gguf") as f:  # the committed file must hold this very model's weights
        embed = model.model.decoder.embed_tokens.weight.detach().numpy()
        assert np.array_equal(f.array("token_embd.weight"), embed), "fixtures.peer_model('gen') drifted from the file"
    return _Reference(model)


def _missing_types(path: Path, backend: str) -> set[str]:
    supported = get_backend(backend).supported_types
    with GGUFFile(path) as f:
        return {t.ggml_type.name for t in f.tensors.values() if t.ggml_type not in supported}


def _skip_unless_runs(path: Path, backend: str) -> None:
    missing = _missing_types(path, backend)
    if missing:
        pytest.skip(f"{path.name}: the {backend} backend does not run {sorted(missing)} yet")


# -- config, generation defaults, info ---------------------------------------------------------------------


def test_config_from_the_forks_keys_matches_transformers(gen_model):
    text = gen_model.model.config.text_config.to_dict()
    ref = ModelConfig.from_hf(gen_model.model.config.to_dict())
    with GGUFFile(PEER / "gen-f32.gguf") as f:
        assert "diffusion-gemma.vocab_size" not in f.metadata and "rope_freqs.weight" in f.tensors
        ours = ModelConfig.from_file(f)
    for name, value in vars(ref).items():  # rms_norm_eps is a float32 key: 1e-6 to 7 digits
        assert getattr(ours, name) == (pytest.approx(value, rel=1e-7) if isinstance(value, float) else value), name
    assert ours.vocab_size == text["vocab_size"] and ours.partial_rotary_factor == 0.25


def test_generation_defaults_from_the_forks_sampler_keys():
    with GGUFFile(PEER / "gen-f32.gguf") as f:
        gen = GenerationConfig.from_metadata(f.metadata)
    spec = PEER_CHECKPOINTS["gen"]["generation"]
    assert (gen.max_denoising_steps, gen.t_min, gen.t_max, gen.entropy_bound, gen.stability_threshold,
            gen.confidence_threshold) == (spec["max_denoising_steps"], spec["t_min"], spec["t_max"],
                                          spec["sampler_config"]["entropy_bound"], spec["stability_threshold"],
                                          spec["confidence_threshold"])
    # llama.cpp's end-of-generation set for a gemma4 vocabulary: <eos>, <turn|>, <|tool_response>.
    assert gen.eos_token_ids == [1, GEMMA4_SPECIAL_TOKENS.index("<turn|>"),
                                 GEMMA4_SPECIAL_TOKENS.index("<|tool_response>")]
    with GGUFFile(QUANTIZED[0]) as f:  # no sampler keys in that checkpoint: transformers' defaults
        assert GenerationConfig.from_metadata(f.metadata).resolved()["max_denoising_steps"] == 48


def test_info_names_the_origin_and_types():
    from dgrun.cli import describe_file

    info = describe_file(PEER / "quant-Q4_K_M.gguf")
    assert info["origin"].startswith("llama.cpp") and "Q4_K_M" in info["origin"]
    assert {"Q4_K", "Q6_K", "F32"} <= set(info["types"]) and info["config"]["vocab_size"] == 384


# -- generation ------------------------------------------------------------------------------------------


def _sampler_defaults() -> dict:
    """The "gen" checkpoint's generation_config.json as keyword arguments of transformers' generate."""
    spec = PEER_CHECKPOINTS["gen"]["generation"]
    return dict(max_denoising_steps=spec["max_denoising_steps"], t_min=spec["t_min"], t_max=spec["t_max"],
                entropy_bound=spec["sampler_config"]["entropy_bound"],
                stability_threshold=spec["stability_threshold"], confidence_threshold=spec["confidence_threshold"])


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_f32_file_generates_token_exact_with_transformers(gen_model, backend):
    sampler = _sampler_defaults()
    params = dict(GENERATION_CASES["fixed_steps"], t_min=sampler["t_min"], t_max=sampler["t_max"],
                  entropy_bound=sampler["entropy_bound"])
    hf_tokens, out = replay_generate(gen_model, [2, 17, 33, 5, 60], params, backend, PEER / "gen-f32.gguf")
    assert out.tokens == hf_tokens


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_f32_file_generates_with_the_checkpoints_sampler_defaults(gen_model, backend):
    """Nothing passed but the length: the file's `diffusion.eb_*` keys stand for generation_config.json."""
    prompt = list(range(2, 24))  # longer than the sliding window
    hf_tokens, draws = hf_generate(gen_model.model, prompt, max_new_tokens=32, eos_token_id=None,
                                   **_sampler_defaults())
    with dgrun.load(PEER / "gen-f32.gguf", backend=backend) as ours:
        ours.generation_config.eos_token_ids = []
        out = ours.generate(prompt, max_new_tokens=32, rng=ReplayRng(draws))
    assert out.tokens == hf_tokens and len(out.tokens) == 32


def _decode_logits(path: Path, backend: str, prompt: np.ndarray, canvas: np.ndarray):
    with dgrun.load(path, backend=backend) as model:
        cache = model.graph.new_cache()
        model.graph.encode(prompt, cache)
        logits = model.backend.to_numpy(model.graph.decode(canvas, cache, None))
        tokens = model.generate(list(prompt), max_new_tokens=32, max_denoising_steps=4, seed=5,
                                adaptive_stopping=False).tokens
        keys = [model.backend.to_numpy(k) for k in cache.keys]
    return np.asarray(logits, dtype=np.float32), keys, tokens


@pytest.mark.parametrize("path", [PEER / "gen-bf16.gguf", *QUANTIZED], ids=lambda p: p.stem)
def test_quantized_file_runs_as_its_gguf_py_dequantized_twin(path, tmp_path):
    _skip_unless_runs(path, "numpy")
    twin = rewrite_gguf(path, tmp_path / "twin.gguf", dequantize_all=True)
    rng = np.random.default_rng(0)
    prompt, canvas = rng.integers(0, 384, 12), rng.integers(0, 384, 16)
    logits, _, tokens = _decode_logits(path, "numpy", prompt, canvas)
    ref_logits, _, ref_tokens = _decode_logits(twin, "numpy", prompt, canvas)
    assert np.array_equal(logits, ref_logits), "decoder logits differ from the gguf-py-dequantized file"
    assert tokens == ref_tokens


@pytest.mark.parametrize("path", [PEER / "gen-bf16.gguf", *QUANTIZED], ids=lambda p: p.stem)
def test_cpu_backend_matches_numpy_on_the_forks_files(path):
    _skip_unless_runs(path, "cpu")
    rng = np.random.default_rng(1)
    prompt, canvas = rng.integers(0, 384, 12), rng.integers(0, 384, 16)
    logits, keys, _ = _decode_logits(path, "cpu", prompt, canvas)
    ref_logits, ref_keys, _ = _decode_logits(path, "numpy", prompt, canvas)
    for i, (k, ref) in enumerate(zip(keys, ref_keys, strict=True)):
        assert_close(k, ref, KV_RTOL, f"{path.stem} layer {i} keys")
    assert_close(logits, ref_logits, LOGITS_RTOL, f"{path.stem} logits")


@pytest.mark.parametrize("path", QUANTIZED, ids=lambda p: p.stem)
def test_cpu_integer_arithmetic_runs_the_forks_files(path, monkeypatch):
    """With the cpu backend's int8 arithmetic on (its default for quantized files; off in the test above, which
    checks float32 parity), every published type mix loads and generates, and its logits move by the
    activations' rounding only: ~0.5% per matmul, which this random fixture amplifies (measured 0.03-0.26 rel.
    L2 over five prompts per file on avx2, every type in int8; the bound is 0.5, as test_int8.py's 0.4 for its
    fixture)."""
    _skip_unless_runs(path, "cpu")
    from dgrun.backends.cpu_backend import CpuBackend

    monkeypatch.setenv("DGRUN_CPU_INT8", "1")
    isa = CpuBackend().int8_isa
    rng = np.random.default_rng(1)
    prompt, canvas = rng.integers(0, 384, 12), rng.integers(0, 384, 16)
    logits, _, tokens = _decode_logits(path, "cpu", prompt, canvas)
    ref_logits, _, _ = _decode_logits(path, "numpy", prompt, canvas)
    assert tokens and all(0 <= t < 384 for t in tokens) and np.all(np.isfinite(logits))
    rel = np.linalg.norm(logits - ref_logits) / np.linalg.norm(ref_logits)
    assert 1e-5 < rel < 0.5, f"{path.stem} (int8 {isa}): rel. L2 {rel:.3g}"


# -- tokenizer -----------------------------------------------------------------------------------------------

HARD_STRINGS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "  leading spaces", "trailing spaces   ", "a  b   c    d", "\n", "\n\n\n\n", "x\n\n\ny\n", "\t\tindented\ttabs",
    "Les élèves répondent: très bien!", "naïve café über straße", "日本語のテキスト", "emoji 🙂🚀 and ZWJ 👩‍💻",
    "<|turn>user\nhello<turn|>\n<|turn>model\n", '<|tool_call>call:f{x:<|"|>1<|"|>}<tool_call|>',
    "<bos><eos><pad><mask><unk>", "literal <0x41> and < 0x41 >", "<|turn", "turn|>", "", " ", "▁already▁spaced",
    "mixed\r\nline\rendings", "\u00a0non-breaking\u2009thin", "x = [1, 2, 3]\nprint(x)  # done\n\n",
]


@pytest.fixture(scope="module")
def tokenizers_pair(tmp_path_factory):
    """(transformers' tokenizer of the "gen" checkpoint, ours rebuilt from the fork's file's metadata alone)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("gemma4tok")
    save_gemma4_tokenizer(folder, PEER_CHECKPOINTS["gen"]["text"]["vocab_size"])
    reference = AutoTokenizer.from_pretrained(folder)
    with dgrun.load(PEER / "gen-f32.gguf", backend="numpy") as model:
        assert model.tokenizer is not None and model.tokenizer.kind == "gemma4"
        assert model._file.get("tokenizer.ggml.tokens") == reference.convert_ids_to_tokens(range(len(reference)))
        yield reference, model


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_gemma4_tokenizer_from_metadata_equals_transformers(tokenizers_pair, text):
    reference, model = tokenizers_pair
    ids = reference.encode(text, add_special_tokens=False)
    # BOS as llama.cpp prepends it to every Gemma 4 prompt (Gemma 4's tokenizer.json adds none; its template does).
    assert model.tokenize(text) == [2, *ids]
    assert model.detokenize(ids) == reference.decode(ids)


def test_gemma4_rebuild_follows_transformers_where_a_merge_crosses_a_newline(tmp_path):
    """llama.cpp splits gemma4 text at newline runs; transformers does not. With a merge across a newline (not in
    Gemma 4's vocabulary, but possible in a file) the two differ, and dgrun follows transformers."""
    from transformers import AutoTokenizer, GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    pieces = [*specials, "a", "b", "\n", "a\n", "a\nb", "▁"]
    merges = [("a", "\n"), ("a\n", "b")]
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, unk_token="<unk>",
                               fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(specials)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "GemmaTokenizer"}')
    reference = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(reference, GemmaTokenizer)
    ours = gemma4_from_metadata({
        "tokenizer.ggml.tokens": pieces, "tokenizer.ggml.merges": [" ".join(m) for m in merges],
        "tokenizer.ggml.token_type": np.array([3, 3, 3, 2, 1, 1, 1, 1, 1, 1], dtype=np.int32),
        "tokenizer.ggml.unknown_token_id": 3})
    for text in ("a\nb", "ba\nba\n", "a\n\nb"):
        assert ours.encode(text, add_special_tokens=False).ids == reference.encode(text, add_special_tokens=False)
    assert ours.encode("a\nb").ids == [pieces.index("a\nb")]


@pytest.mark.parametrize("metadata, message", [
    ({"tokenizer.ggml.merges": DROP}, "tokenizer.ggml.merges is missing"),
    ({"tokenizer.ggml.merges": ["q z"]}, "does not merge two tokens into a token"),
    ({"tokenizer.ggml.token_type": [1, 2]}, "tokenizer.ggml.token_type is missing or is not 384 integers"),
])
def test_broken_gemma4_tokenizer_metadata_is_one_format_error(tmp_path, metadata, message):
    path = rewrite_gguf(PEER / "gen-f32.gguf", tmp_path / "bad.gguf", metadata=metadata)
    with pytest.raises(FormatError, match=message):
        dgrun.load(path, backend="numpy")


# -- hostile variants of the fork's files -------------------------------------------------------------------


@pytest.mark.parametrize("metadata, tensors, message", [
    ({}, {"rope_freqs.weight": np.ones(16, np.float32) * 2}, "rope_freqs.weight must be 16 values, 1.0 on"),
    ({}, {"rope_freqs.weight": np.ones(8, np.float32)}, "rope_freqs.weight must be 16 values"),
    ({}, {"rope_freqs.weight": np.full(16, 1e30, np.float32)}, "rope_freqs.weight must be 16 values"),
    ({}, {"rope_freqs.weight": DROP}, "says how much of the full layers' heads RoPE rotates"),
    ({}, {"token_embd.weight": DROP}, "vocab_size is missing and there is no token_embd.weight"),
    ({"diffusion.canvas_length": DROP}, {}, "metadata key diffusion-gemma.canvas_length is missing"),
    ({"diffusion-gemma.canvas_length": 32}, {}, "disagree"),
    ({"diffusion-gemma.attention.causal": True}, {}, "attention.causal must be false"),
    ({"diffusion-gemma.rope.dimension_count_swa": 8}, {}, "rope.dimension_count_swa is 8"),
    ({"diffusion-gemma.rope.dimension_count": 8}, {}, "rope.dimension_count is 8"),
    ({"diffusion-gemma.attention.sliding_window_pattern": [True, False]}, {}, "is not 4 booleans"),
    ({"diffusion.eb_t_min": "low"}, {}, "diffusion.eb_t_min must be float"),
])
def test_contradictory_or_missing_keys_are_one_format_error(tmp_path, metadata, tensors, message):
    path = rewrite_gguf(PEER / "gen-f32.gguf", tmp_path / "bad.gguf", metadata=metadata, tensors=tensors)
    with pytest.raises(FormatError, match=message) as info:
        dgrun.load(path, backend="numpy")
    assert "\n" not in str(info.value)


def test_truncated_and_bit_flipped_files_give_only_format_errors(tmp_path):
    data = (PEER / "gen-f32.gguf").read_bytes()
    with GGUFFile(PEER / "gen-f32.gguf") as f:
        header = f.data_offset
    rng = np.random.default_rng(7)
    cuts = [*rng.integers(0, header, 40), *rng.integers(header, len(data), 10)]
    outcomes = {"loaded": 0, "refused": 0}
    for i, cut in enumerate(cuts):
        if i % 2:  # flip a byte in the header instead
            mutated = bytearray(data)
            mutated[int(cut) % header] ^= 1 << int(rng.integers(8))
            blob = bytes(mutated)
        else:
            blob = data[:int(cut)]
        path = tmp_path / f"m{i}.gguf"
        path.write_bytes(blob)
        try:
            dgrun.load(path, backend="numpy").close()
            outcomes["loaded"] += 1
        except FormatError as e:
            assert "\n" not in str(e)
            outcomes["refused"] += 1
    assert outcomes["refused"] >= 25, outcomes


def test_config_error_is_raised_for_metadata_alone():
    with GGUFFile(PEER / "gen-f32.gguf") as f, pytest.raises(ConfigError, match="vocab_size is missing"):
        ModelConfig.from_metadata(f.metadata)


def test_fuzzing_the_forks_file_finds_only_format_errors():
    """Byte-level mutants of the fork's file through the reader, the config, the generation defaults and the
    tokenizer build (tools/fuzz_dgf.py; its generated seeds carry the fork's keys too)."""
    import fuzz_dgf

    report = fuzz_dgf.fuzz(seconds=4.0, seed=23, seed_files=[PEER / "gen-f32.gguf"])
    assert report.ok, "\n".join(map(str, report.failures[:3]))
    assert report.iterations > 20 and report.rejected > 0, report.summary()


def test_dgrun_files_carry_what_the_forks_runtime_reads(tmp_path):
    """dgrun's conversion of a checkpoint holds the fork's keys and tensors with the fork's values (the fork's own
    conversion of the same checkpoint is the reference), so it loads in the fork's runtime too; running it there
    is tools/check_peer_runtime.py's job (it needs a build of the fork)."""
    from fixtures import save_peer_checkpoint

    from dgrun.config import PEER_SAMPLER_KEYS
    from dgrun.converters.convert_hf import convert

    folder = save_peer_checkpoint("gen", tmp_path / "gen")
    convert(folder, tmp_path / "gen.dgf", "f32", quiet=True)
    keys = ["diffusion.canvas_length", *(key for key, _ in PEER_SAMPLER_KEYS.values()), "tokenizer.ggml.model",
            *(f"diffusion-gemma.{k}" for k in ("rope.dimension_count", "rope.dimension_count_swa", "attention.causal",
                                               "attention.sliding_window_pattern", "attention.head_count_kv")),
            "tokenizer.ggml.mask_token_id", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.merges"]
    with GGUFFile(tmp_path / "gen.dgf") as ours, GGUFFile(PEER / "gen-f32.gguf") as theirs:
        for key in keys:
            assert np.array_equal(np.asarray(ours.get(key)), np.asarray(theirs.get(key))), key
        assert ours.get("tokenizer.ggml.tokens") == theirs.get("tokenizer.ggml.tokens")
        for name, info in theirs.tensors.items():
            assert ours.tensors[name].shape == info.shape, name
            assert np.array_equal(ours.array(name), theirs.array(name)), name
