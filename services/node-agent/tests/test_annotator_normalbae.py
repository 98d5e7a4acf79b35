"""NormalBae: the parameter names and shapes of scannet.pt (from NNET's encoder.py / decoder.py /
submodules.py around geffnet's tf_efficientnet_b5_ap, and the original's strict load of the
training checkpoint with its "module." prefix), TensorFlow "SAME" padding, the decoder's sizes,
and ControlNet's mapping from normals to RGB on hand-made network outputs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional

from stipple_node.annotators import BY_METHOD, REGISTRY
from stipple_node.annotators.normalbae import (
    MEAN,
    STD,
    NormalBaeNetwork,
    _Conv2dSame,
    load,
    norm_normalize,
    run,
    to_published,
)
from stipple_testkit import standin

E = "encoder.original_model."
# (key, shape) of the published file, after the "module." prefix
PUBLISHED_KEYS = {
    E + "conv_stem.weight": (48, 3, 3, 3),  # 32 x 1.6; the encoder's convolutions have no bias
    E + "bn1.running_var": (48,),
    E + "blocks.0.0.conv_dw.weight": (48, 1, 3, 3),  # stage 0: depthwise-separable, no expansion
    E + "blocks.0.0.se.conv_reduce.weight": (12, 48, 1, 1),  # a quarter of the block's input
    E + "blocks.0.0.conv_pw.weight": (24, 48, 1, 1),
    E + "blocks.0.2.se.conv_expand.bias": (24,),
    E + "blocks.1.0.conv_pw.weight": (144, 24, 1, 1),  # expansion 6
    E + "blocks.1.0.conv_dw.weight": (144, 1, 3, 3),
    E + "blocks.1.0.se.conv_reduce.weight": (6, 144, 1, 1),  # 24 / 4, not 144 / 4
    E + "blocks.1.0.conv_pwl.weight": (40, 144, 1, 1),
    E + "blocks.1.4.bn3.weight": (40,),
    E + "blocks.2.0.conv_dw.weight": (240, 1, 5, 5),
    E + "blocks.3.6.se.conv_reduce.weight": (32, 768, 1, 1),
    E + "blocks.4.0.conv_dw.weight": (768, 1, 5, 5),
    E + "blocks.4.6.conv_pwl.weight": (176, 1056, 1, 1),
    E + "blocks.5.0.se.conv_reduce.weight": (44, 1056, 1, 1),
    E + "blocks.5.8.conv_dw.weight": (1824, 1, 5, 5),
    E + "blocks.6.2.conv_pwl.weight": (512, 3072, 1, 1),
    E + "conv_head.weight": (2048, 512, 1, 1),
    E + "bn2.num_batches_tracked": (),  # unused by the decoder, but saved
    "decoder.conv2.weight": (2048, 2048, 1, 1),
    "decoder.conv2.bias": (2048,),
    "decoder.up1._net.0.weight": (1024, 2224, 3, 3),  # 2048 + stage 4's 176
    "decoder.up1._net.4.running_mean": (1024,),
    "decoder.up2._net.0.weight": (512, 1088, 3, 3),  # 1024 + stage 2's 64
    "decoder.up3._net.0.weight": (256, 552, 3, 3),  # 512 + stage 1's 40
    "decoder.up4._net.0.weight": (128, 280, 3, 3),  # 256 + stage 0's 24
    "decoder.up4._net.3.bias": (128,),
    "decoder.out_conv_res8.weight": (4, 512, 3, 3),
    "decoder.out_conv_res4.0.weight": (128, 516, 1),  # Conv1d: per-pixel MLPs
    "decoder.out_conv_res2.0.weight": (128, 260, 1),
    "decoder.out_conv_res1.0.weight": (128, 132, 1),
    "decoder.out_conv_res1.6.weight": (4, 128, 1),
    "decoder.out_conv_res1.6.bias": (4,),
}


@pytest.fixture(scope="module")
def network() -> NormalBaeNetwork:
    torch.manual_seed(0)
    return NormalBaeNetwork().eval()


class StandIn(standin.StandIn):
    """A stand-in network: its full-size prediction is `make(input)` (N, 4, H, W), recording its input."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        return [torch.zeros(1, 4, 1, 1), super().forward(x)]  # run reads only the last one


