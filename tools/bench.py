"""Benchmark dgrun against transformers on the CPU: same model, same prompt, same steps, one table.

    python tools/bench.py                          # the bench model, every preset, steps 8 and 16
    python tools/bench.py --presets f32,q4_k_m --steps 8 --reps 3
    python tools/bench.py --quick                  # smoke run, well under a minute once the model is cached
    python tools/bench.py -m model.dgf [--hf hf_folder]   # any .dgf (transformers only with its HF folder)
    python tools/bench.py --json                   # machine-readable
    python tools/bench.py --batch 1,2,4,8          # batched generation: tok/s and ms per pass by batch size
    python tools/bench.py --batch 1,4 --quick      # its smoke run (what .ci/run runs)
    python tools/bench.py --presets q8_0 --long-prompt 4096,8192   # long prompts: encode + one decoder pass
    python tools/bench.py --baseline /tmp/old-dgrun ...  # also bench another checkout's dgrun package, side by side
    python tools/bench.py --real-shape             # the released model's widths, 2 layers (a 1.6 GiB file)
    python tools/bench.py --real-shape --layers 30 # the whole released shape (a 15 GiB file)
    python tools/bench.py --real-shape --layers 6,12   # ... or extrapolated to 30 from two smaller files

The bench model is transformers' own DiffusionGemma class with random weights (seed 0): vocab 32768, hidden 512,
dense MLP 1024, 6 layers (5 sliding + 1 full), 8 heads, KV heads 4 (global 2), head dims 64/128, 16 experts top-4
of width 256, window 128, canvas 256. It is built once and converted to each preset under --workdir
(default ~/.cache/dgrun-bench), and reused after that.

Every engine (transformers, and dgrun per file) lives in its own worker process, so each one's peak RSS is its
own; the parent interleaves their runs (A B C, B C A, ...) so machine noise hits all of them alike. Each run is
`generate` on a 64-token prompt for --new-tokens tokens at a fixed number of denoising steps (adaptive stopping
off, no EOS), after one untimed warm-up. Reported per engine and step count (median over --reps):
  tok/s            new tokens / generate's wall time (encoder + decoder passes + sampler); "best" is the
                   fastest run, the machine's uncontended speed when other tenants share its cores
  ms/pass          mean time of one decoder forward (canvas → logits)
  ms/enc           mean time of one encoder pass over a committed canvas
  peak RSS         the worker's high-water resident set (VmHWM): interpreter, libraries, weights, activations
and each as a ratio dgrun ÷ transformers. Both engines use the same thread count (--threads, default: every CPU
this process may use); transformers runs `generate(..., stability_threshold=None, confidence_threshold=None,
max_denoising_steps=steps)` under torch.no_grad.

--batch B1,B2,... times dgrun alone (transformers' generate takes one sequence here) on `generate_batch` with B
different 64-token prompts (seeds 0..B-1), every batch size in one worker per file, interleaved the same way:
  tok/s            all elements' new tokens / wall time, and as a ratio to the first batch size
  tok/cpu-s        the same per second of the worker's CPU time (all threads): the work batching saves, which a
                   shared machine's wall clock hides
  ms/pass          mean time of one batched decoder pass (all B canvases), and per element (ms/pass / B)

--long-prompt L1,L2,... measures what a long prompt costs instead: per engine and length, one encoder pass over
L random ids into a fresh cache plus one decoder forward over a random canvas (no sampler step), each run in a
fresh worker (after the same warm-up), interleaved the same way. Reported (median over --reps): seconds, the
encoder's share, the worker's peak RSS during the call (VmHWM reset before it: interpreter, mapped weights,
what the warm-up left), the encoder's rise (its peak above the RSS before the call: activations, cache, new
pages), RSS kept after the call while the cache is still referenced (VmRSS after − before), and the cache's own
size (the bytes of its K/V arrays); then time(longest)/time(shortest) per engine and transformers ÷ dgrun.

--real-shape writes a random q4_k_m file with the released model's widths (tools/make_random_dgf.py: vocab
262,144, hidden 2816, 128 experts top-8, --layers layers) under --workdir, and times what a decoder step costs
there: one decode pass + the sampler step + the next pass's self-conditioning input, on a 256-token canvas after
a 64-token prompt, against one bare numpy float32 matmul of the output projection's size (256 x 2816 x 262,144)
measured in the same run (each in its own worker, interleaved); also one encoder pass over a committed canvas,
tokens/s at 16 steps (256 tokens / (16 steps + one encoder pass)), peak RSS against the file size, and how
many canvas rows took the sparse soft embedding. --int8 on,off times both settings of the cpu backend.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
ALL_PRESETS = ["f32", "q8_0", "q4_k_m", "mxfp4_moe", "nvfp4_moe"]
BENCH_TEXT = dict(
    vocab_size=32768, hidden_size=512, intermediate_size=1024, num_hidden_layers=6,
    layer_types=["sliding_attention"] * 5 + ["full_attention"], num_attention_heads=8, num_key_value_heads=4,
    num_global_key_value_heads=2, head_dim=64, global_head_dim=128, num_experts=16, top_k_experts=4,
    moe_intermediate_size=256, sliding_window=128,
)
BENCH_CANVAS = 256
BENCH_SEED = 0
FORMAT_VERSION = 1  # bump when the cached files must be rebuilt


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident set in MiB (VmHWM on Linux, ru_maxrss elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def default_threads() -> int:
    env = os.environ.get("DGRUN_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def bench_prompt(vocab_size: int, length: int = 64, seed: int = 0) -> list[int]:
    """A fixed prompt: `length` token ids drawn with `seed` (ids 0-2 are pad/eos/bos, left out)."""
    import numpy as np

    return [int(t) for t in np.random.default_rng(seed).integers(3, vocab_size, length)]


class Timer:
    """Wraps a callable: accumulates wall time per call, split by a key of the call's arguments, and the process's
    CPU time per call (all threads: the work done, whatever other tenants of the machine take)."""

    def __init__(self, fn: Any, key: Any = None):
        self.fn, self.key = fn, key
        self.calls: list[tuple[Any, float]] = []
        self.cpu: list[float] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start, cpu = time.perf_counter(), time.process_time()
        out = self.fn(*args, **kwargs)
        self.calls.append((self.key(*args, **kwargs) if self.key else None, time.perf_counter() - start))
        self.cpu.append(time.process_time() - cpu)
        return out


# ----------------------------------------------------------------------------------------------------------------
# Worker side: one engine per process, driven by JSON lines on stdin
# ----------------------------------------------------------------------------------------------------------------


class DgrunEngine:
    def __init__(self, spec: dict[str, Any]):
        import dgrun

        self.model = dgrun.load(spec["path"], backend=spec["backend"])
        self.model.generation_config.eos_token_ids = []  # never stop early: every engine makes every token
        graph = self.model.graph
        self.canvas = graph.cfg.canvas_length
        self.vocab = graph.cfg.vocab_size
        self.decode = graph.decode_batch = Timer(graph.decode_batch)
        self.encode = graph.encode = Timer(graph.encode, key=lambda ids, *_: len(ids))

    def info(self) -> dict[str, Any]:
        backend = self.model.backend
        return {"backend": backend.name, "isa": getattr(backend, "isa", None),
                "threads": getattr(backend, "threads", None)}

    def run(self, prompt: list[int], new_tokens: int, steps: int) -> int:
        out = self.model.generate(prompt, max_new_tokens=new_tokens, max_denoising_steps=steps, seed=0,
                                  adaptive_stopping=False)
        return len(out.tokens)

    def run_batch(self, prompts: list[list[int]], new_tokens: int, steps: int) -> int:
        outs = self.model.generate_batch(prompts, max_new_tokens=new_tokens, max_denoising_steps=steps,
                                         seed=list(range(len(prompts))), adaptive_stopping=False,
                                         max_batch=len(prompts))
        return sum(len(out.tokens) for out in outs)

    def long_prompt(self, prompt: list[int], canvas: list[int]) -> tuple[Any, float, float]:
        """Encode `prompt` into a fresh cache, then one decoder pass: (the cache, the encoder's seconds, the peak
        RSS when the encoder returned)."""
        import numpy as np

        graph = self.model.graph
        cache = graph.new_cache()
        start = time.perf_counter()
        graph.encode.fn(np.asarray(prompt), cache)
        encoded, peak = time.perf_counter() - start, peak_rss_mb()
        graph.decode.fn(np.asarray(canvas), cache, None)
        return cache, encoded, peak

    @staticmethod
    def cache_bytes(cache: Any) -> int:
        return sum(int(a.nbytes) for a in [*cache.keys, *cache.values] if a is not None)



class TransformersEngine:
    def __init__(self, spec: dict[str, Any]):
        import torch
        from transformers import DiffusionGemmaForBlockDiffusion

        torch.set_num_threads(spec["threads"])
        self.torch = torch
        self.model = DiffusionGemmaForBlockDiffusion.from_pretrained(spec["hf"], dtype=torch.float32).eval()
        text = self.model.config.get_text_config()
        self.canvas = self.model.config.canvas_length
        self.vocab = text.vocab_size
        # generate() calls self.forward for each decoder pass and self.model.encoder for each encoder pass.
        self.decode = self.model.forward = Timer(self.model.forward)
        encoder = self.model.model.encoder
        self.encode = encoder.forward = Timer(encoder.forward, key=lambda *a, **k: int(k["input_ids"].shape[-1]))

    def info(self) -> dict[str, Any]:
        return {"backend": "torch", "threads": self.torch.get_num_threads(), "torch": self.torch.__version__}

    def run(self, prompt: list[int], new_tokens: int, steps: int) -> int:
        torch = self.torch
        torch.manual_seed(0)
        with torch.no_grad():
            out = self.model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=new_tokens,
                                      max_denoising_steps=steps, stability_threshold=None,
                                      confidence_threshold=None, eos_token_id=None, pad_token_id=0)
        return int(out.sequences.shape[-1]) - len(prompt)

    def long_prompt(self, prompt: list[int], canvas: list[int]) -> tuple[Any, float, float]:
        from transformers import DynamicCache

        torch = self.torch
        with torch.no_grad():
            cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
            start = time.perf_counter()
            self.encode.fn(input_ids=torch.tensor([prompt]), past_key_values=cache)
            encoded, peak = time.perf_counter() - start, peak_rss_mb()
            self.decode.fn(decoder_input_ids=torch.tensor([canvas]), past_key_values=cache)
        return cache, encoded, peak

    @staticmethod
    def cache_bytes(cache: Any) -> int:
        return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
                   if t is not None)



def reset_peak_rss() -> None:
    """Start a new VmHWM from the current RSS (Linux: "5" to clear_refs); elsewhere the peak stays cumulative."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def long_prompt_run(engine: Any, length: int) -> dict[str, Any]:
    """One long-prompt measurement: time, encoder time, peak RSS during the call, RSS kept while the cache lives."""
    import gc

    import numpy as np

    rng = np.random.default_rng(length)
    prompt = [int(t) for t in rng.integers(3, engine.vocab, length)]
    canvas = [int(t) for t in rng.integers(3, engine.vocab, engine.canvas)]
    gc.collect()
    reset_peak_rss()
    before = current_rss_mb()
    start = time.perf_counter()
    cache, encoded, encode_peak = engine.long_prompt(prompt, canvas)
    seconds = time.perf_counter() - start
    gc.collect()
    out = {"length": length, "seconds": seconds, "encode_s": encoded, "encode_rise_mb": encode_peak - before,
           "peak_rss_mb": peak_rss_mb(),
           "kept_rss_mb": current_rss_mb() - before, "cache_mb": engine.cache_bytes(cache) / 2**20}
    del cache
    gc.collect()
    return out


