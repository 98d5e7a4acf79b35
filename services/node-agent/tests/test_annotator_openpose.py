"""The OpenPose annotators (body, hands, faces): the published key layouts, the networks'
shapes, the post-processing (peaks, limbs by part affinity fields, people, hand and face
crops, hand and face peaks, drawing) on hand-made maps and keypoints, and which networks
each method loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from stipple_node.annotators import BY_METHOD, REGISTRY, Annotators
from stipple_node.annotators import openpose as op

HEIGHT, WIDTH = 128, 160
NECK, R_SHOULDER, R_ELBOW, R_WRIST, NOSE = 1, 2, 3, 4, 0
# (x, y) of a right arm: neck -> shoulder -> elbow -> wrist
ARM = {NECK: (80, 30), R_SHOULDER: (50, 30), R_ELBOW: (45, 65), R_WRIST: (40, 95)}


@pytest.fixture(scope="module")
def network() -> nn.Module:
    torch.manual_seed(0)
    return op.BodyPoseNetwork().eval()


def test_the_records_serve_the_five_methods_with_the_published_weights() -> None:
    body, hand, face = REGISTRY["openpose_body"], REGISTRY["openpose_hand"], REGISTRY["openpose_face"]
    assert body.methods == ("openpose", "openpose_full")
    assert hand.methods == ("openpose_hand",)
    assert face.methods == ("openpose_face", "openpose_faceonly")
    assert body.weights.endswith("lllyasviel/Annotators/resolve/main/body_pose_model.pth")
    assert hand.weights.endswith("lllyasviel/Annotators/resolve/main/hand_pose_model.pth")
    assert face.weights.endswith("lllyasviel/Annotators/resolve/main/facenet.pth")
    assert set(op.PARTS) == {m for record in (body, hand, face) for m in record.methods}
    # controlnet_aux's processor: (include_body, include_hand, include_face)
    assert op.PARTS["openpose_hand"] == (False, True, False)
    assert op.PARTS["openpose_faceonly"] == (False, False, True)
    assert op.PARTS["openpose_full"] == (True, True, True)


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

    def dimmed(color: tuple[int, int, int]) -> tuple[int, ...]:
        return tuple(int(c * 0.6) for c in color)  # limbs are drawn, then the canvas dimmed to 60%

    # the middle of each limb, in the limb's color (limb i takes color i)
    for a, b in ARM_LIMBS:
        i = op.LIMBS.index((a, b))
        (xa, ya), (xb, yb) = ARM[a], ARM[b]
        assert tuple(out[(ya + yb) // 2, (xa + xb) // 2]) == dimmed(op.COLORS[i])
    assert tuple(out[30, 65]) == (153, 0, 0)  # neck to right shoulder: red
    # keypoints are dots in their own colors drawn last, over the limbs too
    assert tuple(out[27, 80]) == op.COLORS[NECK]
    for part, (x, y) in ARM.items():
        assert tuple(out[y, x]) == op.COLORS[part]
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


# Hands and faces


@pytest.fixture(scope="module")
def hand_network() -> nn.Module:
    torch.manual_seed(0)
    return op.HandPoseNetwork().eval()


def _meta(build: type[nn.Module]) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {key: tuple(value.shape) for key, value in build().state_dict().items()}


def test_hand_and_face_networks_have_the_flat_caffe_names_and_published_shapes() -> None:
    hand, face = _meta(op.HandPoseNetwork), _meta(op.FaceNetwork)
    # 52 convolutions each: 15 in the trunk, 2 in the first stage, 7 in each of stages 2-6
    assert len(hand) == len(face) == 104
    assert list(hand) == list(face)
    assert all(key.count(".") == 1 for key in hand)
    for shapes in (hand, face):
        assert shapes["conv1_1.weight"] == (64, 3, 3, 3)
        assert shapes["conv4_4.weight"] == (512, 512, 3, 3)
        assert shapes["conv5_3_CPM.weight"] == (128, 512, 3, 3)
        assert shapes["conv6_1_CPM.weight"] == (512, 128, 1, 1)
        assert shapes["Mconv2_stage4.weight"] == (128, 128, 7, 7)
        assert shapes["Mconv6_stage6.bias"] == (128,)
    # 22 hand heatmaps (21 keypoints and the background), 71 face heatmaps; each stage reads
    # the last heatmaps and the trunk's 128 channels
    assert hand["conv6_2_CPM.weight"] == (22, 512, 1, 1)
    assert hand["Mconv1_stage2.weight"] == (128, 150, 7, 7)
    assert hand["Mconv7_stage6.bias"] == (22,)
    assert face["conv6_2_CPM.weight"] == (71, 512, 1, 1)
    assert face["Mconv1_stage2.weight"] == (128, 199, 7, 7)
    assert face["Mconv7_stage6.bias"] == (71,)
    assert REGISTRY["openpose_face"].load is not op.load_hand  # facenet.pth loads strictly, as FaceNet does


def test_hand_file_loads_by_name_ignoring_other_keys(hand_network: nn.Module, tmp_path: Path) -> None:
    record = REGISTRY["openpose_hand"]
    published = dict(record.to_published(hand_network))
    assert list(published) == list(_meta(op.HandPoseNetwork))
    published["Mconv7_stage7.weight"] = torch.zeros(1)  # like `transfer`, extra keys are ignored
    path = tmp_path / "hand_pose_model.pth"
    torch.save(published, path)
    torch.manual_seed(1)
    fresh = op.HandPoseNetwork()
    assert not torch.equal(fresh.conv1_1.weight, hand_network.conv1_1.weight)
    record.load(fresh, path)
    for (key, mine), theirs in zip(fresh.state_dict().items(), hand_network.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs), key
    del published["conv5_3_CPM.bias"]
    torch.save(published, path)
    with pytest.raises(KeyError, match=r"conv5_3_CPM\.bias"):
        record.load(op.HandPoseNetwork(), path)


def test_hand_network_outputs_22_heatmaps_at_an_eighth(hand_network: nn.Module) -> None:
    with torch.inference_mode():
        out = hand_network(torch.randn(1, 3, 40, 24))
    assert out.shape == (1, 22, 5, 3)
    assert out.min() < 0  # the last layer has no ReLU


class _Maps(nn.Module):
    """Stands for a hand or face network: keeps its inputs, answers zeros at 1/8."""

    def __init__(self, maps: int) -> None:
        super().__init__()
        self.maps = maps
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return torch.zeros(1, self.maps, x.shape[2] // 8, x.shape[3] // 8)


def test_a_hand_crop_is_blurred_and_read_as_bgr_squares_of_four_sizes() -> None:
    crop = np.zeros((30, 50, 3), dtype=np.uint8)
    crop[..., 0] = 255  # the first channel (blue, in the BGR picture the networks read)
    crop[:, 25:, 1] = 255
    stub = _Maps(op.HAND_MAPS)
    with torch.inference_mode():
        maps = op.hand_maps(stub, crop)
    assert maps.shape == (128, 128, 22)
    assert maps.dtype == np.float64
    assert [tuple(x.shape) for x in stub.seen] == [(1, 3, s, s) for s in (184, 368, 552, 736)]
    first = stub.seen[0][0]
    assert torch.all(first[0] == 255 / 256 - 0.5)
    assert torch.all(first[2] == -0.5)
    # the green edge is blurred: values between its two sides
    row = first[1, 92]
    assert row[0] == -0.5
    assert row[-1] == 255 / 256 - 0.5
    assert ((row > -0.5) & (row < 255 / 256 - 0.5)).sum() > 2


def _hand_map(*blobs: tuple[int, int, float, float]) -> np.ndarray:
    """128 x 128 x 22 maps, keypoint 0 the sum of Gaussian blobs (x, y, height, sigma)."""
    yy, xx = np.mgrid[0:128, 0:128]
    maps = np.zeros((128, 128, op.HAND_MAPS))
    for x, y, height, sigma in blobs:
        maps[:, :, 0] += height * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma * sigma))
    return maps


def test_hand_peaks_are_scaled_from_128_to_the_crop_and_zero_when_missing() -> None:
    peaks = op.hand_peaks(_hand_map((40, 96, 1.0, 3.0)), 64, 256)
    assert peaks.shape == (21, 2)
    assert tuple(peaks[0]) == (int(40 * 256 / 128), int(96 * 64 / 128))
    assert not peaks[1:].any()  # nothing passes the threshold: (0, 0), not drawn


def test_of_two_hand_regions_the_larger_sum_wins_over_the_higher_peak() -> None:
    # a narrow high blob and a broad lower one far apart: two regions over the threshold
    maps = _hand_map((20, 20, 1.0, 2.0), (100, 90, 0.5, 8.0))
    assert maps[20, 20, 0] > maps[90, 100, 0]
    assert tuple(op.hand_peaks(maps, 128, 128)[0]) == (100, 90)
    # without the broad one, the high one
    assert tuple(op.hand_peaks(_hand_map((20, 20, 1.0, 2.0)), 128, 128)[0]) == (20, 20)


def test_components_are_8_connected_and_numbered_in_row_major_order() -> None:
    binary = np.zeros((6, 6), dtype=bool)
    binary[4, 1] = binary[5, 0] = True  # diagonal neighbours: one region, first seen at row 4
    binary[0, 5] = binary[1, 4] = True  # another, first seen at row 0
    labels, order = op._components(binary)
    assert len(order) == 2
    assert labels[0, 5] == labels[1, 4] == order[0]
    assert labels[4, 1] == labels[5, 0] == order[1]


def test_face_peaks_take_each_maps_first_maximum_over_the_threshold() -> None:
    maps = np.zeros((op.FACE_MAPS, 20, 30), dtype=np.float32)
    maps[0, 5, 7] = 0.9
    maps[0, 12, 3] = 0.9  # a tie: the first in row-major order
    maps[1, 2, 2] = 0.04  # under the threshold: no landmark
    maps[70, 19, 29] = 1.0  # the background map counts too, as in the original
    assert op.face_peaks(maps).tolist() == [[7, 5], [29, 19]]
    assert op.face_peaks(np.zeros((op.FACE_MAPS, 4, 4), dtype=np.float32)).shape == (0, 2)


def test_face_crops_are_resized_to_384_and_maps_brought_back_to_the_crop() -> None:
    stub = _Maps(op.FACE_MAPS)
    crop = np.full((50, 70, 3), 128, dtype=np.uint8)
    with torch.inference_mode():
        maps = op.face_maps(stub, crop)
    assert tuple(stub.seen[0].shape) == (1, 3, 384, 384)
    assert torch.all(stub.seen[0] == 0)  # 128 / 256 - 0.5
    assert maps.shape == (71, 50, 70)


def test_peaks_become_fractions_of_the_picture_with_zeros_as_minus_one() -> None:
    peaks = np.array([[0, 5], [3, 0], [7, 9]])
    out = op.to_fractions(peaks, 10, 20, 100, 50)
    assert out.dtype == np.float32
    expected = np.array([[-1 / 100, 25 / 50], [13 / 100, -1 / 50], [17 / 100, 29 / 50]], dtype=np.float32)
    assert np.array_equal(out, expected)


def _person(points: dict[int, tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """candidate (x, y, score, id) and one person's subset row from keypoints."""
    candidate = np.array([(x, y, 1.0, i) for i, (x, y) in enumerate(points.values())]).reshape(-1, 4)
    row = -1 * np.ones(op.KEYPOINTS + 2)
    for i, part in enumerate(points):
        row[part] = i
    return candidate, row[None]


