"""LeReS and its boosting: the parameter names and shapes of res101.pth (a checkpoint whose
"depth_model" has a "module." prefix) and latest_net_G.pth (pix2pix's unet_1024 without norms),
the original's in-place ReLU quirks, the preprocessing (BGR floats 0..255 through ImageNet's
mean/std), the control image (16-bit scaling, remove near / background, inversion) and the
boosting's steps (R_x, patches, merging) on hand-made network outputs, and determinism."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional

from stipple_common.errors import InvalidInput
from stipple_node.annotators import BY_METHOD, REGISTRY
from stipple_node.annotators import leres as module
from stipple_node.annotators.leres import (
    _FTB,
    LeresNetwork,
    MergeNetwork,
    _max_pool,
    _UnetBlock,
    blend_mask,
    boost,
    control_image,
    double_estimate,
    estimate,
    leres_to_published,
    load_leres,
    processing_resolution,
    run,
    select_patches,
)
from stipple_testkit.standin import StandIn

ENCODER = "module.depth_model.encoder_modules.encoder."
DECODER = "module.depth_model.decoder_modules."
# (key, shape) of res101.pth's "depth_model"
PUBLISHED_LERES = {
    ENCODER + "conv1.weight": (64, 3, 7, 7),
    ENCODER + "bn1.running_var": (64,),
    ENCODER + "layer1.0.conv1.weight": (256, 64, 1, 1),  # 32 groups x 8 channels at 64 planes
    ENCODER + "layer1.0.conv2.weight": (256, 8, 3, 3),  # grouped
    ENCODER + "layer1.0.downsample.0.weight": (256, 64, 1, 1),
    ENCODER + "layer1.0.downsample.1.running_mean": (256,),
    ENCODER + "layer2.3.conv3.weight": (512, 512, 1, 1),
    ENCODER + "layer3.22.conv2.weight": (1024, 32, 3, 3),
    ENCODER + "layer4.0.downsample.0.weight": (2048, 1024, 1, 1),
    ENCODER + "layer4.2.bn3.num_batches_tracked": (),
    DECODER + "conv.conv1.weight": (512, 2048, 3, 3),
    DECODER + "conv.conv_branch.1.weight": (512, 512, 3, 3),
    DECODER + "conv.conv_branch.2.running_var": (512,),
    DECODER + "conv.conv_branch.4.bias": (512,),
    DECODER + "conv1.weight": (256, 512, 3, 3),
    DECODER + "ffm2.ftb1.conv1.weight": (256, 1024, 3, 3),
    DECODER + "ffm1.ftb1.conv1.weight": (256, 512, 3, 3),
    DECODER + "ffm0.ftb2.conv_branch.4.weight": (256, 256, 3, 3),
    DECODER + "outconv.adapt_conv.0.weight": (128, 256, 3, 3),
    DECODER + "outconv.adapt_conv.1.weight": (128,),
    DECODER + "outconv.adapt_conv.3.weight": (1, 128, 3, 3),
    DECODER + "outconv.adapt_conv.3.bias": (1,),
}
INNER = "model.model.1.model.3.model.3.model.3."  # the first 512 x 512 level
# (key, shape) of latest_net_G.pth
PUBLISHED_MERGE = {
    "model.model.0.weight": (64, 2, 4, 4),  # two estimates in
    "model.model.3.weight": (128, 1, 4, 4),  # the outermost up-convolution, the only bias
    "model.model.3.bias": (1,),
    "model.model.1.model.1.weight": (128, 64, 4, 4),
    "model.model.1.model.5.weight": (256, 64, 4, 4),
    "model.model.1.model.3.model.1.weight": (256, 128, 4, 4),
    "model.model.1.model.3.model.5.weight": (512, 128, 4, 4),
    "model.model.1.model.3.model.3.model.1.weight": (512, 256, 4, 4),
    "model.model.1.model.3.model.3.model.5.weight": (1024, 256, 4, 4),
    INNER + "model.1.weight": (512, 512, 4, 4),
    INNER + "model.5.weight": (1024, 512, 4, 4),
    INNER + "model.3." * 5 + "model.1.weight": (512, 512, 4, 4),  # the innermost, 1 x 1 at 1024
    INNER + "model.3." * 5 + "model.3.weight": (512, 512, 4, 4),
}


@pytest.fixture(scope="module")
def network() -> LeresNetwork:
    torch.manual_seed(0)
    return LeresNetwork().eval()


def ramp_depth(x: torch.Tensor) -> torch.Tensor:
    """Depth growing to the right (near on the left), whatever the input."""
    width = x.shape[-1]
    return torch.arange(width, dtype=torch.float32).expand(x.shape[0], 1, x.shape[-2], width).clone()


def scene(width: int, height: int, share: float, count: int, seed: int = 1) -> np.ndarray:
    """Small rectangles on the left `share` of a flat grey picture."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 120, np.uint8)
    limit = int(width * share)
    for _ in range(count):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x0, y0 = int(rng.integers(0, limit)), int(rng.integers(0, height))
        corner = (min(limit, x0 + int(rng.integers(4, 40))), y0 + int(rng.integers(4, 40)))
        cv2.rectangle(image, (x0, y0), corner, colour, -1)
    return image


