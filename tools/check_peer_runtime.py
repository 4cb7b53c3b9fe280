"""Check that dgrun's files run in the llama.cpp fork of PR #24423 (the runtime of the published GGUF files).

    python tools/check_peer_runtime.py --cli /path/to/build/bin/llama-diffusion-cli \
        [--tokenize /path/to/build/bin/llama-tokenize]

Not part of the test suite (it needs a build of the fork, ~15 minutes on 2 cores; how to build it is the fork's
business). It converts the "gen" checkpoint of `fixtures.PEER_CHECKPOINTS` with dgrun's converter and runs that
file through `llama-diffusion-cli` beside the fork's own conversion of the same checkpoint
(tests/data/peer/gen-f32.gguf): the same weights under two writers' layouts must give the fork the same tokens
for the same seed. With `--tokenize`, the fork's tokenizer is also compared with dgrun's on both files.
Exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures  # noqa: E402

import dgrun  # noqa: E402
from dgrun.converters.convert_hf import convert  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PEER_FILE = REPO / "tests" / "data" / "peer" / "gen-f32.gguf"
PROMPTS = ["def fibonacci(n):", "The quick brown fox"]
TOKENIZER_TEXTS = ["def fibonacci(n):\n    return n", "  two  spaces\n\n\nthree newlines", "naïve café 🙂",
                   "<|turn>user\nhi<turn|>"]


def run_cli(cli: Path, model: Path, prompt: str, seed: int) -> tuple[int, str, str]:
    """(exit status, generated text, the log's last lines) of one llama-diffusion-cli run: 2 canvases, 4 steps."""
    cmd = [str(cli), "-m", str(model), "-p", prompt, "-n", "32", "--diffusion-eb-max-steps", "4", "-t", "2",
           "-s", str(seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=600)
    # stdout is the text, then timing lines that differ run to run
    text = "\n".join(line for line in proc.stdout.strip().splitlines()
                     if not line.startswith(("total time:", "throughput:")))
    return proc.returncode, text, "\n".join(proc.stderr.strip().splitlines()[-5:])


def fork_token_ids(tokenize: Path, model: Path, text: str) -> list[int]:
    """The fork's token ids of `text` (BOS as the file says), from `llama-tokenize --ids`."""
    proc = subprocess.run([str(tokenize), "-m", str(model), "-p", text, "--ids", "--log-disable"],
                          capture_output=True, text=True, timeout=120, check=True)
    line = proc.stdout.strip().splitlines()[-1]
    return [int(t) for t in line.strip("[]").split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cli", type=Path, required=True, help="the fork's llama-diffusion-cli binary")
    parser.add_argument("--tokenize", type=Path, help="the fork's llama-tokenize binary (compare tokenizers)")
    parser.add_argument("--outtype", default="f32", help="dgrun outtype of the converted file (default f32)")
    args = parser.parse_args(argv)
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = fixtures.save_peer_checkpoint("gen", Path(tmp) / "gen")
        ours = Path(tmp) / f"gen-{args.outtype}.dgf"
        convert(folder, ours, args.outtype, quiet=True)
        for i, prompt in enumerate(PROMPTS):
            results = {name: run_cli(args.cli, path, prompt, seed=100 + i)
                       for name, path in (("dgrun file", ours), ("fork file", PEER_FILE))}
            for name, (rc, text, log) in results.items():
                print(f"{name:10} rc={rc} prompt={prompt!r} -> {text!r}")
                if rc != 0:
                    print(f"  log: {log}")
                    failures += 1
            same = results["dgrun file"][1] == results["fork file"][1] and results["fork file"][0] == 0
            print(f"  same output from both files: {same}")
            failures += not same
        if args.tokenize:
            for path in (ours, PEER_FILE):
                with dgrun.load(path, backend="numpy") as model:
                    for text in TOKENIZER_TEXTS:
                        theirs, mine = fork_token_ids(args.tokenize, path, text), model.tokenize(text)
                        ok = theirs == mine
                        failures += not ok
                        print(f"tokenize {path.name} {text!r}: {'same' if ok else f'fork {theirs} dgrun {mine}'}")
    print("all checks passed" if not failures else f"{failures} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
