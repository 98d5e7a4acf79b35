"""M-LSD: the network's parameter names are those of mlsd_large_512_fp32.pth, and the line
decoding puts a hand-made centre and displacement exactly where ControlNet's `pred_lines` would."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from stipple_common.errors import InvalidInput
from stipple_node.annotators import BY_METHOD, REGISTRY
from stipple_node.annotators.mlsd import MlsdNetwork, decode_lines, draw_lines, network_input, run

# (key, shape) of the published file, from ControlNet 1.1's annotator/mlsd/models/mbv2_mlsd_large.py
PUBLISHED_KEYS = {
    "backbone.features.0.0.weight": (32, 4, 3, 3),  # the stem sees RGB and a channel of ones
    "backbone.features.0.1.running_var": (32,),
    "backbone.features.1.conv.0.0.weight": (32, 1, 3, 3),  # t=1 block: depthwise first
    "backbone.features.1.conv.1.weight": (16, 32, 1, 1),
    "backbone.features.2.conv.0.0.weight": (96, 16, 1, 1),  # t=6 blocks: pointwise expansion first
    "backbone.features.2.conv.1.0.weight": (96, 1, 3, 3),
    "backbone.features.13.conv.2.weight": (96, 576, 1, 1),
    "backbone.features.13.conv.3.num_batches_tracked": (),
    "block15.conv1.0.weight": (64, 96, 1, 1),
    "block15.conv2.0.bias": (64,),
    "block16.conv1.0.weight": (128, 128, 3, 3),
    "block21.conv2.0.weight": (64, 16, 1, 1),
    "block23.conv1.0.weight": (64, 64, 3, 3),
    "block23.conv3.weight": (16, 64, 1, 1),
    "block23.conv3.bias": (16,),
}


@pytest.fixture(scope="module")
def network() -> MlsdNetwork:
    torch.manual_seed(0)
    return MlsdNetwork().eval()


def test_record_serves_mlsd_with_the_published_weights() -> None:
    assert BY_METHOD["mlsd"] is REGISTRY["mlsd"]
    assert REGISTRY["mlsd"].weights.endswith("lllyasviel/Annotators/resolve/main/mlsd_large_512_fp32.pth")


def test_state_dict_matches_the_published_layout(network: MlsdNetwork) -> None:
    state = network.state_dict()
    for key, shape in PUBLISHED_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    # 14 backbone stages (the stem and MobileNetV2 up to the 96-channel stage), no classifier
    stages = {int(key.split(".")[2]) for key in state if key.startswith("backbone.features.")}
    assert stages == set(range(14))
    heads = {key.split(".")[0] for key in state if not key.startswith("backbone.")}
    assert heads == {f"block{i}" for i in range(15, 24)}
    assert len(state) == 362


def test_network_maps_to_half_resolution_centre_and_displacements(network: MlsdNetwork) -> None:
    array = np.full((64, 96, 3), 128, dtype=np.uint8)
    with torch.inference_mode():
        out = network(network_input(array, 64, 96))
    assert out.shape == (1, 9, 32, 48)


def test_network_input_appends_a_constant_channel_in_minus_one_to_one() -> None:
    array = np.zeros((32, 48, 3), dtype=np.uint8)
    array[..., 0] = 255
    x = network_input(array, 32, 48)
    assert x.shape == (1, 4, 32, 48)
    assert x.dtype == torch.float32
    assert torch.all(x[0, 0] == 1.0)
    assert torch.all(x[0, 1] == -1.0)
    assert torch.allclose(x[0, 3], torch.tensor(1 / 127.5 - 1.0))


def hand_made(h: int, w: int, centres: list[tuple[int, int, float, tuple[float, float, float, float]]]) -> torch.Tensor:
    """A network output: centre logits of -10 except at `centres` (y, x, logit, displacement)."""
    out = torch.zeros(1, 9, h, w)
    out[0, 0] = -10.0
    for y, x, logit, displacement in centres:
        out[0, 0, y, x] = logit
        out[0, 1:5, y, x] = torch.tensor(displacement)
    return out


def test_a_centre_and_displacement_decode_to_a_segment_twice_as_far_in_input_pixels() -> None:
    out = hand_made(32, 48, [(10, 20, 5.0, (-6.0, 0.0, 6.0, 0.0))])
    lines = decode_lines(out, 0.1, 0.1)
    assert lines.tolist() == [[28.0, 20.0, 52.0, 20.0]]  # 2 * (20 - 6, 10, 20 + 6, 10)
    image = draw_lines(lines, 64, 96)
    expected = np.zeros((64, 96), dtype=np.uint8)
    expected[20, 28:53] = 255
    assert np.array_equal(image, expected)


def test_ratios_scale_the_segment_back_to_the_image() -> None:
    out = hand_made(32, 48, [(10, 20, 5.0, (0.0, -4.0, 0.0, 4.0))])  # vertical through x=20
    lines = decode_lines(out, 0.1, 0.1, h_ratio=1.5, w_ratio=0.5)
    assert lines.tolist() == [[20.0, 18.0, 20.0, 42.0]]  # x: 40 * 0.5, y: (12, 28) * 1.5


def test_thresholds_drop_weak_centres_and_short_segments() -> None:
    out = hand_made(32, 48, [(5, 5, 5.0, (-6.0, 0.0, 6.0, 0.0)), (20, 30, 0.0, (0.0, -3.0, 0.0, 3.0))])
    assert len(decode_lines(out, 0.1, 0.1)) == 2
    assert decode_lines(out, 0.6, 0.1).tolist() == [[-2.0, 10.0, 22.0, 10.0]]  # sigmoid(0) = 0.5 is dropped
    assert len(decode_lines(out, 0.999, 0.1)) == 0
    short = hand_made(32, 48, [(5, 5, 5.0, (0.0, 0.0, 0.5, 0.0))])  # 0.5 output pixels long
    assert len(decode_lines(short, 0.1, 0.1)) == 1
    assert len(decode_lines(short, 0.1, 1.0)) == 0


def test_only_local_maxima_of_the_centre_map_make_lines() -> None:
    # two neighbouring centres: the 3x3 max-pool NMS keeps the stronger one only
    out = hand_made(32, 48, [(10, 20, 5.0, (-6.0, 0.0, 6.0, 0.0)), (10, 21, 4.0, (0.0, -6.0, 0.0, 6.0))])
    assert decode_lines(out, 0.1, 0.1).tolist() == [[28.0, 20.0, 52.0, 20.0]]
    # two apart they are both maxima
    out = hand_made(32, 48, [(10, 20, 5.0, (-6.0, 0.0, 6.0, 0.0)), (10, 22, 4.0, (0.0, -6.0, 0.0, 6.0))])
    assert len(decode_lines(out, 0.1, 0.1)) == 2


def test_no_line_is_a_black_image() -> None:
    lines = decode_lines(hand_made(4, 6, []), 0.1, 0.1)  # fewer cells than the 200 candidates, too
    assert lines.shape == (0, 4)
    assert not draw_lines(lines, 8, 12).any()


class FakeNetwork(nn.Module):
    """Returns a hand-made output for whatever input size it gets, and keeps the input."""

    def __init__(self, centres: list[tuple[int, int, float, tuple[float, float, float, float]]]) -> None:
        super().__init__()
        self.centres = centres
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x)
        return hand_made(x.shape[2] // 2, x.shape[3] // 2, self.centres)


def test_run_resizes_odd_sizes_to_multiples_of_16_and_draws_at_the_image_size() -> None:
    fake = FakeNetwork([(10, 20, 5.0, (-6.0, 0.0, 6.0, 0.0))])
    out = run(fake, np.full((70, 100, 3), 200, dtype=np.uint8), "mlsd", {})
    assert fake.inputs[0].shape == (1, 4, 64, 96)
    assert out.shape == (70, 100, 3)
    assert out.dtype == np.uint8
    # (28, 20)-(52, 20) in network pixels, scaled by 100/96 and 70/64 and truncated
    expected = np.zeros((70, 100), dtype=np.uint8)
    expected[21, 29:55] = 255
    for channel in range(3):
        assert np.array_equal(out[..., channel], expected)


def test_run_on_multiples_of_16_feeds_the_image_as_it_is() -> None:
    fake = FakeNetwork([])
    array = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    out = run(fake, array, "mlsd", {})
    expected = torch.from_numpy(array.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    assert torch.equal(fake.inputs[0][0, :3], expected)
    assert not out.any()


@pytest.mark.parametrize(("args", "drawn"), [({}, True), ({"thr_v": 10}, True), ({"thr_v": 60}, False)])
def test_percentages_and_fractions_mean_the_same(args: dict[str, Any], drawn: bool) -> None:
    fake = FakeNetwork([(10, 20, 0.0, (-6.0, 0.0, 6.0, 0.0))])  # score 0.5
    out = run(fake, np.zeros((64, 96, 3), dtype=np.uint8), "mlsd", args)
    assert out.any() == drawn
    as_fraction = {key: value / 100 for key, value in args.items()}
    assert np.array_equal(run(fake, np.zeros((64, 96, 3), dtype=np.uint8), "mlsd", as_fraction), out)


@pytest.mark.parametrize("name", ["thr_v", "thr_d"])
@pytest.mark.parametrize("value", [0, -0.1, 101, 100.5, "0.1", True, None, [10]])
def test_bad_thresholds_are_invalid_input(name: str, value: Any) -> None:
    with pytest.raises(InvalidInput) as caught:
        run(FakeNetwork([]), np.zeros((32, 32, 3), dtype=np.uint8), "mlsd", {name: value})
    assert caught.value.field == f"controlnet.preprocess.args.{name}"


def test_real_network_runs_on_an_odd_size(network: MlsdNetwork) -> None:
    array = np.random.default_rng(1).integers(0, 256, (50, 75, 3), dtype=np.uint8)
    with torch.inference_mode():
        out = run(network, array, "mlsd", {})
    assert out.shape == (50, 75, 3)
    assert set(np.unique(out)) <= {0, 255}
