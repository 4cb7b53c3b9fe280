"""Images in the prompt: Gemma 4's vision tower and image processor, as DiffusionGemma uses them.

Everything follows transformers 5.23.0 (`Gemma4ImageProcessorPil`, `Gemma4VisionModel`,
`DiffusionGemmaMultimodalEmbedder`, `Gemma4Processor`):

1. Decode with Pillow. A path or bytes are opened as transformers' `load_image` opens them (EXIF orientation
   applied, then `convert("RGB")`); then every image is converted as the image processor converts one
   (transparency composited onto white). The pixel count is checked on the header, before any pixel is decoded.
2. Resize (bicubic, aspect ratio kept) to the largest size whose sides are multiples of pooling x patch pixels and
   whose patch count fits the token budget (`max_soft_tokens` x pooling^2); rescale to [0, 1]; cut into patches.
3. The tower: a linear patch embedding plus a learned (x, y) position table; layers of RMS-normed attention with
   q/k norms, an unscaled v norm, scaling 1.0 and 2-D RoPE (the first half of each head rotates with x, the second
   with y), and a gated GELU MLP, each sub-block post-normed; every pooling x pooling cell averaged into one soft
   token, scaled by sqrt(hidden), standardized.
4. The projector: RMSNorm without a scale, then a linear map to the text model's width.

The tower runs on the backend op interface (the text model's ops, nothing new): the 2-D RoPE is two calls of
`rope` over the heads' halves, and the pooling sums row blocks, because the patches go in ordered so that each
pooled cell's members are `tokens` rows apart (attention and MLP do not care about row order).

The prompt side: each image is one run of `image_token_id` (as many as its soft tokens) between `boi_token_id` and
`eoi_token_id`, placed where the chat template writes the image token; the encoder reads the image's embeddings
there, and with `use_bidirectional_attention="vision"` each run attends to itself both ways
(`DiffusionGemma.encode`).
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T

from dgrun import quants
from dgrun.config import ARCH, ConfigError
from dgrun.format import GGUFFile, TensorInfo
from dgrun.model import EncoderImages

# A decoded image may not have more pixels than this (checked on the header, before decoding): ~7 times a 24 MP
# photo, and far above what the processor keeps (at most 1120 x 9 patches of 16 x 16, about 2.6 MP).
MAX_IMAGE_PIXELS = 178_956_970 // 4
# transformers' image processor accepts these token budgets only.
SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
PROJECTOR_TYPE = "gemma4v"  # llama.cpp's projector type for the Gemma 4 vision tower
# The formats Pillow may open: raster formats decoded in-process. Others it knows (EPS runs Ghostscript, some
# are rarely used and less hardened) are refused, since images can come from a server's clients.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "PPM")


# -- configuration ------------------------------------------------------------------------------------------


@dataclass
class VisionConfig:
    """The vision tower (HF `vision_config` names) and its image processor (`preprocessor_config.json` names)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    patch_size: int = 16
    pooling_kernel_size: int = 3
    position_embedding_size: int = 10_240
    rope_theta: float = 100.0
    rms_norm_eps: float = 1e-6
    standardize: bool = False
    projection_dim: int = 0  # the text model's hidden size (the projector's output)
    hidden_activation: str = "gelu_pytorch_tanh"
    # The image processor.
    max_soft_tokens: int = 280
    do_resize: bool = True
    resample: int = 3  # PIL.Image.Resampling.BICUBIC
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = False
    image_mean: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    image_std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    do_convert_rgb: bool = True

    @property
    def max_patches(self) -> int:
        return self.max_soft_tokens * self.pooling_kernel_size ** 2

    def validate(self) -> None:
        """Refuse what the tower cannot run, and sizes no real model has (a hostile file's allocations)."""
        limits = {"hidden_size": 1 << 16, "intermediate_size": 1 << 18, "num_hidden_layers": 1024,
                  "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 4096, "patch_size": 1024,
                  "pooling_kernel_size": 64, "position_embedding_size": 1 << 20, "projection_dim": 1 << 16}
        for name, limit in limits.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= limit:
                raise ConfigError(f"vision config field {name} must be an integer in 1..{limit}, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("vision num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 4:
            raise ConfigError(f"vision head_dim {self.head_dim} must be a multiple of 4 (2-D RoPE rotates halves)")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(f"unsupported vision hidden_activation {self.hidden_activation!r}")
        if self.max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
            raise ConfigError(f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, got {self.max_soft_tokens!r}")
        if self.resample not in range(6):
            raise ConfigError(f"resample must be a Pillow resampling filter (0..5), got {self.resample!r}")
        for name in ("rope_theta", "rms_norm_eps", "rescale_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"vision config field {name} must be a finite number >= 0, got {value!r}")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if len(value) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value):
                raise ConfigError(f"{name} must be three finite numbers, got {value!r}")
        if any(v == 0 for v in self.image_std):
            raise ConfigError("image_std must not contain 0")

    @classmethod
    def from_hf(cls, config: dict[str, Any], preprocessor: dict[str, Any] | None) -> VisionConfig:
        """From config.json's `vision_config` and the image processor's settings, with transformers' defaults
        (`Gemma4VisionConfig`, `Gemma4ImageProcessorPil`) for absent keys."""
        vision = config.get("vision_config") or {}
        text = config.get("text_config") or {}
        if vision.get("use_clipped_linears"):
            raise ConfigError("a vision tower with use_clipped_linears=True (Gemma 4's small models) is not supported")
        rope = vision.get("rope_parameters") or {}
        defaults = cls()
        out = cls(**{f.name: vision[f.name] for f in fields(cls) if f.name in vision and f.name in _TOWER_FIELDS},
                  rope_theta=rope.get("rope_theta", defaults.rope_theta), projection_dim=text.get("hidden_size", 2304))
        preprocessor = preprocessor or {}
        for f in fields(cls):
            if f.name in _PROCESSOR_FIELDS and f.name in preprocessor:
                setattr(out, f.name, preprocessor[f.name])
        for name in ("patch_size", "pooling_kernel_size"):  # the processor cuts what the tower pools
            if name in preprocessor and preprocessor[name] != vision.get(name, getattr(defaults, name)):
                raise ConfigError(f"the image processor's {name} {preprocessor[name]} differs from the vision "
                                  f"tower's {vision.get(name, getattr(defaults, name))}")
        out.image_mean, out.image_std = _channels(out.image_mean), _channels(out.image_std)
        out.validate()
        return out

    def to_metadata(self) -> dict[str, Any]:
        """GGUF key → value: llama.cpp's `clip.*` keys (an mmproj file's), dgrun's for what llama.cpp fixes in code."""
        out: dict[str, Any] = {"clip.has_vision_encoder": True, "clip.vision.projector_type": PROJECTOR_TYPE,
                               "clip.vision.image_size": 224}  # llama.cpp's converter writes 224: unused, required
        for name, (key, _) in VISION_METADATA_KEYS.items():
            out[key] = getattr(self, name)
        return out

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any], tensors: dict[str, TensorInfo]) -> VisionConfig:
        """From a file's keys; the sizes llama.cpp reads off the tensors (head_dim, KV heads, position table,
        standardization) are read off them here too. A missing `clip.vision.*` key (llama.cpp writes them all) or a
        mistyped key is a ConfigError; dgrun's own keys, absent from llama.cpp's mmproj files, default to
        transformers' Gemma 4 values."""
        if metadata.get("clip.vision.projector_type", metadata.get("clip.projector_type")) != PROJECTOR_TYPE:
            raise ConfigError(f"the vision tower is not a {PROJECTOR_TYPE} projector")
        kwargs: dict[str, Any] = {}
        for name, (key, kind) in VISION_METADATA_KEYS.items():
            if key in metadata:
                kwargs[name] = _coerce_vision(key, metadata[key], kind)
            elif key.startswith("clip.vision.") and key != "clip.vision.projector.scale_factor":
                raise ConfigError(f"metadata key {key} is missing")
            # else: a key llama.cpp's mmproj files leave out (it fixes these in code): transformers' default
        for name, dims in (("v.blk.0.attn_q.weight", 2), ("v.blk.0.attn_k.weight", 2), ("v.position_embd.weight", 3)):
            if name not in tensors:
                raise ConfigError(f"vision tensor {name} is missing")
            if len(tensors[name].shape) != dims:
                raise ConfigError(f"vision tensor {name} has {len(tensors[name].shape)} dimensions, not {dims}")
        heads = kwargs["num_attention_heads"]
        q_rows, k_rows = tensors["v.blk.0.attn_q.weight"].shape[0], tensors["v.blk.0.attn_k.weight"].shape[0]
        if heads <= 0 or q_rows % heads or k_rows % (q_rows // heads or 1):
            raise ConfigError(f"vision attention shapes ({q_rows}, {k_rows} rows) do not fit {heads} heads")
        kwargs["head_dim"] = q_rows // heads
        kwargs["num_key_value_heads"] = k_rows // kwargs["head_dim"]
        kwargs["position_embedding_size"] = tensors["v.position_embd.weight"].shape[-2]
        kwargs["standardize"] = "v.std_bias" in tensors
        out = cls(**kwargs)
        out.validate()
        return out


# The tower's and the processor's fields, as named in their HF json files.
_TOWER_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "patch_size", "pooling_kernel_size", "position_embedding_size", "rms_norm_eps",
                 "standardize", "hidden_activation")
_PROCESSOR_FIELDS = ("max_soft_tokens", "do_resize", "resample", "do_rescale", "rescale_factor", "do_normalize",
                     "image_mean", "image_std", "do_convert_rgb")

# VisionConfig field → (GGUF key, type): llama.cpp's keys where it has one (pooling is its projector scale factor).
VISION_METADATA_KEYS: dict[str, tuple[str, type]] = {
    "hidden_size": ("clip.vision.embedding_length", int),
    "intermediate_size": ("clip.vision.feed_forward_length", int),
    "num_hidden_layers": ("clip.vision.block_count", int),
    "num_attention_heads": ("clip.vision.attention.head_count", int),
    "rms_norm_eps": ("clip.vision.attention.layer_norm_epsilon", float),
    "patch_size": ("clip.vision.patch_size", int),
    "pooling_kernel_size": ("clip.vision.projector.scale_factor", int),
    "projection_dim": ("clip.vision.projection_dim", int),
    "image_mean": ("clip.vision.image_mean", list),
    "image_std": ("clip.vision.image_std", list),
    "rope_theta": ("dgrun.vision.rope_theta", float),
    "hidden_activation": ("dgrun.vision.hidden_activation", str),
    "max_soft_tokens": ("dgrun.vision.max_soft_tokens", int),
    "do_resize": ("dgrun.vision.do_resize", bool),
    "resample": ("dgrun.vision.resample", int),
    "do_rescale": ("dgrun.vision.do_rescale", bool),
    "rescale_factor": ("dgrun.vision.rescale_factor", float),  # written as float64: pixels are scaled in float64
    "do_normalize": ("dgrun.vision.do_normalize", bool),
    "do_convert_rgb": ("dgrun.vision.do_convert_rgb", bool),
}


def _channels(value: Any) -> list[float]:
    """A per-channel value as transformers broadcasts it (a single number means all three channels)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)] * 3
    if isinstance(value, (list, tuple)):
        return [float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in value]
    raise ConfigError(f"expected a number or three numbers, got {value!r}")


def _coerce_vision(key: str, value: Any, kind: type) -> Any:
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    if kind is list and isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind == "f":
        return [float(v) for v in value]
    raise ConfigError(f"metadata key {key} must be {kind.__name__}, got {type(value).__name__}")


@dataclass
class ImageTokens:
    """How images sit in the text model's prompt: DiffusionGemma's token ids and its encoder mask flag."""

    image_token_id: int
    boi_token_id: int
    eoi_token_id: int
    bidirectional: bool  # `use_bidirectional_attention == "vision"`: an image's tokens attend to each other

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> ImageTokens:
        """From config.json, with `DiffusionGemmaConfig`'s defaults for absent ids."""
        text = config.get("text_config") or {}
        out = cls(config.get("image_token_id", 258_880), config.get("boi_token_id", 255_999),
                  config.get("eoi_token_id", 258_882), text.get("use_bidirectional_attention") == "vision")
        for f in fields(cls)[:3]:
            value = getattr(out, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"config field {f.name} must be a token id, got {value!r}")
        return out

    def to_metadata(self) -> dict[str, Any]:
        return {f"{ARCH}.image_token_id": self.image_token_id, f"{ARCH}.boi_token_id": self.boi_token_id,
                f"{ARCH}.eoi_token_id": self.eoi_token_id,
                f"{ARCH}.use_bidirectional_attention": "vision" if self.bidirectional else ""}

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any], vocab_size: int) -> ImageTokens | None:
        """The file's image token ids, or None for a file written before dgrun knew images."""
        keys = [f"{ARCH}.{name}" for name in ("image_token_id", "boi_token_id", "eoi_token_id")]
        if not all(k in metadata for k in keys):
            return None
        ids = [metadata[k] for k in keys]
        for key, value in zip(keys, ids, strict=True):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab_size:
                raise ConfigError(f"metadata key {key} must be a token id below {vocab_size}, got {value!r}")
        return cls(*ids, metadata.get(f"{ARCH}.use_bidirectional_attention") == "vision")


