"""LoRA adapters: made with the real `peft` library on transformers' class, converted by convert-lora-to-dgf, run by
dgrun unmerged, against transformers + peft.

Tolerances (relative L2, float32 base and adapter):
- numpy against transformers + peft: test_reference's bounds (K/V 2e-6, logits 2e-5). An adapter term is two more
  float32 matmuls per linear, the same kind of rounding as the base's; measured K/V <= 4e-7, logits <= 7e-6.
- Generation with transformers' draws replayed: token-exact, at scales 1 and 0.5, two adapters at once, encoder-only
  and decoder-only adapters (the damped `gen` fixture, as test_reference).
- Other backends against numpy, with adapters, each at its own file's model bound: cpu 1e-5, mlx 2e-5, the cuda host
  stand-in 1e-6 (test_cpu_backend.py, test_mlx.py, test_cuda.py say why).
- Merged at load against unmerged: 1e-5 (W + s·BA rounded once into float32 against two float32 terms per
  product; measured ~1e-6).
- A q8_0 base with an f32 adapter against the f32 base with it: bounded by the q8_0 base's own error on this fixture
  (the adapter adds no quantization error of its own); a q8_0 adapter adds its own, small next to the base's.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import assert_close
from fixtures import hf_generate
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from test_cuda import fake  # noqa: F401  (the cuda backend on its host stand-in)
from test_reference import GENERATION_CASES, compare_with_transformers, replay

import dgrun
from dgrun.backends import available_backends
from dgrun.cli import main as dgrun_main
from dgrun.config import ARCH
from dgrun.converters.convert_lora import convert_lora
from dgrun.converters.convert_lora import main as convert_main
from dgrun.format import FormatError, GGUFFile

TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NO_VISION = r".*vision.*"  # the vision tower's linears are not plain nn.Linear: PEFT cannot wrap them
LAYER = r"layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
SPECS: dict[str, dict[str, Any]] = {
    # Unsloth's recipe, scaled down: every text projection of both copies and the self-conditioning MLP.
    "full": dict(target_modules=TEXT_TARGETS, exclude_modules=NO_VISION, r=8, lora_alpha=16),
    "encoder": dict(target_modules=rf"model\.encoder\.language_model\.{LAYER}", r=8, lora_alpha=16),
    "decoder": dict(target_modules=rf"model\.decoder\.({LAYER}|self_conditioning\.(gate|up|down)_proj)", r=8,
                    lora_alpha=16),
    # rsLoRA: scale alpha / sqrt(r) = 2, stored as alpha 32 so that llama.cpp's alpha / r gives it too.
    "rslora": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], exclude_modules=NO_VISION, r=16,
                   lora_alpha=8, use_rslora=True),
    # Per-module rank and alpha: o_proj's alpha differs from the file's, so its lora_b carries the ratio.
    "pattern": dict(target_modules=["o_proj", "gate_proj", "up_proj", "down_proj"], exclude_modules=NO_VISION, r=4,
                    lora_alpha=6, rank_pattern={"down_proj": 8}, alpha_pattern={"o_proj": 3}),
    # With the vision tower's inner linears too: their deltas are skipped.
    "vision": dict(target_modules=r".*vision_tower.*\.linear|.*language_model\.layers\.0\.self_attn\.q_proj", r=4,
                   lora_alpha=4),
}
PROMPT = [2, 17, 33, 5, 60]


def randomize(model: Any, seed: int) -> None:
    """Random LoRA halves (PEFT starts B at zero): big enough to change every generation, with the
    self-conditioning deltas damped like the `gen` fixture's MLP so the sampler's feedback loop stays tame."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.02 if "self_conditioning" in name else 0.1, generator=generator)


