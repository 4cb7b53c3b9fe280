"""The `dgrun` command end to end, through `python -m dgrun` in a subprocess, on tiny fixture models.

Every run uses the numpy backend, 16-token canvases and a few denoising steps; outputs are checked against
the Python API run in this process with the same seed.
"""

from __future__ import annotations

import json
import os
import pty
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import dgrun_cli

import dgrun
from dgrun.backends import available_backends

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import fixtures  # noqa: E402

CHAT_TEMPLATE = fixtures.CHAT_TEMPLATE
FAST = ["--backend", "numpy", "--steps", "4", "--seed", "0"]
API_FAST = dict(max_denoising_steps=4, seed=0)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """chat: tokenizer + chat template, 256-token context; plain: no template; bare: no tokenizer."""
    from dgrun.converters.convert_hf import convert

    folder = tmp_path_factory.mktemp("cli")
    hf = fixtures.make_model(fixtures.text_config(max_position_embeddings=256), seed=0, self_cond_std=0.01)
    fixtures.save_checkpoint(hf, folder / "hf", chat_template=CHAT_TEMPLATE)
    convert(folder / "hf", folder / "chat.dgf", "f32", quiet=True)
    convert(folder / "hf", folder / "bare.dgf", "f32", with_tokenizer=False, quiet=True)
    shutil.copytree(folder / "hf", folder / "hf-plain")
    (folder / "hf-plain" / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    convert(folder / "hf-plain", folder / "plain.dgf", "f32", quiet=True)
    (folder / "notes.txt").write_text("not a model\n" * 4)
    return {"chat": folder / "chat.dgf", "plain": folder / "plain.dgf", "bare": folder / "bare.dgf",
            "text": folder / "notes.txt", "dir": folder}


@pytest.fixture(scope="module")
def model(files):
    with dgrun.load(files["chat"], backend="numpy") as m:
        yield m


def visible_text(model, tokens: list[int]) -> str:
    """What the CLI prints for an answer: its text without the EOS that ended it."""
    eos = model.generation_config.eos_token_ids
    return model.detokenize(tokens[:-1] if tokens and tokens[-1] in eos else tokens)


# -- generation ----------------------------------------------------------------------------------------


def test_version():
    result = dgrun_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"dgrun {dgrun.__version__}"


def test_text_in_text_out_matches_the_api(files, model):
    result = dgrun_cli("-m", files["chat"], "-p", "def fibonacci(n):", "-n", 16, *FAST)
    assert result.returncode == 0, result.stderr
    expected = model.generate("def fibonacci(n):", max_new_tokens=16, **API_FAST)
    assert result.stdout == visible_text(model, expected.tokens) + "\n"
    assert "Traceback" not in result.stderr


def test_prompt_from_a_file_or_stdin_is_the_same_prompt(files):
    (files["dir"] / "prompt.txt").write_text("def fibonacci(n):")
    from_flag = dgrun_cli("-m", files["chat"], "-p", "def fibonacci(n):", "-n", 16, *FAST)
    from_file = dgrun_cli("-m", files["chat"], "-f", files["dir"] / "prompt.txt", "-n", 16, *FAST)
    from_stdin = dgrun_cli("-m", files["chat"], "-n", 16, *FAST, stdin="def fibonacci(n):")
    assert from_flag.stdout == from_file.stdout == from_stdin.stdout and from_flag.stdout.strip()


def test_output_streams_canvas_by_canvas_and_json_has_text_tokens_and_stats(files, model):
    result = dgrun_cli("-m", files["chat"], "-p", "import os", "-n", 40, "--json", "--no-adaptive-stopping", *FAST)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    expected = model.generate("import os", max_new_tokens=40, adaptive_stopping=False, **API_FAST)
    assert out["tokens"] == expected.tokens and out["text"] == visible_text(model, expected.tokens)
    assert out["finish_reason"] in ("eos", "length") and out["prompt_tokens"] == len(model.tokenize("import os"))
    assert out["backend"] == "numpy"
    stats = out["stats"]
    assert stats["new_tokens"] == len(out["tokens"]) and set(stats["steps_per_canvas"]) == {4}
    assert stats["decoder_passes"] == 4 * stats["canvases"] and stats["tokens_per_forward"] > 0


def test_every_generation_parameter_is_a_flag(files, model):
    flags = ["-n", 16, "--t-min", 0.2, "--t-max", 0.9, "--entropy-bound", 0.5, "--stability-threshold", 2,
             "--confidence-threshold", 0.01]
    result = dgrun_cli("-m", files["chat"], "-p", "hello", *flags, "--json", *FAST)
    expected = model.generate("hello", max_new_tokens=16, t_min=0.2, t_max=0.9, entropy_bound=0.5,
                              stability_threshold=2, confidence_threshold=0.01, **API_FAST)
    assert json.loads(result.stdout)["tokens"] == expected.tokens


def test_threads_flag_runs_the_cpu_backend_with_that_many_threads(files, model):
    result = dgrun_cli("-m", files["chat"], "-p", "hello", "-n", 16, "--json", "--threads", 1, "--backend", "cpu",
                       "--steps", 2, "--seed", 0)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tokens"] == model.generate("hello", max_new_tokens=16, max_denoising_steps=2,
                                                                 seed=0).tokens
    bad = dgrun_cli("-m", files["chat"], "-p", "hello", "--threads", 0)
    assert bad.returncode == 2 and "--threads must be at least 1" in bad.stderr


