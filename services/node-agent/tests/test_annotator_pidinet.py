"""PiDiNet: the published checkpoint's layout, the pixel-difference convolutions against the
vanilla kernels pidinet's `convert_pidinet` turns them into, and the post-processing of
controlnet_aux's PidiNetDetector on hand-made edge maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional

from stipple_common.errors import InvalidInput
from stipple_node.annotators import BY_METHOD, REGISTRY
from stipple_node.annotators.ops import scribble
from stipple_node.annotators.pidinet import (
    CARV4,
    METHODS,
    PidiNetwork,
    PixelDifferenceConv,
    load,
    run,
    to_published,
)


@pytest.fixture(scope="module")
def network() -> PidiNetwork:
    torch.manual_seed(0)
    return PidiNetwork().eval()


def test_the_record_serves_the_four_pidinet_methods() -> None:
    record = REGISTRY["pidinet"]
    assert record.methods == METHODS
    assert record.weights.endswith("lllyasviel/Annotators/resolve/main/table5_pidinet.pth")
    assert all(BY_METHOD[method] is record for method in METHODS)


def test_state_dict_matches_the_published_layout(network: PidiNetwork) -> None:
    # names and shapes as ControlNet 1.1's annotator/pidinet/model.py builds `pidinet()`
    # (carv4, sa, dil=24, 60 channels), into which it loads table5_pidinet.pth strictly
    shapes = {key: tuple(value.shape) for key, value in network.state_dict().items()}
    expected = {
        "init_block.weight": (60, 3, 3, 3),
        "block1_1.conv1.weight": (60, 1, 3, 3),
        "block1_2.conv1.weight": (60, 1, 3, 3),  # "rd": raw 3x3 weights, not the converted 5x5 kernel
        "block1_3.conv2.weight": (60, 60, 1, 1),
        "block2_1.shortcut.weight": (120, 60, 1, 1),
        "block2_1.shortcut.bias": (120,),
        "block2_1.conv1.weight": (60, 1, 3, 3),
        "block2_1.conv2.weight": (120, 60, 1, 1),
        "block3_1.conv2.weight": (240, 120, 1, 1),
        "block3_3.conv1.weight": (240, 1, 3, 3),
        "block4_1.shortcut.weight": (240, 240, 1, 1),
        "block4_4.conv2.weight": (240, 240, 1, 1),
        "dilations.0.conv1.weight": (24, 60, 1, 1),
        "dilations.0.conv1.bias": (24,),
        "dilations.3.conv1.weight": (24, 240, 1, 1),
        "dilations.3.conv2_4.weight": (24, 24, 3, 3),
        "attentions.2.conv1.weight": (4, 24, 1, 1),
        "attentions.2.conv1.bias": (4,),
        "attentions.0.conv2.weight": (1, 4, 3, 3),
        "conv_reduces.1.conv.weight": (1, 24, 1, 1),
        "conv_reduces.1.conv.bias": (1,),
        "classifier.weight": (1, 4, 1, 1),
        "classifier.bias": (1,),
    }
    assert {key: shapes.get(key) for key in expected} == expected
    assert len(shapes) == 83
    assert "block1_1.shortcut.weight" not in shapes  # only the first block of stages 2..4 has one
    assert not [key for key in shapes if key.startswith("block") and key.endswith("conv1.bias")]
    # the paper's PiDiNet has 710K parameters
    assert sum(value.numel() for value in network.state_dict().values()) == 710_149
    blocks = [f"block{stage}_{i}" for stage, count in ((1, 3), (2, 4), (3, 4), (4, 4)) for i in range(1, count + 1)]
    assert [network.init_block.op] + [network.get_submodule(name).conv1.op for name in blocks] == list(CARV4)


def test_the_published_checkpoint_round_trips(network: PidiNetwork, tmp_path: Path) -> None:
    published = to_published(network)
    assert set(published) == {"state_dict"}
    assert all(key.startswith("module.") for key in published["state_dict"])
    # hellozhuo/pidinet's main.py saves {"epoch", "state_dict", "optimizer"}; only the weights matter
    path = tmp_path / "table5_pidinet.pth"
    torch.save({"epoch": 13, **published, "optimizer": {"state": {}, "param_groups": []}}, path)
    other = PidiNetwork()
    load(other, path)
    for key, value in network.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key


def test_a_bare_state_dict_is_not_a_pidinet_checkpoint(network: PidiNetwork, tmp_path: Path) -> None:
    path = tmp_path / "bare.pth"
    torch.save(network.state_dict(), path)
    with pytest.raises(ValueError, match="state_dict"):
        load(PidiNetwork(), path)


def _converted(op: str, weight: torch.Tensor) -> torch.Tensor:
    """The vanilla kernel of a pixel-difference conv (hellozhuo/pidinet's convert_pdc)."""
    out, cin = weight.shape[:2]
    if op == "cv":
        return weight
    if op == "cd":
        flat = weight.reshape(out, cin, 9).clone()
        flat[:, :, 4] -= weight.sum(dim=(2, 3))
        return flat.view(weight.shape)
    if op == "ad":
        flat = weight.reshape(out, cin, 9)
        return (flat - flat[:, :, [3, 0, 1, 6, 4, 2, 7, 8, 5]]).view(weight.shape)
    kernel = torch.zeros(out, cin, 5, 5)
    outer = [(0, 0), (0, 2), (0, 4), (2, 0), (2, 4), (4, 0), (4, 2), (4, 4)]  # the 5x5 ring, row-major
    for tap, (row, col) in enumerate(outer, start=1):
        kernel[:, :, row, col] = weight.reshape(out, cin, 9)[:, :, tap]
        kernel[:, :, 1 + row // 2, 1 + col // 2] = -weight.reshape(out, cin, 9)[:, :, tap]
    return kernel


@pytest.mark.parametrize("op", ["cv", "cd", "ad", "rd"])
@pytest.mark.parametrize("groups", [1, 6])
def test_pixel_difference_convs_equal_their_vanilla_conversion(op: str, groups: int) -> None:
    torch.manual_seed(1)
    conv = PixelDifferenceConv(op, 6, 6, groups=groups)
    x = torch.randn(1, 6, 11, 13)
    kernel = _converted(op, conv.weight.detach())
    expected = functional.conv2d(x, kernel, padding=kernel.shape[-1] // 2, groups=groups)
    with torch.inference_mode():
        got = conv(x)
    assert got.shape == expected.shape == (1, 6, 11, 13)
    assert torch.allclose(got, expected, atol=1e-5)
    if op != "cv":  # a difference of pixels: a flat image has no edges
        with torch.inference_mode():
            assert conv(torch.full((1, 6, 9, 9), 0.7))[..., 2:-2, 2:-2].abs().max() < 1e-5


class _BlueChannel(nn.Module):
    """Stands in for the network: returns its first input channel as the edge probability."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x.clone()
        return x[:, :1]


def _picture() -> np.ndarray:
    y, x = np.mgrid[0:40, 0:50]
    array = np.zeros((40, 50, 3), dtype=np.uint8)
    array[..., 0] = 255 - x * 5
    array[..., 1] = 7
    array[..., 2] = (x * 5 + y) % 256  # blue: a ramp over every level 0..255
    array[10:30, 20:26, 2] = 255  # and a bright bar
    return array


def test_the_network_reads_bgr_in_the_unit_range() -> None:
    stub, array = _BlueChannel(), _picture()
    with torch.inference_mode():
        out = run(stub, array, "softedge_pidinet", {})
    assert stub.seen.shape == (1, 3, 40, 50)
    assert torch.equal(stub.seen[0, 0], torch.from_numpy(array[..., 2]).float() / 255.0)
    assert torch.equal(stub.seen[0, 2], torch.from_numpy(array[..., 0]).float() / 255.0)
    assert out.shape == (40, 50, 3)
    assert out.dtype == np.uint8
    assert np.array_equal(out[..., 0], out[..., 2])
    assert np.abs(out[..., 0].astype(int) - array[..., 2]).max() <= 1  # 255 * (v / 255), truncated


def test_safe_quantizes_to_three_levels() -> None:
    array = _picture()
    with torch.inference_mode():
        out = run(_BlueChannel(), array, "softedge_pidisafe", {})[..., 0]
    blue = array[..., 2].astype(np.float32) / 255.0
    assert set(np.unique(out)) == {0, 127, 255}
    assert (out[blue < 0.33] == 0).all()
    assert (out[(blue > 0.34) & (blue < 0.66)] == 127).all()
    assert (out[blue > 0.67] == 255).all()


@pytest.mark.parametrize("method", ["softedge_pidinet", "softedge_pidisafe"])
def test_apply_filter_thresholds_at_one_half(method: str) -> None:
    array = _picture()
    with torch.inference_mode():
        out = run(_BlueChannel(), array, method, {"apply_filter": True})[..., 0]
    assert np.array_equal(out, np.where(array[..., 2] >= 128, 255, 0).astype(np.uint8))


@pytest.mark.parametrize("method", ["scribble_pidinet", "scribble_pidisafe"])
def test_scribble_thins_the_soft_edges(method: str) -> None:
    array = _picture()
    with torch.inference_mode():
        soft = run(_BlueChannel(), array, method.replace("scribble", "softedge"), {})[..., 0]
        out = run(_BlueChannel(), array, method, {})
    assert np.array_equal(out[..., 0], scribble(soft))
    assert set(np.unique(out)) == {0, 255}


@pytest.mark.parametrize("value", ["yes", 1, None, [True]])
def test_a_bad_apply_filter_is_invalid_input(network: PidiNetwork, value: object) -> None:
    with pytest.raises(InvalidInput) as caught:
        run(network, _picture(), "softedge_pidinet", {"apply_filter": value})
    assert caught.value.field == "controlnet.preprocess.args.apply_filter"


def test_odd_sizes_come_back_at_their_size(network: PidiNetwork) -> None:
    array = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    with torch.inference_mode():
        edge = network(torch.from_numpy(array).float().permute(2, 0, 1)[None] / 255.0)
        out = run(network, array, "softedge_pidinet", {})
    assert edge.shape == (1, 1, 37, 53)
    assert 0.0 <= edge.min().item() <= edge.max().item() <= 1.0
    assert out.shape == (37, 53, 3)