def vision_tensor_shapes(cfg: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the tower and projector read, llama.cpp's names, numpy-order shapes (the patch embedding in
    llama.cpp's convolution layout [hidden, channel, y, x])."""
    h, p, d = cfg.hidden_size, cfg.patch_size, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "v.patch_embd.weight": (h, 3, p, p),
        "v.position_embd.weight": (2, cfg.position_embedding_size, h),
        "mm.input_projection.weight": (cfg.projection_dim, h),
    }
    if cfg.standardize:
        shapes.update({"v.std_bias": (h,), "v.std_scale": (h,)})
    for i in range(cfg.num_hidden_layers):
        b = f"v.blk.{i}."
        shapes.update({
            b + "attn_q.weight": (cfg.num_attention_heads * d, h),
            b + "attn_k.weight": (cfg.num_key_value_heads * d, h),
            b + "attn_v.weight": (cfg.num_key_value_heads * d, h),
            b + "attn_out.weight": (h, cfg.num_attention_heads * d),
            b + "attn_q_norm.weight": (d,),
            b + "attn_k_norm.weight": (d,),
            b + "ln1.weight": (h,),
            b + "attn_post_norm.weight": (h,),
            b + "ln2.weight": (h,),
            b + "ffn_gate.weight": (cfg.intermediate_size, h),
            b + "ffn_up.weight": (cfg.intermediate_size, h),
            b + "ffn_down.weight": (h, cfg.intermediate_size),
            b + "ffn_post_norm.weight": (h,),
        })
    return shapes


