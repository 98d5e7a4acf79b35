"""ZoeDepth (ZoeD_M12_N): the parameter names and shapes of ZoeD_M12_N.pt (from ZoeDepth's zoedepth_v1.py
and layers, MiDaS v3.1's dpt_depth.py / blocks.py / backbones around timm's beit_large_patch16_384, and the
keys the published file is known to hold, `relative_position_index` buffers included), its loader, timm's
relative position index and MiDaS's resizing of the bias tables, the input resizing, padding and flip
of ZoeDepth's `infer`, the metric-bins head on small inputs, and ControlNet's depth normalization
(percentiles, inversion) on hand-made network outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional

from stipple_node.annotators import BY_METHOD, REGISTRY, zoe
from stipple_node.annotators.zoe import ZoeNetwork, infer, load, network_size, run, to_published
from stipple_testkit.standin import StandIn

MODEL = "core.core.pretrained.model."
# (key, shape) of the published file's "model"
PUBLISHED_KEYS = {
    MODEL + "cls_token": (1, 1, 1024),
    MODEL + "patch_embed.proj.weight": (1024, 3, 16, 16),
    MODEL + "patch_embed.proj.bias": (1024,),
    MODEL + "blocks.0.gamma_1": (1024,),
    MODEL + "blocks.0.gamma_2": (1024,),
    MODEL + "blocks.0.norm1.weight": (1024,),
    MODEL + "blocks.0.attn.q_bias": (1024,),
    MODEL + "blocks.0.attn.v_bias": (1024,),
    MODEL + "blocks.0.attn.qkv.weight": (3072, 1024),
    MODEL + "blocks.0.attn.relative_position_bias_table": (2212, 16),  # 47 * 47 offsets + 3 class-token rows
    MODEL + "blocks.0.attn.relative_position_index": (577, 577),  # saved by timm 0.6
    MODEL + "blocks.23.attn.proj.weight": (1024, 1024),
    MODEL + "blocks.23.mlp.fc1.weight": (4096, 1024),
    MODEL + "blocks.23.mlp.fc2.bias": (1024,),
    MODEL + "blocks.23.norm2.bias": (1024,),
    MODEL + "fc_norm.weight": (1024,),  # the classifier, unused, but saved
    MODEL + "head.weight": (1000, 1024),
    "core.core.pretrained.act_postprocess1.0.project.0.weight": (1024, 2048),
    "core.core.pretrained.act_postprocess1.3.weight": (256, 1024, 1, 1),
    "core.core.pretrained.act_postprocess1.4.weight": (256, 256, 4, 4),
    "core.core.pretrained.act_postprocess2.3.weight": (512, 1024, 1, 1),
    "core.core.pretrained.act_postprocess2.4.weight": (512, 512, 2, 2),
    "core.core.pretrained.act_postprocess3.3.weight": (1024, 1024, 1, 1),
    "core.core.pretrained.act_postprocess4.0.project.0.bias": (1024,),
    "core.core.pretrained.act_postprocess4.4.weight": (1024, 1024, 3, 3),
    "core.core.scratch.layer1_rn.weight": (256, 256, 3, 3),
    "core.core.scratch.layer2_rn.weight": (256, 512, 3, 3),
    "core.core.scratch.layer3_rn.weight": (256, 1024, 3, 3),
    "core.core.scratch.layer4_rn.weight": (256, 1024, 3, 3),
    "core.core.scratch.refinenet4.resConfUnit1.conv1.weight": (256, 256, 3, 3),  # unused, but saved
    "core.core.scratch.refinenet1.out_conv.bias": (256,),
    "core.core.scratch.output_conv.0.weight": (128, 256, 3, 3),
    "core.core.scratch.output_conv.2.weight": (32, 128, 3, 3),
    "core.core.scratch.output_conv.4.weight": (1, 32, 1, 1),
    "conv2.weight": (256, 256, 1, 1),
    "seed_bin_regressor._net.0.weight": (256, 256, 1, 1),
    "seed_bin_regressor._net.2.weight": (64, 256, 1, 1),
    "seed_projector._net.0.weight": (128, 256, 1, 1),
    "seed_projector._net.2.bias": (128,),
    "projectors.0._net.0.weight": (128, 256, 1, 1),
    "projectors.3._net.2.weight": (128, 128, 1, 1),
    "attractors.0._net.0.weight": (128, 128, 1, 1),
    "attractors.0._net.2.weight": (16, 128, 1, 1),
    "attractors.1._net.2.weight": (8, 128, 1, 1),
    "attractors.2._net.2.bias": (4,),
    "attractors.3._net.2.weight": (1, 128, 1, 1),
    "conditional_log_binomial.mlp.0.weight": (80, 161, 1, 1),  # 32 features + relative depth + 128
    "conditional_log_binomial.mlp.2.weight": (4, 80, 1, 1),
    "conditional_log_binomial.log_binomial_transform.k_idx": (1, 64, 1, 1),
    "conditional_log_binomial.log_binomial_transform.K_minus_1": (1, 1, 1, 1),
}


@pytest.fixture(scope="module")
def network() -> ZoeNetwork:
    torch.manual_seed(0)
    return ZoeNetwork().eval()


@pytest.fixture
def small(monkeypatch: pytest.MonkeyPatch) -> None:
    """The network run at 64 x 96 (its own resize would make every input about 384 x 512)."""
    monkeypatch.setattr(zoe, "network_size", lambda height, width: (64, 96))


def test_record_serves_depth_zoe_with_the_published_weights() -> None:
    assert BY_METHOD["depth_zoe"] is REGISTRY["zoe"]
    assert REGISTRY["zoe"].methods == ("depth_zoe",)
    assert REGISTRY["zoe"].weights.endswith("lllyasviel/Annotators/resolve/main/ZoeD_M12_N.pt")


def test_state_dict_matches_the_published_layout(network: ZoeNetwork) -> None:
    state = network.state_dict()
    for key, shape in PUBLISHED_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    # Beit 24 blocks of 17 (the index buffer included) and 7, reassembly 22, decoder 50, head 48
    assert len(state) == 535
    assert sum(p.numel() for p in network.parameters()) == 344_816_746
    buffers = [k for k in state if k not in dict(network.named_parameters())]
    assert len(buffers) == 26  # 24 relative position indexes, k_idx, K_minus_1 (k_bias is not saved)
    assert state["conditional_log_binomial.log_binomial_transform.k_idx"].dtype == torch.int64
    assert state[MODEL + "blocks.0.attn.relative_position_index"].dtype == torch.int64
    assert not [k for k in state if "k_bias" in k or "pos_embed" in k or k.startswith(MODEL + "norm.")]
    assert MODEL + "blocks.24.norm1.weight" not in state
    assert "attractors.4._net.0.weight" not in state
    assert not [k for k in state if k.startswith("module.")]


def test_published_file_is_a_dict_with_the_model_state(network: ZoeNetwork) -> None:
    published = to_published(network)
    assert set(published) == {"model"}
    assert published["model"].keys() == network.state_dict().keys()


class Tiny(nn.Module):
    """A small module with the kinds of keys `load` treats specially."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(2, 2)
        self.attn.register_buffer("relative_position_index", torch.arange(4).view(2, 2))