def test_records_serve_both_methods_with_the_published_weights() -> None:
    assert BY_METHOD["depth_leres"] is REGISTRY["leres"]
    assert BY_METHOD["depth_leres++"] is REGISTRY["leres"]
    assert REGISTRY["leres"].weights.endswith("lllyasviel/Annotators/resolve/main/res101.pth")
    assert REGISTRY["leres_pix2pix"].weights.endswith("lllyasviel/Annotators/resolve/main/latest_net_G.pth")
    assert dict(REGISTRY["leres"].uses) == {"depth_leres++": ("leres_pix2pix",)}
    assert REGISTRY["leres_pix2pix"].methods == ()  # only the boosting's merge network
    with pytest.raises(RuntimeError, match="no method of its own"):
        REGISTRY["leres_pix2pix"].run(None, np.zeros((8, 8, 3), np.uint8), "depth_leres++", {})


def test_leres_checkpoint_matches_the_published_layout(network: LeresNetwork) -> None:
    published = leres_to_published(network)
    assert list(published) == ["depth_model"]
    state = published["depth_model"]
    for key, shape in PUBLISHED_LERES.items():
        assert tuple(state[key].shape) == shape, key
    assert all(key.startswith("module.depth_model.") for key in state)
    # ResNeXt 624 (stem 6, 33 blocks of 18, 4 downsamples of 6), decoder 88 (7 FTBs of 11,
    # conv1 2, outconv 9); each batch norm: weight, bias, running mean/var, num_batches_tracked
    assert len(state) == 712
    assert len([key for key in state if key.endswith("num_batches_tracked")]) == 112
    assert sum(value.numel() for key, value in state.items() if "running" in key) == 2 * 103_616
    assert sum(p.numel() for p in network.parameters()) == 115_360_833
    assert ENCODER + "fc.weight" not in state  # no classifier
    assert ENCODER + "layer3.23.conv1.weight" not in state  # 23 blocks in layer3
    assert not [key for key in state if ".ata." in key]  # the attention block is commented out there


def test_merge_network_matches_the_published_layout() -> None:
    torch.manual_seed(0)
    state = MergeNetwork().state_dict()
    for key, shape in PUBLISHED_MERGE.items():
        assert tuple(state[key].shape) == shape, key
    # ten down- and ten up-convolutions without bias (norm "none"), and the last one's bias
    assert len(state) == 21
    assert [key for key in state if key.endswith("bias")] == ["model.model.3.bias"]
    assert sum(value.numel() for value in state.values()) == 79_564_801  # latest_net_G.pth: 318 MB
    assert INNER + "model.3." * 6 + "model.1.weight" not in state  # ten levels, no more


def test_load_strips_the_module_prefix_and_is_strict(tmp_path: Path) -> None:
    # load_leres on a small network: the full one's round trip is test_annotators' to check
    torch.manual_seed(4)
    small = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    published = leres_to_published(small)
    assert sorted(published["depth_model"]) == sorted(f"module.{key}" for key in small.state_dict())
    path = tmp_path / "res101.pth"
    torch.save(published | {"shift_model": {}, "focal_model": {}}, path)  # other entries are ignored
    other = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    load_leres(other, path)
    assert torch.equal(other[0].weight, small[0].weight)
    # a file without the prefix loads too (strip_prefix_if_present strips only a common prefix)
    torch.save({"depth_model": small.state_dict()}, path)
    load_leres(nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)), path)
    del published["depth_model"]["module.1.running_var"]
    torch.save(published, path)
    with pytest.raises(RuntimeError, match=r"1\.running_var"):
        load_leres(other, path)
    torch.save(small.state_dict(), path)  # a bare state dict is not the published layout
    with pytest.raises(KeyError, match="depth_model"):
        load_leres(other, path)


