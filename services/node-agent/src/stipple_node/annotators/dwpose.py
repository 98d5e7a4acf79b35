"""DWPose: whole-body pose (body, feet, face, hands; 133 COCO-WholeBody keypoints) by
IDEA-Research's DWPose (Apache-2.0): a YOLOX-L person detector, then the RTMPose-l
"dw-ll_ucoco_384" pose network (SimCC heads) on each person's crop, and the keypoints
drawn as OpenPose draws them (body limbs and dots, hands, face landmarks), as
controlnet_aux's `DwposeDetector` runs it; the detection and pose pre/post-processing
follow DWPose's ONNX port (`annotator/dwpose/onnxdet.py`, `onnxpose.py`) and its
TorchScript runner (comfyui_controlnet_aux `dw_torchscript/jit_det.py`, `jit_pose.py`),
rewritten here.

The networks are not ported: both are published as TorchScript (hr16/yolox-onnx
`yolox_l.torchscript.pt`, hr16/DWPose-TorchScript-BatchSize5
`dw-ll_ucoco_384_bs5.torchscript.pt`), which carries its own graph and runs through
`torch.jit.load` with no other package. `ScriptedNetwork` holds one; `build` makes it with
a small random network of the published signature (what `to_published` writes for tests),
and `load` replaces that with the published file. The published signatures:
- detector: float32 (1, 3, 640, 640), BGR 0..255 letterboxed on gray 114 ->
  (1, 8400, 85): per anchor of the stride 8, 16 and 32 grids (80 x 80, 40 x 40, 20 x 20,
  rows first) the box offsets (x, y in cells, log w, log h), the objectness and the 80
  COCO class scores (person first), both after their sigmoid;
- pose: float32 (5, 3, 384, 288), RGB normalized with ImageNet's mean and std -> (SimCC x
  (5, 133, 576), SimCC y (5, 133, 768)), two bins per pixel; batches of five, so people
  are run five at a time and the last batch padded with zeros.

Colors: as in controlnet_aux, the detector reads the picture as BGR (YOLOX's training
order; mmdet feeds it so) and the pose network as RGB (its mmpose config converts).
Thresholds: candidates above 0.1 (objectness x person score), non-maximum suppression at
IoU 0.45, people above 0.3; no person found: the whole picture is one box (as DWPose and
mmpose's `inference_topdown` do). A body keypoint is drawn above 0.3, a hand or face
keypoint from 0.3; the neck is the shoulders' mean, there when both shoulders pass 0.3.
The control image has the picture's size (as every annotator here: no detect resolution).
Where the TorchScript runner finds nobody it draws nothing; controlnet_aux and DWPose's
own annotator estimate the whole picture, as here.

The published files cannot be downloaded here: the signatures above follow the code that
runs them (jit_det.py, jit_pose.py), and the tests run hand-built TorchScript networks of
those signatures. Float32 and float64 are kept where the original has them (the boxes are
decoded in float32, the crops computed in float64), so that the crops, keypoints and
drawings come out the same bits as the original's on the same network outputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from . import Annotator
from .openpose import draw_pose

HF = "https://huggingface.co/"
DETECTOR_WEIGHTS = HF + "hr16/yolox-onnx/resolve/main/yolox_l.torchscript.pt"
POSE_WEIGHTS = HF + "hr16/DWPose-TorchScript-BatchSize5/resolve/main/dw-ll_ucoco_384_bs5.torchscript.pt"

# The detector (YOLOX-L, COCO)
DETECTOR_SIZE = 640  # square input
DETECTOR_PAD = 114
STRIDES = (8, 16, 32)
ANCHORS = sum((DETECTOR_SIZE // s) ** 2 for s in STRIDES)  # 8400
CLASSES = 80
PERSON = 0
CANDIDATE_SCORE = 0.1  # objectness x class score, before suppression
NMS_IOU = 0.45
PERSON_SCORE = 0.3  # after suppression

# The pose network (RTMPose-l, COCO-WholeBody)
POSE_WIDTH, POSE_HEIGHT = 288, 384
POSE_BATCH = 5
BOX_PADDING = 1.25
MEAN = np.array([123.675, 116.28, 103.53])  # RGB
STD = np.array([58.395, 57.12, 57.375])
SIMCC_SPLIT = 2.0  # bins per pixel
KEYPOINTS = 133  # 17 body, 6 feet, 68 face, 21 left hand, 21 right hand
THRESHOLD = 0.3

# COCO-WholeBody -> OpenPose: after the neck is inserted at 17, OpenPose's body point i
# comes from point FROM_COCO[i] (nose, neck, right shoulder, elbow, wrist, left ..., right
# hip, knee, ankle, left ..., right eye, left eye, right ear, left ear).
FROM_COCO = (0, 17, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
NECK_FROM = (5, 6)  # COCO's left and right shoulders
BODY = slice(0, 18)
FACE = slice(24, 92)
LEFT_HAND = slice(92, 113)
RIGHT_HAND = slice(113, 134)


class ScriptedNetwork(nn.Module):
    """A network published as TorchScript, held whole in `module` (`load` replaces it)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> Any:
        return self.module(x)


