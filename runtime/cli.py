"""The `dgrun` command: generate, chat, infill and edit with a .dgf model; `dgrun info` describes any GGUF file.

    dgrun -m model.dgf -p "def fibonacci(n):"          # text, streamed canvas by canvas
    dgrun -m model.dgf --chat -p "Write a haiku"       # wrapped in the file's chat template
    dgrun -m model.dgf --chat --image cat.jpg -p "What is this?"   # images (repeatable) in the user message
    dgrun -m model.dgf -i                              # multi-turn chat, one line per turn on stdin
    dgrun -m model.dgf -p "def add(a, b):<FILL>return c"
    dgrun -m model.dgf --edit "x = 1 + 2" --rewrite 4:9
    dgrun -m sudoku --edit "$(cat puzzle.txt)" --blank 0   # a shipped model by name; fill every 0
    dgrun -m model.dgf -p "2 651 4937" --token-ids    # the prompt as token ids (any file, even without tokenizer)
    dgrun -m model.dgf --chat -p "Name a city" --json-schema '{"type": "object"}'
    dgrun -m model.dgf --lora sudoku-lora.dgf -p "..."  # with a LoRA adapter (--lora-scaled FILE SCALE)
    dgrun info model.dgf
    dgrun serve -m model.dgf --port 8080               # OpenAI- and llama.cpp-compatible HTTP server

Errors a user can cause (a missing or malformed file, an unavailable backend, a bad parameter, a prompt too
long for the context) print one line, `dgrun: error: ...`, and exit with status 2. Ctrl-C stops generation,
keeps what was committed so far and exits with status 130.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from gguf import LlamaFileType

from dgrun._version import __version__
from dgrun.backends import BackendUnavailable
from dgrun.chat import ChatSession
from dgrun.config import ARCH, ConfigError, GenerationConfig, ModelConfig, written_by_dgrun
from dgrun.engine import Model, load, resolve_model, type_mix
from dgrun.format import GGUFFile
from dgrun.generate import Commit, Draft, Stats
from dgrun.lora import describe as describe_adapter
from dgrun.tokenizer import CHAT_TEMPLATE_KEY, HF_JSON_KEY, SPM_TENSOR
from dgrun.vision import VisionConfig, vision_tensor_shapes

EXIT_ERROR = 2  # what argparse uses for usage errors: every mistake a user can make exits with it
EXIT_FAILED = 1  # the model or backend broke (NaN logits)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
FILL_MARKER = "<FILL>"

# ANSI: dim (still-noisy draft tokens), normal intensity, erase from the cursor to the end of the screen.
DIM, UNDIM, ERASE_DOWN = "\x1b[2m", "\x1b[22m", "\x1b[J"


class UsageError(Exception):
    """A combination of arguments that makes no sense; reported as one line, exit status 2."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dgrun` console script and `python -m dgrun`; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["info"]:
            return _info_command(argv[1:])
        if argv[:1] == ["serve"]:
            return _serve_command(argv[1:])
        return _generate_command(argv)
    except (UsageError, ValueError, BackendUnavailable, OSError) as e:
        # ValueError covers FormatError, ConfigError, NoTokenizerError, ChatTemplateError and bad parameters.
        return _fail(e, EXIT_ERROR)
    except FloatingPointError as e:
        return _fail(e, EXIT_FAILED)
    except KeyboardInterrupt:  # before any token was committed (loading, encoding): nothing to print
        return EXIT_INTERRUPTED


def _fail(error: BaseException, status: int) -> int:
    if isinstance(error, BrokenPipeError):  # `dgrun ... | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"dgrun: error: {message}", file=sys.stderr)
    return status


