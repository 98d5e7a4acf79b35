"""MiDaS DPT-Hybrid: the parameter names and shapes of dpt_hybrid-midas-501f0c75.pt (from MiDaS's
dpt_depth.py / blocks.py / vit.py around timm's vit_base_resnet50_384, and transformers'
convert_dpt_hybrid_to_pytorch.py, which renames every key of that file), timm's "SAME" padding and
weight standardization, the decoder's sizes, and ControlNet's depth normalization on hand-made
network outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional

from stipple_node.annotators import BY_METHOD, REGISTRY
from stipple_node.annotators.midas import MidasNetwork, _MaxPool2dSame, _StdConv2dSame, run
from stipple_testkit.standin import StandIn

BACKBONE = "pretrained.model.patch_embed.backbone."
# (key, shape) of the published file
PUBLISHED_KEYS = {
    "pretrained.model.cls_token": (1, 1, 768),
    "pretrained.model.pos_embed": (1, 577, 768),  # 24 x 24 patches of 384 x 384 and the class token
    BACKBONE + "stem.conv.weight": (64, 3, 7, 7),
    BACKBONE + "stem.norm.weight": (64,),
    BACKBONE + "stages.0.blocks.0.downsample.conv.weight": (256, 64, 1, 1),
    BACKBONE + "stages.0.blocks.0.downsample.norm.bias": (256,),
    BACKBONE + "stages.0.blocks.2.conv3.weight": (256, 64, 1, 1),
    BACKBONE + "stages.1.blocks.0.conv2.weight": (128, 128, 3, 3),
    BACKBONE + "stages.1.blocks.3.norm3.weight": (512,),
    BACKBONE + "stages.2.blocks.0.downsample.conv.weight": (1024, 512, 1, 1),
    BACKBONE + "stages.2.blocks.8.conv3.weight": (1024, 256, 1, 1),
    "pretrained.model.patch_embed.proj.weight": (768, 1024, 1, 1),
    "pretrained.model.patch_embed.proj.bias": (768,),
    "pretrained.model.blocks.0.norm1.weight": (768,),
    "pretrained.model.blocks.0.attn.qkv.weight": (2304, 768),
    "pretrained.model.blocks.11.attn.qkv.bias": (2304,),
    "pretrained.model.blocks.11.attn.proj.weight": (768, 768),
    "pretrained.model.blocks.11.mlp.fc1.weight": (3072, 768),
    "pretrained.model.blocks.11.mlp.fc2.weight": (768, 3072),
    "pretrained.model.norm.bias": (768,),
    "pretrained.model.head.weight": (1000, 768),  # transformers' converter drops it: it is there
    "pretrained.act_postprocess3.0.project.0.weight": (768, 1536),
    "pretrained.act_postprocess3.3.weight": (768, 768, 1, 1),
    "pretrained.act_postprocess4.0.project.0.bias": (768,),
    "pretrained.act_postprocess4.3.weight": (768, 768, 1, 1),
    "pretrained.act_postprocess4.4.weight": (768, 768, 3, 3),
    "scratch.layer1_rn.weight": (256, 256, 3, 3),
    "scratch.layer2_rn.weight": (256, 512, 3, 3),
    "scratch.layer3_rn.weight": (256, 768, 3, 3),
    "scratch.layer4_rn.weight": (256, 768, 3, 3),
    "scratch.refinenet1.out_conv.weight": (256, 256, 1, 1),
    "scratch.refinenet4.resConfUnit1.conv1.weight": (256, 256, 3, 3),  # unused, but saved
    "scratch.refinenet4.resConfUnit2.conv2.bias": (256,),
    "scratch.output_conv.0.weight": (128, 256, 3, 3),
    "scratch.output_conv.2.weight": (32, 128, 3, 3),
    "scratch.output_conv.4.weight": (1, 32, 1, 1),
    "scratch.output_conv.4.bias": (1,),
}


@pytest.fixture(scope="module")
def network() -> MidasNetwork:
    torch.manual_seed(0)
    return MidasNetwork().eval()


def test_record_serves_depth_midas_with_the_published_weights() -> None:
    assert BY_METHOD["depth_midas"] is REGISTRY["midas"]
    assert REGISTRY["midas"].methods == ("depth_midas",)
    assert REGISTRY["midas"].weights.endswith("lllyasviel/Annotators/resolve/main/dpt_hybrid-midas-501f0c75.pt")


def test_state_dict_matches_the_published_layout(network: MidasNetwork) -> None:
    state = network.state_dict()
    for key, shape in PUBLISHED_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    # ViT 152 (12 blocks of 12), ResNet 156 (16 bottlenecks of 9, 3 downsamples of 3, stem 3),
    # reassemble 10, decoder 50: every one a parameter, no buffers
    assert len(state) == 368
    assert sum(value.numel() for value in state.values()) == 123_146_985
    assert sum(p.numel() for p in network.parameters()) == 123_146_985
    assert not [k for k in state if k.startswith(("pretrained.act_postprocess1", "pretrained.act_postprocess2"))]
    assert BACKBONE + "stages.3.blocks.0.conv1.weight" not in state  # three stages: output stride 16
    assert BACKBONE + "stages.2.blocks.9.conv1.weight" not in state
    assert "pretrained.model.blocks.12.norm1.weight" not in state
    assert not [k for k in state if k.startswith((BACKBONE + "norm", BACKBONE + "head"))]  # identities


def test_a_file_without_the_classifier_head_does_not_load(network: MidasNetwork) -> None:
    state = network.state_dict()
    del state["pretrained.model.head.weight"]
    with pytest.raises(RuntimeError, match=r"pretrained\.model\.head\.weight"):
        network.load_state_dict(state)


def test_std_conv_pads_as_tensorflow_same_and_standardizes_its_weight() -> None:
    torch.manual_seed(1)
    conv = _StdConv2dSame(3, 4, 7, stride=2)
    flat = conv.weight.reshape(4, -1)
    mean = flat.mean(dim=1, keepdim=True)
    var = flat.var(dim=1, unbiased=False, keepdim=True)
    weight = ((flat - mean) / torch.sqrt(var + 1e-8)).reshape_as(conv.weight)
    with torch.inference_mode():
        for size, (before, after) in ((64, (2, 3)), (65, (3, 3))):  # total = (ceil(n/2) - 1) * 2 + 7 - n
            x = torch.randn(1, 3, size, size)
            expected = functional.conv2d(functional.pad(x, (before, after, before, after)), weight, stride=2)
            assert conv(x).shape == (1, 4, (size + 1) // 2, (size + 1) // 2)
            torch.testing.assert_close(conv(x), expected, rtol=1e-4, atol=1e-4)
        assert _StdConv2dSame(4, 4, 3).padding == (1, 1)  # stride 1: static, symmetric


def test_same_max_pool_pads_right_and_bottom() -> None:
    x = -torch.arange(16.0).reshape(1, 1, 4, 4) - 1  # all negative: a zero pad would show up
    with torch.inference_mode():
        out = _MaxPool2dSame()(x)
    expected = functional.max_pool2d(functional.pad(x, (0, 1, 0, 1), value=-1e9), 3, 2)
    assert torch.equal(out, expected)
    assert out.max() < 0


def test_encoder_and_decoder_sizes(network: MidasNetwork) -> None:
    torch.manual_seed(2)
    x = torch.rand(1, 3, 64, 96) * 2 - 1
    with torch.inference_mode():
        layers = network.pretrained(x)
        depth = network(x)
    shapes = [tuple(layer.shape) for layer in layers]
    assert shapes == [(1, 256, 16, 24), (1, 512, 8, 12), (1, 768, 4, 6), (1, 768, 2, 3)]  # 1/4 .. 1/32
    assert depth.shape == (1, 64, 96)
    assert depth.min() >= 0  # non_negative head


def test_depth_is_normalized_as_controlnet_does() -> None:
    # a ramp across the width, offset: ControlNet shifts to 0, divides by the max, truncates * 255
    stand_in = StandIn(lambda x: 3.0 + torch.arange(x.shape[-1], dtype=torch.float32).expand(1, x.shape[-2], -1))
    array = np.zeros((64, 128, 3), dtype=np.uint8)
    array[:, :, 0] = 255
    out = run(stand_in, array, "depth_midas", {})
    assert out.shape == (64, 128, 3)
    assert out.dtype == np.uint8
    assert np.array_equal(out[..., 0], out[..., 1])
    assert np.array_equal(out[..., 0], out[..., 2])
    expected = (np.arange(128, dtype=np.float32) / np.float32(127) * 255.0).astype(np.uint8)
    assert np.array_equal(out[0, :, 0], expected)
    assert out[0, 0, 0] == 0
    assert out[0, -1, 0] == 255
    (seen,) = stand_in.inputs
    assert seen.shape == (1, 3, 64, 128)  # multiples of 64 go in as they are
    assert seen[0, 0].eq(1.0).all()  # 255 -> 1
    assert seen[0, 1].eq(-1.0).all()  # 0 -> -1


def test_other_sizes_are_edge_padded_to_64_and_cropped_back() -> None:
    stand_in = StandIn(lambda x: x[:, 0] + 1.0)  # depth = red channel, 0..2
    array = np.zeros((40, 70, 3), dtype=np.uint8)
    array[:, :, 0] = np.arange(70, dtype=np.uint8)[None, :] * 3  # 0 .. 207
    out = run(stand_in, array, "depth_midas", {})
    assert out.shape == (40, 70, 3)
    (seen,) = stand_in.inputs
    assert seen.shape == (1, 3, 64, 128)
    red = seen[0, 0]
    assert torch.equal(red[:, 70:], red[:, 69:70].expand(-1, 58))  # edge padding on the right
    assert torch.equal(red[40:], red[39:40].expand(24, -1))  # and at the bottom
    # normalized over the padded map (as controlnet_aux), whose max is the image's last column
    assert out[0, 0, 0] == 0
    assert out[0, -1, 0] == 255


def test_a_flat_depth_is_black() -> None:
    out = run(StandIn(lambda x: torch.zeros(1, *x.shape[-2:])), np.full((64, 64, 3), 9, np.uint8), "depth_midas", {})
    assert out.shape == (64, 64, 3)
    assert not out.any()