@pytest.fixture(scope="module")
def adapters(checkpoints, tmp_path_factory):
    """adapters(fixture, spec) → the saved PEFT folder; adapters.dgf(fixture, spec, outtype) → its conversion."""

    class Adapters:
        folders: dict[tuple[str, str], Path] = {}
        files: dict[tuple[str, str, str], Path] = {}

        def __call__(self, fixture: str, spec: str) -> Path:
            if (fixture, spec) not in self.folders:
                folder = tmp_path_factory.mktemp(f"lora-{fixture}-{spec}")
                model = get_peft_model(copy.deepcopy(checkpoints[fixture].model), LoraConfig(**SPECS[spec]))
                randomize(model, seed=len(self.folders))
                model.save_pretrained(folder)
                self.folders[fixture, spec] = folder
            return self.folders[fixture, spec]

        def dgf(self, fixture: str, spec: str, outtype: str = "f32") -> Path:
            key = (fixture, spec, outtype)
            if key not in self.files:
                folder = self(fixture, spec)
                out = folder.parent / f"{folder.name}-{outtype}.dgf"
                convert_lora(folder, checkpoints[fixture].folder, out, outtype, quiet=True)
                self.files[key] = out
            return self.files[key]

    return Adapters()


def peft_model(checkpoints, adapters, fixture: str, specs: list[tuple[str, float]]) -> Any:
    """transformers' model of `fixture` with the saved PEFT adapters active at their scales (PEFT's own loading)."""
    names = [f"ad{i}" for i in range(len(specs))]
    model = PeftModel.from_pretrained(copy.deepcopy(checkpoints[fixture].model), adapters(fixture, specs[0][0]),
                                      adapter_name=names[0])
    for name, (spec, _) in zip(names[1:], specs[1:], strict=True):
        model.load_adapter(adapters(fixture, spec), adapter_name=name)
    model.base_model.set_adapter(names)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, (_, scale) in zip(names, specs, strict=True):
                module.set_scale(name, scale)
    return model.get_base_model().eval()


@pytest.fixture(scope="module")
def hf_runs(checkpoints, adapters):
    """hf_runs(specs) → transformers + peft's (tokens, draws) on the `gen` fixture for the fixed-steps case, once."""
    runs: dict[tuple[tuple[str, float], ...], tuple[list[int], list[Any]]] = {}

    def run(specs: list[tuple[str, float]]) -> tuple[list[int], list[Any]]:
        key = tuple(specs)
        if key not in runs:
            model = peft_model(checkpoints, adapters, "gen", specs)
            runs[key] = hf_generate(model, PROMPT, **GENERATION_CASES["fixed_steps"])
        return runs[key]

    return run


def dgrun_lora(adapters, fixture: str, specs: list[tuple[str, float]], outtype: str = "f32") -> list[Any]:
    return [(adapters.dgf(fixture, spec, outtype), scale) for spec, scale in specs]


# -- against transformers + peft --------------------------------------------------------------------------------


@pytest.mark.parametrize("specs", [[("full", 1.0)], [("rslora", 1.0)], [("pattern", 1.0)],
                                   [("full", 0.5), ("rslora", 1.5)]], ids=["full", "rslora", "pattern", "two"])
def test_encoder_kv_and_decoder_logits_match_transformers_with_peft(checkpoints, adapters, specs):
    model = peft_model(checkpoints, adapters, "base", specs)
    with dgrun.load(checkpoints["base"].dgf("f32"), backend="numpy", lora=dgrun_lora(adapters, "base", specs)) as ours:
        compare_with_transformers(model, ours, 21, f"LoRA {specs}")


@pytest.mark.parametrize("specs", [[("full", 1.0)], [("full", 0.5)], [("full", 1.0), ("rslora", 0.5)],
                                   [("encoder", 1.0)], [("decoder", 1.0)]],
                         ids=["scale1", "scale0.5", "two-adapters", "encoder-only", "decoder-only"])
def test_generation_is_token_exact_with_transformers_and_peft(checkpoints, adapters, hf_runs, specs):
    ckpt, params = checkpoints["gen"], GENERATION_CASES["fixed_steps"]
    hf_tokens, draws = hf_runs(specs)
    assert replay(ckpt, PROMPT, params, draws, lora=dgrun_lora(adapters, "gen", specs)).tokens == hf_tokens
    # The same draws without the adapters: they must change the generation, or this test proves nothing.
    assert replay(ckpt, PROMPT, params, draws).tokens != hf_tokens


