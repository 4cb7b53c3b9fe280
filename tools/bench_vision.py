"""Time to encode one image: dgrun's vision tower and projector vs transformers', side by side in one run.

    python tools/bench_vision.py                          # Gemma 4's vision widths, cpu backend, f32 and q8_0
    python tools/bench_vision.py --backend numpy --reps 1 --outtypes q8_0

A DiffusionGemma checkpoint with Gemma 4's vision tower (`Gemma4VisionConfig`'s widths: 16 layers, 768 wide, MLP
3072, 12 heads x 64, 16-pixel patches pooled 3x3, a 10,240-entry position table) projecting to the released text
model's 2816, random weights, a two-layer text model, and Gemma 4's image processor settings (280 soft tokens per
image); converted with `convert-hf-to-dgf` (the vision tower then stays f32 in an f32 file and takes q8_0 in every
quantizing preset). A 4:3 random image, which the resize scales to fill the budget (266 tokens, 42 x 57 patches),
is preprocessed and embedded; prints the median milliseconds over the repetitions for preprocessing (Pillow
decode, resize, patches) and for the tower + projector, and the ratio to transformers' `get_image_features`
(float32, same threads) on the same pixels.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures  # noqa: E402

TEXT_HIDDEN = 2816  # the released text model's hidden size: the projector's output
PROCESSOR = {**fixtures.VISION_PREPROCESSOR, "patch_size": 16, "pooling_kernel_size": 3, "max_soft_tokens": 280}


def make_checkpoint(folder: Path) -> Any:
    """The transformers model (float32, eval) saved to `folder` with Gemma 4's image processor settings."""
    text = fixtures.text_config(hidden_size=TEXT_HIDDEN, num_hidden_layers=2,
                                layer_types=["sliding_attention", "full_attention"])
    vision = {"model_type": "gemma4_vision", "standardize": False}  # every width left at Gemma4VisionConfig's
    model = fixtures.make_model(text, vision=vision, **fixtures.VISION_TOKEN_IDS)
    fixtures.save_checkpoint(model, folder, vision_files=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(PROCESSOR))
    return model


def bench_image(tokens: int, pooling: int, patch: int) -> bytes:
    """A 4:3 PNG of random pixels about as large as `tokens` soft tokens cover."""
    from PIL import Image

    side = int(np.sqrt(tokens)) * pooling * patch
    rng = np.random.default_rng(tokens)
    pixels = rng.integers(0, 256, (side * 3 // 4, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def timed(fn: Any, reps: int) -> float:
    """Median milliseconds of `fn()` over `reps` calls after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--outtypes", nargs="+", default=["f32", "q8_0"])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoImageProcessor

    import dgrun
    from dgrun import vision
    from dgrun.converters.convert_hf import convert

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "hf"
        hf = make_checkpoint(folder)
        processor = AutoImageProcessor.from_pretrained(folder)
        files = {outtype: Path(tmp) / f"{outtype}.dgf" for outtype in args.outtypes}
        for outtype, path in files.items():
            convert(folder, path, outtype, quiet=True)
        print(f"threads: torch {torch.get_num_threads()}; backend {args.backend}; median of {args.reps}")
        data = bench_image(PROCESSOR["max_soft_tokens"], PROCESSOR["pooling_kernel_size"], PROCESSOR["patch_size"])
        inputs = processor([_pil(data)], return_tensors="pt")
        with torch.no_grad():
            theirs = timed(partial(hf.model.encoder.get_image_features, inputs["pixel_values"],
                                   inputs["image_position_ids"]), args.reps)
        for outtype, path in files.items():
            with dgrun.load(path, backend=args.backend) as model:
                patches = vision.load_image(data, model.vision.cfg)
                prep = timed(partial(vision.load_image, data, model.vision.cfg), args.reps)
                ours = timed(partial(_embed, model, patches), args.reps)
            print(f"{patches.tokens} tokens ({patches.grid[0]}x{patches.grid[1]} patches), {outtype}: "
                  f"preprocess {prep:.1f} ms, tower+projector {ours:.1f} ms; transformers {theirs:.1f} ms "
                  f"(ours/theirs {ours / theirs:.2f})")
    return 0


def _embed(model: Any, patches: Any) -> Any:
    return model.backend.to_numpy(model.vision.embed(patches))


def _pil(data: bytes) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


if __name__ == "__main__":
    sys.exit(main())