def test_network_sizes(network: LeresNetwork) -> None:
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        features = network.depth_model.encoder_modules.encoder(x)
        depth = network(x)
    assert [tuple(f.shape) for f in features] == [(1, 256, 16, 24), (1, 512, 8, 12), (1, 1024, 4, 6), (1, 2048, 2, 3)]
    assert depth.shape == (1, 1, 64, 96)


def test_feature_transfer_block_adds_the_branch_to_the_activated_convolution() -> None:
    # the original's branch starts with an in-place ReLU, which changes the tensor it is added to
    torch.manual_seed(2)
    block = _FTB(4, 6).eval()
    x = torch.randn(1, 4, 8, 8)
    with torch.inference_mode():
        c = functional.relu(block.conv1(x))
        branch = block.conv_branch
        expected = functional.relu(c + branch[4](functional.relu(branch[2](branch[1](c)))))
        assert torch.equal(block(x), expected)
        # not the textbook residual
        assert not torch.allclose(block(x), functional.relu(block.conv1(x) + branch(block.conv1(x))))


def test_unet_skip_connections_carry_the_activated_input() -> None:
    # pix2pix's LeakyReLU is in place too: what is concatenated is leaky_relu(x), not x
    torch.manual_seed(3)
    block = _UnetBlock(4, 8).eval()  # innermost
    x = torch.randn(1, 4, 8, 8)
    with torch.inference_mode():
        out = block(x)
        leaky = functional.leaky_relu(x, 0.2)
        assert torch.equal(out[:, :4], leaky)
        up = block.model[3](functional.relu(block.model[1](leaky)))
        assert torch.equal(out[:, 4:], up)


