"""Constrained output (dgrun.constrain): JSON Schema, regex and Lark grammars hold on random-weight models.

Validity is checked by the grammar's own judges, never by dgrun: the `jsonschema` package, `re.fullmatch`, and
llguidance's matcher for Lark. The models are tiny random networks with real tokenizers (the demo's 4096-piece
SentencePiece with byte fallback, and a byte-level BPE `tokenizer.json`): random weights write no JSON of their
own, so every valid answer is the constraint's doing. The masking ops are bit-exact across backends (a masked
logit is a constant and an argmax an index: no tolerance applies).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from fixtures import CHAT_TEMPLATE, make_model, save_checkpoint, text_config, train_bpe_tokenizer
from fixtures import PERSON_SCHEMA as PERSON
from test_cuda import fake, gpu  # noqa: F401  (fixtures: the cuda backend on the host stand-in / a GPU)

import dgrun
from dgrun import sampler
from dgrun.backends import available_backends, get_backend
from dgrun.cli import main as cli_main
from dgrun.constrain import CanvasGuide, ConstraintError, response_format_args
from dgrun.converters.convert_hf import convert
from dgrun.engine import default_model_path
from dgrun.format import GGUFFile
from dgrun.tokenizer import SPM_TENSOR

LONG_REGEX = r"([a-z]{3}-[0-9]{2} ){6}(yes|no)"  # at least 44 characters: longer than a 16-token canvas
ARITHMETIC = """
start: expr
expr: term (("+" | "-") term)*
term: NUMBER | "(" expr ")"
NUMBER: /[0-9]{1,3}/
"""
CASES = {"json": {"json_schema": PERSON}, "regex": {"regex": LONG_REGEX}, "lark": {"grammar": ARITHMETIC}}
FAST = dict(max_denoising_steps=6, max_new_tokens=128)


@pytest.fixture(scope="module")
def guided(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random-weight models (canvas 16) with tokenizers that can write JSON: "spm" and "hf" → .dgf path."""
    out = {}
    for kind, vocab in (("spm", 4096), ("hf", 512)):
        folder = tmp_path_factory.mktemp(f"guided-{kind}") / "hf"
        model = make_model(text_config(vocab_size=vocab), seed=11)
        save_checkpoint(model, folder, tokenizer=False)
        if kind == "spm":
            with GGUFFile(default_model_path()) as demo:
                (folder / "tokenizer.model").write_bytes(demo.raw(SPM_TENSOR).tobytes())
        else:
            train_bpe_tokenizer(folder, vocab, ["<pad>", "</s>", "<s>"], byte_level=True)
        (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True,
                                                                  "chat_template": CHAT_TEMPLATE}))
        out[kind] = folder.parent / f"{kind}.dgf"
        convert(folder, out[kind], "f32", quiet=True)
    return out


def load_fast(path: Path) -> dgrun.Model:
    """The cpu backend on one thread where it runs (a tiny model gains nothing from more, and threads that wait
    on each other crawl on a busy 2-core machine), else numpy."""
    if "cpu" not in available_backends():
        return dgrun.load(path, backend="numpy")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DGRUN_THREADS", "1")
        return dgrun.load(path, backend="cpu")


@pytest.fixture(scope="module", params=["spm", "hf"])
def model(request: pytest.FixtureRequest, guided: dict[str, Path]):
    with load_fast(guided[request.param]) as loaded:
        yield loaded


def answer_text(model: dgrun.Model, tokens: list[int]) -> str:
    """The answer's text without the EOS that ended it."""
    assert tokens and tokens[-1] in model.generation_config.eos_token_ids, f"no EOS at the end: {tokens}"
    return model.detokenize(tokens[:-1]) or ""


def check_valid(model: dgrun.Model, case: str, tokens: list[int]) -> str:
    text = answer_text(model, tokens)
    if case == "json":
        jsonschema.validate(json.loads(text), PERSON)
    elif case == "regex":
        assert re.fullmatch(LONG_REGEX, text), text
    assert model.constraint(**CASES[case]).accepts(tokens), text  # llguidance's own check, for every kind
    return text


@pytest.mark.parametrize("case", list(CASES))
def test_constrained_answers_are_valid_on_random_models(model, case):
    for seed in range(3):
        out = model.generate("Write it:", seed=seed, **FAST, **CASES[case])
        check_valid(model, case, out.tokens)
        assert out.stats["constraint"]["masked_rows"] > 0
        if case == "regex":
            assert out.stats["canvases"] >= 2  # the answer spans canvases: the matcher carries over


def test_answers_vary_with_the_seed(model):
    texts = {answer_text(model, model.generate("x", seed=s, **FAST, regex=r"[a-z]{2,12}").tokens) for s in range(4)}
    assert len(texts) > 1, texts