def test_load_takes_the_published_dict_a_bare_state_and_module_prefixes(tmp_path: Path) -> None:
    torch.manual_seed(3)
    source = Tiny()
    state = source.state_dict()
    files = {
        "published": {"model": state, "optimizer": None, "epoch": 5},
        "bare": state,
        "prefixed": {"model": {"module." + k: v for k, v in state.items()}},
        # timm >= 1.0 does not save the index buffers
        "no index": {"model": {k: v for k, v in state.items() if "relative_position_index" not in k}},
    }
    for name, content in files.items():
        torch.save(content, tmp_path / "w.pt")
        target = Tiny()
        load(target, tmp_path / "w.pt")
        assert torch.equal(target.attn.weight, source.attn.weight), name
        assert torch.equal(target.attn.relative_position_index, torch.arange(4).view(2, 2)), name
    torch.save({"model": {"attn.weight": state["attn.weight"]}}, tmp_path / "w.pt")
    with pytest.raises(RuntimeError, match=r"attn\.bias"):
        load(Tiny(), tmp_path / "w.pt")


def test_relative_position_index_is_timms() -> None:
    index = zoe._relative_position_index(2, 3)
    assert index.shape == (7, 7)
    distances = 3 * 5  # (2 * 2 - 1) * (2 * 3 - 1) offsets
    assert index[0, 0] == distances + 2  # class to class
    assert index[0, 1:].eq(distances).all()  # class to token
    assert index[1:, 0].eq(distances + 1).all()  # token to class
    # token (row i, column j) to token (row k, column l): (i - k + 1) * 5 + (j - l + 2)
    tokens = [(i, j) for i in range(2) for j in range(3)]
    expected = torch.tensor([[(i - k + 1) * 5 + (j - m + 2) for k, m in tokens] for i, j in tokens])
    assert torch.equal(index[1:, 1:], expected)
    assert torch.equal(zoe._relative_position_index(24, 24), zoe._Attention().relative_position_index)


