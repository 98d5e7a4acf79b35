"""Surface normals: ControlNet 1.1's `NormalBaeDetector` (`normal_bae`), Bae et al.'s normal
estimator ("Estimating and Exploiting the Aleatoric Uncertainty in Surface Normal Estimation",
ICCV 2021) with the published scannet.pt.

The network is `NNET` of baegwangbin/surface_normal_uncertainty (MIT License; `models/NNET.py`,
`models/submodules/encoder.py`, `decoder.py`, `submodules.py`) with `architecture="BN"`, as
ControlNet 1.1 (lllyasviel/ControlNet-v1-1-nightly, `annotator/normalbae/`, Apache-2.0) and
huggingface/controlnet_aux (`src/controlnet_aux/normalbae/`, Apache-2.0) copy it. Its encoder is
`tf_efficientnet_b5_ap` of rwightman's gen-efficientnet-pytorch (geffnet, Apache-2.0;
`gen_efficientnet.py`, `efficientnet_builder.py`, `conv2d_layers.py`), which both vendor: an
EfficientNet-B5 with TensorFlow "SAME" padding, batch norm with TF's eps 1e-3, swish and
squeeze-excite, whose classifier and pooling NNET replaces with identities. The decoder
upsamples its features through four batch-norm stages and refines a 1/8 prediction to full
resolution with per-pixel MLPs (1x1 Conv1d); at test time every pixel is refined (the
uncertainty-guided sampling is for training only).

It is written here in plain torch (no geffnet, no torchvision) with NNET's module tree, so the
parameter names are those of the published file. That file is the training checkpoint
(train.py saves `{"model": model.state_dict(), "iter": ...}` from a DistributedDataParallel
model), so the weights sit under "model" with a "module." prefix; ControlNet and controlnet_aux
drop the prefix and load them strictly. Keys: `encoder.original_model.` (geffnet's
`conv_stem`, `bn1`, `blocks.<stage>.<block>.`, `conv_head`, `bn2`) and `decoder.` (`conv2`,
`up1`..`up4`, `out_conv_res8`, `out_conv_res4/2/1`), batch norms with their running statistics.

This is our own code after theirs.
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

from . import ANNOTATORS_REPO, Annotator

METHODS = ("normal_bae",)
MULTIPLE = 64  # inputs are edge-padded to this (ControlNet feeds multiples of 64; the decoder needs 8)
MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics (NormalBaeDetector's transforms.Normalize)
STD = (0.229, 0.224, 0.225)
BN_EPS = 1e-3  # geffnet's BN_EPS_TF_DEFAULT, for every batch norm of the encoder
STEM = 48  # round_channels(32 * 1.6)
HEAD = 2048  # round_channels(1280 * 1.6)
# EfficientNet-B0's seven stages scaled to B5 (channels x1.6 rounded to multiples of 8, repeats
# x2.2 rounded up): (repeats, kernel, stride, expansion, channels). Stage 0 is depthwise-separable
# ("ds", no expansion), the others inverted residuals ("ir"); all have squeeze-excite 0.25.
STAGES = (
    (3, 3, 1, 1, 24),
    (5, 3, 2, 6, 40),
    (5, 5, 2, 6, 64),
    (7, 3, 2, 6, 128),
    (7, 5, 1, 6, 176),
    (9, 5, 2, 6, 304),
    (3, 3, 1, 6, 512),
)
SKIPS = (0, 1, 2, 4)  # the stages whose outputs the decoder takes (1/2, 1/4, 1/8, 1/16)


# --- geffnet's tf_efficientnet_b5_ap ---


class _Conv2dSame(nn.Conv2d):
    """geffnet's convolution with padding "same", bias-free: TensorFlow's SAME padding, static and
    symmetric at stride 1, computed from the input's size at stride 2 (the extra on the right
    and bottom)."""

    def __init__(self, in_c: int, out_c: int, kernel_size: int, stride: int = 1, groups: int = 1) -> None:
        dynamic = stride != 1
        padding = 0 if dynamic else (kernel_size - 1) // 2
        super().__init__(in_c, out_c, kernel_size, stride, padding, groups=groups, bias=False)
        self.dynamic = dynamic

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            pads = []
            for size in (x.shape[-1], x.shape[-2]):
                pad = max((math.ceil(size / self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - size, 0)
                pads += [pad // 2, pad - pad // 2]
            x = functional.pad(x, pads)
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class _SqueezeExcite(nn.Module):
    """Global average, reduce (to a quarter of the block's input channels), swish, expand,
    sigmoid gate."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1)
        self.conv_expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.conv_expand(functional.silu(self.conv_reduce(functional.adaptive_avg_pool2d(x, 1))))
        return x * torch.sigmoid(gate)


class _DepthwiseSeparable(nn.Module):
    """geffnet's `DepthwiseSeparableConv`: depthwise 3x3, norm, swish, squeeze-excite, pointwise
    projection, norm (no activation); the input added back where the shapes allow."""

    def __init__(self, in_c: int, out_c: int) -> None:
        super().__init__()
        self.residual = in_c == out_c
        self.conv_dw = _Conv2dSame(in_c, in_c, 3, groups=in_c)
        self.bn1 = _bn(in_c)
        self.se = _SqueezeExcite(in_c, in_c // 4)
        self.conv_pw = _Conv2dSame(in_c, out_c, 1)
        self.bn2 = _bn(out_c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.se(functional.silu(self.bn1(self.conv_dw(x))))
        out = self.bn2(self.conv_pw(out))
        return out + x if self.residual else out


class _InvertedResidual(nn.Module):
    """geffnet's `InvertedResidual`: pointwise expansion, norm, swish, depthwise kxk (the stage's
    stride), norm, swish, squeeze-excite, pointwise projection, norm; the input added back where
    the shapes allow."""

    def __init__(self, in_c: int, out_c: int, kernel: int, stride: int, expansion: int) -> None:
        super().__init__()
        mid = in_c * expansion
        self.residual = in_c == out_c and stride == 1
        self.conv_pw = _Conv2dSame(in_c, mid, 1)
        self.bn1 = _bn(mid)
        self.conv_dw = _Conv2dSame(mid, mid, kernel, stride, groups=mid)
        self.bn2 = _bn(mid)
        self.se = _SqueezeExcite(mid, in_c // 4)
        self.conv_pwl = _Conv2dSame(mid, out_c, 1)
        self.bn3 = _bn(out_c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = functional.silu(self.bn1(self.conv_pw(x)))
        out = functional.silu(self.bn2(self.conv_dw(out)))
        out = self.bn3(self.conv_pwl(self.se(out)))
        return out + x if self.residual else out


class _EfficientNetB5(nn.Module):
    """`tf_efficientnet_b5_ap` without its pooling and classifier (NNET's `original_model`)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_stem = _Conv2dSame(3, STEM, 3, 2)
        self.bn1 = _bn(STEM)
        stages, in_c = [], STEM
        for repeats, kernel, stride, expansion, out_c in STAGES:
            blocks = []
            for i in range(repeats):
                if expansion == 1:
                    blocks.append(_DepthwiseSeparable(in_c, out_c))
                else:
                    blocks.append(_InvertedResidual(in_c, out_c, kernel, stride if i == 0 else 1, expansion))
                in_c = out_c
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = _Conv2dSame(in_c, HEAD, 1)
        # In the published file and computed by NNET's encoder, but the decoder takes conv_head's
        # output before it (its features[11]): never used here.
        self.bn2 = _bn(HEAD)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of stages 0, 1, 2 and 4 (1/2 .. 1/16) and of conv_head (1/32, raw)."""
        x = functional.silu(self.bn1(self.conv_stem(x)))
        features = []
        for i, stage in enumerate(self.blocks):
            x = stage(x)
            if i in SKIPS:
                features.append(x)
        return [*features, self.conv_head(x)]


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.original_model = _EfficientNetB5()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.original_model(x)


# --- NNET's decoder ---


class _UpSampleBN(nn.Module):
    """Bilinear (align_corners) to the skip's size, concatenated with it, then twice conv 3x3,
    batch norm (torch's eps), leaky ReLU (0.01)."""

    def __init__(self, in_c: int, out_c: int) -> None:
        super().__init__()
        self._net = nn.Sequential(
            nn.Conv2d(in_c, out_c, 3, padding=1),
            nn.BatchNorm2d(out_c),
            nn.LeakyReLU(),
            nn.Conv2d(out_c, out_c, 3, padding=1),
            nn.BatchNorm2d(out_c),
            nn.LeakyReLU(),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = functional.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return self._net(torch.cat([x, skip], dim=1))


def _pixel_mlp(in_c: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(in_c, 128, 1),
        nn.ReLU(),
        nn.Conv1d(128, 128, 1),
        nn.ReLU(),
        nn.Conv1d(128, 128, 1),
        nn.ReLU(),
        nn.Conv1d(128, 4, 1),
    )


def norm_normalize(out: torch.Tensor) -> torch.Tensor:
    """The first three channels to a unit normal (norm + 1e-10), the fourth to the concentration
    kappa = elu + 1.01."""
    x, y, z, kappa = torch.split(out, 1, dim=1)
    norm = torch.sqrt(x**2.0 + y**2.0 + z**2.0) + 1e-10
    return torch.cat([x / norm, y / norm, z / norm, functional.elu(kappa) + 1.0 + 0.01], dim=1)


def _up2(x: torch.Tensor) -> torch.Tensor:
    return functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class _Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv2 = nn.Conv2d(HEAD, HEAD, 1)
        self.up1 = _UpSampleBN(HEAD + 176, 1024)
        self.up2 = _UpSampleBN(1024 + 64, 512)
        self.up3 = _UpSampleBN(512 + 40, 256)
        self.up4 = _UpSampleBN(256 + 24, 128)
        self.out_conv_res8 = nn.Conv2d(512, 4, 3, padding=1)
        self.out_conv_res4 = _pixel_mlp(512 + 4)
        self.out_conv_res2 = _pixel_mlp(256 + 4)
        self.out_conv_res1 = _pixel_mlp(128 + 4)

    @staticmethod
    def _refine(mlp: nn.Module, features: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """The test-mode refinement: features and the coarser prediction, both doubled, through
        the per-pixel MLP at every pixel."""
        x = torch.cat([_up2(features), _up2(coarse)], dim=1)
        b, c, h, w = x.shape
        return norm_normalize(mlp(x.view(b, c, -1))).view(b, 4, h, w)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        block0, block1, block2, block4, head = features
        x_d1 = self.up1(self.conv2(head), block4)
        x_d2 = self.up2(x_d1, block2)
        x_d3 = self.up3(x_d2, block1)
        x_d4 = self.up4(x_d3, block0)
        out_res8 = norm_normalize(self.out_conv_res8(x_d2))
        out_res4 = self._refine(self.out_conv_res4, x_d2, out_res8)
        out_res2 = self._refine(self.out_conv_res2, x_d3, out_res4)
        out_res1 = self._refine(self.out_conv_res1, x_d4, out_res2)
        return [out_res8, out_res4, out_res2, out_res1]


class NormalBaeNetwork(nn.Module):
    """NNET: an ImageNet-normalized image whose sides are multiples of 8 -> its predictions at 1/8,
    1/4, 1/2 and full size, each (N, 4, h, w): a unit normal and the concentration kappa."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = _Encoder()
        self.decoder = _Decoder()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.decoder(self.encoder(x))


# --- the published checkpoint ---

_PREFIX = "module."  # the training script's DistributedDataParallel


def load(network: nn.Module, path: Path) -> None:
    """The published checkpoint: {"model": {"module.<name>": tensor}, "iter": n} (see above)."""
    checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), Mapping):
        raise ValueError("not a NormalBae checkpoint: expected a dict with a 'model'")
    network.load_state_dict({key.removeprefix(_PREFIX): value for key, value in checkpoint["model"].items()})


def to_published(network: nn.Module) -> dict[str, Any]:
    return {"model": {_PREFIX + key: value for key, value in network.state_dict().items()}, "iter": 0}


def _pad(size: int) -> int:
    return -size % MULTIPLE


def run(network: nn.Module, array: np.ndarray, method: str, args: Mapping[str, Any]) -> np.ndarray:
    """As ControlNet 1.1's NormalBaeDetector: the image in 0..1 normalized with ImageNet's
    statistics, the full-size normal (x, y, z in -1..1) mapped to (n + 1) / 2, clipped, times 255,
    truncated to uint8, as RGB. It takes no args.

    ControlNet feeds the network the image at a size it has already made a multiple of 64 (and
    controlnet_aux resizes it so, its short side to `detect_resolution`). Here the image keeps its
    size: other sizes are edge-padded on the right and bottom to multiples of 64 and the normals
    cropped back, as sd-webui-controlnet does for normal_bae (`resize_image_with_pad`)."""
    height, width = array.shape[:2]
    padded = np.pad(array, [[0, _pad(height)], [0, _pad(width)], [0, 0]], mode="edge")
    image = (torch.from_numpy(padded).float() / 255.0).permute(2, 0, 1)[None]
    image = (image - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    normal = network(image)[-1][0, :3]
    normal = ((normal + 1) * 0.5).clip(0, 1).permute(1, 2, 0).numpy()
    normal_image = (normal * 255.0).clip(0, 255).astype(np.uint8)
    return np.ascontiguousarray(normal_image[:height, :width])


ANNOTATORS = (
    Annotator(
        name="normalbae",
        methods=METHODS,
        weights=ANNOTATORS_REPO + "scannet.pt",
        build=NormalBaeNetwork,
        run=run,
        load=load,
        to_published=to_published,
    ),
)