# -- generation ------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dgrun", description="Generate text with a DiffusionGemma .dgf model.",
        epilog="Run 'dgrun info MODEL' to describe a model (or any GGUF file).")
    parser.add_argument("--version", action="version", version=f"dgrun {__version__}")
    parser.add_argument("-m", "--model", metavar="MODEL",
                        help="the .dgf file, or a model shipped with dgrun by name (demo, sudoku); default: demo")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("-p", "--prompt", metavar="TEXT",
                        help="the prompt; a single <FILL> marker in it asks for an infill")
    source.add_argument("-f", "--file", help="read the prompt from FILE (default: stdin, when it is not a terminal)")
    parser.add_argument("--token-ids", action="store_true",
                        help="the prompt (-p, -f or stdin) is whitespace-separated token ids, used as they are; a "
                             "model without tokenizer then prints the new ids")
    parser.add_argument("--image", action="append", default=[], metavar="FILE",
                        help="an image for the prompt (repeatable): with --chat in the user message, else where the "
                             "prompt writes the model's image token, or before the text")
    parser.add_argument("--mmproj", metavar="FILE",
                        help="the vision tower as a separate mmproj file (convert-hf-to-dgf --mmproj-out)")
    parser.add_argument("--backend", default="auto", choices=["auto", "numpy", "cpu", "cuda", "mlx"],
                        help="compute backend (default: auto, the fastest one that works here)")
    parser.add_argument("-t", "--threads", type=int, metavar="N",
                        help="CPU threads for the cpu backend (default: all cores; also $DGRUN_THREADS)")
    add_lora_arguments(parser)

    gen = parser.add_argument_group("generation (default: the model file's values, else transformers')")
    gen.add_argument("-n", "--max-new-tokens", type=int, metavar="N", help="stop after this many tokens")
    gen.add_argument("--steps", type=int, dest="max_denoising_steps", metavar="N",
                     help="most denoising steps per canvas")
    gen.add_argument("--t-min", type=float, metavar="T", help="final sampling temperature")
    gen.add_argument("--t-max", type=float, metavar="T", help="first sampling temperature")
    gen.add_argument("--entropy-bound", type=float, metavar="H", help="entropy budget of the tokens accepted per step")
    gen.add_argument("--stability-threshold", type=int, metavar="N",
                     help="steps the draft must stay unchanged to stop early")
    gen.add_argument("--confidence-threshold", type=float, metavar="H",
                     help="mean entropy under which a stable draft stops")
    gen.add_argument("--no-adaptive-stopping", action="store_true", help="always run every denoising step")
    gen.add_argument("--seed", type=int, metavar="N", help="random seed, for reproducible output")

    constrained = parser.add_argument_group("constrained output (at most one; not with infill or edit)")
    constrained.add_argument("--json-schema", metavar="FILE_OR_JSON",
                             help="the answer is JSON valid under this schema (a file, or the schema's JSON text)")
    constrained.add_argument("--regex", metavar="PATTERN", help="the answer matches this regular expression")
    constrained.add_argument("--grammar", metavar="FILE", help="the answer follows this Lark grammar "
                                                               "(llguidance's dialect)")

    modes = parser.add_argument_group("modes")
    modes.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    modes.add_argument("--system", metavar="TEXT", help="system message for --chat and --interactive")
    modes.add_argument("-i", "--interactive", action="store_true",
                       help="multi-turn chat: one user turn per line of stdin (the encoder cache is kept)")
    modes.add_argument("--prefix", metavar="TEXT", help="infill: the text before the gap")
    modes.add_argument("--suffix", metavar="TEXT",
                       help="infill: the text after the gap (placed at the end of the canvas)")
    modes.add_argument("--fill-length", type=int, metavar="N",
                       help="infill: gap length in tokens (default: all the room the suffix leaves)")
    modes.add_argument("--edit", metavar="TEXT", help="edit TEXT in place (the prompt, if any, is its context)")
    modes.add_argument("--rewrite", metavar="START:END", action="append", type=_char_range, default=[],
                       help="edit: a character range of TEXT to rewrite (repeatable; START or END may be left out)")
    modes.add_argument("--blank", metavar="CHAR",
                       help="edit: every CHAR in TEXT is one position to fill (CHAR: one token of the vocabulary)")

    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON object (text, tokens, stats) per answer")
    out.add_argument("--show-canvas", action="store_true",
                     help="on a terminal, redraw the canvas after every denoising step (noisy tokens dimmed)")
    out.add_argument("-v", "--verbose", action="store_true",
                     help="report load time, steps per canvas, tokens per forward and tokens/s on stderr")
    return parser


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    """--lora, --lora-scaled and --lora-merge (`dgrun` and `dgrun serve`): `args.lora` is [(path, scale)]."""
    lora = parser.add_argument_group("LoRA adapters (files from convert-lora-to-dgf)")
    lora.add_argument("--lora", metavar="FILE", action=_LoraAction, dest="lora", default=[],
                      help="apply a LoRA adapter at scale 1 (repeatable)")
    lora.add_argument("--lora-scaled", metavar=("FILE", "SCALE"), nargs=2, action=_LoraAction, dest="lora",
                      help="apply a LoRA adapter at SCALE (repeatable)")
    lora.add_argument("--lora-merge", action="store_true",
                      help="add the adapters into float32 copies of the weights at load (float models only): faster "
                           "passes, more memory")


