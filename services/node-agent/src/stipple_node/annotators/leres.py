"""LeReS depth: ControlNet 1.1's `depth_leres` and `depth_leres++`, LeReS's ResNeXt-101 depth
network with the published res101.pth, and for `depth_leres++` the depth boosting of
BoostingMonocularDepth with its pix2pix merge network, the published latest_net_G.pth.

The original is sd-webui-controlnet's / ControlNet 1.1's `annotator/leres/` (Mikubill/
sd-webui-controlnet, lllyasviel/ControlNet-v1-1-nightly; the same files are huggingface/
controlnet_aux's `src/controlnet_aux/leres/`, Apache-2.0, which Crynux runs), put together from:
- LeReS (aim-uofa/AdelaiDepth, Yin et al., "Learning to Recover 3D Scene Shape from a Single
  Image"; offered for academic use, commercial use by arrangement with its authors):
  `leres/multi_depth_model_woauxi.py` (`RelDepthModel`), `leres/network_auxi.py` (the decoder of
  Xian et al.'s DepthNet) and `leres/Resnext_torch.py` (torchvision's ResNeXt-101 32x8d,
  written out, without its pooling and classifier).
- BoostingMonocularDepth (compphoto, Miangoleh et al., "Boosting Monocular Depth Estimation
  Models to High-Resolution via Content-Adaptive Multi-Resolution Merging"; its licence is for
  academic use only and says the method may be covered by patents) in thygate's
  stable-diffusion-webui-depthmap-script (MIT License): `leres/depthmap.py` (`estimateleres`,
  `estimateboost`, `doubleestimate`, `calculateprocessingres`, `generatepatchs`,
  `adaptiveselection`, `generatemask`), and its merge network `pix2pix/models/
  pix2pix4depth_model.py` with the U-Net generator of junyanz/pytorch-CycleGAN-and-pix2pix
  (BSD License; `pix2pix/models/networks.py`, `define_G(2, 1, 64, "unet_1024", norm="none")`).
An operator should know those licences before enabling these methods.

Both networks are written here in plain torch (no torchvision) with the original's module trees,
so the parameter names are those of the published files:
- res101.pth is a checkpoint dict; its "depth_model" entry is `RelDepthModel`'s state dict with
  a "module." prefix (it was trained under DataParallel), which the original strips
  (`strip_prefix_if_present`) before loading strictly; `load_leres` does the same.
  Keys: `depth_model.encoder_modules.encoder.*` (the ResNeXt: conv1, bn1, layer1-4) and
  `depth_model.decoder_modules.*` (conv, conv1, ffm2/1/0, outconv), batch norms with their
  running statistics.
- latest_net_G.pth is the U-Net's plain state dict (`BaseModel.load_networks`, strict): keys
  `model.model.0.weight` (the outermost block), `model.model.1.model.1.weight` and so on, one
  `model.1` deeper per level; with norm "none" the convolutions have no bias (only the outermost
  up-convolution has one) and the norm slots are parameter-free identities.

Two quirks of the original are kept because the outputs depend on them: the image goes in as
BGR floats 0..255 through ImageNet's mean/std (`scale_torch` converts to float before
torchvision's `ToTensor`, which then does not divide by 255), and in-place ReLUs feed the
activated tensor into residual and skip paths (`FTB`: x + branch(x) where the branch starts with
an in-place ReLU of x; the U-Net's skip connections carry the in-place LeakyReLU of their input).

Where this differs: the original's `calculateprocessingres` fails (UnboundLocalError) on a picture
whose long side is under 160 (128 or less once padded), as it then tries no size; such a picture
gets the double estimate at 448 here, which is what the original returns for every picture
smaller than R_x. The same estimate twice (448 and R_x = 448) is computed once, and the blending
mask once per process. Otherwise, compared outside the repository with the original code on the
same random weights, the networks, both control images and the patch merging were bit-identical.

Cost on one CPU thread: `depth_leres` runs the ResNeXt once at the picture's size (about 4 s at
512 x 512). `depth_leres++` runs it at 448 x 448 and at R_x x R_x (R_x up to 1568) and the merge
network at 1024 x 1024 (about 20 s for a 512 x 512 picture with R_x 896), and where the picture's
long side reaches R_x, again at 448 and 896 and the merge network twice for each of up to tens of
patches (about 20 s a patch): minutes.

This is our own code after theirs.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional

from stipple_common.errors import InvalidInput

from . import ANNOTATORS_REPO, Annotator
from .ops import gray_to_rgb

MULTIPLE = 64  # inputs are edge-padded to this (sd-webui-controlnet's `resize_image_with_pad`)
MEAN = (0.485, 0.456, 0.406)  # ImageNet's, applied to 0..255 values as the original does
STD = (0.229, 0.224, 0.225)
LAYERS = (3, 4, 23, 3)  # ResNeXt-101's four stages
GROUPS, GROUP_WIDTH = 32, 8  # "32x8d"

# Boosting (estimateboost with LeReS, model_type 0)
RECEPTIVE_FIELD = 448  # net_receptive_field_size: the low-resolution estimate and R_x's base
PATCH_SIZE = 2 * RECEPTIVE_FIELD  # patch_netsize: the high-resolution estimate of a patch
MERGE_SIZE = 1024  # pix2pixsize: the merge network's input
MAX_SIZE = 1600  # whole_size_threshold: R_max of the paper
MAX_UPSCALE = 3  # scale_threshold
CONTEXT_SHARE = 0.2  # r_threshold_value: x of R_x (pixels allowed without context)
SPEED_SCALE = 32  # R_x is searched on a map this many times smaller
MASK_SIZE = 3000  # the blending mask, made once at this size and resized per patch


# --- LeReS: ResNeXt-101 32x8d (torchvision's layout) ---


class _Bottleneck(nn.Module):
    """torchvision's Bottleneck (ResNet v1.5: the stride on the grouped 3x3)."""

    def __init__(self, in_c: int, planes: int, stride: int, downsample: bool) -> None:
        super().__init__()
        width = planes * GROUP_WIDTH // 64 * GROUPS
        out_c = planes * 4
        self.conv1 = nn.Conv2d(in_c, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=1, groups=GROUPS, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_c)
        self.downsample = (
            nn.Sequential(nn.Conv2d(in_c, out_c, 1, stride, bias=False), nn.BatchNorm2d(out_c)) if downsample else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = functional.relu(self.bn1(self.conv1(x)))
        out = functional.relu(self.bn2(self.conv2(out)))
        return functional.relu(self.bn3(self.conv3(out)) + identity)


class _ResNeXt(nn.Module):
    """The stem (7x7/2 conv, 3x3/2 max pool) and four stages; returns the four stage outputs
    (256, 512, 1024, 2048 channels at 1/4, 1/8, 1/16, 1/32). No pooling or classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_c = 64
        for i, (planes, depth) in enumerate(zip((64, 128, 256, 512), LAYERS, strict=True), start=1):
            stride = 1 if i == 1 else 2
            blocks = [
                _Bottleneck(in_c if b == 0 else planes * 4, planes, stride if b == 0 else 1, b == 0)
                for b in range(depth)
            ]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            in_c = planes * 4

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = functional.relu(self.bn1(self.conv1(x)))
        x = functional.max_pool2d(x, 3, 2, padding=1)
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            features.append(x)
        return features


# --- LeReS: the decoder (network_auxi.py) ---


def _upsample(x: torch.Tensor) -> torch.Tensor:
    return functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class _FTB(nn.Module):
    """Feature transfer block: conv, then the residual branch. The branch's first ReLU is in place
    in the original, so the sum adds the branch to relu(conv(x)), not to conv(x)."""

    def __init__(self, in_c: int, mid: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_c, mid, 3, padding=1)
        self.conv_branch = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(mid, mid, 3, padding=1),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
            nn.Conv2d(mid, mid, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = functional.relu(self.conv1(x))
        return functional.relu(x + self.conv_branch[1:](x))


class _FFM(nn.Module):
    """Feature fusion: the lateral features through an FTB, plus the coarser path, another FTB,
    then up x2. (The original's attention block `ata` is commented out: no parameters.)"""

    def __init__(self, in_c: int, mid: int, out_c: int) -> None:
        super().__init__()
        self.ftb1 = _FTB(in_c, mid)
        self.ftb2 = _FTB(mid, out_c)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        return _upsample(self.ftb2(self.ftb1(low) + high))


class _AO(nn.Module):
    """Adaptive output: 3x3 conv to half the channels, batch norm, ReLU, 3x3 conv to one, up x2."""

    def __init__(self, in_c: int) -> None:
        super().__init__()
        self.adapt_conv = nn.Sequential(
            nn.Conv2d(in_c, in_c // 2, 3, padding=1),
            nn.BatchNorm2d(in_c // 2),
            nn.ReLU(),
            nn.Conv2d(in_c // 2, 1, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _upsample(self.adapt_conv(x))


class _Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = _FTB(2048, 512)
        self.conv1 = nn.Conv2d(512, 256, 3, padding=1)
        self.ffm2 = _FFM(1024, 256, 256)
        self.ffm1 = _FFM(512, 256, 256)
        self.ffm0 = _FFM(256, 256, 256)
        self.outconv = _AO(256)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = _upsample(self.conv1(self.conv(features[3])))  # 1/32 -> 1/16
        x = self.ffm2(features[2], x)  # -> 1/8
        x = self.ffm1(features[1], x)  # -> 1/4
        x = self.ffm0(features[0], x)  # -> 1/2
        return self.outconv(x)  # -> 1/1


class _DepthNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = _ResNeXt()


class _DepthModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder_modules = _DepthNet()
        self.decoder_modules = _Decoder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder_modules(self.encoder_modules.encoder(x))


class LeresNetwork(nn.Module):
    """LeReS's `RelDepthModel(backbone="resnext101")`: a normalized BGR image (N, 3, H, W), sides
    multiples of 32 -> relative depth (N, 1, H, W), larger is farther."""

    def __init__(self) -> None:
        super().__init__()
        self.depth_model = _DepthModel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.depth_model(x)


PREFIX = "module."  # res101.pth's keys: trained under DataParallel


def load_leres(network: nn.Module, path: Path) -> None:
    """res101.pth -> the network: its "depth_model" entry, the "module." prefix stripped where
    every key has it (the original's `strip_prefix_if_present`), loaded strictly."""
    checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    state = checkpoint["depth_model"]
    if all(key.startswith(PREFIX) for key in state):
        state = {key[len(PREFIX) :]: value for key, value in state.items()}
    network.load_state_dict(state)


def leres_to_published(network: nn.Module) -> dict[str, Any]:
    """The inverse of `load_leres`: a checkpoint dict as res101.pth holds it."""
    return {"depth_model": {PREFIX + key: value for key, value in network.state_dict().items()}}


# --- BoostingMonocularDepth's merge network: pix2pix's U-Net generator, unet_1024, no norm ---


class _UnetBlock(nn.Module):
    """pix2pix's `UnetSkipConnectionBlock` (norm "none", no dropout). Its `model` keeps the
    original's indices: outermost [down, sub, ReLU, up, Tanh]; innermost [LeakyReLU, down, ReLU, up,
    norm]; others [LeakyReLU, down, norm, sub, ReLU, up, norm], the norms identities."""

    def __init__(self, outer: int, inner: int, sub: _UnetBlock | None = None, in_c: int | None = None) -> None:
        super().__init__()
        self.outermost, self.innermost = in_c is not None, sub is None
        down = nn.Conv2d(outer if in_c is None else in_c, inner, 4, 2, padding=1, bias=False)
        up = nn.ConvTranspose2d(inner if sub is None else inner * 2, outer, 4, 2, padding=1, bias=self.outermost)
        if self.outermost:
            layers = [down, sub, nn.ReLU(), up, nn.Tanh()]
        elif self.innermost:
            layers = [nn.LeakyReLU(0.2), down, nn.ReLU(), up, nn.Identity()]
        else:
            layers = [nn.LeakyReLU(0.2), down, nn.Identity(), sub, nn.ReLU(), up, nn.Identity()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.outermost:
            return torch.tanh(m[3](functional.relu(m[1](m[0](x)))))
        # The original's LeakyReLU is in place: the skip connection carries the activated input.
        x = functional.leaky_relu(x, 0.2)
        inner = m[1](x) if self.innermost else m[3](m[1](x))
        return torch.cat([x, m[-2](functional.relu(inner))], 1)


class MergeNetwork(nn.Module):
    """`UnetGenerator(2, 1, num_downs=10, ngf=64)`: (N, 2, 1024, 1024) in -1..1 (the low- and
    high-resolution estimates) -> the merged estimate (N, 1, 1024, 1024) in -1..1."""

    def __init__(self) -> None:
        super().__init__()
        block = _UnetBlock(512, 512)  # innermost, 1x1 at 1024
        for _ in range(5):
            block = _UnetBlock(512, 512, block)
        for outer in (256, 128, 64):
            block = _UnetBlock(outer, outer * 2, block)
        self.model = _UnetBlock(1, 64, block, in_c=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


# --- the estimates (depthmap.py) ---


def _device(network: nn.Module) -> torch.device:
    parameter = next(network.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


def estimate(network: nn.Module, image: np.ndarray, width: int, height: int) -> np.ndarray:
    """`estimateleres`: the RGB image as BGR, resized (bilinear) to width x height, as floats
    0..255 through ImageNet's mean/std, its depth resized back (bicubic). float32, image's size."""
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    resized = cv2.resize(bgr, (width, height))
    x = torch.from_numpy(resized.astype(np.float32).transpose(2, 0, 1)).contiguous()
    x = (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    prediction = network(x[None].to(_device(network))).squeeze().float().cpu().numpy()
    return cv2.resize(prediction, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_CUBIC)


def merge(network: nn.Module, outer: np.ndarray, inner: np.ndarray) -> torch.Tensor:
    """`Pix2Pix4DepthModel.set_input` and `test`: each estimate (float32, 1024 x 1024) scaled to
    -1..1 by its own range, the two as channels (outer first) -> the output mapped to 0..1."""
    channels = []
    for estimate_ in (outer, inner):
        t = torch.from_numpy(estimate_)[None, None]
        t = (t - torch.min(t)) / (torch.max(t) - torch.min(t))
        channels.append(t * 2 - 1)
    return (network(torch.cat(channels, 1).to(_device(network))).float().cpu() + 1) / 2


def double_estimate(image: np.ndarray, low: int, high: int, leres: nn.Module, merger: nn.Module) -> np.ndarray:
    """`doubleestimate`: estimates at low x low and high x high, each resized (bicubic) to the
    merge size, merged, min-max normalized. float32, MERGE_SIZE x MERGE_SIZE."""
    sizes = (MERGE_SIZE, MERGE_SIZE)
    first = cv2.resize(estimate(leres, image, low, low), sizes, interpolation=cv2.INTER_CUBIC)
    # the same size twice is the same estimate (small images); compute it once
    second = (
        first if high == low else cv2.resize(estimate(leres, image, high, high), sizes, interpolation=cv2.INTER_CUBIC)
    )
    mapped = merge(merger, first, second)
    mapped = (mapped - torch.min(mapped)) / (torch.max(mapped) - torch.min(mapped))
    return mapped.squeeze().numpy()


def _gray(rgb: np.ndarray) -> np.ndarray:
    return np.dot(rgb[..., :3], [0.2989, 0.5870, 0.1140])


def _gradient(gray: np.ndarray) -> np.ndarray:
    return np.abs(cv2.Sobel(gray, cv2.CV_64F, 0, 1, ksize=3)) + np.abs(cv2.Sobel(gray, cv2.CV_64F, 1, 0, ksize=3))


def _max_pool(image: np.ndarray, size: int) -> np.ndarray:
    """`resizewithpool`: scikit-image's `block_reduce(image, (n, n), np.max)` with n = side // size
    (the image zero-padded at the end to whole blocks)."""
    n = image.shape[0] // size
    pad_h, pad_w = -image.shape[0] % n, -image.shape[1] % n
    padded = np.pad(image, ((0, pad_h), (0, pad_w)))
    h, w = padded.shape
    return padded.reshape(h // n, n, w // n, n).max(axis=(1, 3))


def processing_resolution(image: np.ndarray) -> tuple[int, float | None]:
    """`calculateprocessingres`: R_x, the largest size (a multiple of 32 from 448 up, below
    min(1600, 3 x the long side)) at which at most 20% of the pixels are farther than the
    receptive field from an edge, and K (the share of the edge map near an edge at 1/4 of the
    receptive field, at the last size tried) for the patch search; K is None when no size was
    tried (long side under 160: boosting stops before it is needed). The original's resizes
    pass their interpolation where OpenCV takes `dst`, so they are bilinear; so are these."""
    dim = int(min(image.shape[:2]))
    grad = cv2.resize(_gradient(_gray(image)), (dim, dim))
    low, high = grad.min(), grad.max()
    middle = low + 0.4 * (high - low)
    grad[grad < middle] = 0
    grad[grad >= middle] = 1
    kernel = np.ones((RECEPTIVE_FIELD // SPEED_SCALE,) * 2, float)
    kernel_quarter = np.ones((RECEPTIVE_FIELD // (4 * SPEED_SCALE),) * 2, float)
    threshold = min(MAX_SIZE, MAX_UPSCALE * max(image.shape[:2]))
    size = RECEPTIVE_FIELD // SPEED_SCALE
    edges = None
    for p_size in range(size, int(threshold / SPEED_SCALE), RECEPTIVE_FIELD // (2 * SPEED_SCALE)):
        edges = cv2.resize(_max_pool(grad, p_size), (p_size, p_size))
        edges[edges >= 0.5] = 1
        edges[edges < 0.5] = 0
        if (1 - cv2.dilate(edges, kernel, iterations=1)).mean() > CONTEXT_SHARE:
            break
        size = p_size
    scale = None if edges is None else float(cv2.dilate(edges, kernel_quarter, iterations=1).mean())
    return size * SPEED_SCALE, scale


def _density(integral: np.ndarray, rect: list[int]) -> float:
    """The gradient per pixel in rect [x, y, w, h] (`getGF_fromintegral` / area)."""
    x, y, w, h = rect
    total = integral[y + h, x + w] - integral[y, x + w] - integral[y + h, x] + integral[y, x]
    return total / (w * h)


def select_patches(image: np.ndarray, factor: float) -> list[list[int]]:
    """`generatepatchs` and `adaptiveselection`: a grid of PATCH_SIZE squares at a stride of 3/8 of
    it (columns outer, rows inner), the ones at least as busy (gradient above its mean) as the whole
    image kept, each grown by int(32 / factor) in width and height while it stays inside and busy
    enough; largest first (stable). Rects are [x, y, w, h]."""
    grad = _gradient(_gray(image))
    grad[grad < grad[grad > 0].mean()] = 0
    whole = grad.sum() / grad.size
    integral = cv2.integral(grad)
    height, width = integral.shape
    half = round(PATCH_SIZE / 2)
    stride = round(half * 0.75)
    step = int(32 / factor)
    patches = []
    for k in range(half, image.shape[1] - half, stride):
        for j in range(half, image.shape[0] - half, stride):
            rect = [k - half, j - half, 2 * half, 2 * half]
            if _density(integral, rect) < whole:
                continue
            while True:
                grown = [rect[0] - step // 2, rect[1] - step // 2, rect[2] + step, rect[3] + step]
                if grown[0] < 0 or grown[1] < 0 or grown[1] + grown[3] >= height or grown[0] + grown[2] >= width:
                    break
                if _density(integral, grown) < whole:
                    break
                rect = grown
            patches.append(rect)
    return sorted(patches, key=lambda rect: rect[2], reverse=True)


@functools.cache
def blend_mask(size: int = MASK_SIZE) -> np.ndarray:
    """`generatemask((size, size))`: 1 inside a 15% margin, Gaussian-blurred (sigma size / 16),
    scaled to 0..1. Made once per process: at 3000 x 3000 the blur takes seconds (the original
    makes it on every call)."""
    mask = np.zeros((size, size), dtype=np.float32)
    sigma = int(size / 16)
    k_size = int(2 * np.ceil(2 * int(size / 16)) + 1)
    margin = int(0.15 * size)
    mask[margin : size - margin, margin : size - margin] = 1
    mask = cv2.GaussianBlur(mask, (k_size, k_size), sigma)
    mask = ((mask - mask.min()) / (mask.max() - mask.min())).astype(np.float32)
    mask.flags.writeable = False
    return mask


def boost(image: np.ndarray, leres: nn.Module, merger: nn.Module) -> np.ndarray:
    """`estimateboost(img, model, 0, pix2pixmodel, max(width, height))` with R_max 1600: the double
    estimate of the whole image at 448 and R_x; where the image's long side reaches R_x, patches
    of the image enlarged to 2 R_x / factor get their own double estimates (448 and 896), merged
    into the whole one (the merge network, a linear fit to the base, a Gaussian mask), largest
    first. float, the image's size."""
    height, width = image.shape[:2]
    size, patch_scale = processing_resolution(image)
    whole = double_estimate(image, RECEPTIVE_FIELD, size, leres, merger)
    if max(height, width) < size or patch_scale is None:  # no local boosting
        return cv2.resize(whole, (width, height), interpolation=cv2.INTER_CUBIC)
    factor = max(min(1, 4 * patch_scale * size / MAX_SIZE), 0.2)
    if height > width:
        a, b = 2 * size, round(2 * size * width / height)
    else:
        a, b = round(2 * size * height / width), 2 * size
    b, a = round(b / factor), round(a / factor)
    target = cv2.resize(image, (b, a), interpolation=cv2.INTER_CUBIC)
    patches = select_patches(target, factor)
    scale = height / target.shape[0]
    out_size = (round(target.shape[1] * scale), round(target.shape[0] * scale))
    rgb = cv2.resize(target, out_size, interpolation=cv2.INTER_CUBIC)
    base = cv2.resize(whole, out_size, interpolation=cv2.INTER_CUBIC)
    updated = base.copy()
    sizes = (MERGE_SIZE, MERGE_SIZE)
    for rect in patches:
        x, y, w, h = np.round(np.array(rect) * scale).astype(int)
        patch_base = base[y : y + h, x : x + w]
        shape = patch_base.shape
        patch = double_estimate(rgb[y : y + h, x : x + w], RECEPTIVE_FIELD, PATCH_SIZE, leres, merger)
        patch = cv2.resize(patch, sizes, interpolation=cv2.INTER_CUBIC)
        patch_base = cv2.resize(patch_base, sizes, interpolation=cv2.INTER_CUBIC)
        mapped = merge(merger, patch_base, patch).squeeze().numpy()
        # a linear fit makes the merged values those of the base estimate
        coefficients = np.polyfit(mapped.reshape(-1), patch_base.reshape(-1), deg=1)
        merged = np.polyval(coefficients, mapped.reshape(-1)).reshape(mapped.shape)
        merged = cv2.resize(merged, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
        mask = cv2.resize(blend_mask(), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
        region = updated[y : y + h, x : x + w]
        updated[y : y + h, x : x + w] = np.multiply(region, 1 - mask) + np.multiply(merged, mask)
    return cv2.resize(updated, (width, height), interpolation=cv2.INTER_CUBIC)


# --- the control image (apply_leres) ---


def _percent_arg(args: Mapping[str, Any], name: str) -> float:
    value = args.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
        raise InvalidInput(f"controlnet.preprocess.args.{name}", value, "must be a percentage 0-100 (0: off)")
    return value


def control_image(depth: np.ndarray, remove_near: float, remove_background: float) -> np.ndarray:
    """`apply_leres` after the estimate: depth min-max scaled to 16 bits (all 0 if flat), to 8 bits
    (OpenCV's convertScaleAbs), values up to remove_near% of 255 zeroed, inverted (near is bright),
    values up to remove_background% of 255 zeroed. uint8, one channel."""
    low, high = depth.min(), depth.max()
    max_val = 2**16 - 1
    out = max_val * (depth - low) / (high - low) if high - low > np.finfo("float").eps else np.zeros(depth.shape)
    image = cv2.convertScaleAbs(out.astype("uint16"), alpha=255.0 / 65535.0)
    if remove_near != 0:
        image = cv2.threshold(image, remove_near / 100 * 255, 255, cv2.THRESH_TOZERO)[1]
    image = cv2.bitwise_not(image)
    if remove_background != 0:
        image = cv2.threshold(image, remove_background / 100 * 255, 255, cv2.THRESH_TOZERO)[1]
    return image


def _pad(size: int) -> int:
    return -size % MULTIPLE


def run(
    network: nn.Module,
    array: np.ndarray,
    method: str,
    args: Mapping[str, Any],
    uses: Mapping[str, nn.Module] | None = None,
) -> np.ndarray:
    """`depth_leres`: LeReS at the picture's own size; `depth_leres++`: LeReS boosted
    (`estimateboost`), with the merge network from `uses`. Args as sd-webui-controlnet's (its
    sliders "Remove Near %" and "Remove Background %") and controlnet_aux's LeresDetector: `thr_a`
    and `thr_b`, percentages 0-100, 0 (off) by default; the method says whether to boost
    (controlnet_aux's `boost`).

    The original runs on the picture ControlNet has resized (controlnet_aux) or edge-padded
    (sd-webui-controlnet, `resize_image_with_pad`) to multiples of 64; other sizes are edge-padded
    on the right and bottom to multiples of 64 and the control image cropped back, as there (the
    depth is normalized and thresholded before the crop)."""
    remove_near = _percent_arg(args, "thr_a")
    remove_background = _percent_arg(args, "thr_b")
    height, width = array.shape[:2]
    padded = np.pad(array, [[0, _pad(height)], [0, _pad(width)], [0, 0]], mode="edge")
    if method == "depth_leres++":
        depth = boost(padded, network, (uses or {})["leres_pix2pix"])
    else:
        depth = estimate(network, padded, padded.shape[1], padded.shape[0])
    image = control_image(depth, remove_near, remove_background)
    return gray_to_rgb(np.ascontiguousarray(image[:height, :width]))


def _no_run(network: nn.Module, array: np.ndarray, method: str, args: Mapping[str, Any]) -> np.ndarray:
    raise RuntimeError("the pix2pix merge network serves no method of its own")


ANNOTATORS = (
    Annotator(
        name="leres",
        methods=("depth_leres", "depth_leres++"),
        weights=ANNOTATORS_REPO + "res101.pth",
        build=LeresNetwork,
        run=run,
        load=load_leres,
        to_published=leres_to_published,
        uses={"depth_leres++": ("leres_pix2pix",)},
    ),
    Annotator(
        name="leres_pix2pix",
        methods=(),
        weights=ANNOTATORS_REPO + "latest_net_G.pth",
        build=MergeNetwork,
        run=_no_run,
    ),
)
