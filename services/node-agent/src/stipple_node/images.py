"""Input images: data URLs to PIL images at the task's size, and ControlNet preprocessors.

The preprocessors here need no model weights and no torchvision: OpenCV and NumPy only.
The ones that need weights live in `annotators/`; a method neither serves ends the task
with `preprocessor_unavailable`.
"""

from __future__ import annotations

import io
from typing import Any

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from stipple_common.errors import InvalidInput
from stipple_common.taskspec import ANNOTATOR_PREPROCESSORS, Preprocess, decode_data_url

from .annotators import BY_METHOD, Annotators, PreprocessorUnavailable


def load_image(field: str, data_url: str, size: tuple[int, int], *, mode: str = "RGB") -> Image.Image:
    """Decode an image input (its size checked from its header before its pixels are
    decoded: decode_data_url) and fit it to the task's size (width, height)."""
    data = decode_data_url(field, data_url)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InvalidInput(field, "<image>", f"cannot decode image: {exc}") from None
    image = image.convert(mode)
    if image.size != size:
        resample = Image.Resampling.NEAREST if mode == "L" else Image.Resampling.LANCZOS
        image = image.resize(size, resample)
    return image


def _int_arg(args: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = args.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(f"controlnet.preprocess.args.{name}", value, f"must be an integer from {low} to {high}")
    return value


def preprocess(
    image: Image.Image, spec: Preprocess | None, seed: int, annotators: Annotators | None = None
) -> Image.Image:
    """Apply a ControlNet preprocessor (None: the image is already a control image).
    `annotators` provides the networks that need weights."""
    if spec is None:
        return image
    args = spec.args or {}
    array = np.asarray(image.convert("RGB"))
    if spec.method == "canny":
        low = _int_arg(args, "low_threshold", 100, 0, 255)
        high = _int_arg(args, "high_threshold", 200, 0, 255)
        edges = cv2.Canny(array, low, high)
        return Image.fromarray(np.stack([edges] * 3, axis=-1))
    if spec.method == "shuffle":
        return Image.fromarray(_content_shuffle(array, args, seed))
    if spec.method == "scribble_xdog":
        threshold = _int_arg(args, "thr_a", 32, 1, 64)
        return Image.fromarray(_xdog(array, threshold))
    if spec.method in BY_METHOD and annotators is not None:
        return Image.fromarray(annotators.apply(spec.method, array, args))
    if spec.method in ANNOTATOR_PREPROCESSORS:
        served = ", ".join(("canny", "shuffle", "scribble_xdog", *BY_METHOD))
        raise PreprocessorUnavailable(
            f"controlnet.preprocess.method: {spec.method!r} needs an annotator this node does not have yet; "
            f"use one of {served}, or send a ready control image without preprocess"
        )
    raise InvalidInput("controlnet.preprocess.method", spec.method, "unknown preprocessor")


def _content_shuffle(array: np.ndarray, args: dict[str, Any], seed: int) -> np.ndarray:
    """ControlNet's content shuffle: a random smooth warp, seeded so every node agrees."""
    height, width = array.shape[:2]
    f = _int_arg(args, "f", 256, 1, 4096) if args.get("f") is not None else 256
    rng = np.random.default_rng(seed)
    flows = []
    for _ in range(2):
        noise = rng.uniform(0, 1, size=(height // 64 + 2, width // 64 + 2)).astype(np.float32)
        flows.append(cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC) * f)
    grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    map_x = (grid_x + flows[0]) % width
    map_y = (grid_y + flows[1]) % height
    return cv2.remap(array, map_x, map_y, interpolation=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT)


def _xdog(array: np.ndarray, threshold: int) -> np.ndarray:
    """Scribble by difference of Gaussians (ControlNet's scribble_xdog)."""
    gray = array.astype(np.float32)
    g1 = cv2.GaussianBlur(gray, (0, 0), 0.5)
    g2 = cv2.GaussianBlur(gray, (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255)
    scribble = np.zeros_like(dog, dtype=np.uint8)
    scribble[dog < 255 - threshold] = 255
    return np.stack([scribble] * 3, axis=-1)