def test_verbose_reports_load_time_steps_and_speed(files):
    result = dgrun_cli("-m", files["chat"], "-p", "hello", "-n", 32, "--verbose", *FAST)
    assert result.returncode == 0
    for expected in ("loaded", "canvas 0:", "steps", "tokens per forward", "tokens/s"):
        assert expected in result.stderr


def test_auto_backend_is_named_on_stderr(files):
    result = dgrun_cli("-m", files["chat"], "-p", "hello", "-n", 16, "--steps", 1)
    assert result.returncode == 0, result.stderr
    assert any(line.startswith("dgrun: backend ") and line.endswith("(auto)") for line in result.stderr.splitlines())


# -- chat ----------------------------------------------------------------------------------------------


def test_chat_prompt_is_the_template_rendered_as_transformers_renders_it(files, model):
    from transformers import LlamaTokenizer

    tokenizer = LlamaTokenizer(vocab_file=str(files["dir"] / "hf" / "tokenizer.model"), bos_token="<s>",
                               eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    messages = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "hello world"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                             chat_template=CHAT_TEMPLATE)
    assert model.apply_chat_template(messages) == rendered
    ids = model.tokenize_chat(rendered)
    result = dgrun_cli("-m", files["chat"], "--chat", "--system", " Be brief. ", "-p", "hello world", "-n", 16,
                       "--json", *FAST)
    out = json.loads(result.stdout)
    assert out["prompt_tokens"] == len(ids)
    assert out["tokens"] == model.generate(ids, max_new_tokens=16, **API_FAST).tokens


def test_interactive_answers_each_turn_with_one_encoder_pass(files):
    result = dgrun_cli("-m", files["chat"], "-i", "-n", 16, "--json", "--verbose", *FAST,
                       stdin="hello world\n\nimport os\n")
    assert result.returncode == 0, result.stderr
    turns = [json.loads(line) for line in result.stdout.splitlines()]
    assert [t["turn"] for t in turns] == [1, 2]
    for turn in turns:
        assert turn["stats"]["encoder_passes"] == 1 and not turn["stats"]["reencoded"]
    first, second = (t["stats"] for t in turns)
    # Turn 2 encodes the first answer's canvas and the new user turn, not the history before them.
    assert second["cache_tokens"] == first["cache_tokens"] + second["encoded_tokens"]
    assert second["encoded_tokens"] < second["cache_tokens"]
    assert "turn 2: encoded" in result.stderr


def test_interactive_text_output_is_one_answer_per_line(files):
    result = dgrun_cli("-m", files["chat"], "-i", "-n", 16, *FAST, stdin="hello world\nimport os\n")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split("\n")) >= 3 and result.stdout.endswith("\n")


# -- infill and edit -----------------------------------------------------------------------------------


