"""ZoeDepth: ControlNet 1.1's `ZoeDetector` (`depth_zoe`), ZoeD_M12_N with the published ZoeD_M12_N.pt.

The network is `ZoeDepth` (isl-org/ZoeDepth, MIT License; `zoedepth/models/zoedepth/zoedepth_v1.py`,
`models/base_models/midas.py`, `models/layers/attractor.py`, `dist_layers.py`, `localbins_layers.py`,
built from `config_zoedepth.json` for inference), as ControlNet 1.1 (lllyasviel/ControlNet-v1-1-nightly,
`annotator/zoe/`, Apache-2.0) and huggingface/controlnet_aux (`src/controlnet_aux/zoe/`, Apache-2.0) use
it: MiDaS v3.1 `DPT_BEiT_L_384` (the config's `midas_model_type`), `DPTDepthModel(backbone="beitl16_384",
non_negative=True)` (isl-org/MiDaS, MIT License; `midas/dpt_depth.py`, `midas/blocks.py`,
`midas/backbones/beit.py`, `backbones/utils.py`) whose encoder is timm's `beit_large_patch16_384`
(huggingface/pytorch-image-models, Apache-2.0; `models/beit.py`) with MiDaS's patched forward (any input
size: the relative position bias tables, made for 24 x 24 patches, are resized bilinearly to the input's
grid), and ZoeDepth's metric-bins head on the MiDaS decoder's features:
a seed bin regressor on the bottleneck, four projectors and attractors that move the bin centres along
the decoder (softplus "unnormed" bins, 64 of them, inverse attractors averaged), and a conditional
log-binomial over the bins from the depth head's last features and the relative depth.

It is written here in plain torch (no timm, no torchvision) with the module tree ZoeDepth builds, so the
parameter names are those of the published file: a `torch.save`d dict whose `model` is the state dict
(`ZoeDetector` does `model.load_state_dict(torch.load(path)['model'])`, strict) with keys `core.core.`
(MiDaS: `pretrained.model.` is timm's Beit, its unused `fc_norm` and 1000-class `head` included, and the
`relative_position_index` buffers that timm 0.6 saved; `pretrained.act_postprocess1..4.`; `scratch.`) and
the head's `conv2.`, `seed_bin_regressor.`, `seed_projector.`, `projectors.`, `attractors.` and
`conditional_log_binomial.` (with its two buffers). The MiDaS decoder blocks are those of midas.py.
Inference is ZoeDepth's `infer` (reflect padding, mirror-image averaging) around the network, which
resizes the image itself (MiDaS's "minimal" resize to about 384 x 512, sides multiples of 32).

This is our own code after theirs.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from . import ANNOTATORS_REPO, Annotator
from .midas import FEATURES, _ProjectReadout, scratch
from .ops import gray_to_rgb

METHODS = ("depth_zoe",)
EMBED = 1024  # BEiT-L width
HEADS = 16
DEPTH = 24
PATCH = 16
GRID = 24  # the relative position tables' grid: 384 / 16
HOOKS = (5, 11, 17, 23)  # the blocks whose tokens the decoder reassembles
REASSEMBLE = (256, 512, 1024, 1024)  # the reassembled maps' widths, at 1/4, 1/8, 1/16 and 1/32
NET_HEIGHT, NET_WIDTH = 384, 512  # ZoeDepth's img_size; "minimal" resize keeping the aspect ratio
MULTIPLE = 32  # the network's input sides are multiples of this
BINS = 64
EMBEDDING = 128  # bin embedding width
ATTRACTORS = (16, 8, 4, 1)
MIN_TEMP, MAX_TEMP = 0.0212, 50.0
# The attractors are called with their functions' defaults (alpha 300, gamma 2), not with the
# configured attractor_alpha (1000): the original passes neither to `inv_attractor`.
ATTRACTOR_ALPHA, ATTRACTOR_GAMMA = 300.0, 2


# --- timm's Beit (beit_large_patch16_384) with MiDaS's patched forward ---


@functools.lru_cache(maxsize=16)  # one per input grid seen lately (the original keeps every one)
def _relative_position_index(height: int, width: int) -> torch.Tensor:
    """timm's `gen_relative_position_index`: for every pair of the grid's tokens (and the class token,
    first) the row of the bias table that holds their offset's bias."""
    with torch.inference_mode(False):  # cached: a plain tensor even when first made under inference mode
        return _index(height, width)


