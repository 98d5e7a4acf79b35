"""OpenPose: the 18-keypoint body network of CMU's OpenPose (the PyTorch port by Hzzone,
pytorch-openpose), its hand (21 keypoints) and face (70 landmarks) networks run on crops
the body keypoints point at, and the post-processing and drawing, as ControlNet 1.1 runs
them (lllyasviel/ControlNet-v1-1-nightly, `annotator/openpose/{model,body,hand,face,util,
__init__}.py`, Apache-2.0; the networks and weights come from CMU's OpenPose, whose own
license is non-commercial), rewritten without scipy, scikit-image or matplotlib.

Methods, with what controlnet_aux's processor (which Crynux runs) draws for each
(include_body/hand/face): "openpose" the bodies, "openpose_hand" the hands alone (where
sd-webui-controlnet draws the bodies too), "openpose_face" bodies and faces,
"openpose_faceonly" the faces alone, "openpose_full" all three. Each needs the body
network; hands and faces need a second and third network, which the records name in
`uses`. Detection and drawing follow the nightly's last version: hands at four scales of
the blurred crop, faces at 384 x 384, and the bodies drawn as limbs, the canvas dimmed to
60%, then the keypoints (an earlier version blended each limb in turn), then all hands,
then all faces.

Weights (lllyasviel/Annotators):
- `body_pose_model.pth` is a flat state dict converted from Caffe: its keys are the layer
  names alone ("conv1_1.weight", "Mconv1_stage2_L1.weight"), while the network keeps its
  layers in named blocks ("model0.conv1_1.weight", "model2_1.Mconv1_stage2_L1.weight").
  ControlNet's `util.transfer` drops the block name; `load_body` does the same and
  `body_to_published` is its inverse.
- `hand_pose_model.pth` is flat in the same way; ControlNet's `handpose_model` keeps blocks
  (model1_0, model1_1, model2 ... model6) that `transfer` drops. `PartNetwork` keeps the
  layers under their flat names, so `load_hand` only picks them out of the file (other
  keys ignored, as `transfer` does) and the published layout is its state dict.
- `facenet.pth` is `FaceNet`'s own state dict (flat names, loaded strictly there and here).
The hand and face networks are the same network (`PartNetwork`) with 22 and 71 heatmaps.
"""

from __future__ import annotations

import colorsys
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from . import ANNOTATORS_REPO, Annotator

# (bodies, hands, faces) drawn per method, as controlnet_aux's processor sets them
PARTS = {
    "openpose": (True, False, False),
    "openpose_hand": (False, True, False),
    "openpose_face": (True, False, True),
    "openpose_faceonly": (False, False, True),
    "openpose_full": (True, True, True),
}

# ControlNet 1.1 runs one scale of the original four (0.5, 1.0, 1.5, 2.0).
SCALE = 0.5
BOX_SIZE = 368
STRIDE = 8
PAD_VALUE = 128
PEAK_THRESHOLD = 0.1  # thre1: a keypoint's smoothed heatmap value
PAF_THRESHOLD = 0.05  # thre2: a limb's field along the limb at one sample
PAF_SAMPLES = 10  # mid_num
KEYPOINTS = 18  # nose, neck, r-shoulder, r-elbow, r-wrist, l-shoulder, ..., r-ear, l-ear

# The keypoint pairs (0-based; the original's limbSeq minus one) and the two PAF channels
# of each (the original's mapIdx minus 19, its offset past the 19 heatmaps). The last two
# limbs (ear to shoulder) join people together but are not drawn.
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11),
    (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17),
)  # fmt: skip
PAF_CHANNELS = (
    (12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7),
    (8, 9), (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27),
)  # fmt: skip
DRAWN_LIMBS = 17
# RGB, one per keypoint and per limb (the limb takes the color of its index)
COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
STICK_WIDTH = 4

