"""Line art: ControlNet 1.1's lineart annotators, white lines on black as the lineart
ControlNets take them.

- `lineart_realistic` and `lineart_coarse`: the informative-drawings generator
  (carolineec/informative-drawings, MIT License; as ControlNet 1.1's `annotator/lineart`
  and controlnet_aux's `lineart` use it: `Generator(3, 1, 3)`), with the published
  sk_model.pth and sk_model2.pth respectively. Both files are plain state dicts whose
  keys are this module's parameter names (`model0.1.weight`, ...; the originals load them
  with a strict `load_state_dict`).
- `lineart_anime`: Anime2Sketch's U-Net (Mukosame/Anime2Sketch, MIT License, itself the
  pix2pix `UnetGenerator` of junyanz/pytorch-CycleGAN-and-pix2pix, BSD License; as
  ControlNet 1.1's `annotator/lineart_anime` and controlnet_aux's `lineart_anime` build
  it: `UnetGenerator(3, 1, 8, 64)` with affine-free instance norm), with the published
  netG.pth.

ControlNet 1.1 is Apache-2.0 (lllyasviel/ControlNet-v1-1-nightly), controlnet_aux is
Apache-2.0 (huggingface/controlnet_aux); this is our own code after theirs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from . import ANNOTATORS_REPO, Annotator
from .ops import gray_to_rgb

# --- informative-drawings generator (lineart_realistic, lineart_coarse) ---


class _ResidualBlock(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(features, features, 3),
            nn.InstanceNorm2d(features),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(features, features, 3),
            nn.InstanceNorm2d(features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class LineartGenerator(nn.Module):
    """Image (0..1) -> line drawing (0..1, dark lines on white): a ResNet generator with
    two stride-2 stages down, `residual_blocks` blocks at 256 channels, two stages up."""

    def __init__(self, residual_blocks: int = 3) -> None:
        super().__init__()
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, 64, 7), nn.InstanceNorm2d(64), nn.ReLU(True))
        self.model1 = nn.Sequential(
            nn.Conv2d(64, 128, 3, stride=2, padding=1),
            nn.InstanceNorm2d(128),
            nn.ReLU(True),
            nn.Conv2d(128, 256, 3, stride=2, padding=1),
            nn.InstanceNorm2d(256),
            nn.ReLU(True),
        )
        self.model2 = nn.Sequential(*(_ResidualBlock(256) for _ in range(residual_blocks)))
        self.model3 = nn.Sequential(
            nn.ConvTranspose2d(256, 128, 3, stride=2, padding=1, output_padding=1),
            nn.InstanceNorm2d(128),
            nn.ReLU(True),
            nn.ConvTranspose2d(128, 64, 3, stride=2, padding=1, output_padding=1),
            nn.InstanceNorm2d(64),
            nn.ReLU(True),
        )
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(64, 1, 7), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))


def run_lineart(network: nn.Module, array: np.ndarray, method: str, args: Mapping[str, Any]) -> np.ndarray:
    """As ControlNet 1.1 and controlnet_aux: the input scaled to 0..1, the drawing to uint8,
    brought to the input's size (the network rounds odd sizes up to a multiple of 4), then
    inverted: white lines on black. Coarse and realistic differ only in their weights."""
    height, width = array.shape[:2]
    image = torch.from_numpy(array.copy()).float().div(255.0).permute(2, 0, 1)[None]
    line = network(image)[0, 0].numpy()
    line = (line * 255.0).clip(0, 255).astype(np.uint8)
    if line.shape != (height, width):
        line = cv2.resize(line, (width, height), interpolation=cv2.INTER_LINEAR)
    return gray_to_rgb(255 - line)


# --- Anime2Sketch U-Net (lineart_anime) ---


class _UnetBlock(nn.Module):
    """One level of the pix2pix U-Net: down, the inner levels, up; the input is concatenated
    to the output (the skip connection) except at the outermost level. Its layers sit in
    `model` at the pix2pix indices, which name the published parameters."""

    def __init__(self, outer: int, inner: int, submodule: nn.Module | None = None, *, in_channels: int = 0) -> None:
        super().__init__()
        self.outermost = in_channels > 0
        # InstanceNorm2d without affine parameters or running stats, so every conv has a bias
        down = nn.Conv2d(in_channels or outer, inner, kernel_size=4, stride=2, padding=1)
        if self.outermost:
            up = nn.ConvTranspose2d(inner * 2, outer, kernel_size=4, stride=2, padding=1)
            layers = [down, submodule, nn.ReLU(True), up, nn.Tanh()]
        elif submodule is None:  # innermost
            up = nn.ConvTranspose2d(inner, outer, kernel_size=4, stride=2, padding=1)
            layers = [nn.LeakyReLU(0.2, True), down, nn.ReLU(True), up, nn.InstanceNorm2d(outer)]
        else:
            up = nn.ConvTranspose2d(inner * 2, outer, kernel_size=4, stride=2, padding=1)
            layers = [
                nn.LeakyReLU(0.2, True),
                down,
                nn.InstanceNorm2d(inner),
                submodule,
                nn.ReLU(True),
                up,
                nn.InstanceNorm2d(outer),
            ]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) if self.outermost else torch.cat([x, self.model(x)], 1)


class AnimeUnet(nn.Module):
    """Image (-1..1) -> line drawing (-1..1, dark lines on white) through 8 halvings: the
    sides must be multiples of 256."""

    def __init__(self, downs: int = 8, ngf: int = 64) -> None:
        super().__init__()
        block = _UnetBlock(ngf * 8, ngf * 8)
        for _ in range(downs - 5):
            block = _UnetBlock(ngf * 8, ngf * 8, block)
        block = _UnetBlock(ngf * 4, ngf * 8, block)
        block = _UnetBlock(ngf * 2, ngf * 4, block)
        block = _UnetBlock(ngf, ngf * 2, block)
        self.model = _UnetBlock(1, ngf, block, in_channels=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


# netG.pth is Anime2Sketch's training checkpoint; the original loaders (Anime2Sketch's
# model.py, ControlNet 1.1 and controlnet_aux) drop a "module." (DataParallel) prefix from
# its keys before a strict load_state_dict. We accept keys with or without it and publish
# them with it, as a DataParallel training run saves them.
_PREFIX = "module."


def load_anime(network: nn.Module, path: Path) -> None:
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    network.load_state_dict({key.removeprefix(_PREFIX): value for key, value in state.items()})


def anime_to_published(network: nn.Module) -> dict[str, torch.Tensor]:
    return {_PREFIX + key: value for key, value in network.state_dict().items()}


def run_anime(network: nn.Module, array: np.ndarray, method: str, args: Mapping[str, Any]) -> np.ndarray:
    """As ControlNet 1.1 and controlnet_aux: bicubic to the next multiples of 256, -1..1 in,
    the drawing bicubic back to the input's size, clipped to uint8, inverted: white lines
    on black."""
    height, width = array.shape[:2]
    size = (256 * math.ceil(width / 256), 256 * math.ceil(height / 256))
    image = cv2.resize(array, size, interpolation=cv2.INTER_CUBIC)
    feed = (torch.from_numpy(image).float() / 127.5 - 1.0).permute(2, 0, 1)[None]
    line = (network(feed)[0, 0] * 127.5 + 127.5).numpy()
    line = cv2.resize(line, (width, height), interpolation=cv2.INTER_CUBIC)
    return gray_to_rgb(255 - line.clip(0, 255).astype(np.uint8))


ANNOTATORS = (
    Annotator(
        name="lineart_realistic",
        methods=("lineart_realistic",),
        weights=ANNOTATORS_REPO + "sk_model.pth",
        build=LineartGenerator,
        run=run_lineart,
    ),
    Annotator(
        name="lineart_coarse",
        methods=("lineart_coarse",),
        weights=ANNOTATORS_REPO + "sk_model2.pth",
        build=LineartGenerator,
        run=run_lineart,
    ),
    Annotator(
        name="lineart_anime",
        methods=("lineart_anime",),
        weights=ANNOTATORS_REPO + "netG.pth",
        build=AnimeUnet,
        run=run_anime,
        load=load_anime,
        to_published=anime_to_published,
    ),
)