class _DetectorShape(nn.Module):
    """A small random network of the published detector's signature: the picture pooled to
    each grid, a 1 x 1 convolution per stride to 85 channels, the scores through a sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.levels = nn.ModuleList(
            [nn.Sequential(nn.AvgPool2d(stride), nn.Conv2d(3, 5 + CLASSES, kernel_size=1)) for stride in STRIDES]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x / 255.0
        out = torch.cat([level(x).flatten(2).transpose(1, 2) for level in self.levels], 1)
        return torch.cat([out[..., :4], torch.sigmoid(out[..., 4:])], -1)


class _PoseShape(nn.Module):
    """A small random network of the published pose network's signature: the crop pooled to
    12 x 9, a 1 x 1 convolution to 133 maps, each map to its two SimCC vectors."""

    def __init__(self) -> None:
        super().__init__()
        self.maps = nn.Conv2d(3, KEYPOINTS, kernel_size=1)
        cells = (POSE_HEIGHT // 32) * (POSE_WIDTH // 32)
        self.x = nn.Linear(cells, int(POSE_WIDTH * SIMCC_SPLIT))
        self.y = nn.Linear(cells, int(POSE_HEIGHT * SIMCC_SPLIT))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.maps(nn.functional.avg_pool2d(x, 32)).flatten(2)
        return self.x(maps), self.y(maps)


def build_detector() -> nn.Module:
    return ScriptedNetwork(_DetectorShape())


def build_pose() -> nn.Module:
    return ScriptedNetwork(_PoseShape())


def load_scripted(network: nn.Module, path: Path) -> None:
    """The published TorchScript file -> the network (on the CPU, as every annotator)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated, still loads
        network.module = torch.jit.load(str(path), map_location="cpu")


def scripted(network: nn.Module) -> torch.jit.ScriptModule:
    """The inverse of `load_scripted`: the network as a TorchScript module (tests write it)."""
    module = network.module
    if isinstance(module, torch.jit.ScriptModule):
        return module
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(module)


