"""Batched generation and the Scheduler: every element gets exactly what it gets alone (batch invariance).

No tolerance anywhere in this file: batch invariance is bit-for-bit. Each backend op must give a row the same
bits whatever else shares the call (checked per op, in calls of 1 to 64 rows, on every backend here, and on the
cpu backend once per float kernel set and, for a quantized file, once per int8 kernel set); then a
batched decoder pass gives each element the logits of its own pass; then generation gives each element the
events (every draft, every commit) of its own run, on numpy, cpu and mlx, whatever joins, leaves, stops or is
cancelled around it, and with transformers' recorded draws replayed per element.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from fixtures import CHAT_TEMPLATE, hf_generate
from test_cuda import device, fake, gpu  # noqa: F401  (fixtures: the cuda backend on the host stand-in / a GPU)
from test_reference import GENERATION_CASES, dgrun_params

import dgrun
from dgrun import Commit, Draft, ModelBusyError, ReplayRng, Scheduler
from dgrun.backends import available_backends

GENERATION_BACKENDS = [b for b in ("numpy", "cpu", "mlx") if b in available_backends()]


def _op_backends() -> list[Any]:
    """numpy, the cpu backend once per kernel set this CPU runs, mlx, and a real GPU when there is one."""
    out: list[Any] = ["numpy"]
    if "cpu" in GENERATION_BACKENDS:
        from dgrun.backends.cpu_backend import CpuBackend

        for isa in ("avx512", "avx2", "generic"):
            try:
                CpuBackend(isa=isa)
                out.append(f"cpu-{isa}")
            except RuntimeError:
                pass
    out += [b for b in ("mlx",) if b in GENERATION_BACKENDS] + ["cuda"]
    return out


def _int8_backends() -> list[str]:
    """The cpu backend's integer arithmetic, once per int8 kernel set this CPU runs (quantized and BF16 files)."""
    if "cpu" not in GENERATION_BACKENDS:
        return []
    from dgrun.backends.cpu_backend import CpuBackend

    out = []
    for name in ("avx512bf16", "avx512vnni", "avxvnni", "avx2", "generic"):
        try:
            CpuBackend(int8=name)
            out.append(f"cpu-int8={name}")
        except RuntimeError:
            pass
    return out


@pytest.fixture
def loaded(request, checkpoints, monkeypatch):
    """A model on the parametrized backend: (backend spec, outtype) → Model."""
    spec, outtype = request.param
    name, _, isa = spec.partition("-")
    if name == "cuda":
        request.getfixturevalue("gpu")  # skips without a GPU
    if isa:
        int8 = isa.startswith("int8=")
        monkeypatch.setenv("DGRUN_CPU_INT8" if int8 else "DGRUN_CPU_ISA", isa.removeprefix("int8="))
        monkeypatch.setenv("DGRUN_THREADS", "2")  # threads split work; they must not split a row's sums
    ckpt = checkpoints["base" if outtype == "f32" else "quant"]
    with dgrun.load(ckpt.dgf(outtype), backend=name) as model:
        yield model


def _bits(x: Any, ops: Any) -> np.ndarray:
    a = np.asarray(ops.to_numpy(x))
    return a.view(np.uint32) if a.dtype == np.float32 else a.astype(np.int64)


# the int8 sets on a quantized file, and those with bfloat16 products (dg_int8.c's BF16_SET) on a BF16 file
INT8_CASES = [(b, "q4_k_m") for b in _int8_backends()] + [
    (b, "bf16") for b in _int8_backends() if b.endswith(("=avx512bf16", "=generic"))]
OP_CASES = [(b, t) for b in _op_backends() for t in ("f32", "q4_k_m")] + INT8_CASES