def test_each_pass_applies_only_its_own_deltas(checkpoints, adapters):
    """The encoder-only adapter changes the cache and nothing the decoder does with it; the decoder-only one the
    reverse. Bit for bit: a pass without deltas runs exactly the base's arithmetic."""
    ckpt = checkpoints["base"]
    rng = np.random.default_rng(0)
    prompt, canvas = rng.integers(0, 128, 21), rng.integers(0, 128, 16)
    self_cond = rng.normal(0, 3, (16, 128)).astype(np.float32)
    with contextlib.ExitStack() as stack:
        runs = {}
        for spec in (None, "encoder", "decoder"):
            lora = None if spec is None else [adapters.dgf("base", spec)]
            model = stack.enter_context(dgrun.load(ckpt.dgf("f32"), backend="numpy", lora=lora))
            cache = model.graph.new_cache()
            model.graph.encode(prompt, cache)
            runs[spec] = (cache, model.graph)
        (base_cache, base), (enc_cache, enc), (dec_cache, dec) = runs[None], runs["encoder"], runs["decoder"]
        assert not np.array_equal(enc_cache.keys[0], base_cache.keys[0])
        for ours, ref in zip(dec_cache.keys + dec_cache.values, base_cache.keys + base_cache.values, strict=True):
            assert np.array_equal(ours, ref)
        for sc in (None, self_cond):
            assert np.array_equal(enc.decode(canvas, base_cache, sc), base.decode(canvas, base_cache, sc))
            assert not np.allclose(dec.decode(canvas, base_cache, sc), base.decode(canvas, base_cache, sc))


# -- backends, quantized bases, merging -------------------------------------------------------------------------


def _logits_and_kv(path: Path, backend: str, lora: list[Any], **kwargs: Any) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(3)
    with dgrun.load(path, backend=backend, lora=lora, **kwargs) as model:
        ops, cfg = model.backend, model.config
        prompt, canvas = rng.integers(0, cfg.vocab_size, 21), rng.integers(0, cfg.vocab_size, cfg.canvas_length)
        self_cond = rng.normal(0, 3, (cfg.canvas_length, cfg.vocab_size)).astype(np.float32)
        cache = model.graph.new_cache()
        model.graph.encode(prompt, cache)
        logits = model.graph.decode(canvas, cache, ops.asarray(self_cond))
        kv = [ops.to_numpy(x) for x in cache.keys + cache.values]
        return kv, ops.to_numpy(logits)


@pytest.mark.parametrize("backend,rtol", [("cpu", 1e-5), ("mlx", 2e-5), ("cuda", 1e-5)])
def test_backends_match_numpy_with_adapters(checkpoints, adapters, request, backend, rtol):
    if backend == "cuda":
        request.getfixturevalue("fake")
    elif backend not in available_backends():
        pytest.skip(f"backend {backend} is not available here")
    # Ranks 8 and 16: the cuda backend pads both to its 32-value slices. One adapter quantized.
    lora = [(adapters.dgf("base", "full"), 1.0), (adapters.dgf("base", "rslora", "q8_0"), 0.5)]
    path = checkpoints["base"].dgf("f32")
    ref_kv, ref_logits = _logits_and_kv(path, "numpy", lora)
    kv, logits = _logits_and_kv(path, backend, lora)
    for i, (ours, ref) in enumerate(zip(kv, ref_kv, strict=True)):
        assert_close(ours, ref, rtol, f"{backend} cache tensor {i}")
    assert_close(logits, ref_logits, rtol, f"{backend} logits")


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_generation_is_token_exact_on_other_backends(checkpoints, adapters, hf_runs, request, backend):
    if backend == "cuda":
        request.getfixturevalue("fake")
    elif backend not in available_backends():
        pytest.skip(f"backend {backend} is not available here")
    specs = [("full", 1.0), ("rslora", 0.5)]
    hf_tokens, draws = hf_runs(specs)
    out = replay(checkpoints["gen"], PROMPT, GENERATION_CASES["fixed_steps"], draws, backend,
                 lora=dgrun_lora(adapters, "gen", specs))
    assert out.tokens == hf_tokens


