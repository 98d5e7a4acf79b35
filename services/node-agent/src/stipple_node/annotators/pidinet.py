"""PiDiNet soft edges (Pixel Difference Networks, Su et al., ICCV 2021), as ControlNet 1.1's
annotator uses it: the "carv4" configuration with CSAM attention (sa) and CDCM dilation
(dil=24), 60 base channels.

Ported from ControlNet 1.1's `annotator/pidinet` (lllyasviel/ControlNet-v1-1-nightly, Apache-2.0),
which copies the network of hellozhuo/pidinet (Copyright (c) 2021 Zhuo Su, Wenzhe Liu; an MIT
license whose text, as ports of it quote it, opens with "It is just for research purpose, and
commercial use should be contacted with authors first."); the pre- and post-processing follow
controlnet_aux's `PidiNetDetector` (huggingface/controlnet_aux, Apache-2.0). Parameter names
match the published table5_pidinet.pth.

The published file is the training checkpoint of hellozhuo/pidinet (its main.py saves
`{"epoch", "state_dict", "optimizer"}` from a `DataParallel` model), so the weights sit under
"state_dict" with a "module." prefix; ControlNet and controlnet_aux both load it with
`{k.replace("module.", ""): v for k, v in torch.load(path)["state_dict"].items()}`.
It holds the raw pixel-difference weights (3x3, also for the 5x5 "rd" convolutions), not
the vanilla-conv kernels of pidinet's `convert_pidinet`: ControlNet builds the unconverted
network and applies the pixel differences at every forward pass, and so does this module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from stipple_common.errors import InvalidInput

from . import ANNOTATORS_REPO, Annotator
from .ops import gray_to_rgb, safe_step, scribble

METHODS = ("scribble_pidinet", "softedge_pidinet", "scribble_pidisafe", "softedge_pidisafe")

# The pixel-difference operation of each of the 16 layers in "carv4": init_block, then the
# blocks 1_1..1_3, 2_1..2_4, 3_1..3_4, 4_1..4_4. cv: vanilla, cd: central, ad: angular,
# rd: radial difference.
CARV4 = ("cd", "ad", "rd", "cv") * 4

# "ad": each of the 3x3 taps minus its clockwise neighbour (the centre minus itself)
_CLOCKWISE = [3, 0, 1, 6, 4, 2, 7, 8, 5]
# "rd": the 8 outer 3x3 taps spread onto the ring of a 5x5 kernel, minus the inner ring
_RD_OUTER = [0, 2, 4, 10, 14, 20, 22, 24]
_RD_INNER = [6, 7, 8, 11, 13, 16, 17, 18]


class PixelDifferenceConv(nn.Module):
    """A 3x3 convolution whose weights act on pixel differences (pidinet's `Conv2d` with the
    functions of its `createConvFunc`); no bias, stride 1, dilation 1, as PiDiNet uses it."""

    def __init__(self, op: str, in_channels: int, out_channels: int, groups: int = 1) -> None:
        super().__init__()
        if op not in ("cv", "cd", "ad", "rd"):
            raise ValueError(f"unknown pixel difference {op!r}")
        self.op = op
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, 3, 3))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Conv2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, groups = self.weight, self.groups
        if self.op == "cv":
            return functional.conv2d(x, weight, padding=1, groups=groups)
        if self.op == "cd":
            centre = functional.conv2d(x, weight.sum(dim=(2, 3), keepdim=True), groups=groups)
            return functional.conv2d(x, weight, padding=1, groups=groups) - centre
        flat = weight.reshape(weight.shape[0], weight.shape[1], 9)
        if self.op == "ad":
            kernel = (flat - flat[:, :, _CLOCKWISE]).view(weight.shape)
            return functional.conv2d(x, kernel, padding=1, groups=groups)
        buffer = weight.new_zeros(weight.shape[0], weight.shape[1], 25)
        buffer[:, :, _RD_OUTER] = flat[:, :, 1:]
        buffer[:, :, _RD_INNER] = -flat[:, :, 1:]
        kernel = buffer.view(weight.shape[0], weight.shape[1], 5, 5)
        return functional.conv2d(x, kernel, padding=2, groups=groups)


class _PdcBlock(nn.Module):
    """Depthwise pixel-difference conv, ReLU, pointwise conv, plus the (pooled, projected) input."""

    def __init__(self, op: str, inplane: int, outplane: int, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride
        if stride > 1:
            self.shortcut = nn.Conv2d(inplane, outplane, kernel_size=1)
        self.conv1 = PixelDifferenceConv(op, inplane, inplane, groups=inplane)
        self.conv2 = nn.Conv2d(inplane, outplane, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = functional.max_pool2d(x, kernel_size=2, stride=2)
        y = self.conv2(functional.relu(self.conv1(x)))
        if self.stride > 1:
            x = self.shortcut(x)
        return y + x


class _Cdcm(nn.Module):
    """Compact dilation convolution module."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        for name, dilation in (("conv2_1", 5), ("conv2_2", 7), ("conv2_3", 9), ("conv2_4", 11)):
            conv = nn.Conv2d(out_channels, out_channels, kernel_size=3, dilation=dilation, padding=dilation, bias=False)
            self.add_module(name, conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(functional.relu(x))
        return self.conv2_1(x) + self.conv2_2(x) + self.conv2_3(x) + self.conv2_4(x)


class _Csam(nn.Module):
    """Compact spatial attention module."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 4, kernel_size=1)
        self.conv2 = nn.Conv2d(4, 1, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv2(self.conv1(functional.relu(x))))


class _MapReduce(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PidiNetwork(nn.Module):
    """PiDiNet (carv4, sa, dil=24, 60 channels): BGR in 0..1 -> fused edge probability."""

    STAGES = (3, 4, 4, 4)  # blocks per stage; stages 2 and 3 double the channels, 2..4 halve the size

    def __init__(self, inplane: int = 60, dil: int = 24, ops: tuple[str, ...] = CARV4) -> None:
        super().__init__()
        self.init_block = PixelDifferenceConv(ops[0], 3, inplane)
        fuseplanes = []
        layer, channels = 1, inplane
        for stage, count in enumerate(self.STAGES, start=1):
            for index in range(1, count + 1):
                stride = 2 if stage > 1 and index == 1 else 1
                outplane = channels * 2 if stride > 1 and stage < 4 else channels
                self.add_module(f"block{stage}_{index}", _PdcBlock(ops[layer], channels, outplane, stride))
                channels, layer = outplane, layer + 1
            fuseplanes.append(channels)
        self.dilations = nn.ModuleList(_Cdcm(planes, dil) for planes in fuseplanes)
        self.attentions = nn.ModuleList(_Csam(dil) for _ in fuseplanes)
        self.conv_reduces = nn.ModuleList(_MapReduce(dil) for _ in fuseplanes)
        self.classifier = nn.Conv2d(4, 1, kernel_size=1)
        # The weights always come from the checkpoint. This initialization (not pidinet's
        # training one, whose random network answers 0.5 everywhere) only gives a random
        # network edges that vary, so that tests see real control images.
        for module in self.modules():
            if isinstance(module, nn.Conv2d | PixelDifferenceConv):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[2:]
        h = self.init_block(x)
        edges = []
        for stage, count in enumerate(self.STAGES, start=1):
            for index in range(1, count + 1):
                h = getattr(self, f"block{stage}_{index}")(h)
            i = stage - 1
            edge = self.conv_reduces[i](self.attentions[i](self.dilations[i](h)))
            edges.append(functional.interpolate(edge, (height, width), mode="bilinear", align_corners=False))
        return torch.sigmoid(self.classifier(torch.cat(edges, dim=1)))


_PREFIX = "module."  # the training script's DataParallel


def load(network: nn.Module, path: Path) -> None:
    """The published checkpoint: {"state_dict": {"module.<name>": tensor}, ...} (see above)."""
    checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise ValueError("not a PiDiNet checkpoint: expected a dict with a 'state_dict'")
    network.load_state_dict({key.removeprefix(_PREFIX): value for key, value in checkpoint["state_dict"].items()})


def to_published(network: nn.Module) -> dict[str, Any]:
    return {"state_dict": {_PREFIX + key: value for key, value in network.state_dict().items()}}


def _bool_arg(args: Mapping[str, Any], name: str, default: bool) -> bool:
    value = args.get(name, default)
    if not isinstance(value, bool):
        raise InvalidInput(f"controlnet.preprocess.args.{name}", value, "must be true or false")
    return value


def edge_map(network: nn.Module, array: np.ndarray) -> np.ndarray:
    """The fused edge probability (float32 HxW) of an RGB uint8 array (the network reads BGR)."""
    bgr = np.ascontiguousarray(array[:, :, ::-1])
    image = (torch.from_numpy(bgr).float() / 255.0).permute(2, 0, 1)[None]
    return network(image)[0, 0].detach().numpy().astype(np.float32)


def run(network: nn.Module, array: np.ndarray, method: str, args: Mapping[str, Any]) -> np.ndarray:
    """PiDiNet soft edges (or a scribble of them), as controlnet_aux's PidiNetDetector computes
    them; `apply_filter` (Crynux's one argument) first thresholds the edges at 0.5."""
    apply_filter = _bool_arg(args, "apply_filter", False)
    edge = edge_map(network, array)
    if apply_filter:
        edge = (edge > 0.5).astype(np.float32)
    if method.endswith("safe"):
        edge = safe_step(edge)
    result = (edge * 255.0).clip(0, 255).astype(np.uint8)
    if method.startswith("scribble"):
        result = scribble(result)
    return gray_to_rgb(result)


ANNOTATORS = (
    Annotator(
        name="pidinet",
        methods=METHODS,
        weights=ANNOTATORS_REPO + "table5_pidinet.pth",
        build=PidiNetwork,
        run=run,
        load=load,
        to_published=to_published,
    ),
)
