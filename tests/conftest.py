"""Shared fixtures: tiny checkpoints made with transformers' class, converted with our converter.

Each checkpoint is built once per session. Helpers here print ‖out−ref‖/‖ref‖, max-abs and the first
mismatch on failure, so a broken tolerance says where it broke.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import fixtures  # noqa: E402

from dgrun.converters.convert_hf import convert  # noqa: E402


@dataclass
class Checkpoint:
    """An HF model in memory, its saved folder, and converted .dgf files by outtype."""

    model: Any
    folder: Path
    files: dict[str, Path]

    def dgf(self, outtype: str = "f32") -> Path:
        """The checkpoint converted with preset `outtype`; "all-<TYPE>" (e.g. "all-IQ3_S"): the f32 file with every
        matrix in that ggml type, as `fixtures.write_retyped` makes it (for types dgrun reads but cannot write)."""
        if outtype not in self.files:
            out = self.folder.parent / f"{self.folder.name}-{outtype}.dgf"
            if outtype.startswith("all-"):
                fixtures.write_retyped(self.dgf("f32"), out, outtype.removeprefix("all-"))
            else:
                convert(self.folder, out, outtype, quiet=True)
            self.files[outtype] = out
        return self.files[outtype]


# Two layers (one of each kind) and two experts keep the odd-width fixtures small.
ODD_LAYOUT = dict(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], num_experts=2,
                  top_k_experts=1)

CONFIGS: dict[str, dict[str, Any]] = {
    # 2 sliding + 2 full layers, window 8 (prompts both shorter and longer), grouped KV, top-2 of 4 experts.
    "base": dict(text=fixtures.text_config(), seed=0),
    # The same architecture with a damped self-conditioning loop, for token-exact generation (see fixtures).
    "gen": dict(text=fixtures.text_config(), seed=0, self_cond_std=0.01),
    # 5:1 sliding pattern, window 4, top-1 routing over 3 experts, one KV head everywhere.
    "top1": dict(text=fixtures.text_config(
        num_hidden_layers=6, layer_types=["sliding_attention"] * 5 + ["full_attention"], sliding_window=4,
        num_experts=3, top_k_experts=1, num_key_value_heads=1), seed=1),
    # Saved as bf16 (compared against transformers run in float32 on the same bf16 weights).
    "bf16": dict(text=fixtures.text_config(), seed=2, dtype="bfloat16"),
    # Full layers with the sliding layers' head dim and KV heads: save_pretrained writes `per_layer_config: {}`.
    "uniform": dict(text=fixtures.text_config(global_head_dim=16, num_global_key_value_heads=2), seed=4,
                    self_cond_std=0.01),
    # Row widths no block type divides (a fine-tune's or a distilled variant's): every preset falls back somewhere.
    "odd48": dict(text=fixtures.text_config(hidden_size=48, intermediate_size=80, moe_intermediate_size=2600,
                                            **ODD_LAYOUT), seed=5),
    "odd2600": dict(text=fixtures.text_config(hidden_size=2600, intermediate_size=80, moe_intermediate_size=48,
                                              **ODD_LAYOUT), seed=6),
    # A vision tower, image tokens and the image processor's settings (tests/test_vision.py); a short context so too
    # many images overflow it; the damped self-conditioning loop of "gen" for token-exact generation.
    "vision": dict(text=fixtures.text_config(use_bidirectional_attention="vision", max_position_embeddings=320),
                   seed=8, self_cond_std=0.01, vision=fixtures.vision_config(), top=fixtures.VISION_TOKEN_IDS),
    # Row widths of 256 so K-quants and NVFP4 apply (quantized-file tests).
    "quant": dict(text=fixtures.text_config(vocab_size=256, hidden_size=256, intermediate_size=256,
                                            moe_intermediate_size=64), seed=3),
}


@pytest.fixture(autouse=True)
def float32_cpu_matmuls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test compares backends with the numpy reference in float32: the cpu backend's integer arithmetic
    (on by default for quantized files) has tests of its own, which turn it on (test_int8.py, test_quantized.py)."""
    monkeypatch.setenv("DGRUN_CPU_INT8", "0")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Checkpoint]:
    """Lazily built checkpoints by name."""
    class Lazy(dict):
        def __missing__(self, name: str) -> Checkpoint:
            import torch
            from transformers import DiffusionGemmaForBlockDiffusion

            spec = CONFIGS[name]
            model = fixtures.make_model(spec["text"], seed=spec["seed"], self_cond_std=spec.get("self_cond_std", 0.1),
                                        vision=spec.get("vision"), **spec.get("top", {}))
            folder = fixtures.save_checkpoint(model, tmp_path_factory.mktemp(name) / "hf",
                                              dtype=spec.get("dtype", "float32"), vision_files="vision" in spec)
            if spec.get("dtype") == "bfloat16":
                # The reference: transformers running the saved bf16 weights in float32, as loaded by users.
                model = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=torch.float32).eval()
            self[name] = Checkpoint(model, folder, {})
            return self[name]

    return Lazy()


def assert_close(out: np.ndarray, ref: np.ndarray, rtol: float, what: str) -> None:
    """Relative L2 error below `rtol`; on failure report rel error, max-abs error and the first mismatch."""
    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, f"{what}: shape {out.shape} != {ref.shape}"
    rel = np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)
    if rel > rtol:
        diff = np.abs(out - ref)
        first = np.unravel_index(int(np.argmax(diff > rtol * np.abs(ref).max())), diff.shape)
        pytest.fail(f"{what}: rel L2 {rel:.3e} > {rtol:.1e}; max-abs {diff.max():.3e}; "
                    f"first mismatch at {first}: {out[first]!r} vs {ref[first]!r}")


def dgrun_cli(*args: object, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m dgrun ARGS` as a user runs it: text output captured, `stdin` fed (else none), bounded in time."""
    command = [sys.executable, "-m", "dgrun", *map(str, args)]
    feed: dict[str, Any] = {"stdin": subprocess.DEVNULL} if stdin is None else {"input": stdin}
    return subprocess.run(command, **feed, capture_output=True, text=True, timeout=120, cwd=cwd)
