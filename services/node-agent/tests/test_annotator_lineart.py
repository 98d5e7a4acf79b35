"""The lineart annotators: parameter names and shapes as the published sk_model.pth,
sk_model2.pth and netG.pth hold them (from ControlNet 1.1's / controlnet_aux's network
code), netG.pth's "module." prefix, and the post-processing on hand-made network outputs:
sizes brought back to the input's, white lines on black."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from stipple_node.annotators import BY_METHOD, REGISTRY
from stipple_node.annotators.lineart import AnimeUnet, LineartGenerator, anime_to_published, load_anime

# The innermost level of the anime U-Net: outermost -> 3 halving levels -> 3 at 512 channels -> innermost.
INNERMOST = "model.model.1" + ".model.3" * 6


@pytest.fixture(scope="module")
def generator() -> LineartGenerator:
    torch.manual_seed(0)
    return LineartGenerator().eval()


@pytest.fixture(scope="module")
def unet() -> AnimeUnet:
    torch.manual_seed(0)
    return AnimeUnet().eval()


class Constant(nn.Module):
    """A stand-in network: a constant one-channel map of `shape`, recording its input."""

    def __init__(self, value: float, shape: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.value, self.shape = value, shape
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x)
        return torch.full((1, 1, *(self.shape or x.shape[2:])), self.value)


def test_records_serve_the_three_methods_with_their_files() -> None:
    assert BY_METHOD["lineart_realistic"].name == "lineart_realistic"
    assert BY_METHOD["lineart_coarse"].name == "lineart_coarse"
    assert BY_METHOD["lineart_anime"].name == "lineart_anime"
    assert REGISTRY["lineart_realistic"].weights.endswith("/sk_model.pth")
    assert REGISTRY["lineart_coarse"].weights.endswith("/sk_model2.pth")
    assert REGISTRY["lineart_anime"].weights.endswith("/netG.pth")


def test_generator_parameters_are_the_published_ones(generator: LineartGenerator) -> None:
    shapes = {key: tuple(value.shape) for key, value in generator.state_dict().items()}
    assert len(shapes) == 24  # instance norms carry nothing: 12 convolutions, weight and bias
    assert shapes["model0.1.weight"] == (64, 3, 7, 7)
    assert shapes["model1.0.weight"] == (128, 64, 3, 3)
    assert shapes["model1.3.weight"] == (256, 128, 3, 3)
    assert shapes["model2.0.conv_block.1.weight"] == (256, 256, 3, 3)
    assert shapes["model2.2.conv_block.5.bias"] == (256,)
    assert "model2.3.conv_block.1.weight" not in shapes  # Generator(3, 1, 3): three residual blocks
    assert shapes["model3.0.weight"] == (256, 128, 3, 3)  # transposed: (in, out, k, k)
    assert shapes["model3.3.weight"] == (128, 64, 3, 3)
    assert shapes["model4.1.weight"] == (1, 64, 7, 7)


def test_unet_parameters_are_the_published_ones(unet: AnimeUnet) -> None:
    shapes = {key: tuple(value.shape) for key, value in unet.state_dict().items()}
    assert len(shapes) == 32  # 8 levels, a convolution down and one up, each with a bias
    assert shapes["model.model.0.weight"] == (64, 3, 4, 4)
    assert shapes["model.model.3.weight"] == (128, 1, 4, 4)
    assert shapes["model.model.3.bias"] == (1,)
    assert shapes["model.model.1.model.1.weight"] == (128, 64, 4, 4)
    assert shapes["model.model.1.model.5.weight"] == (256, 64, 4, 4)
    assert shapes["model.model.1.model.3.model.3.model.5.bias"] == (256,)
    assert shapes[INNERMOST + ".model.1.weight"] == (512, 512, 4, 4)
    assert shapes[INNERMOST + ".model.3.weight"] == (512, 512, 4, 4)
    assert INNERMOST + ".model.3.model.1.weight" not in shapes


def test_netg_loads_with_or_without_the_dataparallel_prefix(unet: AnimeUnet, tmp_path: Path) -> None:
    published = anime_to_published(unet)
    assert all(key.startswith("module.model.") for key in published)
    for name, state in (("prefixed", published), ("plain", unet.state_dict())):
        path = tmp_path / f"{name}.pth"
        torch.save(state, path)
        torch.manual_seed(1)
        fresh = AnimeUnet()
        load_anime(fresh, path)
        for key, value in unet.state_dict().items():
            assert torch.equal(fresh.state_dict()[key], value), (name, key)


def test_lineart_inverts_the_drawing() -> None:
    array = np.full((64, 96, 3), 200, dtype=np.uint8)
    record = REGISTRY["lineart_coarse"]
    white = Constant(1.0)  # the sigmoid's "paper": no line anywhere
    out = record.run(white, array, "lineart_coarse", {})
    assert out.shape == (64, 96, 3)
    assert out.dtype == np.uint8
    assert not out.any()  # no lines: black
    network_input = white.inputs[0]
    assert network_input.shape == (1, 3, 64, 96)
    assert torch.allclose(network_input, torch.full_like(network_input, 200 / 255))
    dark = record.run(Constant(0.25), array, "lineart_coarse", {})
    assert (dark == 255 - 63).all()  # 0.25 * 255 = 63.75, truncated as the original does


def test_lineart_keeps_odd_sizes(generator: LineartGenerator) -> None:
    # two stride-2 stages round 65x97 up to 68x100; the drawing is brought back
    array = np.random.default_rng(0).integers(0, 256, (65, 97, 3), dtype=np.uint8)
    with torch.inference_mode():
        out = REGISTRY["lineart_realistic"].run(generator, array, "lineart_realistic", {})
    assert out.shape == (65, 97, 3)
    assert out.std() > 0
    assert np.array_equal(out[..., 0], out[..., 2])


def test_anime_works_at_multiples_of_256_and_inverts() -> None:
    array = np.full((200, 300, 3), 255, dtype=np.uint8)
    record = REGISTRY["lineart_anime"]
    paper = Constant(1.0)  # tanh's white: no line
    out = record.run(paper, array, "lineart_anime", {})
    assert out.shape == (200, 300, 3)
    assert out.max() <= 1  # no lines: black (the bicubic resize back leaves 254.99... here and there)
    network_input = paper.inputs[0]
    assert network_input.shape == (1, 3, 256, 512)
    assert torch.allclose(network_input, torch.ones_like(network_input))  # 255 -> 1.0
    ink = record.run(Constant(-1.0), array, "lineart_anime", {})
    assert (ink == 255).all()  # all line: white


def test_anime_network_runs_at_256(unet: AnimeUnet) -> None:
    array = np.random.default_rng(1).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    with torch.inference_mode():
        out = REGISTRY["lineart_anime"].run(unet, array, "lineart_anime", {})
    assert out.shape == (40, 70, 3)
    assert out.std() > 0