def constant_normal(x: float, y: float, z: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda image: torch.tensor([x, y, z, 1.0]).view(1, 4, 1, 1).expand(1, 4, *image.shape[-2:])


def test_record_serves_normal_bae_with_the_published_weights() -> None:
    assert BY_METHOD["normal_bae"] is REGISTRY["normalbae"]
    assert REGISTRY["normalbae"].methods == ("normal_bae",)
    assert REGISTRY["normalbae"].weights.endswith("lllyasviel/Annotators/resolve/main/scannet.pt")


def test_state_dict_matches_the_published_layout(network: NormalBaeNetwork) -> None:
    state = network.state_dict()
    for key, shape in PUBLISHED_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    # 39 blocks (3, 5, 5, 7, 7, 9, 3), 124 batch norms (each with 3 buffers), nothing else
    assert len(state) == 936
    assert len(list(network.buffers())) == 372
    assert sum(p.numel() for p in network.parameters()) == 72_422_336
    assert sum(value.numel() for value in state.values()) == 72_602_876
    for stage, repeats in enumerate((3, 5, 5, 7, 7, 9, 3)):
        assert f"{E}blocks.{stage}.{repeats - 1}.bn2.weight" in state
        assert f"{E}blocks.{stage}.{repeats}.bn2.weight" not in state
    assert E + "blocks.7.0.bn2.weight" not in state
    assert not [k for k in state if k.startswith((E + "classifier", E + "global_pool"))]  # identities in NNET
    assert not [k for k in state if k.startswith(E) and "conv" in k and k.endswith("bias") and ".se." not in k]


def test_the_training_checkpoint_loads(network: NormalBaeNetwork, tmp_path: Path) -> None:
    published = to_published(network)
    assert set(published) == {"model", "iter"}
    assert all(key.startswith(("module.encoder.", "module.decoder.")) for key in published["model"])
    torch.save(published, tmp_path / "scannet.pt")
    torch.manual_seed(1)
    fresh = NormalBaeNetwork()
    load(fresh, tmp_path / "scannet.pt")
    for key, value in network.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_keys_without_the_prefix_load_too_and_a_bare_state_dict_does_not(tmp_path: Path) -> None:
    torch.manual_seed(2)
    small = nn.Sequential(nn.Conv1d(4, 4, 1))  # the prefix handling does not depend on the network
    torch.save({"model": small.state_dict()}, tmp_path / "plain.pt")
    fresh = nn.Sequential(nn.Conv1d(4, 4, 1))
    load(fresh, tmp_path / "plain.pt")
    assert torch.equal(fresh[0].weight, small[0].weight)
    torch.save(small.state_dict(), tmp_path / "bare.pt")  # not the published checkpoint
    with pytest.raises(ValueError, match="'model'"):
        load(fresh, tmp_path / "bare.pt")


def test_convolutions_pad_as_tensorflow_same() -> None:
    torch.manual_seed(1)
    with torch.inference_mode():
        for kernel, size, (before, after) in ((3, 64, (0, 1)), (3, 65, (1, 1)), (5, 64, (1, 2)), (5, 65, (2, 2))):
            conv = _Conv2dSame(2, 3, kernel, stride=2)  # total = (ceil(n/2) - 1) * 2 + k - n, extra after
            x = torch.randn(1, 2, size, size)
            expected = functional.conv2d(functional.pad(x, (before, after, before, after)), conv.weight, stride=2)
            assert conv(x).shape == (1, 3, (size + 1) // 2, (size + 1) // 2)
            assert torch.equal(conv(x), expected), (kernel, size)
        for kernel in (1, 3, 5):
            conv = _Conv2dSame(2, 2, kernel, groups=2)
            assert conv.padding == ((kernel - 1) // 2,) * 2  # stride 1: static, symmetric
            assert conv.bias is None


def test_norm_normalize_makes_unit_normals_and_kappa() -> None:
    out = norm_normalize(torch.tensor([3.0, 0.0, 4.0, -1.0, 0.0, 0.0, 2.0, 0.5]).view(2, 4, 1, 1))
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.6, 0.0, 0.8, float(np.exp(-1.0)) - 1 + 1.01]))
    torch.testing.assert_close(out[1, :, 0, 0], torch.tensor([0.0, 0.0, 1.0, 0.5 + 1.01]))