def _index(height: int, width: int) -> torch.Tensor:
    """Offsets (row, column) from token j to token i, shifted to start at 0, as rows of the table."""
    distances = (2 * height - 1) * (2 * width - 1)
    coords = torch.stack(torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    relative[:, :, 0] += height - 1
    relative[:, :, 1] += width - 1
    relative[:, :, 0] *= 2 * width - 1
    index = torch.zeros((height * width + 1,) * 2, dtype=relative.dtype)
    index[1:, 1:] = relative.sum(-1)
    index[0, 0:] = distances
    index[0:, 0] = distances + 1
    index[0, 0] = distances + 2
    return index


class _Attention(nn.Module):
    """BEiT attention: q and v biases (k has none), a relative position bias per head."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(EMBED, 3 * EMBED, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(EMBED))
        self.v_bias = nn.Parameter(torch.zeros(EMBED))
        self.register_buffer("k_bias", torch.zeros(EMBED), persistent=False)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * GRID - 1) ** 2 + 3, HEADS))
        # In the published file (timm 0.6 saved it); MiDaS's forward makes its own for each grid.
        self.register_buffer("relative_position_index", _relative_position_index(GRID, GRID).clone())
        self.proj = nn.Linear(EMBED, EMBED)

    def _bias(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """MiDaS's `_get_rel_pos_bias`: the offsets' part of the table resized to the grid (the three
        class-token rows kept), indexed for the grid -> (1, heads, tokens, tokens)."""
        side = 2 * GRID - 1
        table = self.relative_position_bias_table
        offsets = table[: side * side].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        offsets = functional.interpolate(offsets, size=(2 * grid_h - 1, 2 * grid_w - 1), mode="bilinear")
        table = torch.cat([offsets.permute(0, 2, 3, 1).reshape(-1, HEADS), table[side * side :]])
        tokens = grid_h * grid_w + 1
        bias = table[_relative_position_index(grid_h, grid_w).view(-1)].view(tokens, tokens, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, n, _ = x.shape
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = functional.linear(x, self.qkv.weight, bias).reshape(b, n, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * (EMBED // HEADS) ** -0.5) @ k.transpose(-2, -1)
        attn = (attn + self._bias(*grid)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(EMBED, 4 * EMBED)
        self.fc2 = nn.Linear(4 * EMBED, EMBED)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(functional.gelu(self.fc1(x)))


class _Block(nn.Module):
    """A BEiT block with layer scale (`gamma_1/2`, initialized to 1e-5 in timm)."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma_1 = nn.Parameter(torch.full((EMBED,), 1e-5))
        self.gamma_2 = nn.Parameter(torch.full((EMBED,), 1e-5))
        self.norm1 = nn.LayerNorm(EMBED, eps=1e-6)
        self.attn = _Attention()
        self.norm2 = nn.LayerNorm(EMBED, eps=1e-6)
        self.mlp = _Mlp()

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x + self.gamma_1 * self.attn(self.norm1(x), grid)
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, EMBED, kernel_size=PATCH, stride=PATCH)


class _Beit(nn.Module):
    """timm's `beit_large_patch16_384`: no absolute position embedding, mean-pooling classifier
    (`fc_norm`, `head`: in the published file, never used by MiDaS; its `norm` is an identity)."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, EMBED))
        self.patch_embed = _PatchEmbed()
        self.blocks = nn.ModuleList(_Block() for _ in range(DEPTH))
        self.fc_norm = nn.LayerNorm(EMBED, eps=1e-6)
        self.head = nn.Linear(EMBED, 1000)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """MiDaS's `beit_forward_features` with its hooks: the tokens after blocks 5, 11, 17, 23."""
        grid = (x.shape[-2] // PATCH, x.shape[-1] // PATCH)
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        hooked = []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, grid)
            if i in HOOKS:
                hooked.append(tokens)
        return hooked


# --- MiDaS v3.1's DPT around it ---