def test_quantized_base_runs_the_adapter_unmerged(checkpoints, adapters):
    """q8_0 base + f32 adapter against the f32 base + adapter: no worse than the q8_0 base alone against the f32 base
    (measured 0.128 vs 0.125 relative L2 on this random fixture; bound 1.5x). A q8_0 adapter (lora_a Q8_0, lora_b
    F16: its rows of 8 are not Q8_0 blocks) stays within 1.5x of it too (measured ~0.13)."""
    ckpt = checkpoints["base"]
    lora = [adapters.dgf("base", "full")]
    _, f32_base = _logits_and_kv(ckpt.dgf("f32"), "numpy", [])
    _, q8_base = _logits_and_kv(ckpt.dgf("q8_0"), "numpy", [])
    _, f32 = _logits_and_kv(ckpt.dgf("f32"), "numpy", lora)
    _, q8 = _logits_and_kv(ckpt.dgf("q8_0"), "numpy", lora)
    _, q8_q8 = _logits_and_kv(ckpt.dgf("q8_0"), "numpy", [adapters.dgf("base", "full", "q8_0")])
    base_error = np.linalg.norm(q8_base - f32_base) / np.linalg.norm(f32_base)
    assert_close(q8, f32, 1.5 * base_error, "q8_0 base + f32 adapter")
    assert_close(q8_q8, f32, 1.5 * base_error, "q8_0 base + q8_0 adapter")
    with GGUFFile(adapters.dgf("base", "full", "q8_0")) as f:
        types = {name.rsplit(".", 1)[1]: info.ggml_type for name, info in f.tensors.items()}
    assert types == {"lora_a": T.Q8_0, "lora_b": T.F16}


@pytest.mark.parametrize("int8", ["auto", "generic"])
def test_cpu_integer_arithmetic_runs_the_adapters(checkpoints, adapters, monkeypatch, int8):
    """The cpu backend's int8 matmuls (on for quantized bases) with adapters: the base's Q5_0/Q4_K weights and a
    Q8_0 lora_a where the kernel set has Q8_0 codes (generic; AVX2 has none) take the integer path, float halves
    the float one. The adapters add no error of their own: the logits sit as far from numpy's as the base's alone
    do under int8 (bound 1.5x; measured 0.24 for the base alone, 0.16 (avx2) and 0.25 (generic) with adapters:
    this random fixture amplifies the activations' rounding)."""
    if "cpu" not in available_backends():
        pytest.skip("backend cpu is not available here")
    path = checkpoints["base"].dgf("q4_k_m")
    lora = [(adapters.dgf("base", "full"), 1.0), (adapters.dgf("base", "full", "q8_0"), 0.5)]
    _, base_ref = _logits_and_kv(path, "numpy", [])
    _, lora_ref = _logits_and_kv(path, "numpy", lora)
    monkeypatch.setenv("DGRUN_CPU_INT8", int8)
    _, base_int8 = _logits_and_kv(path, "cpu", [])
    _, lora_int8 = _logits_and_kv(path, "cpu", lora)
    base_error = np.linalg.norm(base_int8 - base_ref) / np.linalg.norm(base_ref)
    assert base_error > 1e-5, "the int8 path did not run"
    assert_close(lora_int8, lora_ref, 1.5 * base_error, f"q4_k_m base + adapters, int8 {int8}")


def test_merging_at_load_matches_unmerged(checkpoints, adapters):
    ckpt = checkpoints["base"]
    lora = [(adapters.dgf("base", "full"), 1.0), (adapters.dgf("base", "rslora"), 0.5)]
    kv, logits = _logits_and_kv(ckpt.dgf("f32"), "numpy", lora)
    merged_kv, merged_logits = _logits_and_kv(ckpt.dgf("f32"), "numpy", lora, merge_lora=True)
    assert_close(merged_logits, logits, 1e-5, "merged logits")
    for i, (ours, ref) in enumerate(zip(merged_kv, kv, strict=True)):
        assert_close(ours, ref, 1e-5, f"merged cache tensor {i}")
    with dgrun.load(ckpt.dgf("f32"), backend="numpy", lora=lora, merge_lora=True) as model:
        assert model.lora_adapters()[0]["merged"]
        with pytest.raises(ValueError, match="merged"):
            model.set_lora_adapters([{"id": 0, "scale": 0.5}])
    with pytest.raises(ValueError, match="float base.*Q8_0"):
        dgrun.load(ckpt.dgf("q8_0"), backend="numpy", lora=lora, merge_lora=True)