class StepEngine:
    """The real-shape bench's dgrun side: one decoder step at a time (decode, sampler, self-conditioning)."""

    def __init__(self, spec: dict[str, Any]):
        import numpy as np

        import dgrun
        from dgrun.rng import DefaultRng

        self.np = np
        self.model = dgrun.load(spec["path"], backend=spec["backend"])
        self.graph, self.ops = self.model.graph, self.model.backend
        cfg = self.graph.cfg
        self.cache = self.graph.new_cache()
        self.graph.encode(np.asarray(bench_prompt(cfg.vocab_size, spec["prompt_tokens"])), self.cache)
        self.rng = DefaultRng(0)
        self.canvas = self.rng.tokens((cfg.canvas_length,), cfg.vocab_size)
        self.self_cond: Any = None
        self.step()  # warm-up; and every timed step is self-conditioned, as all but a canvas's first

    def info(self) -> dict[str, Any]:
        backend = self.ops
        return {"backend": backend.name, "isa": getattr(backend, "isa", None),
                "int8": getattr(backend, "int8_isa", None) if getattr(backend, "int8", False) else "off",
                "threads": getattr(backend, "threads", None)}

    def step(self) -> dict[str, Any]:
        from dgrun.sampler import temperature

        start = time.perf_counter()
        logits = self.graph.decode(self.canvas, self.cache, self.self_cond)
        decoded = time.perf_counter()
        result = self.ops.denoise_step(logits, self.canvas, temperature(8, 16, 0.4, 0.8), 0.1, self.rng)
        del logits
        self.canvas = result.canvas
        self.self_cond = self.graph.self_condition(result.processed_logits)
        del result
        done = time.perf_counter()
        paths = getattr(self.ops, "soft_embed_paths", None)
        # One encoder pass over a committed canvas, on a copy of the cache (the prompt's stays as it is).
        cache = self.cache.copy()
        self.graph.encode(self.canvas, cache)
        return {"step": done - start, "decode": decoded - start, "enc": time.perf_counter() - done,
                "sparse_rows": None if paths is None else int((paths >= 0).sum())}