def _postprocess(*convs: nn.Module) -> nn.Sequential:
    """MiDaS's `act_postprocess1..4`: readout, Transpose and Unflatten (stand-ins here: parameter-free,
    done in `_Encoder.forward`), then the convolutions, at the indices the published names carry."""
    return nn.Sequential(_ProjectReadout(EMBED), nn.Identity(), nn.Identity(), *convs)


class _Encoder(nn.Module):
    """MiDaS's `pretrained`: the Beit and the reassembly of its four hooked token maps (1/16) into
    maps at 1/4 (4x4 transposed convolution), 1/8 (2x2), 1/16 and 1/32 (3x3 stride-2 convolution)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _Beit()
        w1, w2, w3, w4 = REASSEMBLE
        self.act_postprocess1 = _postprocess(nn.Conv2d(EMBED, w1, 1), nn.ConvTranspose2d(w1, w1, 4, stride=4))
        self.act_postprocess2 = _postprocess(nn.Conv2d(EMBED, w2, 1), nn.ConvTranspose2d(w2, w2, 2, stride=2))
        self.act_postprocess3 = _postprocess(nn.Conv2d(EMBED, w3, 1))
        self.act_postprocess4 = _postprocess(nn.Conv2d(EMBED, w4, 1), nn.Conv2d(w4, w4, 3, stride=2, padding=1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        grid = (x.shape[-2] // PATCH, x.shape[-1] // PATCH)
        posts = (self.act_postprocess1, self.act_postprocess2, self.act_postprocess3, self.act_postprocess4)
        maps = []
        for post, tokens in zip(posts, self.model(x), strict=True):
            out = post[0](tokens).transpose(1, 2).unflatten(2, grid)
            maps.append(post[3:](out))
        return maps


class _Midas(nn.Module):
    """MiDaS's `DPTDepthModel` (DPT-BEiT-L-384): an image in -1..1 whose sides are multiples of 32 ->
    relative inverse depth (N, H, W), and the features ZoeDepth hooks: the depth head's last 32-channel
    activation (full size), the bottleneck `layer4_rn` (1/32) and the fusion outputs r4..r1 (1/16..1/2).
    Sizes that are multiples of 32 make MiDaS v3.1's `size=` upsampling the plain doubling of
    midas.py's fusion blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.pretrained = _Encoder()
        self.scratch = scratch(REASSEMBLE)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        s = self.scratch
        layer_1, layer_2, layer_3, layer_4 = self.pretrained(x)
        layer_4 = s.layer4_rn(layer_4)
        path_4 = s.refinenet4(layer_4)
        path_3 = s.refinenet3(path_4, s.layer3_rn(layer_3))
        path_2 = s.refinenet2(path_3, s.layer2_rn(layer_2))
        path_1 = s.refinenet1(path_2, s.layer1_rn(layer_1))
        last = s.output_conv[:4](path_1)
        depth = s.output_conv[4:](last).squeeze(dim=1)
        return depth, [last, layer_4, path_4, path_3, path_2, path_1]


# --- ZoeDepth's metric bins head ---


def _mlp(in_c: int, hidden: int, out_c: int, last: nn.Module | None = None) -> nn.Sequential:
    """ZoeDepth's two 1x1 convolutions with a ReLU between (`_net`), and an activation after."""
    layers = [nn.Conv2d(in_c, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, out_c, 1)]
    return nn.Sequential(*layers, *([last] if last is not None else []))


class _Projector(nn.Module):
    def __init__(self, in_c: int) -> None:
        super().__init__()
        self._net = _mlp(in_c, EMBEDDING, EMBEDDING)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._net(x)


class _SeedBinRegressor(nn.Module):
    """`SeedBinRegressorUnnormed`: softplus bin centres from the bottleneck."""

    def __init__(self) -> None:
        super().__init__()
        self._net = _mlp(FEATURES, 256, BINS, nn.Softplus())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._net(x)