def test_hand_boxes_extend_the_forearm_and_follow_the_original_sizes() -> None:
    # left arm straight down: shoulder (100, 20), elbow (100, 60), wrist (100, 100)
    left = {op.L_SHOULDER: (100, 20), op.L_ELBOW: (100, 60), op.L_WRIST: (100, 100)}
    # right arm: a short forearm, so 0.9 of the upper arm sets the size; near the left edge
    right = {op.R_SHOULDER: (30, 20), op.R_ELBOW: (10, 60), op.R_WRIST: (5, 80)}
    candidate, subset = _person({**left, **right})
    boxes = op.hand_boxes(candidate, subset, 200, 150)
    # left first: center 100 + 0.33 * 40 = 113.2 below; side 1.5 * 40 = 60
    assert boxes[0] == (70, int(113.2 - 30), 60)
    # right: side 1.5 * 0.9 * hypot(20, 40); center (5 - 0.33 * 5, 80 + 0.33 * 20), clipped at x = 0
    side = 1.5 * 0.9 * np.hypot(20, 40)
    assert boxes[1] == (0, int(80 + 0.33 * 20 - side / 2), int(side))
    # clipped by the bottom edge: the side shrinks to what is left (120 - 83.2)
    assert op.hand_boxes(candidate, subset, 200, 120)[0] == (70, 83, 36)
    # a missing elbow: no box for that hand; a box under 20 pixels: none
    no_elbow = subset.copy()
    no_elbow[0, op.L_ELBOW] = -1
    assert len(op.hand_boxes(candidate, no_elbow, 200, 150)) == 1
    tiny, tiny_subset = _person({op.L_SHOULDER: (50, 50), op.L_ELBOW: (50, 55), op.L_WRIST: (50, 60)})
    assert op.hand_boxes(tiny, tiny_subset, 200, 150) == []