# -- decoding and preprocessing -----------------------------------------------------------------------------

ImageSource = Any  # a path (str or os.PathLike), encoded bytes, or a PIL.Image.Image


@dataclass
class ImagePatches:
    """One preprocessed image: transformers' `pixel_values` and `image_position_ids` rows, without padding."""

    pixels: np.ndarray  # float32 [patches, patch_size * patch_size * 3], each patch row-major, channels last
    positions: np.ndarray  # int64 [patches, 2]: (x, y) of each patch, row-major over the grid
    grid: tuple[int, int]  # (rows, columns) of patches
    tokens: int  # soft tokens (patches / pooling^2)


def open_image(source: ImageSource, do_convert_rgb: bool = True) -> Any:
    """An RGB `PIL.Image` from a path, encoded bytes or a `PIL.Image`, exactly as transformers would see it.

    Bad input (unreadable, truncated or corrupt data, an unknown format, more than `MAX_IMAGE_PIXELS`, a mode
    with no RGB conversion) raises a one-line ValueError; nothing beyond the header is decoded before the pixel
    count is checked.
    """
    from PIL import Image, ImageOps

    if isinstance(source, Image.Image):
        _check_pixels(source.size, "the image")
        return _to_rgb(source, do_convert_rgb)
    if isinstance(source, (bytes, bytearray, memoryview)):
        what, stream = "the image data", io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        what = f"image {os.fspath(source)}"
        if not os.path.isfile(source):  # also keeps a FIFO or a device from blocking the open
            raise ValueError(f"cannot read {what}: not a file")
        try:
            stream = open(source, "rb")  # noqa: SIM115 - closed below, once Pillow has read what it needs
        except OSError as e:
            raise ValueError(f"cannot read {what}: {e.strerror or e}") from None
    else:
        raise ValueError(f"an image must be a path, bytes or a PIL.Image, not {type(source).__name__}")
    with stream, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = _decode(lambda: Image.open(stream, formats=IMAGE_FORMATS), what)
        _check_pixels(image.size, what)
        # As transformers' load_image: the EXIF orientation applied, then a plain RGB conversion (which keeps a
        # palette's transparent colour in `info`, for the processor's conversion below to composite).
        image = _decode(lambda: ImageOps.exif_transpose(_loaded(image)), what)
        image = _decode(lambda: image if image.mode == "RGB" else image.convert("RGB"), what)
        return _to_rgb(image, do_convert_rgb, what)