class _LoraAction(argparse.Action):
    """--lora FILE and --lora-scaled FILE SCALE, in the order given, as one list of (path, scale)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        path, scale = (values, "1") if isinstance(values, str) else values
        try:
            value = float(scale)
        except ValueError:
            parser.error(f"{option_string}: SCALE must be a number, got {scale!r}")
        setattr(namespace, self.dest, [*getattr(namespace, self.dest), (path, value)])


def _char_range(text: str) -> tuple[int | None, int | None]:
    start, sep, end = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return (int(start) if start else None, int(end) if end else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END character offsets, got {text!r}") from None


def _generate_command(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    prompt = _read_prompt(args)
    mode = _check_mode(args, prompt)
    token_ids = _parse_token_ids(prompt) if mode == "ids" else None
    model = _load_model(args)
    params = {name: getattr(args, name) for name in (
        "max_new_tokens", "max_denoising_steps", "t_min", "t_max", "entropy_bound", "stability_threshold",
        "confidence_threshold")}
    params["adaptive_stopping"] = not args.no_adaptive_stopping
    params.update(_constraint_args(args))
    with model:
        if mode == "interactive":
            return _interactive(model, args, prompt, params)
        stats = Stats()
        if mode == "edit":
            spans = [(0 if s is None else s, len(args.edit) if e is None else e) for s, e in args.rewrite]
            prompt_ids = model.tokenize("" if prompt is None else prompt)
            events = model.stream_edit(args.edit, spans, prompt_ids, blank=args.blank, seed=args.seed, stats=stats,
                                       **params)
        elif mode == "infill":
            prefix, suffix = (args.prefix or "", args.suffix or "") if prompt is None else prompt.split(FILL_MARKER)
            prompt_ids = model.tokenize(prefix)
            events = model.stream_infill(prefix, suffix, args.fill_length, seed=args.seed, stats=stats, **params)
        else:
            images = None
            if mode == "chat":
                messages = [] if args.system is None else [{"role": "system", "content": args.system}]
                content: Any = prompt
                if args.image:  # the images first, then the text: the order of the model card's examples
                    content = [*({"type": "image", "image": path} for path in args.image),
                               {"type": "text", "text": prompt}]
                prompt_ids: Any = model.apply_chat_template([*messages, {"role": "user", "content": content}],
                                                            tokenize=not args.image)
            elif token_ids is not None:
                prompt_ids = token_ids  # checked against the vocabulary by stream
            elif model.tokenizer is None:
                raise UsageError(f"{model.path.name} has no tokenizer (converted with --no-tokenizer): give the "
                                 "prompt as token ids with --token-ids")
            else:
                prompt_ids = prompt if args.image else model.tokenize(prompt)
            if args.image:  # each image decoded once: its token count lays out the prompt, its pixels feed the tower
                prompt_ids, images = model.tokenize_with_images(prompt_ids, args.image)
            events = model.stream(prompt_ids, seed=args.seed, stats=stats, images=images, **params)
        answer = _run(model, events, args, one_canvas=mode in ("edit", "infill"))
        answer.stats = stats.as_dict()
        _report(model, args, answer, {"prompt_tokens": len(prompt_ids)})
        return EXIT_INTERRUPTED if answer.finish_reason == "interrupted" else 0


def _read_prompt(args: argparse.Namespace) -> str | None:
    if args.prompt is not None:
        return args.prompt
    if args.file is not None:
        return _read_text(Path(args.file), "prompt")
    # stdin is the prompt only where one is expected: -i reads its turns there, infill and edit have their text.
    takes_prompt = not (args.interactive or args.prefix is not None or args.suffix is not None or args.edit is not None)
    if takes_prompt and not sys.stdin.isatty():
        return sys.stdin.read()
    return None


def _check_mode(args: argparse.Namespace, prompt: str | None) -> str:
    """Which of plain / ids / chat / interactive / infill / edit the arguments ask for, refusing conflicting ones."""
    infill_flags = args.prefix is not None or args.suffix is not None
    if args.token_ids:
        # Token ids are a whole prompt, already tokenized: nothing can wrap them in a template or split them.
        for flag, on in (("--chat", args.chat), ("--interactive", args.interactive),
                         ("--prefix/--suffix", infill_flags), ("--edit", args.edit is not None)):
            if on:
                raise UsageError(f"--token-ids cannot be combined with {flag}: the ids are the whole prompt")
        if prompt is None:
            raise UsageError("--token-ids needs a prompt: -p IDS, -f FILE or ids on stdin")
    markers = 0 if prompt is None or args.token_ids else prompt.count(FILL_MARKER)
    if markers > 1:
        raise UsageError(f"the prompt has {markers} {FILL_MARKER} markers; an infill takes exactly one")
    if infill_flags and prompt is not None:
        raise UsageError("give the infill either as --prefix/--suffix or as a prompt with one <FILL> marker")
    requested = [name for name, on in (("--edit", args.edit is not None), ("infill", infill_flags or markers),
                                       ("--chat", args.chat), ("--interactive", args.interactive)) if on]
    if len(requested) > 1 and requested != ["--chat", "--interactive"]:
        raise UsageError(f"{' and '.join(requested)} cannot be combined")
    if args.rewrite and args.edit is None:
        raise UsageError("--rewrite needs --edit TEXT")
    if args.blank is not None and args.edit is None:
        raise UsageError("--blank needs --edit TEXT")
    if args.edit is not None and not args.rewrite and args.blank is None:
        raise UsageError("--edit needs at least one --rewrite START:END or a --blank CHAR")
    if args.fill_length is not None and not (infill_flags or markers):
        raise UsageError("--fill-length applies to infills only (--prefix/--suffix or a <FILL> marker)")
    if args.system is not None and not (args.chat or args.interactive):
        raise UsageError("--system needs --chat or --interactive")
    image_modes = [name for name, on in (("--edit", args.edit is not None), ("infill", infill_flags or markers),
                                         ("--interactive", args.interactive)) if on]
    if args.image and image_modes:
        raise UsageError(f"--image cannot be combined with {image_modes[0]}: images go in a prompt (plain or --chat)")
    given = [flag for flag, value in (("--json-schema", args.json_schema), ("--regex", args.regex),
                                      ("--grammar", args.grammar)) if value is not None]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} cannot be combined: give one constraint")
    if given and (args.edit is not None or infill_flags or markers):
        raise UsageError(f"{given[0]} constrains generation and chat, not infill or edit")
    if args.token_ids:
        return "ids"
    if args.edit is not None:
        return "edit"
    if infill_flags or markers:
        return "infill"
    if args.interactive:
        return "interactive"
    if prompt is None:
        raise UsageError("no prompt: give -p TEXT, -f FILE or pipe text on stdin")
    return "chat" if args.chat else "plain"


def _constraint_args(args: argparse.Namespace) -> dict[str, Any]:
    """--json-schema (a file or JSON text), --regex, --grammar (a file) as the API's keyword arguments."""
    if args.json_schema is not None:
        if args.json_schema.lstrip().startswith("{"):
            return {"json_schema": args.json_schema}
        if not Path(args.json_schema).is_file():
            raise UsageError(f"--json-schema {args.json_schema!r} is neither a file nor a JSON object")
        return {"json_schema": _read_text(Path(args.json_schema), "--json-schema")}
    if args.grammar is not None:
        return {"grammar": _read_text(Path(args.grammar), "--grammar")}
    return {} if args.regex is None else {"regex": args.regex}