def test_the_image_goes_in_as_bgr_floats_through_imagenet_mean_and_std() -> None:
    stand_in = StandIn(lambda x: x[:, :1] * 0 + 7.0)
    image = np.zeros((32, 64, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 255, 10, 0  # red, a little green
    depth = estimate(stand_in, image, 64, 32)
    (seen,) = stand_in.inputs
    assert seen.shape == (1, 3, 32, 64)
    # channel 0 is blue (0), channel 2 red (255), not divided by 255
    assert torch.allclose(seen[0, 0], torch.tensor((0 - 0.485) / 0.229))
    assert torch.allclose(seen[0, 1], torch.tensor((10 - 0.456) / 0.224))
    assert torch.allclose(seen[0, 2], torch.tensor((255 - 0.406) / 0.225))
    assert depth.shape == (32, 64)
    assert depth.dtype == np.float32
    np.testing.assert_allclose(depth, 7.0, rtol=1e-6)
    estimate(stand_in, image, 448, 448)  # another size: resized in, the depth resized back
    assert stand_in.inputs[-1].shape == (1, 3, 448, 448)


def test_control_image_scales_inverts_and_thresholds() -> None:
    depth = np.tile(np.arange(256, dtype=np.float32) * 3 + 5, (4, 1))  # far to the right
    out = control_image(depth, 0, 0)
    assert out.dtype == np.uint8
    assert out.shape == (4, 256)
    expected = 255 - np.round((65535 * (depth[0] - 5) / 765).astype(np.uint16) * (255 / 65535)).astype(np.uint8)
    assert np.array_equal(out[0], expected)
    assert out[0, 0] == 255  # near is bright
    assert out[0, -1] == 0
    # remove near: before inverting, values up to thr_a% of 255 become 0, so white after it
    near = control_image(depth, 50, 0)
    assert (near[:, :128] == 255).all()
    assert np.array_equal(near[:, 128:], out[:, 128:])
    # remove background: after inverting, values up to thr_b% of 255 become black
    background = control_image(depth, 0, 20)
    dark = out <= 51  # floor(0.2 * 255)
    assert (background[dark] == 0).all()
    assert np.array_equal(background[~dark], out[~dark])


def test_a_flat_depth_is_white() -> None:
    # the original writes zeros when the range is below float64's eps, then inverts them
    assert (control_image(np.full((8, 8), 3.0, np.float32), 0, 0) == 255).all()
    assert (control_image(np.full((8, 8), np.nan, np.float32), 0, 0) == 255).all()


def test_depth_leres_pads_to_64_runs_at_that_size_and_crops_back() -> None:
    stand_in = StandIn(ramp_depth)
    array = np.zeros((40, 70, 3), np.uint8)
    array[:, :, 2] = np.arange(70, dtype=np.uint8)[None, :] * 3
    out = run(stand_in, array, "depth_leres", {})
    assert out.shape == (40, 70, 3)
    assert out.dtype == np.uint8
    assert np.array_equal(out[..., 0], out[..., 1])
    assert np.array_equal(out[..., 0], out[..., 2])
    (seen,) = stand_in.inputs
    assert seen.shape == (1, 3, 64, 128)
    blue = seen[0, 0]  # the picture's blue channel, BGR first
    assert torch.equal(blue[:, 70:], blue[:, 69:70].expand(-1, 58))  # edge padding on the right
    assert torch.equal(blue[40:], blue[39:40].expand(24, -1))  # and at the bottom
    # normalized over the padded map (0..127), then cropped: column 69 of 127
    expected = control_image(ramp_depth(seen)[0, 0].numpy(), 0, 0)[:40, :70]
    assert np.array_equal(out[..., 0], expected)
    assert out[0, 0, 0] == 255
    assert out[0, -1, 0] > 0


@pytest.mark.parametrize("value", [-1, 101, 100.5, "10", True, None, math.nan, [5]])
@pytest.mark.parametrize("name", ["thr_a", "thr_b"])
def test_bad_thresholds_are_invalid_input(name: str, value: object) -> None:
    with pytest.raises(
        InvalidInput, match=rf"controlnet\.preprocess\.args\.{name}: must be a percentage 0-100"
    ) as caught:
        run(StandIn(ramp_depth), np.zeros((64, 64, 3), np.uint8), "depth_leres", {name: value})
    assert caught.value.field == f"controlnet.preprocess.args.{name}"


def test_thresholds_take_integers_and_floats() -> None:
    array = np.zeros((64, 64, 3), np.uint8)
    plain = run(StandIn(ramp_depth), array, "depth_leres", {})
    assert np.array_equal(run(StandIn(ramp_depth), array, "depth_leres", {"thr_a": 0, "thr_b": 0.0}), plain)
    out = run(StandIn(ramp_depth), array, "depth_leres", {"thr_a": 100, "thr_b": 12.5})
    assert (out == 255).all()  # everything "near" at 100%: zero before inverting


def test_max_pool_is_block_reduce_with_zero_padding() -> None:
    rng = np.random.default_rng(4)
    image = rng.random((10, 10))
    out = _max_pool(image, 3)  # n = 3: blocks of 3, padded to 12
    assert out.shape == (4, 4)
    padded = np.zeros((12, 12))
    padded[:10, :10] = image
    expected = np.array([[padded[i : i + 3, j : j + 3].max() for j in range(0, 12, 3)] for i in range(0, 12, 3)])
    assert np.array_equal(out, expected)


def test_processing_resolution() -> None:
    # a flat picture: its edge map is all ones, so every size up to min(1600, 3 x 512) passes
    assert processing_resolution(np.full((512, 512, 3), 9, np.uint8)) == (42 * 32, 1.0)
    # edges on the left 40% only: already at 448 x 672 over 20% of pixels lack context
    size, scale = processing_resolution(scene(768, 512, 0.4, 300))
    assert size == 448
    assert 0 < scale < 1
    # a long side under 160: no size is tried, and boosting never needs K
    assert processing_resolution(np.zeros((64, 128, 3), np.uint8)) == (448, None)


def test_patches_are_busy_squares_inside_the_picture_largest_first() -> None:
    image = np.full((1792, 1792, 3), 100, np.uint8)
    image[200:700, 200:700] = scene(500, 500, 1.0, 200)  # busy in the top-left corner only
    patches = select_patches(image, 1.0)
    assert patches
    sizes = [rect[2] for rect in patches]
    assert sizes == sorted(sizes, reverse=True)
    for x, y, w, h in patches:
        assert w == h >= 896
        assert min(x, y) >= 0
        assert max(x + w, y + h) < 1793
        assert max(x, y) < 700  # each one overlaps the busy corner
    # the grid is at 448 + 336 k: of its 9 squares, the 3 away from the corner are flat
    assert len(patches) < 9
    assert select_patches(image[:896, :896], 1.0) == []  # no grid: range(448, 448) is empty


@pytest.fixture
def small_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """The blending mask at 300 x 300 instead of 3000 x 3000 (whose blur takes seconds); it is
    resized to each patch anyway."""
    monkeypatch.setattr(module, "blend_mask", lambda: blend_mask(300))


def test_blend_mask() -> None:
    mask = blend_mask(300)  # the original's generatemask at another size: sigma 18, kernel 73
    assert mask.shape == (300, 300)
    assert mask.dtype == np.float32
    assert mask.min() == 0
    assert mask.max() == 1
    assert mask[150, 150] == 1
    assert mask[0, 0] == 0
    assert 0.2 < mask[45, 150] < 0.8  # the 15% margin, blurred
    np.testing.assert_allclose(mask, mask.T, atol=1e-6)
    np.testing.assert_allclose(mask, mask[::-1], atol=1e-6)
    assert not mask.flags.writeable
    assert blend_mask(300) is mask  # made once


def test_double_estimate_merges_the_two_sizes_and_normalizes() -> None:
    leres = StandIn(ramp_depth)
    merger = StandIn(lambda x: x[:, 1:2] * 0.5)  # the high-resolution estimate, halved
    out = double_estimate(np.zeros((64, 96, 3), np.uint8), 448, 672, leres, merger)
    assert [tuple(x.shape) for x in leres.inputs] == [(1, 3, 448, 448), (1, 3, 672, 672)]
    (pair,) = merger.inputs
    assert pair.shape == (1, 2, 1024, 1024)
    assert pair.min() == -1
    assert pair.max() == 1  # each estimate scaled to -1..1
    assert out.shape == (1024, 1024)
    assert out.min() == 0
    assert out.max() == 1
    double_estimate(np.zeros((64, 96, 3), np.uint8), 448, 448, leres, merger)
    assert len(leres.inputs) == 3  # the same size twice is estimated once


def test_boost_on_a_small_picture_is_the_double_estimate() -> None:
    image = np.zeros((64, 128, 3), np.uint8)
    merger = StandIn(lambda x: x[:, 1:2])
    depth = boost(image, StandIn(ramp_depth), merger)
    assert depth.shape == (64, 128)
    whole = double_estimate(image, 448, 448, StandIn(ramp_depth), StandIn(lambda x: x[:, 1:2]))
    assert np.array_equal(depth, cv2.resize(whole, (128, 64), interpolation=cv2.INTER_CUBIC))
    assert depth[:, 0].mean() < depth[:, -1].mean()  # still the ramp


@pytest.mark.usefixtures("small_mask")
def test_boost_merges_patches_and_a_merge_that_returns_the_base_changes_nothing() -> None:
    image = scene(768, 512, 0.4, 300)
    leres = StandIn(lambda x: x[:, :1] / 255 + ramp_depth(x) / x.shape[-1])
    # a merge network that returns its first input (the base estimate of the patch): the linear
    # fit maps it back onto the base, so blending it in leaves the whole estimate as it was
    merger = StandIn(lambda x: x[:, :1])
    depth = boost(image, leres, merger)
    assert depth.shape == (512, 768)
    merges = len(merger.inputs)
    assert merges >= 3  # the whole picture's, then a patch's double estimate and its merge
    whole = double_estimate(image, 448, 448, leres, StandIn(lambda x: x[:, :1]))
    unchanged = cv2.resize(whole, (768, 512), interpolation=cv2.INTER_CUBIC)
    assert np.abs(depth - unchanged).max() < 0.01  # bicubic there and back: 0.006 at sharp edges
    # with the patch's own estimate merged in instead, the picture changes where the patch is
    other = boost(image, leres, StandIn(lambda x: x[:, 1:2]))
    assert np.abs(other - unchanged).max() > 0.1


def test_depth_leres_plus_plus_boosts_with_the_merge_network_and_makes_the_same_control_image() -> None:
    array = np.zeros((40, 70, 3), np.uint8)
    merger = StandIn(lambda x: x[:, 1:2])
    out = run(StandIn(ramp_depth), array, "depth_leres++", {"thr_b": 10}, uses={"leres_pix2pix": merger})
    assert out.shape == (40, 70, 3)
    assert merger.inputs
    expected = control_image(boost(np.zeros((64, 128, 3), np.uint8), StandIn(ramp_depth), merger), 0, 10)[:40, :70]
    assert np.array_equal(out[..., 0], expected)
    with pytest.raises(InvalidInput, match="thr_a"):
        run(StandIn(ramp_depth), array, "depth_leres++", {"thr_a": 200}, uses={"leres_pix2pix": merger})


@pytest.mark.usefixtures("small_mask")
def test_same_bits_every_time(network: LeresNetwork) -> None:
    array = scene(64, 64, 1.0, 20)
    with torch.inference_mode():
        first = run(network, array, "depth_leres", {"thr_a": 5})
        again = run(network, array, "depth_leres", {"thr_a": 5})
    assert np.array_equal(first, again)
    assert first.std() > 0
    image = scene(768, 512, 0.4, 300)
    leres = StandIn(lambda x: x[:, :1] / 255 + ramp_depth(x) / x.shape[-1])
    merger = StandIn(lambda x: torch.tanh(x[:, :1] * x[:, 1:2] + x[:, 1:2]))
    assert np.array_equal(boost(image, leres, merger), boost(image, leres, merger))