def test_relative_position_bias_is_the_table_at_its_grid_and_resized_elsewhere() -> None:
    torch.manual_seed(4)
    attention = zoe._Attention()
    with torch.no_grad():
        attention.relative_position_bias_table.normal_()
    table = attention.relative_position_bias_table.detach()
    with torch.inference_mode():
        native = attention._bias(24, 24)
        other = attention._bias(2, 3)
    expected = table[attention.relative_position_index.view(-1)].view(577, 577, 16).permute(2, 0, 1)
    torch.testing.assert_close(native[0], expected, rtol=0, atol=1e-6)  # resizing 47 x 47 to itself
    assert other.shape == (1, 16, 7, 7)
    offsets = table[: 47 * 47].reshape(1, 47, 47, 16).permute(0, 3, 1, 2)
    resized = functional.interpolate(offsets, size=(3, 5), mode="bilinear").permute(0, 2, 3, 1).reshape(15, 16)
    # the same token: offset (0, 0), the middle of the resized 3 x 5 table; class rows kept as they are
    torch.testing.assert_close(other[0, :, 1, 1], resized[7])
    torch.testing.assert_close(other[0, :, 0, 0], table[-1])
    torch.testing.assert_close(other[0, :, 0, 1], table[-3])
    torch.testing.assert_close(other[0, :, 1, 0], table[-2])


def test_network_size_is_midas_minimal_resize_to_multiples_of_32() -> None:
    assert network_size(384, 512) == (384, 512)
    assert network_size(96, 136) == (352, 512)  # the 64 x 96 test picture, padded: fit the width
    assert network_size(75, 50) == (384, 256)  # fit the height
    assert network_size(111, 80) == (384, 288)  # 80 * 384 / 111 = 276.8 -> 288
    assert network_size(1000, 500) == (1024, 512)  # the scale nearer 1 (512 / 500) wins
    assert network_size(400, 512) == (384, 512)  # 12.5 rounds to even
    assert network_size(432, 512) == (448, 512)  # 13.5 too


def test_infer_pads_by_reflection_and_averages_the_mirror_image() -> None:
    # a depth made of the red channel, returned at a smaller size: upsampled bicubically, cropped
    stand_in = StandIn(lambda x: functional.avg_pool2d(x[:, :1], 2))
    x = torch.rand(1, 3, 64, 96)
    with torch.inference_mode():
        out = infer(stand_in, x)
    assert out.shape == (1, 1, 64, 96)
    first, second = stand_in.inputs
    assert first.shape == second.shape == (1, 3, 64 + 2 * 16, 96 + 2 * 20)  # int(sqrt(side / 2) * 3)
    assert torch.equal(first[..., 16:-16, 20:-20], x)
    assert torch.equal(first[..., 16:-16, 19], x[..., 1])  # reflection, edge excluded
    assert torch.equal(first[..., 15, 20:-20], x[..., 1, :])
    assert torch.equal(second, torch.flip(first, dims=[3]))
    expected = []
    for padded in (first, second):
        up = functional.interpolate(functional.avg_pool2d(padded[:, :1], 2), size=(96, 136), mode="bicubic")
        expected.append(up[..., 16:-16, 20:-20])
    torch.testing.assert_close(out, (expected[0] + torch.flip(expected[1], dims=[3])) / 2, rtol=0, atol=0)


def test_a_pointwise_depth_comes_back_unchanged() -> None:
    x = torch.rand(1, 3, 40, 70)
    with torch.inference_mode():
        out = infer(StandIn(lambda t: t[:, :1] * 3.0), x)
    torch.testing.assert_close(out, x[:, :1] * 3.0, rtol=0, atol=0)


