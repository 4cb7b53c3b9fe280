"""GPU benchmark: dgrun's cuda backend against transformers (bf16) and against the hardware's floor.

    python tools/bench_gpu.py /tmp/dg-q4_k_m.dgf                      # make one with tools/make_random_dgf.py
    python tools/bench_gpu.py MODEL.dgf --prompt 4096 --new 512 --steps 16 --json bench.json

Measured for each engine, after a warm-up (one canvas encoded and decoded: kernels load lazily on first launch):
one decoder step (decoder pass + sampler step on a full canvas, after the prompt), one encoder pass over a
committed canvas, the prompt's encoder pass, and end-to-end tokens per second with a fixed number of denoising
steps (adaptive stopping off). transformers runs first, in a subprocess that exits before dgrun starts (so the two
never share GPU memory), on a randomly initialised bf16 model of the same config, when it fits in memory.

The floor of a pass is max(bytes it must read / measured device-to-device copy bandwidth, its FLOPs /
measured bf16 matmul rate); the ratio measured / floor says how far from the hardware a pass runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import dgrun
from dgrun.config import ModelConfig
from dgrun.format import GGUFFile

CANVAS_TENSORS = ("self_cond_",)  # read by the decoder only


# -- the hardware ------------------------------------------------------------------------------------------


def copy_bandwidth(backend: Any) -> float:
    """Device-to-device copy rate in bytes/s (read + write counted), through the backend's own copies."""
    from dgrun.backends.cuda_backend import DeviceArray

    nbytes = 1 << 30
    src = DeviceArray.empty((nbytes // 4,))
    dst = DeviceArray.empty((nbytes // 4,))
    n = backend.native
    def copy() -> None:
        n.call("dg_copy", n.ptr("void *", dst.address), n.ptr("void *", src.address), nbytes)

    copy()
    n.call("dg_synchronize")
    seconds = _timed(copy, lambda: n.call("dg_synchronize"), repeats=10)
    return 2 * nbytes / seconds


def bf16_matmul_rate() -> float | None:
    """Dense bf16 matmul FLOP/s measured with torch (8192^3), or None without a CUDA build of torch."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    a @ b
    seconds = _timed(lambda: a @ b, torch.cuda.synchronize, repeats=20)
    return 2 * 8192**3 / seconds


def _timed(fn: Callable[[], Any], sync: Callable[[], Any], repeats: int) -> float:
    """Mean seconds per call of `fn` over `repeats` calls, synchronised at both ends."""
    sync()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - started) / repeats


# -- what a pass must do -----------------------------------------------------------------------------------


def pass_flops(cfg: ModelConfig, tokens: int, cached: int, decoder: bool) -> float:
    """Multiply-add FLOPs (x2) of one pass over `tokens` new positions after `cached` encoded ones."""
    h, flops = cfg.hidden_size, 0.0
    for i in range(cfg.num_hidden_layers):
        d, kv, heads = cfg.layer_head_dim(i), cfg.layer_kv_heads(i), cfg.num_attention_heads
        projections = heads * d * 2 + kv * d * (2 if cfg.is_sliding(i) else 1)  # q, o, k (and v)
        mlp = 3 * cfg.intermediate_size + 3 * cfg.moe_intermediate_size * cfg.top_k_experts + cfg.num_experts
        flops += 2 * tokens * h * (projections + mlp)
        keys = cached + (tokens if decoder else tokens / 2)  # the encoder's causal mask halves the new keys
        if cfg.is_sliding(i):
            keys = min(keys, cfg.sliding_window)
        flops += 2 * 2 * tokens * keys * heads * d
    if decoder:  # logits, the self-conditioning soft embedding, and its MLP
        flops += 2 * 2 * tokens * cfg.vocab_size * h + 2 * tokens * h * 3 * cfg.intermediate_size
    return flops


def pass_bytes(path: Path, decoder: bool) -> int:
    """Weight bytes one pass reads: every matrix once (all experts: a full canvas routes to nearly all of
    them); the decoder reads the embedding table twice (soft embedding and logits), the encoder only rows."""
    total = 0
    with GGUFFile(path) as f:
        for name, info in f.tensors.items():
            if name == "token_embd.weight":
                total += 2 * info.nbytes if decoder else 0
            elif decoder or not name.startswith(CANVAS_TENSORS):
                total += info.nbytes
    return total


# -- dgrun -------------------------------------------------------------------------------------------------


def bench_dgrun(path: Path, backend_name: str, prompt_len: int, new_tokens: int,
                steps: int) -> dict[str, Any]:
    from dgrun.rng import DefaultRng
    from dgrun.sampler import temperature

    out: dict[str, Any] = {"engine": f"dgrun-{backend_name}"}
    started = time.perf_counter()
    model = dgrun.load(path, backend=backend_name)
    out["load_s"] = time.perf_counter() - started
    graph, ops, cfg = model.graph, model.backend, model.config
    native = getattr(ops, "native", None)

    def sync() -> None:
        if native is not None:
            native.call("dg_synchronize")

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab_size, prompt_len)
    # Warm-up: CUDA loads each kernel on its first launch (lazy loading), and the pool grows to its working size.
    warm = graph.new_cache()
    graph.encode(prompt[:cfg.canvas_length], warm)
    graph.decode(prompt[:cfg.canvas_length], warm, None)
    del warm
    sync()
    cache = graph.new_cache()
    out["prompt_ms"] = 1e3 * _timed(lambda: graph.encode(prompt, cache), sync, repeats=1)
    chunk = rng.integers(0, cfg.vocab_size, cfg.canvas_length)
    out["encoder_canvas_ms"] = 1e3 * _timed(lambda: graph.encode(chunk, cache.copy()), sync, repeats=3)

    canvas, self_cond, sampler_rng = rng.integers(0, cfg.vocab_size, cfg.canvas_length), None, DefaultRng(0)
    state = {"canvas": canvas, "self_cond": self_cond}

    def decoder_step() -> None:
        logits = graph.decode(state["canvas"], cache, state["self_cond"])
        result = ops.denoise_step(logits, state["canvas"], temperature(8, 16, 0.4, 0.8), 0.1, sampler_rng)
        state["canvas"], state["self_cond"] = result.canvas, result.processed_logits

    decoder_step()  # warm-up (and the first, self-conditioning-free step)
    out["decoder_step_ms"] = 1e3 * _timed(decoder_step, sync, repeats=5)

    started = time.perf_counter()
    result = model.generate(prompt.tolist(), max_new_tokens=new_tokens, max_denoising_steps=steps,
                            adaptive_stopping=False, seed=0)
    seconds = time.perf_counter() - started
    out.update(generate_s=seconds, new_tokens=len(result.tokens), tokens_per_s=len(result.tokens) / seconds,
               decoder_passes=result.stats["decoder_passes"])
    model.close()
    return out


# -- transformers ------------------------------------------------------------------------------------------


def hf_text_config(cfg: ModelConfig) -> dict[str, Any]:
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        global_head_dim=cfg.global_head_dim, num_global_key_value_heads=cfg.num_global_key_value_heads,
        sliding_window=cfg.sliding_window,
        num_experts=cfg.num_experts, top_k_experts=cfg.top_k_experts,
        moe_intermediate_size=cfg.moe_intermediate_size, layer_types=list(cfg.layer_types),
        final_logit_softcapping=cfg.final_logit_softcapping, eos_token_id=1, bos_token_id=2, pad_token_id=0,
    )


def bench_transformers(cfg: ModelConfig, device: str, prompt_len: int, new_tokens: int,
                       steps: int) -> dict[str, Any]:
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, DynamicCache

    out: dict[str, Any] = {"engine": "transformers-bf16"}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    config = DiffusionGemmaConfig(
        text_config=hf_text_config(cfg), canvas_length=cfg.canvas_length,
        vision_config=dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=16,
                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=8))
    started = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = DiffusionGemmaForBlockDiffusion(config).eval()
    out["load_s"] = time.perf_counter() - started
    rng = np.random.default_rng(0)
    prompt = torch.tensor([rng.integers(0, cfg.vocab_size, prompt_len)], device=device)
    chunk = torch.tensor([rng.integers(0, cfg.vocab_size, cfg.canvas_length)], device=device)
    canvas = torch.tensor([rng.integers(0, cfg.vocab_size, cfg.canvas_length)], device=device)
    with torch.no_grad():
        warm = DynamicCache(config=model.config.get_text_config(decoder=True))  # as dgrun's warm-up
        model.model.encoder(input_ids=chunk, past_key_values=warm)
        model(decoder_input_ids=canvas, past_key_values=warm)
        del warm
        sync()
        cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        out["prompt_ms"] = 1e3 * _timed(
            lambda: model.model.encoder(input_ids=prompt, past_key_values=cache), sync, repeats=1)
        out["decoder_step_ms"] = 1e3 * _timed(
            lambda: model(decoder_input_ids=canvas, past_key_values=cache), sync, repeats=5)
        out["encoder_canvas_ms"] = 1e3 * _timed(
            lambda: model.model.encoder(input_ids=chunk, past_key_values=cache), sync, repeats=1)
        started = time.perf_counter()
        result = model.generate(input_ids=prompt, max_new_tokens=new_tokens, max_denoising_steps=steps,
                                stability_threshold=None, confidence_threshold=None, eos_token_id=None,
                                pad_token_id=0)
        sync()
        seconds = time.perf_counter() - started
    produced = result.sequences.shape[1] - prompt_len
    out.update(generate_s=seconds, new_tokens=produced, tokens_per_s=produced / seconds)
    return out


def bench_transformers_subprocess(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """transformers in its own process: GPU memory is never shared with dgrun's pool."""
    cmd = [sys.executable, __file__, str(path), "--hf-only", "--prompt", str(args.prompt), "--new",
           str(args.new), "--steps", str(args.steps), "--hf-device", args.hf_device]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.hf_timeout)
    if proc.returncode:
        last_line = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        return {"engine": "transformers-bf16", "error": " ".join(last_line)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def hf_fits(cfg: ModelConfig) -> tuple[bool, str]:
    """Whether a bf16 copy of the model (plus a margin for activations) fits in free GPU memory."""
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "torch has no CUDA device"
    h, e = cfg.hidden_size, cfg.num_experts
    attention = cfg.num_attention_heads * cfg.global_head_dim * 2 + 4 * cfg.num_key_value_heads * cfg.head_dim
    per_layer = h * (attention + 3 * cfg.intermediate_size + 3 * e * cfg.moe_intermediate_size + e)
    need = 2 * (cfg.num_hidden_layers * per_layer + cfg.vocab_size * h) * 1.15
    free, _ = torch.cuda.mem_get_info()
    return need < free, f"needs ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"


# -- report ------------------------------------------------------------------------------------------------


def floors(path: Path, cfg: ModelConfig, prompt_len: int, bandwidth: float | None,
           matmul: float | None) -> dict[str, float | None]:
    def floor(nbytes: float, flops: float) -> float | None:
        parts = ([nbytes / bandwidth] if bandwidth else []) + ([flops / matmul] if matmul else [])
        return 1e3 * max(parts) if parts else None

    canvas = cfg.canvas_length
    return {
        "decoder_step_ms": floor(pass_bytes(path, True), pass_flops(cfg, canvas, prompt_len, True)),
        "encoder_canvas_ms": floor(pass_bytes(path, False), pass_flops(cfg, canvas, prompt_len, False)),
        "prompt_ms": floor(pass_bytes(path, False), pass_flops(cfg, prompt_len, 0, False)),
    }


def print_table(results: list[dict[str, Any]], floor: dict[str, float | None]) -> None:
    rows = [("decoder step (ms)", "decoder_step_ms"), ("encoder canvas (ms)", "encoder_canvas_ms"),
            ("prompt encode (ms)", "prompt_ms"), ("tokens/s", "tokens_per_s"), ("load (s)", "load_s")]
    names = [r["engine"] for r in results]
    print(f"{'':22}" + "".join(f"{n:>22}" for n in names) + f"{'floor':>12}" + f"{'dgrun/floor':>13}")
    for label, key in rows:
        cells = "".join(f"{_fmt(r.get(key)):>22}" for r in results)
        f, ours = floor.get(key), results[0].get(key)
        ratio = ours / f if f and isinstance(ours, float) else None
        print(f"{label:22}{cells}{_fmt(f):>12}{_fmt(ratio):>13}")
    for r in results:
        if "error" in r:
            print(f"{r['engine']}: {r['error']}")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if value < 100 else f"{value:.0f}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a .dgf file (tools/make_random_dgf.py makes one)")
    parser.add_argument("--prompt", type=int, default=4096, help="prompt tokens")
    parser.add_argument("--new", type=int, default=512, help="new tokens")
    parser.add_argument("--steps", type=int, default=16, help="denoising steps per canvas")
    parser.add_argument("--backend", default="cuda", help="dgrun backend to measure")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers")
    parser.add_argument("--hf-device", default="cuda", help="device for transformers (cpu: a smoke test)")
    parser.add_argument("--hf-timeout", type=float, default=300, help="seconds to give transformers")
    parser.add_argument("--hf-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    with GGUFFile(args.model) as f:
        cfg = ModelConfig.from_file(f)  # also the llama.cpp fork's files
    if args.hf_only:
        print(json.dumps(bench_transformers(cfg, args.hf_device, args.prompt, args.new, args.steps)))
        return 0

    # transformers first, in a process that exits before dgrun starts: neither sees the other's memory as used
    # (dgrun's pool keeps what it frees; dg_release_pool below gives it back before torch measures the matmul).
    hf_result = None
    if not args.no_hf:
        fits, why = hf_fits(cfg) if args.hf_device == "cuda" else (True, "")
        hf_result = (bench_transformers_subprocess(args.model, args) if fits
                     else {"engine": "transformers-bf16", "error": f"skipped: {why}"})
    results = [bench_dgrun(args.model, args.backend, args.prompt, args.new, args.steps)]
    if hf_result is not None:
        results.append(hf_result)
    bandwidth = matmul = None
    if args.backend == "cuda":
        backend = dgrun.backends.get_backend("cuda")
        bandwidth = copy_bandwidth(backend)
        backend.native.call("dg_release_pool")
        matmul = bf16_matmul_rate()
    floor = floors(args.model, cfg, args.prompt, bandwidth, matmul)
    hardware = {"copy_GBps": bandwidth and bandwidth / 1e9, "bf16_TFLOPs": matmul and matmul / 1e12}
    device = getattr(dgrun.backends.get_backend(args.backend), "native", None)
    print(f"device {device.device_name if device else args.backend}")
    print(f"model {args.model.name}: {cfg.num_hidden_layers} layers, prompt {args.prompt}, {args.new} new "
          f"tokens, {args.steps} steps; copy {_fmt(hardware['copy_GBps'])} GB/s, "
          f"bf16 {_fmt(hardware['bf16_TFLOPs'])} TFLOP/s")
    print_table(results, floor)
    if args.json:
        work = {"flops_decoder_step": pass_flops(cfg, cfg.canvas_length, args.prompt, True),
                "bytes_decoder_step": pass_bytes(args.model, True)}
        args.json.write_text(json.dumps({"results": results, "floor": floor, "hardware": hardware, **work},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