# Hands (the original `Hand`): four scales of a 368-pixel box, heatmaps averaged at 128 x 128.
HAND_SCALES = (0.5, 1.0, 1.5, 2.0)
HAND_BLUR = 0.8  # sigma of the Gaussian blur of the crop first
HAND_MAP_SIZE = 128
HAND_THRESHOLD = 0.05
HAND_KEYPOINTS = 21  # of the network's 22 heatmaps (the last is the background)
HAND_MAPS = 22
HAND_RATIO_WRIST_ELBOW = 0.33
MIN_BOX = 20
# wrist to thumb tip, then each finger from the wrist; edge i is drawn in hue i / 20
HAND_EDGES = (
    (0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10),
    (10, 11), (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20),
)  # fmt: skip
# matplotlib's hsv_to_rgb([i / 20, 1, 1]) * 255 there: the same arithmetic as colorsys
HAND_EDGE_COLORS = tuple(
    tuple(c * 255 for c in colorsys.hsv_to_rgb(i / float(len(HAND_EDGES)), 1.0, 1.0)) for i in range(len(HAND_EDGES))
)
HAND_POINT_COLOR = (0, 0, 255)
# Faces (the original `Face`): the crop resized to 384 x 384, heatmaps back at the crop's size.
FACE_INPUT = 384
FACE_THRESHOLD = 0.05
FACE_MAPS = 71  # 70 landmarks and the background, all of which the original draws
FACE_POINT_COLOR = (255, 255, 255)
NOSE, R_SHOULDER, R_ELBOW, R_WRIST, L_SHOULDER, L_ELBOW, L_WRIST = 0, 2, 3, 4, 5, 6, 7
R_EYE, L_EYE, R_EAR, L_EAR = 14, 15, 16, 17  # the original calls 14 and 16 "left"
EPS = 0.01  # a drawn coordinate must be above this (so at least 1: 0 and -1 mean missing)


def _blocks(layers: list[tuple[str, tuple[int, ...]]], no_relu: set[str]) -> nn.Sequential:
    """The original `make_layers`: named convolutions (in, out, kernel, stride, padding), each
    followed by a ReLU unless listed, and named max pools (kernel, stride, padding)."""
    modules: list[tuple[str, nn.Module]] = []
    for name, v in layers:
        if "pool" in name:
            modules.append((name, nn.MaxPool2d(kernel_size=v[0], stride=v[1], padding=v[2])))
            continue
        modules.append((name, nn.Conv2d(v[0], v[1], kernel_size=v[2], stride=v[3], padding=v[4])))
        if name not in no_relu:
            modules.append((f"relu_{name}", nn.ReLU(inplace=True)))
    return nn.Sequential(OrderedDict(modules))


class BodyPoseNetwork(nn.Module):
    """The original `bodypose_model`: a VGG-19 trunk, then six stages of two branches, part
    affinity fields (L1, 38 channels) and keypoint heatmaps (L2, 19 channels)."""

    def __init__(self) -> None:
        super().__init__()
        # The original lists "Mconv7_stage6_L1" twice and never "Mconv7_stage6_L2", so the
        # last heatmap layer keeps its ReLU: kept, the published weights were used that way.
        no_relu = {"conv5_5_CPM_L1", "conv5_5_CPM_L2"} | {f"Mconv7_stage{i}_L{b}" for i in range(2, 6) for b in (1, 2)}
        no_relu.add("Mconv7_stage6_L1")
        self.model0 = _blocks(
            [
                ("conv1_1", (3, 64, 3, 1, 1)),
                ("conv1_2", (64, 64, 3, 1, 1)),
                ("pool1_stage1", (2, 2, 0)),
                ("conv2_1", (64, 128, 3, 1, 1)),
                ("conv2_2", (128, 128, 3, 1, 1)),
                ("pool2_stage1", (2, 2, 0)),
                ("conv3_1", (128, 256, 3, 1, 1)),
                ("conv3_2", (256, 256, 3, 1, 1)),
                ("conv3_3", (256, 256, 3, 1, 1)),
                ("conv3_4", (256, 256, 3, 1, 1)),
                ("pool3_stage1", (2, 2, 0)),
                ("conv4_1", (256, 512, 3, 1, 1)),
                ("conv4_2", (512, 512, 3, 1, 1)),
                ("conv4_3_CPM", (512, 256, 3, 1, 1)),
                ("conv4_4_CPM", (256, 128, 3, 1, 1)),
            ],
            no_relu,
        )
        for branch, channels in ((1, 38), (2, 19)):
            stage1 = [(f"conv5_{j}_CPM_L{branch}", (128, 128, 3, 1, 1)) for j in (1, 2, 3)]
            stage1 += [
                (f"conv5_4_CPM_L{branch}", (128, 512, 1, 1, 0)),
                (f"conv5_5_CPM_L{branch}", (512, channels, 1, 1, 0)),
            ]
            self.add_module(f"model1_{branch}", _blocks(stage1, no_relu))
            for i in range(2, 7):
                stage = [(f"Mconv1_stage{i}_L{branch}", (185, 128, 7, 1, 3))]
                stage += [(f"Mconv{j}_stage{i}_L{branch}", (128, 128, 7, 1, 3)) for j in (2, 3, 4, 5)]
                stage += [(f"Mconv6_stage{i}_L{branch}", (128, 128, 1, 1, 0))]
                stage += [(f"Mconv7_stage{i}_L{branch}", (128, channels, 1, 1, 0))]
                self.add_module(f"model{i}_{branch}", _blocks(stage, no_relu))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BGR scaled to -0.5..0.5 -> (part affinity fields, heatmaps) at 1/8 of the size."""
        features = self.model0(x)
        pafs, heatmaps = self.model1_1(features), self.model1_2(features)
        for i in range(2, 7):
            h = torch.cat([pafs, heatmaps, features], 1)
            pafs, heatmaps = getattr(self, f"model{i}_1")(h), getattr(self, f"model{i}_2")(h)
        return pafs, heatmaps


def _transfer(network: nn.Module, path: Path, name_in_file: Callable[[str], str]) -> None:
    """ControlNet's `util.transfer`: every key of the network is looked up in the file under
    its published name; other keys of the file are ignored."""
    published = torch.load(str(path), map_location="cpu", weights_only=True)
    names = {key: name_in_file(key) for key in network.state_dict()}
    missing = [name for name in names.values() if name not in published]
    if missing:
        raise KeyError(f"the file has no {missing[0]!r} ({len(missing)} tensors missing)")
    network.load_state_dict({key: published[name] for key, name in names.items()})


def _unblocked(key: str) -> str:
    return key.split(".", 1)[1]


def load_body(network: nn.Module, path: Path) -> None:
    """The published flat layout -> the network (the block names dropped)."""
    _transfer(network, path, _unblocked)


def body_to_published(network: nn.Module) -> dict[str, torch.Tensor]:
    """The inverse of `load_body`: the network's state under the published flat names."""
    return {_unblocked(key): value for key, value in network.state_dict().items()}


