"""MiDaS depth: ControlNet 1.1's `MidasDetector` (`depth_midas`), MiDaS v3 DPT-Hybrid with the
published dpt_hybrid-midas-501f0c75.pt.

The network is `DPTDepthModel(backbone="vitb_rn50_384", non_negative=True)` (readout "project")
from isl-org/MiDaS v3 (MIT License; `midas/dpt_depth.py`, `midas/blocks.py`, `midas/vit.py`), as
ControlNet 1.1 (lllyasviel/ControlNet-v1-1-nightly, `annotator/midas/`, Apache-2.0) and
huggingface/controlnet_aux (`src/controlnet_aux/midas/`, Apache-2.0) use it. Its backbone is timm's
`vit_base_resnet50_384` (huggingface/pytorch-image-models, Apache-2.0; `vision_transformer.py`,
`vision_transformer_hybrid.py`, `resnetv2.py`, `layers/std_conv.py`, `layers/padding.py`): a
ResNetV2 stem and three stages (weight-standardized convolutions with TF "SAME" padding, group
norm) bring the image to 1/16, then a ViT-B/16 runs on those features with 1x1 patches. It is
written here in plain torch (no timm) with the module tree MiDaS builds around timm's, so the
parameter names are those of the published file: a plain state dict (the original's
`BaseModel.load` does `load_state_dict(torch.load(path))`, strict) whose keys start with
`pretrained.model.` (timm's VisionTransformer, its unused 1000-class `head` included),
`pretrained.act_postprocess3/4.` (the readout projections and reassemble convolutions) and
`scratch.` (the fusion decoder and the depth head). Numerics follow timm 0.6.12, the version
ControlNet 1.1's environment pins (StdConv2dSame with eps 1e-8 in the hybrid backbone).

This is our own code after theirs.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from . import ANNOTATORS_REPO, Annotator
from .ops import gray_to_rgb

METHODS = ("depth_midas",)
MULTIPLE = 64  # inputs are edge-padded to this (ControlNet's `pad64`); the network itself needs 32
EMBED = 768  # ViT-B width
GRID = 24  # the position embedding's grid: 384 / 16
LAYERS = (3, 4, 9)  # ResNet-50's first three stages
HOOKS = (8, 11)  # the ViT blocks whose tokens the decoder reassembles (after stages 0 and 1)
FEATURES = 256  # the decoder's width


# --- timm's ResNetV2 (preact=False, stem_type="same", StdConv2dSame): the hybrid's backbone ---


def _pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """TensorFlow "SAME" padding for the input's size (timm's `pad_same`): extra on the right/bottom."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        pad = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [pad // 2, pad - pad // 2]
    return functional.pad(x, pads, value=value)


