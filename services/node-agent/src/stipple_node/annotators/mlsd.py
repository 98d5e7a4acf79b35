"""M-LSD straight lines: ControlNet 1.1's `MobileV2_MLSD_Large` and its `pred_lines` decoding,
drawn as one-pixel white lines on black.

Ported from lllyasviel/ControlNet-v1-1-nightly `annotator/mlsd/` (models/mbv2_mlsd_large.py and
utils.py; the same files are in huggingface/controlnet_aux `src/controlnet_aux/mlsd/`), which take
M-LSD (Copyright 2021-present NAVER Corp., Apache License 2.0) in lihaoweicv's PyTorch version.
The MobileNetV2 backbone is written here (no torchvision) with the original's module tree, so the
parameter names are those of the published mlsd_large_512_fp32.pth: a plain state dict that the
original loads with `model.load_state_dict(torch.load(path), strict=True)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional

from stipple_common.errors import InvalidInput
from stipple_common.taskspec import to_fraction

from . import ANNOTATORS_REPO, Annotator
from .ops import gray_to_rgb

METHODS = ("mlsd",)
TOPK = 200  # candidate line centres `pred_lines` looks at
KSIZE = 3  # the max-pool window of the centre-map NMS in `pred_lines`
STRIDE = 16  # the network's coarsest feature map: inputs must be a multiple of it on both sides


def _bn_relu_conv(in_c: int, out_c: int, **conv: Any) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_c, out_c, **conv), nn.BatchNorm2d(out_c), nn.ReLU())


class _BlockTypeA(nn.Module):
    """Merge a skip feature `a` with a (2x upsampled) deeper feature `b`."""

    def __init__(self, in_c1: int, in_c2: int, out_c1: int, out_c2: int, upscale: bool = True) -> None:
        super().__init__()
        self.conv1 = _bn_relu_conv(in_c2, out_c2, kernel_size=1)
        self.conv2 = _bn_relu_conv(in_c1, out_c1, kernel_size=1)
        self.upscale = upscale

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        b = self.conv1(b)
        a = self.conv2(a)
        if self.upscale:
            b = functional.interpolate(b, scale_factor=2.0, mode="bilinear", align_corners=True)
        return torch.cat((a, b), dim=1)


class _BlockTypeB(nn.Module):
    def __init__(self, in_c: int, out_c: int) -> None:
        super().__init__()
        self.conv1 = _bn_relu_conv(in_c, in_c, kernel_size=3, padding=1)
        self.conv2 = _bn_relu_conv(in_c, out_c, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x) + x)


class _BlockTypeC(nn.Module):
    def __init__(self, in_c: int, out_c: int) -> None:
        super().__init__()
        self.conv1 = _bn_relu_conv(in_c, in_c, kernel_size=3, padding=5, dilation=5)
        self.conv2 = _bn_relu_conv(in_c, in_c, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(in_c, out_c, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x)))


class _ConvBNReLU6(nn.Sequential):
    """Conv (no bias), batch norm, ReLU6. A stride-2 conv pads only right and bottom, as TFLite
    does (the weights come from M-LSD's TensorFlow model)."""

    def __init__(self, in_c: int, out_c: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> None:
        padding = 0 if stride == 2 else (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_c, out_c, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
            nn.ReLU6(),
        )
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            x = functional.pad(x, (0, 1, 0, 1), "constant", 0)
        return super().forward(x)


class _InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_ConvBNReLU6(inp, hidden, kernel_size=1))  # pointwise expansion
        layers += [
            _ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),  # pointwise, linear
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class _MobileNetV2(nn.Module):
    """MobileNetV2 cut after the 96-channel stage, on 4 input channels (RGB and a constant one);
    returns the five feature maps the decoder uses (strides 2, 4, 8, 16, 16)."""

    SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))  # t, c, n, s
    SELECTED = (1, 3, 6, 10, 13)

    def __init__(self) -> None:
        super().__init__()
        features: list[nn.Module] = [_ConvBNReLU6(4, 32, stride=2)]
        channels = 32
        for t, c, n, s in self.SETTING:
            for i in range(n):
                features.append(_InvertedResidual(channels, c, s if i == 0 else 1, expand_ratio=t))
                channels = c
        self.features = nn.Sequential(*features)
        for module in self.modules():  # the original's initialisation (weights then come from the file)
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, feature in enumerate(self.features):
            x = feature(x)
            if i in self.SELECTED:
                out.append(x)
        return out


