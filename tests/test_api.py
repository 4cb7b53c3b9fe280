"""The Python API beyond `generate`: chat templates, chat sessions, infill, edit, and one generation at a time.

The model is a tiny DiffusionGemma (16-token canvas) with a SentencePiece tokenizer and a chat template,
made with transformers' class and converted by dgrun's converter.
"""

from __future__ import annotations

import inspect
import sys
import threading
from pathlib import Path

import pytest

import dgrun
from dgrun import ChatSession, ChatTemplate, ChatTemplateError, Commit, Draft, ModelBusyError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import fixtures  # noqa: E402

CHAT_TEMPLATE = fixtures.CHAT_TEMPLATE
# Gemma's shape: system folded into the first user turn, roles checked, "model" for the assistant.
GEMMA_LIKE_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}{% set loop_messages = messages %}"
    "{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ ((first if loop.first else '') + message['content']) | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# transformers' extras: tojson, namespace, loop controls and the {% generation %} tag.
EXTRAS_TEMPLATE = (
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
    "{% set ns.n = ns.n + 1 %}{{ ns.n }}:{{ m | tojson }}\n"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% endif %}"
    "{% endfor %}{{ eos_token if not add_generation_prompt }}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "hello world"}],
    [{"role": "system", "content": "  Be brief. "}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "héllo ✓ <b>"}],
]
FAST = dict(max_new_tokens=16, max_denoising_steps=4)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny chat model: damped self-conditioning (token-exact runs), a 256-token context."""
    from dgrun.converters.convert_hf import convert

    folder = tmp_path_factory.mktemp("api")
    hf = fixtures.make_model(fixtures.text_config(max_position_embeddings=256), seed=0, self_cond_std=0.01)
    fixtures.save_checkpoint(hf, folder / "hf", chat_template=CHAT_TEMPLATE)
    convert(folder / "hf", folder / "chat.dgf", "f32", quiet=True)
    return folder / "chat.dgf"


@pytest.fixture(scope="module")
def model(model_file: Path):
    with dgrun.load(model_file, backend="numpy") as m:
        yield m


def transformers_render(model_file: Path, template: str, messages: list[dict], generation_prompt: bool = True) -> str:
    """transformers' own apply_chat_template over the same SentencePiece model and special tokens."""
    from transformers import LlamaTokenizer

    tokenizer = LlamaTokenizer(vocab_file=str(model_file.parent / "hf" / "tokenizer.model"), bos_token="<s>",
                               eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    return tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=generation_prompt,
                                         tokenize=False)


# -- chat templates --------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, GEMMA_LIKE_TEMPLATE, EXTRAS_TEMPLATE],
                         ids=["fixture", "gemma-like", "extras"])
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one-turn", "multi-turn"])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_renders_exactly_as_transformers(model_file, template, messages, generation_prompt):
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    ours = ChatTemplate(template, special).render(messages, add_generation_prompt=generation_prompt)
    assert ours == transformers_render(model_file, template, messages, generation_prompt)


def test_model_renders_its_file_template_with_the_vocabulary_special_tokens(model, model_file):
    assert model.chat_template == CHAT_TEMPLATE
    for messages in CONVERSATIONS:
        assert model.apply_chat_template(messages) == transformers_render(model_file, CHAT_TEMPLATE, messages)


def test_template_text_is_tokenized_with_special_tokens_and_a_single_bos(model):
    messages = CONVERSATIONS[1]
    rendered = model.apply_chat_template(messages)
    ids = model.apply_chat_template(messages, tokenize=True)
    bos, eos = model.tokenizer.bos_id, model.generation_config.eos_token_ids[0]
    # "<s>" (written by the template, so no second BOS is added) and "</s>" are tokens, not characters.
    assert rendered.startswith("<s>") and rendered.count("</s>") == 1
    before, after = rendered[len("<s>"):].split("</s>")
    assert ids == [bos, *model.tokenize(before, add_bos=False), eos, *model.tokenize(after, add_bos=False)]