def _up(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    return functional.interpolate(x, size, mode="bilinear", align_corners=True)


class _Attractor(nn.Module):
    """`AttractorLayerUnnormed` (kind "mean", type "inv", not memory-efficient): softplus attractor
    points from the block's embedding plus the previous one; every bin centre moves by the mean of
    dx / (1 + alpha dx^2) over the points, dx = point - centre."""

    def __init__(self, attractors: int) -> None:
        super().__init__()
        self._net = _mlp(EMBEDDING, EMBEDDING, attractors, nn.Softplus())

    def forward(self, x: torch.Tensor, centres: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        points = self._net(x + _up(previous, x.shape[-2:]))
        centres = _up(centres, points.shape[-2:])
        dx = points.unsqueeze(2) - centres.unsqueeze(1)
        return centres + torch.mean(dx.div(1 + ATTRACTOR_ALPHA * dx.pow(ATTRACTOR_GAMMA)), dim=1)


def _log_binom(n: torch.Tensor, k: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """log(n choose k) by Stirling's approximation, as ZoeDepth writes it."""
    n = n + eps
    k = k + eps
    return n * torch.log(n) - k * torch.log(k) - (n - k) * torch.log(n - k + eps)


class _LogBinomial(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("k_idx", torch.arange(0, BINS).view(1, -1, 1, 1))
        self.register_buffer("K_minus_1", torch.tensor([BINS - 1.0]).view(1, -1, 1, 1))

    def forward(self, p: torch.Tensor, t: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
        p = p.unsqueeze(1)
        one_minus_p = torch.clamp(1 - p, eps, 1)
        p = torch.clamp(p, eps, 1)
        y = (
            _log_binom(self.K_minus_1, self.k_idx)
            + self.k_idx * torch.log(p)
            + (BINS - 1 - self.k_idx) * torch.log(one_minus_p)
        )
        return torch.softmax(y / t, dim=1)


class _ConditionalLogBinomial(nn.Module):
    """A binomial over the bins per pixel: its probability and temperature (min_temp 0.0212 .. 50)
    from the main features and the condition, each as a ratio of two softplus outputs."""

    def __init__(self, in_c: int = 32 + 1, condition: int = EMBEDDING, eps: float = 1e-4) -> None:
        super().__init__()
        self.p_eps = eps
        self.log_binomial_transform = _LogBinomial()
        bottleneck = (in_c + condition) // 2
        self.mlp = nn.Sequential(
            nn.Conv2d(in_c + condition, bottleneck, 1), nn.GELU(), nn.Conv2d(bottleneck, 4, 1), nn.Softplus()
        )

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        pt = self.mlp(torch.concat((x, condition), dim=1))
        p, t = pt[:, :2] + self.p_eps, pt[:, 2:] + self.p_eps
        p = p[:, 0] / (p[:, 0] + p[:, 1])
        t = (t[:, 0] / (t[:, 0] + t[:, 1])).unsqueeze(1)
        t = (MAX_TEMP - MIN_TEMP) * t + MIN_TEMP
        return self.log_binomial_transform(p, t)


def network_size(height: int, width: int) -> tuple[int, int]:
    """MiDaS's `Resize(512, 384, keep_aspect_ratio=True, ensure_multiple_of=32, resize_method="minimal")`
    as ZoeDepth's `PrepForMidas` builds it: the one scale of the two (to 384 high, to 512 wide) nearer
    1, each side rounded (half to even) to a multiple of 32."""
    scale_h, scale_w = NET_HEIGHT / height, NET_WIDTH / width
    if abs(1 - scale_w) < abs(1 - scale_h):
        scale_h = scale_w
    else:
        scale_w = scale_h
    return (
        int(np.round(scale_h * height / MULTIPLE) * MULTIPLE),
        int(np.round(scale_w * width / MULTIPLE) * MULTIPLE),
    )


class ZoeNetwork(nn.Module):
    """ZoeDepth's `ZoeDepth` (ZoeD_N): an RGB image in 0..1, any size -> metric depth (N, 1, h, w)
    at the size MiDaS runs at (`network_size`); larger is farther."""

    def __init__(self) -> None:
        super().__init__()
        self.core = nn.Module()  # ZoeDepth's MidasCore: no parameters of its own
        self.core.core = _Midas()
        self.conv2 = nn.Conv2d(FEATURES, FEATURES, 1)
        self.seed_bin_regressor = _SeedBinRegressor()
        self.seed_projector = _Projector(FEATURES)
        self.projectors = nn.ModuleList(_Projector(FEATURES) for _ in ATTRACTORS)
        self.attractors = nn.ModuleList(_Attractor(n) for n in ATTRACTORS)
        self.conditional_log_binomial = _ConditionalLogBinomial()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _up(x, network_size(*x.shape[-2:]))
        x = (x - 0.5) / 0.5
        rel_depth, (last, bottleneck, *blocks) = self.core.core(x)
        x = self.conv2(bottleneck)
        centres = self.seed_bin_regressor(x)
        previous = self.seed_projector(x)
        for projector, attractor, block in zip(self.projectors, self.attractors, blocks, strict=True):
            embedding = projector(block)
            centres = attractor(embedding, centres, previous)
            previous = embedding
        last = torch.cat([last, _up(rel_depth.unsqueeze(1), last.shape[2:])], dim=1)
        probabilities = self.conditional_log_binomial(last, _up(previous, last.shape[-2:]))
        centres = _up(centres, probabilities.shape[-2:])
        return torch.sum(probabilities * centres, dim=1, keepdim=True)


def _padded_depth(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ZoeDepth's `_infer_with_pad_aug`: reflect-pad by int(sqrt(side / 2) * 3) on each side, run,
    upsample bicubically to the padded size, crop back."""
    pad_h, pad_w = int(np.sqrt(x.shape[2] / 2) * 3), int(np.sqrt(x.shape[3] / 2) * 3)
    padded = functional.pad(x, [pad_w, pad_w] + ([pad_h, pad_h] if pad_h > 0 else []), mode="reflect")
    out = network(padded)
    if out.shape[-2:] != padded.shape[-2:]:
        out = functional.interpolate(out, size=padded.shape[-2:], mode="bicubic", align_corners=False)
    if pad_h > 0:
        out = out[:, :, pad_h:-pad_h, :]
    if pad_w > 0:
        out = out[:, :, :, pad_w:-pad_w]
    return out


def infer(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ZoeDepth's `infer` (pad and flip augmentation): the mean of the padded depths of the image and
    of its mirror image (mirrored back). (N, 3, H, W) in 0..1 -> (N, 1, H, W)."""
    out = _padded_depth(network, x)
    flipped = _padded_depth(network, torch.flip(x, dims=[3]))
    return (out + torch.flip(flipped, dims=[3])) / 2


def run(network: nn.Module, array: np.ndarray, method: str, args: Mapping[str, Any]) -> np.ndarray:
    """As ControlNet 1.1's ZoeDetector: the image in 0..1 through `infer`; the depth shifted by its
    2nd percentile, divided by the 85th minus the 2nd and inverted (near is bright), times 255,
    clipped and truncated to uint8; grey in three channels. It takes no args. The arithmetic is
    float32 as NumPy 1 does it there (the percentiles cast to float32). ControlNet resizes the image
    to a multiple of 64 first; the network resizes for itself, so any size goes in as it is."""
    image = torch.from_numpy(array.copy()).float() / 255.0
    depth = infer(network, image.permute(2, 0, 1)[None])[0, 0].numpy()
    low, high = np.percentile(depth, 2), np.percentile(depth, 85)
    if not high > low:  # a flat depth: the original divides 0 by 0; nothing to show
        return np.zeros((*array.shape[:2], 3), dtype=np.uint8)
    depth = 1.0 - (depth - np.float32(low)) / np.float32(high - low)
    return gray_to_rgb((depth * 255.0).clip(0, 255).astype(np.uint8))


def load(network: nn.Module, path: Path) -> None:
    """The published layout: {"model": state dict} (a bare state dict or "module."-prefixed keys load
    too, as ZoeDepth's own `load_state_dict` allows), strict; files saved by timm >= 1.0, which does
    not save the `relative_position_index` buffers, load as well."""
    state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    state = {key.removeprefix("module."): value for key, value in state.items()}
    own = network.state_dict()
    for key in own:
        if key.endswith(".relative_position_index") and key not in state:
            state[key] = own[key]
    network.load_state_dict(state)


def to_published(network: nn.Module) -> dict[str, Any]:
    return {"model": network.state_dict()}


ANNOTATORS = (
    Annotator(
        name="zoe",
        methods=METHODS,
        weights=ANNOTATORS_REPO + "ZoeD_M12_N.pt",
        build=ZoeNetwork,
        run=run,
        load=load,
        to_published=to_published,
    ),
)