def matmul_worker(spec: dict[str, Any]) -> None:
    """The real-shape bench's yardstick: numpy float32 [256, hidden] @ [hidden, vocab], timed per request."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((spec["rows"], spec["hidden"]), dtype=np.float32)
    b = rng.standard_normal((spec["vocab"], spec["hidden"]), dtype=np.float32)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if json.loads(line).get("quit"):
            print(json.dumps({"peak_rss_mb": peak_rss_mb()}), flush=True)
            return
        start = time.perf_counter()
        a @ b.T
        print(json.dumps({"step": time.perf_counter() - start}), flush=True)


def worker(spec: dict[str, Any]) -> None:
    """Load one engine, then answer {"steps", "new_tokens"} requests with timings; {"quit": true} ends."""
    if spec["engine"] == "matmul":
        matmul_worker(spec)
        return
    if spec["engine"] == "step":
        os.environ["DGRUN_THREADS"] = str(spec["threads"])
        if spec.get("int8") is not None:
            os.environ["DGRUN_CPU_INT8"] = spec["int8"]
        engine = StepEngine(spec)
        print(json.dumps({"ready": True, **engine.info()}), flush=True)
        for line in sys.stdin:
            if json.loads(line).get("quit"):
                print(json.dumps({"peak_rss_mb": peak_rss_mb()}), flush=True)
                return
            print(json.dumps(engine.step()), flush=True)
        return
    baseline = current_rss_mb()
    if spec["engine"] == "dgrun":
        os.environ["DGRUN_THREADS"] = str(spec["threads"])
        import numpy  # noqa: F401  (counted in the baseline, as the interpreter's own libraries)

        baseline = current_rss_mb()
        engine: Any = DgrunEngine(spec)
    else:
        import torch  # noqa: F401
        import transformers  # noqa: F401

        baseline = current_rss_mb()
        engine = TransformersEngine(spec)
    prompt = bench_prompt(engine.vocab, spec["prompt_tokens"])
    if spec.get("batches"):  # warm-up at the largest batch: its buffers serve the smaller ones too
        batch_prompts = [bench_prompt(engine.vocab, spec["prompt_tokens"], seed=j) for j in range(max(spec["batches"]))]
        engine.run_batch(batch_prompts, engine.canvas, 2)
    else:
        engine.run(prompt, engine.canvas, 2)  # warm-up: first-touch of weights, allocator, lazy initialisation
    print(json.dumps({"ready": True, "baseline_rss_mb": baseline, **engine.info()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            print(json.dumps({"peak_rss_mb": peak_rss_mb()}), flush=True)
            return
        if "long" in request:
            print(json.dumps(long_prompt_run(engine, request["long"])), flush=True)
            continue
        engine.decode.calls.clear()
        engine.decode.cpu.clear()
        engine.encode.calls.clear()
        start, cpu_start = time.perf_counter(), time.process_time()
        if request.get("batch"):
            made = engine.run_batch(batch_prompts[:request["batch"]], request["new_tokens"], request["steps"])
        else:
            made = engine.run(prompt, request["new_tokens"], request["steps"])
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        decode = [t for _, t in engine.decode.calls]
        encode = [t for n, t in engine.encode.calls if n == engine.canvas]
        print(json.dumps({
            "tokens": made, "seconds": seconds, "tok_s": made / seconds, "decoder_passes": len(decode),
            "tok_cpu_s": made / cpu_seconds if cpu_seconds > 0 else None,
            "ms_pass": 1e3 * sum(decode) / max(len(decode), 1),
            "ms_pass_cpu": 1e3 * sum(engine.decode.cpu) / max(len(decode), 1),
            "ms_enc": 1e3 * sum(encode) / len(encode) if encode else None,
        }), flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Parent side: build the files, start the workers, interleave, report
# ----------------------------------------------------------------------------------------------------------------


def bench_key() -> str:
    import transformers

    blob = json.dumps([BENCH_TEXT, BENCH_CANVAS, BENCH_SEED, FORMAT_VERSION, transformers.__version__], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def prepare_bench_model(workdir: Path, presets: list[str], rebuild: bool, log: Any) -> tuple[Path, dict[str, Path]]:
    """The bench model's HF folder and one .dgf per preset, built on first use and cached under workdir."""
    folder = workdir / f"bench-{bench_key()}"
    hf = folder / "hf"
    if rebuild or not (hf / "config.json").is_file():
        sys.path.insert(0, str(TOOLS))
        import fixtures

        log(f"building the bench model in {hf} ...")
        model = fixtures.make_model(fixtures.text_config(**BENCH_TEXT), canvas_length=BENCH_CANVAS, seed=BENCH_SEED)
        fixtures.save_checkpoint(model, hf, tokenizer=False)
        del model
    files = {}
    for preset in presets:
        out = folder / f"{preset}.dgf"
        if rebuild or not out.is_file():
            from dgrun.converters.convert_hf import convert

            log(f"converting to {preset} ...")
            start = time.perf_counter()
            convert(hf, out, preset, with_tokenizer=False, quiet=True)
            log(f"  {out.stat().st_size / 2**20:.1f} MiB in {time.perf_counter() - start:.1f} s")
        files[preset] = out
    return hf, files