def test_encoder_and_decoder_sizes(network: NormalBaeNetwork) -> None:
    torch.manual_seed(2)
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        features = network.encoder(x)
        outputs = network.decoder(features)
    shapes = [tuple(f.shape) for f in features]
    assert shapes == [(1, 24, 32, 48), (1, 40, 16, 24), (1, 64, 8, 12), (1, 176, 4, 6), (1, 2048, 2, 3)]
    assert [tuple(o.shape) for o in outputs] == [(1, 4, 8, 12), (1, 4, 16, 24), (1, 4, 32, 48), (1, 4, 64, 96)]
    final = outputs[-1]
    torch.testing.assert_close(final[:, :3].norm(dim=1), torch.ones(1, 64, 96))  # unit normals
    assert final[:, 3].min() > 0.01  # kappa = elu + 1.01


def test_normals_are_mapped_to_rgb_as_controlnet_does() -> None:
    array = np.full((64, 128, 3), 200, dtype=np.uint8)
    facing = StandIn(constant_normal(0.0, 0.0, 1.0))
    out = run(facing, array, "normal_bae", {})
    assert out.shape == (64, 128, 3)
    assert out.dtype == np.uint8
    assert (out == [127, 127, 255]).all()  # (n + 1) / 2 * 255, truncated: 0 -> 127, 1 -> 255
    (seen,) = facing.inputs
    assert seen.shape == (1, 3, 64, 128)  # multiples of 64 go in as they are
    for channel in range(3):
        expected = (torch.tensor(200.0) / 255.0 - MEAN[channel]) / STD[channel]
        torch.testing.assert_close(seen[0, channel], expected.expand(64, 128))
    out = run(StandIn(constant_normal(-1.0, 0.5, -0.25)), array, "normal_bae", {})
    assert (out == [0, 191, 95]).all()  # 0.75 * 255 = 191.25, 0.375 * 255 = 95.6
    out = run(StandIn(constant_normal(-1.5, 1.5, 0.0)), array, "normal_bae", {})
    assert (out == [0, 255, 127]).all()  # clipped to 0..1


def test_other_sizes_are_edge_padded_to_64_and_cropped_back() -> None:
    def ramp(x: torch.Tensor) -> torch.Tensor:  # the normal's x: -1 .. 1 across the padded width
        width = x.shape[-1]
        across = torch.linspace(-1.0, 1.0, width).expand(1, 1, x.shape[-2], width)
        return torch.cat([across, torch.zeros_like(across), torch.ones_like(across), torch.ones_like(across)], 1)

    stand_in = StandIn(ramp)
    array = np.zeros((40, 70, 3), dtype=np.uint8)
    array[:, :, 0] = np.arange(70, dtype=np.uint8)[None, :] * 3
    out = run(stand_in, array, "normal_bae", {})
    assert out.shape == (40, 70, 3)
    (seen,) = stand_in.inputs
    assert seen.shape == (1, 3, 64, 128)
    red = seen[0, 0]
    assert torch.equal(red[:, 70:], red[:, 69:70].expand(-1, 58))  # edge padding on the right
    assert torch.equal(red[40:], red[39:40].expand(24, -1))  # and at the bottom
    expected = ((np.linspace(-1.0, 1.0, 128, dtype=np.float32)[:70] + 1) * 0.5 * 255.0).astype(np.uint8)
    assert np.array_equal(out[0, :, 0], expected)  # the crop of the padded map


def test_random_network_gives_a_deterministic_normal_map(network: NormalBaeNetwork) -> None:
    array = np.random.default_rng(1).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    with torch.inference_mode():
        out = run(network, array, "normal_bae", {})
        again = run(network, array, "normal_bae", {})
    assert out.shape == (40, 70, 3)
    assert out.dtype == np.uint8
    assert out.std() > 0
    assert np.array_equal(out, again)