def test_scales_are_set_as_llama_cpp_server_sets_them(checkpoints, adapters):
    ckpt = checkpoints["base"]
    full, rslora = adapters.dgf("base", "full"), adapters.dgf("base", "rslora")
    _, base = _logits_and_kv(ckpt.dgf("f32"), "numpy", [])
    _, half = _logits_and_kv(ckpt.dgf("f32"), "numpy", [(rslora, 0.5)])
    with dgrun.load(ckpt.dgf("f32"), backend="numpy", lora=[full, rslora]) as model:
        listed = model.lora_adapters()
        assert [(a["id"], a["path"], a["scale"]) for a in listed] == [(0, str(full), 1.0), (1, str(rslora), 1.0)]
        assert listed[1]["alpha"] == 32.0 and listed[1]["ranks"] == [16]
        assert model.info["lora"] == listed
        model.set_lora_adapters([{"id": 1, "scale": 0.5}])  # adapter 0, left out, is disabled
        assert [a["scale"] for a in model.lora_adapters()] == [0.0, 0.5]
        stream = model.stream(PROMPT, max_new_tokens=16, max_denoising_steps=2, seed=0)
        next(stream)
        with pytest.raises(dgrun.ModelBusyError):
            model.set_lora_adapters([])
        stream.close()
        for entries in ([{"id": 2, "scale": 1.0}], [{"id": 0, "scale": "x"}], [{"scale": 1.0}]):
            with pytest.raises(ValueError, match="id|scale"):
                model.set_lora_adapters(entries)
    _, reloaded = _logits_and_kv(ckpt.dgf("f32"), "numpy", [(full, 0.0), (rslora, 0.5)])
    assert np.array_equal(reloaded, half)  # a zero scale drops the adapter's terms: exactly the other one's logits
    _, zero = _logits_and_kv(ckpt.dgf("f32"), "numpy", [(full, 0.0)])
    assert np.array_equal(zero, base)


# -- the converter ---------------------------------------------------------------------------------------------


def test_adapter_file_follows_llama_cpp_convention(adapters):
    path = adapters.dgf("base", "full")
    reader = GGUFReader(path)  # gguf-py, as llama.cpp's tools read it
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == ARCH and fields["adapter.lora.alpha"] == 16.0
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}  # ggml order: [in, r] / [r, out]
    assert shapes["blk.0.attn_q.weight.lora_a"] == (64, 8) and shapes["blk.0.attn_q.weight.lora_b"] == (8, 64)
    assert shapes["enc.blk.3.attn_o.weight.lora_a"] == (128, 8)  # gguf-py's encoder output projection name
    assert shapes["enc.blk.1.ffn_down.weight.lora_a"] == (96, 8)
    assert shapes["self_cond_gate.weight.lora_b"] == (8, 96)
    assert "blk.2.attn_v.weight.lora_a" not in shapes  # full layers use K as V: no v_proj to adapt
    # Per copy 2 sliding layers x 7 projections + 2 full layers x 6 (no v_proj); 2 copies, 3 self-conditioning.
    assert len(shapes) == 2 * (2 * (2 * 7 + 2 * 6) + 3)


def test_rslora_scale_is_stored_so_every_reader_gets_it(adapters):
    """PEFT's rsLoRA scale is alpha / sqrt(r); llama.cpp divides the stored alpha by r: alpha_file / r must be it."""
    with GGUFFile(adapters.dgf("base", "rslora")) as f:
        rank = f.tensors["blk.0.attn_q.weight.lora_b"].shape[-1]
        assert rank == 16
        assert math.isclose(f.get("adapter.lora.alpha") / rank, 8 / math.sqrt(16), rel_tol=1e-7)
        assert f.get("dgrun.lora.use_rslora") is True and f.get("dgrun.lora.peft_alpha") == 8.0