def save_scripted(module: torch.jit.ScriptModule, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(module, str(path))


def _input_of(network: nn.Module, array: np.ndarray) -> torch.Tensor:
    """NCHW float array -> a tensor on the network's device, in its dtype (float32 if none)."""
    parameter = next(network.parameters(), None)
    device, dtype = (parameter.device, parameter.dtype) if parameter is not None else ("cpu", torch.float32)
    return torch.from_numpy(np.ascontiguousarray(array)).to(device, dtype)


# Detection


def letterbox(bgr: np.ndarray) -> tuple[np.ndarray, float]:
    """The picture scaled (bilinear) to fit 640 x 640, at the top left of a gray (114)
    square: (3 x 640 x 640 float32, the scale)."""
    height, width = bgr.shape[:2]
    ratio = min(DETECTOR_SIZE / height, DETECTOR_SIZE / width)
    rows, cols = max(1, int(height * ratio)), max(1, int(width * ratio))  # at least a pixel, where the original fails
    square = np.full((DETECTOR_SIZE, DETECTOR_SIZE, 3), DETECTOR_PAD, dtype=np.uint8)
    square[:rows, :cols] = cv2.resize(bgr, (cols, rows), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(square.transpose(2, 0, 1), dtype=np.float32), ratio


def _grids() -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of every anchor's cell and its stride, in the network's order."""
    cells, strides = [], []
    for stride in STRIDES:
        side = DETECTOR_SIZE // stride
        xs, ys = np.meshgrid(np.arange(side), np.arange(side))
        cells.append(np.stack((xs, ys), 2).reshape(-1, 2))
        strides.append(np.full((side * side, 1), stride))
    return np.concatenate(cells), np.concatenate(strides)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Greedy non-maximum suppression (YOLOX's numpy version: box sides count their end
    pixel, +1): the indices kept, best first; a box goes when its IoU with a kept one
    passes `iou`."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        overlap = inter / (areas[i] + areas[rest] - inter)
        order = rest[overlap <= iou]
    return keep


def people(output: np.ndarray, ratio: float) -> np.ndarray:
    """The detector's output for one picture (8400 x 85) -> the people's boxes (n x 4: left,
    top, right, bottom in the picture's pixels), best first. Suppression is per class in
    the original; only the person class is kept, so only it is computed. In float32, as
    the original decodes the network's output in place (so the crops come out the same)."""
    output = output.astype(np.float32)
    cells, strides = _grids()
    centers = ((output[:, :2] + cells) * strides).astype(np.float32)
    sizes = (np.exp(output[:, 2:4]) * strides).astype(np.float32)
    boxes = np.concatenate([centers - sizes / 2, centers + sizes / 2], 1) / np.float32(ratio)
    scores = output[:, 4] * output[:, 5 + PERSON]
    candidates = scores > CANDIDATE_SCORE
    boxes, scores = boxes[candidates], scores[candidates]
    keep = nms(boxes, scores, NMS_IOU)
    kept = np.array([k for k in keep if scores[k] > PERSON_SCORE], dtype=np.int64)
    return boxes[kept].reshape(-1, 4).astype(np.float64)  # the original's crops are computed in float64


def detect_people(detector: nn.Module, bgr: np.ndarray) -> np.ndarray:
    square, ratio = letterbox(bgr)
    output = detector(_input_of(detector, square[None]))
    return people(output.float().cpu().numpy()[0], ratio)


# Pose


def crop_box(box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A box -> the (center, size) of its crop: padded by 1.25, then widened or heightened
    to the network's 3 : 4."""
    x1, y1, x2, y2 = box
    center = np.array([x1 + x2, y1 + y2]) * 0.5
    w, h = (x2 - x1) * BOX_PADDING, (y2 - y1) * BOX_PADDING
    aspect = POSE_WIDTH / POSE_HEIGHT
    size = np.array([w, w / aspect]) if w > h * aspect else np.array([h * aspect, h])
    return center, size


def _third_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a - b turned a quarter anticlockwise about b."""
    d = a - b
    return b + np.array([-d[1], d[0]])


def warp_matrix(center: np.ndarray, size: np.ndarray) -> np.ndarray:
    """mmpose's `get_warp_matrix` without rotation: the crop's center to the input's, its
    width to the input's width, from three point pairs computed in float32 as there."""
    src = np.zeros((3, 2), dtype=np.float32)
    src[0] = center
    src[1] = center + np.array([0.0, size[0] * -0.5])
    src[2] = _third_point(src[0], src[1])
    dst = np.zeros((3, 2), dtype=np.float32)
    dst[0] = (POSE_WIDTH * 0.5, POSE_HEIGHT * 0.5)
    dst[1] = dst[0] + np.array([0.0, POSE_WIDTH * -0.5])
    dst[2] = _third_point(dst[0], dst[1])
    return cv2.getAffineTransform(src, dst)


def pose_input(rgb: np.ndarray, center: np.ndarray, size: np.ndarray) -> np.ndarray:
    """A person's crop, 384 x 288 x 3 (bilinear, black outside the picture), normalized."""
    crop = cv2.warpAffine(rgb, warp_matrix(center, size), (POSE_WIDTH, POSE_HEIGHT), flags=cv2.INTER_LINEAR)
    return (crop - MEAN) / STD


def run_pose(pose: nn.Module, inputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Crops (HxWx3) -> SimCC x (n x 133 x 576) and y (n x 133 x 768), five crops a call,
    the last call padded with zero crops."""
    batch = np.stack(inputs).transpose(0, 3, 1, 2)
    count = len(batch)
    padding = -count % POSE_BATCH
    batch = np.concatenate([batch, np.zeros((padding, *batch.shape[1:]))])
    xs, ys = [], []
    for start in range(0, len(batch), POSE_BATCH):
        simcc_x, simcc_y = pose(_input_of(pose, batch[start : start + POSE_BATCH]))
        xs.append(simcc_x.float().cpu().numpy())
        ys.append(simcc_y.float().cpu().numpy())
    return np.concatenate(xs)[:count], np.concatenate(ys)[:count]


def decode_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mmpose's `get_simcc_maximum` and split: each keypoint at the first maximum of its two
    vectors, in input pixels (bins / 2), scored by the lower of the two maxima; a keypoint
    scoring 0 or less is put at bin -1 (-0.5 pixels; it is not drawn, being under 0.3).
    -> (n x 133 x 2, n x 133)."""
    locations = np.stack((simcc_x.argmax(-1), simcc_y.argmax(-1)), -1).astype(np.float32)
    scores = np.minimum(simcc_x.max(-1), simcc_y.max(-1))
    locations[scores <= 0.0] = -1
    return locations / SIMCC_SPLIT, scores


def to_picture(locations: np.ndarray, center: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Keypoints in the network's input -> the picture's pixels."""
    return locations / np.array([POSE_WIDTH, POSE_HEIGHT]) * size + center - size / 2


def estimate(detector: nn.Module, pose: nn.Module, array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An RGB picture -> every person's 133 keypoints (n x 133 x 2, pixels) and scores."""
    height, width = array.shape[:2]
    boxes = detect_people(detector, np.ascontiguousarray(array[:, :, ::-1]))
    if len(boxes) == 0:
        boxes = np.array([[0, 0, width, height]], dtype=np.float64)
    crops = [crop_box(box) for box in boxes]
    keypoints, scores = [], []
    for start in range(0, len(crops), POSE_BATCH):  # a batch at a time: memory stays small
        batch = crops[start : start + POSE_BATCH]
        locations, batch_scores = decode_simcc(*run_pose(pose, [pose_input(array, *crop) for crop in batch]))
        keypoints += [to_picture(locations[i], *crop) for i, crop in enumerate(batch)]
        scores.append(batch_scores)
    return np.stack(keypoints), np.concatenate(scores)


def to_openpose(keypoints: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """133 COCO-WholeBody keypoints -> 134 with OpenPose's 18 body points first (a neck
    inserted at 17: the shoulders' mean, scored 1 where both pass 0.3, else 0), then the
    feet (18-23), face (24-91), left hand (92-112) and right hand (113-133)."""
    neck = keypoints[:, list(NECK_FROM)].mean(1)
    neck_score = np.logical_and(*(scores[:, k] > THRESHOLD for k in NECK_FROM)).astype(scores.dtype)
    keypoints = np.insert(keypoints, 17, neck, axis=1)
    scores = np.insert(scores, 17, neck_score, axis=1)
    order = list(FROM_COCO) + list(range(18, KEYPOINTS + 1))
    return keypoints[:, order], scores[:, order]


def draw(keypoints: np.ndarray, scores: np.ndarray, height: int, width: int) -> np.ndarray:
    """controlnet_aux's drawing of OpenPose-ordered keypoints (pixels): body points above
    0.3 as OpenPose's limbs and dots, then every left hand, every right hand, every face,
    with points under 0.3 left out."""
    points = keypoints / np.array([float(width), float(height)])
    count = len(points)
    subset = np.where(scores[:, BODY] > THRESHOLD, np.arange(count * 18).reshape(count, 18), -1)
    candidate = points[:, BODY].reshape(count * 18, 2)
    points = np.where((scores < THRESHOLD)[..., None], -1.0, points)
    hands = [points[n, LEFT_HAND] for n in range(count)] + [points[n, RIGHT_HAND] for n in range(count)]
    faces = [points[n, FACE] for n in range(count)]
    return draw_pose(height, width, (candidate, subset.astype(np.float64)), hands, faces)


def detect(array: np.ndarray, detector: nn.Module, pose: nn.Module) -> np.ndarray:
    """An RGB picture -> the DWPose control image of its size."""
    keypoints, scores = to_openpose(*estimate(detector, pose, array))
    return draw(keypoints, scores, *array.shape[:2])


def run(
    network: nn.Module, array: np.ndarray, method: str, args: Mapping[str, Any], uses: Mapping[str, nn.Module]
) -> np.ndarray:
    """The pose record ("dwpose"), with the detector."""
    return detect(array, uses["dwpose_detector"], network)


def _no_run(network: nn.Module, array: np.ndarray, method: str, args: Mapping[str, Any]) -> np.ndarray:
    raise RuntimeError("the DWPose detector serves no method of its own")


ANNOTATORS = (
    Annotator(
        name="dwpose",
        methods=("dwpose",),
        weights=POSE_WEIGHTS,
        build=build_pose,
        run=run,
        load=load_scripted,
        to_published=scripted,
        save=save_scripted,
        uses={"dwpose": ("dwpose_detector",)},
    ),
    Annotator(
        name="dwpose_detector",
        methods=(),
        weights=DETECTOR_WEIGHTS,
        build=build_detector,
        run=_no_run,
        load=load_scripted,
        to_published=scripted,
        save=save_scripted,
    ),
)