def test_face_boxes_center_on_the_nose_with_the_original_clipping() -> None:
    nose = {op.NOSE: (100, 60)}
    # an eye 8 away: half side 24; an ear 20 away: 30 wins
    candidate, subset = _person({**nose, op.R_EYE: (92, 56), op.L_EAR: (120, 62)})
    assert op.face_boxes(candidate, subset, 300, 200) == [(70, 30, 60)]
    # the original clips only where the corner plus the half side (100) passes the edge:
    # then the side is what is left; otherwise the full side may run past the picture
    assert op.face_boxes(candidate, subset, 95, 200) == [(70, 30, 25)]
    assert op.face_boxes(candidate, subset, 110, 200) == [(70, 30, 60)]
    assert op.face_boxes(candidate, subset, 300, 80) == [(70, 30, 60)]
    # a nose alone, or an eye without a nose: no face
    alone, alone_subset = _person(nose)
    assert op.face_boxes(alone, alone_subset, 300, 200) == []
    no_nose = subset.copy()
    no_nose[0, op.NOSE] = -1
    assert op.face_boxes(candidate, no_nose, 300, 200) == []


def test_hand_edges_are_drawn_in_hues_and_keypoints_as_blue_dots() -> None:
    # five fingers fanning up from the wrist at (100, 150): keypoints 4k+1 .. 4k+4 on finger k
    points = [(100, 150)]
    for k in range(5):
        points += [(60 + 20 * k, 150 - 20 * j) for j in range(1, 5)]
    hand = np.array([(x / 200, y / 160) for x, y in points], dtype=np.float32)
    out = op.draw_handpose(np.zeros((160, 200, 3), dtype=np.uint8), [hand])
    # between the dots, edge i in hue i / 20 at full saturation and value, as matplotlib's
    # hsv_to_rgb computes it (h * 6 = 0.30000000000000004 for edge 1), rounded by OpenCV
    assert op.HAND_EDGE_COLORS[0] == (255.0, 0.0, 0.0)
    assert op.HAND_EDGE_COLORS[1] == (255.0, 76.50000000000001, 0.0)
    assert op.HAND_EDGE_COLORS[9] == (0.0, 255.0, 178.50000000000006)
    assert tuple(out[120, 60]) == (255, 77, 0)  # edge 1: keypoints 1 to 2
    assert tuple(out[120, 100]) == (0, 255, 179)  # edge 9: keypoints 9 to 10
    assert tuple(out[120, 140]) == (255, 0, 230)  # edge 17: hue 0.85, (1, 0, 0.9)
    for x, y in points:
        assert tuple(out[y, x]) == op.HAND_POINT_COLOR
        assert tuple(out[y + 3, x]) == op.HAND_POINT_COLOR  # radius 4
    assert not out[:, :50].any()


