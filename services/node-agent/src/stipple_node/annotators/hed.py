"""HED soft edges: ControlNet 1.1's Apache-2.0 network (`ControlNetHED_Apache2`), whose
parameter names match the published ControlNetHED.pth."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from . import ANNOTATORS_REPO, Annotator
from .ops import gray_to_rgb, safe_step, scribble

METHODS = ("scribble_hed", "softedge_hed", "scribble_hedsafe", "softedge_hedsafe")


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


def run(network: nn.Module, array: np.ndarray, method: str, args: Mapping[str, Any]) -> np.ndarray:
    """HED soft edges (or a scribble of them), as ControlNet 1.1 computes them."""
    height, width = array.shape[:2]
    image = torch.from_numpy(array.copy()).float().permute(2, 0, 1)[None]
    edges = [e[0, 0].numpy().astype(np.float32) for e in network(image)]
    edges = [cv2.resize(e, (width, height), interpolation=cv2.INTER_LINEAR) for e in edges]
    edge = 1 / (1 + np.exp(-np.mean(np.stack(edges, axis=2), axis=2).astype(np.float64)))
    if method.endswith("safe"):
        edge = safe_step(edge)
    result = (edge * 255.0).clip(0, 255).astype(np.uint8)
    if method.startswith("scribble"):
        result = scribble(result)
    return gray_to_rgb(result)


ANNOTATORS = (
    Annotator(name="hed", methods=METHODS, weights=ANNOTATORS_REPO + "ControlNetHED.pth", build=HedNetwork, run=run),
)