def _loaded(image: Any) -> Any:
    image.load()
    return image


def _decode(step: Any, what: str) -> Any:
    """Run a Pillow decoding step; whatever bad data makes it raise becomes one ValueError line."""
    from PIL import Image

    try:
        return step()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"{what} is too large to decode ({e})") from None
    except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, struct.error, zlib.error, ...
        raise ValueError(f"cannot decode {what}: {' '.join(str(e).split()) or type(e).__name__}") from None


def _check_pixels(size: tuple[int, int], what: str) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"{what} is empty ({width} x {height} pixels)")
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{what} has {width} x {height} pixels, more than the {MAX_IMAGE_PIXELS} dgrun decodes")


def _to_rgb(image: Any, do_convert_rgb: bool, what: str = "the image") -> Any:
    """RGB as the image processor converts every image (`convert_to_rgb`): transparency (an alpha band, or a
    transparent colour in `info`) composited onto white, anything else converted plainly."""
    from PIL import Image

    transparent = "A" in image.getbands() or image.info.get("transparency") is not None
    if image.mode == "RGB" and not transparent:
        return image
    if not do_convert_rgb:
        raise ValueError(f"{what} is {image.mode}, and this model's image processor does not convert to RGB")
    try:
        if transparent:
            rgba = image.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ValueError(f"{what} has mode {image.mode}, which cannot be converted to RGB ({e})") from None