def test_templates_are_sandboxed_and_their_failures_are_value_errors():
    with pytest.raises(ChatTemplateError, match="unsafe"):
        ChatTemplate("{{ ''.__class__.__mro__ }}").render([])
    with pytest.raises(ChatTemplateError, match="cannot set the attribute '_x'"):
        ChatTemplate("{% set ns = namespace() %}{% set ns._x = 1 %}").render([])
    with pytest.raises(ChatTemplateError, match="unknown role tool"):
        ChatTemplate(CHAT_TEMPLATE).render([{"role": "tool", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% if %}")
    assert issubclass(ChatTemplateError, ValueError)


def test_chat_is_generate_on_the_rendered_prompt(model):
    messages = CONVERSATIONS[0]
    expected = model.generate(model.apply_chat_template(messages, tokenize=True), seed=3, **FAST)
    assert model.chat(messages, seed=3, **FAST).tokens == expected.tokens


def test_a_template_can_be_replaced_on_the_model(model):
    try:
        model.chat_template = "{% for m in messages %}[{{ m.content }}]{% endfor %}"
        assert model.apply_chat_template(CONVERSATIONS[0]) == "[hello world]"
    finally:
        model.chat_template = CHAT_TEMPLATE
    assert model.apply_chat_template(CONVERSATIONS[0]).startswith("<s><|user|>")


# -- chat sessions -------------------------------------------------------------------------------------


def test_chat_session_encodes_each_turn_once_and_matches_encoding_everything(model, monkeypatch):
    encoded: list[list[int]] = []
    stream = model.stream

    def recording_stream(prompt, **kwargs):
        encoded.append(list(prompt))
        return stream(prompt, **kwargs)

    monkeypatch.setattr(model, "stream", recording_stream)
    session = ChatSession(model, params=FAST)
    first = session.send("hello world", seed=1)
    second = session.send("import os", seed=2)
    monkeypatch.undo()

    turn1, turn2 = session.turns
    assert turn1.generation.encoder_passes == 1 and turn2.generation.encoder_passes == 1  # one pass per new turn
    assert not turn2.reencoded
    # Turn 2 encodes only the answer's never-encoded canvas and the new user turn.
    assert encoded[1][: len(first.tokens)] == first.tokens
    assert "import os" in model.detokenize(encoded[1][len(first.tokens):])
    assert turn2.encoded_tokens == len(encoded[1]) and turn2.cache_tokens == len(encoded[0]) + len(encoded[1])
    # The kept cache holds exactly what a one-shot encoding of the whole conversation would: same answer.
    assert model.generate(encoded[0] + encoded[1], seed=2, **FAST).tokens == second.tokens
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    eos = model.generation_config.eos_token_ids
    answer = second.tokens[:-1] if second.tokens[-1] in eos else second.tokens
    assert session.messages[3]["content"] == model.detokenize(answer)


def test_chat_session_re_encodes_when_the_template_rewrites_history(model):
    try:
        # Earlier answers are rendered as "...", not as what the model read: the cache cannot be continued.
        model.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content if m.role == 'user' else '...' }}"
                               "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
        session = ChatSession(model, params=FAST)
        session.send("hello world", seed=1)
        session.send("import os", seed=2)
    finally:
        model.chat_template = CHAT_TEMPLATE
    turn2 = session.turns[1]
    assert turn2.reencoded and turn2.encoded_tokens == turn2.cache_tokens


def test_a_refused_turn_leaves_the_session_as_it_was(model):
    session = ChatSession(model, params=FAST)
    session.send("hello world", seed=1)
    with pytest.raises(ValueError, match="max_denoising_steps"):
        session.send("again", max_denoising_steps=0)
    assert len(session.messages) == 2 and len(session.turns) == 1
    assert session.send("again", seed=2).tokens
    assert not session.turns[-1].reencoded  # the refusal came before the cache was touched


def test_chat_needs_a_template(model_file):
    with dgrun.load(model_file, backend="numpy") as plain:
        plain.chat_template = None
        with pytest.raises(ChatTemplateError, match="has no chat template"):
            plain.chat(CONVERSATIONS[0])
        with pytest.raises(ChatTemplateError, match="has no chat template"):
            ChatSession(plain)


# -- infill --------------------------------------------------------------------------------------------


def test_infill_clamps_the_suffix_and_padding_on_every_step(model):
    canvas_length = model.config.canvas_length
    suffix = model.tokenize("return x", add_bos=False)
    fill = 6
    events = list(model.stream_infill("def f(x):", "return x", fill_length=fill, seed=0, max_denoising_steps=4))
    drafts = [e for e in events if isinstance(e, Draft)]
    commits = [e for e in events if isinstance(e, Commit)]
    eos, pad = model.generation_config.eos_token_ids[0], model.generation_config.pad_token_id
    clamped = suffix + [eos] + [pad] * (canvas_length - fill - len(suffix) - 1)
    for draft in drafts:
        assert draft.tokens[fill:].tolist() == clamped
        assert draft.accepted[fill:].all()
    gap = [t for t in drafts[-1].tokens[:fill].tolist() if t not in (eos, pad)]
    assert len(commits) == 1 and commits[0].tokens == gap

    out = model.infill("def f(x):", "return x", fill_length=fill, seed=0, max_denoising_steps=4)
    assert out.tokens == gap and out.text == model.detokenize(gap)
    assert out.stats["canvases"] == 1 and out.stats["new_tokens"] == len(gap)


def test_infill_gap_defaults_to_the_room_the_suffix_leaves(model):
    suffix = model.tokenize("return x", add_bos=False)
    events = list(model.stream_infill("def f(x):", "return x", seed=0, max_denoising_steps=2))
    last = [e for e in events if isinstance(e, Draft)][-1]
    assert last.tokens[-len(suffix):].tolist() == suffix


