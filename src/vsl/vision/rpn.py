"""The region proposal network on res4: anchors, box decoding, clipping and the 6000 / 0.7 / 300 selection.

Conventions of the reference port (detectron2's): 12 cell anchors per position, size-major
(sizes x aspect ratios, ``w = sqrt(size^2 / ratio)``, ``h = ratio * w``, centred on 0), shifted
by ``(x, y) * 16``; proposals ordered position-major then anchor (``(H, W, A)`` flattened); the
top 6,000 objectness logits (sorted descending) decoded, clipped to the input image, those not
wider *and* taller than 16 pixels dropped, NMS at 0.7, the first 300 kept in descending logit.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torch import nn

from . import spec
from .ops import nms


def cell_anchors(sizes: Sequence[float] = spec.ANCHOR_SIZES,
                 ratios: Sequence[float] = spec.ANCHOR_ASPECT_RATIOS) -> torch.Tensor:
    """(len(sizes) * len(ratios), 4) anchors x1, y1, x2, y2 centred on (0, 0), size-major (float64 math)."""
    rows = []
    for size in sizes:
        for ratio in ratios:
            w = math.sqrt(size * size / ratio)
            h = ratio * w
            rows.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(rows, dtype=torch.float32)


def grid_anchors(cells: torch.Tensor, height: int, width: int, stride: int = spec.FEATURE_STRIDE,
                 offset: float = spec.ANCHOR_OFFSET) -> torch.Tensor:
    """(height * width * A, 4) anchors of a feature map, position-major (row, column) then anchor."""
    device = cells.device
    xs = torch.arange(offset * stride, width * stride, step=stride, dtype=torch.float32, device=device)
    ys = torch.arange(offset * stride, height * stride, step=stride, dtype=torch.float32, device=device)
    shift_y, shift_x = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=-1).reshape(-1, 1, 4)
    return (shifts + cells.float().reshape(1, -1, 4)).reshape(-1, 4)


def apply_deltas(deltas: torch.Tensor, boxes: torch.Tensor, weights: Tuple[float, float, float, float],
                 scale_clamp: float = spec.BOX_SCALE_CLAMP) -> torch.Tensor:
    """Decode (N, 4k) deltas dx, dy, dw, dh (divided by ``weights``) relative to (N, 4) boxes -> (N, 4k) boxes.

    Centre moved by ``dx * width``, size scaled by ``exp(min(dw, scale_clamp))``; the float
    operations in the order of the reference's box transform, so that proposals agree to rounding.
    """
    boxes = boxes.to(deltas.dtype)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx = deltas[:, 0::4] / wx
    dy = deltas[:, 1::4] / wy
    dw = torch.clamp(deltas[:, 2::4] / ww, max=scale_clamp)
    dh = torch.clamp(deltas[:, 3::4] / wh, max=scale_clamp)
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    pred_w = torch.exp(dw) * widths[:, None]
    pred_h = torch.exp(dh) * heights[:, None]
    out = torch.stack([pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h,
                       pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h], dim=-1)   # (N, k, 4)
    return out.reshape(deltas.shape)


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, 4) boxes clamped to x in [0, width], y in [0, height]."""
    return torch.stack([boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height),
                        boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)], dim=1)


class AnchorGenerator(nn.Module):
    """Holds the cell anchors under the port's key ``cell_anchors.0`` (the stored values are used)."""

    def __init__(self) -> None:
        super().__init__()
        self.cell_anchors = nn.ParameterList([nn.Parameter(cell_anchors(), requires_grad=False)])


class RPNHead(nn.Module):
    """3x3 convolution + ReLU, then 1x1 objectness logits (A) and 1x1 anchor deltas (4A)."""

    def __init__(self, in_channels: int, hidden: int, num_anchors: int = spec.NUM_ANCHORS) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.objectness_logits = nn.Conv2d(hidden, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(hidden, num_anchors * 4, 1)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        t = torch.relu(self.conv(x))
        return self.objectness_logits(t), self.anchor_deltas(t)


class RegionProposalNetwork(nn.Module):
    """res4 map of one image -> its proposals (<= 300, 4) in input pixels and their logits, descending."""

    def __init__(self, in_channels: int, hidden: int) -> None:
        super().__init__()
        self.anchor_generator = AnchorGenerator()
        self.rpn_head = RPNHead(in_channels, hidden)

    def forward(self, features: torch.Tensor, image_size: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``features`` (1, C, H, W); ``image_size`` (h, w) of the network input. Returns (R, 4), (R,)."""
        logits, deltas = self.rpn_head(features)
        _, a, h, w = logits.shape
        logits = logits[0].permute(1, 2, 0).reshape(-1).float()                       # (H*W*A,)
        deltas = deltas[0].view(a, 4, h, w).permute(2, 3, 0, 1).reshape(-1, 4).float()  # (H*W*A, 4)
        anchors = grid_anchors(self.anchor_generator.cell_anchors[0], h, w)
        return select_proposals(anchors, deltas, logits, image_size)


def select_proposals(anchors: torch.Tensor, deltas: torch.Tensor, logits: torch.Tensor,
                     image_size: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The test-time proposal selection: top 6000 logits, decode, clip, drop small, NMS 0.7, first 300.

    ``anchors``, ``deltas`` (M, 4), ``logits`` (M,). Returns boxes (R, 4) and logits (R,), descending.
    """
    top = min(spec.RPN_PRE_NMS_TOP_N, logits.numel())
    # The same (descending, default) sort as the reference, so that equal logits keep its order.
    scores, idx = torch.sort(logits, descending=True)
    scores, idx = scores[:top], idx[:top]
    boxes = clip_boxes(apply_deltas(deltas[idx], anchors[idx], spec.RPN_BOX_WEIGHTS), *image_size)
    big = ((boxes[:, 2] - boxes[:, 0]) > spec.RPN_MIN_SIZE) & ((boxes[:, 3] - boxes[:, 1]) > spec.RPN_MIN_SIZE)
    boxes, scores = boxes[big], scores[big]
    keep = nms(boxes, scores, spec.RPN_NMS_THRESH, max_keep=spec.RPN_POST_NMS_TOP_N)
    return boxes[keep], scores[keep]