@pytest.mark.parametrize("loaded", OP_CASES, ids=[f"{b}-{t}" for b, t in OP_CASES], indirect=True)
def test_every_batched_op_computes_a_row_the_same_in_calls_of_any_size(loaded):
    """A probe row alone, and at several places among 2, 16 and 63 other rows: the same bits from every op the
    decoder runs over a whole batch's rows (attention, the soft embedding and the sampler run per element)."""
    model = loaded
    graph, ops, cfg = model.graph, model.backend, model.config
    w, vec, p = graph.w, graph.vec, "blk.2."
    rng = np.random.default_rng(0)
    hidden, heads, d = cfg.hidden_size, cfg.num_attention_heads, cfg.layer_head_dim(2)
    probe = rng.normal(0, 1, hidden).astype(np.float32)
    probe_id, probe_pos = 7, 37

    def rows(n: int, at: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = rng.normal(0, 1, (n, hidden)).astype(np.float32)
        ids, pos = rng.integers(0, cfg.vocab_size, n), rng.integers(0, 200, n)
        x[at], ids[at], pos[at] = probe, probe_id, probe_pos
        return x, ids, pos

    def route(x: Any) -> tuple[Any, Any]:
        return ops.route(x, w[p + "ffn_gate_inp.weight"], vec[p + "ffn_gate_inp.scale"],
                         vec[p + "ffn_down_exps.scale"], cfg.top_k_experts, cfg.rms_norm_eps)

    op_list = {
        "embed": lambda x, ids, pos: [ops.embed(w["token_embd.weight"], ids, cfg.embed_scale)],
        "rms_norm": lambda x, ids, pos: [ops.rms_norm(x, vec[p + "attn_norm.weight"], cfg.rms_norm_eps),
                                         ops.rms_norm(x, None, cfg.rms_norm_eps)],
        "linear": lambda x, ids, pos: [ops.linear(x, w[p + "attn_q.weight"]), ops.linear(x, graph.output)],
        "rope": lambda x, ids, pos: [ops.rope(ops.linear(x, w[p + "attn_q.weight"]).reshape(len(ids), heads, d),
                                              pos, graph.inv_freq[2])],
        "gated_mlp": lambda x, ids, pos: [ops.gated_mlp(x, w[p + "ffn_gate.weight"], w[p + "ffn_up.weight"],
                                                        w[p + "ffn_down.weight"])],
        "route": lambda x, ids, pos: list(route(x)),
        # The other rows route elsewhere, so every call groups the experts' tokens differently.
        "experts": lambda x, ids, pos: [ops.experts(x, *route(x), w[p + "ffn_gate_up_exps.weight"],
                                                    w[p + "ffn_down_exps.weight"])],
        "softcap": lambda x, ids, pos: [ops.softcap(ops.linear(x, graph.output), cfg.final_logit_softcapping)],
        "logits": lambda x, ids, pos: [ops.logits(x, graph.output, cfg.final_logit_softcapping)],
    }
    for name, op in op_list.items():
        x, ids, pos = rows(1, 0)
        alone = [_bits(out, ops)[0] for out in op(ops.asarray(x), ids, pos)]
        for n, at in ((3, 1), (17, 0), (17, 16), (64, 37)):
            x, ids, pos = rows(n, at)
            for k, out in enumerate(op(ops.asarray(x), ids, pos)):
                got = _bits(out, ops)[at]
                assert np.array_equal(got, alone[k]), \
                    f"{name} (output {k}): row {at} of {n} differs from the same row alone"


MODEL_CASES = ([(b, "f32") for b in _op_backends()] + [("cpu", "q4_k_m")] * ("cpu" in GENERATION_BACKENDS)
               + INT8_CASES)


def _decode_batch_matches_decode_alone(model: Any) -> None:
    graph, ops, cfg = model.graph, model.backend, model.config
    rng = np.random.default_rng(1)
    vocab, length = cfg.vocab_size, cfg.canvas_length
    caches = []
    for prompt_length, committed in ((5, 0), (21, 2), (12, 1)):  # different cache lengths, windows trimmed
        cache = graph.new_cache()
        graph.encode(rng.integers(0, vocab, prompt_length), cache)
        for _ in range(committed):
            graph.encode(rng.integers(0, vocab, length), cache)
        caches.append(cache)
    canvases = [rng.integers(0, vocab, length) for _ in caches]
    signals = [ops.asarray(rng.normal(0, 3, (length, vocab)).astype(np.float32)), None,
               ops.asarray(rng.normal(0, 3, (length, vocab)).astype(np.float32))]
    batched = graph.decode_batch(canvases, caches, signals)
    for j in range(len(caches)):
        alone = graph.decode(canvases[j], caches[j], signals[j])
        assert np.array_equal(_bits(batched[j], ops), _bits(alone, ops)), f"element {j}'s logits differ"


@pytest.mark.parametrize("loaded", MODEL_CASES, ids=[f"{b}-{t}" for b, t in MODEL_CASES], indirect=True)
def test_a_batched_decoder_pass_gives_each_element_the_logits_of_its_own_pass(loaded):
    _decode_batch_matches_decode_alone(loaded)


def test_a_batched_decoder_pass_on_the_fake_cuda_device(device, checkpoints):  # noqa: F811
    """The cuda backend's batching plumbing (row views, concatenation, per-element attention), on the host
    stand-in, then on a GPU when there is one."""
    with dgrun.load(checkpoints["base"].dgf("f32"), backend="cuda") as model:
        _decode_batch_matches_decode_alone(model)


# -- generation: each element's events are those of its own run ---------------------------------------------------


PROMPTS = [[2, 17, 33, 5, 60], list(range(2, 24)), [2, 40, 41], [2, 9, 4, 77, 90, 12, 13, 3]]
SEEDS = [0, 1, 2, 3]
# Adaptive stopping fires mid-canvas on this fixture (its mean entropy falls below 0.35 after some steps).
ADAPTIVE = dict(max_new_tokens=40, max_denoising_steps=12, stability_threshold=0, confidence_threshold=0.35)


def _key(event: Draft | Commit) -> tuple:
    if isinstance(event, Draft):
        return ("draft", event.canvas_index, event.step, event.tokens.tolist(), event.accepted.tolist())
    return ("commit", event.canvas_index, event.tokens, event.steps, event.finished)


def _solo(model: Any, prompt: Any, seed: int, **params: Any) -> list[tuple]:
    return [_key(e) for e in model.stream(prompt, seed=seed, **params)]


@pytest.fixture(scope="module", params=GENERATION_BACKENDS)
def gen_model(request, checkpoints):
    """The damped generation fixture on one backend, with an EOS id that lands mid-way into element 0's second
    canvas (found from a free run), so the batch holds elements ending at different canvases and steps."""
    with dgrun.load(checkpoints["gen"].dgf("f32"), backend=request.param) as model:
        model.generation_config.eos_token_ids = []
        free = [t for e in model.stream(PROMPTS[0], seed=SEEDS[0], **ADAPTIVE) if isinstance(e, Commit)
                for t in e.tokens]
        position = next(i for i in range(20, 32) if free[i] not in free[:i])
        model.generation_config.eos_token_ids = [free[position]]
        model.chat_template = CHAT_TEMPLATE
        yield model


def test_batch_events_equal_each_elements_own_run(gen_model):
    model = gen_model
    solo = [_solo(model, p, s, **ADAPTIVE) for p, s in zip(PROMPTS, SEEDS, strict=True)]
    batched: list[list[tuple]] = [[] for _ in PROMPTS]
    for j, event in model.stream_batch(PROMPTS, seed=SEEDS, **ADAPTIVE):
        batched[j].append(_key(event))
    for j in range(len(PROMPTS)):
        assert batched[j] == solo[j], f"element {j} differs from its own run"
    # What the batch held: an EOS mid-canvas, elements ending at different canvases, canvases of different steps.
    commits = [[e for e in run if e[0] == "commit"] for run in solo]
    first = [t for c in commits[0] for t in c[2]]
    assert first[-1] in model.generation_config.eos_token_ids and len(first) % model.config.canvas_length
    assert len({len(c) for c in commits}) > 1
    assert len({c[3] for run in commits for c in run}) > 1
    outputs = model.generate_batch(PROMPTS, seed=SEEDS, **ADAPTIVE)
    assert [o.tokens for o in outputs] == [[t for c in run for t in c[2]] for run in commits]
    assert [o.stats["steps_per_canvas"] for o in outputs] == [[c[3] for c in run] for run in commits]


def test_one_seed_gives_every_element_that_seed(gen_model):
    outputs = gen_model.generate_batch([PROMPTS[2]] * 2 + [PROMPTS[1]], seed=5, max_new_tokens=16,
                                       max_denoising_steps=4)
    alone = gen_model.generate(PROMPTS[1], seed=5, max_new_tokens=16, max_denoising_steps=4)
    assert outputs[0].tokens == outputs[1].tokens and outputs[2].tokens == alone.tokens


@pytest.fixture(scope="module")
def replayed(checkpoints):
    """transformers' own runs of two prompts (seeds 0 and 1), with their recorded draws."""
    params = GENERATION_CASES["adaptive_stop"]
    prompts = [PROMPTS[0], PROMPTS[1]]
    return params, prompts, [hf_generate(checkpoints["gen"].model, p, seed=s, **params)
                             for s, p in enumerate(prompts)]


@pytest.mark.parametrize("backend", GENERATION_BACKENDS)
def test_transformers_draws_replayed_for_two_elements_in_one_batch(checkpoints, replayed, backend):
    params, prompts, runs = replayed
    rngs = [ReplayRng(draws) for _, draws in runs]
    with dgrun.load(checkpoints["gen"].dgf("f32"), backend=backend) as model:
        model.generation_config.eos_token_ids = list(params.get("eos_token_id") or [])
        outputs = model.generate_batch(prompts, rng=rngs, **dgrun_params(params))
    for j, ((hf_tokens, draws), rng, out) in enumerate(zip(runs, rngs, outputs, strict=True)):
        assert out.tokens == hf_tokens, f"element {j}"
        assert rng.position == len(draws), f"element {j} used {rng.position} of {len(draws)} recorded draws"
    assert outputs[0].stats["steps_per_canvas"] != outputs[1].stats["steps_per_canvas"]


# -- the scheduler -----------------------------------------------------------------------------------------------


STEPS = dict(max_denoising_steps=5, adaptive_stopping=False)  # exactly 5 passes per canvas


@pytest.fixture(params=GENERATION_BACKENDS)
def sched_model(request, checkpoints):
    """The generation fixture with a chat template and no EOS (so every element runs its full length)."""
    with dgrun.load(checkpoints["gen"].dgf("f32"), backend=request.param) as model:
        model.generation_config.eos_token_ids = []
        model.chat_template = CHAT_TEMPLATE
        yield model


def _pause_passes(monkeypatch: pytest.MonkeyPatch, model: Any, when: Any) -> tuple[list, threading.Event,
                                                                                     threading.Event]:
    """Record every decoder pass's caches; at a pass where `when(pass number, caches)` holds, the worker stops
    until the test lets it go: (passes, arrived, go)."""
    passes: list[list[Any]] = []
    arrived, go = threading.Event(), threading.Event()
    decode_batch = model.graph.decode_batch

    def recording(canvases, caches, self_conds):
        passes.append(list(caches))
        if when(len(passes), caches):
            arrived.set()
            assert go.wait(60), "the test never let the worker go on"
            go.clear()
        return decode_batch(canvases, caches, self_conds)

    monkeypatch.setattr(model.graph, "decode_batch", recording)
    return passes, arrived, go


def test_scheduler_elements_joining_leaving_and_cancelled_get_what_they_get_alone(sched_model, monkeypatch):
    model = sched_model
    chat_ids = model.apply_chat_template([{"role": "user", "content": "hello world"}], tokenize=True)
    doomed_cache = model.graph.new_cache()
    def doomed_passes(caches: list[Any]) -> int:
        return sum(c is doomed_cache for c in caches)

    passes, arrived, go = _pause_passes(monkeypatch, model, lambda n, caches: n == 6 or (
        doomed_passes(caches) and sum(map(doomed_passes, passes)) == 3))
    with Scheduler(model, max_batch=3) as scheduler:
        plain = scheduler.submit(model.request(PROMPTS[1], seed=1, max_new_tokens=40, **STEPS))
        assert arrived.wait(60)
        arrived.clear()  # the worker is in pass 6: plain, alone, is in its second canvas
        others = {
            "infill": scheduler.submit(model.infill_request("def f(x):", "return x", 6, seed=2, **STEPS)),
            "edit": scheduler.submit(model.edit_request("x = [1, 2, 3]", [(5, 9)], seed=3, **STEPS)),
            "chat": scheduler.submit(model.request(chat_ids, seed=4, max_new_tokens=40, **STEPS)),
            "doomed": scheduler.submit(model.request(PROMPTS[3], seed=5, cache=doomed_cache, max_new_tokens=64,
                                                     **STEPS)),
        }
        assert scheduler.queued == 4
        go.set()
        assert arrived.wait(60)  # the doomed element's third pass: cancelled, it leaves before the next one
        scheduler.cancel(others["doomed"])
        go.set()
        got = {"plain": _drain(plain), **{name: _drain(h) for name, h in others.items()}}
        assert all(h.done for h in [plain, *others.values()]) and scheduler.running == scheduler.queued == 0
    monkeypatch.undo()
    sizes = [len(p) for p in passes]
    # plain alone; then infill and edit join it (max_batch 3); chat and doomed take their places as they leave.
    assert sizes[:6] == [1] * 6 and sizes[6:11] == [3] * 5 and sizes[11:14] == [3] * 3 and sizes[14] == 2
    assert others["doomed"].cancelled and not plain.cancelled
    assert others["doomed"].result().tokens == [] and plain.result().tokens
    assert got["plain"] == _solo(model, PROMPTS[1], 1, max_new_tokens=40, **STEPS)
    assert got["chat"] == _solo(model, chat_ids, 4, max_new_tokens=40, **STEPS)
    assert got["infill"] == [_key(e) for e in model.stream_infill("def f(x):", "return x", 6, seed=2, **STEPS)]
    assert got["edit"] == [_key(e) for e in model.stream_edit("x = [1, 2, 3]", [(5, 9)], seed=3, **STEPS)]
    assert got["doomed"] == _solo(model, PROMPTS[3], 5, max_new_tokens=64, **STEPS)[:3]


def _drain(handle: dgrun.Handle) -> list[tuple]:
    return [_key(e) for e in handle]


def test_a_failing_element_fails_alone(checkpoints, monkeypatch):
    with dgrun.load(checkpoints["gen"].dgf("f32"), backend="numpy") as model:
        poisoned_cache = model.graph.new_cache()
        decode_batch = model.graph.decode_batch

        def poisoning(canvases, caches, self_conds):
            logits = decode_batch(canvases, caches, self_conds)
            for cache, element_logits in zip(caches, logits, strict=True):
                if cache is poisoned_cache:
                    element_logits[3, 5] = np.nan
            return logits

        monkeypatch.setattr(model.graph, "decode_batch", poisoning)
        with Scheduler(model) as scheduler:
            bad = scheduler.submit(model.request(PROMPTS[0], seed=0, cache=poisoned_cache, **FAST))
            good = scheduler.submit(model.request(PROMPTS[1], seed=1, **FAST))
            with pytest.raises(FloatingPointError, match="NaN logits"):
                list(bad)
            with pytest.raises(FloatingPointError):
                bad.result()
            tokens = good.result(timeout=60).tokens
        monkeypatch.undo()
        assert tokens == model.generate(PROMPTS[1], seed=1, **FAST).tokens


FAST = dict(max_new_tokens=24, max_denoising_steps=3)


def test_the_scheduler_owns_the_model_while_it_is_open(checkpoints):
    with dgrun.load(checkpoints["gen"].dgf("f32"), backend="numpy") as model:
        scheduler = Scheduler(model)
        with pytest.raises(ModelBusyError):
            model.generate(PROMPTS[0], **FAST)
        with pytest.raises(ModelBusyError):
            Scheduler(model)
        handle = scheduler.submit(model.request(PROMPTS[0], seed=0, **FAST))
        scheduler.close()
        assert handle.done  # finished or cancelled by close, never left waiting
        with pytest.raises(RuntimeError, match="closed"):
            scheduler.submit(model.request(PROMPTS[0], seed=0, **FAST))
        assert model.generate(PROMPTS[0], seed=0, **FAST).tokens  # handed back
        stream = model.stream(PROMPTS[0], seed=0, **FAST)
        next(stream)
        with pytest.raises(ModelBusyError):  # a generation in progress keeps a scheduler out
            Scheduler(model)
        stream.close()
        with pytest.raises(ValueError, match="max_batch"):
            Scheduler(model, max_batch=0)


# -- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompts, kwargs, message", [
    ([], {}, "non-empty list"),
    ("def f(x):", {}, "non-empty list"),
    ([[2, 3], [2, 999]], {}, "prompt 1: token id 999 is outside the vocabulary"),
    ([[2, 3], []], {}, "prompt 1: the prompt is empty"),
    ([[2, 3], [[2]]], {}, "prompt 1: a prompt must be"),
    ([[2, 3]] * 3, {"max_batch": 2}, "3 prompts exceed max_batch=2"),
    ([[2, 3]] * 2, {"seed": [1, 2, 3]}, "seed must be one value or a list of one per prompt"),
    ([[2, 3]] * 2, {"seed": [1, -2]}, "seed 1 is not valid"),
    ([[2, 3]] * 2, {"rng": [None, 5]}, "rng 1 is not valid"),
    ([[2, 3]] * 2, {"max_denoising_steps": 0}, "max_denoising_steps must be"),
    ([[2, 3]] * 2, {"max_new_tokens": 10**9}, "prompt 0: prompt .* exceeds the model's context"),
])
def test_bad_batches_are_refused_before_anything_runs(checkpoints, prompts, kwargs, message):
    with dgrun.load(checkpoints["gen"].dgf("f32"), backend="numpy") as model:
        with pytest.raises(ValueError, match=message):
            model.generate_batch(prompts, **kwargs)
        with pytest.raises(ValueError, match=message):
            model.stream_batch(prompts, **kwargs)  # refused at the call, not at the first event
        assert model.generate([2, 3], seed=0, **FAST).tokens  # nothing was left holding the model