# The trunk of the hand and face networks: VGG-19's first ten convolutions (3 x 3, each with
# a ReLU) with 2 x 2 max pools ("pool"), then three more 3 x 3 convolutions to 128 channels.
PART_TRUNK = (
    ("conv1_1", 64), ("conv1_2", 64), ("pool", 0), ("conv2_1", 128), ("conv2_2", 128), ("pool", 0),
    ("conv3_1", 256), ("conv3_2", 256), ("conv3_3", 256), ("conv3_4", 256), ("pool", 0),
    ("conv4_1", 512), ("conv4_2", 512), ("conv4_3", 512), ("conv4_4", 512),
    ("conv5_1", 512), ("conv5_2", 512), ("conv5_3_CPM", 128),
)  # fmt: skip


class PartNetwork(nn.Module):
    """The original `handpose_model` (22 heatmaps) and `FaceNet` (71): the trunk, a first
    stage (conv6_1_CPM with a ReLU, conv6_2_CPM without), then five stages (2 to 6) reading
    the last heatmaps and the trunk's features: five 7 x 7 and one 1 x 1 convolution with
    ReLUs, and a last 1 x 1 without. Only the last stage's heatmaps are used, at 1/8."""

    def __init__(self, maps: int) -> None:
        super().__init__()
        channels = 3
        for name, out in PART_TRUNK:
            if name != "pool":
                self.add_module(name, nn.Conv2d(channels, out, kernel_size=3, padding=1))
                channels = out
        self.conv6_1_CPM = nn.Conv2d(128, 512, kernel_size=1)
        self.conv6_2_CPM = nn.Conv2d(512, maps, kernel_size=1)
        for i in range(2, 7):
            self.add_module(f"Mconv1_stage{i}", nn.Conv2d(maps + 128, 128, kernel_size=7, padding=3))
            for j in (2, 3, 4, 5):
                self.add_module(f"Mconv{j}_stage{i}", nn.Conv2d(128, 128, kernel_size=7, padding=3))
            self.add_module(f"Mconv6_stage{i}", nn.Conv2d(128, 128, kernel_size=1))
            self.add_module(f"Mconv7_stage{i}", nn.Conv2d(128, maps, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for name, _ in PART_TRUNK:
            if name == "pool":
                h = nn.functional.max_pool2d(h, kernel_size=2, stride=2)
            else:
                h = nn.functional.relu(getattr(self, name)(h))
        features = h
        maps = self.conv6_2_CPM(nn.functional.relu(self.conv6_1_CPM(features)))
        for i in range(2, 7):
            h = torch.cat([maps, features], 1)
            for j in range(1, 7):
                h = nn.functional.relu(getattr(self, f"Mconv{j}_stage{i}")(h))
            maps = getattr(self, f"Mconv7_stage{i}")(h)
        return maps


class HandPoseNetwork(PartNetwork):
    def __init__(self) -> None:
        super().__init__(HAND_MAPS)


class FaceNetwork(PartNetwork):
    def __init__(self) -> None:
        super().__init__(FACE_MAPS)


def load_hand(network: nn.Module, path: Path) -> None:
    """The published flat layout -> the network, whose keys are already the flat names."""
    _transfer(network, path, str)


def _smart_resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """ControlNet 1.1's `smart_resize`: area when shrinking, Lanczos when growing, one channel
    at a time for maps that are neither gray nor color."""
    channels = 1 if x.ndim == 2 else x.shape[2]
    if channels not in (1, 3):
        return np.stack([_smart_resize(x[:, :, c], height, width) for c in range(channels)], axis=2)
    grow = float(height + width) / float(x.shape[0] + x.shape[1]) >= 1
    return cv2.resize(x, (width, height), interpolation=cv2.INTER_LANCZOS4 if grow else cv2.INTER_AREA)


def _smart_resize_by(x: np.ndarray, factor: float) -> np.ndarray:
    """ControlNet 1.1's `smart_resize_k` with fx = fy = factor (sizes truncated, as there; at
    least one pixel, where the original would fail)."""
    return _smart_resize(x, max(1, int(x.shape[0] * factor)), max(1, int(x.shape[1] * factor)))


def _network_input(image: np.ndarray) -> torch.Tensor:
    """The original `padRightDownCorner` (gray, 128, on the right and below to a multiple of 8),
    then BGR scaled to -0.5..0.5."""
    pad_down, pad_right = (-image.shape[0]) % STRIDE, (-image.shape[1]) % STRIDE
    padded = np.pad(image, ((0, pad_down), (0, pad_right), (0, 0)), constant_values=PAD_VALUE)
    return torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1))[None]).float() / 256 - 0.5


