"""The DWPose annotator: its records, the detector's letterbox and decoding (grids, person
scores, suppression), the person crops, SimCC decoding back to the picture, the mapping to
OpenPose's keypoints and the drawing, on hand-made network outputs; and the whole method
through `Annotators` with hand-built TorchScript networks of the published signatures,
saved and loaded as the published files are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from stipple_node.annotators import BY_METHOD, REGISTRY, Annotators, PreprocessorUnavailable
from stipple_node.annotators import dwpose as dw
from stipple_node.annotators import openpose as op


def test_the_records_serve_dwpose_with_the_published_torchscript_files() -> None:
    pose, detector = REGISTRY["dwpose"], REGISTRY["dwpose_detector"]
    assert BY_METHOD["dwpose"] is pose
    assert pose.methods == ("dwpose",)
    assert detector.methods == ()  # loaded only for dwpose, through `uses`
    assert pose.uses == {"dwpose": ("dwpose_detector",)}
    assert (
        pose.weights
        == "https://huggingface.co/hr16/DWPose-TorchScript-BatchSize5/resolve/main/dw-ll_ucoco_384_bs5.torchscript.pt"
    )
    assert detector.weights == "https://huggingface.co/hr16/yolox-onnx/resolve/main/yolox_l.torchscript.pt"
    assert pose.load is detector.load is dw.load_scripted
    assert pose.save is detector.save is dw.save_scripted


@pytest.mark.parametrize("name", ["dwpose", "dwpose_detector"])
def test_built_networks_have_the_published_signatures_and_round_trip(name: str, tmp_path: Path) -> None:
    record = REGISTRY[name]
    torch.manual_seed(0)
    network = record.build().eval()
    path = tmp_path / f"{name}.pt"
    record.save(record.to_published(network), path)
    torch.manual_seed(1)
    fresh = record.build()
    record.load(fresh, path)
    assert isinstance(fresh.module, torch.jit.ScriptModule)
    shape = (1, 3, 640, 640) if name == "dwpose_detector" else (5, 3, 384, 288)
    x = torch.rand(shape) * 255
    with torch.inference_mode():
        mine, theirs = network(x), fresh(x)
    if name == "dwpose_detector":
        assert mine.shape == (1, 8400, 85)
        assert torch.equal(mine, theirs)
        assert float(mine[..., 4:].min()) >= 0  # scores after a sigmoid
        assert float(mine[..., 4:].max()) <= 1
    else:
        assert [tuple(t.shape) for t in mine] == [(5, 133, 576), (5, 133, 768)]
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))


def test_without_a_store_the_detector_names_itself() -> None:
    with pytest.raises(PreprocessorUnavailable, match="dwpose_detector needs annotator weights"):
        Annotators(None).network("dwpose_detector")  # a record serving no method of its own


def test_a_torch_state_dict_is_not_a_torchscript_file(tmp_path: Path) -> None:
    path = tmp_path / "state.pth"
    torch.save({"not": torch.zeros(1)}, path)
    with pytest.raises(RuntimeError):
        dw.load_scripted(dw.build_pose(), path)


# Detection


def test_letterbox_scales_to_fit_640_at_the_top_left_of_gray() -> None:
    bgr = np.zeros((64, 96, 3), dtype=np.uint8)
    bgr[..., 0] = 200  # the first channel stays first
    square, ratio = dw.letterbox(bgr)
    assert ratio == pytest.approx(640 / 96)
    assert square.shape == (3, 640, 640)
    assert square.dtype == np.float32
    rows = int(64 * 640 / 96)  # 426
    assert np.all(square[0, :rows] == 200)
    assert np.all(square[1:, :rows] == 0)
    assert np.all(square[:, rows:] == 114)


def test_anchors_run_over_the_three_grids_rows_first() -> None:
    cells, strides = dw._grids()
    assert len(cells) == dw.ANCHORS == 80 * 80 + 40 * 40 + 20 * 20
    assert tuple(cells[1]) == (1, 0)
    assert tuple(cells[80]) == (0, 1)
    assert tuple(cells[6400]) == (0, 0)
    assert strides[6399, 0] == 8
    assert strides[6400, 0] == 16
    assert tuple(cells[-1]) == (19, 19)
    assert strides[-1, 0] == 32


def _anchor(output: np.ndarray, stride: int, cell: tuple[int, int], box: tuple[float, float, float, float]) -> int:
    """Writes the offsets of `box` (center x, y, width, height in the 640 square) at the
    anchor of `cell` on the `stride` grid; returns the anchor's index."""
    start = sum((640 // s) ** 2 for s in dw.STRIDES if s < stride)
    index = start + cell[1] * (640 // stride) + cell[0]
    cx, cy, w, h = box
    output[index, :4] = (cx / stride - cell[0], cy / stride - cell[1], np.log(w / stride), np.log(h / stride))
    return index


def test_people_are_decoded_scored_suppressed_and_kept_above_0_3() -> None:
    output = np.zeros((dw.ANCHORS, 85))
    ratio = 2.0
    # the best person: (84, 162) 64 x 128 in the square, scored 0.9 x 0.9
    best = _anchor(output, 8, (10, 20), (84, 162, 64, 128))
    output[best, 4], output[best, 5] = 0.9, 0.9
    # the same person a little lower, scored 0.5: suppressed
    same = _anchor(output, 8, (10, 21), (84, 166, 64, 128))
    output[same, 4], output[same, 5] = 1.0, 0.5
    # a car over the best person, scored higher: suppression is per class, and cars are dropped
    car = _anchor(output, 8, (11, 20), (86, 162, 64, 128))
    output[car, 4], output[car, 5 + 2] = 1.0, 1.0
    # elsewhere: a person scored 0.4 (kept, second) and one scored 0.2 (a candidate, dropped)
    other = _anchor(output, 32, (15, 15), (490, 490, 100, 200))
    output[other, 4], output[other, 5] = 0.8, 0.5
    weak = _anchor(output, 16, (5, 35), (90, 570, 40, 60))
    output[weak, 4], output[weak, 5] = 1.0, 0.2
    boxes = dw.people(output, ratio)
    assert boxes.shape == (2, 4)
    assert np.allclose(boxes[0], np.array([84 - 32, 162 - 64, 84 + 32, 162 + 64]) / ratio)
    assert np.allclose(boxes[1], np.array([490 - 50, 490 - 100, 490 + 50, 490 + 100]) / ratio)
    # nothing scored: nobody
    assert dw.people(np.zeros((dw.ANCHORS, 85)), ratio).shape == (0, 4)


def test_nms_keeps_the_best_and_drops_boxes_overlapping_past_the_threshold() -> None:
    boxes = np.array([[0, 0, 9, 9], [0, 0, 9, 9], [20, 20, 29, 29], [0, 5, 9, 14]], dtype=np.float64)
    scores = np.array([0.5, 0.9, 0.7, 0.6])
    # (+1 pixel sides) box 3 overlaps box 1 by 50 of 150: IoU 1/3
    assert dw.nms(boxes, scores, 0.45) == [1, 2, 3]
    assert dw.nms(boxes, scores, 1 / 3) == [1, 2, 3]  # at the threshold: kept
    assert dw.nms(boxes, scores, 0.3) == [1, 2]


# Pose crops and SimCC


def test_crop_boxes_are_padded_by_a_quarter_then_brought_to_3_by_4() -> None:
    center, size = dw.crop_box(np.array([10.0, 20.0, 50.0, 140.0]))  # tall: the width grows
    assert tuple(center) == (30, 80)
    assert tuple(size) == pytest.approx((150 * 0.75, 150))
    center, size = dw.crop_box(np.array([0.0, 0.0, 200.0, 100.0]))  # wide: the height grows
    assert tuple(center) == (100, 50)
    assert tuple(size) == pytest.approx((250, 250 / 0.75))


def test_the_warp_maps_the_crop_to_the_input_without_rotation() -> None:
    matrix = dw.warp_matrix(np.array([30.0, 80.0]), np.array([112.5, 150.0]))
    scale = 288 / 112.5
    assert np.allclose(matrix, [[scale, 0, 144 - 30 * scale], [0, scale, 192 - 80 * scale]], atol=1e-4)


def test_a_pose_input_is_the_crop_normalized_black_outside_the_picture() -> None:
    rgb = np.full((64, 96, 3), 255, dtype=np.uint8)
    center, size = dw.crop_box(np.array([0.0, 0.0, 96.0, 64.0]))  # the whole picture: 120 x 160
    crop = dw.pose_input(rgb, center, size)
    assert crop.shape == (384, 288, 3)
    white, black = (255 - dw.MEAN) / dw.STD, -dw.MEAN / dw.STD
    # the picture spans 96 * 288 / 120 = 230.4 columns around the middle, 153.6 rows
    assert np.allclose(crop[192, 40:248], white)
    assert np.allclose(crop[192, :25], black)
    assert np.allclose(crop[:100, 144], black)
    assert np.allclose(crop[130:250, 144], white)


def test_simcc_decoding_takes_the_first_maxima_and_the_lower_score() -> None:
    simcc_x = np.zeros((1, 133, 576), dtype=np.float32)
    simcc_y = np.zeros((1, 133, 768), dtype=np.float32)
    simcc_x[0, 0, 100], simcc_y[0, 0, 300] = 0.9, 0.6
    simcc_x[0, 1, [10, 20]] = 0.8  # a tie: the first
    simcc_y[0, 1, 5] = 0.95
    simcc_x[0, 2, 7], simcc_y[0, 2, 9] = 0.5, -0.1  # a score of 0 or less: no location
    locations, scores = dw.decode_simcc(simcc_x, simcc_y)
    assert locations.shape == (1, 133, 2)
    assert tuple(locations[0, 0]) == (50, 150)  # two bins per pixel
    assert scores[0, 0] == pytest.approx(0.6)
    assert tuple(locations[0, 1]) == (5, 2.5)
    assert scores[0, 1] == pytest.approx(0.8)
    assert tuple(locations[0, 2]) == (-0.5, -0.5)
    assert tuple(locations[0, 3]) == (-0.5, -0.5)  # all zeros


def test_keypoints_come_back_to_where_they_are_in_the_picture() -> None:
    center, size = dw.crop_box(np.array([60.0, 20.0, 140.0, 150.0]))
    for point in ((100.0, 85.0), (70.0, 125.0), (131.3, 33.7)):
        bins = (np.array(point) - center + size / 2) / size * (288, 384) * 2
        simcc_x, simcc_y = np.zeros((1, 1, 576)), np.zeros((1, 1, 768))
        simcc_x[0, 0, round(bins[0])] = simcc_y[0, 0, round(bins[1])] = 1.0
        locations, _ = dw.decode_simcc(simcc_x, simcc_y)
        back = dw.to_picture(locations[0], center, size)[0]
        assert np.allclose(back, point, atol=size[0] / 288 / 4 + 1e-9)  # within a quarter of a pixel of the input


# The mapping to OpenPose and the drawing


def test_the_neck_is_inserted_and_the_body_put_in_openpose_order() -> None:
    keypoints = np.stack([np.arange(133.0), 1000 + np.arange(133.0)], -1)[None]
    scores = np.full((1, 133), 0.9)
    scores[0, 5] = 0.3  # left shoulder at the threshold: the neck is not there
    mapped, mapped_scores = dw.to_openpose(keypoints, scores)
    assert mapped.shape == (1, 134, 2)
    assert tuple(mapped[0, 1]) == (5.5, 1005.5)  # the neck between the shoulders
    assert mapped_scores[0, 1] == 0
    # OpenPose's nose, right shoulder, elbow, wrist, left shoulder, ..., eyes, ears
    expected = [0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3]
    for i, coco in enumerate(expected):
        if coco is not None:
            assert mapped[0, i, 0] == coco
    assert mapped_scores[0, 5] == 0.3
    # past the body, every point moves one place: feet, face, left hand, right hand
    assert np.array_equal(mapped[0, 18:, 0], np.arange(17.0, 133.0))
    scores[0, 5] = 0.31
    assert dw.to_openpose(keypoints, scores)[1][0, 1] == 1


def _openpose_person() -> tuple[np.ndarray, np.ndarray]:
    """134 OpenPose-ordered keypoints (pixels of a 160 x 200 picture) and their scores: a
    neck, a right arm, a left shoulder and a nose, one hand's first two points, a face point."""
    keypoints, scores = np.zeros((1, 134, 2)), np.zeros((1, 134))
    for index, point in {0: (100, 35), 1: (100, 60), 2: (80, 60), 3: (75, 95), 4: (70, 125), 5: (120, 60)}.items():
        keypoints[0, index], scores[0, index] = point, 0.9
    keypoints[0, 92], scores[0, 92] = (130, 130), 0.3  # the left hand's wrist, at the threshold: drawn
    keypoints[0, 93], scores[0, 93] = (150, 130), 0.9
    keypoints[0, 94], scores[0, 94] = (170, 130), 0.29  # under it: not drawn
    keypoints[0, 50], scores[0, 50] = (95, 45), 0.9  # a face landmark
    return keypoints, scores


def test_people_are_drawn_as_openpose_draws_them() -> None:
    keypoints, scores = _openpose_person()
    out = dw.draw(keypoints, scores, 160, 200)
    assert out.shape == (160, 200, 3)
    assert out.dtype == np.uint8
    # the same drawing as OpenPose's for the same body, hand and face
    candidate = keypoints[0, :18] / (200, 160)
    subset = np.where(scores[0, :18] > 0.3, np.arange(18), -1)[None].astype(np.float64)
    hand = np.where((scores[0, 92:113] < 0.3)[:, None], -1.0, keypoints[0, 92:113] / (200, 160))
    face = np.where((scores[0, 24:92] < 0.3)[:, None], -1.0, keypoints[0, 24:92] / (200, 160))
    empty = np.full((21, 2), -1.0)
    assert np.array_equal(out, op.draw_pose(160, 200, (candidate, subset), [hand, empty], [face]))
    # and what that is: keypoints in their colours, limbs dimmed, the hand's edge and dots
    for index, color in enumerate(op.COLORS[:6]):
        x, y = keypoints[0, index].astype(int)
        assert tuple(out[y, x]) == color
    assert tuple(out[78, 77]) == tuple(int(c * 0.6) for c in op.COLORS[2])  # shoulder to elbow
    assert tuple(out[130, 130]) == op.HAND_POINT_COLOR
    assert tuple(out[130, 140]) == (255, 0, 0)  # the hand's first edge, hue 0
    assert not out[125:136, 160:180].any()  # the point under 0.3 and its edge
    assert tuple(out[45, 95]) == op.FACE_POINT_COLOR
    assert not out[:, :60].any()


def test_a_body_point_at_0_3_is_not_drawn() -> None:
    keypoints, scores = _openpose_person()
    scores[0, 5] = 0.3
    out = dw.draw(keypoints, scores, 160, 200)
    assert not out[55:66, 115:126].any()  # the left shoulder, and no limb to it


# The whole method


class _Recorder(nn.Module):
    """Stands for the pose network: keeps its batches, answers SimCC peaks from `peaks`
    (keypoint -> input pixels), the same for every crop."""

    def __init__(self, peaks: dict[int, tuple[float, float]] | None = None) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []
        self.simcc_x, self.simcc_y = torch.zeros(133, 576), torch.zeros(133, 768)
        for k, (x, y) in (peaks or {}).items():
            self.simcc_x[k, int(x * 2)] = self.simcc_y[k, int(y * 2)] = 1.0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen.append(x.clone())
        n = x.shape[0]
        return self.simcc_x.expand(n, -1, -1), self.simcc_y.expand(n, -1, -1)


class _Detector(nn.Module):
    """Stands for the detector: keeps its input, answers the output it was given."""

    def __init__(self, output: np.ndarray) -> None:
        super().__init__()
        self.output = torch.from_numpy(output).float()[None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x.clone()
        return self.output


def test_people_are_run_five_crops_a_batch() -> None:
    recorder = _Recorder({0: (10, 20)})
    inputs = [np.full((384, 288, 3), i, dtype=np.float64) for i in range(1, 8)]
    simcc_x, simcc_y = dw.run_pose(recorder, inputs)
    assert [tuple(x.shape) for x in recorder.seen] == [(5, 3, 384, 288)] * 2
    assert all(float(recorder.seen[0][i, 0, 0, 0]) == i + 1 for i in range(5))
    assert not recorder.seen[1][2:].any()  # seven crops: the second batch padded with three zero crops
    assert simcc_x.shape == (7, 133, 576)
    assert simcc_y.shape == (7, 133, 768)


def test_the_detector_reads_bgr_and_the_pose_network_rgb_and_nobody_is_the_whole_picture() -> None:
    rgb = np.zeros((64, 96, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # red
    detector, pose = _Detector(np.zeros((dw.ANCHORS, 85))), _Recorder()
    out = dw.detect(rgb, detector, pose)
    assert out.shape == (64, 96, 3)
    assert out.dtype == np.uint8
    assert not out.any()  # scores of 0 everywhere: nothing drawn
    assert detector.seen.shape == (1, 3, 640, 640)
    assert float(detector.seen[0, 2, 0, 0]) == 255  # BGR: red last
    assert float(detector.seen[0, 0, 0, 0]) == 0
    # no person found: one crop, of the whole picture (120 x 160 around its center)
    (crop,) = pose.seen[0][:1]
    assert len(pose.seen) == 1
    assert float(crop[0, 192, 144]) == pytest.approx((255 - 123.675) / 58.395)  # RGB: red first
    assert float(crop[1, 192, 144]) == pytest.approx(-116.28 / 57.12)
    assert float(crop[0, 192, 5]) == pytest.approx(-123.675 / 58.395)  # black outside the picture
    assert not pose.seen[0][1:].any()


# A person in a 160 x 200 picture: the box the detector answers and the COCO-WholeBody
# keypoints the pose network answers (picture pixels), drawn as OpenPose keypoints.
BOX = (60.0, 20.0, 140.0, 150.0)
COCO = {0: (100, 35), 6: (80, 60), 8: (75, 95), 10: (70, 125), 5: (120, 60), 40: (95, 45), 91: (130, 130)}
COCO[92] = (150, 130)  # the left hand's wrist (91) and first point; 40 is a face landmark


class _ScriptedDetector(nn.Module):
    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("output", output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output.expand(x.shape[0], -1, -1)


class _ScriptedPose(nn.Module):
    def __init__(self, simcc_x: torch.Tensor, simcc_y: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("simcc_x", simcc_x)
        self.register_buffer("simcc_y", simcc_y)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        return self.simcc_x.expand(n, -1, -1), self.simcc_y.expand(n, -1, -1)


@pytest.fixture
def published(tmp_path: Path) -> dict[str, str]:
    """Hand-built TorchScript networks of the published signatures, written as the records
    write them: the detector finds BOX (ratio 3.2: in the square, center (320, 272), 256 x
    416, on the stride-32 grid), the pose network answers COCO in the crop of BOX."""
    output = np.zeros((dw.ANCHORS, 85), dtype=np.float32)
    index = _anchor(output, 32, (10, 8), (320, 272, 256, 416))
    output[index, 4], output[index, 5] = 1.0, 1.0
    center, size = dw.crop_box(np.array(BOX))
    simcc_x, simcc_y = torch.zeros(133, 576), torch.zeros(133, 768)
    for k, point in COCO.items():
        x, y = (np.array(point) - center + size / 2) / size * (288, 384) * 2
        simcc_x[k, round(x)] = simcc_y[k, round(y)] = 1.0
    paths = {}
    for name, module in (
        ("dwpose_detector", _ScriptedDetector(torch.from_numpy(output)[None])),
        ("dwpose", _ScriptedPose(simcc_x[None], simcc_y[None])),
    ):
        paths[name] = str(tmp_path / f"{name}.pt")
        REGISTRY[name].save(dw.scripted(dw.ScriptedNetwork(module)), Path(paths[name]))
    return paths


def test_dwpose_runs_the_published_files_end_to_end(published: dict[str, str]) -> None:
    boxes = dw.detect_people(_loaded("dwpose_detector", published), np.zeros((160, 200, 3), dtype=np.uint8))
    assert np.allclose(boxes, [BOX], atol=1e-3)
    annotators = Annotators(Path, published)
    picture = np.random.default_rng(0).integers(0, 256, (160, 200, 3), dtype=np.uint8)
    out = annotators.apply("dwpose", picture, {})
    assert out.shape == (160, 200, 3)
    assert out.dtype == np.uint8
    # OpenPose's colours at the keypoints: nose, neck (between the shoulders), right arm, left shoulder
    drawn = {0: (100, 35), 1: (100, 60), 2: (80, 60), 3: (75, 95), 4: (70, 125), 5: (120, 60)}
    for openpose, point in drawn.items():
        assert tuple(out[point[1], point[0]]) == op.COLORS[openpose]
    assert tuple(out[130, 130]) == op.HAND_POINT_COLOR  # the left hand's wrist and first edge
    assert tuple(out[130, 150]) == op.HAND_POINT_COLOR
    assert tuple(out[130, 140]) == (255, 0, 0)
    assert tuple(out[45, 95]) == op.FACE_POINT_COLOR
    assert not out[:, :55].any()
    assert not out[140:].any()
    assert np.array_equal(out, annotators.apply("dwpose", picture, {}))


def _loaded(name: str, published: dict[str, str]) -> nn.Module:
    network = REGISTRY[name].build()
    REGISTRY[name].load(network, Path(published[name]))
    return network