class Worker:
    """A worker process for one engine and its label (started now, or per long-prompt run with start=False)."""

    def __init__(self, label: str, spec: dict[str, Any], file_mb: float | None, pythonpath: str | None = None,
                 start: bool = True):
        self.label, self.spec, self.file_mb, self.pythonpath = label, spec, file_mb, pythonpath
        self.info: dict[str, Any] = {}
        self.runs: dict[int, list[dict[str, Any]]] = {}
        self.peak_rss_mb: float | None = None
        self.proc: Any = None
        if start:
            self.start()

    def start(self) -> None:
        env = dict(os.environ)
        threads = str(self.spec["threads"])
        # Thread pools that read the environment at import (OpenBLAS under numpy, OpenMP under torch).
        env.update(OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        if self.pythonpath:  # --baseline: this worker imports another checkout's dgrun
            env["PYTHONPATH"] = os.pathsep.join([self.pythonpath, *filter(None, [env.get("PYTHONPATH")])])
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker",
                                      json.dumps(self.spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.label} exited (code {self.proc.wait()})")
        return json.loads(line)

    def ready(self) -> None:
        self.info = self._read()

    def run(self, steps: int, new_tokens: int, batch: int | None = None) -> dict[str, Any]:
        """One timed run; results are kept per step count (or per batch size, with `batch`)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"steps": steps, "new_tokens": new_tokens, "batch": batch}) + "\n")
        self.proc.stdin.flush()
        result = self._read()
        self.runs.setdefault(steps if batch is None else batch, []).append(result)
        return result

    def long(self, length: int) -> dict[str, Any]:
        """One long-prompt run in a fresh worker process, so its peak and kept RSS are that run's alone."""
        fresh = Worker(self.label, self.spec, self.file_mb, self.pythonpath)
        try:
            fresh.ready()
            self.info = fresh.info
            assert fresh.proc.stdin is not None
            fresh.proc.stdin.write(json.dumps({"long": length}) + "\n")
            fresh.proc.stdin.flush()
            result = fresh._read()
        finally:
            fresh.quit()
        self.runs.setdefault(-length, []).append(result)  # negative keys: long-prompt runs by length
        return result

    def quit(self) -> None:
        if self.proc is not None and self.proc.poll() is None and self.proc.stdin is not None:
            self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
            self.proc.stdin.flush()
            self.peak_rss_mb = self._read()["peak_rss_mb"]
            self.proc.wait()


def summarize(worker: Worker, steps: int) -> dict[str, Any]:
    runs = worker.runs.get(steps, [])

    def med(key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {"engine": worker.label, "steps": steps, "tok_s": med("tok_s"), "ms_pass": med("ms_pass"),
            "tok_cpu_s": med("tok_cpu_s"), "ms_pass_cpu": med("ms_pass_cpu"),
            "ms_enc": med("ms_enc"), "peak_rss_mb": worker.peak_rss_mb, "file_mb": worker.file_mb,
            "tokens": runs[0]["tokens"] if runs else None, "reps": len(runs),
            "tok_s_best": max((r["tok_s"] for r in runs), default=None),
            "tok_s_all": [r["tok_s"] for r in runs], "info": worker.info}


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def render_table(lines: list[list[str]]) -> str:
    """Rows of cells (the first one the header) as aligned text: first column left, the others right."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(line)).rstrip())
        if n == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


def _rat(x: float | None) -> str:
    return "" if x is None else f"({x:.2f}x)"


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ["engine", "file MiB", "steps", "tok/s", "", "best", "ms/pass", "", "ms/enc", "", "peak RSS MiB", ""]
    return render_table([head] + [
        [r["engine"], _num(r["file_mb"], ".1f"), str(r["steps"]), _num(r["tok_s"], ".1f"), _rat(r.get("tok_s_ratio")),
         _num(r.get("tok_s_best"), ".1f"), _num(r["ms_pass"], ".1f"), _rat(r.get("ms_pass_ratio")),
         _num(r["ms_enc"], ".1f"), _rat(r.get("ms_enc_ratio")), _num(r["peak_rss_mb"], ".0f"), _rat(r.get("rss_ratio"))]
        for r in rows])


def batch_report(workers: list[Worker], batches: list[int], steps: int, info: dict[str, Any], as_json: bool) -> None:
    """The --batch table: per file and batch size, throughput (and its ratio to the first size) and pass times."""
    rows = []
    for w in workers:
        first = summarize(w, batches[0])
        for b in batches:
            row = {**summarize(w, b), "batch": b, "steps": steps}
            row["tok_s_ratio"] = ratio(row["tok_s"], first["tok_s"])
            row["tok_cpu_s_ratio"] = ratio(row["tok_cpu_s"], first["tok_cpu_s"])
            row["ms_pass_element"] = None if row["ms_pass"] is None else row["ms_pass"] / b
            row["ms_pass_cpu_element"] = None if row["ms_pass_cpu"] is None else row["ms_pass_cpu"] / b
            rows.append(row)
    head = ["engine", "batch", "tok/s", "", "best", "tok/cpu-s", "", "ms/pass", "ms/pass/elem", "cpu ms/pass/elem"]
    title = (f"# {info['cpu']}, {info['threads']} threads; {info['prompt_tokens']}-token prompts, {info['new_tokens']} "
             f"new tokens per element, {steps} steps, median of {info['reps']}; dgrun backend {info['backend']} "
             f"(kernels: {info['dgrun_kernels']})")
    table = render_table([head] + [
        [r["engine"], str(r["batch"]), _num(r["tok_s"], ".1f"), _rat(r["tok_s_ratio"]), _num(r["tok_s_best"], ".1f"),
         _num(r["tok_cpu_s"], ".1f"), _rat(r["tok_cpu_s_ratio"]), _num(r["ms_pass"], ".1f"),
         _num(r["ms_pass_element"], ".1f"), _num(r["ms_pass_cpu_element"], ".1f")] for r in rows])
    report(as_json, info, "rows", rows, title, table)
    if not as_json:
        peaks = ", ".join(f"{w.label} {_num(w.peak_rss_mb, '.0f')} MiB" for w in workers)
        print(f"(ratios: to batch {batches[0]}; ms/pass is one decoder pass over all the batch's canvases; tok/cpu-s "
              "and cpu ms count the worker's CPU time, all threads, so they hold when other tenants share the cores; "
              f"peak RSS, reached at the largest batch: {peaks})")


def long_prompt_rows(workers: list[Worker], lengths: list[int]) -> list[dict[str, Any]]:
    """Per engine and length: medians of the long-prompt runs, with time ratios across lengths and engines."""
    rows = []
    for w in workers:
        for length in lengths:
            runs = w.runs.get(-length, [])
            row: dict[str, Any] = {"engine": w.label, "length": length, "reps": len(runs),
                                   "seconds_all": [r["seconds"] for r in runs]}
            for key in ("seconds", "encode_s", "encode_rise_mb", "peak_rss_mb", "kept_rss_mb", "cache_mb"):
                row[key] = statistics.median(r[key] for r in runs) if runs else None
            rows.append(row)
    by = {(r["engine"], r["length"]): r for r in rows}
    for r in rows:
        r["vs_shortest"] = ratio(r["seconds"], by[(r["engine"], lengths[0])]["seconds"])
        hf = by.get(("transformers", r["length"]))
        r["speedup"] = ratio(hf["seconds"], r["seconds"]) if hf and r["engine"] != "transformers" else None
    return rows


def format_long_table(rows: list[dict[str, Any]]) -> str:
    head = ["engine", "tokens", "seconds", "encode s", f"t/t({rows[0]['length']})", "vs transformers",
            "peak RSS MiB", "encoder's rise MiB", "RSS kept MiB", "cache MiB"]
    return render_table([head] + [
        [r["engine"], str(r["length"]), _num(r["seconds"], ".2f"), _num(r["encode_s"], ".2f"),
         _num(r["vs_shortest"], ".2f"), "" if r["speedup"] is None else f"{r['speedup']:.2f}x",
         _num(r["peak_rss_mb"], ".0f"), _num(r["encode_rise_mb"], ".0f"), _num(r["kept_rss_mb"], ".0f"),
         _num(r["cache_mb"], ".1f")]
        for r in rows])


def machine_info() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def real_shape_file(workdir: Path, layers: int, rebuild: bool, log: Any) -> Path:
    """The random q4_k_m file of the released widths with `layers` layers, written on first use."""
    sys.path.insert(0, str(TOOLS))
    import make_random_dgf

    path = workdir / f"real-{layers}L-q4_k_m.dgf"
    if rebuild or not path.is_file():
        workdir.mkdir(parents=True, exist_ok=True)
        log(f"writing {path} (q4_k_m, {layers} layers, the released widths) ...")
        make_random_dgf.write_random_dgf(path, "q4_k_m", layers, make_random_dgf.RELEASED["vocab_size"])
    return path


def linear_fit(xs: list[float], ys: list[float], at: float) -> float:
    """The least-squares line through (xs, ys), evaluated at `at`."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum((x - mean_x) ** 2 for x in xs)
    return mean_y + slope * (at - mean_x)


def real_shape(args: argparse.Namespace, backend: str, threads: int, log: Any) -> None:
    """--real-shape: the released widths' decoder step against the bare output-projection matmul (see above)."""
    sys.path.insert(0, str(TOOLS))
    import make_random_dgf

    released = make_random_dgf.RELEASED
    hidden, vocab, canvas = released["hidden_size"], released["vocab_size"], released["canvas_length"]
    layer_counts = [int(x) for x in str(args.layers).split(",")]
    settings = [s.strip() for s in args.int8.split(",")] if args.int8 else [None]
    workers = []
    for layers in layer_counts:
        path = real_shape_file(args.workdir, layers, args.rebuild, log)
        for setting in settings:
            label = f"{layers} layers" + ("" if setting is None else f" int8 {setting}")
            spec = {"engine": "step", "path": str(path), "backend": backend, "threads": threads,
                    "prompt_tokens": args.prompt_tokens, "int8": setting, "layers": layers}
            workers.append(Worker(label, spec, path.stat().st_size / 2**20))
            if args.baseline:
                workers.append(Worker(f"baseline {label}", spec, path.stat().st_size / 2**20, str(args.baseline)))
    if not args.no_matmul:
        workers.append(Worker("numpy matmul", {"engine": "matmul", "rows": canvas, "hidden": hidden,
                                               "vocab": vocab, "threads": threads}, None))
    reps = args.reps or 3
    try:
        for w in workers:
            w.ready()
        log(f"{len(workers)} workers ready; {reps} interleaved rep(s), {threads} threads")
        for rep in range(reps):
            for w in workers[rep % len(workers):] + workers[:rep % len(workers)]:
                result = w.run(0, 0)
                log(f"  rep {rep + 1} {w.label:<22} {result['step']:8.2f} s")
    finally:
        for w in workers:
            try:
                w.quit()
            except Exception:
                w.proc.kill()

    def med(w: Worker, key: str) -> float:
        return statistics.median(r[key] for r in w.runs[0])

    bare = None if args.no_matmul else med(workers[-1], "step")
    rows = []
    for w in workers:
        if w.spec["engine"] != "step":
            continue
        step, enc, peak, file_mb = med(w, "step"), med(w, "enc"), w.peak_rss_mb or 0.0, w.file_mb or 0.0
        rows.append({"engine": w.label, "layers": w.spec["layers"], "int8": w.spec["int8"], "info": w.info,
                     "baseline": w.pythonpath is not None,
                     "step_s": step, "decode_s": med(w, "decode"), "enc_s": enc,
                     "step_vs_matmul": None if bare is None else step / bare,
                     "tok_s_16_steps": canvas / (16 * step + enc), "peak_rss_mb": peak, "file_mb": file_mb,
                     "rss_over_file_gib": (peak - file_mb) / 1024, "sparse_rows": w.runs[0][-1].get("sparse_rows"),
                     "steps": [r["step"] for r in w.runs[0]]})
    target = released["num_hidden_layers"]
    extrapolated = []
    for setting in settings:
        fit = [r for r in rows if r["int8"] == setting and not r["baseline"]]
        if len({r["layers"] for r in fit}) < 2 or any(r["layers"] == target for r in fit):
            continue
        xs = [float(r["layers"]) for r in fit]
        step = linear_fit(xs, [r["step_s"] for r in fit], target)
        enc = linear_fit(xs, [r["enc_s"] for r in fit], target)
        extrapolated.append({
            "engine": f"{target} layers (fit to {', '.join(str(r['layers']) for r in fit)})"
                      + ("" if setting is None else f" int8 {setting}"),
            "step_s": step, "enc_s": enc, "step_vs_matmul": None if bare is None else step / bare,
            "tok_s_16_steps": canvas / (16 * step + enc),
            "file_mb": linear_fit(xs, [r["file_mb"] for r in fit], target),
            "peak_rss_mb": linear_fit(xs, [r["peak_rss_mb"] for r in fit], target)})
    machine = {**machine_info(), "threads": threads, "reps": reps, "matmul_s": bare,
               "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    for r in extrapolated:
        r["extrapolated"] = True
    title = (f"# {machine['cpu']}, {threads} threads; the released widths, q4_k_m, random weights; "
             f"{args.prompt_tokens}-token prompt, canvas {canvas}; median of {reps}; load average at the end "
             f"{machine['load_average'] or 0:.1f}")
    if bare is not None:
        title += f"\nbare numpy float32 matmul {canvas} x {hidden} x {vocab}: {bare:.2f} s"
    report(args.json, machine, "real_shape", rows + extrapolated, title, format_real_shape_table(rows + extrapolated,
                                                                                               canvas))
    if not args.json:
        print("(goals on 2 layers: step <= 1.6x the matmul, peak RSS <= file + 0.6 GiB; tok/s @16 = 256 tokens per "
              "16 steps and one encoder pass)")


def format_real_shape_table(rows: list[dict[str, Any]], canvas: int) -> str:
    head = ["file", "GiB", "step s", "x matmul", "decode s", "enc s", "tok/s @16", "peak RSS GiB", "RSS - file",
            "sparse rows"]
    return render_table([head] + [
        [r["engine"], f"{r['file_mb'] / 1024:.2f}", _num(r["step_s"], ".2f"), _num(r["step_vs_matmul"], ".2f"),
         _num(r.get("decode_s"), ".2f"), _num(r["enc_s"], ".2f"), _num(r["tok_s_16_steps"], ".2f"),
         f"{r['peak_rss_mb'] / 1024:.2f}", f"{(r['peak_rss_mb'] - r['file_mb']) / 1024:.2f}",
         "-" if r.get("sparse_rows") is None else f"{r['sparse_rows']}/{canvas}"]
        for r in rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Benchmark dgrun against transformers on the CPU.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("-m", "--model", type=Path, help="bench this .dgf instead of the bench model")
    parser.add_argument("--hf", type=Path, help="with -m: the matching HF folder, to run transformers too")
    parser.add_argument("--presets", help=f"comma-separated presets (default: {','.join(ALL_PRESETS)})")
    parser.add_argument("--steps", default=None, help="comma-separated denoising steps (default: 8,16)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens to generate per run (default: 512)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=None, help="timed runs per engine and step count (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="threads for every engine (default: all CPUs)")
    parser.add_argument("--backend", default=None, help="dgrun backend (default: cpu, else numpy)")
    parser.add_argument("--no-transformers", action="store_true", help="time dgrun only")
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "dgrun-bench")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached bench model and files")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 rep, 256 tokens, steps 4, f32 and q8_0")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--batch", help="comma-separated batch sizes: time batched generation (dgrun only; "
                                        "default preset q8_0, steps 8, 256 tokens per element; --quick: steps 2)")
    parser.add_argument("--long-prompt", help="comma-separated prompt lengths: time one encode + one decoder pass "
                                              "per length instead of generating")
    parser.add_argument("--baseline", type=Path, help="a folder holding another checkout's `dgrun` package (e.g. "
                                                       "symlinks to its runtime/, backends/): benched beside this one")
    parser.add_argument("--real-shape", action="store_true",
                        help="the released model's widths: decoder step vs the bare output-projection matmul")
    parser.add_argument("--layers", default="2", help="with --real-shape: layers of the file, or several "
                        "(e.g. 6,12: timed side by side, and the released 30 extrapolated; default 2)")
    parser.add_argument("--int8", help="with --real-shape: cpu int8 settings to time side by side, e.g. on,off")
    parser.add_argument("--no-matmul", action="store_true", help="with --real-shape: skip the numpy matmul")
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    batches = [int(b) for b in args.batch.split(",")] if args.batch else []
    lengths = sorted(int(n) for n in args.long_prompt.split(",")) if args.long_prompt else []
    if any(b < 1 for b in batches):
        parser.error("batch sizes must be positive integers")
    default_steps = ("2" if args.quick else "8") if batches else ("4" if args.quick else "8,16")
    steps = [int(s) for s in (args.steps or default_steps).split(",")]
    new_tokens = args.new_tokens or (256 if args.quick or batches else 512)
    reps = args.reps or (1 if args.quick else 3)
    threads = args.threads or default_threads()
    default_presets = "q8_0" if batches else "f32,q8_0" if args.quick else ",".join(ALL_PRESETS)
    presets = (args.presets or default_presets).split(",")
    unknown = [p for p in presets if p not in ALL_PRESETS]
    if unknown:
        parser.error(f"unknown preset(s) {unknown} (choose from {', '.join(ALL_PRESETS)})")

    backend = args.backend
    if backend is None:
        from dgrun.backends import BackendUnavailable, get_backend

        try:
            get_backend("cpu")  # builds the native kernels once here, not inside a timed worker
            backend = "cpu"
        except BackendUnavailable as e:
            log(f"note: {e}; benchmarking the numpy backend instead")
            backend = "numpy"

    if args.real_shape:
        real_shape(args, backend, threads, log)
        return
    if args.model:
        files = {args.model.stem: args.model}
        hf = args.hf
    else:
        hf, files = prepare_bench_model(args.workdir, presets, args.rebuild, log)
    common = {"threads": threads, "prompt_tokens": args.prompt_tokens, "batches": batches}
    workers = []
    start = not lengths  # long prompts: a fresh process per run (Worker.long)
    # Batch mode times dgrun alone: transformers' DiffusionGemma generate takes one sequence.
    if hf is not None and not args.no_transformers and not batches:
        workers.append(Worker("transformers", {"engine": "transformers", "hf": str(hf), **common}, None, start=start))
    for name, path in files.items():
        spec = {"engine": "dgrun", "path": str(path), "backend": backend, **common}
        mb = path.stat().st_size / 2**20
        workers.append(Worker(f"dgrun {backend} {name}", spec, mb, start=start))
        if args.baseline:
            workers.append(Worker(f"baseline {backend} {name}", spec, mb, str(args.baseline), start=start))
    try:
        for w in workers:
            if start:
                w.ready()
        what = f"prompts of {lengths} tokens" if lengths else f"steps {steps} x {new_tokens} tokens"
        log(f"{len(workers)} engines ready; {reps} rep(s) x {what}, {threads} threads")
        for rep in range(reps):
            # Interleaved, A B C / B C A / C A B ...: each engine takes every position in turn, so neither a
            # warming machine nor another tenant's periodic load favours one of them.
            order = workers[rep % len(workers):] + workers[:rep % len(workers)]
            for length in lengths:
                for w in order:
                    r = w.long(length)
                    log(f"  rep {rep + 1} {length:>6} tokens {w.label:<24} {r['seconds']:7.2f} s  "
                        f"(encode {r['encode_s']:.2f} s)  peak {r['peak_rss_mb']:.0f} MiB  "
                        f"kept {r['kept_rss_mb']:.0f} MiB  cache {r['cache_mb']:.1f} MiB")
            turn = rep % max(len(batches), 1)
            points = [(steps[0], b) for b in batches[turn:] + batches[:turn]] or [(s, None) for s in steps]
            for s, b in [] if lengths else points:
                for w in order:
                    result = w.run(s, new_tokens, b)
                    log(f"  rep {rep + 1} steps {s:>3}{'' if b is None else f' batch {b:>2}'} {w.label:<24} "
                        f"{result['tok_s']:8.1f} tok/s  {result['ms_pass']:7.1f} ms/pass")
    finally:
        for w in workers:
            try:
                w.quit()
            except Exception:  # a crashed worker: report what the others measured
                w.proc.kill()

    info = {**machine_info(), "threads": threads, "new_tokens": new_tokens, "prompt_tokens": args.prompt_tokens,
            "reps": reps, "backend": backend, "dgrun_kernels": next((w.info.get("isa") for w in workers
                                                                     if w.label.startswith("dgrun")), None)}
    if lengths:
        title = (f"# {info['cpu']}, {threads} threads; one encode of the prompt + one decoder pass, median of {reps}; "
                 f"dgrun backend {backend} (kernels: {info['dgrun_kernels']})")
        rows = long_prompt_rows(workers, lengths)
        report(args.json, info, "long_prompt", rows, title, format_long_table(rows))
        return
    if batches:
        batch_report(workers, batches, steps[0], info, args.json)
        return
    rows = []
    for s in steps:
        ref = summarize(workers[0], s) if workers and workers[0].label == "transformers" else None
        for w in workers:
            row = summarize(w, s)
            if ref is not None and w is not workers[0]:
                row["tok_s_ratio"] = ratio(row["tok_s"], ref["tok_s"])
                row["ms_pass_ratio"] = ratio(row["ms_pass"], ref["ms_pass"])
                row["ms_enc_ratio"] = ratio(row["ms_enc"], ref["ms_enc"])
                row["rss_ratio"] = ratio(row["peak_rss_mb"], ref["peak_rss_mb"])
            rows.append(row)
    title = (f"# {info['cpu']}, {threads} threads; {args.prompt_tokens}-token prompt, {new_tokens} new tokens, "
             f"median of {reps}; dgrun backend {backend} (kernels: {info['dgrun_kernels']})")
    report(args.json, info, "rows", rows, title, format_table(rows))
    if not args.json and any("tok_s_ratio" in r for r in rows):
        print("(ratios: dgrun / transformers; tok/s above 1 is faster, ms and RSS below 1 are better)")


def report(as_json: bool, info: dict[str, Any], key: str, rows: list[dict[str, Any]], title: str, table: str) -> None:
    """The results as JSON (machine info and rows under `key`), or as a title line and the table."""
    if as_json:
        print(json.dumps({"machine": info, key: rows}, indent=2))
    else:
        print(title)
        print(table)


if __name__ == "__main__":
    main()
