"""The OpenPose body annotator: the published flat key layout, the network's shapes, and the
post-processing (peaks, limbs by part affinity fields, people, drawing) on hand-made maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from stipple_node.annotators import REGISTRY
from stipple_node.annotators import openpose as op

HEIGHT, WIDTH = 128, 160
NECK, R_SHOULDER, R_ELBOW, R_WRIST, NOSE = 1, 2, 3, 4, 0
# (x, y) of a right arm: neck -> shoulder -> elbow -> wrist
ARM = {NECK: (80, 30), R_SHOULDER: (50, 30), R_ELBOW: (45, 65), R_WRIST: (40, 95)}


@pytest.fixture(scope="module")
def network() -> nn.Module:
    torch.manual_seed(0)
    return op.BodyPoseNetwork().eval()


def test_the_record_serves_openpose_with_the_published_body_weights() -> None:
    record = REGISTRY["openpose_body"]
    assert record.methods == ("openpose",)
    assert record.weights.endswith("lllyasviel/Annotators/resolve/main/body_pose_model.pth")


def test_published_names_are_the_flat_caffe_layer_names(network: nn.Module) -> None:
    published = op.body_to_published(network)
    assert len(published) == 184  # 92 convolutions, a weight and a bias each
    assert all(key.count(".") == 1 for key in published)
    shapes = {key: tuple(value.shape) for key, value in published.items()}
    assert shapes["conv1_1.weight"] == (64, 3, 3, 3)
    assert shapes["conv4_4_CPM.weight"] == (128, 256, 3, 3)
    assert shapes["conv5_5_CPM_L1.weight"] == (38, 512, 1, 1)
    assert shapes["conv5_5_CPM_L2.weight"] == (19, 512, 1, 1)
    assert shapes["Mconv1_stage2_L1.weight"] == (128, 185, 7, 7)
    assert shapes["Mconv6_stage4_L2.weight"] == (128, 128, 1, 1)
    assert shapes["Mconv7_stage6_L2.bias"] == (19,)
    assert "model0.conv1_1.weight" in network.state_dict()
    assert "model6_2.Mconv7_stage6_L2.bias" in network.state_dict()


def test_load_is_the_inverse_of_to_published(network: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "body_pose_model.pth"
    published = op.body_to_published(network)
    published["some_other_layer.weight"] = torch.zeros(1)  # like `transfer`, extra keys are ignored
    torch.save(published, path)
    torch.manual_seed(1)
    fresh = op.BodyPoseNetwork()
    assert not torch.equal(fresh.model0.conv1_1.weight, network.model0.conv1_1.weight)
    op.load_body(fresh, path)
    for (key, mine), theirs in zip(fresh.state_dict().items(), network.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs), key


def test_a_file_missing_a_layer_names_it(network: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "partial.pth"
    torch.save({"conv1_1.weight": torch.zeros(64, 3, 3, 3), "conv1_1.bias": torch.zeros(64)}, path)
    with pytest.raises(KeyError, match="conv1_2.weight"):
        op.load_body(op.BodyPoseNetwork(), path)


def test_network_outputs_fields_and_heatmaps_at_an_eighth(network: nn.Module) -> None:
    with torch.inference_mode():
        pafs, heatmaps = network(torch.randn(1, 3, 64, 48))
    assert pafs.shape == (1, 38, 8, 6)
    assert heatmaps.shape == (1, 19, 8, 6)
    # as in the original, the last heatmap layer keeps its ReLU; the fields do not have one
    assert heatmaps.min() >= 0
    assert pafs.min() < 0


class _Recorder(nn.Module):
    """Stands for the network: keeps what it is given, finds nobody."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen = x.clone()
        n, _, h, w = x.shape
        return torch.zeros(n, 38, h // 8, w // 8), torch.zeros(n, 19, h // 8, w // 8)


def test_the_network_reads_bgr_at_184_rows_padded_with_gray_to_eighths() -> None:
    array = np.zeros((64, 96, 3), dtype=np.uint8)
    array[..., 2] = 255  # blue
    recorder = _Recorder()
    with torch.inference_mode():
        out = op.run(recorder, array, "openpose", {})
    seen = recorder.seen
    # 0.5 * 368 / 64 = 2.875: 184 x 276, padded on the right to 184 x 280 with 128 (0 once scaled)
    assert seen.shape == (1, 3, 184, 280)
    assert torch.all(seen[0, 0, :, :276] == 255 / 256 - 0.5)  # BGR: blue first
    assert torch.all(seen[0, 1:, :, :276] == -0.5)
    assert torch.all(seen[..., 276:] == 0)
    assert out.shape == (64, 96, 3)
    assert out.dtype == np.uint8
    assert not out.any()


def test_a_picture_with_nobody_is_all_black() -> None:
    torch.manual_seed(0)
    blind = op.BodyPoseNetwork().eval()
    last = blind.model6_2.Mconv7_stage6_L2
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    picture = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    with torch.inference_mode():
        out = op.run(blind, picture, "openpose", {})
    assert out.shape == (64, 96, 3)
    assert out.dtype == np.uint8
    assert not out.any()


def _blob(x: float, y: float, sigma: float = 2.0) -> np.ndarray:
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    return np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma * sigma))