def test_missing_hand_keypoints_and_their_edges_are_not_drawn() -> None:
    hand = np.full((21, 2), -1 / 100, dtype=np.float32)  # all missing (-1)
    hand[0] = (50 / 100, 50 / 100)
    hand[1] = (80 / 100, 50 / 100)
    hand[2] = (0.0, 0.5)  # x = 0: missing too (drawn only above 0.01)
    out = op.draw_handpose(np.zeros((100, 100, 3), dtype=np.uint8), [hand])
    assert tuple(out[50, 65]) == (255, 0, 0)  # edge 0, hue 0
    assert not out[:, :45].any()  # nothing toward keypoint 2
    assert not out[60:].any()


def test_face_landmarks_are_white_dots_of_radius_3() -> None:
    face = np.array([[0.5, 0.5], [-0.01, 0.2], [0.2, 0.0]], dtype=np.float32)
    out = op.draw_facepose(np.zeros((100, 100, 3), dtype=np.uint8), [face])
    assert tuple(out[50, 50]) == (255, 255, 255)
    assert tuple(out[53, 50]) == (255, 255, 255)
    assert not out[54, 50].any()
    assert out.any(axis=2).sum() == out[46:55, 46:55].any(axis=2).sum()  # one dot only


# the whole pipeline on hand-made body maps, with hand and face maps made for the crops
PERSON = {
    NOSE: (100, 40), NECK: (100, 60), R_SHOULDER: (75, 60), R_ELBOW: (65, 90), R_WRIST: (60, 120),
    op.R_EYE: (95, 35), op.L_EYE: (105, 35),
}  # fmt: skip
PERSON_LIMBS = [(NECK, R_SHOULDER), (R_SHOULDER, R_ELBOW), (R_ELBOW, R_WRIST), (NECK, NOSE), (NOSE, 14), (NOSE, 15)]


