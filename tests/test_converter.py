"""convert-hf-to-dgf: round trips per outtype, metadata, gguf-py compatibility, and every refusal."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from functools import partialmethod
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import assert_close, fixtures
from safetensors.numpy import load_file, save_file
from transformers import DynamicCache

import dgrun
from dgrun.config import GenerationConfig, ModelConfig
from dgrun.converters import convert_hf
from dgrun.converters.names import dgf_name
from dgrun.converters.presets import PRESETS
from dgrun.converters.safetensors_reader import SafeTensor
from dgrun.format import GGUFFile
from dgrun.quants import dequantize_tensor

# Round-trip bound on ‖dequant(quant(w)) − w‖/‖w‖ per stored type, for these Gaussian weights: the measured
# error (tools/quant_error_table.py) with ~40% headroom. It follows from bits per weight: each bit halves it.
ROUND_TRIP_RTOL = {
    "F32": 0.0, "F16": 5e-4, "BF16": 4e-3, "Q8_0": 1e-2, "Q6_K": 3e-2, "Q5_0": 6e-2, "Q4_0": 0.12,
    "Q4_K": 0.1, "NVFP4": 0.14, "MXFP4": 0.16,
}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dgrun.converters.convert_hf", *args],
                          capture_output=True, text=True, timeout=600)


def _assert_round_trip(ckpt, outtype: str) -> dict[str, int]:
    """Every tensor of the converted file dequantizes to the checkpoint's within its stored type's bound; returns
    how many tensors each type stores."""
    hf = load_file(str(ckpt.folder / "model.safetensors"))
    counts: dict[str, int] = {}
    with GGUFFile(ckpt.dgf(outtype)) as f:
        seen = set()
        for hf_name, ref in hf.items():
            name = dgf_name(hf_name)
            if name is None or name == "output.weight":
                continue
            info = f.tensors[name]
            scale = f.array(f"{name}.scale")[0] if f"{name}.scale" in f.tensors else None
            out = dequantize_tensor(f.raw(name).reshape(*info.shape[:-1], -1), info.ggml_type, scale)
            out = out.reshape(info.shape)
            assert_close(out, ref, max(ROUND_TRIP_RTOL[info.ggml_type.name], 1e-7), f"{outtype} {name}")
            if len(ref.shape) == 1:
                assert info.ggml_type == gguf.GGMLQuantizationType.F32
            seen.add(name)
            counts[info.ggml_type.name] = counts.get(info.ggml_type.name, 0) + 1
    assert seen == set(dgrun.model.tensor_shapes(ModelConfig.from_hf(
        json.loads((ckpt.folder / "config.json").read_text()))))
    return counts


@pytest.mark.parametrize("outtype", list(PRESETS))
def test_round_trip_every_tensor(checkpoints, outtype):
    assert "F16" not in _assert_round_trip(checkpoints["quant"], outtype) or outtype == "f16"  # no fallback needed


def test_metadata_reproduces_config_and_generation_defaults(checkpoints):
    ckpt = checkpoints["top1"]
    hf_config = json.loads((ckpt.folder / "config.json").read_text())
    with GGUFFile(ckpt.dgf("q8_0")) as f:
        assert f.get("general.architecture") == "diffusion-gemma"
        ours, ref = vars(ModelConfig.from_metadata(f.metadata)), vars(ModelConfig.from_hf(hf_config))
        # float32 metadata (as llama.cpp reads these keys): eps 1e-6 comes back as its float32 value
        assert ours.pop("rms_norm_eps") == pytest.approx(ref.pop("rms_norm_eps"))
        assert ours == ref
        gen = GenerationConfig.from_metadata(f.metadata)
        assert gen.eos_token_ids == [1] and gen.pad_token_id == 0
        assert f.get("tokenizer.ggml.model") == "llama" and "tokenizer.sentencepiece_model" in f.tensors
        # llama.cpp's standard keys, per-layer pattern and KV heads
        assert f.get("diffusion-gemma.block_count") == 6
        assert list(f.get("diffusion-gemma.attention.sliding_window_pattern")) == [True] * 5 + [False]


def test_file_opens_in_gguf_py_reader(checkpoints):
    path = checkpoints["quant"].dgf("q4_k_m")
    reader = gguf.GGUFReader(path)
    ours = GGUFFile(path)
    assert [t.name for t in reader.tensors] == list(ours.tensors)
    for t in reader.tensors:
        assert t.tensor_type == ours.tensors[t.name].ggml_type
        assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), ours.raw(t.name).reshape(-1))
    types = {t.tensor_type.name for t in reader.tensors}
    assert {"Q4_K", "Q6_K", "Q5_0", "F32"} <= types  # the recipe, with its block-32 fallback for 64-wide rows
    ours.close()


def test_generation_config_none_values_fall_back_to_transformers_defaults(checkpoints):
    with dgrun.load(checkpoints["base"].dgf("f32"), backend="numpy") as model:
        params = model.resolve_params()
        assert (params.max_denoising_steps, params.t_min, params.t_max) == (48, 0.4, 0.8)
        assert (params.entropy_bound, params.stability_threshold, params.confidence_threshold) == (0.1, 1, 0.005)


# -- refusals -------------------------------------------------------------------------------------------


@pytest.fixture
def broken(checkpoints, tmp_path):
    """A fresh copy of the small checkpoint to break in one way per test."""
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoints["base"].folder, folder)
    return folder


def _assert_refused(folder: Path, tmp_path: Path, message: str, *extra: str) -> None:
    out = tmp_path / "out.dgf"
    result = _cli(str(folder), "--outfile", str(out), "--quiet", *extra)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.dgf.tmp*"))


def _rewrite_weights(folder: Path, edit) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def test_refuses_directory_without_config(broken, tmp_path):
    (broken / "config.json").unlink()
    _assert_refused(broken, tmp_path, "has no config.json")


def test_refuses_other_architecture(broken, tmp_path):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model_type"] = "llama"
    (broken / "config.json").write_text(json.dumps(cfg))
    _assert_refused(broken, tmp_path, "not a DiffusionGemma checkpoint")


def test_refuses_missing_tensor(broken, tmp_path):
    _rewrite_weights(broken, lambda t: t.pop("model.decoder.layers.1.mlp.up_proj.weight"))
    _assert_refused(broken, tmp_path, "missing tensor blk.1.ffn_up.weight")


def test_refuses_mismatched_shape(broken, tmp_path):
    def shrink(t):
        t["model.decoder.layers.0.self_attn.q_proj.weight"] = t["model.decoder.layers.0.self_attn.q_proj.weight"][:8]
    _rewrite_weights(broken, shrink)
    _assert_refused(broken, tmp_path, "has shape (8, 64)")


def test_refuses_config_that_disagrees_with_tensors(broken, tmp_path):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 128
    (broken / "config.json").write_text(json.dumps(cfg))
    _assert_refused(broken, tmp_path, "but config.json implies")


def test_refuses_pickle_checkpoint(broken, tmp_path):
    (broken / "model.safetensors").rename(broken / "pytorch_model.bin")
    _assert_refused(broken, tmp_path, "refusing pickle checkpoint pytorch_model.bin")


def test_refuses_nan_weights(broken, tmp_path):
    def poison(t):
        t["model.decoder.layers.2.experts.down_proj"][1, 2, 3] = np.nan
    _rewrite_weights(broken, poison)
    _assert_refused(broken, tmp_path, "contains NaN or Inf")


def test_strict_refuses_outtype_that_cannot_represent_a_tensor(broken, tmp_path):
    # The base fixture's 64-wide rows fit Q8_0 (block 32) but not NVFP4's 64-value blocks in 32-wide expert rows.
    _assert_refused(broken, tmp_path, "cannot store blk.0.ffn_down_exps.weight", "--outtype", "nvfp4_moe", "--strict")


# -- stored copies: encoder and decoder, a tied lm_head ---------------------------------------------------------


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """transformers' model with tie_word_embeddings=False (both copies of every shared weight and lm_head are
    saved), the encoder's copies set equal to the decoder's: a checkpoint dgrun can run."""
    import torch

    model = fixtures.make_model(fixtures.text_config(), seed=7, tie_word_embeddings=False)
    encoder, decoder = model.model.encoder.language_model, model.model.decoder
    shared = {k: v for k, v in decoder.state_dict().items() if k in encoder.state_dict() and "layer_scalar" not in k}
    with torch.no_grad():
        encoder.load_state_dict(shared, strict=False)
    return model, fixtures.save_checkpoint(model, tmp_path_factory.mktemp("untied") / "hf")


def test_untied_checkpoint_with_equal_copies_converts_and_matches_transformers(untied, tmp_path):
    import torch

    model, folder = untied
    names = load_file(str(folder / "model.safetensors"))
    assert "model.encoder.language_model.layers.0.self_attn.q_proj.weight" in names and "lm_head.weight" in names
    out = tmp_path / "untied.dgf"
    convert_hf.convert(folder, out, "f32", quiet=True)
    canvas, prompt = np.arange(16) % 128, np.array([2, 17, 33, 5, 60])
    with dgrun.load(out, backend="numpy") as ours, torch.no_grad():
        assert "output.weight" in ours.graph.w  # lm_head, untied
        cache = ours.graph.new_cache()
        ours.graph.encode(prompt, cache)
        hf_cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        model.model.encoder(input_ids=torch.from_numpy(prompt)[None], past_key_values=hf_cache)
        ref = model(decoder_input_ids=torch.from_numpy(canvas)[None], past_key_values=hf_cache).logits[0].numpy()
        assert_close(ours.graph.decode(canvas, cache, None), ref, 2e-5, "untied logits")  # test_reference's bound


def test_merged_lora_with_separate_encoder_and_decoder_deltas_is_refused(untied, tmp_path):
    """PEFT adapts each copy's modules separately (Unsloth trains separate deltas): merged into an untied model,
    the copies differ, and the converter names the first such tensor instead of keeping one of them."""
    from peft import LoraConfig, get_peft_model

    model, _ = untied
    lora = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                      target_modules=r".*(language_model|decoder)\.layers\.\d+\.self_attn\.q_proj")
    merged = get_peft_model(copy.deepcopy(model), lora).merge_and_unload()
    folder = fixtures.save_checkpoint(merged, tmp_path / "merged", tokenizer=False)
    out = tmp_path / "out.dgf"
    result = _cli(str(folder), "--outfile", str(out), "--quiet", "--no-tokenizer")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for name in ("model.encoder.language_model.layers.0.self_attn.q_proj.weight",
                 "model.decoder.layers.0.self_attn.q_proj.weight", "convert-lora-to-dgf and load it unmerged"):
        assert name in result.stderr, result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.dgf.tmp*"))


def test_copies_are_compared_chunk_by_chunk(untied, tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    shutil.copytree(untied[1], folder)

    def nudge(t):
        t["model.encoder.language_model.layers.1.experts.down_proj"][1, 5, 7] += 1e-3
    _rewrite_weights(folder, nudge)
    # Two 32-wide rows per chunk: the difference is found in the chunk that holds it, row 1 * 64 + 5.
    monkeypatch.setattr(SafeTensor, "chunks", partialmethod(SafeTensor.chunks, max_elements=64))
    with pytest.raises(convert_hf.ConversionError, match=r"experts.down_proj differs from .* \(first at row 69\)"):
        convert_hf.convert(folder, tmp_path / "out.dgf", "q8_0", quiet=True)


def test_tied_lm_head_stored_beside_the_embedding_must_equal_it(broken, tmp_path):
    def add_head(t):
        t["lm_head.weight"] = t["model.decoder.embed_tokens.weight"].copy()
    _rewrite_weights(broken, add_head)
    out = tmp_path / "same.dgf"
    assert _cli(str(broken), "--outfile", str(out), "--quiet").returncode == 0
    with GGUFFile(out) as f:
        assert "output.weight" not in f.tensors
    out.unlink()

    def change_head(t):
        t["lm_head.weight"][3, 4] += 1.0
    _rewrite_weights(broken, change_head)
    _assert_refused(broken, tmp_path, "lm_head.weight differs from the embedding model.decoder.embed_tokens.weight "
                    "(first at row 3)")


# -- row widths no block divides: llama.cpp's fallbacks ---------------------------------------------------------

ODD = ["odd48", "odd2600"]


def test_fallbacks_are_noticed_once_per_kind_and_summarized(checkpoints, tmp_path):
    out = tmp_path / "odd.dgf"
    result = _cli(str(checkpoints["odd48"].folder), "--outfile", str(out), "--outtype", "q4_k_m")
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:") and "instead of" in line]
    # Q4_K -> Q5_0 (64/128-wide attn_output: llama-quantize's K-quant fallback), then F16 for 48/80/2600-wide rows
    # whether the recipe said Q4_K or Q6_K.
    assert sorted(notes) == sorted([
        "note: 2 tensor(s) stored as Q5_0 instead of Q4_K: rows of 64, 128 values are not a multiple of Q4_K's "
        "256-value blocks",
        "note: 15 tensor(s) stored as F16 instead of Q4_K: rows of 48, 80, 2600 values are not a multiple of Q4_K's "
        "256-value blocks",
        "note: 4 tensor(s) stored as F16 instead of Q6_K: rows of 48, 80, 2600 values are not a multiple of Q6_K's "
        "256-value blocks"]), result.stderr
    assert "F16 19 tensors" in result.stdout and "Q5_0 2 tensors" in result.stdout, result.stdout
    info = subprocess.run([sys.executable, "-m", "dgrun", "info", str(out)], capture_output=True, text=True)
    for shown in ("outtype      q4_k_m", "F16: 19 tensors", "Q5_0: 2 tensors", "F32: 31 tensors"):  # 30 + rope_freqs
        assert shown in info.stdout, info.stdout
    with dgrun.load(out, backend="numpy") as model:
        assert model.info["outtype"] == "q4_k_m" and model.info["types"]["F16"]["tensors"] == 19
    summary = convert_hf.convert(checkpoints["odd48"].folder, tmp_path / "api.dgf", "q4_k_m", quiet=True)
    assert summary["fallbacks"] == {"Q4_K->Q5_0": 2, "Q4_K->F16": 15, "Q6_K->F16": 4}
    assert summary["type_tensors"] == {"F16": 19, "F32": 30, "Q5_0": 2}
    with pytest.raises(convert_hf.ConversionError, match="cannot store token_embd.weight: its rows of 48 values"):
        convert_hf.convert(checkpoints["odd48"].folder, tmp_path / "strict.dgf", "q8_0", quiet=True, strict=True)


@pytest.mark.parametrize("name", ODD)
@pytest.mark.parametrize("outtype", list(PRESETS))
def test_odd_widths_convert_with_every_preset_and_run(checkpoints, name, outtype):
    """Widths of 48, 80 and 2,600 (hidden, dense MLP, experts; both ways round): each preset's file holds every
    tensor within its stored type's bound, and runs on numpy and on the cpu backend, which agree to the
    tolerance test_cpu_backend.py justifies for whole-model logits (1e-5: float32 summation order only)."""
    counts = _assert_round_trip(checkpoints[name], outtype)
    assert ("F16" in counts) == (outtype not in ("f32", "bf16")), counts  # every quantized preset fell back
    path = checkpoints[name].dgf(outtype)
    with dgrun.load(path, backend="numpy") as ref:
        canvas = np.arange(ref.config.canvas_length) % ref.config.vocab_size
        ref_cache = ref.graph.new_cache()
        ref.graph.encode(np.array([2, 17, 33, 5, 60]), ref_cache)
        ref_logits = ref.graph.decode(canvas, ref_cache, None)
    cpu_backend = pytest.importorskip("dgrun.backends.cpu_backend")
    try:
        cpu_backend.load_library()
    except RuntimeError as e:
        pytest.skip(f"cpu backend unavailable: {e}")
    with dgrun.load(path, backend="cpu") as ours:
        cache = ours.graph.new_cache()
        ours.graph.encode(np.array([2, 17, 33, 5, 60]), cache)
        assert_close(ours.graph.decode(canvas, cache, None), ref_logits, 1e-5, f"{name}/{outtype} cpu logits")
        assert len(ours.generate([2, 17, 33], max_new_tokens=8, max_denoising_steps=3, seed=0).tokens) == 8


def test_refuses_missing_shard_and_truncated_shard(broken, tmp_path):
    index = {"metadata": {}, "weight_map": {k: "model-00001-of-00002.safetensors"
                                            for k in load_file(str(broken / "model.safetensors"))}}
    (broken / "model.safetensors").rename(broken / "model-00001-of-00002.safetensors")
    index["weight_map"]["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    _assert_refused(broken, tmp_path, "names shard model-00002-of-00002.safetensors, which is missing")
    del index["weight_map"]["lm_head.weight"]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    shard = broken / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    _assert_refused(broken, tmp_path, "runs past the end of the file")


def test_tokenizer_is_required_unless_no_tokenizer(broken, tmp_path):
    (broken / "tokenizer.model").unlink()
    _assert_refused(broken, tmp_path, "has no tokenizer.json or tokenizer.model")
    out = tmp_path / "ids-only.dgf"
    assert _cli(str(broken), "--outfile", str(out), "--quiet", "--no-tokenizer").returncode == 0
    with dgrun.load(out, backend="numpy") as model:
        with pytest.raises(ValueError, match="has no tokenizer"):
            model.generate("hello", max_new_tokens=4, max_denoising_steps=1)
        assert len(model.generate([2, 5, 7], max_new_tokens=4, max_denoising_steps=1, seed=0).tokens) == 4


def test_interrupted_conversion_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = convert_hf._quantized_chunks

    def interrupt_midway(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        yield from original(*args, **kwargs)

    monkeypatch.setattr(convert_hf, "_quantized_chunks", interrupt_midway)
    out = tmp_path / "model.dgf"
    with pytest.raises(KeyboardInterrupt):
        convert_hf.convert(checkpoints["base"].folder, out, "q8_0", quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_conversion_memory_stays_bounded_on_a_1gb_checkpoint(tmp_path):
    """A 1.07 GB float32 checkpoint (a 262,144 x 1024 embedding) converts with peak RSS far below its size."""
    folder = tmp_path / "big"
    folder.mkdir()
    hidden, vocab = 1024, 262_144
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=32, global_head_dim=32,
                num_global_key_value_heads=1, sliding_window=8, num_experts=2, top_k_experts=1,
                moe_intermediate_size=32, layer_types=["full_attention"])
    (folder / "config.json").write_text(json.dumps({"model_type": "diffusion_gemma", "text_config": text,
                                                    "canvas_length": 16}))
    cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    shapes = dgrun.model.tensor_shapes(cfg)
    hf_names = {dgf: hf for hf, dgf in _hf_names(cfg).items()}
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 4
        header[hf_names[name]] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    with open(folder / "model.safetensors", "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        row = np.linspace(-1, 1, 1 << 20, dtype=np.float32)  # finite, cheap, written 4 MiB at a time
        for _ in range(offset // row.nbytes):
            f.write(row.tobytes())
        f.write(row[: (offset % row.nbytes) // 4].tobytes())
    assert (folder / "model.safetensors").stat().st_size > 1 << 30
    # The child reports its own VmHWM: ru_maxrss would carry over the forking pytest process's peak across exec.
    script = ("import re, sys; from dgrun.converters.convert_hf import main; rc = main(sys.argv[1:]); "
              "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", script, str(folder), "--outfile", str(tmp_path / "big.dgf"),
                             "--outtype", "bf16", "--quiet", "--no-tokenizer"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    peak_mib = int(result.stdout.strip().splitlines()[-1]) / 1024
    assert peak_mib < 200, f"converter peak RSS {peak_mib:.0f} MiB for a 1 GiB checkpoint"


def _hf_names(cfg: ModelConfig) -> dict[str, str]:
    """HF name → dgf name for every tensor of a config (decoder prefix; encoder only for its layer_scalar)."""
    from dgrun.converters.names import GLOBAL_TENSORS, LAYER_TENSORS

    out = {hf: dgf for hf, dgf in GLOBAL_TENSORS.items() if hf.startswith("model.decoder.")}
    for i in range(cfg.num_hidden_layers):
        for suffix, dgf in LAYER_TENSORS.items():
            out[f"model.decoder.layers.{i}.{suffix}"] = f"blk.{i}.{dgf}"
        out[f"model.decoder.layers.{i}.layer_scalar"] = f"blk.{i}.layer_output_scale.weight"
        out[f"model.encoder.language_model.layers.{i}.layer_scalar"] = f"blk.{i}.enc_layer_output_scale.weight"
    shapes = dgrun.model.tensor_shapes(cfg)
    return {hf: dgf for hf, dgf in out.items() if dgf in shapes}