def _maps(points: dict[int, tuple[int, int]], limbs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps with a peak of 1 at each point; each limb's field the unit vector along it,
    within 3 pixels of the segment."""
    heatmaps = np.zeros((HEIGHT, WIDTH, 19))
    pafs = np.zeros((HEIGHT, WIDTH, 38))
    for part, (x, y) in points.items():
        heatmaps[:, :, part] = _blob(x, y)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    for a, b in limbs:
        channels = op.PAF_CHANNELS[op.LIMBS.index((a, b))]
        (xa, ya), (xb, yb) = points[a], points[b]
        length = np.hypot(xb - xa, yb - ya)
        ux, uy = (xb - xa) / length, (yb - ya) / length
        along = (xx - xa) * ux + (yy - ya) * uy
        across = np.abs((xx - xa) * uy - (yy - ya) * ux)
        band = (along >= 0) & (along <= length) & (across <= 3)
        pafs[:, :, channels[0]][band] = ux
        pafs[:, :, channels[1]][band] = uy
    return heatmaps, pafs


ARM_LIMBS = [(NECK, R_SHOULDER), (R_SHOULDER, R_ELBOW), (R_ELBOW, R_WRIST)]


def test_peaks_are_the_blob_centers_with_their_heatmap_value() -> None:
    heatmaps, _ = _maps(ARM, [])
    peaks = op.find_peaks(heatmaps)
    for part in range(op.KEYPOINTS):
        if part in ARM:
            assert len(peaks[part]) == 1
            x, y, score, _ = peaks[part][0]
            assert (x, y) == ARM[part]
            assert score == pytest.approx(1.0)
        else:
            assert peaks[part] == []
    # ids count in keypoint order
    assert [peaks[p][0][3] for p in sorted(ARM)] == [0, 1, 2, 3]


def test_one_arm_makes_one_person_drawn_in_the_original_colors() -> None:
    heatmaps, pafs = _maps({**ARM, NOSE: (120, 100)}, ARM_LIMBS)  # a nose no field joins
    candidate, subset = op.estimate_poses(heatmaps, pafs)
    assert len(subset) == 1
    person = subset[0]
    assert person[-1] == 4
    assert [tuple(candidate[int(person[p]), :2]) for p in sorted(ARM)] == [ARM[p] for p in sorted(ARM)]
    assert all(person[p] == -1 for p in range(op.KEYPOINTS) if p not in ARM)
    # 4 keypoint scores of 1, 3 limbs scoring 1 each (shorter than half the height)
    assert person[-2] == pytest.approx(7.0)

    out = op.render(heatmaps, pafs)
    assert out.shape == (HEIGHT, WIDTH, 3)
    assert out.dtype == np.uint8

    def blended(color: tuple[int, int, int]) -> tuple[int, ...]:
        return tuple(round(0.6 * c) for c in color)  # a limb over black, 60%

    # the middle of each limb, in the limb's color (limb i takes color i)
    for a, b in ARM_LIMBS:
        i = op.LIMBS.index((a, b))
        (xa, ya), (xb, yb) = ARM[a], ARM[b]
        assert tuple(out[(ya + yb) // 2, (xa + xb) // 2]) == blended(op.COLORS[i])
    assert tuple(out[30, 65]) == (153, 0, 0)  # neck to right shoulder: red
    # a keypoint's dot where no limb covers it: its own color, unblended
    assert tuple(out[27, 80]) == op.COLORS[NECK]
    # nothing at the lone nose, nor far from the arm
    assert not out[95:106, 115:126].any()
    assert not out[:, 100:].any()
    drawn = out.any(axis=2)
    assert drawn[30, 50:81].all()  # the limb runs between the two keypoints...
    assert not drawn[30, 90:].any()  # ...and stops past them
    assert not drawn[30, :38].any()


def test_fewer_than_four_parts_are_nobody() -> None:
    three = {p: ARM[p] for p in (NECK, R_SHOULDER, R_ELBOW)}
    heatmaps, pafs = _maps(three, ARM_LIMBS[:2])
    _, subset = op.estimate_poses(heatmaps, pafs)
    assert len(subset) == 0
    assert not op.render(heatmaps, pafs).any()


def test_a_field_pointing_the_wrong_way_joins_nothing() -> None:
    heatmaps, pafs = _maps(ARM, ARM_LIMBS)
    _, subset = op.estimate_poses(heatmaps, -pafs)
    assert len(subset) == 0


def test_no_maps_no_drawing() -> None:
    out = op.render(np.zeros((HEIGHT, WIDTH, 19)), np.zeros((HEIGHT, WIDTH, 38)))
    assert out.shape == (HEIGHT, WIDTH, 3)
    assert not out.any()


def _scipy_gaussian_filter(x: np.ndarray, sigma: float) -> np.ndarray:
    """scipy.ndimage.gaussian_filter's definition: a normalized kernel of radius
    int(4 * sigma + 0.5), axis 0 then axis 1, mirrored borders (numpy's "symmetric")."""
    radius = int(4 * sigma + 0.5)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in (0, 1):
        padded = np.pad(x, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], mode="symmetric")
        x = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="valid"), axis, padded)
    return x


def test_blur_is_scipys_gaussian_filter_up_to_rounding() -> None:
    x = np.random.default_rng(0).random((40, 30))
    assert np.allclose(op._blur(x), _scipy_gaussian_filter(x, 3.0), rtol=0, atol=1e-12)
