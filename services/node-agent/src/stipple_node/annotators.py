"""ControlNet annotators that need weights: HED edges (scribble_hed, softedge_hed and
their "safe" variants). The network is the Apache-2.0 HED of ControlNet 1.1 in plain
torch (no torchvision, no controlnet_aux), and its weights come through the node's model
store from `STIPPLE_ANNOTATOR_HED` (by default lllyasviel/Annotators' ControlNetHED.pth,
downloaded once, resumably, sha256-checked when a hash is configured).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from .images import PreprocessorUnavailable

HED_DEFAULT = "https://huggingface.co/lllyasviel/Annotators/resolve/main/ControlNetHED.pth"
HED_METHODS = ("scribble_hed", "softedge_hed", "scribble_hedsafe", "softedge_hedsafe")


class _DoubleConvBlock(nn.Module):
    def __init__(self, input_channel: int, output_channel: int, layer_number: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(input_channel, output_channel, kernel_size=3, padding=1))
        for _ in range(1, layer_number):
            self.convs.append(nn.Conv2d(output_channel, output_channel, kernel_size=3, padding=1))
        self.projection = nn.Conv2d(output_channel, 1, kernel_size=1)

    def forward(self, x: torch.Tensor, down_sampling: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        h = nn.functional.max_pool2d(x, kernel_size=2, stride=2) if down_sampling else x
        for conv in self.convs:
            h = nn.functional.relu(conv(h))
        return h, self.projection(h)


class HedNetwork(nn.Module):
    """ControlNet 1.1's HED (`ControlNetHED_Apache2`): its parameter names match the
    published weights file."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.block1 = _DoubleConvBlock(3, 64, 2)
        self.block2 = _DoubleConvBlock(64, 128, 2)
        self.block3 = _DoubleConvBlock(128, 256, 3)
        self.block4 = _DoubleConvBlock(256, 512, 3)
        self.block5 = _DoubleConvBlock(512, 512, 3)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = x - self.norm
        projections = []
        for i, block in enumerate((self.block1, self.block2, self.block3, self.block4, self.block5)):
            h, projection = block(h, down_sampling=i > 0)
            projections.append(projection)
        return projections


class Annotators:
    """Annotator networks, loaded on first use through `resolve` (the model store)."""

    def __init__(self, resolve: Callable[[str], Path] | None, hed_ref: str = HED_DEFAULT) -> None:
        self._resolve = resolve
        self._hed_ref = hed_ref
        self._hed: HedNetwork | None = None
        self._lock = threading.Lock()

    def hed(self) -> HedNetwork:
        with self._lock:
            if self._hed is None:
                if self._resolve is None or not self._hed_ref:
                    raise PreprocessorUnavailable(
                        "controlnet.preprocess.method: HED needs annotator weights and this node has no model store"
                    )
                path = self._resolve(self._hed_ref)
                network = HedNetwork()
                try:
                    network.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True))
                except Exception as exc:
                    raise PreprocessorUnavailable(
                        f"controlnet.preprocess.method: cannot load HED weights from {self._hed_ref}: {exc}"
                    ) from exc
                self._hed = network.eval()
            return self._hed


def hed(array: np.ndarray, network: HedNetwork, *, safe: bool, scribble: bool) -> np.ndarray:
    """HED soft edges (or a scribble of them), as ControlNet 1.1 computes them."""
    height, width = array.shape[:2]
    with torch.inference_mode():
        image = torch.from_numpy(array.copy()).float().permute(2, 0, 1)[None]
        edges = [e[0, 0].numpy().astype(np.float32) for e in network(image)]
    edges = [cv2.resize(e, (width, height), interpolation=cv2.INTER_LINEAR) for e in edges]
    edge = 1 / (1 + np.exp(-np.mean(np.stack(edges, axis=2), axis=2).astype(np.float64)))
    if safe:
        edge = (edge.astype(np.float32) * 3.0).astype(np.int32).astype(np.float32) / 2.0  # safe_step(step=2)
    result = (edge * 255.0).clip(0, 255).astype(np.uint8)
    if scribble:
        result = _nms(result, 127, 3.0)
        result = cv2.GaussianBlur(result, (0, 0), 3.0)
        result[result > 4] = 255
        result[result < 255] = 0
    return np.stack([result] * 3, axis=-1)


def _nms(x: np.ndarray, threshold: int, sigma: float) -> np.ndarray:
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