def test_depth_is_normalized_as_controlnet_does() -> None:
    # depth = 1 + the blue channel: a ramp across the width, 1 .. 2
    stand_in = StandIn(lambda x: 1.0 + x[:, 2:3])
    array = np.zeros((48, 100, 3), dtype=np.uint8)
    array[:, :, 2] = np.linspace(0, 255, 100).astype(np.uint8)[None, :]
    out = run(stand_in, array, "depth_zoe", {})
    assert out.shape == (48, 100, 3)
    assert out.dtype == np.uint8
    assert np.array_equal(out[..., 0], out[..., 1])
    assert np.array_equal(out[..., 0], out[..., 2])
    depth = 1.0 + array[:, :, 2].astype(np.float32) / np.float32(255.0)
    low, high = np.percentile(depth, 2), np.percentile(depth, 85)
    expected = ((1.0 - (depth - np.float32(low)) / np.float32(high - low)) * 255.0).clip(0, 255).astype(np.uint8)
    assert np.array_equal(out[..., 0], expected)
    assert out[0, 0, 0] == 255  # nearest (smallest depth, below the 2nd percentile): white
    assert (out[0, 86:, 0] == 0).all()  # beyond the 85th percentile: black
    assert (np.diff(out[0, :, 0].astype(int)) <= 0).all()  # inverted: farther is darker
    (first, _) = stand_in.inputs
    assert torch.equal(first[0, 2, 14:-14, 21:-21], torch.from_numpy(array[..., 2]).float() / 255.0)


def test_a_flat_depth_is_black() -> None:
    out = run(StandIn(lambda x: torch.ones_like(x[:, :1])), np.full((32, 32, 3), 9, np.uint8), "depth_zoe", {})
    assert out.shape == (32, 32, 3)
    assert not out.any()


def test_midas_features_and_the_metric_head(network: ZoeNetwork, small: None) -> None:
    torch.manual_seed(5)
    x = torch.rand(1, 3, 50, 70)
    with torch.inference_mode():
        maps = network.core.core.pretrained(torch.rand(1, 3, 64, 96) * 2 - 1)
        rel_depth, features = network.core.core(torch.rand(1, 3, 64, 96) * 2 - 1)
        depth = network(x)
        again = network(x)
    assert [tuple(m.shape) for m in maps] == [(1, 256, 16, 24), (1, 512, 8, 12), (1, 1024, 4, 6), (1, 1024, 2, 3)]
    assert rel_depth.shape == (1, 64, 96)
    assert rel_depth.min() >= 0  # non_negative head
    shapes = [tuple(f.shape[1:]) for f in features]  # last, bottleneck, r4, r3, r2, r1
    assert shapes == [(32, 64, 96), (256, 2, 3), (256, 4, 6), (256, 8, 12), (256, 16, 24), (256, 32, 48)]
    assert depth.shape == (1, 1, 64, 96)
    assert depth.min() > 0  # softplus bin centres, probabilities
    assert depth.std() > 0
    assert torch.equal(depth, again)


def test_attractor_moves_centres_by_the_mean_inverse_attraction() -> None:
    attractor = zoe._Attractor(2)
    points = torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)
    attractor._net = StandIn(lambda x: points)  # the points, whatever the embedding
    centres = torch.tensor([0.5, 2.0, 2.9]).view(1, 3, 1, 1)
    with torch.inference_mode():
        moved = attractor(torch.zeros(1, 128, 1, 1), centres, torch.zeros(1, 128, 1, 1))
    expected = []
    for c in (0.5, 2.0, 2.9):
        shifts = [(a - c) / (1 + 300 * (a - c) ** 2) for a in (1.0, 3.0)]
        expected.append(c + sum(shifts) / 2)
    torch.testing.assert_close(moved.flatten(), torch.tensor(expected))


def test_log_binomial_is_a_distribution_peaked_at_p_times_k() -> None:
    binomial = zoe._LogBinomial()
    p = torch.tensor([0.25, 0.75]).view(1, 2, 1)
    with torch.inference_mode():
        probabilities = binomial(p, torch.ones(1, 1, 2, 1))
    assert probabilities.shape == (1, 64, 2, 1)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(1, 2, 1))
    peaks = probabilities.argmax(dim=1).flatten().tolist()
    assert abs(peaks[0] - 0.25 * 63) <= 1
    assert abs(peaks[1] - 0.75 * 63) <= 1