def target_size(height: int, width: int, cfg: VisionConfig) -> tuple[int, int]:
    """(height, width) the processor resizes to: the largest with sides multiples of pooling x patch pixels and at
    most `max_patches` patches, aspect ratio kept (transformers' `get_aspect_ratio_preserving_size`)."""
    side = cfg.pooling_kernel_size * cfg.patch_size
    budget = cfg.max_patches * cfg.patch_size ** 2
    factor = math.sqrt(budget / (height * width))
    target_h, target_w = int(math.floor(factor * height / side)) * side, int(math.floor(factor * width / side)) * side
    longest = (cfg.max_patches // cfg.pooling_kernel_size ** 2) * side
    if target_h == 0 and target_w == 0:
        raise ValueError(f"an image of {width} x {height} pixels cannot be resized for this model")
    if target_h == 0:  # a very wide image: one row of cells, as wide as the budget allows
        target_h, target_w = side, min(int(math.floor(width / height)) * side, longest)
    elif target_w == 0:
        target_w, target_h = side, min(int(math.floor(height / width)) * side, longest)
    if target_h * target_w > budget:
        raise ValueError(f"an image of {width} x {height} pixels does not fit the {cfg.max_patches}-patch budget")
    return target_h, target_w


def preprocess(image: Any, cfg: VisionConfig) -> ImagePatches:
    """An RGB `PIL.Image` as the processor turns it into patches: resize, rescale, normalize, patchify."""
    from PIL import Image

    p, k = cfg.patch_size, cfg.pooling_kernel_size
    if cfg.do_resize:
        height, width = target_size(image.height, image.width, cfg)
        if (height, width) != (image.height, image.width):
            image = image.resize((width, height), resample=Image.Resampling(cfg.resample))
    pixels: np.ndarray = np.asarray(image)
    height, width = pixels.shape[:2]
    if height % (p * k) or width % (p * k):
        raise ValueError(f"an image of {width} x {height} pixels is not whole pooled patches of {p * k} pixels "
                         "(the processor does not resize: do_resize is false)")
    if cfg.do_rescale:  # in float64, then float32, as transformers rescales
        pixels = (pixels.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    else:
        pixels = pixels.astype(np.float32)
    if cfg.do_normalize:
        pixels = (pixels - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    rows, cols = height // p, width // p
    patches = pixels.reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, p * p * 3)
    grid_y, grid_x = np.divmod(np.arange(rows * cols, dtype=np.int64), cols)
    return ImagePatches(np.ascontiguousarray(patches), np.stack([grid_x, grid_y], axis=-1), (rows, cols),
                        rows * cols // k ** 2)


def load_image(source: ImageSource | ImagePatches, cfg: VisionConfig) -> ImagePatches:
    """Decode and preprocess one image (already preprocessed ones pass through)."""
    if isinstance(source, ImagePatches):
        return source
    return preprocess(open_image(source, cfg.do_convert_rgb), cfg)


# -- the tower ------------------------------------------------------------------------------------------------


class _ShapedFile:
    """A GGUFFile whose patch embedding is seen as the matrix it is ([hidden, 3 p p], contiguous), so every
    backend loads it with `load_weights` as it loads any other matrix."""

    def __init__(self, gguf: GGUFFile, name: str, shape: tuple[int, ...]):
        self._gguf, self.metadata = gguf, gguf.metadata
        info = gguf.tensors[name]
        self.tensors = {**gguf.tensors, name: TensorInfo(name, shape, info.ggml_type, info.offset, info.nbytes)}

    def raw(self, name: str) -> np.ndarray:
        return self._gguf.raw(name)

    def array(self, name: str) -> np.ndarray:
        return self._gguf.array(name).reshape(self.tensors[name].shape)

    def get(self, key: str, default: Any = None) -> Any:
        return self._gguf.get(key, default)


def _host(gguf: GGUFFile, name: str) -> np.ndarray:
    """A tensor as float32 on the host: a view of the mapping when stored as F32, else dequantized."""
    info = gguf.tensors[name]
    if info.ggml_type == T.F32:
        return gguf.array(name)
    return quants.dequantize_tensor(gguf.raw(name), info.ggml_type).reshape(info.shape)


class VisionTower:
    """Gemma 4's vision tower and DiffusionGemma's projector over one set of backend weights."""

    def __init__(self, cfg: VisionConfig, gguf: GGUFFile, backend: Any):
        self.cfg, self.ops = cfg, backend
        shapes = vision_tensor_shapes(cfg)
        patch = (cfg.hidden_size, 3 * cfg.patch_size ** 2)
        if gguf.tensors["v.patch_embd.weight"].ggml_type not in (T.F32, T.F16, T.BF16):
            raise ConfigError("the vision patch embedding must be stored as F32, F16 or BF16")
        matrices = [n for n, s in shapes.items() if len(s) > 1 and n != "v.position_embd.weight"]
        self.w = backend.load_weights(_ShapedFile(gguf, "v.patch_embd.weight", patch), matrices)
        multiple = getattr(backend, "k_multiple", 1)  # what the backend's matmuls reduce over in steps of
        for what, width in (("hidden size", cfg.hidden_size), ("patch", patch[1]),
                            ("attention width", cfg.num_attention_heads * cfg.head_dim)):
            if width % multiple:
                raise ConfigError(f"backend {backend.name} needs the vision tower's {what} to be a multiple of "
                                  f"{multiple}, not {width}")
        if cfg.intermediate_size % multiple:
            self.w.update(self._padded_mlps(gguf, multiple))
        self.vec = {n: backend.vector(w) for n, w in backend.load_weights(
            gguf, [n for n, s in shapes.items() if len(s) == 1 and not n.startswith("v.std_")]).items()}
        self.positions = _host(gguf, "v.position_embd.weight")  # rows gathered per image: never read whole
        self.std = (_host(gguf, "v.std_bias"), _host(gguf, "v.std_scale")) if cfg.standardize else None
        half = cfg.head_dim // 2
        # The RoPE of each axis: transformers' axial frequencies over half a head, in float32 as it computes them.
        self.inv_freq = backend.asarray((1.0 / (np.float32(cfg.rope_theta) ** (
            np.arange(0, half, 2, dtype=np.float32) / np.float32(half)))).astype(np.float32))
        self.halves = (backend.asarray(np.repeat(np.float32([1, 0]), half)),
                       backend.asarray(np.repeat(np.float32([0, 1]), half)))

    def _padded_mlps(self, gguf: GGUFFile, multiple: int) -> dict[str, Any]:
        """Each layer's MLP, its width padded to `multiple` (cuda: 32) with zero rows of gate and up and zero
        columns of down: the padded units compute gelu(0) * 0 = 0 times a zero column, exactly nothing. Stored
        as F32 (dequantized once)."""
        cfg, out = self.cfg, {}
        width = -(-cfg.intermediate_size // multiple) * multiple
        extra = width - cfg.intermediate_size
        for i in range(cfg.num_hidden_layers):
            b = f"v.blk.{i}."
            for name, pad in (("ffn_gate", ((0, extra), (0, 0))), ("ffn_up", ((0, extra), (0, 0))),
                              ("ffn_down", ((0, 0), (0, extra)))):
                w = np.pad(_host(gguf, b + name + ".weight"), pad)
                out[b + name + ".weight"] = self.ops.weight(w.reshape(-1).view(np.uint8), T.F32, w.shape)
        return out

    def embed(self, image: ImagePatches) -> Any:
        """The image's soft tokens in the text model's space: a backend array [tokens, projection_dim]."""
        ops, cfg, eps = self.ops, self.cfg, self.cfg.rms_norm_eps
        k, p = cfg.pooling_kernel_size, cfg.patch_size
        order = pooling_order(image.grid, k)
        px, py = image.positions[order, 0], image.positions[order, 1]
        if max(int(px.max()), int(py.max())) >= cfg.position_embedding_size:
            raise ValueError(f"an image of {image.grid[1]} x {image.grid[0]} patches exceeds the vision tower's "
                             f"position table ({cfg.position_embedding_size} per axis)")
        # The patch rows in v.patch_embd's (channel, y, x) order, and transformers' 2 * (x - 0.5).
        pixels = image.pixels[order].reshape(-1, p, p, 3).transpose(0, 3, 1, 2).reshape(len(order), -1)
        pixels = np.float32(2) * (pixels - np.float32(0.5))
        x = ops.linear(ops.asarray(pixels), self.w["v.patch_embd.weight"])
        x = x + ops.asarray(self.positions[0][px] + self.positions[1][py])
        for i in range(cfg.num_hidden_layers):
            b = f"v.blk.{i}."
            h = self._attention(b, ops.rms_norm(x, self.vec[b + "ln1.weight"], eps), px, py)
            x = x + ops.rms_norm(h, self.vec[b + "attn_post_norm.weight"], eps)
            h = ops.gated_mlp(ops.rms_norm(x, self.vec[b + "ln2.weight"], eps), self.w[b + "ffn_gate.weight"],
                              self.w[b + "ffn_up.weight"], self.w[b + "ffn_down.weight"])
            x = x + ops.rms_norm(h, self.vec[b + "ffn_post_norm.weight"], eps)
        # Average each k x k cell (its members are `tokens` rows apart), then scale, standardize and project.
        weight = ops.asarray(np.float32([1.0 / k ** 2]))
        pooled = x[0:image.tokens] * weight
        for j in range(1, k * k):
            pooled = pooled + x[j * image.tokens:(j + 1) * image.tokens] * weight
        pooled = pooled * ops.asarray(np.float32([math.sqrt(cfg.hidden_size)]))
        if self.std is not None:
            bias, scale = self.std
            pooled = (pooled + ops.asarray(np.broadcast_to(-bias, (image.tokens, cfg.hidden_size)))) \
                * ops.asarray(np.asarray(scale, np.float32))
        return ops.linear(ops.rms_norm(pooled, None, eps), self.w["mm.input_projection.weight"])

    def _attention(self, b: str, x: Any, px: np.ndarray, py: np.ndarray) -> Any:
        """Bidirectional attention over the image's patches with 2-D RoPE; scaling 1.0, v normed without scale."""
        ops, cfg, eps = self.ops, self.cfg, self.cfg.rms_norm_eps
        n, d = x.shape[0], cfg.head_dim
        q = ops.linear(x, self.w[b + "attn_q.weight"]).reshape(n, -1, d)
        k = ops.linear(x, self.w[b + "attn_k.weight"]).reshape(n, -1, d)
        v = ops.linear(x, self.w[b + "attn_v.weight"]).reshape(n, -1, d)
        q = self._rope(ops.rms_norm(q, self.vec[b + "attn_q_norm.weight"], eps), px, py)
        k = self._rope(ops.rms_norm(k, self.vec[b + "attn_k_norm.weight"], eps), px, py)
        rows = np.arange(n, dtype=np.int64)
        out = ops.attention(q, k, ops.rms_norm(v, None, eps), rows, rows, causal=False, window=None)
        return ops.linear(out.reshape(n, -1), self.w[b + "attn_out.weight"])

    def _rope(self, x: Any, px: np.ndarray, py: np.ndarray) -> Any:
        """The first half of every head rotated by x positions, the second by y: `rope` over the halves as heads,
        once per axis, each result kept where it applies (x 1.0 or x 0.0, exact)."""
        n, heads, d = x.shape
        halves = x.reshape(n, 2 * heads, d // 2)
        along_x = self.ops.rope(halves, px, self.inv_freq).reshape(n * heads, d)
        along_y = self.ops.rope(halves, py, self.inv_freq).reshape(n * heads, d)
        return (along_x * self.halves[0] + along_y * self.halves[1]).reshape(n, heads, d)


def pooling_order(grid: tuple[int, int], k: int) -> np.ndarray:
    """Patch indices ordered so that member j of pooled cell c is row j * cells + c (cells row-major, as the
    pooler numbers them; members row-major inside a cell)."""
    rows, cols = grid
    cell_y, cell_x = np.divmod(np.arange((rows // k) * (cols // k), dtype=np.int64), cols // k)
    members = [(cell_y * k + dy) * cols + cell_x * k + dx for dy in range(k) for dx in range(k)]
    return np.concatenate(members)


# -- images in a prompt ---------------------------------------------------------------------------------------


def image_runs(ids: np.ndarray, image_token_id: int) -> list[tuple[int, int]]:
    """[start, end) of every maximal run of the image token (one image each), in order."""
    is_image = np.concatenate([[False], np.asarray(ids) == image_token_id, [False]])
    edges = np.flatnonzero(is_image[1:] != is_image[:-1])
    return [(int(a), int(b)) for a, b in zip(edges[0::2], edges[1::2], strict=True)]


@dataclass
class PromptImages:
    """A prompt's images, preprocessed, with the tower that embeds them when the encoder first reads the prompt."""

    tower: VisionTower
    images: list[ImagePatches]
    tokens: ImageTokens

    def encoder_input(self, ids: np.ndarray) -> EncoderImages:
        """The images' embeddings for an encoder pass over `ids` (whose image runs were checked to fit them)."""
        runs = image_runs(ids, self.tokens.image_token_id)
        embeds = [self.tower.embed(image) for image in self.images]
        return EncoderImages(runs, self.tower.ops.concat(*embeds), self.tokens.bidirectional)


def check_runs(ids: np.ndarray, images: list[ImagePatches], image_token_id: int) -> None:
    """The prompt holds exactly one run of image tokens per image, as long as its soft tokens (ValueError if not)."""
    runs = image_runs(ids, image_token_id)
    lengths = [b - a for a, b in runs]
    expected = [image.tokens for image in images]
    if lengths != expected:
        raise ValueError(f"the prompt's image-token runs {lengths} do not match its {len(images)} image(s), which "
                         f"take {expected} tokens")


def expand_placeholders(text: str, images: list[ImagePatches], image: str, begin: str, end: str) -> str:
    """Each occurrence of the image token in `text` replaced by begin + image x tokens + end, in order (what
    `Gemma4Processor` does); a text without any gets the images in front. ValueError if the counts differ."""
    count = text.count(image)
    if count == 0:
        text, count = image * len(images) + text, len(images)
    if count != len(images):
        raise ValueError(f"the prompt has {count} image placeholder(s) {image!r} for {len(images)} image(s)")
    pieces = text.split(image)
    out = [pieces[0]]
    for patches, piece in zip(images, pieces[1:], strict=True):
        out.append(begin + image * patches.tokens + end + piece)
    return "".join(out)


def decode_data_uri(url: str) -> bytes:
    """The bytes of a `data:` URI (base64, as OpenAI clients send images); ValueError for anything else."""
    import base64
    import binascii

    header, comma, data = url.partition(",")
    if not (header.startswith("data:") and comma and header.endswith(";base64")):
        raise ValueError("an image URL must be a data: URI with base64 data (data:image/png;base64,...)")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the image data URI is not valid base64") from None


def image_source(part: Mapping[str, Any], allow_paths: bool = True, fetch_urls: bool = False) -> ImageSource:
    """The image of a chat content part: {"type": "image", "image": PATH | PIL.Image | bytes} (or transformers'
    "path", "url", "base64" keys), or OpenAI's {"type": "image_url", "image_url": {"url": ...}}. URLs must be data
    URIs unless `fetch_urls` (then http(s) URLs are downloaded, see `fetch_image`); `allow_paths=False` (a
    server's requests) refuses file paths."""
    if part.get("type") == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, Mapping) else url
        if not isinstance(url, str):
            raise ValueError('an image_url part needs {"url": "data:image/...;base64,..."}')
        return _url_image(url, fetch_urls)
    for key in ("image", "path", "url", "base64"):
        if key in part:
            value = part[key]
            break
    else:
        raise ValueError('an image part needs its image: {"type": "image", "image": PATH | PIL.Image | bytes}')
    if key == "base64" and isinstance(value, str):
        return decode_data_uri("data:;base64," + value)
    if key == "url" or (isinstance(value, str) and value.startswith(("data:", "http://", "https://"))):
        return _url_image(value, fetch_urls)
    if isinstance(value, (str, os.PathLike)) and not allow_paths:
        raise ValueError("image file paths are not accepted here: send the image as a data: URI")
    return value


def _url_image(url: Any, fetch: bool) -> bytes:
    if isinstance(url, str) and url.startswith(("http://", "https://")):
        if fetch:
            return fetch_image(url)
        raise ValueError("remote image URLs are not fetched: send the image's bytes or a data: URI")
    if not isinstance(url, str):
        raise ValueError(f"an image URL must be a string, not {type(url).__name__}")
    return decode_data_uri(url)


MAX_FETCH_BYTES = 32 << 20  # an encoded image larger than this is refused while downloading
FETCH_TIMEOUT_S = 10.0


def fetch_image(url: str, max_bytes: int = MAX_FETCH_BYTES, timeout: float = FETCH_TIMEOUT_S) -> bytes:
    """Download an http(s) image URL (only when a server was started with --allow-image-urls: any URL a client
    names is fetched from the server's network). At most `max_bytes`, `timeout` seconds per read; one ValueError
    line for anything that goes wrong."""
    import urllib.error
    import urllib.request

    if not url.startswith(("http://", "https://")):
        raise ValueError("only http(s) image URLs are fetched")
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "dgrun"}),
                                    timeout=timeout) as response:
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as e:
        raise ValueError(f"cannot fetch image {url}: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise ValueError(f"cannot fetch image {url}: {' '.join(str(reason).split())}") from None
    if len(data) > max_bytes:
        raise ValueError(f"the image at {url} is over {max_bytes} bytes")
    return data


def chat_images(messages: Any, allow_paths: bool = True, fetch_urls: bool = False) -> tuple[Any, list[ImageSource]]:
    """The conversation as the chat template sees it, and its images in order. OpenAI `image_url` parts become
    image parts holding their decoded data, the kind chat templates place (transformers' own image parts pass
    through as they are), so the conversation can be read again (`Model.apply_chat_template`) without fetching
    or checking anything twice. `allow_paths`, `fetch_urls`: see `image_source`."""
    if not isinstance(messages, list):
        return messages, []  # the template's render refuses it with its own message
    conversation, images = [], []
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, list):
            conversation.append(message)
            continue
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") in ("image", "image_url"):
                images.append(image_source(part, allow_paths, fetch_urls))
                # An image part holding the image it resolved to: reading the conversation again gives the same.
                part = part if part.get("type") == "image" else {"type": "image", "image": images[-1]}
            parts.append(part)
        conversation.append({**message, "content": parts})
    return conversation, images