@pytest.fixture
def pipeline(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[np.ndarray]]:
    """Body maps of one person with a right arm and eyes (160 x 200); every hand crop gets
    maps with its wrist (keypoint 0) at the crop's center, every face crop one landmark there."""
    height, width = 160, 200
    yy, xx = np.mgrid[0:height, 0:width]
    heatmaps, pafs = np.zeros((height, width, 19)), np.zeros((height, width, 38))
    for part, (x, y) in PERSON.items():
        heatmaps[:, :, part] = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 8.0)
    for a, b in PERSON_LIMBS:
        channels = op.PAF_CHANNELS[op.LIMBS.index((a, b))]
        (xa, ya), (xb, yb) = PERSON[a], PERSON[b]
        length = np.hypot(xb - xa, yb - ya)
        ux, uy = (xb - xa) / length, (yb - ya) / length
        along = (xx - xa) * ux + (yy - ya) * uy
        band = (along >= 0) & (along <= length) & (np.abs((xx - xa) * uy - (yy - ya) * ux) <= 3)
        pafs[:, :, channels[0]][band] = ux
        pafs[:, :, channels[1]][band] = uy
    crops: dict[str, list[np.ndarray]] = {"hand": [], "face": []}

    def hand_maps(network: nn.Module, crop: np.ndarray) -> np.ndarray:
        crops["hand"].append(crop)
        return _hand_map((64, 64, 1.0, 3.0))

    def face_maps(network: nn.Module, crop: np.ndarray) -> np.ndarray:
        crops["face"].append(crop)
        maps = np.zeros((op.FACE_MAPS, *crop.shape[:2]), dtype=np.float32)
        maps[0, crop.shape[0] // 2, crop.shape[1] // 2] = 1.0
        return maps

    monkeypatch.setattr(op, "body_maps", lambda network, bgr: (heatmaps, pafs))
    monkeypatch.setattr(op, "hand_maps", hand_maps)
    monkeypatch.setattr(op, "face_maps", face_maps)
    return crops


def _colors(out: np.ndarray) -> set[tuple[int, ...]]:
    return {tuple(c) for c in np.unique(out.reshape(-1, 3), axis=0)} - {(0, 0, 0)}


def test_each_method_draws_its_parts(pipeline: dict[str, list[np.ndarray]]) -> None:
    picture = np.zeros((160, 200, 3), dtype=np.uint8)
    picture[..., 0] = 255  # red: blue in the BGR crops
    out = {method: op.detect(picture, method, nn.Identity(), nn.Identity(), nn.Identity()) for method in op.PARTS}
    # the right hand's box: center 1/3 of the forearm past the wrist, side 1.5 x the forearm
    # (longer than 0.9 x the upper arm)
    side = 1.5 * np.hypot(5, 30)
    x, y = 60 - 0.33 * 5 - side / 2, 120 + 0.33 * 30 - side / 2
    crop = pipeline["hand"][0]
    assert crop.shape == (int(side), int(side), 3)
    assert np.all(crop[..., 0] == 0)
    assert np.all(crop[..., 2] == 255)
    assert len(pipeline["hand"]) == 2  # openpose_hand and openpose_full; one hand each
    assert len(pipeline["face"]) == 3  # openpose_face, openpose_faceonly, openpose_full
    # the hand's one keypoint at the crop's center; the face's landmark at the center of its
    # box (85, 25, 30): 3 x the eyes' distance (5) on each side of the nose
    wrist = (int(x) + int(64 * int(side) / 128), int(y) + int(64 * int(side) / 128))
    landmark = PERSON[NOSE]

    body_colors = set(op.COLORS)
    assert body_colors & _colors(out["openpose"])
    assert tuple(out["openpose_hand"][wrist[1], wrist[0]]) == op.HAND_POINT_COLOR
    assert _colors(out["openpose_hand"]) == {op.HAND_POINT_COLOR}
    assert _colors(out["openpose_faceonly"]) == {op.FACE_POINT_COLOR}
    assert tuple(out["openpose_faceonly"][landmark[1], landmark[0]]) == op.FACE_POINT_COLOR
    assert tuple(out["openpose_face"][landmark[1], landmark[0]]) == op.FACE_POINT_COLOR  # drawn over the body
    assert _colors(out["openpose_face"]) - _colors(out["openpose"]) == {op.FACE_POINT_COLOR}
    # full: the body, then the hand, then the face on top
    full = out["openpose_full"]
    assert tuple(full[wrist[1], wrist[0]]) == op.HAND_POINT_COLOR
    assert tuple(full[landmark[1], landmark[0]]) == op.FACE_POINT_COLOR
    hand = out["openpose_hand"].any(axis=2)
    assert np.array_equal(full[hand], out["openpose_hand"][hand])
    assert np.array_equal(full[~hand], out["openpose_face"][~hand])
    assert not out["openpose"][wrist[1], wrist[0]].any()


def test_a_method_without_its_network_is_an_error(pipeline: dict[str, list[np.ndarray]]) -> None:
    picture = np.zeros((160, 200, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="hand network"):
        op.detect(picture, "openpose_full", nn.Identity(), face=nn.Identity())
    with pytest.raises(ValueError, match="face network"):
        op.detect(picture, "openpose_faceonly", nn.Identity())


def test_each_method_loads_only_the_networks_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[str] = []

    def network(self: Annotators, name: str) -> str:
        loaded.append(name)
        return name

    def detect(array: np.ndarray, method: str, body: str, hand: str | None = None, face: str | None = None) -> tuple:
        return method, body, hand, face

    monkeypatch.setattr(Annotators, "network", network)
    monkeypatch.setattr(op, "detect", detect)
    annotators = Annotators(None)
    picture = np.zeros((8, 8, 3), dtype=np.uint8)
    body, hand, face = "openpose_body", "openpose_hand", "openpose_face"
    expected = {
        "openpose": (body, None, None),
        "openpose_hand": (body, hand, None),
        "openpose_face": (body, None, face),
        "openpose_faceonly": (body, None, face),
        "openpose_full": (body, hand, face),
    }
    for method, networks in expected.items():
        loaded.clear()
        assert BY_METHOD[method].name in (body, hand, face)
        assert annotators.apply(method, picture, {}) == (method, *networks)
        assert sorted(loaded) == sorted(name for name in networks if name)