def test_per_module_alpha_is_carried_by_lora_b(adapters):
    folder = adapters("base", "pattern")
    from safetensors.numpy import load_file

    peft = load_file(folder / "adapter_model.safetensors")
    key = "base_model.model.model.decoder.layers.0.{}.lora_B.weight"
    with GGUFFile(adapters.dgf("base", "pattern")) as f:
        assert f.get("adapter.lora.alpha") == 6.0  # the common alpha; o_proj's 3 is the exception
        assert f.tensors["blk.0.ffn_down.weight.lora_b"].shape == (64, 8)  # rank_pattern: r 8 instead of 4
        np.testing.assert_array_equal(f.array("blk.0.ffn_up.weight.lora_b"), peft[key.format("mlp.up_proj")])
        np.testing.assert_allclose(f.array("blk.0.attn_output.weight.lora_b"), peft[key.format("self_attn.o_proj")] / 2,
                                   rtol=1e-7)


def test_vision_deltas_are_skipped_with_a_notice(adapters, checkpoints, tmp_path, capsys):
    out = tmp_path / "v.dgf"
    summary = convert_lora(adapters("base", "vision"), checkpoints["base"].folder, out)
    assert "skipping 14 vision-tower tensors" in capsys.readouterr().err
    assert summary["skipped_vision"] == 14 and summary["deltas"] == {"encoder": 1}
    with GGUFFile(out) as f:
        assert sorted(f.tensors) == ["enc.blk.0.attn_q.weight.lora_a", "enc.blk.0.attn_q.weight.lora_b"]


def _write_config(folder: Path, **changes: Any) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))


