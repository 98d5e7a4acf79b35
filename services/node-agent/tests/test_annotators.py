"""Every registered annotator: its network with random weights, saved in the published
layout, loads through the model store and turns a picture into a control image of the
picture's size, the same bits every time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stipple_common.errors import StippleError
from stipple_common.taskspec import ANNOTATOR_PREPROCESSORS, Preprocess
from stipple_node.annotators import BY_METHOD, REGISTRY, Annotators, PreprocessorUnavailable
from stipple_node.images import preprocess
from stipple_node.store import ModelStore


def picture(width: int = 96, height: int = 64) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[..., 0] = (x * 255 // width).astype(np.uint8)
    array[..., 1] = ((x // 16 + y // 16) % 2 * 255).astype(np.uint8)
    array[..., 2] = (((x - width / 2) ** 2 + (y - height / 2) ** 2) < (height / 3) ** 2) * 255
    return Image.fromarray(array)


# A random OpenPose network finds nobody, and a black image is then the right answer
# (test_annotator_openpose.py draws people from hand-made maps instead).
MAY_BE_BLANK = {"openpose", "openpose_hand", "openpose_face", "openpose_faceonly", "openpose_full"}


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("annotators")
    out = {}
    for name, record in REGISTRY.items():
        torch.manual_seed(0)
        path = folder / f"{name}.pth"
        record.save(record.to_published(record.build()), path)
        out[name] = str(path)
    return out


@pytest.fixture(scope="module")
def annotators(weights: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Annotators:
    with ModelStore(tmp_path_factory.mktemp("store"), budget_bytes=None) as store:
        yield Annotators(lambda ref: store.resolve(ref, kind="annotator"), weights)


def test_every_served_method_is_a_known_preprocessor() -> None:
    assert set(BY_METHOD) <= set(ANNOTATOR_PREPROCESSORS)


# ZoeDepth's BEiT-L backbone at 384x512, run twice: about 25 s alone on 2 cores, twice that
# on a loaded machine.
SLOW = {"depth_zoe": pytest.mark.timeout(180)}


@pytest.mark.parametrize("method", [pytest.param(m, marks=SLOW.get(m, ())) for m in sorted(BY_METHOD)])
def test_annotator_makes_a_control_image(annotators: Annotators, method: str) -> None:
    out = np.asarray(preprocess(picture(), Preprocess(method=method), 0, annotators))
    assert out.shape == (64, 96, 3)
    assert out.dtype == np.uint8
    if method not in MAY_BE_BLANK:
        assert out.std() > 0, "a control image of one flat colour carries nothing"
    again = np.asarray(preprocess(picture(), Preprocess(method=method), 0, annotators))
    assert np.array_equal(out, again)
    if method.startswith("scribble"):
        assert set(np.unique(out)) <= {0, 255}


def test_missing_weights_are_a_typed_error(tmp_path: Path) -> None:
    with ModelStore(tmp_path / "store", budget_bytes=None) as store:
        some = next(iter(REGISTRY))
        annotators = Annotators(lambda ref: store.resolve(ref, kind="annotator"), {some: str(tmp_path / "no.pth")})
        with pytest.raises(StippleError) as caught:
            annotators.network(some)
        assert "no.pth" in str(caught.value)


def test_weights_of_another_network_are_a_typed_error(tmp_path: Path) -> None:
    path = tmp_path / "wrong.pth"
    torch.save({"not": torch.zeros(1)}, path)
    with ModelStore(tmp_path / "store", budget_bytes=None) as store:
        for name in REGISTRY:
            annotators = Annotators(lambda ref: store.resolve(ref, kind="annotator"), {name: str(path)})
            with pytest.raises(PreprocessorUnavailable, match=f"cannot load {name} weights"):
                annotators.network(name)


def test_without_a_store_annotators_are_unavailable() -> None:
    method = next(iter(BY_METHOD))
    with pytest.raises(PreprocessorUnavailable, match="no model store"):
        preprocess(picture(), Preprocess(method=method), 0, Annotators(None))