def test_a_tight_budget_still_parses_and_a_hopeless_one_stops_at_the_budget(model):
    minimal = len(model.tokenize('{"name": "", "age": 0, "role": "user", "address": {"city": "", "zip": '
                                 '"00000"}, "score": 0}', add_bos=False))
    for seed in range(2):
        out = model.generate("x", seed=seed, max_denoising_steps=6, max_new_tokens=minimal + 12, json_schema=PERSON)
        check_valid(model, "json", out.tokens)
        assert len(out.tokens) <= minimal + 12
    out = model.generate("x", seed=0, max_denoising_steps=6, max_new_tokens=8, json_schema=PERSON)
    assert len(out.tokens) == 8 and out.tokens[-1] not in model.generation_config.eos_token_ids
    for seed in range(3):  # a grammar that may end anywhere: the EOS still fits in the budget
        out = model.generate("x", seed=seed, max_denoising_steps=3, max_new_tokens=5, regex="[a-z ]+")
        assert len(out.tokens) <= 5 and re.fullmatch("[a-z ]+", answer_text(model, out.tokens))


def test_forced_tokens_need_no_decoder_pass(model):
    literal = "0123456789" * 5  # the grammar forces every token: canvases are written without the decoder
    out = model.generate("x", seed=0, **FAST, regex=re.escape(literal))
    assert answer_text(model, out.tokens) == literal
    assert out.stats["decoder_passes"] == 0 and out.stats["canvases"] >= 2


def test_batch_and_scheduler_give_each_element_its_answer_alone(model):
    prompts, seeds = ["a", "bb", "ccc"], [3, 4, 5]
    kinds = [CASES["json"], CASES["json"], CASES["json"]]
    alone = [model.generate(p, seed=s, **FAST, **k).tokens for p, s, k in zip(prompts, seeds, kinds, strict=True)]
    batch = model.generate_batch(prompts, seed=seeds, **FAST, json_schema=PERSON)
    assert [o.tokens for o in batch] == alone
    mixed = [CASES["regex"], {}, CASES["lark"]]  # per-request constraints, and none, side by side
    alone = [model.generate(p, seed=s, **FAST, **k).tokens for p, s, k in zip(prompts, seeds, mixed, strict=True)]
    with dgrun.Scheduler(model, max_batch=3) as scheduler:
        handles = [scheduler.submit(model.request(p, seed=s, **FAST, **k))
                   for p, s, k in zip(prompts, seeds, mixed, strict=True)]
        assert [h.result(timeout=600).tokens for h in handles] == alone


def test_chat_and_chat_session_take_a_constraint(model):
    out = model.chat([{"role": "user", "content": "hi"}], seed=1, **FAST, json_schema=PERSON)
    check_valid(model, "json", out.tokens)
    session = dgrun.ChatSession(model, seed=2, params=dict(FAST))
    for _ in range(2):
        assert re.fullmatch("(yes|no)!", session.send("ok?", regex="(yes|no)!").text.removesuffix("</s>"))


def test_without_a_constraint_none_of_it_runs(model, monkeypatch):
    """The unconstrained path never touches the constraint machinery (its token-exactness with transformers is
    tests/test_reference.py's)."""
    def refuse(*args, **kwargs):
        raise AssertionError("constraint machinery ran without a constraint")

    for name in ("mask_rows", "argmax_rows"):
        monkeypatch.setattr(type(model.backend), name, refuse)
    monkeypatch.setattr(CanvasGuide, "__init__", refuse)
    out = model.generate("x", seed=0, max_denoising_steps=3, max_new_tokens=20)
    assert "constraint" not in out.stats