def _refusal_cases(checkpoints, adapters, tmp: Path) -> dict[str, tuple[Path, Path, str]]:
    """name → (adapter folder, base, a piece of the one-line error)."""
    base = checkpoints["base"].folder

    def saved(name: str, config: LoraConfig, **save: Any) -> Path:
        model = get_peft_model(copy.deepcopy(checkpoints["base"].model), config)
        model.save_pretrained(tmp / name, **save)
        return tmp / name

    one_q = r"model\.decoder\.layers\.0\.self_attn\.q_proj"
    other_arch = tmp / "llama"
    other_arch.mkdir()
    (other_arch / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    other_shape = tmp / "wider"
    other_shape.mkdir()
    config = json.loads((base / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 128
    (other_shape / "config.json").write_text(json.dumps(config))
    return {
        "dora": (saved("dora", LoraConfig(r=4, target_modules=one_q, use_dora=True)), base, "DoRA"),
        "pickle": (saved("bin", LoraConfig(r=4, target_modules=one_q), safe_serialization=False), base,
                   "refusing pickle adapter adapter_model.bin"),
        "unknown target": (saved("router", LoraConfig(r=4, target_modules=["router.proj"])), base,
                           "layers.0.router.proj, which dgrun cannot adapt"),
        "experts": (saved("experts", LoraConfig(r=4, target_modules=[], target_parameters=["experts.gate_up_proj"])),
                    base, "expert deltas"),
        "other architecture": (adapters("base", "full"), other_arch, "model_type"),
        "other shape": (adapters("base", "full"), other_shape, "do not fit the base"),
        "adapter as base": (adapters("base", "full"), adapters.dgf("base", "full"), "itself an adapter"),
        "other architecture's file": (adapters("base", "full"), _gguf(tmp / "llama.gguf", {}, "llama", None),
                                      "is a 'llama' model"),
        "not lora": (saved("ia3", LoraConfig(r=4, target_modules=one_q)), base, "not LoRA"),
    }


def test_refusals_are_one_line_with_exit_status_2(checkpoints, adapters, tmp_path, capsys):
    cases = _refusal_cases(checkpoints, adapters, tmp_path)
    _write_config(cases["not lora"][0], peft_type="IA3")
    for name, (folder, base, message) in cases.items():
        out = tmp_path / f"{name}.dgf"
        assert convert_main([str(folder), "--base", str(base), "-o", str(out)]) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith("convert-lora-to-dgf: error: ") and "\n" not in err and message in err, (name, err)
        assert not out.exists() and not list(tmp_path.glob(f".{name}*")), name


# -- the runtime's checks on adapter files ----------------------------------------------------------------------


def _gguf(path: Path, tensors: dict[str, np.ndarray], arch: str = ARCH, kind: str | None = "adapter") -> Path:
    """A small GGUF file written with gguf-py: an adapter's keys (unless `kind` is None) and float32 tensors."""
    writer = GGUFWriter(path, arch)
    if kind is not None:
        writer.add_type(kind)
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", 8.0)
    for name, array in tensors.items():
        writer.add_tensor(name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("case", ["model file", "other architecture", "3-D expert delta", "unknown target",
                                  "half pair", "shape"])
def test_runtime_refuses_bad_adapter_files(checkpoints, tmp_path, case):
    a, b = np.zeros((4, 64), np.float32), np.zeros((64, 4), np.float32)
    files = {
        "model file": (checkpoints["base"].dgf("f32"), "not a LoRA adapter"),
        "other architecture": (_gguf(tmp_path / "l.dgf", {"blk.0.attn_q.weight.lora_a": a}, arch="llama"),
                               "for architecture 'llama'"),
        "3-D expert delta": (_gguf(tmp_path / "e.dgf", {"blk.0.ffn_gate_up_exps.weight.lora_a": np.zeros(
            (4, 4, 64), np.float32), "blk.0.ffn_gate_up_exps.weight.lora_b": np.zeros((4, 64, 4), np.float32)}),
            "expert deltas"),
        "unknown target": (_gguf(tmp_path / "u.dgf", {"blk.0.ffn_gate_inp.weight.lora_a": a,
                                                               "blk.0.ffn_gate_inp.weight.lora_b": b[:4]}),
                           "not a linear"),
        "half pair": (_gguf(tmp_path / "h.dgf", {"enc.blk.0.attn_q.weight.lora_a": a}), "lora_b is missing"),
        "shape": (_gguf(tmp_path / "s.dgf", {"enc.blk.0.attn_k.weight.lora_a": a,
                                                     "enc.blk.0.attn_k.weight.lora_b": b}), "do not fit"),
    }
    path, message = files[case]
    with pytest.raises(FormatError, match=message):
        dgrun.load(checkpoints["base"].dgf("f32"), backend="numpy", lora=[path])


# -- command line ----------------------------------------------------------------------------------------------


def test_cli_lora_flags_match_the_api(checkpoints, adapters, capsys):
    path, full, rslora = checkpoints["gen"].dgf("f32"), adapters.dgf("gen", "full"), adapters.dgf("gen", "rslora")
    with dgrun.load(path, backend="numpy", lora=[full, (rslora, 0.5)]) as model:
        expected = model.generate(PROMPT, max_new_tokens=16, max_denoising_steps=4, seed=1).tokens
    argv = ["-m", str(path), "--backend", "numpy", "--token-ids", "-p", " ".join(map(str, PROMPT)), "-n", "16",
            "--steps", "4", "--seed", "1", "--json", "--lora", str(full), "--lora-scaled", str(rslora), "0.5"]
    assert dgrun_main(argv) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == expected
    for bad, message in ((["--lora-scaled", str(full), "half"], "SCALE must be a number"),
                         (["--lora", str(full) + ".missing"], "cannot open"),
                         (["--lora-merge"], "--lora-merge needs --lora")):
        with contextlib.suppress(SystemExit):  # argparse's own errors exit 2 from inside the parser
            assert dgrun_main(["-m", str(path), "--backend", "numpy", "-p", "x", *bad]) == 2
        assert message in capsys.readouterr().err


def test_info_describes_adapter_files(adapters, capsys):
    path = adapters.dgf("base", "rslora")
    assert dgrun_main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "adapter      lora, rank 16, alpha 32 (rsLoRA: PEFT alpha 8 x sqrt(r))" in text
    assert "deltas       14 decoder, 14 encoder, 0 self-conditioning" in text
    assert dgrun_main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["adapter"]
    assert info["deltas"] == {"decoder": 14, "encoder": 14, "self_conditioning": 0} and info["ranks"] == [16]
