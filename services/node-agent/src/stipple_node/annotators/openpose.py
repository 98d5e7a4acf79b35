"""OpenPose body keypoints: the 18-keypoint body network of CMU's OpenPose (the PyTorch port
by Hzzone, pytorch-openpose) and its post-processing, as ControlNet 1.1 runs them
(lllyasviel/ControlNet-v1-1-nightly, `annotator/openpose/{model,body,util,__init__}.py`,
Apache-2.0; the network and weights come from CMU's OpenPose, whose own license is
non-commercial), rewritten without scipy or matplotlib.

The published `body_pose_model.pth` is a flat state dict converted from Caffe: its keys are
the layer names alone ("conv1_1.weight", "Mconv1_stage2_L1.weight"), while the network keeps
its layers in named blocks ("model0.conv1_1.weight", "model2_1.Mconv1_stage2_L1.weight").
ControlNet's `util.transfer` drops the block name; `load_body` does the same and
`body_to_published` is its inverse.

Only the body ("openpose") is served: the hand and face methods need a second network
(`hand_pose_model.pth`, `facenet.pth`) run on crops the body network finds.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from . import ANNOTATORS_REPO, Annotator

METHODS = ("openpose",)

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


def load_body(network: nn.Module, path: Path) -> None:
    """The published flat layout -> the network (ControlNet's `util.transfer`: every key of
    the network, less its block name, is looked up in the file; other keys are ignored)."""
    published = torch.load(str(path), map_location="cpu", weights_only=True)
    missing = [key for key in network.state_dict() if key.split(".", 1)[1] not in published]
    if missing:
        raise KeyError(f"the file has no {missing[0].split('.', 1)[1]!r} ({len(missing)} layers missing)")
    network.load_state_dict({key: published[key.split(".", 1)[1]] for key in network.state_dict()})


def body_to_published(network: nn.Module) -> dict[str, torch.Tensor]:
    """The inverse of `load_body`: the network's state under the published flat names."""
    return {key.split(".", 1)[1]: value for key, value in network.state_dict().items()}


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


def body_maps(network: nn.Module, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps (HxWx19) and part affinity fields (HxWx38) at the picture's size, float64."""
    height, width = bgr.shape[:2]
    scaled = _smart_resize_by(bgr, SCALE * BOX_SIZE / height)
    pad_down, pad_right = (-scaled.shape[0]) % STRIDE, (-scaled.shape[1]) % STRIDE
    padded = np.pad(scaled, ((0, pad_down), (0, pad_right), (0, 0)), constant_values=PAD_VALUE)
    data = torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1))[None]).float() / 256 - 0.5
    pafs, heatmaps = network(data)
    out = []
    for maps in (heatmaps, pafs):
        maps = _smart_resize_by(maps[0].permute(1, 2, 0).float().numpy(), STRIDE)
        maps = maps[: padded.shape[0] - pad_down, : padded.shape[1] - pad_right, :]
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


def draw_bodypose(canvas: np.ndarray, candidate: np.ndarray, subset: np.ndarray) -> np.ndarray:
    """The original `draw_bodypose`: keypoints as dots, then limbs as ellipses blended 60% over
    the canvas. `candidate` holds coordinates as fractions of the width and height."""
    height, width = canvas.shape[:2]
    for i in range(KEYPOINTS):
        for person in subset:
            index = int(person[i])
            if index == -1:
                continue
            x, y = candidate[index][0:2]
            cv2.circle(canvas, (int(x * width), int(y * height)), 4, COLORS[i], thickness=-1)
    for i in range(DRAWN_LIMBS):
        for person in subset:
            index = person[list(LIMBS[i])]
            if -1 in index:
                continue
            drawn = canvas.copy()
            ys = candidate[index.astype(int), 0] * float(width)
            xs = candidate[index.astype(int), 1] * float(height)
            mean_x, mean_y = np.mean(xs), np.mean(ys)
            length = ((xs[0] - xs[1]) ** 2 + (ys[0] - ys[1]) ** 2) ** 0.5
            angle = math.degrees(math.atan2(xs[0] - xs[1], ys[0] - ys[1]))
            polygon = cv2.ellipse2Poly(
                (int(mean_y), int(mean_x)), (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1
            )
            cv2.fillConvexPoly(drawn, polygon, COLORS[i])
            canvas = cv2.addWeighted(canvas, 0.4, drawn, 0.6, 0)
    return canvas


def render(heatmaps: np.ndarray, pafs: np.ndarray) -> np.ndarray:
    """Maps at the picture's size -> the skeletons drawn on a black canvas of that size."""
    height, width = heatmaps.shape[:2]
    candidate, subset = estimate_poses(heatmaps, pafs)
    # as ControlNet 1.1's detector: coordinates as fractions, multiplied back when drawn
    candidate[:, 0] /= float(width)
    candidate[:, 1] /= float(height)
    return draw_bodypose(np.zeros((height, width, 3), dtype=np.uint8), candidate, subset)


def run(network: nn.Module, array: np.ndarray, method: str, args: Mapping[str, Any]) -> np.ndarray:
    """The body pose of everyone in an RGB picture, drawn as ControlNet 1.1 draws it."""
    heatmaps, pafs = body_maps(network, np.ascontiguousarray(array[:, :, ::-1]))  # the network reads BGR
    return render(heatmaps, pafs)


ANNOTATORS = (
    Annotator(
        name="openpose_body",
        methods=METHODS,
        weights=ANNOTATORS_REPO + "body_pose_model.pth",
        build=BodyPoseNetwork,
        run=run,
        load=load_body,
        to_published=body_to_published,
    ),
)