def _network_output(maps: torch.Tensor, rows: int, cols: int) -> np.ndarray:
    """Maps at 1/8 -> HxWxC float32 at the size of the network's input, less the padding."""
    return _smart_resize_by(maps[0].permute(1, 2, 0).float().numpy(), STRIDE)[:rows, :cols, :]


def body_maps(network: nn.Module, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps (HxWx19) and part affinity fields (HxWx38) at the picture's size, float64."""
    height, width = bgr.shape[:2]
    scaled = _smart_resize_by(bgr, SCALE * BOX_SIZE / height)
    pafs, heatmaps = network(_network_input(scaled))
    out = []
    for maps in (heatmaps, pafs):
        maps = _network_output(maps, scaled.shape[0], scaled.shape[1])
        out.append(_smart_resize(maps, height, width).astype(np.float64))
    return out[0], out[1]


def _blur(heatmap: np.ndarray) -> np.ndarray:
    """scipy's `gaussian_filter(x, sigma=3)`: a 25-tap kernel (radius 4 sigma) over a mirrored
    border (scipy's "reflect" is OpenCV's BORDER_REFLECT). The same sums in another order: the
    result may differ from scipy's in the last bits."""
    return cv2.GaussianBlur(heatmap, (25, 25), 3.0, sigmaY=3.0, borderType=cv2.BORDER_REFLECT)


def find_peaks(heatmaps: np.ndarray) -> list[list[tuple[int, int, float, int]]]:
    """Per keypoint, its local maxima above the threshold: (x, y, score, id), ids counting
    across keypoints in row-major order."""
    peaks: list[list[tuple[int, int, float, int]]] = []
    counter = 0
    for part in range(KEYPOINTS):
        original = heatmaps[:, :, part]
        smooth = _blur(original)
        # each neighbor outside the map counts as 0, as in the original's shifted copies
        bordered = np.pad(smooth, 1)
        is_peak = (
            (smooth >= bordered[:-2, 1:-1])
            & (smooth >= bordered[2:, 1:-1])
            & (smooth >= bordered[1:-1, :-2])
            & (smooth >= bordered[1:-1, 2:])
            & (smooth > PEAK_THRESHOLD)
        )
        ys, xs = np.nonzero(is_peak)
        peaks.append(
            [(int(x), int(y), float(original[y, x]), counter + i) for i, (x, y) in enumerate(zip(xs, ys, strict=True))]
        )
        counter += len(xs)
    return peaks


def _connections(peaks: list[list[tuple[int, int, float, int]]], pafs: np.ndarray) -> list[np.ndarray | None]:
    """Per limb, the pairs of its two keypoints' peaks that its field supports: rows of
    (id A, id B, score, index in A's peaks, index in B's peaks); None where a side has none."""
    height = pafs.shape[0]
    out: list[np.ndarray | None] = []
    for (a, b), channels in zip(LIMBS, PAF_CHANNELS, strict=True):
        field = pafs[:, :, list(channels)]
        cand_a, cand_b = peaks[a], peaks[b]
        if not cand_a or not cand_b:
            out.append(None)
            continue
        scored = []
        for i, pa in enumerate(cand_a):
            for j, pb in enumerate(cand_b):
                dx, dy = pb[0] - pa[0], pb[1] - pa[1]
                norm = max(0.001, math.sqrt(dx * dx + dy * dy))
                xs = np.rint(np.linspace(pa[0], pb[0], num=PAF_SAMPLES)).astype(int)
                ys = np.rint(np.linspace(pa[1], pb[1], num=PAF_SAMPLES)).astype(int)
                along = field[ys, xs, 0] * (dx / norm) + field[ys, xs, 1] * (dy / norm)
                # a plain left-to-right sum, as the original's `sum`
                score = sum(along.tolist()) / len(along) + min(0.5 * height / norm - 1, 0)
                if np.count_nonzero(along > PAF_THRESHOLD) > 0.8 * len(along) and score > 0:
                    scored.append((i, j, score))
        scored.sort(key=lambda c: c[2], reverse=True)  # stable, as the original's `sorted`
        chosen = np.zeros((0, 5))
        for i, j, score in scored:
            if i not in chosen[:, 3] and j not in chosen[:, 4]:
                chosen = np.vstack([chosen, [cand_a[i][3], cand_b[j][3], score, i, j]])
                if len(chosen) >= min(len(cand_a), len(cand_b)):
                    break
        out.append(chosen)
    return out


def estimate_poses(heatmaps: np.ndarray, pafs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The original `Body.__call__` after the network: (candidate, subset). candidate: rows of
    (x, y, score, id) in pixels; subset: one row per person, the candidate index of each of
    the 18 keypoints (-1: missing), then the person's total score and its number of parts."""
    peaks = find_peaks(heatmaps)
    connections = _connections(peaks, pafs)
    candidate = np.array([peak for part in peaks for peak in part], dtype=np.float64).reshape(-1, 4)
    subset = -1 * np.ones((0, KEYPOINTS + 2))
    for k, chosen in enumerate(connections):
        if chosen is None:
            continue
        index_a, index_b = LIMBS[k]
        for i in range(len(chosen)):
            part_a, part_b, score = chosen[i, 0], chosen[i, 1], chosen[i, 2]
            # The original keeps two matches at most (a third would be an IndexError there).
            found = [j for j in range(len(subset)) if subset[j][index_a] == part_a or subset[j][index_b] == part_b][:2]
            if len(found) == 1:
                j = found[0]
                if subset[j][index_b] != part_b:
                    subset[j][index_b] = part_b
                    subset[j][-1] += 1
                    subset[j][-2] += candidate[int(part_b), 2] + score
            elif len(found) == 2:
                j1, j2 = found
                membership = ((subset[j1] >= 0).astype(int) + (subset[j2] >= 0).astype(int))[:-2]
                if len(np.nonzero(membership == 2)[0]) == 0:  # disjoint: merge them
                    subset[j1][:-2] += subset[j2][:-2] + 1
                    subset[j1][-2:] += subset[j2][-2:]
                    subset[j1][-2] += score
                    subset = np.delete(subset, j2, 0)
                else:
                    subset[j1][index_b] = part_b
                    subset[j1][-1] += 1
                    subset[j1][-2] += candidate[int(part_b), 2] + score
            elif k < 17:  # a new person (ears to shoulders never start one)
                row = -1 * np.ones(KEYPOINTS + 2)
                row[index_a] = part_a
                row[index_b] = part_b
                row[-1] = 2
                row[-2] = sum(candidate[chosen[i, :2].astype(int), 2]) + score
                subset = np.vstack([subset, row])
    keep = [i for i in range(len(subset)) if not (subset[i][-1] < 4 or subset[i][-2] / subset[i][-1] < 0.4)]
    return candidate, subset[keep]


def hand_boxes(candidate: np.ndarray, subset: np.ndarray, width: int, height: int) -> list[tuple[int, int, int]]:
    """The original `handDetect` (after OpenPose's handDetector.cpp): per person, the left then
    the right hand of each complete shoulder-elbow-wrist chain, a square (left, top, side)
    centered a third of the forearm past the wrist, 1.5 times the longer of the forearm and
    0.9 upper arm, clipped to the picture; squares under 20 pixels are dropped."""
    boxes = []
    for person in subset.astype(int):
        chains = [
            chain
            for chain in ((L_SHOULDER, L_ELBOW, L_WRIST), (R_SHOULDER, R_ELBOW, R_WRIST))
            if -1 not in person[list(chain)]
        ]
        for shoulder, elbow, wrist in chains:
            (x1, y1), (x2, y2), (x3, y3) = (candidate[person[k]][:2] for k in (shoulder, elbow, wrist))
            x = x3 + HAND_RATIO_WRIST_ELBOW * (x3 - x2)
            y = y3 + HAND_RATIO_WRIST_ELBOW * (y3 - y2)
            wrist_elbow = math.sqrt((x3 - x2) ** 2 + (y3 - y2) ** 2)
            elbow_shoulder = math.sqrt((x2 - x1) ** 2 + (y2 - y1) ** 2)
            side = 1.5 * max(wrist_elbow, 0.9 * elbow_shoulder)
            x, y = max(x - side / 2, 0), max(y - side / 2, 0)
            side = min(width - x if x + side > width else side, height - y if y + side > height else side)
            if side >= MIN_BOX:
                boxes.append((int(x), int(y), int(side)))
    return boxes


def face_boxes(candidate: np.ndarray, subset: np.ndarray, width: int, height: int) -> list[tuple[int, int, int]]:
    """The original `faceDetect`: per person with a nose and an eye or an ear, a square around
    the nose, half its side the farthest of 3 times an eye's and 1.5 times an ear's distance
    (the larger of dx and dy). As there, the clipping tests the half side against the
    picture's edge, so the crop can run past it (and then comes out narrower)."""
    boxes = []
    for person in subset.astype(int):
        if person[NOSE] == -1 or all(person[k] == -1 for k in (R_EYE, L_EYE, R_EAR, L_EAR)):
            continue
        x0, y0 = candidate[person[NOSE]][:2]
        half = 0.0
        for part, factor in ((R_EYE, 3.0), (L_EYE, 3.0), (R_EAR, 1.5), (L_EAR, 1.5)):
            if person[part] != -1:
                x1, y1 = candidate[person[part]][:2]
                half = max(half, max(abs(x0 - x1), abs(y0 - y1)) * factor)
        x, y = max(x0 - half, 0), max(y0 - half, 0)
        side = min(width - x if x + half > width else half * 2, height - y if y + half > height else half * 2)
        if side >= MIN_BOX:
            boxes.append((int(x), int(y), int(side)))
    return boxes


def hand_maps(network: nn.Module, crop: np.ndarray) -> np.ndarray:
    """A BGR hand crop -> its 22 heatmaps (128 x 128 x 22, float64): the crop blurred, then
    squared to 184, 368, 552 and 736 pixels, each scale's maps brought to 128 x 128 and
    averaged (in float32 per scale, summed in float64, as there)."""
    blurred = cv2.GaussianBlur(crop, (0, 0), HAND_BLUR)
    total = np.zeros((HAND_MAP_SIZE, HAND_MAP_SIZE, HAND_MAPS))
    for scale in HAND_SCALES:
        size = int(scale * BOX_SIZE)
        scaled = _smart_resize(blurred, size, size)
        maps = _network_output(network(_network_input(scaled)), size, size)
        total += _smart_resize(maps, HAND_MAP_SIZE, HAND_MAP_SIZE) / len(HAND_SCALES)
    return total


def _components(binary: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """scikit-image's `label(binary, connectivity=2)`: 8-connected components, with their
    labels in the order their first pixels come in row-major order (as scikit-image numbers
    them; OpenCV's numbering is its own)."""
    _, labels = cv2.connectedComponents(binary.astype(np.uint8), connectivity=8)
    found, first = np.unique(labels, return_index=True)
    return labels, [int(label) for _, label in sorted(zip(first, found, strict=True)) if label != 0]


def hand_peaks(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Heatmaps (128 x 128) of a crop height x width -> 21 (x, y) in the crop, (0, 0) where
    none: per keypoint, of the regions where the blurred heatmap passes the threshold, the
    one with the largest sum of the raw heatmap, and its first maximum there."""
    peaks = []
    for part in range(HAND_KEYPOINTS):
        original = maps[:, :, part].copy()
        binary = _blur(original) > HAND_THRESHOLD
        if not binary.any():
            peaks.append((0, 0))
            continue
        labels, order = _components(binary)
        best = order[int(np.argmax([np.sum(original[labels == label]) for label in order]))]
        original[labels != best] = 0
        y, x = np.unravel_index(int(np.argmax(original)), original.shape)
        peaks.append((int(float(x) * float(width) / HAND_MAP_SIZE), int(float(y) * float(height) / HAND_MAP_SIZE)))
    return np.array(peaks)


def face_maps(network: nn.Module, crop: np.ndarray) -> np.ndarray:
    """A BGR face crop -> its 71 heatmaps (71 x h x w, float32): the crop resized to 384 x
    384, the maps brought back bilinearly (corners aligned) to the crop's size."""
    height, width = crop.shape[:2]
    data = torch.from_numpy(_smart_resize(crop, FACE_INPUT, FACE_INPUT)).permute(2, 0, 1) / 256.0 - 0.5
    maps = network(data[None])
    return nn.functional.interpolate(maps, (height, width), mode="bilinear", align_corners=True)[0].numpy()


def face_peaks(maps: np.ndarray) -> np.ndarray:
    """Per heatmap whose maximum passes the threshold (the background's included, as in the
    original), the (x, y) of its first maximum; shape (n, 2)."""
    peaks = []
    for heatmap in maps:
        if (heatmap > FACE_THRESHOLD).any():
            y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
            peaks.append((int(x), int(y)))
    return np.array(peaks, dtype=np.int64).reshape(-1, 2)


def to_fractions(peaks: np.ndarray, left: int, top: int, width: int, height: int) -> np.ndarray:
    """Peaks in a crop -> fractions of the picture's size, in float32 as the original: a
    coordinate of 0 (nothing found) becomes -1 (not drawn), the others move by the corner."""
    peaks = peaks.astype(np.float32)
    out = np.empty_like(peaks)
    out[:, 0] = np.where(peaks[:, 0] < 1e-6, -1, peaks[:, 0] + left) / float(width)
    out[:, 1] = np.where(peaks[:, 1] < 1e-6, -1, peaks[:, 1] + top) / float(height)
    return out


def draw_bodypose(canvas: np.ndarray, candidate: np.ndarray, subset: np.ndarray) -> np.ndarray:
    """The original `draw_bodypose`: the limbs as ellipses, the canvas then dimmed to 60%, the
    keypoints as dots on top. `candidate` holds coordinates as fractions of the size."""
    height, width = canvas.shape[:2]
    for i in range(DRAWN_LIMBS):
        for person in subset:
            index = person[list(LIMBS[i])]
            if -1 in index:
                continue
            ys = candidate[index.astype(int), 0] * float(width)
            xs = candidate[index.astype(int), 1] * float(height)
            mean_x, mean_y = np.mean(xs), np.mean(ys)
            length = ((xs[0] - xs[1]) ** 2 + (ys[0] - ys[1]) ** 2) ** 0.5
            angle = math.degrees(math.atan2(xs[0] - xs[1], ys[0] - ys[1]))
            polygon = cv2.ellipse2Poly(
                (int(mean_y), int(mean_x)), (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1
            )
            cv2.fillConvexPoly(canvas, polygon, COLORS[i])
    canvas = (canvas * 0.6).astype(np.uint8)
    for i in range(KEYPOINTS):
        for person in subset:
            index = int(person[i])
            if index == -1:
                continue
            x, y = candidate[index][0:2]
            cv2.circle(canvas, (int(x * width), int(y * height)), 4, COLORS[i], thickness=-1)
    return canvas


def draw_handpose(canvas: np.ndarray, hands: list[np.ndarray]) -> np.ndarray:
    """The original `draw_handpose`: per hand, its 20 edges as 2-pixel lines in hues around
    the circle, then its keypoints as blue dots; coordinates are fractions of the size."""
    height, width = canvas.shape[:2]
    for hand in hands:
        points = [(int(x * width), int(y * height)) for x, y in hand.tolist()]
        for (a, b), color in zip(HAND_EDGES, HAND_EDGE_COLORS, strict=True):
            (x1, y1), (x2, y2) = points[a], points[b]
            if x1 > EPS and y1 > EPS and x2 > EPS and y2 > EPS:
                cv2.line(canvas, (x1, y1), (x2, y2), color, thickness=2)
        for x, y in points:
            if x > EPS and y > EPS:
                cv2.circle(canvas, (x, y), 4, HAND_POINT_COLOR, thickness=-1)
    return canvas


def draw_facepose(canvas: np.ndarray, faces: list[np.ndarray]) -> np.ndarray:
    """The original `draw_facepose`: each landmark a white dot."""
    height, width = canvas.shape[:2]
    for face in faces:
        for x, y in face.tolist():
            x, y = int(x * width), int(y * height)
            if x > EPS and y > EPS:
                cv2.circle(canvas, (x, y), 3, FACE_POINT_COLOR, thickness=-1)
    return canvas


def draw_pose(
    height: int,
    width: int,
    bodies: tuple[np.ndarray, np.ndarray] | None,
    hands: list[np.ndarray],
    faces: list[np.ndarray],
) -> np.ndarray:
    """The original `draw_pose` on a black canvas: the bodies (candidate as fractions, subset;
    None: not drawn), then every hand, then every face."""
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    if bodies is not None:
        canvas = draw_bodypose(canvas, *bodies)
    return draw_facepose(draw_handpose(canvas, hands), faces)


def _fractions_of(candidate: np.ndarray, width: int, height: int) -> np.ndarray:
    """As ControlNet 1.1's detector: body coordinates as fractions, multiplied back when drawn."""
    candidate = candidate.copy()
    candidate[:, 0] /= float(width)
    candidate[:, 1] /= float(height)
    return candidate


def render(heatmaps: np.ndarray, pafs: np.ndarray) -> np.ndarray:
    """Maps at the picture's size -> the skeletons drawn on a black canvas of that size."""
    height, width = heatmaps.shape[:2]
    candidate, subset = estimate_poses(heatmaps, pafs)
    return draw_pose(height, width, (_fractions_of(candidate, width, height), subset), [], [])


def detect(
    array: np.ndarray, method: str, body: nn.Module, hand: nn.Module | None = None, face: nn.Module | None = None
) -> np.ndarray:
    """An RGB picture -> the control image of `method`: the people's bodies, and the hands and
    faces the method draws, found on crops of the picture around the body keypoints."""
    draw_body, draw_hands, draw_faces = PARTS[method]
    if (draw_hands and hand is None) or (draw_faces and face is None):
        raise ValueError(f"{method} needs the {'hand' if draw_hands and hand is None else 'face'} network")
    bgr = np.ascontiguousarray(array[:, :, ::-1])  # the networks read BGR
    height, width = bgr.shape[:2]
    candidate, subset = estimate_poses(*body_maps(body, bgr))
    hands, faces = [], []
    if draw_hands:
        for x, y, side in hand_boxes(candidate, subset, width, height):
            crop = bgr[y : y + side, x : x + side]
            peaks = hand_peaks(hand_maps(hand, crop), crop.shape[0], crop.shape[1])
            hands.append(to_fractions(peaks, x, y, width, height))
    if draw_faces:
        for x, y, side in face_boxes(candidate, subset, width, height):
            peaks = face_peaks(face_maps(face, bgr[y : y + side, x : x + side]))
            if len(peaks):
                faces.append(to_fractions(peaks, x, y, width, height))
    bodies = (_fractions_of(candidate, width, height), subset) if draw_body else None
    return draw_pose(height, width, bodies, hands, faces)


def run(
    network: nn.Module,
    array: np.ndarray,
    method: str,
    args: Mapping[str, Any],
    uses: Mapping[str, nn.Module] | None = None,
) -> np.ndarray:
    """The body record: "openpose" on the body network alone, "openpose_full" with the hand
    and face networks too."""
    uses = uses or {}
    return detect(array, method, network, uses.get("openpose_hand"), uses.get("openpose_face"))


def run_hand(
    network: nn.Module, array: np.ndarray, method: str, args: Mapping[str, Any], uses: Mapping[str, nn.Module]
) -> np.ndarray:
    """The hand record ("openpose_hand"), with the body network."""
    return detect(array, method, uses["openpose_body"], hand=network)


def run_face(
    network: nn.Module, array: np.ndarray, method: str, args: Mapping[str, Any], uses: Mapping[str, nn.Module]
) -> np.ndarray:
    """The face record ("openpose_face", "openpose_faceonly"), with the body network."""
    return detect(array, method, uses["openpose_body"], face=network)


ANNOTATORS = (
    Annotator(
        name="openpose_body",
        methods=("openpose", "openpose_full"),
        weights=ANNOTATORS_REPO + "body_pose_model.pth",
        build=BodyPoseNetwork,
        run=run,
        load=load_body,
        to_published=body_to_published,
        uses={"openpose_full": ("openpose_hand", "openpose_face")},
    ),
    Annotator(
        name="openpose_hand",
        methods=("openpose_hand",),
        weights=ANNOTATORS_REPO + "hand_pose_model.pth",
        build=HandPoseNetwork,
        run=run_hand,
        load=load_hand,
        uses={"openpose_hand": ("openpose_body",)},
    ),
    Annotator(
        name="openpose_face",
        methods=("openpose_face", "openpose_faceonly"),
        weights=ANNOTATORS_REPO + "facenet.pth",
        build=FaceNetwork,
        run=run_face,
        uses={"openpose_face": ("openpose_body",), "openpose_faceonly": ("openpose_body",)},
    ),
)