def test_infill_prints_the_gap_and_keeps_the_suffix(files, model):
    result = dgrun_cli("-m", files["chat"], "--prefix", "def f(x):", "--suffix", "return x", "--fill-length", 6,
                       "--json", *FAST)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    expected = model.infill("def f(x):", "return x", fill_length=6, **API_FAST)
    assert out["tokens"] == expected.tokens and out["text"] == expected.text and out["finish_reason"] == "canvas"
    # The API tests check the suffix stays clamped on every step; here the gap fits before it.
    assert len(out["tokens"]) <= 6


def test_a_fill_marker_in_the_prompt_is_an_infill(files):
    marker = dgrun_cli("-m", files["chat"], "-p", "def f(x):<FILL>return x", *FAST)
    flags = dgrun_cli("-m", files["chat"], "--prefix", "def f(x):", "--suffix", "return x", *FAST)
    assert marker.returncode == 0 and marker.stdout == flags.stdout


def test_edit_rewrites_only_the_spans(files, model):
    text = "x = [1, 2, 3]"
    result = dgrun_cli("-m", files["chat"], "--edit", text, "--rewrite", "5:9", "--rewrite", ":1", *FAST)
    assert result.returncode == 0, result.stderr
    expected = model.edit(text, [(5, 9), (0, 1)], **API_FAST)
    assert result.stdout == expected.text + "\n"
    ids = model.tokenize(text, add_bos=False)
    ends = [len(model.detokenize(ids[: k + 1])) for k in range(len(ids))]
    last_rewritten = next(end for end in ends if end >= 9)
    assert expected.text.endswith(text[last_rewritten:])  # the text after the last span is byte-identical


def test_show_canvas_redraws_on_a_terminal_and_ends_with_the_plain_text(files):
    plain = dgrun_cli("-m", files["chat"], "-p", "hello", "-n", 16, *FAST)
    controller, terminal = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "dgrun", "-m", str(files["chat"]), "-p", "hello", "-n", "16",
                                "--show-canvas", *map(str, FAST)],
                               stdin=subprocess.DEVNULL, stdout=terminal, stderr=subprocess.PIPE)
    os.close(terminal)
    drawn = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        drawn += chunk
    os.close(controller)
    assert process.wait(60) == 0
    screen = drawn.decode()
    assert "\x1b[2m" in screen and "\x1b[J" in screen  # dimmed noise, erased and redrawn
    # The last erase clears the last draft; what follows is the committed text (the terminal writes \r\n).
    assert screen.rsplit("\x1b[J", 1)[1] == plain.stdout.replace("\n", "\r\n")


def test_show_canvas_off_a_terminal_is_plain_output(files):
    plain = dgrun_cli("-m", files["chat"], "-p", "hello", "-n", 16, *FAST)
    shown = dgrun_cli("-m", files["chat"], "-p", "hello", "-n", 16, "--show-canvas", *FAST)
    assert shown.stdout == plain.stdout and "\x1b" not in shown.stdout