def test_bad_constraints_fail_in_one_line(model):
    cases = [
        (dict(regex="(("), "regex does not compile"),
        (dict(grammar="start: missing_rule"), "grammar does not compile"),
        (dict(json_schema={"type": "wat"}), "json schema does not compile"),
        (dict(json_schema="{not json"), "not valid JSON"),
        (dict(json_schema=[1]), "must be a JSON object"),
        (dict(regex="a", grammar="start: \"a\""), "at most one of"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            model.generate("x", **kwargs)
        assert "\n" not in str(info.value), str(info.value)
    with pytest.raises(ConstraintError):
        model.request("x", regex="[")
    with pytest.raises(ValueError, match="not infill or edit"):
        model.infill("a", "b", regex="x")


def test_openai_response_format_maps_to_a_constraint(model):
    spec = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    assert response_format_args(spec) == {"json_schema": PERSON}
    assert response_format_args({"type": "json_object"}) == {"json_schema": {"type": "object"}}
    assert response_format_args({"type": "text"}) == response_format_args(None) == {}
    for bad, message in (({"type": "xml"}, "must be text, json_object or json_schema"),
                         ({"type": "json_schema", "json_schema": {"name": "x"}}, "needs a json_schema.schema"),
                         ("json", "got None")):
        with pytest.raises(ValueError, match=message):
            response_format_args(bad)
    out = model.generate("x", seed=0, **FAST, **response_format_args({"type": "json_object"}))
    assert isinstance(json.loads(answer_text(model, out.tokens)), dict)


def test_the_server_takes_response_format_regex_and_grammar(guided):
    """dgrun serve through the openai client: OpenAI's response_format on both endpoints, the extra regex / grammar
    fields, in a stream too; each answer is the one the Python API gives with the same seed. One that does not
    compile, or two at once, is a 400 naming the field."""
    import openai
    from test_server import running

    steps = {"max_denoising_steps": 6}
    with load_fast(guided["hf"]) as ref, running(lambda: load_fast(guided["hf"]), max_batch=4) as srv:
        client = srv.client()
        messages = [{"role": "user", "content": "hi"}]
        spec = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
        chat = client.chat.completions.create(model="m", messages=messages, seed=1, max_tokens=96, extra_body=steps,
                                              response_format=spec)  # type: ignore[arg-type]
        expected = ref.chat(messages, seed=1, max_new_tokens=96, json_schema=PERSON, **steps)
        assert chat.choices[0].message.content == check_valid(ref, "json", expected.tokens)
        assert chat.choices[0].finish_reason == "stop"
        # The SDK's completions.create has no response_format argument: it travels in extra_body.
        plain = client.completions.create(model="m", prompt="x", seed=2, max_tokens=64,
                                          extra_body={**steps, "response_format": {"type": "json_object"}})
        assert isinstance(json.loads(plain.choices[0].text), dict)
        for seed, extra, case in ((3, {"regex": LONG_REGEX}, "regex"), (4, {"grammar": ARITHMETIC}, "lark")):
            expected = ref.generate("x", seed=seed, max_new_tokens=96, **steps, **CASES[case])
            stream = client.completions.create(model="m", prompt="x", seed=seed, max_tokens=96, stream=True,
                                               extra_body={**steps, **extra})
            assert "".join(c.choices[0].text for c in stream if c.choices) == check_valid(ref, case, expected.tokens)
        for body, param in (({"response_format": {"type": "xml"}}, "response_format"),
                            ({"regex": "(("}, "regex"), ({"grammar": "start: nothing"}, "grammar"),
                            ({"regex": "a", "grammar": 'start: "a"'}, "grammar")):
            with pytest.raises(openai.BadRequestError) as info:
                client.completions.create(model="m", prompt="x", max_tokens=8, extra_body=body)
            error = info.value.body
            assert info.value.status_code == 400 and error["param"] == param and "\n" not in error["message"], error
        with pytest.raises(openai.BadRequestError):  # an infill takes no constraint
            client.completions.create(model="m", prompt="x", suffix="y", extra_body={"regex": "a"})


def test_a_sentencepiece_with_a_dummy_prefix_and_no_byte_fallback(tmp_path):
    """The fixtures' 128-piece tokenizer puts a space before what it encodes and has no piece for "{": text the
    grammar forces mid-answer is still spelt byte for byte, and a grammar this vocabulary cannot write ends the
    answer unfinished (no EOS), never with a false complete answer."""
    save_checkpoint(make_model(text_config(), seed=3), tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "plain.dgf", "f32", quiet=True)
    line = r"def [a-z]{1,6}\(x\): return x"
    with load_fast(tmp_path / "plain.dgf") as model:
        for seed in range(2):
            text = answer_text(model, model.generate("x", seed=seed, **FAST, regex=line).tokens)
            assert re.fullmatch(line, text), text
        for regex in ("[{]x", "x[{]"):
            out = model.generate("x", seed=0, **FAST, regex=regex)
            assert not out.tokens or out.tokens[-1] not in model.generation_config.eos_token_ids, out.tokens
            assert (model.detokenize(out.tokens) or "") in ("", "x")


def test_a_peer_gguf_whose_tokenizer_dgrun_rebuilds():
    """The llama.cpp fork's files carry their tokenizer as tokenizer.ggml.* arrays only (dgrun rebuilds a
    `tokenizers.Tokenizer` from them): llguidance reads that one as it reads a tokenizer.json."""
    regex = r"[a-z]{2,5} [0-9]{1,3}!"
    with load_fast(Path(__file__).parent / "data" / "peer" / "gen-f32.gguf") as model:
        assert model.tokenizer.kind == "gemma4"
        for seed in range(2):
            text = answer_text(model, model.generate("x", seed=seed, **FAST, regex=regex).tokens)
            assert re.fullmatch(regex, text), text


def test_a_missing_llguidance_is_one_line_naming_the_install(model, monkeypatch):
    monkeypatch.setattr(model, "_grammar_vocab", None)
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(ValueError, match="pip install llguidance"):
        model.generate("x", regex="a")


def test_cli_constraints(guided, tmp_path, capsys):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(PERSON))
    grammar = tmp_path / "arith.lark"
    grammar.write_text(ARITHMETIC)
    fast = ["--backend", "cpu", "-t", "1"] if "cpu" in available_backends() else ["--backend", "numpy"]
    base = ["-m", str(guided["hf"]), "-p", "x", "--steps", "4", "--seed", "1", "--json", "-n", "96", *fast]
    for extra, case in (([f"--json-schema={schema}"], "json"), (["--json-schema", json.dumps(PERSON)], "json"),
                        (["--regex", LONG_REGEX], "regex"), (["--grammar", str(grammar)], "lark")):
        assert cli_main(base + extra) == 0
        answer = json.loads(capsys.readouterr().out)
        assert answer["finish_reason"] == "eos" and "constraint" in answer["stats"]
        with load_fast(guided["hf"]) as model:
            check_valid(model, case, answer["tokens"])
    for extra, message in ((["--regex", "(("], "regex does not compile"),
                           (["--json-schema", "missing.json"], "neither a file nor a JSON object"),
                           (["--regex", "a", "--grammar", str(grammar)], "cannot be combined"),
                           (["--grammar", str(tmp_path / "nope.lark")], "cannot read the --grammar file")):
        assert cli_main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("name", [b for b in ("mlx",) if b in available_backends()] + ["cuda-fake"])
def test_constrained_generation_on_device_backends(guided, name, request):
    """The masks applied on the device: logits stay there, only bitmasks go up and indices come back."""
    backend, _, device = name.partition("-")
    if device:
        request.getfixturevalue(device)
    with dgrun.load(guided["hf"], backend=backend) as model:
        for seed in range(2):
            check_valid(model, "json", model.generate("x", seed=seed, **FAST, json_schema=PERSON).tokens)


def test_on_the_demo_model():
    with load_fast(default_model_path()) as demo:
        schema = {"type": "object", "properties": {"x": {"type": "integer"}, "why": {"type": "string"}},
                  "required": ["x", "why"], "additionalProperties": False}
        out = demo.generate("def f(x):", seed=0, max_denoising_steps=4, max_new_tokens=48, json_schema=schema)
        jsonschema.validate(json.loads(answer_text(demo, out.tokens)), schema)


# -- the masking ops: the same bits on every backend -----------------------------------------------------


def _op_backends() -> list[str]:
    """numpy, cpu and mlx where they run; cuda on the host stand-in, and on a GPU (skipped without one)."""
    return [b for b in ("numpy", "cpu", "mlx") if b in available_backends()] + ["cuda-fake", "cuda-gpu"]


@pytest.mark.parametrize("name", _op_backends())
def test_mask_and_argmax_rows_match_the_reference_bit_for_bit(name, request):
    backend, _, device = name.partition("-")
    if device:
        request.getfixturevalue(device)
    ops = get_backend(backend)
    rng = np.random.default_rng(0)
    vocab = 1000  # not a multiple of 32: the last word is partly padding
    logits = rng.normal(0, 3, (12, vocab)).astype(np.float32)
    words = (vocab + 31) // 32
    bitmask = rng.integers(-2**31, 2**31, (5, words), dtype=np.int64).astype(np.int32)
    bitmask[1] = 0
    bitmask[1, 3] = 1 << 17  # one token allowed: 3 * 32 + 17
    expected = sampler.mask_rows(logits.copy(), 4, bitmask)
    masked = ops.to_numpy(ops.mask_rows(ops.asarray(logits), 4, bitmask))
    assert np.array_equal(masked, expected)
    assert (masked[5] == sampler.MASKED_LOGIT).sum() == vocab - 1 and masked[5, 113] == logits[5, 113]
    for mask in (None, bitmask):
        assert np.array_equal(ops.argmax_rows(ops.asarray(logits), 3, 8, mask),
                              sampler.argmax_rows(logits, 3, 8, mask))
    assert ops.argmax_rows(ops.asarray(logits), 3, 8, bitmask)[1] == 113


def test_bitmask_bits_follow_llguidance():
    """Bit i % 32 of word i // 32 allows token i, as llguidance's numpy helper reads its own masks."""
    from llguidance.numpy import apply_token_bitmask_inplace

    rng = np.random.default_rng(1)
    bitmask = rng.integers(-2**31, 2**31, (3, 4), dtype=np.int64).astype(np.int32)
    theirs = np.zeros((3, 100), np.float32)
    apply_token_bitmask_inplace(theirs, bitmask)
    assert np.array_equal(sampler.allowed_tokens(bitmask, 100), theirs == 0)