class _StdConv2dSame(nn.Conv2d):
    """A bias-free convolution whose weight is standardized per output channel at every call,
    with "SAME" padding: static where it can be (stride 1), from the input's size otherwise."""

    def __init__(self, in_c: int, out_c: int, kernel_size: int, stride: int = 1, eps: float = 1e-8) -> None:
        dynamic = stride != 1
        super().__init__(in_c, out_c, kernel_size, stride, 0 if dynamic else (kernel_size - 1) // 2, bias=False)
        self.dynamic, self.eps = dynamic, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            x = _pad_same(x, self.kernel_size[0], self.stride[0])
        flat = self.weight.reshape(1, self.out_channels, -1)
        weight = functional.batch_norm(flat, None, None, training=True, momentum=0.0, eps=self.eps)
        return functional.conv2d(x, weight.reshape_as(self.weight), None, self.stride, self.padding)


class _GroupNormAct(nn.GroupNorm):
    """timm's GroupNormAct: 32 groups, then ReLU unless `act` is off."""

    def __init__(self, channels: int, act: bool = True) -> None:
        super().__init__(32, channels, eps=1e-5)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = functional.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return functional.relu(x) if self.act else x


class _MaxPool2dSame(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.max_pool2d(_pad_same(x, 3, 2, value=-math.inf), 3, 2)


class _Downsample(nn.Module):
    def __init__(self, in_c: int, out_c: int, stride: int) -> None:
        super().__init__()
        self.conv = _StdConv2dSame(in_c, out_c, 1, stride)
        self.norm = _GroupNormAct(out_c, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class _Bottleneck(nn.Module):
    """timm's non-pre-activation `Bottleneck` (the stride on the 3x3)."""

    def __init__(self, in_c: int, out_c: int, stride: int, downsample: bool) -> None:
        super().__init__()
        mid = out_c // 4
        self.downsample = _Downsample(in_c, out_c, stride) if downsample else None
        self.conv1 = _StdConv2dSame(in_c, mid, 1)
        self.norm1 = _GroupNormAct(mid)
        self.conv2 = _StdConv2dSame(mid, mid, 3, stride)
        self.norm2 = _GroupNormAct(mid)
        self.conv3 = _StdConv2dSame(mid, out_c, 1)
        self.norm3 = _GroupNormAct(out_c, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return functional.relu(x + shortcut)


class _Stage(nn.Module):
    def __init__(self, in_c: int, out_c: int, stride: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *(_Bottleneck(in_c if i == 0 else out_c, out_c, stride if i == 0 else 1, i == 0) for i in range(depth))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class _ResNetV2(nn.Module):
    """Stem (7x7/2 conv, norm, 3x3/2 max pool) and stages of 256, 512 and 1024 channels at
    1/4, 1/8 and 1/16. Its `norm` and classifier are identities in this configuration."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            OrderedDict(conv=_StdConv2dSame(3, 64, 7, 2), norm=_GroupNormAct(64), pool=_MaxPool2dSame())
        )
        channels, strides = (256, 512, 1024), (1, 2, 2)
        self.stages = nn.Sequential(
            *(
                _Stage(64 if i == 0 else channels[i - 1], channels[i], strides[i], depth)
                for i, depth in enumerate(LAYERS)
            )
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The outputs of the three stages (MiDaS hooks the first two)."""
        x1 = self.stages[0](self.stem(x))
        x2 = self.stages[1](x1)
        return x1, x2, self.stages[2](x2)


# --- timm's VisionTransformer (ViT-B, hybrid patch embedding) ---


class _HybridEmbed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = _ResNetV2()
        self.proj = nn.Conv2d(1024, EMBED, kernel_size=1)


class _Attention(nn.Module):
    def __init__(self, heads: int = 12) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(EMBED, EMBED * 3)
        self.proj = nn.Linear(EMBED, EMBED)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(EMBED, EMBED * 4)
        self.fc2 = nn.Linear(EMBED * 4, EMBED)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(functional.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(EMBED, eps=1e-6)
        self.attn = _Attention()
        self.norm2 = nn.LayerNorm(EMBED, eps=1e-6)
        self.mlp = _Mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _HybridVit(nn.Module):
    """timm's `vit_base_resnet50_384`. Its final `norm` and 1000-class `head` are in the published
    file; MiDaS computes the norm but uses only the hooked tokens, and never the head."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, EMBED))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + GRID * GRID, EMBED))
        self.patch_embed = _HybridEmbed()
        self.blocks = nn.ModuleList(_Block() for _ in range(12))
        self.norm = nn.LayerNorm(EMBED, eps=1e-6)
        self.head = nn.Linear(EMBED, 1000)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def _pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """MiDaS's `_resize_pos_embed`: the 24x24 grid resized bilinearly to the input's grid."""
        token, grid = self.pos_embed[:, :1], self.pos_embed[0, 1:]
        grid = grid.reshape(1, GRID, GRID, -1).permute(0, 3, 1, 2)
        grid = functional.interpolate(grid, size=(grid_h, grid_w), mode="bilinear", align_corners=False)
        return torch.cat([token, grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)], dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """MiDaS's `forward_flex` with its hooks: stage 0 and 1 maps, block 8 and 11 tokens."""
        h, w = x.shape[-2:]
        layer_1, layer_2, features = self.patch_embed.backbone(x)
        tokens = self.patch_embed.proj(features).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + self._pos_embed(h // 16, w // 16)
        hooked = []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens)
            if i in HOOKS:
                hooked.append(tokens)
        return layer_1, layer_2, hooked[0], hooked[1]


# --- MiDaS's DPT: reassemble, fusion, depth head ---


class _ProjectReadout(nn.Module):
    """The class token, concatenated to every patch token, projected back to the width
    (`width`: the ViT's; ZoeDepth's BEiT-L uses this too)."""

    def __init__(self, width: int = EMBED) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * width, width), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        readout = x[:, :1].expand_as(x[:, 1:])
        return self.project(torch.cat([x[:, 1:], readout], dim=-1))


def _postprocess(*convs: nn.Module) -> nn.Sequential:
    """MiDaS's `act_postprocess3/4`: readout, Transpose and Unflatten (stand-ins here: parameter-free,
    done in `_Encoder.forward`), then convolutions, at the indices the published names carry."""
    return nn.Sequential(_ProjectReadout(), nn.Identity(), nn.Identity(), *convs)


class _Encoder(nn.Module):
    """MiDaS's `pretrained`. Its `act_postprocess1/2` are identities for this backbone (the ResNet
    stages feed the decoder directly) and hold no parameters, so they are left out."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _HybridVit()
        self.act_postprocess3 = _postprocess(nn.Conv2d(EMBED, EMBED, 1))
        self.act_postprocess4 = _postprocess(
            nn.Conv2d(EMBED, EMBED, 1), nn.Conv2d(EMBED, EMBED, 3, stride=2, padding=1)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        grid = (x.shape[-2] // 16, x.shape[-1] // 16)
        layer_1, layer_2, tokens_3, tokens_4 = self.model(x)
        maps = []
        for post, tokens in ((self.act_postprocess3, tokens_3), (self.act_postprocess4, tokens_4)):
            out = post[0](tokens).transpose(1, 2).unflatten(2, grid)
            maps.append(post[3:](out))
        return layer_1, layer_2, maps[0], maps[1]


class _ResidualConvUnit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(FEATURES, FEATURES, 3, padding=1)
        self.conv2 = nn.Conv2d(FEATURES, FEATURES, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(functional.relu(self.conv1(functional.relu(x)))) + x


class _FusionBlock(nn.Module):
    """MiDaS's `FeatureFusionBlock_custom` (no batch norm, no expand, align_corners=True). The
    deepest one (refinenet4) has a `resConfUnit1` it never uses; the published file holds it."""

    def __init__(self) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(FEATURES, FEATURES, 1)
        self.resConfUnit1 = _ResidualConvUnit()  # the published parameter names
        self.resConfUnit2 = _ResidualConvUnit()

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        x = functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class _Interpolate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


def scratch(reassembled: tuple[int, ...]) -> nn.Module:
    """MiDaS's `scratch`: the reassembled maps' widths brought to FEATURES, four fusion
    blocks and the non-negative depth head (ZoeDepth's MiDaS part uses the same)."""
    module = nn.Module()
    for i, channels in enumerate(reassembled, start=1):
        module.add_module(f"layer{i}_rn", nn.Conv2d(channels, FEATURES, 3, padding=1, bias=False))
    for i in range(1, 5):
        module.add_module(f"refinenet{i}", _FusionBlock())
    module.output_conv = nn.Sequential(
        nn.Conv2d(FEATURES, FEATURES // 2, 3, padding=1),
        _Interpolate(),
        nn.Conv2d(FEATURES // 2, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 1, 1),
        nn.ReLU(),  # non_negative=True
        nn.Identity(),
    )
    return module


class MidasNetwork(nn.Module):
    """MiDaS's `DPTDepthModel` (DPT-Hybrid): an image in -1..1 whose sides are multiples of 32 ->
    relative inverse depth (non-negative, larger is nearer) at the same size, shape (N, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        self.pretrained = _Encoder()
        self.scratch = scratch((256, 512, EMBED, EMBED))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer_1, layer_2, layer_3, layer_4 = self.pretrained(x)
        s = self.scratch
        layer_1, layer_2 = s.layer1_rn(layer_1), s.layer2_rn(layer_2)
        layer_3, layer_4 = s.layer3_rn(layer_3), s.layer4_rn(layer_4)
        path = s.refinenet4(layer_4)
        path = s.refinenet3(path, layer_3)
        path = s.refinenet2(path, layer_2)
        path = s.refinenet1(path, layer_1)
        return s.output_conv(path).squeeze(dim=1)


def _pad(size: int) -> int:
    return -size % MULTIPLE


def run(network: nn.Module, array: np.ndarray, method: str, args: Mapping[str, Any]) -> np.ndarray:
    """As ControlNet 1.1's MidasDetector: the image in -1..1, its depth shifted to 0 and scaled by
    its maximum, times 255, truncated to uint8; grey in three channels. It takes no args.

    ControlNet feeds the network the image at a size it has already made a multiple of 64. Other
    sizes are edge-padded on the right and bottom to multiples of 64 and the depth cropped back, as
    controlnet_aux and sd-webui-controlnet do (`resize_image_with_pad`; the depth is normalized
    before the crop, as there)."""
    height, width = array.shape[:2]
    padded = np.pad(array, [[0, _pad(height)], [0, _pad(width)], [0, 0]], mode="edge")
    image = torch.from_numpy(padded).float() / 127.5 - 1.0
    depth = network(image.permute(2, 0, 1)[None])[0]
    depth = depth - torch.min(depth)
    peak = torch.max(depth)
    if peak <= 0:  # a flat depth: the original divides 0 by 0; nothing to show
        return np.zeros((height, width, 3), dtype=np.uint8)
    depth = (depth / peak).numpy()
    depth_image = (depth * 255.0).clip(0, 255).astype(np.uint8)
    return gray_to_rgb(np.ascontiguousarray(depth_image[:height, :width]))


ANNOTATORS = (
    Annotator(
        name="midas",
        methods=METHODS,
        weights=ANNOTATORS_REPO + "dpt_hybrid-midas-501f0c75.pt",
        build=MidasNetwork,
        run=run,
    ),
)