def test_ctrl_c_keeps_what_was_committed(files, model):
    args = dict(max_new_tokens=160, max_denoising_steps=200, adaptive_stopping=False, seed=0)
    first_canvas = next(e for e in model.stream("hello", **args) if isinstance(e, dgrun.Commit))
    if first_canvas.finished:
        pytest.skip("the first canvas ended the generation: nothing left to interrupt")
    process = subprocess.Popen([sys.executable, "-m", "dgrun", "-m", str(files["chat"]), "-p", "hello", "-n", "160",
                                "--steps", "200", "--no-adaptive-stopping", "--seed", "0", "--backend", "numpy"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               # A shell's background job inherits SIGINT ignored, and Python then keeps it
                               # ignored: restore the default so the child sees Ctrl-C wherever pytest runs.
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    committed = os.read(process.stdout.fileno(), 65536)  # blocks until the first canvas is printed
    process.send_signal(signal.SIGINT)
    rest, errors = process.communicate(timeout=60)
    assert process.returncode == 130
    assert (committed + rest).decode().startswith(model.detokenize(first_canvas.tokens)) and rest.endswith(b"\n")
    assert b"Traceback" not in errors


def test_token_ids_prompt_from_p_f_or_stdin_is_the_api_call(files, model):
    ids = model.tokenize("def fibonacci(n):")
    expected = model.generate(ids, max_new_tokens=16, **API_FAST)
    (files["dir"] / "ids.txt").write_text("\n".join(map(str, ids)) + "\n")
    runs = [dgrun_cli("-m", files["chat"], "-p", " ".join(map(str, ids)), "--token-ids", "-n", 16, *FAST),
            dgrun_cli("-m", files["chat"], "-f", files["dir"] / "ids.txt", "--token-ids", "-n", 16, *FAST),
            dgrun_cli("-m", files["chat"], "--token-ids", "-n", 16, *FAST, stdin="\t".join(map(str, ids)))]
    for result in runs:
        assert result.returncode == 0, result.stderr
        assert result.stdout == visible_text(model, expected.tokens) + "\n"  # with a tokenizer: text, as usual
    out = json.loads(dgrun_cli("-m", files["chat"], "-p", " ".join(map(str, ids)), "--token-ids", "-n", 16,
                               "--json", *FAST).stdout)
    assert out["tokens"] == expected.tokens and out["prompt_tokens"] == len(ids)


def test_a_model_without_tokenizer_takes_and_prints_token_ids(files, model):
    ids = [2, 40, 41, 42, 7]
    expected = model.generate(ids, max_new_tokens=32, **API_FAST).tokens  # same weights as bare.dgf
    result = dgrun_cli("-m", files["bare"], "-p", " ".join(map(str, ids)), "--token-ids", "-n", 32, *FAST)
    assert result.returncode == 0, result.stderr
    assert result.stdout == " ".join(map(str, expected)) + "\n"  # one line, as the API returns them
    out = json.loads(dgrun_cli("-m", files["bare"], "-p", "2 40 41 42 7", "--token-ids", "-n", 32, "--json",
                               *FAST).stdout)
    assert out["tokens"] == expected and out["text"] is None
    refused = dgrun_cli("-m", files["bare"], "-p", "hello", "--backend", "numpy")
    assert refused.returncode == 2 and "give the prompt as token ids with --token-ids" in refused.stderr


# -- errors: one line, exit status 2 -------------------------------------------------------------------


ERRORS = {
    "missing model": (lambda f: ["-m", f["dir"] / "nope.dgf", "-p", "x"], "cannot open"),
    "not a model": (lambda f: ["-m", f["text"], "-p", "x"], "not a GGUF/.dgf file"),
    "prompt too long": (lambda f: ["-m", f["chat"], "-p", "hello world " * 100, "--backend", "numpy"],
                        "exceeds the model's context"),
    "no tokenizer": (lambda f: ["-m", f["bare"], "-p", "x", "--backend", "numpy"], "has no tokenizer"),
    "bad steps": (lambda f: ["-m", f["chat"], "-p", "x", "--steps", 0, "--backend", "numpy"],
                  "max_denoising_steps must be an integer"),
    "bad temperatures": (lambda f: ["-m", f["chat"], "-p", "x", "--t-min", 0.9, "--t-max", 0.5, "--backend", "numpy"],
                         "t_max must be greater than t_min"),
    "no chat template": (lambda f: ["-m", f["plain"], "--chat", "-p", "x", "--backend", "numpy"],
                         "has no chat template"),
    "suffix too long": (lambda f: ["-m", f["chat"], "--prefix", "a", "--suffix", "x = [1, 2, 3] " * 3,
                                   "--backend", "numpy"], "must be shorter than the canvas"),
    "edit too long": (lambda f: ["-m", f["chat"], "--edit", "x = [1, 2, 3] " * 4, "--rewrite", "0:1",
                                 "--backend", "numpy"], "longer than one canvas"),
    "edit without spans": (lambda f: ["-m", f["chat"], "--edit", "x = 1"], "--edit needs at least one --rewrite"),
    "two fill markers": (lambda f: ["-m", f["chat"], "-p", "a<FILL>b<FILL>c"], "2 <FILL> markers"),
    "infill and chat": (lambda f: ["-m", f["chat"], "--chat", "-p", "a<FILL>b"], "infill and --chat cannot be"),
    "missing prompt file": (lambda f: ["-m", f["chat"], "-f", f["dir"] / "nope.txt"], "cannot read the prompt file"),
    "token id not an integer": (lambda f: ["-m", f["bare"], "-p", "5 six 7", "--token-ids"],
                                "--token-ids: 'six' is not a token id"),
    "token id outside the vocabulary": (lambda f: ["-m", f["bare"], "-p", "5 128", "--token-ids", "--backend",
                                                   "numpy"], "token id 128 is outside the vocabulary (0..127)"),
    "negative token id": (lambda f: ["-m", f["bare"], "-p", "-1 5", "--token-ids", "--backend", "numpy"],
                          "token id -1 is outside the vocabulary"),
    "no token ids": (lambda f: ["-m", f["bare"], "-p", "  ", "--token-ids"], "the prompt has no token ids"),
    "token ids and chat": (lambda f: ["-m", f["chat"], "-p", "5 6", "--token-ids", "--chat"],
                           "--token-ids cannot be combined with --chat"),
    "token ids and infill": (lambda f: ["-m", f["chat"], "--prefix", "a", "--token-ids"],
                             "--token-ids cannot be combined with --prefix/--suffix"),
    "token ids and edit": (lambda f: ["-m", f["chat"], "-p", "5", "--edit", "x = 1", "--rewrite", "0:1",
                                      "--token-ids"], "--token-ids cannot be combined with --edit"),
    "token ids and interactive": (lambda f: ["-m", f["chat"], "-i", "--token-ids"],
                                  "--token-ids cannot be combined with --interactive"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_one_line_and_exit_2(files, case):
    make_args, message = ERRORS[case]
    result = dgrun_cli(*make_args(files))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("dgrun: backend ")]
    assert len(lines) == 1 and lines[0].startswith("dgrun: error: ") and message in lines[0], result.stderr
    assert result.stdout == ""


@pytest.mark.skipif("cuda" in available_backends(), reason="CUDA works here")
def test_an_unavailable_backend_is_one_line_and_exit_2(files):
    result = dgrun_cli("-m", files["chat"], "-p", "x", "--backend", "cuda")
    assert result.returncode == 2
    assert result.stderr.startswith("dgrun: error: backend cuda is not available") and result.stderr.count("\n") == 1


@pytest.mark.skipif(dgrun.default_model_path().is_file(), reason="the demo model is installed")
def test_without_a_model_the_missing_demo_model_is_one_line_and_exit_2():
    result = dgrun_cli("-p", "x")
    assert result.returncode == 2
    assert result.stderr.startswith("dgrun: error: no model given (-m MODEL) and the demo model is not installed")


# -- dgrun info ----------------------------------------------------------------------------------------


def test_info_describes_a_dgf(files):
    result = dgrun_cli("info", files["chat"])
    assert result.returncode == 0, result.stderr
    for expected in ("diffusion-gemma", "layers       4 (2 sliding, window 8; 2 full)", "experts      4, top-2",
                     "vocab        128", "canvas       16 tokens (context 256)", "max_denoising_steps=48",
                     "sentencepiece, 128 tokens, chat template", "F32:"):
        assert expected in result.stdout, expected
    info = json.loads(dgrun_cli("info", files["chat"], "--json").stdout)
    assert info["config"]["num_experts"] == 4 and info["generation"]["eos_token_ids"] == [1]
    assert info["types"]["F32"]["bytes"] > 0 and info["tokenizer"] == "sentencepiece"


def test_info_describes_any_gguf(files):
    import gguf

    path = files["dir"] / "other.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("a.weight", np.zeros((4, 32), dtype=np.float32))
    writer.add_tensor("b.weight", np.zeros((4, 32), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = dgrun_cli("info", path)
    assert result.returncode == 0, result.stderr
    assert "architecture llama" in result.stdout and "2 tensors" in result.stdout
    assert "F32: 1 tensors" in result.stdout and "F16: 1 tensors" in result.stdout and "layers" not in result.stdout
    assert "none (token ids only)" in result.stdout


def test_info_on_a_bad_file_is_one_line_and_exit_2(files):
    result = dgrun_cli("info", files["text"])
    assert result.returncode == 2 and result.stderr.startswith("dgrun: error: ") and result.stderr.count("\n") == 1
