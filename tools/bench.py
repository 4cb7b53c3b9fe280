"""Benchmark dgrun against transformers on the CPU: same model, same prompt, same steps, one table.

    python tools/bench.py                          # the bench model, every preset, steps 8 and 16
    python tools/bench.py --presets f32,q4_k_m --steps 8 --reps 3
    python tools/bench.py --quick                  # smoke run, well under a minute once the model is cached
    python tools/bench.py -m model.dgf [--hf hf_folder]   # any .dgf (transformers only with its HF folder)
    python tools/bench.py --json                   # machine-readable
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


def bench_prompt(vocab_size: int, length: int = 64) -> list[int]:
    """The fixed prompt: `length` token ids drawn with seed 0 (ids 0-2 are pad/eos/bos, left out)."""
    import numpy as np

    return [int(t) for t in np.random.default_rng(0).integers(3, vocab_size, length)]


class Timer:
    """Wraps a callable: accumulates wall time per call, split by a key of the call's arguments."""

    def __init__(self, fn: Any, key: Any = None):
        self.fn, self.key = fn, key
        self.calls: list[tuple[Any, float]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.calls.append((self.key(*args, **kwargs) if self.key else None, time.perf_counter() - start))
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
        self.decode = graph.decode = Timer(graph.decode)
        self.encode = graph.encode = Timer(graph.encode, key=lambda ids, cache: len(ids))

    def info(self) -> dict[str, Any]:
        backend = self.model.backend
        return {"backend": backend.name, "isa": getattr(backend, "isa", None),
                "threads": getattr(backend, "threads", None)}

    def run(self, prompt: list[int], new_tokens: int, steps: int) -> int:
        out = self.model.generate(prompt, max_new_tokens=new_tokens, max_denoising_steps=steps, seed=0,
                                  adaptive_stopping=False)
        return len(out.tokens)


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
    engine.run(prompt, engine.canvas, 2)  # warm-up: first-touch of weights, allocator, lazy initialisation
    print(json.dumps({"ready": True, "baseline_rss_mb": baseline, **engine.info()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            print(json.dumps({"peak_rss_mb": peak_rss_mb()}), flush=True)
            return
        engine.decode.calls.clear()
        engine.encode.calls.clear()
        start = time.perf_counter()
        made = engine.run(prompt, request["new_tokens"], request["steps"])
        seconds = time.perf_counter() - start
        decode = [t for _, t in engine.decode.calls]
        encode = [t for n, t in engine.encode.calls if n == engine.canvas]
        print(json.dumps({
            "tokens": made, "seconds": seconds, "tok_s": made / seconds, "decoder_passes": len(decode),
            "ms_pass": 1e3 * sum(decode) / max(len(decode), 1),
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
    """A started worker process and its label."""

    def __init__(self, label: str, spec: dict[str, Any], file_mb: float | None):
        self.label, self.spec, self.file_mb = label, spec, file_mb
        env = dict(os.environ)
        threads = str(spec["threads"])
        # Thread pools that read the environment at import (OpenBLAS under numpy, OpenMP under torch).
        env.update(OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info: dict[str, Any] = {}
        self.runs: dict[int, list[dict[str, Any]]] = {}
        self.peak_rss_mb: float | None = None

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.label} exited (code {self.proc.wait()})")
        return json.loads(line)

    def ready(self) -> None:
        self.info = self._read()

    def run(self, steps: int, new_tokens: int) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"steps": steps, "new_tokens": new_tokens}) + "\n")
        self.proc.stdin.flush()
        result = self._read()
        self.runs.setdefault(steps, []).append(result)
        return result

    def quit(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
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
            "ms_enc": med("ms_enc"), "peak_rss_mb": worker.peak_rss_mb, "file_mb": worker.file_mb,
            "tokens": runs[0]["tokens"] if runs else None, "reps": len(runs),
            "tok_s_best": max((r["tok_s"] for r in runs), default=None),
            "tok_s_all": [r["tok_s"] for r in runs], "info": worker.info}


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def format_table(rows: list[dict[str, Any]]) -> str:
    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    def rat(x: float | None) -> str:
        return "" if x is None else f"({x:.2f}x)"

    head = ["engine", "file MiB", "steps", "tok/s", "", "best", "ms/pass", "", "ms/enc", "", "peak RSS MiB", ""]
    lines = [head]
    for r in rows:
        lines.append([r["engine"], num(r["file_mb"], ".1f"), str(r["steps"]), num(r["tok_s"], ".1f"),
                      rat(r.get("tok_s_ratio")), num(r.get("tok_s_best"), ".1f"), num(r["ms_pass"], ".1f"),
                      rat(r.get("ms_pass_ratio")),
                      num(r["ms_enc"], ".1f"), rat(r.get("ms_enc_ratio")), num(r["peak_rss_mb"], ".0f"),
                      rat(r.get("rss_ratio"))])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for n, line in enumerate(lines):
        cells = [c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(line)]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


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
            workers.append(Worker(label, {"engine": "step", "path": str(path), "backend": backend, "threads": threads,
                                          "prompt_tokens": args.prompt_tokens, "int8": setting, "layers": layers},
                                  path.stat().st_size / 2**20))
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
                     "step_s": step, "decode_s": med(w, "decode"), "enc_s": enc,
                     "step_vs_matmul": None if bare is None else step / bare,
                     "tok_s_16_steps": canvas / (16 * step + enc), "peak_rss_mb": peak, "file_mb": file_mb,
                     "rss_over_file_gib": (peak - file_mb) / 1024, "sparse_rows": w.runs[0][-1].get("sparse_rows"),
                     "steps": [r["step"] for r in w.runs[0]]})
    target = released["num_hidden_layers"]
    extrapolated = []
    for setting in settings:
        fit = [r for r in rows if r["int8"] == setting]
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
    machine = {**machine_info(), "threads": threads, "reps": reps,
               "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    if args.json:
        print(json.dumps({"machine": machine, "matmul_s": bare, "rows": rows, "extrapolated": extrapolated},
                         indent=2))
        return
    print(f"# {machine['cpu']}, {threads} threads; the released widths, q4_k_m, random weights; "
          f"{args.prompt_tokens}-token prompt, canvas {canvas}; median of {reps}; load average at the end "
          f"{machine['load_average'] or 0:.1f}")
    if bare is not None:
        print(f"bare numpy float32 matmul {canvas} x {hidden} x {vocab}: {bare:.2f} s")
    head = ["file", "GiB", "step s", "x matmul", "decode s", "enc s", "tok/s @16", "peak RSS GiB", "RSS - file",
            "sparse rows"]
    lines = [head]
    for r in rows + extrapolated:
        ratio = r["step_vs_matmul"]
        lines.append([r["engine"], f"{r['file_mb'] / 1024:.2f}", f"{r['step_s']:.2f}",
                      "-" if ratio is None else f"{ratio:.2f}", f"{r['decode_s']:.2f}" if "decode_s" in r else "-",
                      f"{r['enc_s']:.2f}", f"{r['tok_s_16_steps']:.2f}", f"{r['peak_rss_mb'] / 1024:.2f}",
                      f"{(r['peak_rss_mb'] - r['file_mb']) / 1024:.2f}",
                      f"{r['sparse_rows']}/{canvas}" if r.get("sparse_rows") is not None else "-"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for n, line in enumerate(lines):
        print("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(line)).rstrip())
        if n == 0:
            print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    print("(goals on 2 layers: step <= 1.6x the matmul, peak RSS <= file + 0.6 GiB; tok/s @16 = 256 tokens per "
          "16 steps and one encoder pass)")


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

    steps = [int(s) for s in (args.steps or ("4" if args.quick else "8,16")).split(",")]
    new_tokens = args.new_tokens or (256 if args.quick else 512)
    reps = args.reps or (1 if args.quick else 3)
    threads = args.threads or default_threads()
    presets = (args.presets or ("f32,q8_0" if args.quick else ",".join(ALL_PRESETS))).split(",")
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
    common = {"threads": threads, "prompt_tokens": args.prompt_tokens}
    workers = []
    if hf is not None and not args.no_transformers:
        workers.append(Worker("transformers", {"engine": "transformers", "hf": str(hf), **common}, None))
    for name, path in files.items():
        workers.append(Worker(f"dgrun {backend} {name}", {"engine": "dgrun", "path": str(path), "backend": backend,
                                                          **common}, path.stat().st_size / 2**20))
    try:
        for w in workers:
            w.ready()
        log(f"{len(workers)} engines ready; {reps} rep(s) x steps {steps} x {new_tokens} tokens, {threads} threads")
        for rep in range(reps):
            # Interleaved, A B C / B C A / C A B ...: each engine takes every position in turn, so neither a
            # warming machine nor another tenant's periodic load favours one of them.
            order = workers[rep % len(workers):] + workers[:rep % len(workers)]
            for s in steps:
                for w in order:
                    result = w.run(s, new_tokens)
                    log(f"  rep {rep + 1} steps {s:>3} {w.label:<24} {result['tok_s']:8.1f} tok/s  "
                        f"{result['ms_pass']:7.1f} ms/pass")
    finally:
        for w in workers:
            try:
                w.quit()
            except Exception:  # a crashed worker: report what the others measured
                w.proc.kill()

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
    info = {**machine_info(), "threads": threads, "new_tokens": new_tokens, "prompt_tokens": args.prompt_tokens,
            "reps": reps, "backend": backend, "dgrun_kernels": next((w.info.get("isa") for w in workers
                                                                     if w.label.startswith("dgrun")), None)}
    if args.json:
        print(json.dumps({"machine": info, "rows": rows}, indent=2))
        return
    print(f"# {info['cpu']}, {threads} threads; {args.prompt_tokens}-token prompt, {new_tokens} new tokens, "
          f"median of {reps}; dgrun backend {backend} (kernels: {info['dgrun_kernels']})")
    print(format_table(rows))
    if any("tok_s_ratio" in r for r in rows):
        print("(ratios: dgrun / transformers; tok/s above 1 is faster, ms and RSS below 1 are better)")


if __name__ == "__main__":
    main()