def _read_text(path: Path, flag: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the {flag} file {path}: {getattr(e, 'strerror', None) or e}") from None


def _parse_token_ids(prompt: str | None) -> list[int]:
    """Whitespace-separated integers; anything else is a UsageError (the vocabulary is checked once loaded)."""
    words = (prompt or "").split()
    if not words:
        raise UsageError("--token-ids: the prompt has no token ids")
    bad = next((w for w in words if not re.fullmatch(r"-?[0-9]+", w)), None)
    if bad is not None:
        raise UsageError(f"--token-ids: {bad[:40]!r} is not a token id (expected whitespace-separated integers)")
    return [int(w) for w in words]


def _load_model(args: argparse.Namespace) -> Model:
    path = resolve_model(args.model)
    if args.model is None:
        if not path.is_file():
            raise UsageError(f"no model given (-m MODEL) and the demo model is not installed (expected {path})")
        sys.stderr.write(f"dgrun: no -m given: using the demo model {path}\n")  # one write: `serve` prints meanwhile
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {args.threads}")
        os.environ["DGRUN_THREADS"] = str(args.threads)  # read by the cpu backend when it starts
    started = time.perf_counter()
    if args.lora_merge and not args.lora:
        raise UsageError("--lora-merge needs --lora FILE or --lora-scaled FILE SCALE")
    model = load(path, backend=args.backend, lora=args.lora, merge_lora=args.lora_merge, mmproj=args.mmproj)
    if args.backend == "auto":
        print(f"dgrun: backend {model.backend.name} (auto)", file=sys.stderr)
    if args.verbose:
        print(f"dgrun: loaded {path} in {time.perf_counter() - started:.2f} s on backend {model.backend.name}",
              file=sys.stderr)
        for adapter in model.lora_adapters():
            print(f"dgrun: LoRA adapter {adapter['id']}: {adapter['path']} at scale {adapter['scale']:g} (alpha "
                  f"{adapter['alpha']:g}, rank {'/'.join(map(str, adapter['ranks']))}, {adapter['deltas']} deltas"
                  f"{', merged' if adapter['merged'] else ''})", file=sys.stderr)
    return model


@dataclass
class Answer:
    """One answer as the CLI saw it: every committed token, the stats of its generation, and why it ended."""

    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "eos" | "length" | "canvas" (infill/edit) | "interrupted"
    stats: dict[str, Any] = field(default_factory=dict)


def _run(model: Model, events: Iterator[Draft | Commit], args: argparse.Namespace, one_canvas: bool) -> Answer:
    """Consume one answer's events: stream its text (or draw its drafts), report canvases, survive Ctrl-C."""
    answer = Answer()
    eos = set(model.generation_config.eos_token_ids)
    printer: TextPrinter | IdsPrinter | None = None
    if not args.json:
        printer = (IdsPrinter(sys.stdout) if model.tokenizer is None
                   else TextPrinter(model, sys.stdout, eos, args.show_canvas and sys.stdout.isatty()))
    try:
        for event in events:
            if isinstance(event, Draft):
                if printer is not None:
                    printer.draft(event)
                continue
            answer.tokens.extend(event.tokens)
            if printer is not None:
                printer.commit(event.tokens)
            if args.verbose:
                print(f"dgrun: canvas {event.canvas_index}: {event.steps} steps, {len(event.tokens)} tokens",
                      file=sys.stderr)
        if one_canvas:
            answer.finish_reason = "canvas"
        elif answer.tokens and answer.tokens[-1] in eos:
            answer.finish_reason = "eos"
    except KeyboardInterrupt:
        answer.finish_reason = "interrupted"
    except BaseException:
        if printer is not None:
            printer.close(answered=False)  # the error message follows; stdout gets no empty answer
        raise
    if printer is not None:
        printer.close()
    return answer


def _report(model: Model, args: argparse.Namespace, answer: Answer, extra: dict[str, Any]) -> None:
    """--json: the answer as one JSON line; --verbose: the generation's speed on stderr."""
    stats = answer.stats
    if args.json:
        text = model.detokenize(_without_eos(answer.tokens, model))
        print(json.dumps({"text": text, "tokens": answer.tokens, "finish_reason": answer.finish_reason, **extra,
                          "backend": model.backend.name, "stats": stats}), flush=True)
    if args.verbose and stats:
        print(f"dgrun: {stats['new_tokens']} tokens in {stats['seconds']:.2f} s ({stats['tokens_per_second']:.1f} "
              f"tokens/s), {stats['tokens_per_forward']:.2f} tokens per forward, {stats['encoder_passes']} "
              f"encoder passes, {stats['decoder_passes']} decoder passes", file=sys.stderr)


def _without_eos(tokens: list[int], model: Model) -> list[int]:
    """The tokens to show: generation stops after an EOS, which is a marker, not text."""
    return tokens[:-1] if tokens and tokens[-1] in model.generation_config.eos_token_ids else tokens


def _interactive(model: Model, args: argparse.Namespace, prompt: str | None, params: dict[str, Any]) -> int:
    """Chat turn by turn: each line of stdin is a user message; each answer is printed, then a newline."""
    session = ChatSession(model, system=args.system, seed=args.seed, params=params)
    ask = sys.stdin.isatty()

    def user_turns() -> Iterator[str]:
        if prompt:
            yield prompt
        while True:
            if ask:
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                return
            if line.strip():
                yield line.rstrip("\n")

    for number, content in enumerate(user_turns(), 1):
        turns_before = len(session.turns)
        answer = _run(model, session.stream(content), args, one_canvas=False)
        turn = session.turns[-1] if len(session.turns) > turns_before else None  # None: stopped before a commit
        answer.stats = {} if turn is None else turn.as_dict()
        _report(model, args, answer, {"turn": number})
        if args.verbose and turn is not None:
            print(f"dgrun: turn {number}: encoded {turn.encoded_tokens} new tokens (cache {turn.cache_tokens})"
                  f"{', re-encoded the whole conversation' if turn.reencoded else ''}", file=sys.stderr)
        if answer.finish_reason == "interrupted":
            return EXIT_INTERRUPTED
    return 0


class IdsPrinter:
    """For a model without tokenizer: an answer's token ids as `Model.generate` returns them (an EOS that ended
    it included), space separated on one line, streamed canvas by canvas."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.started = False

    def draft(self, event: Draft) -> None:
        """Drafts are not shown: ids of noisy tokens say nothing."""

    def commit(self, tokens: list[int]) -> None:
        if tokens:
            self.stream.write((" " if self.started else "") + " ".join(map(str, tokens)))
            self.stream.flush()
            self.started = True

    def close(self, answered: bool = True) -> None:
        if answered or self.started:
            self.stream.write("\n")
        self.stream.flush()


class TextPrinter:
    """Streams an answer's committed text; with `draw` (a terminal), shows every draft in place before it.

    A draft is written after the committed text and erased before the next draft or commit: the cursor goes
    back over exactly the rows the draft took, so the committed output above it is never redrawn.
    """

    DRAFT_CONTEXT = 4  # committed tokens decoded ahead of a draft, so its first word gets its leading space

    def __init__(self, model: Model, stream: TextIO, eos: set[int], draw: bool):
        self.model, self.stream, self.eos, self.draw = model, stream, eos, draw
        self.tokens: list[int] = []  # committed so far, EOS excluded
        self.text = ""  # their text, as printed
        self.column = 0  # cursor column after the committed text
        self.draft_rows = 0  # rows the draft on screen spans (0: none)
        self.width = max(shutil.get_terminal_size().columns, 1)

    def draft(self, event: Draft) -> None:
        """Redraw the canvas: accepted tokens plain, still-noisy ones dimmed."""
        if not self.draw:
            return
        tokens = event.tokens.tolist()
        cut = next((i + 1 for i, t in enumerate(tokens) if t in self.eos), len(tokens))  # what a commit would keep
        context = self.tokens[-self.DRAFT_CONTEXT:]
        shown, plain = [], ""
        previous = self.model.detokenize(context) or ""
        start = 0
        while start < cut:  # one decode per run of equally accepted tokens, each continuing the text before it
            end = start + 1
            while end < cut and event.accepted[end] == event.accepted[start]:
                end += 1
            text = self.model.detokenize(context + tokens[:end]) or ""
            piece = "".join(ch if ch == "\n" or ch.isprintable() else "\u00b7" for ch in text[len(previous):])
            shown.append(piece if event.accepted[start] else DIM + piece + UNDIM)
            plain += piece
            previous, start = text, end
        self._erase()
        self.stream.write("".join(shown))
        self.stream.flush()
        self.draft_rows = self._advance(plain, self.column)[0]

    def commit(self, tokens: list[int]) -> None:
        """Print a canvas's committed text (an EOS that ended it is not text) and flush."""
        self._erase()
        self.tokens.extend(t for t in tokens if t not in self.eos)
        text = self.model.detokenize(self.tokens) or ""
        new = text[len(self.text):]  # decoding all of it keeps word boundaries exactly as a one-shot decode
        self.text = text
        self.stream.write(new)
        self.stream.flush()
        self.column = self._advance(new, self.column)[1]

    def close(self, answered: bool = True) -> None:
        """Erase any draft and end the answer's line (unless it failed before printing anything)."""
        self._erase()
        if answered or self.text:
            self.stream.write("\n")
        self.stream.flush()

    def _erase(self) -> None:
        if self.draft_rows:
            up = self.draft_rows - 1
            self.stream.write("\r" + (f"\x1b[{up}A" if up else "") + (f"\x1b[{self.column}C" if self.column else "")
                              + ERASE_DOWN)
            self.draft_rows = 0

    def _advance(self, text: str, column: int) -> tuple[int, int]:
        """(rows spanned, final column) of `text` written from `column` on a terminal `width` wide."""
        rows = 1
        for ch in text:
            if ch == "\n":
                rows, column = rows + 1, 0
                continue
            if ch == "\t":
                width = 8 - column % 8
            else:
                width = 2 if unicodedata.east_asian_width(ch) in "WF" else 0 if unicodedata.combining(ch) else 1
            if column + width > self.width:  # terminals wrap before a character that does not fit
                rows, column = rows + 1, 0
            column += width
        return rows, column


# -- dgrun serve ------------------------------------------------------------------------------------------


SERVER_MODULES = {"fastapi", "uvicorn", "starlette", "pydantic", "anyio"}


def _serve_command(argv: list[str]) -> int:
    try:
        from dgrun.server import main as serve
    except ImportError as e:
        if (e.name or "").partition(".")[0] not in SERVER_MODULES:
            raise
        raise UsageError(f"dgrun serve needs the server extra ({e.name} is missing): pip install 'dgrun[server]'") \
            from None
    return serve(argv)


# -- dgrun info ------------------------------------------------------------------------------------------


def _info_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dgrun info", description="Describe a .dgf model or any GGUF file.")
    parser.add_argument("model", help="the file, or a shipped model's name (demo, sudoku)")
    parser.add_argument("--json", action="store_true", help="print the description as one JSON object")
    args = parser.parse_args(argv)
    info = describe_file(resolve_model(args.model))
    print(json.dumps(info) if args.json else _format_info(info))
    return 0


def describe_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What `dgrun info` shows, as data: any GGUF file's header, plus DiffusionGemma's details when it is one."""
    with GGUFFile(path) as gguf:
        meta = gguf.metadata
        info: dict[str, Any] = {
            "path": str(path), "file_bytes": gguf.file_size, "gguf_version": gguf.version,
            "architecture": meta.get("general.architecture"), "name": meta.get("general.name"),
            "origin": file_origin(meta),
            "tensor_count": len(gguf.tensors), "metadata_count": len(meta), "types": type_mix(gguf),
            "outtype": meta.get("dgrun.outtype"),
            "tokenizer": ("huggingface" if HF_JSON_KEY in meta else "sentencepiece" if SPM_TENSOR in gguf.tensors
                          else meta.get("tokenizer.ggml.model")),
            "vocab_tokens": len(meta.get("tokenizer.ggml.tokens") or []) or None,
            "chat_template": CHAT_TEMPLATE_KEY in meta,
        }
        try:
            if meta.get("general.type") == "adapter":
                info["adapter"] = describe_adapter(gguf)
            elif info["architecture"] == ARCH:
                config = ModelConfig.from_file(gguf)
                generation = GenerationConfig.from_metadata(meta)
                info["config"] = vars(config)
                info["generation"] = {**generation.resolved(), "eos_token_ids": generation.eos_token_ids,
                                      "pad_token_id": generation.pad_token_id}
            if "clip.vision.projector_type" in meta:
                vision = VisionConfig.from_metadata(meta, gguf.tensors)
                names = [n for n in vision_tensor_shapes(vision) if n in gguf.tensors]
                info["vision"] = {"config": vars(vision), "types": type_mix(gguf, names)}
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    return info


def file_origin(meta: dict[str, Any]) -> str:
    """Which tool wrote the file, from the keys each writes: dgrun's converter or llama.cpp's (with its file type,
    which llama-quantize sets to the preset it ran, e.g. Q4_K_M)."""
    if written_by_dgrun(meta):
        outtype = meta.get("dgrun.outtype")
        return "dgrun (convert-hf-to-dgf" + (f", {outtype})" if isinstance(outtype, str) else ")")
    if "general.quantization_version" in meta or "general.file_type" in meta:
        try:
            file_type = LlamaFileType(meta.get("general.file_type")).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            file_type = "unknown"
        return f"llama.cpp (convert_hf_to_gguf.py / llama-quantize), file type {file_type}"
    return "unknown writer"


def _format_info(info: dict[str, Any]) -> str:
    rows = [("file", f"{info['path']} ({_size(info['file_bytes'])}, GGUF v{info['gguf_version']})"),
            ("origin", info["origin"]), ("architecture", info["architecture"] or "(not set)")]
    if info["name"]:
        rows.append(("name", info["name"]))
    rows.append(("tensors", f"{info['tensor_count']} tensors, {info['metadata_count']} metadata keys"))
    adapter = info.get("adapter")
    if adapter:
        alpha = "none (scale as given)" if not adapter["alpha"] else f"{adapter['alpha']:g}"
        if adapter["use_rslora"]:
            alpha += f" (rsLoRA: PEFT alpha {adapter['peft_alpha']:g} x sqrt(r))"
        rows += [("adapter", f"{adapter['adapter_type']}, rank {'/'.join(map(str, adapter['ranks']))}, alpha {alpha}"),
                 ("deltas", ", ".join(f"{n} {side.replace('_', '-')}" for side, n in adapter["deltas"].items()))]
    cfg = info.get("config")
    if cfg:
        sliding = sum(t == "sliding_attention" for t in cfg["layer_types"])
        rows += [
            ("layers", f"{cfg['num_hidden_layers']} ({sliding} sliding, window {cfg['sliding_window']}; "
                       f"{cfg['num_hidden_layers'] - sliding} full)"),
            ("hidden", f"{cfg['hidden_size']} (dense MLP {cfg['intermediate_size']})"),
            ("attention", f"{cfg['num_attention_heads']} heads; sliding {cfg['num_key_value_heads']} KV heads x "
                          f"{cfg['head_dim']}; full {cfg['num_global_key_value_heads']} KV heads x "
                          f"{cfg['global_head_dim']}"),
            ("experts", f"{cfg['num_experts']}, top-{cfg['top_k_experts']}, {cfg['moe_intermediate_size']} wide"),
            ("vocab", str(cfg["vocab_size"])),
            ("canvas", f"{cfg['canvas_length']} tokens (context {cfg['max_position_embeddings']})"),
            ("generation", ", ".join(f"{k}={v}" for k, v in info["generation"].items())),
        ]
    vision = info.get("vision")
    if vision:
        v = vision["config"]
        size = sum(t["bytes"] for t in vision["types"].values())
        types = ", ".join(f"{name} {t['tensors']}" for name, t in sorted(vision["types"].items()))
        rows += [
            ("vision", f"{v['num_hidden_layers']} layers, hidden {v['hidden_size']} (MLP {v['intermediate_size']}), "
                       f"{v['num_attention_heads']} heads x {v['head_dim']}; {_size(size)} ({types})"),
            ("images", f"{v['patch_size']}-pixel patches pooled {v['pooling_kernel_size']}x"
                       f"{v['pooling_kernel_size']}, up to {v['max_soft_tokens']} tokens per image, projected to "
                       f"{v['projection_dim']}"),
        ]
    if info["tokenizer"] or info["vocab_tokens"]:
        vocab = f", {info['vocab_tokens']} tokens" if info["vocab_tokens"] else ""
        template = ", chat template" if info["chat_template"] else ", no chat template"
        rows.append(("tokenizer", f"{info['tokenizer'] or 'vocabulary only'}{vocab}{template}"))
    elif not adapter:  # an adapter has no tokenizer of its own: it runs with its model's
        rows.append(("tokenizer", "none (token ids only)"))
    if info["outtype"]:  # the preset asked for; the types below are what each tensor got (fallbacks included)
        rows.append(("outtype", info["outtype"]))
    total = sum(t["bytes"] for t in info["types"].values()) or 1
    for index, (name, t) in enumerate(sorted(info["types"].items(), key=lambda kv: -kv[1]["bytes"])):
        rows.append(("types" if index == 0 else "", f"{name}: {t['tensors']} tensors, {_size(t['bytes'])} "
                                                     f"({100 * t['bytes'] / total:.1f}%)"))
    return "\n".join(f"{label:<13}{value}" for label, value in rows)


def _size(nbytes: float) -> str:
    units = ["B", "KiB", "MiB", "GiB"]
    while nbytes >= 1024 and len(units) > 1:
        nbytes /= 1024
        units.pop(0)
    return f"{nbytes:.0f} B" if units[0] == "B" else f"{nbytes:.1f} {units[0]}"
