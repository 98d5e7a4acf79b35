"""Image operations several annotators share (as ControlNet 1.1 writes them)."""

from __future__ import annotations

import cv2
import numpy as np


def nms(x: np.ndarray, threshold: int, sigma: float) -> np.ndarray:
    """Non-maximum suppression along the four directions (ControlNet's `nms`)."""
    blurred = cv2.GaussianBlur(x.astype(np.float32), (0, 0), sigma)
    kernels = [
        np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=np.uint8),
        np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], dtype=np.uint8),
        np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.uint8),
        np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=np.uint8),
    ]
    peaks = np.zeros_like(blurred)
    for kernel in kernels:
        np.putmask(peaks, cv2.dilate(blurred, kernel=kernel) == blurred, blurred)
    out = np.zeros_like(peaks, dtype=np.uint8)
    out[peaks > threshold] = 255
    return out


def safe_step(x: np.ndarray, step: int = 2) -> np.ndarray:
    """Quantize a 0..1 edge map into `step` levels (the "safe" variants)."""
    y = x.astype(np.float32) * float(step + 1)
    return y.astype(np.int32).astype(np.float32) / float(step)


def scribble(edge: np.ndarray) -> np.ndarray:
    """Thin a uint8 edge map into a black-and-white scribble (HED and PiDiNet scribbles)."""
    result = nms(edge, 127, 3.0)
    result = cv2.GaussianBlur(result, (0, 0), 3.0)
    result[result > 4] = 255
    result[result < 255] = 0
    return result


def gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.stack([gray] * 3, axis=-1)
