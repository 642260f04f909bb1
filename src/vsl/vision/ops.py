"""Box operations of the detector in plain torch: IoU, greedy NMS, per-class NMS, RoI max pooling.

They follow ``torchvision.ops`` exactly (its CPU kernels are the reference; torchvision's wheels do
not load with the CPU build of torch this project installs):

- IoU by torchvision's convention: area = (x2 - x1) * (y2 - y1), no "+ 1" as in Caffe; a box is
  suppressed when its IoU with a kept, higher-scored box is strictly above the threshold, the IoU
  (float32) compared with the threshold as a double; scores sorted stably in descending order.
- RoI pooling as ``torchvision.ops.roi_pool``: the box scaled by ``spatial_scale`` and rounded half
  away from zero to feature cells, at least 1 x 1 cell, ``inclusive`` of its end cell; bin ``p`` of
  ``n`` covers ``[floor(p * size / n), ceil((p + 1) * size / n))`` (float32) offset by the start,
  clipped to the map; the max over the bin, 0 for an empty bin.

Cross-checked against ``torchvision.ops.nms`` / ``roi_pool`` 0.28.0 (the CUDA wheel run on the CPU
in a side environment): identical keep lists and bit-identical pooled values, see
``tests/test_vision_ops.py``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """(N, 4) x1, y1, x2, y2 -> (N,) ``(x2 - x1) * (y2 - y1)``."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU matrix (N, M) of boxes ``a`` (N, 4) and ``b`` (M, 4), torchvision's convention and float order."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (box_area(a)[:, None] + box_area(b)[None, :] - inter)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
        max_keep: Optional[int] = None) -> torch.Tensor:
    """Greedy NMS: the indices (K,) of the kept boxes in descending score, as ``torchvision.ops.nms``.

    ``boxes`` (N, 4), ``scores`` (N,). With ``max_keep`` it stops after that many (the same first
    ``max_keep`` as ``nms(...)[:max_keep]``). The loop runs once per *kept* box (each step one IoU
    row against all boxes), so the RPN's 6,000 candidates cost at most 300 vectorised steps.
    """
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    sorted_boxes = boxes[order]
    areas = box_area(sorted_boxes)
    alive = torch.ones(n, dtype=torch.bool, device=boxes.device)
    limit = n if max_keep is None else min(int(max_keep), n)
    keep = []
    start = 0
    while len(keep) < limit:
        # The first box still alive from ``start`` on is the next kept one.
        rest = alive[start:]
        if not bool(rest.any()):
            break
        i = start + int(torch.argmax(rest.to(torch.uint8)))
        keep.append(i)
        box = sorted_boxes[i]
        lt = torch.maximum(box[:2], sorted_boxes[i + 1:, :2])
        rb = torch.minimum(box[2:], sorted_boxes[i + 1:, 2:])
        wh = (rb - lt).clamp(min=0)
        inter = wh[:, 0] * wh[:, 1]
        iou = inter / (areas[i] + areas[i + 1:] - inter)
        alive[i + 1:] &= ~(iou.double() > iou_threshold)
        start = i + 1
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def nms_per_class(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS of the same boxes under every class's scores at once: ``kept`` (N, C) bool.

    ``boxes`` (N, 4); ``scores`` (N, C). ``kept[:, c]`` marks the boxes that
    ``torchvision.ops.nms(boxes, scores[:, c], iou_threshold)`` keeps. The IoU matrix is computed
    once (the boxes are shared); the greedy suppression then advances all C classes together, one
    rank at a time (N steps of (C, N) boolean work), instead of C separate NMS calls.
    """
    n, c = scores.shape
    device = boxes.device
    kept = torch.zeros(c, n, dtype=torch.bool, device=device)
    if n == 0:
        return kept.T
    over = box_iou(boxes, boxes).double() > iou_threshold                   # (N, N)
    order = torch.sort(scores.T, dim=1, descending=True, stable=True).indices  # (C, N)
    suppressed = torch.zeros(c, n, dtype=torch.bool, device=device)
    classes = torch.arange(c, device=device)
    for rank in range(n):
        idx = order[:, rank]                                                # (C,) box at this rank
        alive = ~suppressed[classes, idx]                                   # (C,)
        kept[classes, idx] = alive
        suppressed |= alive[:, None] & over[idx]
    return kept.T


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's ``round`` of float32 values, computed in float64 so that 0.49999997 stays below 0.5."""
    x = x.double()
    return (torch.sign(x) * torch.floor(x.abs() + 0.5)).long()


def roi_pool_bins(rois: torch.Tensor, height: int, width: int, output_size: int,
                  spatial_scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The feature cells of every bin: ``(h_start, h_end, w_start, w_end)``, each (K, output_size) long.

    ``rois`` (K, 4) x1, y1, x2, y2 in input pixels. Bin ``[p]`` of RoI ``k`` covers rows
    ``h_start[k, p] <= h < h_end[k, p]`` (torchvision's ``roi_pool`` arithmetic, float32 bins).
    """
    scaled = rois.float() * torch.tensor(spatial_scale, dtype=torch.float32)
    cells = _round_half_away(scaled)                                        # (K, 4) x1, y1, x2, y2
    steps = torch.arange(output_size, device=rois.device, dtype=torch.float32)

    def axis(start: torch.Tensor, end: torch.Tensor, limit: int) -> Tuple[torch.Tensor, torch.Tensor]:
        size = torch.clamp(end - start + 1, min=1)
        bin_size = size.float() / float(output_size)                        # float32, as T in the kernel
        lo = torch.floor(steps[None, :] * bin_size[:, None]).long() + start[:, None]
        hi = torch.ceil((steps[None, :] + 1) * bin_size[:, None]).long() + start[:, None]
        return lo.clamp(0, limit), hi.clamp(0, limit)

    h0, h1 = axis(cells[:, 1], cells[:, 3], height)
    w0, w1 = axis(cells[:, 0], cells[:, 2], width)
    return h0, h1, w0, w1


def roi_pool(features: torch.Tensor, rois: torch.Tensor, output_size: int, spatial_scale: float) -> torch.Tensor:
    """RoI max pooling, ``torchvision.ops.roi_pool(features, rois, output_size, spatial_scale)``.

    ``features`` (N, C, H, W); ``rois`` (K, 5) batch index, x1, y1, x2, y2 (input pixels).
    Returns (K, C, S, S) in channels-last memory (what the res5 head's convolutions want).

    Vectorised over RoIs and bins: a bin is a rectangle of ``kh x kw`` cells; for each distinct
    ``(kh, kw)`` (a handful: bins are at most a few cells) one stride-1 max pool of the whole map
    gives the max of every such rectangle, and one row gather picks each bin's value. The loop is
    over those shapes, never over RoIs.
    """
    n, c, h, w = features.shape
    k = rois.shape[0]
    s = output_size
    out = features.new_zeros((k * s * s, c))
    if k == 0:
        return out.view(k, s, s, c).permute(0, 3, 1, 2)
    batch = rois[:, 0].long()
    h0, h1, w0, w1 = roi_pool_bins(rois[:, 1:], h, w, s, spatial_scale)
    # Per bin (K, S, S): its top-left cell, its height and width in cells.
    top = h0[:, :, None].expand(k, s, s)
    left = w0[:, None, :].expand(k, s, s)
    kh = (h1 - h0)[:, :, None].expand(k, s, s).reshape(-1)
    kw = (w1 - w0)[:, None, :].expand(k, s, s).reshape(-1)
    top, left = top.reshape(-1), left.reshape(-1)
    image = batch[:, None].expand(k, s * s).reshape(-1)
    nonempty = (kh > 0) & (kw > 0)
    shape_id = kh * (w + 1) + kw
    for sid in torch.unique(shape_id[nonempty]).tolist():
        bh, bw = divmod(sid, w + 1)
        # (N, C, H - bh + 1, W - bw + 1): the max of every bh x bw rectangle, channels last for the gather.
        table = F.max_pool2d(features, kernel_size=(bh, bw), stride=1)
        th, tw = table.shape[-2:]
        table = table.permute(0, 2, 3, 1).reshape(-1, c)
        sel = torch.nonzero(shape_id == sid).squeeze(1)
        rows = (image[sel] * th + top[sel]) * tw + left[sel]
        out[sel] = table[rows]
    return out.view(k, s, s, c).permute(0, 3, 1, 2)