class MlsdNetwork(nn.Module):
    """`MobileV2_MLSD_Large`: maps (1, 4, H, W) to (1, 9, H/2, W/2); channel 0 is the line-centre
    logit, channels 1-4 the displacements (x_start, y_start, x_end, y_end) from a centre to the
    line's ends, in output pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = _MobileNetV2()
        self.block15 = _BlockTypeA(in_c1=64, in_c2=96, out_c1=64, out_c2=64, upscale=False)
        self.block16 = _BlockTypeB(128, 64)
        self.block17 = _BlockTypeA(in_c1=32, in_c2=64, out_c1=64, out_c2=64)
        self.block18 = _BlockTypeB(128, 64)
        self.block19 = _BlockTypeA(in_c1=24, in_c2=64, out_c1=64, out_c2=64)
        self.block20 = _BlockTypeB(128, 64)
        self.block21 = _BlockTypeA(in_c1=16, in_c2=64, out_c1=64, out_c2=64)
        self.block22 = _BlockTypeB(128, 64)
        self.block23 = _BlockTypeC(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1, c2, c3, c4, c5 = self.backbone(x)
        x = self.block16(self.block15(c4, c5))
        x = self.block18(self.block17(c3, x))
        x = self.block20(self.block19(c2, x))
        x = self.block22(self.block21(c1, x))
        return self.block23(x)[:, 7:, :, :]


def network_input(array: np.ndarray, height: int, width: int) -> torch.Tensor:
    """RGB uint8 -> (1, 4, height, width) in [-1, 1], a constant channel of ones appended."""
    resized = cv2.resize(array, (width, height), interpolation=cv2.INTER_AREA)
    image = np.concatenate([resized, np.ones((height, width, 1))], axis=-1).transpose(2, 0, 1)
    image = image[None].astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(image)


def decode_lines(
    output: torch.Tensor, score_thr: float, dist_thr: float, h_ratio: float = 1.0, w_ratio: float = 1.0
) -> np.ndarray:
    """Line segments (N, 4: x_start, y_start, x_end, y_end, float64) in input-image pixels from the
    network's (1, 9, h, w) output: the `TOPK` strongest local maxima of the sigmoid centre map, kept
    where the score is above `score_thr` and the segment (in output pixels) longer than `dist_thr`.
    `h_ratio`/`w_ratio`: image size over network input size."""
    _, _, _, w = output.shape
    heat = torch.sigmoid(output[:, 0])
    peaks = functional.max_pool2d(heat, (KSIZE, KSIZE), stride=1, padding=(KSIZE - 1) // 2)
    heat = (heat * (peaks == heat).float()).reshape(-1)
    # The original asks for exactly 200 and fails (a blank image) on a map with fewer cells.
    scores, indices = torch.topk(heat, min(TOPK, heat.numel()), dim=-1, largest=True)
    ys = torch.div(indices, w, rounding_mode="floor").numpy()
    xs = torch.fmod(indices, w).numpy()
    scores = scores.numpy()
    vmap = output[0, 1:5].numpy().transpose(1, 2, 0)
    dist_map = np.sqrt(np.sum((vmap[:, :, :2] - vmap[:, :, 2:]) ** 2, axis=-1))
    segments = [
        [x + vmap[y, x, 0], y + vmap[y, x, 1], x + vmap[y, x, 2], y + vmap[y, x, 3]]
        for y, x, score in zip(ys, xs, scores, strict=True)
        if score > score_thr and dist_map[y, x] > dist_thr
    ]
    lines = 2 * np.array(segments, dtype=np.float64).reshape(-1, 4)  # output pixels -> input pixels
    lines[:, 0::2] *= w_ratio
    lines[:, 1::2] *= h_ratio
    return lines


def draw_lines(lines: np.ndarray, height: int, width: int) -> np.ndarray:
    """One-pixel white lines on black, end points truncated to integers as the original does."""
    out = np.zeros((height, width), dtype=np.uint8)
    for line in lines:
        if np.isfinite(line).all() and (np.abs(line) < 2**30).all():
            x0, y0, x1, y1 = (int(v) for v in line)
            cv2.line(out, (x0, y0), (x1, y1), 255, 1)
    return out


def _fraction_arg(args: Mapping[str, Any], name: str, default: float) -> float:
    """Crynux's `FloatFractionAsInt`: an integer percentage (10 = 0.1) or a fraction up to 1."""
    value = args.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 100:
        raise InvalidInput(
            f"controlnet.preprocess.args.{name}", value, "must be a fraction 0-1 or an integer percentage 1-100"
        )
    return to_fraction(value)


def _network_size(n: int) -> int:
    return max(STRIDE, round(n / STRIDE) * STRIDE)


def run(network: nn.Module, array: np.ndarray, method: str, args: Mapping[str, Any]) -> np.ndarray:
    """M-LSD lines as ControlNet 1.1's MLSDdetector draws them (`thr_v`: score threshold,
    `thr_d`: length threshold, both 0.1 by default as in controlnet_aux)."""
    score_thr = _fraction_arg(args, "thr_v", 0.1)
    dist_thr = _fraction_arg(args, "thr_d", 0.1)
    height, width = array.shape[:2]
    # The original runs on the image itself, which ControlNet has resized to a multiple of 64; the
    # network needs multiples of 16, so other sizes go through `pred_lines`' own resize-and-rescale.
    in_h, in_w = _network_size(height), _network_size(width)
    output = network(network_input(array, in_h, in_w))
    lines = decode_lines(output, score_thr, dist_thr, height / in_h, width / in_w)
    return gray_to_rgb(draw_lines(lines, height, width))


ANNOTATORS = (
    Annotator(
        name="mlsd", methods=METHODS, weights=ANNOTATORS_REPO + "mlsd_large_512_fp32.pth", build=MlsdNetwork, run=run
    ),
)