@pytest.mark.parametrize("kwargs, message", [
    (dict(suffix="x = [1, 2, 3] " * 3), "must be shorter than the canvas"),
    (dict(fill_length=0), "fill_length must be an integer in 1.."),
    (dict(fill_length=100), "fill_length must be an integer in 1.."),
    (dict(max_new_tokens=8), "max_new_tokens does not apply"),
])
def test_infill_refuses_what_does_not_fit_one_canvas(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.infill(**{"prefix": "def f(x):", "suffix": "return x", **kwargs})


# -- edit ----------------------------------------------------------------------------------------------


def token_char_ranges(model, text: str) -> list[tuple[int, int]]:
    ids = model.tokenize(text, add_bos=False)
    ends = [len(model.detokenize(ids[: k + 1])) for k in range(len(ids))]
    return list(zip([0, *ends[:-1]], ends, strict=True))


def test_edit_renoises_only_the_tokens_of_the_spans(model):
    text, span = "x = [1, 2, 3]", (5, 9)
    ids = model.tokenize(text, add_bos=False)
    ranges = token_char_ranges(model, text)
    free = [k for k, (a, b) in enumerate(ranges) if a < span[1] and b > span[0]]
    events = list(model.stream_edit(text, [span], seed=0, max_denoising_steps=4))
    drafts = [e for e in events if isinstance(e, Draft)]
    for draft in drafts:
        for k, token in enumerate(ids):
            if k not in free:
                assert draft.tokens[k] == token and draft.accepted[k]
    out = model.edit(text, [span], seed=0, max_denoising_steps=4)
    assert out.tokens == events[-1].tokens
    # Everything outside the renoised tokens is byte-identical.
    head, tail = ranges[free[0]][0], ranges[free[-1]][1]
    assert out.text.startswith(text[:head]) and out.text.endswith(text[tail:])


def test_edit_takes_a_context_and_several_spans(model):
    text = "x = [1, 2, 3]"
    with_context = model.edit(text, [(0, 1), (10, 12)], context="import os", seed=0, max_denoising_steps=2)
    without = model.edit(text, [(0, 1), (10, 12)], seed=0, max_denoising_steps=2)
    assert with_context.stats["canvases"] == without.stats["canvases"] == 1
    assert "= [1," in with_context.text and "= [1," in without.text


@pytest.mark.parametrize("text, spans, message", [
    ("x = [1, 2, 3] " * 4, [(0, 1)], "longer than one canvas"),
    ("x = 1", [(3, 99)], "is not a non-empty character range"),
    ("x = 1", [(2, 2)], "is not a non-empty character range"),
    ("", [(0, 1)], "the text to edit is empty"),
    ("x\ty", [(0, 1)], "does not survive tokenization unchanged"),
])
def test_edit_refuses_what_it_cannot_do_faithfully(model, text, spans, message):
    with pytest.raises(ValueError, match=message):
        model.edit(text, spans)


# -- one generation at a time ------------------------------------------------------------------------


def test_a_second_thread_is_refused_while_the_first_generates(model):
    holding, done_trying = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def first() -> None:
        stream = model.stream("hello", seed=0, **FAST)
        next(stream)  # mid-generation: the model is held
        holding.set()
        done_trying.wait(30)
        outcome["first"] = [event for event in stream if isinstance(event, Commit)]

    def second() -> None:
        holding.wait(30)
        try:
            model.generate("world", **FAST)
        except ModelBusyError as e:
            outcome["second"] = e
        finally:
            done_trying.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert isinstance(outcome.get("second"), ModelBusyError)
    assert outcome["first"] and outcome["first"][-1].finished  # the first generation was not disturbed
    assert model.generate("world", seed=0, **FAST).tokens  # and the model is free again


# -- API surface ---------------------------------------------------------------------------------------


def test_public_names_are_exported_and_documented():
    for name in ("load", "default_model_path", "Model", "ChatSession", "ChatTemplate", "ChatTemplateError",
                 "BackendUnavailable", "NoTokenizerError", "Draft", "Commit"):
        assert name in dgrun.__all__ and getattr(dgrun, name).__doc__, name
    for cls in (dgrun.Model, ChatSession, ChatTemplate):
        for name, member in inspect.getmembers(cls):
            if not name.startswith("_") and (inspect.isfunction(member) or isinstance(member, property)):
                assert member.__doc__, f"{cls.__name__}.{name} has no docstring"


def test_info_reports_the_file_and_its_chat_template(model):
    info = model.info
    assert info["tokenizer"] == "sentencepiece" and info["chat_template"] is True
    assert info["config"]["canvas_length"] == 16 and info["quant_mix_bytes"]["F32"] > 0
